"""Progress bars (tqdm) for training, pruning and benchmarks, with a quiet mode.

Bars go to stderr, so stdout keeps only results (tables, paths). Quiet mode turns
every bar off: ``SPARSENN_QUIET=1`` in the environment, ``sparsenn --quiet`` on the
command line, or :func:`set_quiet` in code. Library calls show no bar unless asked
(``sparsenn.train.loop.train(..., progress=True)``); the command line asks.

    from sparsenn.core.progress import progress
    for x, y in progress(loader, desc="epoch 1"):
        ...
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["Bar", "is_quiet", "progress", "set_quiet"]

_QUIET: bool | None = None  # None: follow the environment


def set_quiet(quiet: bool | None) -> None:
    """Force quiet mode on (``True``) or off (``False``); ``None`` follows ``SPARSENN_QUIET`` again."""
    global _QUIET
    if quiet is not None and not isinstance(quiet, bool):
        raise TypeError(f"quiet must be True, False or None, got {quiet!r}")
    _QUIET = quiet


def is_quiet() -> bool:
    """Whether progress bars are off: :func:`set_quiet`, else ``SPARSENN_QUIET`` (``1``, ``true``, ``yes``)."""
    if _QUIET is not None:
        return _QUIET
    return os.environ.get("SPARSENN_QUIET", "").strip().lower() in ("1", "true", "yes", "on")


class Bar:
    """A progress bar over ``total`` units, or nothing at all in quiet mode.

    ``update(n)``, ``set_postfix(**values)``, ``close()``; also a context manager.
    """

    def __init__(self, total: int | None = None, desc: str | None = None, *, unit: str = "it",
                 enabled: bool = True, leave: bool = False):
        self._bar = None
        if enabled and not is_quiet():
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is a dependency; a broken install only loses the bar
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()},
                                  refresh=False)

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], desc: str | None = None, *, total: int | None = None, unit: str = "it",
             enabled: bool = True, leave: bool = False) -> Iterator[T]:
    """Iterate ``iterable`` with a bar (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Bar(total, desc, unit=unit, enabled=enabled, leave=leave) as bar:
        for item in iterable:
            yield item
            bar.update()
