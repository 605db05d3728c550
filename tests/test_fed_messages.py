"""Federated messages: exact round trips, exact byte counts, hostile bytes refused (sparsenn.federated)."""

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.federated import (
    MessageError,
    decode,
    decode_mask,
    encode,
    encode_mask,
    encode_ternary,
    parse,
)
from sparsenn.federated.positions import (
    INDEX_ENCODINGS,
    decode_positions,
    encode_positions,
    encoded_size,
)

SHAPES = st.sampled_from([(0,), (1,), (9,), (3, 4), (2, 3, 5), (64,), (1, 1, 1, 17)])


@st.composite
def sparse_case(draw):
    shape = draw(SHAPES)
    n = math.prod(shape)
    chosen = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    positions = [i for i, c in enumerate(chosen) if c]
    values = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=len(positions), max_size=len(positions)))
    return shape, positions, values


def _dense(shape, positions, values):
    out = torch.zeros(math.prod(shape))
    out[positions] = torch.tensor(values, dtype=torch.float32)
    return out.reshape(shape)


@settings(max_examples=80, deadline=None)
@given(sparse_case(), st.sampled_from(["auto", "bitmask", "int32", "golomb", "all"]))
def test_round_trip_exact_and_byte_count_is_the_length(case, index):
    shape, positions, values = case
    if index == "all" and len(positions) != math.prod(shape):
        index = "auto"
    message = encode(shape, positions, torch.tensor(values), index=index)
    assert message.nbytes == len(message.data)
    pos = np.array(positions, dtype=np.int64)
    used = message.index
    expected = 15 + 4 * len(shape) + encoded_size(used, pos, math.prod(shape)) + 4 * len(positions)
    assert message.nbytes == expected
    out = decode(message.data, shape=shape)
    assert torch.equal(out.view(torch.int32), _dense(shape, positions, values).view(torch.int32))
    assert parse(message.data, shape=shape) == message


@settings(max_examples=60, deadline=None)
@given(sparse_case())
def test_auto_index_is_the_cheapest(case):
    shape, positions, values = case
    n = math.prod(shape)
    auto = encode(shape, positions, torch.tensor(values)).nbytes
    for index in ("bitmask", "int32", "golomb"):
        assert auto <= encode(shape, positions, torch.tensor(values), index=index).nbytes
    if len(positions) == n:
        assert auto == 15 + 4 * len(shape) + 4 * n  # every entry: no index at all


@settings(max_examples=60, deadline=None)
@given(sparse_case(), st.floats(0, 1e6, width=32))
def test_ternary_round_trip(case, mu):
    shape, positions, values = case
    negative = [v < 0 for v in values]
    message = encode_ternary(shape, positions, torch.tensor(negative, dtype=torch.bool), mu)
    assert message.nbytes == len(message.data) == (15 + 4 * len(shape) + message.index_bytes + 4
                                                   + (len(positions) + 7) // 8)
    out = decode(message, shape=shape).reshape(-1)
    expected = torch.zeros(math.prod(shape))
    expected[positions] = torch.tensor([-mu if s else mu for s in negative], dtype=torch.float32)
    assert torch.equal(out, expected)


@settings(max_examples=40, deadline=None)
@given(SHAPES, st.data())
def test_mask_round_trip(shape, data):
    n = math.prod(shape)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    message = encode_mask(mask)
    assert torch.equal(decode_mask(message.data, shape=shape), mask)
    assert message.nbytes == len(message.data)


def test_values_relative_to_a_known_mask():
    mask = torch.tensor([[True, False, True], [False, True, True]])
    message = encode((2, 3), [1, 3], torch.tensor([5.0, -1.0]), mask=mask)  # 2nd and 4th kept entries
    assert decode(message, mask=mask).tolist() == [[0.0, 0.0, 5.0], [0.0, 0.0, -1.0]]
    with pytest.raises(MessageError, match="receiver has none"):
        decode(message)
    plain = encode((2, 3), [0], torch.tensor([1.0]))
    with pytest.raises(MessageError, match="must be relative"):
        decode(plain, mask=mask)


def test_golomb_hand_computed():
    """Positions 1, 4, 15 of 16: gaps 1, 2, 10; b = 2 is cheapest (11 bits): quotients 0, 0, 2 in unary
    (1, 1, 001), then remainders 01, 10, 10: 11001011 010(00000)."""
    data, b = encode_positions("golomb", np.array([1, 4, 15]), 16)
    assert (data, b) == (bytes([0b11001011, 0b01000000]), 2)
    assert decode_positions("golomb", data, 3, 16, 2).tolist() == [1, 4, 15]
    assert encoded_size("golomb", np.array([1, 4, 15]), 16) == 2


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data(), st.sampled_from(INDEX_ENCODINGS[1:]))
def test_positions_round_trip(universe, data, encoding):
    chosen = data.draw(st.lists(st.booleans(), min_size=universe, max_size=universe))
    pos = np.flatnonzero(chosen).astype(np.int64)
    raw, b = encode_positions(encoding, pos, universe)
    assert len(raw) == encoded_size(encoding, pos, universe)
    assert decode_positions(encoding, raw, pos.size, universe, b).tolist() == pos.tolist()


# ----------------------------------------------------------------------------- hostile bytes

