"""Canonical Huffman coding and relative indices with padding fillers (Deep Compression, Han et al. 2016)."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.compress import huffman
from sparsenn.compress.relative_index import (
    count_entries,
    entry_positions,
    relative_indices,
)


def kraft(lengths) -> float:
    return sum(2.0 ** -int(n) for n in lengths if n)


def reference_cost(freqs) -> int:
    """Cost of an optimal prefix code: the sum of every merged weight of Huffman's algorithm."""
    heap = [int(f) for f in freqs if f]
    if len(heap) == 1:
        return heap[0]  # one symbol: one bit each
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def test_hand_case_lengths_codes_and_bits():
    # merges 1+1, 2+2, 4+5, 9+10: depths 10 -> 1, 5 -> 2, 2 -> 3, 1 and 1 -> 4
    lengths = huffman.code_lengths(np.array([5, 1, 1, 2, 0, 10]))
    assert lengths.tolist() == [2, 4, 4, 3, 0, 1]
    # canonical (RFC 1951): 5 -> 0, 0 -> 10, 3 -> 110, 1 -> 1110, 2 -> 1111
    assert huffman.canonical_codes(lengths).tolist() == [0b10, 0b1110, 0b1111, 0b110, 0, 0b0]
    symbols = np.array([0, 5, 5, 3, 1, 2, 5, 0])
    stream = huffman.encode(symbols, lengths)
    # 10 0 0 110 1110 1111 0 10 -> 10001101 11011110 10000000
    assert stream.tolist() == [0b10001101, 0b11011110, 0b10000000]
    assert huffman.coded_bits(symbols, lengths) == 18
    assert huffman.decode(stream, lengths, 8).tolist() == symbols.tolist()


def test_single_symbol_gets_one_bit_and_empty_input():
    lengths = huffman.code_lengths(np.array([0, 7, 0]))
    assert lengths.tolist() == [0, 1, 0]
    stream = huffman.encode(np.full(7, 1), lengths)
    assert stream.tolist() == [0]
    assert huffman.decode(stream, lengths, 7).tolist() == [1] * 7
    empty = huffman.code_lengths(np.zeros(4, dtype=np.int64))
    assert huffman.encode(np.zeros(0, dtype=np.int64), empty).size == 0
    assert huffman.decode(np.zeros(0, dtype=np.uint8), empty, 0).size == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=400), st.integers(41, 60))
def test_round_trip_and_optimal_size(symbols, alphabet):
    symbols = np.array(symbols)
    freqs = np.bincount(symbols, minlength=alphabet)
    lengths = huffman.code_lengths(freqs)
    stream = huffman.encode(symbols, lengths)
    assert huffman.decode(stream, lengths, symbols.size).tolist() == symbols.tolist()
    bits = int((freqs * lengths.astype(np.int64)).sum())
    assert bits == huffman.coded_bits(symbols, lengths) == reference_cost(freqs)
    assert stream.size == (bits + 7) // 8
    used = np.count_nonzero(freqs)
    assert kraft(lengths) == (0.5 if used == 1 else 1.0)


def test_length_limit_flattens_a_fibonacci_distribution():
    fib = [1, 1]
    while len(fib) < 20:
        fib.append(fib[-1] + fib[-2])
    freqs = np.array(fib)
    assert huffman.code_lengths(freqs).max() == 19  # the optimal code is 19 bits deep
    lengths = huffman.code_lengths(freqs, max_length=7)
    assert lengths.max() <= 7 and kraft(lengths) == 1.0
    symbols = np.repeat(np.arange(20), 3)
    assert huffman.decode(huffman.encode(symbols, lengths), lengths, symbols.size).tolist() == symbols.tolist()


@pytest.mark.parametrize("lengths, words", [
    ([33, 1], "at most 32"),
    ([1, 1, 1], "over-subscribed"),
    ([1, 2, 0], "incomplete"),
    ([2], "incomplete"),
])
def test_hostile_tables(lengths, words):
    with pytest.raises(ArchiveError, match=words):
        huffman.decode(np.zeros(4, dtype=np.uint8), np.array(lengths, dtype=np.uint8), 1)


