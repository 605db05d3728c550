"""TensorFlow "SAME" padding of a stride-2 depthwise convolution: copying the input into a padded tensor
(``F.pad``, what EfficientNet-Lite0's convolutions did) against padding inside the convolution (a zero
kernel tap plus symmetric padding, what they do now). Channels_last batches of EfficientNet-Lite0's
stride-2 depthwise shapes; median of ``--rounds`` per shape, the two interleaved.

    python bench/same_padding.py --out bench/results/same_padding
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _results import log, run_meta  # noqa: E402

# (channels, input size, kernel): EfficientNet-Lite0's stride-2 depthwise layers, at full width and at 1/3
SHAPES = ((96, 112, 3), (32, 112, 3), (144, 56, 5), (48, 56, 5), (240, 28, 3), (80, 28, 3), (480, 14, 5),
          (160, 14, 5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=None, help="write PREFIX.json")
    args = ap.parse_args()
    start = time.time()

    import torch
    import torch.nn.functional as F

    from sparsenn.models.efficientnet import _Conv2dSame

    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for c, hw, k in SHAPES:
            conv = _Conv2dSame(c, c, k, stride=2, groups=c)
            x = torch.randn(args.batch, c, hw, hw).contiguous(memory_format=torch.channels_last)
            a, b = _Conv2dSame._same_pad(hw, k, 2)
            runs = {"F.pad copy": lambda x=x, conv=conv, a=a, b=b, c=c: F.conv2d(F.pad(x, (a, b, a, b)), conv.weight,
                                                                                 stride=2, groups=c),
                    "inside the convolution": lambda x=x, conv=conv: conv(x)}
            torch.testing.assert_close(runs["F.pad copy"](), runs["inside the convolution"](), rtol=0, atol=0)
            times = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, f in runs.items():
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
            row = {"channels": c, "size": hw, "kernel": k, **{n: statistics.median(v) * 1e3 for n, v in times.items()}}
            rows.append(row)
            log(json.dumps(row))
    out = {**run_meta("same_padding.py", None, start), "rows": rows}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
