"""Encoded messages: one tensor's update (or mask) as bytes, with an exact byte count.

A :class:`Message` is what crosses the network for one tensor: a header, the positions it
carries (:mod:`~sparsenn.federated.positions`: none, bitmask, int32 or Golomb-coded gaps,
the cheapest by default) and the values (float32 each, or ternary: one float32 magnitude and
one sign bit per entry, Sattler et al. 2019). ``message.nbytes`` is ``len(message.data)``.

Positions count entries of a *universe*: every entry of the tensor, or, when both sides know
a mask (a sparse model whose mask the server fixes), only the mask's kept entries in
flattened order, so a dense update of a 90%-sparse layer costs its kept values and no index.

Header (little-endian): ``b"SF"``, version (u8), flags (u8: 1 ternary values, 2 positions
relative to a known mask, 4 positions only, a mask), index encoding (u8), Rice parameter (u8),
ndim (u8), the shape (u32 each), the entry count (u32) and the index length in bytes (u32):
``15 + 4 * ndim`` bytes.

:func:`decode` treats the bytes as hostile until checked: every header field, the exact total
length, the index and the values are validated against what the receiver expects (shape, mask)
before the output tensor is allocated; any failure raises :class:`MessageError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from .positions import (
    INDEX_ENCODINGS,
    MessageError,
    cheapest,
    decode_positions,
    encode_positions,
)

__all__ = ["MAX_NDIM", "MAX_NUMEL", "Message", "MessageError", "decode", "decode_mask", "encode", "encode_mask",
           "encode_ternary", "parse"]

MAGIC, VERSION = b"SF", 1
TERNARY, MASKED, MASK_ONLY = 1, 2, 4
MAX_NDIM = 8
MAX_NUMEL = 2**31 - 1  # positions and counts are u32 on the wire; gaps stay below 2**32
_FIXED = struct.Struct("<2sBBBBB")


@dataclass(frozen=True)
class Message:
    """One encoded tensor: ``data`` is exactly what is sent; the other fields are read from its header."""

    data: bytes
    shape: tuple[int, ...]
    count: int  # entries sent
    index: str  # index encoding
    ternary: bool
    masked: bool  # positions relative to a mask both sides know
    mask_only: bool  # a mask (positions, no values)
    rice_bits: int = 0  # the Golomb-Rice parameter (index "golomb")
    index_bytes: int = 0  # length of the index section

    @property
    def nbytes(self) -> int:
        return len(self.data)


def _universe(shape: tuple[int, ...], mask: torch.Tensor | None) -> int:
    if mask is None:
        return int(np.prod(shape, dtype=np.int64))
    if tuple(mask.shape) != tuple(shape) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(shape)}, got {mask.dtype} {tuple(mask.shape)}")
    return int(mask.sum())


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) > MAX_NDIM or any(s < 0 for s in shape) or int(np.prod(shape, dtype=np.int64)) > MAX_NUMEL:
        raise ValueError(f"shape {shape}: at most {MAX_NDIM} dimensions and {MAX_NUMEL} entries")
    return shape


def _positions(positions, universe: int) -> np.ndarray:
    pos = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions, dtype=np.int64).ravel()
    if pos.size and (pos[0] < 0 or pos[-1] >= universe or (np.diff(pos) <= 0).any()):
        raise ValueError(f"positions must be strictly increasing in [0, {universe})")
    return pos


def _assemble(shape, pos: np.ndarray, universe: int, index: str, flags: int, values: bytes) -> Message:
    if index == "auto":
        index = cheapest(pos, universe)
    if index not in INDEX_ENCODINGS:
        raise ValueError(f"unknown index encoding {index!r}; valid encodings: auto, {', '.join(INDEX_ENCODINGS)}")
    index_bytes, rice = encode_positions(index, pos, universe)
    header = _FIXED.pack(MAGIC, VERSION, flags, INDEX_ENCODINGS.index(index), rice, len(shape))
    header += struct.pack(f"<{len(shape)}III", *shape, pos.size, len(index_bytes))
    return Message(header + index_bytes + values, shape, int(pos.size), index, bool(flags & TERNARY),
                   bool(flags & MASKED), bool(flags & MASK_ONLY), rice, len(index_bytes))


def _float32(values: torch.Tensor, k: int) -> np.ndarray:
    out = values.detach().to("cpu", torch.float32).numpy().astype("<f4").ravel()
    if out.size != k:
        raise ValueError(f"{out.size} values for {k} positions")
    if not np.isfinite(out).all():
        raise ValueError("values must be finite in float32 (NaN, Inf or beyond the float32 range found)")
    return out


def encode(shape, positions, values: torch.Tensor, *, mask: torch.Tensor | None = None,
           index: str = "auto") -> Message:
    """``values`` (float32 on the wire) at sorted ``positions`` of the universe (see module doc).

    ``index``: ``"auto"`` (the fewest bytes) or one of ``all``, ``bitmask``, ``int32``, ``golomb``.
    """
    shape = _check_shape(shape)
    universe = _universe(shape, mask)
    pos = _positions(positions, universe)
    return _assemble(shape, pos, universe, index, MASKED if mask is not None else 0,
                     _float32(values, pos.size).tobytes())


def encode_ternary(shape, positions, negative: torch.Tensor, magnitude: float, *, mask: torch.Tensor | None = None,
                   index: str = "auto") -> Message:
    """``+magnitude`` or ``-magnitude`` (where ``negative``) at ``positions``: 4 bytes plus one bit per entry."""
    shape = _check_shape(shape)
    universe = _universe(shape, mask)
    pos = _positions(positions, universe)
    signs = np.asarray(negative.cpu() if isinstance(negative, torch.Tensor) else negative, dtype=bool).ravel()
    if signs.size != pos.size:
        raise ValueError(f"{signs.size} signs for {pos.size} positions")
    mu = np.array([magnitude], dtype="<f4")
    if not (np.isfinite(mu).all() and mu[0] >= 0):
        raise ValueError(f"ternary magnitude must be finite and >= 0 in float32, got {magnitude!r}")
    flags = TERNARY | (MASKED if mask is not None else 0)
    return _assemble(shape, pos, universe, index, flags, mu.tobytes() + np.packbits(signs).tobytes())


def encode_mask(mask: torch.Tensor, *, index: str = "auto") -> Message:
    """A mask as a message: its kept positions, no values (the cheapest index: a bitmask, typically)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    shape = _check_shape(mask.shape)
    pos = np.flatnonzero(mask.cpu().numpy().ravel()).astype(np.int64)
    return _assemble(shape, pos, mask.numel(), index, MASK_ONLY, b"")