def test_hostile_streams():
    lengths = np.array([1, 2, 2], dtype=np.uint8)  # 0, 10, 11
    good = huffman.encode(np.array([1, 2, 0, 0, 1, 0]), lengths)  # 10 11 0 0 10 0 -> 9 bits
    assert good.size == 2
    with pytest.raises(ArchiveError, match="uint8"):
        huffman.decode(good.astype(np.int16), lengths, 6)
    with pytest.raises(ArchiveError, match="uint8"):
        huffman.decode(good, lengths.astype(np.int64), 6)
    with pytest.raises(ArchiveError, match="truncated"):
        huffman.decode(good[:1], lengths, 6)
    with pytest.raises(ArchiveError, match="trailing"):
        huffman.decode(np.append(good, np.uint8(0)), lengths, 6)
    with pytest.raises(ArchiveError, match="padding"):
        huffman.decode(good | np.array([0, 1], dtype=np.uint8), lengths, 6)
    with pytest.raises(ArchiveError, match="cannot fit"):  # refused before anything is allocated
        huffman.decode(good, lengths, 10**15)
    with pytest.raises(ArchiveError, match="integer"):
        huffman.decode(good, lengths, -1)
    single = np.array([0, 1], dtype=np.uint8)  # one symbol, code 0: a 1 bit is no code
    with pytest.raises(ArchiveError, match="invalid code|truncated"):
        huffman.decode(np.array([0b01000000], dtype=np.uint8), single, 2)
    with pytest.raises(ArchiveError, match="no codes"):
        huffman.decode(good, np.zeros(3, dtype=np.uint8), 1)


def test_encoder_rejects_symbols_without_code():
    lengths = np.array([1, 1, 0], dtype=np.uint8)
    with pytest.raises(ValueError, match="no code"):
        huffman.encode(np.array([2]), lengths)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        huffman.encode(np.array([3]), lengths)
    with pytest.raises(ValueError, match="non-negative"):
        huffman.code_lengths(np.array([1, -1]))


# ------------------------------------------------------------------ relative indices


def test_paper_figure_2():
    # 3-bit indices, kept weights at 1, 4 and 15: a filler at 12 (the paper's differences 1, 3, 8, 3)
    gaps, filler = relative_indices(np.array([1, 4, 15]), 3)
    assert gaps.tolist() == [1, 2, 7, 2]
    assert filler.tolist() == [False, False, True, False]
    assert entry_positions(gaps).tolist() == [1, 4, 12, 15]
    assert count_entries(np.array([1, 4, 15]), 3) == 4


def test_filler_boundaries():
    # 2 bits: a gap of 3 fits, 4 needs one filler, 8 needs two; a weight at position 0 has gap 0
    assert relative_indices(np.array([0, 4]), 2)[0].tolist() == [0, 3]
    gaps, filler = relative_indices(np.array([0, 5]), 2)
    assert gaps.tolist() == [0, 3, 0] and filler.tolist() == [False, True, False]
    gaps, filler = relative_indices(np.array([8]), 2)
    assert gaps.tolist() == [3, 3, 0] and filler.tolist() == [True, True, False]
    assert entry_positions(gaps).tolist() == [3, 7, 8]
    with pytest.raises(ValueError, match="strictly increasing"):
        relative_indices(np.array([3, 3]), 2)
    with pytest.raises(ValueError, match="index_bits"):
        relative_indices(np.array([3]), 0)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 3000), max_size=200), st.integers(1, 6))
def test_relative_indices_round_trip(positions, bits):
    positions = np.array(sorted(positions), dtype=np.int64)
    gaps, filler = relative_indices(positions, bits)
    assert gaps.size == count_entries(positions, bits)
    assert ((gaps >= 0) & (gaps < 2**bits)).all()
    assert (gaps[filler] == 2**bits - 1).all()
    assert entry_positions(gaps)[~filler].tolist() == positions.tolist()
    skips = np.diff(positions, prepend=-1) - 1
    assert filler.sum() == (skips // 2**bits).sum()  # no more fillers than needed
