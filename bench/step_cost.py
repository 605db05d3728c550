"""Step cost of sparse training (issue 4): masked vs dense, RigL vs static, measured side by side.

Targets: a masked training step takes <= 1.10x the dense step; with an update every 100
steps, RigL's average step costs <= 1.05x static sparse training.

For each model (the 784-1000-1000-1000-10 MLP of ``bench/sparse_training.py`` and
LeNet-300-100) four trainers are built from the same initialization: dense, static
(ERK, 90% sparsity), SET and RigL (ERK, 90%, an update every 100 steps, drop fraction
0.3, cosine; ``total_steps`` large so that updates keep happening while we measure).
A training step is ``zero_grad -> forward -> backward -> opt.step() -> sp.step()`` on a
batch of 128 (SGD with Nesterov momentum and weight decay, as in the accuracy benchmark;
random inputs: the cost does not depend on the pixel values). The trainers run in one
process, interleaved: each repetition times one block of ``--block`` consecutive steps
per trainer, in a rotating order, after one untimed warm-up block each. A block of a
multiple of 100 steps contains exactly its share of RigL/SET updates, so a block's mean
step time is the average step cost. Reported: the median over repetitions of each
trainer's mean step time, and the ratios static/dense, SET/static, RigL/static.

    python bench/step_cost.py --out bench/results/step_cost     # ~5 minutes on 2 idle cores
    python bench/step_cost.py --quick                           # code check (< 1 minute)

Timings need an otherwise idle machine; the script records the load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import run_meta, write_results  # noqa: E402

import sparsenn as sn  # noqa: E402
from sparse_training import MASK_SEED, MLP, RESCALE_SEED  # noqa: E402
from sparsenn.models.zoo import LeNet300100  # noqa: E402

VARIANTS = ["dense", "static", "set", "rigl"]
LABELS = {"dense": "dense", "static": "static (masked)", "set": "SET", "rigl": "RigL"}
MASKED_MAX, RIGL_MAX = 1.10, 1.05  # the targets
MODELS = {"mlp": ("MLP 784-1000-1000-1000-10", MLP), "lenet300100": ("LeNet-300-100", LeNet300100)}


class Trainer:
    """One model + optimizer (+ sparsifier) that runs training steps on a fixed cycle of batches."""

    def __init__(self, make, variant: str, sparsity: float, update_every: int, batches, seed: int = 0):
        torch.manual_seed(seed)
        self.model = make()
        self.variant, self.batches, self.i = variant, batches, 0
        self.sp = None
        if variant != "dense":
            kw = {}
            if variant in ("set", "rigl"):  # total_steps far away: updates continue while we measure
                kw = {"update_every": update_every, "total_steps": 10**9, "drop_fraction": 0.3,
                      "drop_schedule": "cosine", "end_fraction": 0.75}
            self.sp = sn.Sparsifier(self.model, sparsity=sparsity, method=variant, distribution="erk",
                                    seed=MASK_SEED + seed, **kw)
            sn.rescale_for_sparse_fan_in(self.model, seed=RESCALE_SEED + seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                   weight_decay=5e-4)
        if self.sp is not None:
            self.sp.wrap(self.opt)
        self.loss_fn = nn.functional.cross_entropy

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        self.loss_fn(self.model(x), y).backward()
        self.opt.step()
        if self.sp is not None:
            self.sp.step()

    def block(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` consecutive steps."""
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t0) / steps

    @property
    def updates(self) -> int:
        return 0 if self.sp is None or self.variant == "static" else len(self.sp.method.history)