def _value_bytes(flags: int, k: int) -> int:
    if flags & MASK_ONLY:
        return 0
    return 4 + (k + 7) // 8 if flags & TERNARY else 4 * k


def parse(data, *, shape=None, mask: torch.Tensor | None = None, max_numel: int = MAX_NUMEL) -> Message:
    """Check the header and the total length of ``data`` against what the receiver expects.

    ``shape``: the tensor the receiver expects (a message for another shape is refused); without
    it the header's shape is accepted up to ``max_numel`` entries. ``mask``: the mask the receiver
    holds for this tensor; a message relative to a mask needs it, and a receiver that holds a mask
    accepts only messages relative to it.
    """
    if isinstance(data, Message):
        data = data.data
    data = bytes(data)
    if len(data) < _FIXED.size:
        raise MessageError(f"message of {len(data)} bytes is shorter than the {_FIXED.size}-byte header")
    magic, version, flags, code, rice, ndim = _FIXED.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise MessageError(f"not a sparsenn federated message (magic {magic!r}, version {version}; "
                           f"expected {MAGIC!r}, {VERSION})")
    if flags & ~(TERNARY | MASKED | MASK_ONLY) or (flags & MASK_ONLY and flags != MASK_ONLY):
        raise MessageError(f"invalid flags {flags:#x}")
    if code >= len(INDEX_ENCODINGS):
        raise MessageError(f"unknown index code {code}; valid codes: 0..{len(INDEX_ENCODINGS) - 1} "
                           f"({', '.join(INDEX_ENCODINGS)})")
    index = INDEX_ENCODINGS[code]
    if index != "golomb" and rice:
        raise MessageError(f"Rice parameter {rice} set for index {index!r}")
    if ndim > MAX_NDIM:
        raise MessageError(f"{ndim} dimensions; at most {MAX_NDIM}")
    head = _FIXED.size + 4 * ndim + 8
    if len(data) < head:
        raise MessageError(f"message of {len(data)} bytes is shorter than its {head}-byte header")
    *dims, k, index_len = struct.unpack_from(f"<{ndim}III", data, _FIXED.size)
    got = tuple(dims)
    if shape is not None and got != tuple(int(s) for s in shape):
        raise MessageError(f"message for shape {got}, expected {tuple(int(s) for s in shape)}")
    numel = int(np.prod(got, dtype=np.int64))
    if numel > min(max_numel, MAX_NUMEL):
        raise MessageError(f"message for {numel} entries; at most {min(max_numel, MAX_NUMEL)}")
    if mask is not None and tuple(mask.shape) != got:
        raise MessageError(f"message for shape {got}, the receiver's mask has shape {tuple(mask.shape)}")
    if bool(flags & MASKED) != (mask is not None) and not flags & MASK_ONLY:
        raise MessageError("message relative to a mask, but the receiver has none" if flags & MASKED else
                           "the receiver holds a mask for this tensor; the message must be relative to it")
    universe = numel if not flags & MASKED else _universe(got, mask)
    if k > universe:
        raise MessageError(f"{k} entries in a universe of {universe}")
    expected = head + index_len + _value_bytes(flags, k)
    if len(data) != expected:
        raise MessageError(f"message of {len(data)} bytes; its header describes {expected}")
    return Message(data, got, k, index, bool(flags & TERNARY), bool(flags & MASKED), bool(flags & MASK_ONLY), rice,
                   index_len)


