"""Files named inside a folder by a stranger's index or manifest: a plain name whose real path stays inside."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..backend.runtime.errors import ArchiveError

PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # no separators, no leading dot, bounded


def file_in_folder(where: str, folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a plain file name (:data:`PLAIN_NAME`) whose real path (symlinks followed)
    is a file inside ``folder``; anything else raises :class:`ArchiveError` naming ``what`` and the name."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise ArchiveError(f"{where}: {what} {name!r} must be a plain file name in the folder "
                           "(letters, digits, '.', '_', '-'; no path)")
    path = folder / name
    real, top = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, top]) != top or real == top:
        raise ArchiveError(f"{where}: {what} {name!r} leads outside the folder (to {real!r})")
    if not os.path.isfile(real):
        raise ArchiveError(f"{where}: {what} {name!r} is not a file in the folder")
    return path
