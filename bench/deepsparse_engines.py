"""Serve DeepSparse engines to bench/transformer_runtime.py, one request at a time; run with DeepSparse's own Python.

DeepSparse 1.8 needs Python <= 3.11 and lives in its own virtual environment, so it cannot be
called in the benchmark's process. Timed in one batch after the other's engines (the earlier
way), a slow spell of the shared machine landed on one engine only. This server keeps the
compiled engines in memory and runs one forward pass per request, so the benchmark can time
DeepSparse in the same interleaved rounds as its own engines (wall time of a request: the pass
plus a pipe round trip, which the benchmark measures with ``ping`` and reports).

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.

- ``{"op": "load", "key", "path", "batch", "threads", "feeds": [.npy paths]}``: compile an engine
  for ``batch`` (DeepSparse fixes the batch at compile time), load the inputs, run 3 warm-up passes.
- ``{"op": "run", "key"}``: one forward pass of that engine on its inputs.
- ``{"op": "ping"}``: nothing (the round trip). ``{"op": "quit"}``: exit.

Replies are ``{"ok": true}`` (``load`` adds ``"version"``) or ``{"error": "Type: message"}``. This
script imports nothing from sparsenn.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import deepsparse
    import numpy as np

    engines: dict = {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "quit":
                break
            if op == "load":
                engine = deepsparse.Engine(model=req["path"], batch_size=int(req["batch"]), num_cores=int(req["threads"]))
                feeds = [np.load(f) for f in req["feeds"]]
                for _ in range(3):
                    engine.run(feeds)
                engines[req["key"]] = (engine, feeds)
                reply = {"ok": True, "version": getattr(deepsparse, "__version__", "?")}
            elif op == "run":
                engine, feeds = engines[req["key"]]
                engine.run(feeds)
                reply = {"ok": True}
            elif op == "ping":
                reply = {"ok": True}
            else:
                reply = {"error": f"ValueError: unknown op {op!r}; choose from load, run, ping, quit"}
        except Exception as e:  # noqa: BLE001  (reported to the benchmark, which records it)
            reply = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
