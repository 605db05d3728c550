"""Time DeepSparse on ONNX models; run by bench/runtime.py with DeepSparse's own Python.

DeepSparse 1.8 supports Python 3.8-3.11 and ONNX opset <= 17, so it lives in its own
virtual environment; this script imports nothing from sparsenn. Input (argv[1]): a
JSON file ``{"models": [{"key", "path", "in_features"}], "batches", "threads",
"warmup", "repeats"}``. Output (stdout, last line): JSON ``{"version", "results":
{key: {batch: median seconds}}, "errors": {key: message}}``. Engines compile for one
batch size each (DeepSparse fixes the batch at compile time); compile time is not
timed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main(path: str) -> None:
    with open(path) as f:
        cfg = json.load(f)
    import deepsparse
    import numpy as np

    out = {"version": getattr(deepsparse, "__version__", "?"), "results": {}, "errors": {}}
    for model in cfg["models"]:
        key = model["key"]
        times = {}
        try:
            for b in cfg["batches"]:
                engine = deepsparse.Engine(model=model["path"], batch_size=int(b), num_cores=cfg["threads"])
                x = [np.random.default_rng(0).standard_normal((int(b), model["in_features"])).astype(np.float32)]
                for _ in range(cfg["warmup"]):
                    engine.run(x)
                samples = []
                for _ in range(cfg["repeats"]):
                    t0 = time.perf_counter()
                    engine.run(x)
                    samples.append(time.perf_counter() - t0)
                times[str(b)] = statistics.median(samples)
                del engine
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            out["errors"][key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out["results"][key] = times
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
