"""Exact storage formats for sparse weights, byte tables and a format advisor.

``to_format(weight, "csr")`` converts a weight; ``.to_dense()`` gives it back exactly and
``.nbytes`` counts the bytes of the arrays stored (see :mod:`.base` for the rules).
Formats are named ``dense``, ``coo``, ``csr``, ``csc``, ``bsr`` (option ``block=(h, w)``),
``nm`` (options ``n``, ``m``) and ``bitmask``, and the lossy ``bitmask_bf16``,
``bitmask_int8``, ``dense_bf16``, ``dense_int8`` (:mod:`.quantized`: rounded values,
exact zeros); the specs ``"bsrHxW"`` (``"bsr4x4"``)
and ``"N:M"`` (``"2:4"``) carry their options in the name.
"""

from __future__ import annotations

import inspect
import re

import torch

from ...core.registry import Registry, UnknownNameError
from .base import Dense, FormatError, SparseFormat, UnrepresentableError, index_dtype
from .bitmask import Bitmask
from .bsr import BSR, parse_block
from .compressed import COO, CSC, CSR
from .nm import NMCompressed
from .quantized import BitmaskBF16, BitmaskInt8, DenseBF16, DenseInt8

FORMATS: Registry[type[SparseFormat]] = Registry("format")
for _cls in (Dense, COO, CSR, CSC, BSR, NMCompressed, Bitmask, BitmaskBF16, BitmaskInt8, DenseBF16, DenseInt8):
    FORMATS.register(_cls.name, _cls)

_BSR_RE = re.compile(r"^bsr\s*(\d+)\s*x\s*(\d+)$")
_NM_RE = re.compile(r"^(\d+)\s*:\s*(\d+)$")


def list_formats() -> list[str]:
    """Registered format names (sorted)."""
    return FORMATS.names()


def _unknown(spec: object) -> UnknownNameError:
    return UnknownNameError(
        f"unknown format {spec!r}; valid formats: {', '.join(list_formats())}, "
        f"or 'bsrHxW' (e.g. 'bsr4x4') and 'N:M' (e.g. '2:4')"
    )


def get(name: str) -> type[SparseFormat]:
    """The format class registered as ``name`` (``"csr"``, ...)."""
    if not isinstance(name, str):
        raise TypeError(f"format name must be a string, got {type(name).__name__}")
    if name.strip().lower() not in FORMATS:
        raise _unknown(name)
    return FORMATS.get(name.strip().lower())


def parse_format(spec: str) -> tuple[type[SparseFormat], dict]:
    """``(format class, options)`` of a name or a spec with options (``"bsr2x8"``, ``"2:4"``)."""
    if not isinstance(spec, str):
        raise TypeError(f"format must be a string, got {type(spec).__name__}")
    s = spec.strip().lower()
    if m := _BSR_RE.match(s):
        return BSR, {"block": (int(m.group(1)), int(m.group(2)))}
    if m := _NM_RE.match(s):
        return NMCompressed, {"n": int(m.group(1)), "m": int(m.group(2))}
    if s in FORMATS:
        return FORMATS.get(s), {}
    raise _unknown(spec)


def to_format(weight: torch.Tensor, name: str, **options) -> SparseFormat:
    """``weight`` in format ``name`` (a registered name or a spec such as ``"bsr4x4"``, ``"2:4"``).

    ``options`` go to the format's ``from_dense`` (``block=`` for BSR, ``n=``/``m=`` for N:M).
    """
    cls, preset = parse_format(name)
    valid = [p for p in inspect.signature(cls.from_dense).parameters if p != "weight"]
    for key, value in options.items():
        if key not in valid:
            raise FormatError(f"format {name!r} takes no option {key!r}; valid options: {', '.join(valid) or 'none'}")
        if key in preset and (parse_block(value) if key == "block" else value) != preset[key]:
            raise FormatError(f"format {name!r} fixes {key}={preset[key]!r}, got {key}={value!r}")
    return cls.from_dense(weight, **{**preset, **options})


from .advisor import Advice, advise, list_matmul_candidates, register_matmul_candidate
from .table import BytesTable, bytes_table

__all__ = [
    "BSR", "COO", "CSC", "CSR", "FORMATS", "Advice", "Bitmask", "BitmaskBF16", "BitmaskInt8", "BytesTable",
    "DenseBF16", "DenseInt8", "Dense", "FormatError",
    "NMCompressed", "SparseFormat", "UnrepresentableError", "advise", "bytes_table", "get", "index_dtype",
    "list_formats", "list_matmul_candidates", "parse_format", "register_matmul_candidate", "to_format"
]
