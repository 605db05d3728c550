"""A/B step cost: this tree's masked training step against another revision's, and both against dense.

Three trainers built from the same initialization (dense, masked with the revision ``--against``,
masked with this tree; 90% ERK, batch 128) run interleaved in one process, in a rotating order,
``--reps`` blocks of ``--block`` steps each after one untimed warm-up block; reported: the median
over blocks of the mean step time. A step is ``zero_grad -> forward -> backward -> opt.step() ->
sp.step()``. With ``--threads 1`` the clock is the process's CPU time, which other processes on a
shared machine disturb far less than wall-clock time (with more threads it is wall-clock).

    python bench/step_ab.py --against a0e0d99 --model mlp --threads 1

The other revision's ``sparsenn`` package is exported with ``git archive`` into a temporary folder
and imported as ``sparsenn_other``. Used for issue 13 (unconditional weight write-back).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sparsenn as sn  # noqa: E402
from sparse_training import MLP  # noqa: E402
from sparsenn.models.zoo import LeNet300100  # noqa: E402

MODELS = {"mlp": MLP, "lenet300100": LeNet300100}
OPTIMIZERS = {
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
}


def import_revision(rev: str, folder: Path):
    """``sparsenn`` as of git revision ``rev``, importable as ``sparsenn_other``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "sparsenn"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "sparsenn").rename(folder / "sparsenn_other")
    sys.path.insert(0, str(folder))
    return importlib.import_module("sparsenn_other")


def measure(make, opt_fn, libs: dict, reps: int, block: int, clock) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(8)]
    trainers = {}
    for name, lib in libs.items():
        torch.manual_seed(0)
        model = make()
        sp = None if lib is None else lib.Sparsifier(model, sparsity=0.9, distribution="erk", seed=1)
        opt = opt_fn(model.parameters())
        if sp is not None:
            sp.wrap(opt)
        trainers[name] = (model, opt, sp)

    def run(name: str) -> float:
        model, opt, sp = trainers[name]
        gc.collect()
        t0 = clock()
        for i in range(block):
            x, y = batches[i % len(batches)]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sp is not None:
                sp.step()
        return (clock() - t0) / block

    names = list(trainers)
    for name in names:
        run(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(run(name))
    for name, lib in libs.items():  # the invariant held throughout
        if lib is not None:
            for _, p, mask in lib.iter_masks(trainers[name][0]):
                assert (p[~mask] == 0).all(), name
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision to compare with (e.g. a commit hash)")
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated: {', '.join(OPTIMIZERS)}")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        other = import_revision(args.against, Path(tmp))
        libs = {"dense": None, args.against: other, "this": sn}
        for opt_name in [o.strip() for o in args.optimizers.split(",") if o.strip()]:
            med = measure(MODELS[args.model], OPTIMIZERS[opt_name], libs, args.reps, args.block, clock)
            cells = ", ".join(f"{n} {1e3 * t:.3f} ms ({t / med['dense']:.3f}x dense)" for n, t in med.items())
            print(f"{args.model} {opt_name}, {args.threads} thread(s), {args.reps} blocks of {args.block} steps "
                  f"({'CPU' if args.threads == 1 else 'wall'} time): {cells}; this/{args.against} "
                  f"{med['this'] / med[args.against]:.3f}", flush=True)


if __name__ == "__main__":
    main()
