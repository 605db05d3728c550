"""Sparse training in wall-clock time (issue 18): dense PyTorch vs masked-dense vs the sparse backend.

Per-epoch wall time on 2 threads, side by side in one process, of three trainers of one
model: **dense** (a plain model, SGD), **masked-dense** (today's path: a static
``sn.Sparsifier``, random masks fixed at step 0, the wrapped optimizer, ``sp.step()``) and
**sparse** (the same static Sparsifier with ``backend="sparse"``: at the first ``sp.step()``
it times one training step of each masked Linear on the layer's recorded input, masked-dense
vs sparse, and swaps the faster ones for ``SparseTrainingLinear`` layers whose parameter is
the vector of active values; the wrapped optimizer follows, so the momentum of a swapped
layer is per active value). Models: the 784-1000-1000-1000-10 ReLU
MLP on Fashion-MNIST and LeNet-300-100 on MNIST, at 80/90/95/98/99% sparsity, ERK and
uniform layer densities (``distribution=``), batch 128 and 32. The masked and sparse
trainers start from the same weights (masks from the Sparsifier's seeded generator, kept
weights re-initialized for their sparse fan-in by ``sn.rescale_for_sparse_fan_in``); the
dense trainer from the same initialization before masking.

Swap decision, per masked Linear: the Sparsifier's own (:mod:`sparsenn.train.layer_swap`,
:mod:`sparsenn.backend.training.swap`): forward, backward, the masked path's zeroing and a
momentum update of the layer alone on the first training batch's input, masked-dense vs
sparse, timed interleaved; swapped if the sparse median is below 0.95 of the dense one. The
table's "swapped" column and the per-layer table come from ``sp.backend_report()``.

A training step is ``zero_grad -> forward -> cross-entropy -> backward -> opt.step()``
(``-> sp.step()`` where there is a Sparsifier), SGD with Nesterov momentum 0.9, lr 0.1,
weight decay 5e-4 (the recipe of ``bench/sparse_training.py``). The data set is one
pre-shuffled tensor; a batch is a slice of it, and the three trainers read the same
batches in the same order. Timing: after one untimed warm-up chunk per trainer,
``--rounds`` rounds in which each trainer runs one chunk of consecutive steps (the order
rotates per round); 100 timed steps per trainer at batch 128, 200 at batch 32 (by default);
reported: the median over chunks of the mean step time, and that times the steps of a
60,000-image epoch (469 at batch 128, 1,875 at batch 32). Where the time goes: one
configuration (MLP, 95%, ERK, batch 128) is also timed phase by phase (forward + loss,
backward, optimizer step).

Accuracy: the MLP on Fashion-MNIST at 95% (ERK), ``--seeds`` seeds, masked-dense vs sparse
(the swaps measured at batch 128), ``--epochs`` epochs at batch 128 with a per-step cosine
decay, final test accuracy. Each seed's two runs start from the same weights (checked: the
sparse layers' dense weights equal the masked weights exactly, and the first batch's loss
is compared) and see the same batches.

Targets (issue 18, MLP at batch 128): 95% sparse at least 2x faster per epoch than dense
PyTorch, 90% at least 1.5x, 99% at least 4x; the sparse backend never slower than masked-dense
(any row); its accuracy equal to masked-dense within seed noise (here: the mean difference
no larger than the larger of the two across-seed standard deviations).

    python bench/sparse_training_speed.py --out bench/results/sparse_training_speed   # ~9 min, 2 idle cores
    python bench/sparse_training_speed.py --quick                                     # code check (< 1 min)

Timings need an otherwise idle machine; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import log, run_meta, write_results
from sparse_training import (  # the same MLP and mask/rescale seed offsets
    MASK_SEED,
    MLP,
    RESCALE_SEED,
)

import sparsenn as sn
from sparsenn.backend.training import SparseTrainingLinear
from sparsenn.data import load_idx_dataset
from sparsenn.models.zoo import LeNet300100
from sparsenn.train.loop import cosine_schedule

SPARSITIES = (0.8, 0.9, 0.95, 0.98, 0.99)
DISTRIBUTIONS = ("erk", "uniform")
BATCHES = (128, 32)
STEPS = {128: 100, 32: 200}  # timed steps per trainer
EPOCH = 60_000  # training images per epoch
TARGETS = {0.9: 1.5, 0.95: 2.0, 0.99: 4.0}  # sparsity -> minimum dense / sparse per epoch (MLP, batch 128)
TARGET_BATCH = 128
ACC_SPARSITY, ACC_DISTRIBUTION = 0.95, "erk"
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
VARIANTS = ("dense", "masked", "sparse")
LABELS = {"dense": "dense PyTorch", "masked": "masked-dense", "sparse": "sparse backend"}


# key -> (name, constructor, data set, per-pixel mean, std of its training images)
MODELS = {"mlp": ("MLP 784-1000-1000-1000-10", MLP, "fashion_mnist", 0.2860, 0.3530),
          "lenet": ("LeNet-300-100", LeNet300100, "mnist", 0.1307, 0.3081)}


# ----------------------------------------------------------------------------- data


def load(dataset: str, data_dir: str, mean: float, std: float, train_size: int | None = None):
    """``(x_train, y_train, x_test, y_test)``: normalized ``(N, 784)`` float32 tensors, whole sets in memory."""
    tr, te = load_idx_dataset(dataset, data_dir, flatten=True)
    xtr, ytr = tr.tensors
    xte, yte = te.tensors
    if train_size:
        xtr, ytr = xtr[:train_size], ytr[:train_size]
    return ((xtr - mean) / std).contiguous(), ytr, ((xte - mean) / std).contiguous(), yte


def shuffled(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One shuffled contiguous copy: a batch is then a slice (no gather per step)."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm].contiguous(), y[perm].contiguous()


# ----------------------------------------------------------------------------- the three models


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def masked_model(init: nn.Module, sparsity: float, distribution: str, seed: int):
    """A copy of ``init`` with a static Sparsifier (random masks drawn at step 0) and rescaled kept weights."""
    model = copy.deepcopy(init)
    sp = sn.Sparsifier(model, sparsity=sparsity, method="static", distribution=distribution, seed=MASK_SEED + seed)
    sn.rescale_for_sparse_fan_in(model, seed=RESCALE_SEED + seed)
    return model, sp


def sparse_backend_model(init: nn.Module, sparsity: float, distribution: str, seed: int):
    """A copy of ``init`` with the same static Sparsifier as :func:`masked_model` but ``backend="sparse"``: the
    same masks and rescaled weights; the layers are timed and swapped at the first ``sp.step()``."""
    model = copy.deepcopy(init)
    sp = sn.Sparsifier(model, sparsity=sparsity, method="static", distribution=distribution, seed=MASK_SEED + seed,
                       backend="sparse")
    sn.rescale_for_sparse_fan_in(model, seed=RESCALE_SEED + seed)  # nothing is swapped before the first step
    return model, sp


def decisions(sp, model: nn.Module) -> list[dict]:
    """Per Linear of ``model``: the Sparsifier's swap decision and the step times it measured."""
    report = {r["name"].rpartition(".")[0]: r for r in sp.backend_report()}
    masks = {n.rpartition(".")[0]: m for n, m in sp.masks.items()}
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, SparseTrainingLinear)):
            continue
        r = report.get(name, {})
        row = {"layer": name, "shape": f"{mod.in_features}x{mod.out_features}",
               "masked": name in masks and not bool(masks[name].all()),
               "density": float(masks[name].float().mean()) if name in masks else 1.0,
               "swap": bool(r.get("swapped")), "reason": r.get("reason", "")}
        if "dense_ms" in r:
            row.update(dense_ms=r["dense_ms"], sparse_ms=r["sparse_ms"])
        out.append(row)
    return out


