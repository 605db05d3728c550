"""Per-tensor codecs of the sparse archive: how one tensor becomes a few flat arrays and back.

A codec (:class:`Codec`, registered by name in :data:`CODECS`) has
``encode(tensor, **options) -> (arrays, meta)`` (``arrays``: ``{name: numpy array}``,
``meta``: a JSON object of scalars) and ``decode(arrays, meta, shape, dtype) -> Tensor``.
``decode`` reads arrays from a file nobody vouches for: it checks every array's dtype and
length and every index against ``meta`` and ``shape`` *before* it allocates the result,
and raises :class:`~sparsenn.backend.runtime.errors.ArchiveError` saying what is wrong
(the archive adds the tensor's name).

Values are stored in the tensor's own dtype (bfloat16 and float8, which numpy lacks, as
their raw bits: ``uint16`` / ``uint8``). *Zero* is by value (``-0.0`` is zero, NaN is not),
and the exact codecs are exact bit for bit all the same: ``bitmask`` and ``nm`` add an array
``signs`` (one bit per entry they do not store, set for ``-0.0``) when a tensor has negative
zeros there (weights pruned by ``w * mask`` do), and store NaN payloads as values.

=================  =====  =============================================================
name               exact  arrays
=================  =====  =============================================================
``dense``          yes    ``values``: every entry, in the tensor's shape
``bits``           yes    ``bits``: a bool tensor, one bit per entry (``numpy.packbits``)
``bitmask``        yes    ``mask``: one bit per entry (set = nonzero), ``values``: the
                          nonzeros in order ("sparse-bitmask" of compressed-tensors)
``nm``             yes    ``values``: ``n`` slots per group of ``m`` columns, ``metadata``:
                          each slot's position in ``ceil(log2 m)`` bits (Mishra et al. 2021)
``bitmask_int8``   no     ``mask``, ``values`` (int8), ``scale`` (float32 per output row):
                          symmetric per-channel int8, error <= ``max|w_row| / 254`` per entry
``deep``           no     Deep Compression (Han et al. 2016), when
                          :mod:`sparsenn.compress.deep_compression` provides it
=================  =====  =============================================================

Bit order is little (``bitorder="little"``: entry ``i`` is bit ``i % 8`` of byte ``i // 8``);
padding bits must be zero. Matrix views are ``(shape[0], prod(shape[1:]))``, as everywhere
in sparsenn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backend.formats.nm import code_bits, pack_codes
from ..backend.formats.quantized import quantize_int8
from ..backend.runtime.errors import ArchiveError
from ..core.registry import Registry

#: archive dtype name -> (torch dtype, numpy dtype of the stored values)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float64": (torch.float64, np.dtype(np.float64)), "float32": (torch.float32, np.dtype(np.float32)),
    "float16": (torch.float16, np.dtype(np.float16)), "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),
    "float8_e4m3fn": (torch.float8_e4m3fn, np.dtype(np.uint8)), "float8_e5m2": (torch.float8_e5m2, np.dtype(np.uint8)),
    "int64": (torch.int64, np.dtype(np.int64)), "int32": (torch.int32, np.dtype(np.int32)),
    "int16": (torch.int16, np.dtype(np.int16)), "int8": (torch.int8, np.dtype(np.int8)),
    "uint64": (torch.uint64, np.dtype(np.uint64)), "uint32": (torch.uint32, np.dtype(np.uint32)),
    "uint16": (torch.uint16, np.dtype(np.uint16)), "uint8": (torch.uint8, np.dtype(np.uint8)),
    "bool": (torch.bool, np.dtype(np.bool_)),
}
_NAMES = {t: name for name, (t, _) in DTYPES.items()}
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # bit views by item size
_TORCH_RAW = {1: torch.uint8, 2: torch.int16}  # how torch reinterprets bf16 / float8 before numpy
FLOATS = ("float64", "float32", "float16", "bfloat16")
MAX_M = 256  # the largest N:M group a file may declare
#: N:M patterns ``auto`` tries (those of the kernels and 2:16)
NM_PATTERNS = ((1, 8), (1, 4), (2, 8), (2, 16), (1, 2), (2, 4), (4, 8))


def dtype_name(dtype: torch.dtype) -> str:
    """The archive's name of a torch dtype (TypeError for one it cannot store: complex, quantized)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TypeError(f"the archive cannot store {dtype} tensors; storable: {', '.join(DTYPES)}") from None


