"""What every benchmark script records: the command, the machine, the date, the wall time; and the
``PREFIX.md`` / ``PREFIX.json`` pair it writes with ``--out PREFIX``."""

from __future__ import annotations

import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch


def log(*a: Any) -> None:
    """Progress to stderr (stdout carries the results)."""
    print(*a, file=sys.stderr, flush=True)


def run_meta(script: str, argv: list[str] | None, start: float, **extra: Any) -> dict[str, Any]:
    """``command`` (as typed: ``python bench/SCRIPT ARGS``), ``machine``, ``date``, ``seconds`` since
    ``start``, then ``extra`` in order."""
    args = argv if argv is not None else sys.argv[1:]
    return {"command": f"python bench/{script} " + " ".join(args),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "date": date.today().isoformat(), "seconds": time.time() - start, **extra}


def write_results(prefix: str | Path, markdown: str, payload: dict[str, Any]) -> None:
    """``PREFIX.md`` (the Markdown plus a final newline) and ``PREFIX.json`` (``payload``, indent 1)."""
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    # appended, not with_suffix: a prefix like results/x.seed1 keeps its last part
    Path(f"{out}.md").write_text(markdown + "\n")
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1))
