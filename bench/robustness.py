"""Robustness of sparse networks (issue 19): dense vs gradual magnitude pruning vs RigL at 50/90/98%.

LeNet-5 (Caffe, ``sparsenn.models.LeNet5``) on Fashion-MNIST, inputs in [0, 1] with the normalization
inside the model (so attack budgets are in pixel units). LeNet-5 because it is the library's convolutional
pruning benchmark (Han et al. 2015; bench/reproduce.py), small enough to train 14 times with adversarial
training on one CPU thread, and free of BatchNorm and dropout, so eval and train mode compute the same
function and an attack sees exactly the network that is trained.

Rows, every one trained from the same initialization for the same number of steps (SGD, Nesterov
momentum 0.9, lr 0.05, weight decay 5e-4, per-iteration cosine decay, batch 128):

* ``dense``;
* ``magnitude``: gradual magnitude pruning during training (Zhu & Gupta 2017: cubic schedule from 10% to
  70% of the steps, 20 updates), ERK layer budgets (Evci et al. 2020), from the dense initialization;
* ``rigl``: RigL (Evci et al. 2020) from step 0, ERK, random initial masks, kept weights re-initialized
  for their sparse fan-in, the library's defaults (update every ``3 isqrt(T)`` steps, drop fraction 0.3
  cosine-annealed to 0 at 75% of training);

at 50, 90 and 98% sparsity, each with standard training and with adversarial training. Adversarial
training uses FGSM with a random start and a step of 1.25 eps (Wong et al. 2020, "Fast is better than
free") at eps 0.1 (L-inf), on every batch through ``sparsenn.robust.AdversarialBatches``: one extra
forward/backward per step instead of PGD-7's seven, which fits the time budget; it is evaluated against
the stronger PGD-10.

Measured on the test images (a seeded subset): clean accuracy; accuracy under PGD-10, L-inf, random
start, step 2.5 eps / 10, at eps 0.1 (and at the other ``--epsilons`` for the curve); and the mean
accuracy over 9 common corruptions x 5 severities (``sparsenn.robust.corruptions``). One seed by default.

    python bench/robustness.py --out bench/results/robustness     # the recorded run (~35 min, 1 thread)
    python bench/robustness.py --quick                            # a smoke run (< 2 minutes)

Rows are appended to ``PREFIX.rows.jsonl`` as they finish; a rerun skips the rows already there. The
HTML report (``PREFIX_report/report.html``, with the robustness table and plots) is written at the end.
``--strong`` adds an attack strength check per row (PGD-50 with 3 random restarts, worst case, vs PGD-10 on
the first 500 test images); the recorded check retrains a few rows (the same seeds give the same models):

    python bench/robustness.py --out bench/results/robustness_strong --strong --sparsities 0.98
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import log, run_meta, write_results

import sparsenn as sn
from sparsenn.data.datasets import load_idx_dataset, make_loaders
from sparsenn.models.zoo import LeNet5
from sparsenn.report.html import RunSummary, write_report
from sparsenn.report.robustness import RobustnessRun, robustness_section
from sparsenn.robust import (
    FGSM,
    PGD,
    AdversarialBatches,
    accuracy_under_attack,
    robustness_eval,
)
from sparsenn.train.loop import cosine_schedule, train

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
METHODS = ["dense", "magnitude", "rigl"]
LABELS = {"dense": "dense", "magnitude": "magnitude (gradual)", "rigl": "RigL"}
SPARSITIES = [0.5, 0.9, 0.98]
EPS = 0.1  # the attack budget of the table, L-inf, in pixel units ([0, 1] images)
EPSILONS = [0.0, 0.05, 0.1, 0.15]  # the curve in the report
TRAININGS = ["standard", "adversarial"]
MASK_SEED, RESCALE_SEED = 10_000, 20_000  # offsets from the seed of the initialization (as bench/sparse_training.py)
LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.05, 0.9, 5e-4, 128


class Normalized(nn.Module):
    """``net((x - mean) / std)``: the model takes [0, 1] images, so attacks and corruptions work in pixel units."""

    def __init__(self, net: nn.Module, mean: float, std: float):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def _subset(ds: TensorDataset, n: int | None, seed: int) -> TensorDataset:
    if not n or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(*(t[idx] for t in ds.tensors))


def row_key(training: str, method: str, sparsity: float, seed: int) -> str:
    return f"{training}/{method}/{sparsity:g}/{seed}"


def train_row(training: str, method: str, sparsity: float, seed: int, init: nn.Module, train_set, test_set,
              epochs: int) -> tuple[nn.Module, dict]:
    """Train one row from ``init``; returns the model and its record (training part)."""
    t0, c0 = time.time(), time.process_time()
    model = copy.deepcopy(init)
    train_loader, _ = make_loaders(train_set, test_set, batch_size=BATCH, seed=seed)  # same batches for every row
    steps = max(1, epochs * len(train_loader))
    torch.manual_seed(1000 + seed)
    sp = None
    if method == "magnitude":
        begin, end = int(0.1 * steps), max(int(0.1 * steps) + 1, int(0.7 * steps))
        sp = sn.Sparsifier(model, sparsity=sparsity, method="magnitude", distribution="erk",
                           schedule=sn.Polynomial(begin_step=begin, end_step=end, frequency=max(1, (end - begin) // 20)))
    elif method == "rigl":
        sp = sn.Sparsifier(model, sparsity=sparsity, method="rigl", distribution="erk", total_steps=steps,
                           seed=MASK_SEED + seed)
        sn.rescale_for_sparse_fan_in(model, seed=RESCALE_SEED + seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    if sp is not None:
        sp.wrap(opt)
    loader = train_loader
    if training == "adversarial":
        loader = AdversarialBatches(train_loader, model, FGSM(eps=EPS, random_start=True),
                                    generator=torch.Generator().manual_seed(2000 + seed))
    losses = train(model, loader, opt, epochs=epochs, sparsifier=sp, scheduler=cosine_schedule(opt, steps))
    if sp is not None:
        sp.finalize()
    record = {"training": training, "method": method, "target": sparsity, "seed": seed,
              "sparsity": sn.sparsity(model) if sp is not None else 0.0, "epochs": epochs, "steps": steps,
              "final_loss": losses[-1], "train_seconds": time.time() - t0,
              "train_cpu_seconds": time.process_time() - c0}
    return model, record


def evaluate_row(model: nn.Module, test_set, epsilons: list[float], seed: int) -> dict:
    t0, c0 = time.time(), time.process_time()
    loader = torch.utils.data.DataLoader(test_set, batch_size=500)
    res = robustness_eval(model, loader, epsilons=epsilons, attack=PGD(eps=EPS, steps=10), seed=seed)
    res["eval_seconds"], res["eval_cpu_seconds"] = time.time() - t0, time.process_time() - c0
    return res


def strong_check(model: nn.Module, test_set, seed: int, samples: int, steps: int, restarts: int) -> dict:
    """A stronger attack on the first ``samples`` test images: PGD-``steps`` with ``restarts`` random starts
    (worst case), next to PGD-10 on the same images: a large gap would mean PGD-10 underestimates the
    attack (e.g. gradient masking), and its numbers in the table flatter the model."""
    t0 = time.time()
    loader = torch.utils.data.DataLoader(TensorDataset(*(t[:samples] for t in test_set.tensors)), batch_size=500)
    weak = accuracy_under_attack(model, loader, PGD(eps=EPS, steps=10), generator=torch.Generator().manual_seed(seed))
    strong = accuracy_under_attack(model, loader, PGD(eps=EPS, steps=steps), restarts=restarts,
                                   generator=torch.Generator().manual_seed(seed + 1))
    return {"samples": min(samples, len(test_set)), "steps": steps, "restarts": restarts, "pgd10": weak,
            "strong": strong, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- summary


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _pgd_at(row: dict, eps: float) -> float | None:
    return next((a["accuracy"] for a in row["robustness"]["attacks"] if abs(a["eps"] - eps) < 1e-12), None)


def markdown(rows: list[dict], meta: dict, epsilons: list[float]) -> str:
    cpu = sum(r["train_cpu_seconds"] + r["robustness"]["eval_cpu_seconds"] for r in rows)
    lines = [f"Command: `{meta['command']}`  ", (f"Machine: {meta['machine']}; date {meta['date']}; "
             f"{meta['seconds'] / 60:.1f} min wall, {cpu / 60:.1f} min CPU (training and evaluation of the rows)"), ""]
    for training in TRAININGS:
        part = [r for r in rows if r["training"] == training]
        if not part:
            continue
        lines += [f"### {training} training", "",
                  "| method | target | sparsity | clean % | PGD-10 eps=0.1 % | mean corruption % | train s |",
                  "|:---|---:|---:|---:|---:|---:|---:|"]
        for r in part:
            lines.append(f"| {LABELS[r['method']]} | {r['target']:.0%} | {100 * r['sparsity']:.1f}% | "
                         f"{_pct(r['robustness']['clean'])} | {_pct(_pgd_at(r, EPS))} | "
                         f"{_pct(r['robustness']['mean_corruption_accuracy'])} | {r['train_seconds']:.0f} |")
        lines.append("")
    checked = [r for r in rows if "strong" in r]
    if checked:
        c = checked[0]["strong"]
        lines += [(f"### Attack strength check: PGD-{c['steps']} x {c['restarts']} restarts vs PGD-10 "
                  f"(eps 0.1, first {c['samples']} test images)"), "",
                  f"| training | method | target | PGD-10 % | PGD-{c['steps']} x {c['restarts']} % |",
                  "|:---|:---|---:|---:|---:|"]
        lines += [f"| {r['training']} | {LABELS[r['method']]} | {r['target']:.0%} | {_pct(r['strong']['pgd10'])} | "
                  f"{_pct(r['strong']['strong'])} |" for r in checked]
        lines.append("")
    eps = [e for e in epsilons if e > 0]
    lines += ["### Accuracy (%) under PGD-10 (L-inf) by budget", "",
              "| training | method | target | " + " | ".join(f"eps={e:g}" for e in eps) + " |",
              "|:---|:---|---:|" + "---:|" * len(eps)]
    for r in rows:
        lines.append(f"| {r['training']} | {LABELS[r['method']]} | {r['target']:.0%} | "
                     + " | ".join(_pct(_pgd_at(r, e)) for e in eps) + " |")
    names = list(rows[0]["robustness"]["corruption_means"]) if rows else []
    lines += ["", "### Accuracy (%) per corruption (mean over 5 severities)", "",
              "| training | method | target | " + " | ".join(n.replace("_", " ") for n in names) + " |",
              "|:---|:---|---:|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['training']} | {LABELS[r['method']]} | {r['target']:.0%} | "
                     + " | ".join(_pct(r["robustness"]["corruption_means"][n]) for n in names) + " |")
    return "\n".join(lines)


def _label(r: dict) -> str:
    return LABELS[r["method"]] if r["method"] == "dense" else f"{LABELS[r['method']]} {r['target']:.0%}"


def write_html(rows: list[dict], out_dir: Path, meta: dict) -> Path:
    runs = [RobustnessRun(_label(r), r["robustness"], sparsity=r["sparsity"], group=f"{r['training']} training")
            for r in rows]
    summaries = [RunSummary(f"{_label(r)} ({r['training']})", r["robustness"]["clean"], r["sparsity"]) for r in rows]
    notes = [(f"LeNet-5 on Fashion-MNIST ({meta['train_size']} training images, {meta['epochs']} epochs; "
             f"{meta['test_size']} test images), seed(s) {meta['seeds']}. Adversarial training: FGSM-RS at eps 0.1 "
             "(Wong et al. 2020). Attack: PGD-10, L-inf, random start, step 2.5 eps / 10.")]
    written = write_report(out_dir, summaries, title="Robustness of sparse LeNet-5 (Fashion-MNIST)",
                           description=f"Command: {meta['command']}", formats=("html",),
                           sections=[robustness_section(runs, notes=notes)])
    return written["html"]


# ----------------------------------------------------------------------------- main


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run on a subset (< 2 minutes)")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per row (default 4; 1 with --quick)")
    ap.add_argument("--train-size", type=int, default=None,
                    help="training images (default 20000; 2000 with --quick; 0: all 60,000)")
    ap.add_argument("--test-size", type=int, default=None, help="test images (default 2000; 300 with --quick)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: dense, magnitude, rigl")
    ap.add_argument("--sparsities", default=None, help="comma-separated (default 0.5,0.9,0.98)")
    ap.add_argument("--trainings", default=",".join(TRAININGS), help="comma-separated: standard, adversarial")
    ap.add_argument("--epsilons", default=None, help=f"PGD budgets of the curve (default {EPSILONS})")
    ap.add_argument("--strong", action="store_true", help="also run the attack strength check (strong_check)")
    ap.add_argument("--strong-samples", type=int, default=500)
    ap.add_argument("--strong-steps", type=int, default=50)
    ap.add_argument("--strong-restarts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite PREFIX.md and the HTML report from PREFIX.json (no training)")
    ap.add_argument("--data-dir", default=os.environ.get("SPARSENN_DATA_DIR") or str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--out", default=None, help="write PREFIX.json, PREFIX.md, PREFIX.rows.jsonl and PREFIX_report/")
    args = ap.parse_args(argv)
    if args.report_only:
        if not args.out:
            ap.error("--report-only needs --out PREFIX (an earlier run's PREFIX.json)")
        recorded = json.loads(Path(f"{args.out}.json").read_text())
        meta, rows = recorded["meta"], recorded["rows"]
        text = markdown(rows, meta, meta["epsilons"])
        write_results(args.out, text, recorded)
        log(f"rewrote {args.out}.md and {write_html(rows, Path(f'{args.out}_report'), meta)}")
        return
    torch.set_num_threads(args.threads)
    start = time.time()
    q = args.quick
    epochs = args.epochs if args.epochs is not None else (1 if q else 4)
    train_size = args.train_size if args.train_size is not None else (2000 if q else 20000)
    test_size = args.test_size if args.test_size is not None else (300 if q else 2000)
    sparsities = _floats(args.sparsities) if args.sparsities else ([0.9] if q else SPARSITIES)
    epsilons = _floats(args.epsilons) if args.epsilons else ([0.0, EPS] if q else EPSILONS)
    if EPS not in epsilons:
        epsilons = sorted([*epsilons, EPS])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    trainings = [t.strip() for t in args.trainings.split(",") if t.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    for t in trainings:
        if t not in TRAININGS:
            ap.error(f"unknown training {t!r}; valid: {', '.join(TRAININGS)}")

    tr, te = load_idx_dataset("fashion_mnist", args.data_dir)
    tr, te = _subset(tr, train_size, 0), _subset(te, test_size, 1)
    jobs = [(t, m, 0.0 if m == "dense" else s, seed) for seed in range(args.seeds) for t in trainings
            for m in methods for s in ([0.0] if m == "dense" else sparsities)]
    rows_path = Path(f"{args.out}.rows.jsonl") if args.out else None
    done: dict[str, dict] = {}
    if rows_path and rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[row_key(r["training"], r["method"], r["target"], r["seed"])] = r
    inits = {}
    for training, method, sparsity, seed in jobs:
        key = row_key(training, method, sparsity, seed)
        if key in done:
            continue
        if seed not in inits:
            torch.manual_seed(seed)
            inits[seed] = Normalized(LeNet5(), FASHION_MEAN, FASHION_STD)
        model, row = train_row(training, method, sparsity, seed, inits[seed], tr, te, epochs)
        row["robustness"] = evaluate_row(model, te, epsilons, seed)
        if args.strong:
            row["strong"] = strong_check(model, te, seed, args.strong_samples, args.strong_steps, args.strong_restarts)
            log(f"{key}: PGD-10 {_pct(row['strong']['pgd10'])} vs PGD-{args.strong_steps} x {args.strong_restarts} "
                f"{_pct(row['strong']['strong'])} on {row['strong']['samples']} images")
        done[key] = row
        log(f"{key}: sparsity {row['sparsity']:.4f} clean {_pct(row['robustness']['clean'])} "
            f"PGD {_pct(_pgd_at(row, EPS))} corruption {_pct(row['robustness']['mean_corruption_accuracy'])} "
            f"(train {row['train_seconds']:.0f} s, eval {row['robustness']['eval_seconds']:.0f} s)")
        if rows_path:
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [done[row_key(*j)] for j in jobs]
    meta = run_meta("robustness.py", argv, start, model="LeNet-5 (Caffe), normalization inside",
                    dataset="fashion_mnist", train_size=len(tr), test_size=len(te), epochs=epochs,
                    seeds=list(range(args.seeds)), lr=LR, batch=BATCH, eps=EPS, epsilons=epsilons,
                    adversarial_training="FGSM-RS eps 0.1 step 0.125 (Wong et al. 2020)",
                    attack="PGD-10 linf random start step 2.5 eps / 10")
    text = markdown(rows, meta, epsilons)
    print(text)
    if args.out:
        write_results(args.out, text, {"meta": meta, "rows": rows})
        html = write_html(rows, Path(f"{args.out}_report"), meta)
        log(f"wrote {args.out}.md, {args.out}.json and {html}")


if __name__ == "__main__":
    main()