def _valid(index="int32", ternary=False):
    if ternary:
        return encode_ternary((4, 5), [1, 7, 19], torch.tensor([True, False, True]), 0.5, index=index).data
    return encode((4, 5), [1, 7, 19], torch.tensor([1.0, -2.0, 3.0]), index=index).data


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


COUNT, INDEX = 15, 23  # offsets of the entry count and the index section in a 2-D message


@pytest.mark.parametrize("bad, match", [
    (b"", "shorter"),
    (_valid()[:10], "shorter"),
    (_valid()[:-1], "describes"),
    (_valid() + b"\0", "describes"),
    (_patch(_valid(), 0, b"XX"), "not a sparsenn"),
    (_patch(_valid(), 2, b"\x09"), "not a sparsenn"),
    (_patch(_valid(), 3, b"\x80"), "flags"),
    (_patch(_valid(), 4, b"\x07"), "unknown index code 7; valid codes"),
    (_patch(_valid(), 5, b"\x03"), "Rice parameter"),
    (_patch(_valid(), 6, b"\x09"), "dimensions"),
    (_patch(_valid(), 7, struct.pack("<I", 5)), "expected"),
    (_patch(_valid(), COUNT, struct.pack("<I", 21)), "universe"),
    (_patch(_valid(), COUNT, struct.pack("<I", 2)), "describes"),
    (_patch(_valid(), INDEX, struct.pack("<I", 7)), "increasing"),  # positions 7, 7, 19
    (_patch(_valid(), INDEX + 8, struct.pack("<I", 20)), "increasing"),  # 19 -> 20: out of range
    (_patch(_valid(), len(_valid()) - 4, struct.pack("<f", float("nan"))), "finite"),
    (_patch(_valid(), len(_valid()) - 4, struct.pack("<f", float("inf"))), "finite"),
    (_patch(_valid(ternary=True), len(_valid(ternary=True)) - 5, struct.pack("<f", -1.0)), "magnitude"),
    (_patch(_valid(ternary=True), len(_valid(ternary=True)) - 1, b"\xff"), "padding"),
    (_patch(_valid("bitmask"), INDEX, b"\xff"), "bits set"),
    (_patch(_valid("bitmask"), INDEX + 2, b"\x0f"), "padding|bits set"),
    (_patch(_valid("golomb"), INDEX, b"\x00\x00"), "Golomb"),
    (_patch(encode((4, 5), list(range(20)), torch.ones(20)).data, 4, b"\x01"), "bitmask of 0 bytes"),
])
def test_hostile_messages_are_refused(bad, match):
    with pytest.raises(MessageError, match=match):
        decode(bad, shape=(4, 5))


def test_hostile_sizes_refused_before_allocating():
    huge = struct.pack("<2sBBBBB", b"SF", 1, 0, 0, 0, 2) + struct.pack("<IIII", 2**16, 2**15, 2**31 - 1, 0)
    with pytest.raises(MessageError, match="at most"):
        parse(huge)  # 2**31 entries claimed, no shape given: refused by max_numel before anything else
    with pytest.raises(MessageError, match="expected"):
        parse(huge, shape=(4, 5))
    with pytest.raises(MessageError, match="20 entries; at most 10"):
        parse(_valid(), max_numel=10)
    golomb = encode((1000,), [999], torch.tensor([1.0]), index="golomb")
    section = golomb.data[19:-4]  # after a 1-D header, before the one value
    with pytest.raises(MessageError, match="past the universe|outside"):
        decode_positions("golomb", section, 1, 500, golomb.rice_bits)


def test_mask_and_value_messages_are_not_confused():
    mask_message = encode_mask(torch.tensor([True, False]))
    with pytest.raises(MessageError, match="decode_mask"):
        decode(mask_message)
    with pytest.raises(MessageError, match="carries values"):
        decode_mask(encode((2,), [0], torch.tensor([1.0])))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["int32", "bitmask", "golomb", "all"]), st.booleans(), st.data())
def test_corrupted_messages_decode_or_raise_message_error(index, ternary, data):
    """Any single-byte corruption, truncation or extension: a tensor of the expected shape or a MessageError."""
    if index == "all":
        raw = (encode_ternary((4, 5), list(range(20)), torch.zeros(20, dtype=torch.bool), 1.0, index="all").data
               if ternary else encode((4, 5), list(range(20)), torch.arange(20.0), index="all").data)
    else:
        raw = _valid(index, ternary)
    kind = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = _patch(raw, i, bytes([data.draw(st.integers(0, 255))]))
    elif kind == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw = raw + data.draw(st.binary(min_size=1, max_size=8))
    try:
        out = decode(raw, shape=(4, 5))
    except MessageError:
        return
    assert out.shape == (4, 5) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_encode_checks_its_arguments():
    with pytest.raises(ValueError, match="strictly increasing"):
        encode((5,), [3, 1], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="values for"):
        encode((5,), [1], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="finite"):
        encode((5,), [1], torch.tensor([1e300], dtype=torch.float64))  # beyond float32
    with pytest.raises(ValueError, match="unknown index encoding 'csr'; valid encodings: auto, all"):
        encode((5,), [1], torch.tensor([1.0]), index="csr")
    with pytest.raises(ValueError, match="'all' sends every entry"):
        encode((5,), [1], torch.tensor([1.0]), index="all")
    with pytest.raises(ValueError, match="magnitude"):
        encode_ternary((5,), [1], torch.tensor([True]), -1.0)
