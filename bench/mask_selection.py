"""Cost of one global mask update's selection on ResNet-18 (issue 13): stable sorts vs k-th value.

The scores of ResNet-18's 21 conv/fc weights (11,678,912 entries, torchvision shapes) go
through the ``global`` distribution at 80% sparsity, then each layer's unstructured top-k
at its density: what ``Sparsifier._compute_masks`` does after scoring. ``sort`` is the
former implementation (a stable descending sort of the float64 concatenation, then one
stable sort per layer); ``kth`` is the library's (``sparsenn.core.selection``). Both run
in one process, interleaved, best of ``--repeats``; the masks are checked identical.
Cases: |N(0,1)| scores, and the same with 50% of them -inf (already-pruned weights).

    python bench/mask_selection.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from sparsenn.core.distributions import layer_densities
from sparsenn.core.patterns import Unstructured


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"conv1.weight": (64, 3, 7, 7)}
    cin = 64
    for i, c in enumerate([64, 128, 256, 512], 1):
        for b in range(2):
            shapes[f"layer{i}.{b}.conv1.weight"] = (c, cin if b == 0 else c, 3, 3)
            shapes[f"layer{i}.{b}.conv2.weight"] = (c, c, 3, 3)
            if b == 0 and i > 1:
                shapes[f"layer{i}.{b}.downsample.0.weight"] = (c, cin, 1, 1)
        cin = c
    shapes["fc.weight"] = (1000, 512)
    return shapes


def _sorted_top_k(s: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(s.numel(), dtype=torch.bool)
    keep[torch.sort(s, descending=True, stable=True).indices[:k]] = True
    return keep


def sort_based(shapes, sparsity, scores):
    """The former code path: two stable sorts of every score."""
    t0 = time.perf_counter()
    flat = [scores[n].reshape(-1).to(torch.float64) for n in shapes]
    allscores = torch.cat(flat)
    keep = _sorted_top_k(allscores, round((1 - sparsity) * allscores.numel()))
    densities = {n: int(c.sum()) / math.prod(shapes[n])
                 for n, c in zip(shapes, keep.split([t.numel() for t in flat]))}
    t1 = time.perf_counter()
    masks = {n: _sorted_top_k(scores[n].reshape(-1), round(densities[n] * scores[n].numel())).reshape(shapes[n])
             for n in shapes}
    return t1 - t0, time.perf_counter() - t1, masks


def kth_based(shapes, sparsity, scores):
    t0 = time.perf_counter()
    densities = layer_densities("global", shapes, sparsity, scores=scores)
    t1 = time.perf_counter()
    masks = {n: Unstructured().topk(scores[n], densities[n], n) for n in shapes}
    return t1 - t0, time.perf_counter() - t1, masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = resnet18_shapes()
    print(f"weights {sum(math.prod(s) for s in shapes.values()):,}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    scores = {n: torch.randn(s).abs() for n, s in shapes.items()}
    pruned = {n: s.masked_fill(torch.rand(s.shape) < 0.5, -math.inf) for n, s in scores.items()}
    for label, sc in [("|N(0,1)| scores", scores), ("50% -inf (pruned)", pruned)]:
        best = {"sort": (math.inf, math.inf), "kth": (math.inf, math.inf)}
        for _ in range(args.repeats):
            a, b, ref = sort_based(shapes, 0.8, sc)
            best["sort"] = min(best["sort"], (a, b), key=sum)
            a, b, got = kth_based(shapes, 0.8, sc)
            best["kth"] = min(best["kth"], (a, b), key=sum)
            assert all(torch.equal(ref[n], got[n]) for n in shapes), "masks differ"
        for which, (a, b) in best.items():
            print(f"{label:20s} {which:4s}: global densities {a:.3f} s + per-layer top-k {b:.3f} s = {a + b:.3f} s")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