def _sections(msg: Message, mask: torch.Tensor | None) -> tuple[np.ndarray, bytes]:
    start = _FIXED.size + 4 * len(msg.shape) + 8
    end = start + msg.index_bytes
    universe = _universe(msg.shape, mask) if msg.masked else int(np.prod(msg.shape, dtype=np.int64))
    return decode_positions(msg.index, msg.data[start:end], msg.count, universe, msg.rice_bits), msg.data[end:]


def decode(data, *, shape=None, mask: torch.Tensor | None = None, max_numel: int = MAX_NUMEL) -> torch.Tensor:
    """The dense float32 tensor a message describes (zeros where it sends nothing); checks as :func:`parse`."""
    msg = parse(data, shape=shape, mask=mask, max_numel=max_numel)
    if msg.mask_only:
        raise MessageError("this message is a mask; decode it with decode_mask")
    pos, raw = _sections(msg, mask)
    if msg.ternary:
        mu = np.frombuffer(raw[:4], dtype="<f4")[0]
        if not (np.isfinite(mu) and mu >= 0):
            raise MessageError(f"ternary magnitude {mu} must be finite and >= 0")
        signs = np.unpackbits(np.frombuffer(raw[4:], dtype=np.uint8))
        if signs[msg.count:].any():
            raise MessageError("ternary sign padding bits are not zero")
        values = np.where(signs[:msg.count].astype(bool), -mu, mu).astype(np.float32)
    else:
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(values).all():
            raise MessageError("message values must be finite (NaN or Inf found)")
    flat = torch.zeros(int(np.prod(msg.shape, dtype=np.int64)), dtype=torch.float32)
    where = torch.from_numpy(pos)
    if msg.masked:
        where = mask.reshape(-1).nonzero().squeeze(1)[where]
    flat[where] = torch.from_numpy(values)
    return flat.reshape(msg.shape)


def decode_mask(data, *, shape=None, max_numel: int = MAX_NUMEL) -> torch.Tensor:
    """The bool mask an :func:`encode_mask` message describes; checks as :func:`parse`."""
    msg = parse(data, shape=shape, max_numel=max_numel)
    if not msg.mask_only:
        raise MessageError("this message carries values, not a mask; decode it with decode")
    pos, _ = _sections(msg, None)
    flat = torch.zeros(int(np.prod(msg.shape, dtype=np.int64)), dtype=torch.bool)
    flat[torch.from_numpy(pos)] = True
    return flat.reshape(msg.shape)