def same_start(masked: nn.Module, sparse: nn.Module) -> bool:
    """Every Linear of ``sparse`` has exactly ``masked``'s weight (dense form) and bias."""
    for name, lin in linears(masked):
        other = sparse.get_submodule(name)
        if not torch.equal(other.weight.detach(), lin.weight.detach()):  # a SparseTrainingLinear: its dense view
            return False
        if lin.bias is not None and not torch.equal(other.bias.detach(), lin.bias.detach()):
            return False
    return True


class Trainer:
    """A model, its optimizer (and Sparsifier) running steps over slices of one pre-shuffled tensor."""

    def __init__(self, model: nn.Module, sp, x: torch.Tensor, y: torch.Tensor, batch: int):
        self.model, self.sp, self.x, self.y, self.batch = model, sp, x, y, batch
        self.opt = optimizer(model.parameters())
        if sp is not None:
            sp.wrap(self.opt)
        self.n_batches, self.i = x.shape[0] // batch, 0

    def next_batch(self):
        j = (self.i % self.n_batches) * self.batch
        self.i += 1
        return self.x[j:j + self.batch], self.y[j:j + self.batch]

    def step(self) -> float:
        x, y = self.next_batch()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        if self.sp is not None:
            self.sp.step()
        return float(loss.detach())

    def chunk(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` consecutive steps."""
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t0) / steps

    def phases(self, steps: int) -> dict[str, float]:
        """Median ms per step of forward + loss, backward, optimizer step (+ sp.step)."""
        times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        for _ in range(steps):
            x, y = self.next_batch()
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            self.opt.step()
            if self.sp is not None:
                self.sp.step()
            t3 = time.perf_counter()
            for k, a, b in (("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3)):
                times[k].append(1e3 * (b - a))
        return {k: statistics.median(v) for k, v in times.items()}


def build(key: str, sparsity: float, distribution: str, seed: int = 0):
    """The three trainers' ``(model, sparsifier)`` for one configuration."""
    _, make, *_ = MODELS[key]
    torch.manual_seed(seed)
    init = make()
    masked, sp = masked_model(init, sparsity, distribution, seed)
    sparse, sp_sparse = sparse_backend_model(init, sparsity, distribution, seed)
    assert same_start(masked, sparse), "the masked and sparse models must start from the same weights"
    return {"dense": (copy.deepcopy(init), None), "masked": (masked, sp), "sparse": (sparse, sp_sparse)}


# ----------------------------------------------------------------------------- speed


def measure(key: str, sparsity: float, distribution: str, batch: int, data, steps: int, rounds: int) -> dict:
    x, y = data
    models = build(key, sparsity, distribution)
    trainers = {v: Trainer(m, sp, x, y, batch) for v, (m, sp) in models.items()}
    per_chunk = max(1, steps // rounds)
    for t in trainers.values():  # warm-up: allocator, numba's first calls, momentum buffers, the sparse swap
        t.chunk(per_chunk)
    layers = decisions(*reversed(models["sparse"]))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            times[v].append(trainers[v].chunk(per_chunk))
    ms = {v: 1e3 * statistics.median(ts) for v, ts in times.items()}
    steps_per_epoch = -(-EPOCH // batch)
    return {"model": MODELS[key][0], "key": key, "distribution": distribution, "sparsity": sparsity,
            "batch": batch, "steps_timed": per_chunk * rounds, "chunk": per_chunk, "ms_per_step": ms,
            "chunk_ms": {v: [1e3 * t for t in ts] for v, ts in times.items()},
            "s_per_epoch": {v: m * steps_per_epoch / 1e3 for v, m in ms.items()},
            "dense_over_sparse": ms["dense"] / ms["sparse"], "masked_over_sparse": ms["masked"] / ms["sparse"],
            "masked_over_dense": ms["masked"] / ms["dense"], "layers": layers}


def breakdown(data, steps: int) -> dict:
    """Phase times of the three trainers, MLP at 95% ERK, batch 128 (interleaved in chunks of ``steps // 3``)."""
    x, y = data
    models = build("mlp", 0.95, "erk")
    trainers = {v: Trainer(m, sp, x, y, 128) for v, (m, sp) in models.items()}
    for t in trainers.values():
        t.chunk(10)
    layers = decisions(*reversed(models["sparse"]))
    acc: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(3):
        for v in VARIANTS:
            acc[v].append(trainers[v].phases(max(1, steps // 3)))
    return {"layers": layers,
            "phases_ms": {v: {k: statistics.median(p[k] for p in ps) for k in ps[0]} for v, ps in acc.items()}}


# ----------------------------------------------------------------------------- accuracy


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    model.train()
    return 100.0 * correct / len(x)


def train_run(model: nn.Module, sp, xtr, ytr, epochs: int, seed: int, batch: int = 128) -> tuple[float, float]:
    """Train ``epochs`` epochs (batches of a per-epoch permutation drawn from ``seed``); ``(first loss, seconds)``."""
    opt = optimizer(model.parameters())
    if sp is not None:
        sp.wrap(opt)
    per_epoch = xtr.shape[0] // batch
    sched = cosine_schedule(opt, epochs * per_epoch)
    first = None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        xs, ys = shuffled(xtr, ytr, 1000 * seed + epoch)
        for j in range(per_epoch):
            xb, yb = xs[j * batch:(j + 1) * batch], ys[j * batch:(j + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            if sp is not None:
                sp.step()
            sched.step()
            if first is None:
                first = float(loss.detach())
    return first, time.perf_counter() - t0


def accuracy_runs(seeds: int, epochs: int, data) -> dict:
    xtr, ytr, xte, yte = data
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        init = MLP()
        masked, sp = masked_model(init, ACC_SPARSITY, ACC_DISTRIBUTION, seed)
        sparse, sp_sparse = sparse_backend_model(init, ACC_SPARSITY, ACC_DISTRIBUTION, seed)
        same = same_start(masked, sparse)
        with torch.no_grad():
            logit_diff = float((masked(xte[:1000]) - sparse(xte[:1000])).abs().max())
        row = {"seed": seed, "same_start": same, "start_logits_max_diff": logit_diff}
        for v, (model, s) in (("masked", (masked, sp)), ("sparse", (sparse, sp_sparse))):
            first, secs = train_run(model, s, xtr, ytr, epochs, seed)
            row[v] = {"first_loss": first, "seconds": secs, "accuracy": accuracy(model, xte, yte)}
        row["swapped"] = [d["layer"] for d in decisions(sp_sparse, sparse) if d["swap"]]
        row["first_loss_diff"] = abs(row["masked"]["first_loss"] - row["sparse"]["first_loss"])
        row["diff"] = row["sparse"]["accuracy"] - row["masked"]["accuracy"]
        log(f"  accuracy seed {seed}: masked-dense {row['masked']['accuracy']:.2f}% "
            f"({row['masked']['seconds']:.0f} s), sparse {row['sparse']['accuracy']:.2f}% "
            f"({row['sparse']['seconds']:.0f} s); same start {same}, first-loss diff {row['first_loss_diff']:.2e}")
        rows.append(row)
    out = {"epochs": epochs, "seeds": seeds, "sparsity": ACC_SPARSITY, "distribution": ACC_DISTRIBUTION,
           "steps_per_epoch": xtr.shape[0] // 128, "rows": rows}
    for v in ("masked", "sparse"):
        accs = [r[v]["accuracy"] for r in rows]
        out[v] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    out["mean_diff"] = out["sparse"]["mean"] - out["masked"]["mean"]
    out["noise"] = max(out["masked"]["std"], out["sparse"]["std"])
    out["met"] = abs(out["mean_diff"]) <= out["noise"] if seeds > 1 else None
    return out


# ----------------------------------------------------------------------------- report


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _swapped(r: dict) -> str:
    masked = [d for d in r["layers"] if d["masked"]]
    return f"{sum(d['swap'] for d in masked)}/{len(masked)}"


def verdicts(results: list[dict], acc: dict | None) -> list[str]:
    lines = []
    for sparsity, need in sorted(TARGETS.items()):
        for r in results:
            if r["key"] == "mlp" and r["batch"] == TARGET_BATCH and abs(r["sparsity"] - sparsity) < 1e-9:
                got = r["dense_over_sparse"]
                lines.append(f"- MLP {sparsity:.0%} ({r['distribution']}), batch {TARGET_BATCH}: sparse "
                             f"{got:.2f}x faster per epoch than dense PyTorch (target >= {need}x): "
                             f"**{'met' if got >= need else 'missed'}**.")
    if results:
        worst = min(results, key=lambda r: r["masked_over_sparse"])
        slower = [r for r in results if r["masked_over_sparse"] < 1.0]
        lines.append(f"- Never slower than masked-dense: masked-dense / sparse is {worst['masked_over_sparse']:.2f}x at "
                     f"worst ({worst['model']}, {worst['distribution']}, {worst['sparsity']:.0%}, batch "
                     f"{worst['batch']}); {len(slower)} of {len(results)} rows below 1.00x: "
                     f"**{'met' if not slower else 'missed'}**.")
    if acc is not None:
        verdict = "not judged (one seed)" if acc["met"] is None else "met" if acc["met"] else "missed"
        lines.append(f"- Accuracy at {acc['sparsity']:.0%} ({acc['distribution']}), {acc['seeds']} seeds, "
                     f"{acc['epochs']} epochs: sparse {acc['sparse']['mean']:.2f} ± {acc['sparse']['std']:.2f}% vs "
                     f"masked-dense {acc['masked']['mean']:.2f} ± {acc['masked']['std']:.2f}%, difference "
                     f"{acc['mean_diff']:+.2f} points against seed noise {acc['noise']:.2f}: **{verdict}**.")
    return lines


def markdown(results: list[dict], brk: dict | None, acc: dict | None, meta: dict) -> str:
    lines = [f"Command: `{meta['command']}`  ",
             (f"Machine: {meta['machine']}; date {meta['date']}; wall time {meta['seconds'] / 60:.1f} min; "
              f"load average before {meta['load_before']}, after {meta['load_after']}."), "",
             ("Median over chunks of the mean time per training step (zero_grad, forward, cross-entropy, backward, "
              "SGD step, sp.step()), the three trainers interleaved in one process; per epoch = ms/step x steps of "
              "60,000 images. Speed-ups above 1: the sparse backend is faster. Swapped: masked Linear layers run by "
              "the sparse kernels / masked Linear layers."), "",
             ("| model | distribution | sparsity | batch | dense ms/step | masked ms/step | sparse ms/step | "
              "dense s/epoch | masked s/epoch | sparse s/epoch | dense/sparse | masked/sparse | swapped |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, e = r["ms_per_step"], r["s_per_epoch"]
        lines.append(f"| {r['model']} | {r['distribution']} | {r['sparsity']:.0%} | {r['batch']} | {m['dense']:.2f} | "
                     f"{m['masked']:.2f} | {m['sparse']:.2f} | {e['dense']:.2f} | {e['masked']:.2f} | "
                     f"{e['sparse']:.2f} | {r['dense_over_sparse']:.2f}x | {r['masked_over_sparse']:.2f}x | "
                     f"{_swapped(r)} |")
    if brk is not None:
        lines += ["", ("Where the time goes (MLP, 95%, ERK, batch 128; median ms per step of each phase; "
                       "optimizer includes sp.step()):"), "", "| trainer | forward + loss | backward | optimizer | total |",
                  "|---|---|---|---|---|"]
        for v, p in brk["phases_ms"].items():
            lines.append(f"| {LABELS[v]} | {p['forward']:.2f} | {p['backward']:.2f} | {p['optimizer']:.2f} | "
                         f"{sum(p.values()):.2f} |")
        lines += ["", "Swap decisions in that configuration (`sp.backend_report()`: one training step of the layer alone, interleaved medians):",
                  "", "| layer | in x out | density | dense ms | sparse ms | swapped |", "|---|---|---|---|---|---|"]
        for d in brk["layers"]:
            if d["masked"]:
                lines.append(f"| {d['layer']} | {d['shape']} | {d['density']:.4f} | {d['dense_ms']:.3f} | "
                             f"{d['sparse_ms']:.3f} | {'yes' if d['swap'] else 'no'} |")
            else:
                lines.append(f"| {d['layer']} | {d['shape']} | 1 (not masked) | | | no |")
    if acc is not None:
        lines += ["", (f"Accuracy: MLP on Fashion-MNIST at {acc['sparsity']:.0%} ({acc['distribution']}), "
                       f"{acc['epochs']} epochs at batch 128 (SGD, Nesterov 0.9, lr {LR} with per-step cosine decay, "
                       f"weight decay {WEIGHT_DECAY}); both runs of a seed start from the same weights and see the "
                       "same batches."), "",
                  ("| seed | same start | first-loss diff | masked-dense acc % | sparse acc % | sparse - masked | "
                   "masked s | sparse s | swapped layers |"), "|---|---|---|---|---|---|---|---|---|"]
        for r in acc["rows"]:
            lines.append(f"| {r['seed']} | {'yes' if r['same_start'] else 'NO'} | {r['first_loss_diff']:.1e} | "
                         f"{r['masked']['accuracy']:.2f} | {r['sparse']['accuracy']:.2f} | {r['diff']:+.2f} | "
                         f"{r['masked']['seconds']:.1f} | {r['sparse']['seconds']:.1f} | {', '.join(r['swapped'])} |")
        lines.append(f"| mean ± std | | | {acc['masked']['mean']:.2f} ± {acc['masked']['std']:.2f} | "
                     f"{acc['sparse']['mean']:.2f} ± {acc['sparse']['std']:.2f} | {acc['mean_diff']:+.2f} | | | |")
        steps = acc["epochs"] * acc.get("steps_per_epoch", EPOCH // 128)
        per = {v: 1e3 * statistics.mean(r[v]["seconds"] for r in acc["rows"]) / steps for v in ("masked", "sparse")}
        lines += ["", (f"Sustained training in these runs (epochs back to back, shuffling and the schedule included): "
                  f"masked-dense {per['masked']:.2f} ms/step, sparse {per['sparse']:.2f} ms/step, "
                  f"{per['masked'] / per['sparse']:.2f}x (mean over seeds).")]
    lines += ["", "**Targets** (computed from the tables)", "", *verdicts(results, acc), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="code check: 95%% ERK only, few steps, 1 seed, 1 short "
                                                         "epoch (< 1 minute)")
    ap.add_argument("--models", default="mlp,lenet", help="comma-separated: mlp, lenet")
    ap.add_argument("--sparsities", default=None, help="comma-separated (default 0.8,0.9,0.95,0.98,0.99)")
    ap.add_argument("--distributions", default=None, help="comma-separated (default erk,uniform)")
    ap.add_argument("--batches", default=None, help="comma-separated (default 128,32)")
    ap.add_argument("--rounds", type=int, default=5, help="timed chunks per trainer")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiplies the timed steps (100 at batch 128, "
                                                                   "200 at 32)")
    ap.add_argument("--seeds", type=int, default=3, help="accuracy runs (0: none)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of each accuracy run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default="/work/shared/datasets")
    ap.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    floats = lambda s, d: tuple(float(v) for v in s.split(",")) if s else d
    sparsities = floats(args.sparsities, (0.95,) if args.quick else SPARSITIES)
    dists = tuple(args.distributions.split(",")) if args.distributions else (("erk",) if args.quick else DISTRIBUTIONS)
    batches = tuple(int(b) for b in floats(args.batches, BATCHES))
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in keys:
        if k not in MODELS:
            ap.error(f"unknown model {k!r}; valid: {', '.join(MODELS)}")
    scale = 0.1 if args.quick else args.steps_scale
    rounds = 2 if args.quick else args.rounds
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)
    start, load_before = time.time(), _load()
    log(f"load average before: {load_before}; threads {args.threads}")

    results, cache = [], {}
    for key in keys:
        _, _, dataset, mean, std = MODELS[key]
        xtr, ytr, xte, yte = load(dataset, args.data_dir, mean, std)
        cache[key] = (xtr, ytr, xte, yte)
        data = shuffled(xtr, ytr, 0)
        for dist in dists:
            for s in sparsities:
                for b in batches:
                    t0 = time.time()
                    r = measure(key, s, dist, b, data, max(rounds, round(STEPS.get(b, 100) * scale)), rounds)
                    results.append(r)
                    m = r["ms_per_step"]
                    log(f"{r['model']} {dist} {s:.0%} batch {b}: dense {m['dense']:.2f} ms, masked "
                        f"{m['masked']:.2f} ms, sparse {m['sparse']:.2f} ms ({r['dense_over_sparse']:.2f}x dense, "
                        f"{r['masked_over_sparse']:.2f}x masked; swapped {_swapped(r)}) [{time.time() - t0:.1f} s]")
    brk = None
    if "mlp" in keys:
        xtr, ytr = cache["mlp"][:2]
        brk = breakdown(shuffled(xtr, ytr, 0), 30 if args.quick else 150)
        log("phases (ms): " + "; ".join(f"{v}: " + ", ".join(f"{k} {t:.2f}" for k, t in p.items())
                                        for v, p in brk["phases_ms"].items()))
    acc = None
    if seeds > 0:
        xtr, ytr, xte, yte = cache["mlp"] if "mlp" in cache else load("fashion_mnist", args.data_dir,
                                                                      *MODELS["mlp"][3:])
        if args.quick:
            xtr, ytr, xte, yte = xtr[:4096], ytr[:4096], xte[:2000], yte[:2000]
        acc = accuracy_runs(seeds, epochs, (xtr, ytr, xte, yte))
    meta = run_meta("sparse_training_speed.py", argv, start, threads=args.threads, load_before=load_before,
                    load_after=_load())
    md = markdown(results, brk, acc, meta)
    print(md)
    if args.out:
        write_results(args.out, md, {"meta": meta, "results": results, "breakdown": brk, "accuracy": acc})
    return results, brk, acc


if __name__ == "__main__":
    main()
