"""The ``sparsenn`` command: demo, run, prune, oneshot, report, bench, convert, compress, export, list.

Exit codes: 0 on success; 2 on bad usage, an invalid recipe or unusable input (a
missing file, a checkpoint that does not fit); 1 when something fails while running.
Errors print ``sparsenn: error: ...`` on stderr without a traceback
(``SPARSENN_DEBUG=1`` adds it). Progress bars go to stderr; ``--quiet`` (or
``SPARSENN_QUIET=1``) turns them off.
"""

from __future__ import annotations

import os
import sys
import traceback

from .commands import COMMANDS
from .parser import UsageError, _parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # bad usage: argparse prints it and exits 2
    if args.command is None:
        parser.print_help()
        return 2
    threads = getattr(args, "threads", None)  # bounded by its argparse type
    from ..core.progress import set_quiet

    if getattr(args, "quiet", False):
        set_quiet(True)
    old_threads = _set_threads(threads if args.command != "demo" else None)  # the demo sets its own
    from .recipes.schema import RecipeError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, RecipeError) as e:
        _error(str(e), e)
        return 2
    except KeyboardInterrupt:
        _error("interrupted", None)
        return 130
    except Exception as e:  # noqa: BLE001 - a failure while running: a message, not a traceback
        _error(f"{args.command} failed: {type(e).__name__}: {e}", e)
        return 1
    finally:
        if getattr(args, "quiet", False):
            set_quiet(None)
        _set_threads(old_threads)


def _set_threads(n: int | None) -> int | None:
    """Set PyTorch's intra-op threads to ``n`` (``None``: leave them); returns the previous count."""
    if n is None:
        return None
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def _error(message: str, exc: BaseException | None) -> None:
    if exc is not None and os.environ.get("SPARSENN_DEBUG"):
        traceback.print_exception(exc)
    lines = message.splitlines() or [""]
    print(f"sparsenn: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"sparsenn: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
