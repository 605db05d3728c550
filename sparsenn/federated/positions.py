"""Index encodings for the positions a message carries, with their exact sizes.

A message sends ``k`` of the ``universe`` entries of a tensor (all its entries, or the kept
entries of a mask both sides know). Their sorted positions are written in one of four ways:

* ``all``: nothing (every entry is sent, ``k == universe``);
* ``bitmask``: one bit per entry of the universe, ``ceil(universe / 8)`` bytes;
* ``int32``: each position as a little-endian 32-bit integer, ``4 k`` bytes;
* ``golomb``: the gaps between positions, Golomb-Rice coded with parameter ``2**b``, as for the
  sparse updates of Sparse Ternary Compression (Sattler et al. 2019, "Robust and
  Communication-Efficient Federated Learning from Non-IID Data", Sec. IV-B; Golomb 1966). A gap
  ``g`` (positions skipped since the previous one) is the quotient ``g >> b`` in unary (that
  many 0 bits, then a 1) and the remainder in ``b`` bits. All quotients come first, then all
  remainders, so both halves decode with array operations; the bit count is the interleaved
  code's, ``sum(g >> b) + k * (b + 1)``, padded once to whole bytes (most significant bit first,
  padding bits zero). ``b`` is chosen per message as the one with the fewest bits.

:func:`cheapest` picks the encoding with the fewest bytes. Decoding treats every byte as hostile:
lengths, counts, padding bits and positions are checked, and a failure raises
:class:`MessageError` naming what is wrong.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INDEX_ENCODINGS", "MAX_RICE_BITS", "MessageError", "cheapest", "decode_positions", "encode_positions",
           "encoded_size"]

INDEX_ENCODINGS = ("all", "bitmask", "int32", "golomb")  # the wire code is the position in this tuple
MAX_RICE_BITS = 31  # gaps are < 2**31 (a universe has at most 2**31 - 1 entries)


class MessageError(ValueError):
    """A message (or its index section) is malformed: wrong length, bad code, position out of range, ..."""


def _gaps(positions: np.ndarray) -> np.ndarray:
    return np.diff(positions, prepend=-1) - 1


def _golomb_bits(gaps: np.ndarray, b: int) -> int:
    return int((gaps >> b).sum()) + gaps.size * (b + 1)


def best_rice_bits(gaps: np.ndarray) -> int:
    """The Rice parameter ``b`` (code ``2**b``) with the fewest bits for these gaps; the smallest on ties."""
    if gaps.size == 0:
        return 0
    top = max(int(gaps.max()).bit_length(), 1)
    return min(range(min(top, MAX_RICE_BITS) + 1), key=lambda b: (_golomb_bits(gaps, b), b))


def encoded_size(encoding: str, positions: np.ndarray, universe: int, rice_bits: int | None = None) -> int:
    """Bytes of ``positions`` (sorted, int64) written as ``encoding``; the length :func:`encode_positions` returns."""
    k = positions.size
    if encoding == "all":
        return 0
    if encoding == "bitmask":
        return (universe + 7) // 8
    if encoding == "int32":
        return 4 * k
    if encoding == "golomb":
        gaps = _gaps(positions)
        b = best_rice_bits(gaps) if rice_bits is None else rice_bits
        return (_golomb_bits(gaps, b) + 7) // 8
    raise ValueError(f"unknown index encoding {encoding!r}; valid encodings: {', '.join(INDEX_ENCODINGS)}")


def cheapest(positions: np.ndarray, universe: int) -> str:
    """The encoding with the fewest bytes for these positions (``all`` when every entry is sent)."""
    if positions.size == universe:
        return "all"
    sizes = {e: encoded_size(e, positions, universe) for e in ("bitmask", "int32", "golomb")}
    return min(sizes, key=sizes.get)


def encode_positions(encoding: str, positions: np.ndarray, universe: int) -> tuple[bytes, int]:
    """``(index bytes, rice_bits)`` for sorted, distinct ``positions`` in ``[0, universe)``."""
    k = positions.size
    if encoding == "all":
        if k != universe:
            raise ValueError(f"index encoding 'all' sends every entry: {k} positions for a universe of {universe}")
        return b"", 0
    if encoding == "bitmask":
        bits = np.zeros(universe, dtype=bool)
        bits[positions] = True
        return np.packbits(bits).tobytes(), 0
    if encoding == "int32":
        return positions.astype("<u4").tobytes(), 0
    if encoding == "golomb":
        gaps = _gaps(positions)
        b = best_rice_bits(gaps)
        quotients = gaps >> b
        unary = np.zeros(int(quotients.sum()) + k, dtype=np.uint8)
        unary[np.cumsum(quotients + 1) - 1] = 1  # each quotient: that many 0s, then a 1
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        remainders = ((gaps[:, None] >> shifts) & 1).astype(np.uint8).ravel()
        return np.packbits(np.concatenate([unary, remainders])).tobytes(), b
    raise ValueError(f"unknown index encoding {encoding!r}; valid encodings: {', '.join(INDEX_ENCODINGS)}")


def _zero_padding(bits: np.ndarray, used: int, what: str) -> None:
    if bits[used:].any():
        raise MessageError(f"{what}: padding bits after the last of {used} bits are not zero")


def decode_positions(encoding: str, data: bytes, k: int, universe: int, rice_bits: int) -> np.ndarray:
    """The ``k`` sorted positions (int64) in ``data``; every length, padding bit and position checked."""
    if encoding == "all":
        if data or k != universe:
            raise MessageError(f"index 'all' must be empty and send all {universe} entries; "
                               f"got {len(data)} index bytes and {k} entries")
        return np.arange(universe, dtype=np.int64)
    if encoding == "bitmask":
        if len(data) != (universe + 7) // 8:
            raise MessageError(f"bitmask of {len(data)} bytes for a universe of {universe} entries "
                               f"(expected {(universe + 7) // 8})")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        _zero_padding(bits, universe, "bitmask")
        positions = np.flatnonzero(bits).astype(np.int64)
        if positions.size != k:
            raise MessageError(f"bitmask has {positions.size} bits set, the header says {k} entries")
        return positions
    if encoding == "int32":
        if len(data) != 4 * k:
            raise MessageError(f"int32 index of {len(data)} bytes for {k} entries (expected {4 * k})")
        positions = np.frombuffer(data, dtype="<u4").astype(np.int64)
        if k and (positions[-1] >= universe or (k > 1 and (np.diff(positions) <= 0).any())):
            raise MessageError(f"int32 positions must be strictly increasing and below {universe}")
        return positions
    if encoding == "golomb":
        return _decode_golomb(data, k, universe, rice_bits)
    raise MessageError(f"unknown index encoding {encoding!r}; valid encodings: {', '.join(INDEX_ENCODINGS)}")


def _decode_golomb(data: bytes, k: int, universe: int, b: int) -> np.ndarray:
    if not 0 <= b <= MAX_RICE_BITS:
        raise MessageError(f"Rice parameter {b} outside [0, {MAX_RICE_BITS}]")
    if k == 0:
        if data:
            raise MessageError(f"a Golomb index of 0 entries must be empty, got {len(data)} bytes")
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    ends = np.flatnonzero(bits)[:k]  # the 1 that ends each unary quotient
    if ends.size < k:
        raise MessageError(f"Golomb index ends after {ends.size} of {k} quotients")
    quotients = np.diff(ends, prepend=-1) - 1
    if quotients.max() > (universe - 1) >> b:  # checked before shifting: no overflow, no gap past the universe
        raise MessageError(f"Golomb gap past the universe of {universe} entries")
    start = int(ends[-1]) + 1
    used = start + k * b
    if (used + 7) // 8 != len(data):
        raise MessageError(f"Golomb index of {len(data)} bytes, its codes take {(used + 7) // 8}")
    _zero_padding(bits, used, "Golomb index")
    weights = np.left_shift(np.int64(1), np.arange(b - 1, -1, -1, dtype=np.int64))
    remainders = bits[start:used].reshape(k, b).astype(np.int64) @ weights if b else np.zeros(k, dtype=np.int64)
    positions = np.cumsum((quotients << b | remainders) + 1) - 1  # gaps < 2**32, k < 2**31: no overflow
    if positions[-1] >= universe:
        raise MessageError(f"Golomb position {int(positions[-1])} outside a universe of {universe} entries")
    return positions
