"""Microbenchmark of the sparse training kernels (issue 18): forward + backward of one Linear layer,
dense ``F.linear`` with autograd vs ``SparseLinearFunction``, side by side.

Layers of the 784-1000-1000-1000-10 MLP (784x1000, 1000x1000, 1000x10 as in x out) at batch
128 and 32 and sparsity 0.8 / 0.9 / 0.95 / 0.98 / 0.99 (a uniformly random mask). One call
is ``forward -> backward`` with ``x`` needing its gradient except for the first layer (as in the
MLP, whose input needs none), the weight (dense ``W`` or ``values``) and the bias always;
gradients are reset to ``None`` before each call. Timed by
:func:`sparsenn.backend.runtime.timing.interleaved_medians` (rounds in shuffled order,
medians). Reported: the median time per call of each and dense / sparse (above 1: sparse is
faster), plus the forward-only, input-gradient and weight-gradient kernels' times at batch 128.

    python bench/sparse_training_kernels.py                 # ~2 minutes on 2 idle cores
    python bench/sparse_training_kernels.py --threads 1
    python bench/sparse_training_kernels.py --quick         # code check (seconds)

Timings need an otherwise idle machine; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsenn.backend.runtime.timing import interleaved_medians
from sparsenn.backend.training import SparseLinearFunction, SparseStructure
from sparsenn.backend.training import kernels as K

LAYERS = ((784, 1000), (1000, 1000), (1000, 10))  # (in, out)
BATCHES = (128, 32)
SPARSITIES = (0.8, 0.9, 0.95, 0.98, 0.99)


def case(cols: int, out: int, batch: int, sparsity: float, budget: float) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(out, cols, generator=g) >= sparsity
    w = torch.randn(out, cols, generator=g) * mask
    s = SparseStructure.from_mask(mask)
    dense_w = w.clone().requires_grad_()
    values = torch.from_numpy(s.gather(w.numpy())).requires_grad_()
    bd = torch.zeros(out, requires_grad=True)
    bs = torch.zeros(out, requires_grad=True)
    x = torch.randn(batch, cols, generator=g).requires_grad_(cols != 784)
    gy = torch.randn(batch, out, generator=g)

    def dense():
        x.grad = dense_w.grad = bd.grad = None
        F.linear(x, dense_w, bd).backward(gy)

    def sparse():
        x.grad = values.grad = bs.grad = None
        SparseLinearFunction.apply(x, values, bs, s).backward(gy)

    t = interleaved_medians({"dense": dense, "sparse": sparse}, budget=budget, min_repeats=7, block=3)
    return t


def kernel_split(cols: int, out: int, batch: int, sparsity: float, budget: float) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(out, cols, generator=g) >= sparsity
    s = SparseStructure.from_mask(mask)
    v = torch.randn(s.nnz, generator=g).numpy()
    x = torch.randn(batch, cols, generator=g).numpy()
    dy = torch.randn(batch, out, generator=g).numpy()
    xp, dyp = K.tiles(x), K.tiles(dy)
    y = torch.empty(batch, out).numpy()
    dx = torch.empty(batch, cols).numpy()
    dv = torch.empty(s.nnz).numpy()
    return interleaved_medians({
        "tiles": lambda: K.tiles(x, reuse=True),
        "forward": lambda: K.forward(s, v, xp, None, y),
        "input_grad": lambda: K.input_grad(s, v, dyp, dx),
        "weight_grad": lambda: K.weight_grad(s, dyp, xp, dv),
    }, budget=budget, min_repeats=7, block=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of timing per case (about)")
    ap.add_argument("--quick", action="store_true", help="one sparsity, short timing (a code check)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sparsities = (0.95,) if args.quick else SPARSITIES
    budget = 0.02 if args.quick else args.budget
    print(f"load average before: {os.getloadavg()[0]:.2f}; threads {args.threads}; torch {torch.__version__}")
    print("\nforward + backward per call (ms), dense F.linear vs SparseLinearFunction; speedup = dense / sparse")
    print(f"{'layer (in x out)':>17} {'batch':>5} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8}")
    for cols, out in LAYERS:
        for batch in BATCHES:
            for sp in sparsities:
                t = case(cols, out, batch, sp, budget)
                print(f"{f'{cols}x{out}':>17} {batch:>5} {sp:>8.2f} {t['dense'] * 1e3:>9.3f} "
                      f"{t['sparse'] * 1e3:>9.3f} {t['dense'] / t['sparse']:>7.2f}x", flush=True)
    print("\nsparse kernels alone at batch 128 (ms): tiles = transposing x into batch tiles")
    print(f"{'layer (in x out)':>17} {'sparsity':>8} {'tiles':>7} {'forward':>8} {'dX':>7} {'dW':>7}")
    for cols, out in LAYERS:
        for sp in sparsities:
            t = kernel_split(cols, out, 128, sp, budget / 2)
            print(f"{f'{cols}x{out}':>17} {sp:>8.2f} {t['tiles'] * 1e3:>7.3f} {t['forward'] * 1e3:>8.3f} "
                  f"{t['input_grad'] * 1e3:>7.3f} {t['weight_grad'] * 1e3:>7.3f}", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
