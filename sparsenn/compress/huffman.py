"""Canonical Huffman codes: code lengths from frequencies, encoding to bytes, checked decoding.

Deep Compression (Han, Mao & Dally 2016, Sec. 4) Huffman-codes the cluster indices and the
relative sparse indices of every layer. The codes here are canonical (RFC 1951, Sec. 3.2.2:
shorter codes first, equal lengths in symbol order), so a table is just one code length per
symbol (``uint8``, 0 = symbol unused). Bits are written most significant first; the last
byte is padded with zero bits.

A table or a stream may come from a stranger: :func:`decode` checks the table first (every
length <= :data:`MAX_CODE_LENGTH`; the lengths form a complete prefix code, or a single
symbol of length 1), that ``count`` symbols can fit in the stream at all, then decodes and
rejects an invalid code, a truncated stream, trailing bytes or non-zero padding, always with
:class:`~sparsenn.backend.runtime.errors.ArchiveError`.
"""

from __future__ import annotations

import heapq
import threading

import numpy as np

from ..backend.runtime.errors import ArchiveError

__all__ = ["MAX_CODE_LENGTH", "canonical_codes", "check_code_lengths", "code_lengths", "coded_bits", "decode",
           "encode"]

MAX_CODE_LENGTH = 32  # longest code a table may hold; longer optimal codes are flattened (see code_lengths)

_kernels: dict[str, object] = {}
_lock = threading.Lock()