def measure(key: str, sparsity: float, batch: int, block: int, reps: int, update_every: int, log) -> dict:
    name, make = MODELS[key]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(8)]
    trainers = {v: Trainer(make, v, sparsity, update_every, batches) for v in VARIANTS}
    for t in trainers.values():  # warm-up (allocator, first update's code paths)
        t.block(block)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(reps):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]  # rotate who goes first
        for v in order:
            times[v].append(trainers[v].block(block))
        log(f"  {name} rep {rep + 1}/{reps}: " + ", ".join(f"{v} {1e3 * times[v][-1]:.2f} ms" for v in VARIANTS))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for _, p, mask in sn.iter_masks(trainers["rigl"].model):  # the invariant held throughout
        assert (p[~mask] == 0).all()
    ratios = {"static/dense": med["static"] / med["dense"], "set/static": med["set"] / med["static"],
              "rigl/static": med["rigl"] / med["static"], "rigl/dense": med["rigl"] / med["dense"]}
    return {"model": name, "sparsity": sparsity, "batch": batch, "block": block, "reps": reps,
            "update_every": update_every, "steps_timed": block * reps,
            "updates": {v: trainers[v].updates for v in VARIANTS},
            "median_ms": {v: 1e3 * m for v, m in med.items()},
            "block_ms": {v: [1e3 * t for t in ts] for v, ts in times.items()}, "ratios": ratios,
            "masked_met": ratios["static/dense"] <= MASKED_MAX, "rigl_met": ratios["rigl/static"] <= RIGL_MAX}


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}; date {meta['date']}; wall time {meta['seconds'] / 60:.1f} min; "
             f"load average before {meta['load_before']}, after {meta['load_after']}.", "",
             f"Median over repetitions of the mean time per training step (zero_grad, forward, backward, "
             f"opt.step(), sp.step()); trainers interleaved in one process; sparse: ERK at "
             f"{results[0]['sparsity']:.0%} if any." if results else "", "",
             "| model | batch | steps timed | dense ms | static ms | SET ms | RigL ms | static/dense | "
             "SET/static | RigL/static | RigL updates |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, q = r["median_ms"], r["ratios"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['steps_timed']} | {m['dense']:.2f} | {m['static']:.2f} | "
                     f"{m['set']:.2f} | {m['rigl']:.2f} | {q['static/dense']:.3f} | {q['set/static']:.3f} | "
                     f"{q['rigl/static']:.3f} | {r['updates']['rigl']} |")
    lines += ["", "**Targets** (computed from the table)", ""]
    for r in results:
        q = r["ratios"]
        lines.append(f"- {r['model']}: masked step {q['static/dense']:.3f}x dense "
                     f"({'<=' if r['masked_met'] else '>'} {MASKED_MAX}: {'met' if r['masked_met'] else 'not met'}); "
                     f"RigL (update every {r['update_every']}) {q['rigl/static']:.3f}x static "
                     f"({'<=' if r['rigl_met'] else '>'} {RIGL_MAX}: {'met' if r['rigl_met'] else 'not met'}).")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="check the code on a few steps (< 1 minute)")
    ap.add_argument("--models", default="mlp,lenet300100", help="comma-separated: mlp, lenet300100")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--update-every", type=int, default=None, help="SET/RigL update period (default 100; 10 "
                                                                   "with --quick)")
    ap.add_argument("--block", type=int, default=None,
                    help="steps per timed block, a multiple of --update-every (default 100; 10 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed blocks per trainer (default 5; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    update_every = args.update_every or (10 if args.quick else 100)
    block = args.block or update_every
    reps = args.reps or (2 if args.quick else 5)
    if block % update_every:
        ap.error(f"--block ({block}) must be a multiple of --update-every ({update_every}) so that every block "
                 "holds the same number of mask updates")
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in keys:
        if k not in MODELS:
            ap.error(f"unknown model {k!r}; valid: {', '.join(MODELS)}")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start, load_before = time.time(), _load()
    results = [measure(k, args.sparsity, args.batch, block, reps, update_every, log) for k in keys]
    meta = run_meta("step_cost.py", argv, start, load_before=load_before, load_after=_load())
    md = markdown(results, meta)
    print(md)
    if args.out:
        write_results(args.out, md, {"meta": meta, "results": results})
    return results


if __name__ == "__main__":
    main()
