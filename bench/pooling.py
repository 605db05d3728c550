"""Max pooling at ResNet-18's stem (64 x 112 x 112, 3 x 3, stride 2, padding 1), batch 1 and 16 (issue 15).

Side by side (interleaved medians, 2 threads): PyTorch's ``F.max_pool2d`` on the contiguous NCHW
tensor (what a ResNet runs), PyTorch's on a channels-last copy (copy and pooling timed), and
``sparsenn.backend.kernels.pooling.max_pool2d`` (what a converted model runs: ``CompiledMaxPool2d``).
Outputs are checked equal.

    python bench/pooling.py --out bench/results/pooling
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _results import log, run_meta, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per timing round")
    ap.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = ap.parse_args()
    start = time.time()
    import torch
    import torch.nn.functional as F

    from sparsenn.backend.kernels import pooling
    from sparsenn.backend.runtime.timing import interleaved_medians

    torch.set_num_threads(args.threads)
    rows = []
    for batch in (1, 16):
        x = torch.randn(batch, 64, 112, 112)
        xn = x.numpy()
        calls = {"torch NCHW": lambda: F.max_pool2d(x, 3, 2, 1),
                 "torch via channels-last copy": lambda: F.max_pool2d(x.contiguous(memory_format=torch.channels_last),
                                                                      3, 2, 1),
                 "sparsenn kernel": lambda: pooling.max_pool2d(xn, 3, 2, 1)}
        ref = calls["torch NCHW"]()
        equal = all(torch.equal(torch.as_tensor(f()), ref) for f in calls.values())
        t = interleaved_medians(calls, budget=args.budget, min_repeats=5, max_repeats=50, block=1)
        rows.append({"batch": batch, "outputs_equal": equal, **{k: v * 1e3 for k, v in t.items()}})
        log(rows[-1])
    result = run_meta("pooling.py", None, start, rows=rows)
    lines = [f"`{result['command']}` ({result['machine']}, {result['date']})", "",
             "| batch | " + " | ".join(f"{k} ms" for k in calls) + " | kernel vs torch NCHW | outputs equal |",
             "|---|" + "---|" * (len(calls) + 2)]
    for r in rows:
        lines.append(f"| {r['batch']} | " + " | ".join(f"{r[k]:.3f}" for k in calls)
                     + f" | {r['torch NCHW'] / r['sparsenn kernel']:.1f}x | {r['outputs_equal']} |")
    print("\n".join(lines))
    if args.out:
        write_results(args.out, "\n".join(lines), result)


if __name__ == "__main__":
    main()