def code_lengths(frequencies, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (``uint8``, 0 for an unused symbol) for ``frequencies`` (one count per symbol).

    Optimal (Huffman 1952) unless the optimal code is longer than ``max_length``: then the counts are
    halved (rounding up, a used symbol stays used) until it fits, a common length-limiting heuristic.
    One used symbol gets length 1 (its code is ``0``), as in RFC 1951.
    """
    freq = np.asarray(frequencies)
    if freq.ndim != 1 or (freq.size and (not np.issubdtype(freq.dtype, np.integer) or freq.min() < 0)):
        raise ValueError(f"frequencies must be a 1-D array of non-negative integers, got {freq.dtype} "
                         f"of shape {freq.shape}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= MAX_CODE_LENGTH:
        raise ValueError(f"max_length must be an int in [1, {MAX_CODE_LENGTH}], got {max_length!r}")
    used = np.flatnonzero(freq)
    if used.size > (1 << max_length):
        raise ValueError(f"{used.size} used symbols cannot have codes of at most {max_length} bits")
    lengths = np.zeros(freq.size, dtype=np.uint8)
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    counts = [int(c) for c in freq[used]]
    while True:
        depth = _huffman_depths(counts)
        if max(depth, default=0) <= max_length:
            lengths[used] = depth
            return lengths
        counts = [(c + 1) // 2 for c in counts]


def _huffman_depths(counts: list[int]) -> list[int]:
    """Depth of every leaf of a Huffman tree over ``counts`` (ties broken by insertion order)."""
    heap = [(c, i, (i,)) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    depth = [0] * len(counts)
    order = len(counts)
    while len(heap) > 1:
        c1, _, leaves1 = heapq.heappop(heap)
        c2, _, leaves2 = heapq.heappop(heap)
        for leaf in leaves1 + leaves2:
            depth[leaf] += 1
        heapq.heappush(heap, (c1 + c2, order, leaves1 + leaves2))
        order += 1
    return depth


def check_code_lengths(lengths, what: str = "Huffman table") -> np.ndarray:
    """``lengths`` as ``int64`` if it is a valid canonical table, else :class:`ArchiveError` naming ``what``.

    Valid: a 1-D ``uint8`` array, every length <= :data:`MAX_CODE_LENGTH`, and the used lengths form a
    complete prefix code (Kraft sum exactly 1), or one symbol of length 1, or no symbol at all.
    """
    if not isinstance(lengths, np.ndarray) or lengths.dtype != np.uint8 or lengths.ndim != 1:
        got = f"{lengths.dtype} array of shape {lengths.shape}" if isinstance(lengths, np.ndarray) \
            else type(lengths).__name__
        raise ArchiveError(f"{what}: code lengths must be a 1-D uint8 array, got {got}")
    out = lengths.astype(np.int64)
    if out.size and out.max() > MAX_CODE_LENGTH:
        bad = int(np.argmax(out))
        raise ArchiveError(f"{what}: symbol {bad} has a code of {out[bad]} bits; at most {MAX_CODE_LENGTH} allowed")
    used = out[out > 0]
    if used.size == 0 or (used.size == 1 and used[0] == 1):
        return out
    kraft = sum(int(n) << (MAX_CODE_LENGTH - int(length)) for length, n in zip(*np.unique(used, return_counts=True)))
    if kraft > 1 << MAX_CODE_LENGTH:
        raise ArchiveError(f"{what}: the code lengths are over-subscribed (Kraft sum "
                           f"{kraft / (1 << MAX_CODE_LENGTH):.6g} > 1): no prefix code has them")
    if kraft < 1 << MAX_CODE_LENGTH:
        raise ArchiveError(f"{what}: the code lengths are incomplete (Kraft sum "
                           f"{kraft / (1 << MAX_CODE_LENGTH):.6g} < 1): some bit strings decode to nothing")
    return out


def canonical_codes(lengths) -> np.ndarray:
    """The canonical code of every symbol (``uint64``; 0 for unused ones), RFC 1951 Sec. 3.2.2."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint64)
    code = 0
    previous = 0
    for symbol in np.lexsort((np.arange(lengths.size), lengths)):  # by length, then symbol
        length = int(lengths[symbol])
        if length == 0:
            continue
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
    return codes


def coded_bits(symbols, lengths) -> int:
    """Bits the symbols take under ``lengths``: sum over symbols of freq * length."""
    symbols = np.asarray(symbols, dtype=np.int64)
    return int(np.asarray(lengths, dtype=np.int64)[symbols].sum()) if symbols.size else 0


def encode(symbols, lengths) -> np.ndarray:
    """``symbols`` (ints in ``[0, len(lengths))``, each with a code) as a ``uint8`` stream, MSB first.

    The stream is ``ceil(coded_bits / 8)`` bytes; the padding bits of the last byte are zero.
    """
    table = check_code_lengths(np.asarray(lengths, dtype=np.uint8) if not isinstance(lengths, np.ndarray)
                               else lengths)
    symbols = np.ascontiguousarray(symbols, dtype=np.int64).ravel()
    if symbols.size:
        low, high = int(symbols.min()), int(symbols.max())
        if low < 0 or high >= table.size:
            raise ValueError(f"symbols must lie in [0, {table.size}), got {low if low < 0 else high}")
        unused = symbols[table[symbols] == 0]
        if unused.size:
            raise ValueError(f"symbol {int(unused[0])} has no code in this table (its length is 0)")
    codes = canonical_codes(table)
    total = coded_bits(symbols, table)
    out = np.zeros((total + 7) // 8, dtype=np.uint8)
    _kernel("encode")(symbols, table, codes.astype(np.int64), out)
    return out


def decode(stream, lengths, count: int, what: str = "Huffman stream") -> np.ndarray:
    """``count`` symbols (``int64``) from ``stream`` under the canonical table ``lengths``; everything checked.

    :class:`ArchiveError` (naming ``what``) for a bad table, a ``count`` the stream cannot hold, an
    invalid code, a stream that ends early, bytes left over, or non-zero padding bits.
    """
    table = check_code_lengths(lengths, what)
    if not isinstance(stream, np.ndarray) or stream.dtype != np.uint8 or stream.ndim != 1:
        raise ArchiveError(f"{what}: the stream must be a 1-D uint8 array")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ArchiveError(f"{what}: the symbol count must be an integer >= 0, got {count!r}")
    count = int(count)
    used = np.flatnonzero(table)
    shortest = int(table[used].min()) if used.size else 0
    if count and not used.size:
        raise ArchiveError(f"{what}: {count} symbols but the table has no codes")
    if count * shortest > 8 * stream.size:  # checked before anything is allocated
        raise ArchiveError(f"{what}: {count} symbols of at least {shortest} bits cannot fit in {stream.size} bytes")
    counts = np.bincount(table, minlength=MAX_CODE_LENGTH + 1).astype(np.int64)
    counts[0] = 0
    by_code = np.lexsort((np.arange(table.size), table))
    by_code = by_code[table[by_code] > 0].astype(np.int64)
    out = np.empty(count, dtype=np.int64)
    status, bits = _kernel("decode")(np.ascontiguousarray(stream), counts, by_code, out)
    if status == -1:
        raise ArchiveError(f"{what}: invalid code at bit {bits} (no symbol has it)")
    if status == -2:
        raise ArchiveError(f"{what}: truncated: the stream ends at bit {bits} before {count} symbols were read")
    if (bits + 7) // 8 != stream.size:
        raise ArchiveError(f"{what}: {stream.size - (bits + 7) // 8} trailing bytes after {count} symbols")
    if bits % 8 and int(stream[-1]) & ((1 << (8 - bits % 8)) - 1):
        raise ArchiveError(f"{what}: the padding bits after the last symbol are not zero")
    return out


def _encode_loop(symbols, lengths, codes, out):  # pragma: no cover - compiled
    bit = 0
    for i in range(symbols.size):
        s = symbols[i]
        n = lengths[s]
        c = codes[s]
        for j in range(n - 1, -1, -1):
            if (c >> j) & 1:
                out[bit >> 3] |= np.uint8(1 << (7 - (bit & 7)))
            bit += 1


def _decode_loop(stream, counts, by_code, out):  # pragma: no cover - compiled
    """Canonical decoding one bit at a time (as zlib's puff.c): returns (status, bits read)."""
    total = stream.size * 8
    bit = 0
    for i in range(out.size):
        code = 0
        first = 0
        index = 0
        found = False
        for length in range(1, counts.size):
            if bit >= total:
                return -2, bit
            code |= (stream[bit >> 3] >> (7 - (bit & 7))) & 1
            bit += 1
            n = counts[length]
            if code - first < n:
                out[i] = by_code[index + code - first]
                found = True
                break
            index += n
            first = (first + n) << 1
            code <<= 1
        if not found:
            return -1, bit
    return 0, bit


def _kernel(name: str):
    """The compiled loop ``name`` (``"encode"`` / ``"decode"``), compiled once, cached on disk when possible."""
    k = _kernels.get(name)
    if k is None:
        with _lock:
            k = _kernels.get(name)
            if k is None:
                k = _kernels[name] = _compile(name)
    return k


def _compile(name: str):
    import numba
    from numba import types

    i64 = types.int64[::1]
    if name == "encode":
        fn, sig = _encode_loop, types.void(i64, i64, i64, types.uint8[::1])
    else:
        fn, sig = _decode_loop, types.UniTuple(types.int64, 2)(types.uint8[::1], i64, i64, i64)
    try:
        return numba.njit(sig, cache=True)(fn)
    except RuntimeError:  # no writable cache location: compile in memory
        return numba.njit(sig, cache=False)(fn)
