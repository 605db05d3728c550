"""How long ``sparsenn.convert`` takes on a ResNet-18 (issue 13), and what it chose.

ResNet-18 (:class:`sparsenn.models.ResNet18`, 1000 classes, random weights: the time
and the choices depend on shapes and sparsity, not on what the weights learned), every
conv and the fc masked to 80% by per-layer magnitude (``topk_mask``, unstructured),
eval mode, a 224x224 input. One ``sparsenn.convert(model, x[:1], batch_sizes=...)`` call
is timed by wall clock; the conversion summary is printed. ``--out PREFIX`` writes
``PREFIX.md`` / ``PREFIX.json`` (command, machine, date, seconds, summary).

    python bench/convert_time.py --batch-sizes 1            # the default: seconds
    python bench/convert_time.py --batch-sizes 1 64 --time-limit 120
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sparsenn as sn  # noqa: E402
from sparsenn.core.masks import attach_mask  # noqa: E402
from sparsenn.core.patterns import topk_mask  # noqa: E402
from sparsenn.models import ResNet18  # noqa: E402

from _results import run_meta, write_results  # noqa: E402


def pruned_resnet18(sparsity: float, seed: int = 0) -> torch.nn.Module:
    """ResNet-18 with every Conv2d and Linear weight masked to ``sparsity`` by magnitude."""
    torch.manual_seed(seed)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            attach_mask(m, "weight", topk_mask(m.weight.abs(), "unstructured", 1.0 - sparsity))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--time-limit", type=float, default=None, help="sn.convert's time_limit (default: its own)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model = pruned_resnet18(args.sparsity)
    x = torch.randn(1, 3, args.size, args.size)
    kwargs = {}
    params = inspect.signature(sn.convert).parameters
    if args.time_limit is not None and "time_limit" in params:
        kwargs["time_limit"] = args.time_limit
    if "progress" in params:
        kwargs["progress"] = True
    t0 = time.perf_counter()
    converted = sn.convert(model, x, batch_sizes=tuple(args.batch_sizes), **kwargs)
    seconds = time.perf_counter() - t0
    summary = converted.conversion_summary
    text = str(summary)
    print(text)
    print(f"sn.convert wall time: {seconds:.1f} s (batch sizes {tuple(args.batch_sizes)}, "
          f"{torch.get_num_threads()} threads)")
    if args.out:
        meta = run_meta("convert_time.py", argv, start, convert_seconds=seconds,
                        batch_sizes=list(args.batch_sizes), sparsity=args.sparsity)
        md = (f"Command: `{meta['command']}`  \nMachine: {meta['machine']}; date {meta['date']}\n\n"
              f"sn.convert wall time: {seconds:.1f} s\n\n```\n{text}\n```")
        write_results(args.out, md, {**meta, "summary": summary.to_dict()})


if __name__ == "__main__":
    main()
