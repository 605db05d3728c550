"""Atomic file writes: a temporary file in the target's folder, fsync, rename, fsync the folder.

A reader sees either the previous file or the new one, never a partial one: the bytes go
to ``.<name>.<host>.<pid>.<random>.tmp`` beside the target, are flushed and fsynced, the
temporary is renamed over the target (atomic on POSIX and Windows), and the folder is
fsynced so the rename itself survives a power loss. The file is created with mode 0666
minus the user's umask, as ``open()`` would create it.

A process killed mid-write (SIGKILL, power loss) leaves its temporary behind. The next
write to the same target removes such leftovers, but only those that are certainly
stale: named by this pattern for this very target, written on this host, by a process
id that no longer exists. A temporary of a live process (another writer right now), of
another host sharing the folder (NFS), or of a process id that was reused, is left alone.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

__all__ = ["atomic_write", "stale_temporaries"]

_SUFFIX = ".tmp"


def _host() -> str:
    """This host's name, reduced to the characters a temporary's name may hold."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _temp_pattern(target: Path) -> re.Pattern:
    """Names of the temporaries :func:`atomic_write` creates for ``target`` on this host; group 1 is the pid."""
    return re.compile(rf"\.{re.escape(target.name)}\.{re.escape(_host())}\.(\d+)\.[0-9a-f]+{re.escape(_SUFFIX)}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we wrote: keep the file
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists (another user's) or cannot tell: keep the file
    return True


def stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """The leftovers of killed writes to ``target``: this host's temporaries whose process is gone."""
    target = Path(target)
    pattern = _temp_pattern(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    out = []
    for name in names:
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            out.append(target.parent / name)
    return sorted(out)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder, and needs no such step)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):
        try:
            stale.unlink()
        except OSError:
            pass  # gone already, or not ours to remove: the write goes on
    tmp = path.parent / f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{_SUFFIX}"
    # os.open's mode is filtered by the umask (tempfile.mkstemp would force 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)
