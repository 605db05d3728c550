"""A safetensors file's header, read and checked before any tensor is allocated.

Layout (https://github.com/huggingface/safetensors): 8 bytes little-endian ``N``, ``N``
bytes of UTF-8 JSON, then the data. The JSON maps each tensor name to ``{"dtype",
"shape", "data_offsets": [begin, end]}`` (offsets into the data) and ``"__metadata__"``
to string -> string. :func:`read_header` reads only the header and checks, with the
file's size in hand, that the file is at most ``max_bytes``, that ``N`` fits in it (and
under safetensors' own 100 MB limit), that the JSON parses to that structure, and that
every tensor's declared bytes (shape x dtype size) are exactly its offsets' span inside
the data, with no two tensors overlapping. Whatever is read afterwards is then bounded
by the file's size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ArchiveError

MAX_HEADER = 100_000_000  # bytes of JSON; safetensors refuses larger headers too
MAX_DIMS = 64  # dimensions of one tensor
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def check_max_bytes(max_bytes: object) -> None:
    """A cap a loader takes: a non-negative integer of bytes, or ``None`` (no cap); ValueError otherwise."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative integer or None, got {max_bytes!r}")


def read_header(path: str | os.PathLike, max_bytes: int | None) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """``({name: entry}, metadata)`` of the safetensors file at ``path`` (ArchiveError if malformed)."""
    path = Path(path)
    where = repr(str(path))
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ArchiveError(f"{where} is {size} bytes, more than max_bytes={max_bytes}; "
                           "pass a larger max_bytes (or None) if you trust it")
    if size < 8:
        raise ArchiveError(f"{where} is {size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_HEADER):
            raise ArchiveError(f"{where} declares a {n}-byte header; the file has {size - 8} bytes after the "
                               f"length (at most {MAX_HEADER} bytes of header are read)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArchiveError(f"{where}: the safetensors header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ArchiveError(f"{where}: the safetensors header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ArchiveError(f"{where}: the safetensors metadata must map strings to strings")
    data = size - 8 - n
    entries = {name: _entry(where, name, e, data) for name, e in header.items()}
    spans = sorted((e.begin, e.end, name) for name, e in entries.items() if e.end > e.begin)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise ArchiveError(f"{where}: tensors {a!r} and {b!r} overlap in the data")
    return entries, meta


def _entry(where: str, name: str, e: object, data: int) -> TensorEntry:
    def bad(why: str) -> ArchiveError:
        return ArchiveError(f"{where}: tensor {name!r}: {why}")

    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise bad("must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise bad(f"shape must be a list of at most {MAX_DIMS} non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end <= {data} (the data's size), "
                  f"got {offsets!r}")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise bad(f"shape {shape} of {dtype} is {nbytes} bytes, its offsets span {offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
