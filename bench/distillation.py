"""Distillation into sparse students (issue 19): LeNet-5 on Fashion-MNIST at 90/95/98% sparsity, with and
without knowledge distillation from the dense LeNet-5 it was pruned from.

Per seed: a dense LeNet-5 teacher is trained (``--teacher-epochs``, SGD Nesterov 0.9, lr 0.02, weight decay
5e-4, per-iteration cosine, batch 128: the LeNet-5 recipe of ``bench/reproduce.py``); its weights and its
logits on the training set are cached (``$SPARSENN_CACHE/distillation``, default ``~/.cache/sparsenn``; the
logits as a :class:`sparsenn.TeacherCache`, checked against the data and the teacher's weights on load).
Each student is a copy of that teacher pruned by gradual magnitude pruning (Zhu & Gupta 2017, the "GMP" row
of ``bench/reproduce.py``: global magnitude, cubic schedule over the first 70% of the steps, 50 updates,
lr 0.006) for ``--epochs`` epochs. The two rows at a sparsity differ only in the loss: plain cross-entropy
(``alpha=0``: exactly the task loss) or the distillation loss of Hinton et al. 2015 against the cached
teacher logits (``--temperature`` 4, ``--alpha`` 0.9); same masks schedule, batches and order
(``TeacherCache.loader`` for both). Reported: test error, mean ± std over seeds, achieved sparsity.

    python bench/distillation.py --out bench/results/distillation     # full: 3 seeds (~21 min on 1 idle core)
    python bench/distillation.py --quick                              # smoke run (< 2 min)

``--quick``: 6,000 training and 2,000 test images, one seed, 2 teacher epochs, 1 student epoch, 90% only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import log, run_meta, write_results
from reproduce import _subset, err, normalize
from sparse_training import FASHION_MEAN, FASHION_STD

import sparsenn as sn
from sparsenn.data.datasets import load_idx_dataset
from sparsenn.models.zoo import LeNet5
from sparsenn.train.distillation import DistillationLoss, distill
from sparsenn.train.loop import cosine_schedule, train
from sparsenn.train.teacher_cache import TeacherCache

TEACHER_LR, STUDENT_LR = 0.02, 0.02 * 0.3  # bench/reproduce.py's LeNet-5 lr and its fine-tuning scale
BATCH, WEIGHT_DECAY = 128, 5e-4


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSENN_CACHE", Path.home() / ".cache" / "sparsenn")) / "distillation"


def _sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)


def teacher_for(seed: int, train_set, epochs: int, tag: str) -> tuple[torch.nn.Module, float]:
    """The dense LeNet-5 of a seed, trained once and cached (weights as safetensors); ``(model, seconds)``."""
    torch.manual_seed(seed)
    model = LeNet5().to(memory_format=torch.channels_last)
    path = cache_dir() / f"teacher_lenet5_{tag}_seed{seed}_e{epochs}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model, 0.0
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = _sgd(model, TEACHER_LR)
    train(model, loader, opt, epochs=epochs, scheduler=cosine_schedule(opt, epochs * len(loader)))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, time.perf_counter() - t0


def student(teacher, cache: TeacherCache, sparsity: float, kd: bool, args, seed: int) -> tuple[torch.nn.Module, float]:
    """A copy of the teacher, gradually magnitude-pruned to ``sparsity`` while training; ``(model, seconds)``."""
    t0 = time.perf_counter()
    model = copy.deepcopy(teacher)
    loader = cache.loader(BATCH, seed=1000 + seed)
    steps = args.epochs * len(loader)
    schedule = sn.Polynomial(begin_step=0, end_step=int(steps * 0.7), frequency=max(1, steps // 50))
    sp = sn.Sparsifier(model, sparsity=sparsity, method="magnitude", distribution="global", schedule=schedule)
    opt = sp.wrap(_sgd(model, STUDENT_LR))
    loss = DistillationLoss(temperature=args.temperature, alpha=args.alpha if kd else 0.0)
    distill(model, loader, opt, loss=loss, epochs=args.epochs, sparsifier=sp,
            scheduler=cosine_schedule(opt, steps))
    sp.finalize()
    return model, time.perf_counter() - t0


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(rows: list[dict], args, argv, start: float) -> str:
    meta = run_meta("distillation.py", argv, start, seeds=args.seeds)
    teachers = [r["error"] for r in rows if r["kind"] == "teacher"]
    lines = [f"Command: `{meta['command']}`  ",
             (f"Machine: {meta['machine']}; date {meta['date']}; wall time {meta['seconds'] / 60:.1f} min; "
             f"seeds {args.seeds}; {args.train_size or 60000} training / {args.test_size or 10000} test images; "
             f"teacher {args.teacher_epochs} epochs, students {args.epochs} epochs (GMP from the teacher); "
             f"KD: T={args.temperature:g}, alpha={args.alpha:g}."), "",
             f"Dense LeNet-5 teacher: test error {_mean_std(teachers)} %.", "",
             ("| sparsity | GMP, cross-entropy (error %) | GMP + distillation (error %) | difference (KD - CE) "
              "| achieved sparsity |"), "|---|---|---|---|---|"]
    for s in args.sparsities:
        ce = [r for r in rows if r["kind"] == "student" and r["sparsity"] == s and not r["kd"]]
        kd = [r for r in rows if r["kind"] == "student" and r["sparsity"] == s and r["kd"]]
        if not ce or not kd:
            continue
        by_seed = {r["seed"]: r["error"] for r in ce}
        diffs = [r["error"] - by_seed[r["seed"]] for r in kd if r["seed"] in by_seed]
        achieved = statistics.mean(r["achieved"] for r in ce + kd)
        lines.append(f"| {s:.0%} | {_mean_std([r['error'] for r in ce])} | {_mean_std([r['error'] for r in kd])} | "
                     f"{_mean_std(diffs)} | {achieved:.2%} |")
    text = "\n".join(lines)
    if args.out:
        write_results(args.out, text, {"meta": meta, "rows": rows})
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run on a subset (< 2 minutes)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    ap.add_argument("--sparsities", default=None, help="comma-separated (default 0.9,0.95,0.98; 0.9 with --quick)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="dense teacher epochs (default 8; 2 with --quick)")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default 3; 1 with --quick)")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term (default 0.9)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--train-size", type=int, default=None, help="training images (default all; 6000 with --quick)")
    ap.add_argument("--test-size", type=int, default=None, help="test images (default all; 2000 with --quick)")
    ap.add_argument("--data-dir", default=os.environ.get("SPARSENN_DATA_DIR", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--out", default=None, help="PREFIX: table in PREFIX.md, rows in PREFIX.json")
    args = ap.parse_args(argv)
    start = time.time()
    q = args.quick
    args.seeds = args.seeds or (1 if q else 3)
    args.sparsities = [float(s) for s in args.sparsities.split(",")] if args.sparsities else ([0.9] if q else
                                                                                              [0.9, 0.95, 0.98])
    args.teacher_epochs = args.teacher_epochs or (2 if q else 8)
    args.epochs = args.epochs or (1 if q else 3)
    args.train_size, args.test_size = args.train_size or (6000 if q else None), args.test_size or (2000 if q else None)
    torch.set_num_threads(args.threads)

    tr, te = load_idx_dataset("fashion_mnist", args.data_dir)
    tr, te = normalize(tr, FASHION_MEAN, FASHION_STD), normalize(te, FASHION_MEAN, FASHION_STD)
    if args.train_size:
        tr = _subset(tr, args.train_size, 0)
    if args.test_size:
        te = _subset(te, args.test_size, 0)
    test_loader = torch.utils.data.DataLoader(te, batch_size=1000)
    tag = f"fmnist{args.train_size or 60000}"
    rows = []
    for seed in range(args.seeds):
        teacher, seconds = teacher_for(seed, tr, args.teacher_epochs, tag)
        cache = TeacherCache.load_or_compute(cache_dir() / f"logits_lenet5_{tag}_seed{seed}_e{args.teacher_epochs}"
                                                           ".safetensors", teacher, tr, batch_size=1000)
        rows.append({"kind": "teacher", "seed": seed, "error": err(teacher, test_loader), "seconds": seconds})
        log(f"seed {seed}: teacher error {rows[-1]['error']:.2f}% ({seconds:.0f} s; 0 = cached)")
        for s in args.sparsities:
            for kd in (False, True):
                torch.manual_seed(seed)
                model, seconds = student(teacher, cache, s, kd, args, seed)
                rows.append({"kind": "student", "seed": seed, "sparsity": s, "kd": kd, "error": err(model, test_loader),
                             "achieved": sn.sparsity(model), "seconds": seconds})
                log(f"seed {seed} sparsity {s:.2f} {'KD' if kd else 'CE'}: error {rows[-1]['error']:.2f}% "
                    f"(sparsity {rows[-1]['achieved']:.4f}, {seconds:.0f} s)")
    text = report(rows, args, argv, start)
    print(text)
    if not args.out:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