def to_storage(t: torch.Tensor) -> np.ndarray:
    """``t`` as a contiguous numpy array of its stored dtype (bf16/float8 as raw bits); may share memory."""
    t = t.detach().cpu().contiguous()
    storage = DTYPES[dtype_name(t.dtype)][1]
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(_TORCH_RAW[t.element_size()]).numpy().view(storage)
    return t.numpy()


def from_storage(a: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_storage`: a new tensor (owns its memory) of ``dtype`` and ``shape``."""
    t_dtype, storage = DTYPES[dtype]
    a = np.ascontiguousarray(a, dtype=storage).reshape(shape)
    if t_dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.from_numpy(a.view(np.int16 if a.itemsize == 2 else np.uint8).copy()).view(t_dtype)
    return torch.from_numpy(a.copy())


def _sign(dtype: str) -> int | None:
    """The sign bit of a floating dtype's raw bits (``None`` for integers and bool)."""
    return 1 << (8 * DTYPES[dtype][1].itemsize - 1) if DTYPES[dtype][0].is_floating_point else None


def nonzero_of(a: np.ndarray, dtype: str) -> np.ndarray:
    """Where the stored entries ``a`` of a ``dtype`` tensor are not zero (``-0.0`` is zero, NaN is not), as bool."""
    if a.dtype == np.bool_:
        return a.copy()
    raw = a.view(_RAW[a.itemsize])
    sign = _sign(dtype)
    return raw != 0 if sign is None else (raw & raw.dtype.type(~sign & (2 * sign - 1))) != 0


def nonzero(t: torch.Tensor) -> np.ndarray:
    """:func:`nonzero_of` a tensor, in its shape."""
    return nonzero_of(to_storage(t), dtype_name(t.dtype))


def _signs(unstored: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """``{"signs": packed bits}`` marking the ``-0.0`` among entries a codec does not store (``{}`` if none)."""
    sign = _sign(dtype)
    if sign is None or not unstored.size:
        return {}
    neg = unstored.view(_RAW[unstored.itemsize]) == sign
    return {"signs": pack_bits(neg)} if neg.any() else {}


def _put_signs(arrays: dict, out: np.ndarray, unstored: np.ndarray, dtype: str) -> None:
    """Write ``-0.0`` where the optional ``signs`` array marks an unstored entry of ``out`` (flat, stored dtype)."""
    if "signs" not in arrays:
        return
    sign = _sign(dtype)
    if sign is None:
        raise ArchiveError(f"array 'signs' marks negative zeros, which a {dtype} tensor has none of")
    neg = _unpack_mask(arrays, "signs", int(unstored.size))
    raw = out.view(_RAW[out.itemsize])
    raw[unstored[neg]] = sign


def pack_bits(b: np.ndarray) -> np.ndarray:
    return np.packbits(b.reshape(-1), bitorder="little")


# ------------------------------------------------------------------ validation of what a file holds


def _int(meta: dict, key: str, low: int, high: int) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ArchiveError(f"meta {key!r} must be an integer in [{low}, {high}], got {v!r}")
    return v


def _keys(meta: object, keys: set[str]) -> dict:
    if not isinstance(meta, dict) or set(meta) != keys:
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ArchiveError(f"meta must hold exactly {sorted(keys)}, got {got}")
    return meta


def _array(arrays: dict, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    a = arrays.get(name)
    if not isinstance(a, np.ndarray):
        raise ArchiveError(f"array {name!r} is missing")
    if a.dtype != dtype:
        raise ArchiveError(f"array {name!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.shape != tuple(shape):
        raise ArchiveError(f"array {name!r} has shape {list(a.shape)}, expected {list(shape)}")
    return a


def _only(arrays: dict, names: set[str]) -> None:
    if set(arrays) != names:
        raise ArchiveError(f"arrays must be exactly {sorted(names)}, got {sorted(arrays)}")


def _unpack_mask(arrays: dict, name: str, count: int) -> np.ndarray:
    """The ``count`` bits of the packed array ``name`` as bool, its length and padding checked."""
    packed = _array(arrays, name, np.dtype(np.uint8), (-(-count // 8),))
    bits = np.unpackbits(packed, bitorder="little").view(np.bool_)
    if bits[count:].any():
        raise ArchiveError(f"array {name!r} has padding bits set after its {count} entries")
    return bits[:count]


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ArchiveError(f"needs a tensor of at least 2 dimensions, got shape {list(shape)}")
    return shape[0], math.prod(shape[1:])


# ------------------------------------------------------------------ the codecs


@dataclass(frozen=True)
class Codec:
    """A registered codec (see the module docstring). ``fits(tensor)`` says why the codec cannot hold
    ``tensor`` (``None`` if it can); ``exact``: decode(encode(t)) is ``t`` bit for bit."""

    name: str
    encode: Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]]
    decode: Callable[[dict[str, np.ndarray], dict[str, Any], tuple[int, ...], str], torch.Tensor]
    exact: bool
    fits: Callable[[torch.Tensor], str | None]


CODECS: Registry[Codec] = Registry("codec")


def _any(t: torch.Tensor) -> str | None:
    return None


def dense_encode(t: torch.Tensor) -> tuple[dict, dict]:
    return {"values": to_storage(t).reshape(t.shape or (1,))}, {}  # safetensors' numpy writer has no rank 0


def dense_decode(arrays: dict, meta: dict, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    _keys(meta, set())
    _only(arrays, {"values"})
    values = _array(arrays, "values", DTYPES[dtype][1], shape or (1,))
    if dtype == "bool" and values.view(np.uint8).max(initial=0) > 1:
        raise ArchiveError("array 'values' holds bool bytes other than 0 and 1")
    return from_storage(values, dtype, shape)


def _bool_only(t: torch.Tensor) -> str | None:
    return None if t.dtype == torch.bool else f"holds bool tensors only, got {t.dtype}"


def bits_encode(t: torch.Tensor) -> tuple[dict, dict]:
    if t.dtype != torch.bool:
        raise TypeError(f"codec 'bits' takes bool tensors, got {t.dtype}")
    return {"bits": pack_bits(to_storage(t))}, {}


def bits_decode(arrays: dict, meta: dict, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    _keys(meta, set())
    _only(arrays, {"bits"})
    if dtype != "bool":
        raise ArchiveError(f"codec 'bits' holds bool tensors, the tensor is {dtype}")
    return from_storage(_unpack_mask(arrays, "bits", math.prod(shape)), dtype, shape)


def bitmask_encode(t: torch.Tensor) -> tuple[dict, dict]:
    a = to_storage(t).reshape(-1)
    nz = nonzero_of(a, dtype_name(t.dtype))
    arrays = {"mask": pack_bits(nz), "values": a[nz], **_signs(a[~nz], dtype_name(t.dtype))}
    return arrays, {"nnz": int(nz.sum())}


def bitmask_decode(arrays: dict, meta: dict, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    numel = math.prod(shape)
    nnz = _int(_keys(meta, {"nnz"}), "nnz", 0, numel)
    _only(arrays, {"mask", "values"} | ({"signs"} & set(arrays)))
    values = _array(arrays, "values", DTYPES[dtype][1], (nnz,))
    bits = _unpack_mask(arrays, "mask", numel)
    if int(bits.sum()) != nnz:
        raise ArchiveError(f"array 'mask' has {int(bits.sum())} bits set, meta 'nnz' says {nnz}")
    out = np.zeros(numel, DTYPES[dtype][1])
    out[bits] = values
    _put_signs(arrays, out, np.flatnonzero(~bits), dtype)
    return from_storage(out, dtype, shape)


# N:M (exact): slots in increasing position; a group with fewer than n nonzeros pads with its first zero positions


def _nm_fits(t: torch.Tensor, n: int | None = None, m: int | None = None) -> str | None:
    if t.dim() < 2:
        return f"needs a tensor of at least 2 dimensions, got shape {list(t.shape)}"
    if n is None:
        return None if best_nm(t) is not None else f"the tensor follows none of the N:M patterns {NM_PATTERNS}"
    return _nm_problem(nonzero(t).reshape(t.shape[0], -1), n, m)


def _nm_problem(nz: np.ndarray, n: int, m: int) -> str | None:
    cols = nz.shape[1]
    if cols % m:
        return f"{cols} columns are not a multiple of m={m}"
    most = int(nz.reshape(-1, m).sum(axis=1).max(initial=0)) if nz.size else 0
    return None if most <= n else f"a group of {m} columns holds {most} nonzeros (> n={n})"


def nm_bytes(numel: int, itemsize: int, n: int, m: int) -> int:
    slots = numel // m * n
    return slots * itemsize + -(-slots * code_bits(m) // 8)


def best_nm(t: torch.Tensor) -> tuple[int, int] | None:
    """The N:M pattern of :data:`NM_PATTERNS` that ``t`` (>= 2-D) follows along its rows in the fewest bytes."""
    if t.dim() < 2 or not t.numel():
        return None
    nz = nonzero(t).reshape(t.shape[0], -1)
    fits = [(n, m) for n, m in NM_PATTERNS if _nm_problem(nz, n, m) is None]
    return min(fits, key=lambda p: nm_bytes(t.numel(), t.element_size(), *p), default=None)


def nm_encode(t: torch.Tensor, n: int | None = None, m: int | None = None) -> tuple[dict, dict]:
    if n is None or m is None:
        found = best_nm(t)
        if found is None:
            raise ValueError(f"a tensor of shape {list(t.shape)} follows none of the N:M patterns {NM_PATTERNS}")
        n, m = found
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) \
            or not 0 < n < m <= MAX_M:
        raise ValueError(f"N:M needs integers 0 < n < m <= {MAX_M}, got n={n!r}, m={m!r}")
    if t.dim() < 2:
        raise ValueError(f"codec 'nm' needs a tensor of at least 2 dimensions, got shape {list(t.shape)}")
    a = to_storage(t).reshape(t.shape[0], -1)
    nz = nonzero_of(a, dtype_name(t.dtype))
    problem = _nm_problem(nz, n, m)
    if problem:
        raise ValueError(f"tensor of shape {list(t.shape)} is not {n}:{m}: {problem}")
    groups = nz.reshape(-1, m)
    key = np.where(groups, 0, m) + np.arange(m)  # nonzeros first, then the lowest zero positions
    pos = np.sort(np.argsort(key, axis=1, kind="stable")[:, :n], axis=1)
    values = np.take_along_axis(a.reshape(-1, m), pos, axis=1).reshape(-1)
    index = (np.arange(groups.shape[0])[:, None] * m + pos).reshape(-1)
    unstored = np.ones(a.size, bool)
    unstored[index] = False
    arrays = {"values": np.ascontiguousarray(values), "metadata": pack_codes(pos, code_bits(m)),
              **_signs(a.reshape(-1)[unstored], dtype_name(t.dtype))}
    return arrays, {"n": n, "m": m}


def _unpack_codes(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """``count`` codes of ``bits`` bits from a little-endian bit stream (formats.nm's layout)."""
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        return ((packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:count]
    stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (stream.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1, dtype=np.uint16)


def nm_decode(arrays: dict, meta: dict, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    _keys(meta, {"n", "m"})
    m = _int(meta, "m", 2, MAX_M)
    n = _int(meta, "n", 1, m - 1)
    rows, cols = _matrix_shape(shape)
    if cols % m:
        raise ArchiveError(f"{cols} columns (shape {list(shape)}) are not a multiple of m={m}")
    _only(arrays, {"values", "metadata"} | ({"signs"} & set(arrays)))
    slots, bits = rows * cols // m * n, code_bits(m)
    values = _array(arrays, "values", DTYPES[dtype][1], (slots,))
    packed = _array(arrays, "metadata", np.dtype(np.uint8), (-(-slots * bits // 8),))
    if slots * bits % 8 and packed[-1] >> (slots * bits % 8):
        raise ArchiveError("array 'metadata' has padding bits set after its codes")
    codes = _unpack_codes(packed, slots, bits).reshape(-1, n)
    if codes.size and int(codes.max()) >= m:
        raise ArchiveError(f"array 'metadata' holds a position {int(codes.max())} >= m={m}")
    if n > 1 and codes.size and not (np.diff(codes.astype(np.int16), axis=1) > 0).all():
        raise ArchiveError("array 'metadata': the positions of a group must be distinct and increasing")
    index = (np.arange(codes.shape[0], dtype=np.int64)[:, None] * m + codes).reshape(-1)
    out = np.zeros(rows * cols, DTYPES[dtype][1])
    out[index] = values
    if "signs" in arrays:
        unstored = np.ones(rows * cols, bool)
        unstored[index] = False
        _put_signs(arrays, out, np.flatnonzero(unstored), dtype)
    return from_storage(out, dtype, shape)


# int8 (lossy, opt-in): per-output-row symmetric scales (formats.quantized), the zeros exact


def _float_matrix(t: torch.Tensor) -> str | None:
    if t.dim() < 2:
        return f"needs a tensor of at least 2 dimensions (per-output-channel scales), got shape {list(t.shape)}"
    if t.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        return f"quantizes floating-point tensors ({', '.join(FLOATS)}), got {t.dtype}"
    return None


def int8_encode(t: torch.Tensor) -> tuple[dict, dict]:
    problem = _float_matrix(t)
    if problem:
        raise ValueError(f"codec 'bitmask_int8' {problem}")
    w = t.detach().cpu().float().reshape(t.shape[0], -1).numpy()
    nz = w != 0
    q, scale = quantize_int8(w)
    return ({"mask": pack_bits(nz), "values": np.ascontiguousarray(q[nz]), "scale": scale.astype(np.float32)},
            {"nnz": int(nz.sum())})


def int8_decode(arrays: dict, meta: dict, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    if dtype not in FLOATS:
        raise ArchiveError(f"codec 'bitmask_int8' holds floating-point tensors ({', '.join(FLOATS)}), not {dtype}")
    rows, cols = _matrix_shape(shape)
    nnz = _int(_keys(meta, {"nnz"}), "nnz", 0, rows * cols)
    _only(arrays, {"mask", "values", "scale"})
    values = _array(arrays, "values", np.dtype(np.int8), (nnz,))
    scale = _array(arrays, "scale", np.dtype(np.float32), (rows,))
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ArchiveError("array 'scale' must hold finite positive scales")
    bits = _unpack_mask(arrays, "mask", rows * cols)
    if int(bits.sum()) != nnz:
        raise ArchiveError(f"array 'mask' has {int(bits.sum())} bits set, meta 'nnz' says {nnz}")
    out = np.zeros(rows * cols, np.float32)
    out[bits] = values
    out = out.reshape(rows, cols) * scale[:, None]
    return torch.from_numpy(out).to(DTYPES[dtype][0]).reshape(shape)


for _codec in (Codec("dense", dense_encode, dense_decode, True, _any),
               Codec("bits", bits_encode, bits_decode, True, _bool_only),
               Codec("bitmask", bitmask_encode, bitmask_decode, True, _any),
               Codec("nm", nm_encode, nm_decode, True, _nm_fits),
               Codec("bitmask_int8", int8_encode, int8_decode, False, _float_matrix)):
    CODECS.register(_codec.name, _codec)


# ------------------------------------------------------------------ Deep Compression, registered when present

DEEP_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError, AttributeError)


def _register_deep() -> bool:
    """Register ``deep`` from :mod:`sparsenn.compress.deep_compression` if it has ``encode_layer`` and
    ``decode_layer``; True if it is registered."""
    if "deep" in CODECS:
        return True
    try:
        from . import deep_compression
    except ImportError:
        return False
    encode_layer = getattr(deep_compression, "encode_layer", None)
    decode_layer = getattr(deep_compression, "decode_layer", None)
    if not (callable(encode_layer) and callable(decode_layer)):
        return False

    def encode(t: torch.Tensor, **options: Any) -> tuple[dict, dict]:
        return encode_layer(t.detach().cpu(), **options)

    def decode(arrays: dict, meta: dict, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        if dtype not in FLOATS:
            raise ArchiveError(f"codec 'deep' holds floating-point tensors, not {dtype}")
        try:
            out = decode_layer(dict(arrays), meta)
        except ArchiveError:
            raise
        except DEEP_ERRORS as e:
            raise ArchiveError(f"codec 'deep' cannot decode it ({type(e).__name__}: {e})") from None
        if not isinstance(out, torch.Tensor) or out.numel() != math.prod(shape):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ArchiveError(f"codec 'deep' decoded {got}, expected shape {list(shape)}")
        return out.detach().to(DTYPES[dtype][0]).reshape(shape).clone()

    CODECS.register("deep", Codec("deep", encode, decode, False, _float_matrix))
    return True


def get_codec(name: str) -> Codec:
    """The codec registered as ``name`` (``deep`` is registered on first use); UnknownNameError lists the valid ones."""
    if isinstance(name, str) and name.lower() == "deep":
        _register_deep()
    return CODECS.get(name)


def list_codecs() -> list[str]:
    """Registered codec names (``deep`` included when its module provides it)."""
    _register_deep()
    return CODECS.names()


# ------------------------------------------------------------------ the smallest exact codec


def choose(t: torch.Tensor, min_sparsity: float = 0.0) -> tuple[str, dict[str, int]]:
    """``(codec, options)``: the exact codec storing ``t`` in the fewest bytes. ``bits`` for bool tensors;
    ``bitmask`` or ``nm`` only if at least ``min_sparsity`` of the entries are zero; ties go to ``dense``,
    then ``bitmask``."""
    if t.dtype == torch.bool:
        return "bits", {}
    numel, item = t.numel(), t.element_size()
    dense = numel * item
    if not numel:
        return "dense", {}
    nz = nonzero(t).reshape(-1)
    nnz = int(nz.sum())
    if 1 - nnz / numel < min_sparsity:
        return "dense", {}
    best = ("dense", {}, dense)
    signs = -(-(numel - nnz) // 8) if _signs(to_storage(t).reshape(-1)[~nz], dtype_name(t.dtype)) else 0
    bitmask = -(-numel // 8) + nnz * item + signs
    if bitmask < best[2]:
        best = ("bitmask", {}, bitmask)
    if t.dim() >= 2 and nnz / numel <= 0.5:
        found = best_nm(t)
        if found is not None and nm_bytes(numel, item, *found) + signs < best[2]:
            best = ("nm", {"n": found[0], "m": found[1]}, nm_bytes(numel, item, *found) + signs)
    return best[0], best[1]


__all__ = ["CODECS", "DTYPES", "NM_PATTERNS", "Codec", "choose", "dtype_name", "from_storage", "get_codec",
           "list_codecs", "nonzero", "nonzero_of", "to_storage"]
