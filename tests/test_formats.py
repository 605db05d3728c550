"""Exact formats: dense -> format -> dense round trips, exact byte counts, index dtypes, N:M bits."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsenn import formats as F
from sparsenn import metrics as M
from sparsenn.core.registry import UnknownNameError
from sparsenn.backend.formats import FormatError, UnrepresentableError, index_dtype
from sparsenn.backend.formats.nm import pack_codes, unpack_codes
from sparsenn.core.masks import attach_mask

DTYPES = [torch.float16, torch.float32, torch.float64]
UNSTRUCTURED = ["dense", "coo", "csr", "csc", "bitmask", "bsr4x4", "bsr2x3", "bsr1x1"]


def idx(max_value):
    """Bytes of the index dtype the rule picks for values up to ``max_value``."""
    return 1 if max_value < 2**8 else 2 if max_value < 2**16 else 4 if max_value < 2**32 else 8


def expected_nbytes(spec, w):
    """The byte formulas of docs/DESIGN.md, computed independently of the formats."""
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    m2 = w.reshape(rows, cols) != 0
    nnz, item = int(m2.sum()), w.element_size()
    if spec == "dense":
        return rows * cols * item
    if spec == "coo":
        return nnz * (item + idx(rows - 1) + idx(cols - 1))
    if spec == "csr":
        return nnz * (item + idx(cols - 1)) + (rows + 1) * idx(nnz)
    if spec == "csc":
        return nnz * (item + idx(rows - 1)) + (cols + 1) * idx(nnz)
    if spec == "bitmask":
        return math.ceil(rows * cols / 8) + nnz * item
    h, bw = map(int, spec[3:].split("x"))
    br, bc = -(-rows // h), -(-cols // bw)
    padded = torch.zeros(br * h, bc * bw, dtype=torch.bool)
    padded[:rows, :cols] = m2
    blocks = int(padded.reshape(br, h, bc, bw).any(3).any(1).sum())
    return blocks * h * bw * item + blocks * idx(bc - 1) + (br + 1) * idx(blocks)


def random_weight(shape, density, dtype, seed, negative_zeros=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    keep = torch.rand(shape, generator=g) < density
    w = torch.where(keep, w, torch.zeros((), dtype=dtype))
    if negative_zeros:  # some zeros as -0.0: still zeros, restored as +0.0
        w = torch.where(~keep & (torch.rand(shape, generator=g) < 0.5), torch.tensor(-0.0, dtype=dtype), w)
    return w


def same_bits(a, b):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


shapes = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 20)),
    st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),  # conv
)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), dtype=st.sampled_from(DTYPES),
       spec=st.sampled_from(UNSTRUCTURED), seed=st.integers(0, 2**16))
def test_round_trip_and_bytes(shape, density, dtype, spec, seed):
    w = random_weight(shape, density, dtype, seed)
    f = F.to_format(w, spec)
    back = f.to_dense()
    assert back.shape == w.shape and back.dtype == dtype and torch.equal(back, w)
    # nonzeros bit for bit; the dense format keeps even the sign of zero
    assert same_bits(back, w if spec == "dense" else w + 0.0)
    assert f.shape == tuple(shape) and f.dtype == dtype and f.nnz == int(torch.count_nonzero(w))
    assert f.nbytes == sum(a.nbytes for a in f.arrays().values()) == expected_nbytes(spec, w)
    assert f.spec == spec and type(f).__name__ in repr(f)


nm_ratios = st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 5)])


@settings(max_examples=120, deadline=None)
@given(nm=nm_ratios, rows=st.integers(1, 6), groups=st.integers(1, 5), density=st.floats(0, 1),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_nm_round_trip_and_bytes(nm, rows, groups, density, dtype, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = random_weight((rows, groups * m), 1.0, dtype, seed, negative_zeros=False)
    # at most n nonzeros per group: the top n of random scores, then thinned by density
    scores = torch.rand(rows * groups, m, generator=g)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argsort(1)[:, :n], True)
    keep &= torch.rand(keep.shape, generator=g) < density
    w = torch.where(keep.reshape(w.shape), w, torch.tensor(-0.0, dtype=dtype))
    f = F.to_format(w, f"{n}:{m}")
    back = f.to_dense()
    assert back.dtype == dtype and torch.equal(back, w) and same_bits(back, w + 0.0)
    slots = rows * groups * n
    bits = max(1, math.ceil(math.log2(m)))
    assert f.values.shape == (rows, groups * n) and f.stored_values == slots
    assert f.nbytes == slots * w.element_size() + math.ceil(slots * bits / 8)
    assert f.nnz == int(keep.sum())
    pos = f.positions().reshape(rows * groups, n) % m
    assert (np.diff(pos, axis=1) > 0).all()  # exactly n distinct slots per group, increasing
    # metrics.nm_bytes is the same formula
    assert f.nbytes == M.nm_bytes(w, n, m, dtype_bytes=w.element_size())


# ---------------------------------------------------------------- hand-computed bytes


@pytest.fixture
def w4x4():
    w = torch.zeros(4, 4)
    w[0, 1], w[2, 3], w[3, 0] = 1.0, -2.0, 3.0
    return w


def test_hand_bytes_4x4(w4x4):
    sizes = {s: F.to_format(w4x4, s).nbytes for s in ["dense", "coo", "csr", "csc", "bitmask", "bsr2x2", "2:4"]}
    assert sizes == {
        "dense": 16 * 4,
        "coo": 3 * 4 + 3 * 1 + 3 * 1,  # values, uint8 rows, uint8 cols
        "csr": 3 * 4 + 3 * 1 + 5 * 1,  # values, uint8 col indices, uint8 row pointers
        "csc": 3 * 4 + 3 * 1 + 5 * 1,
        "bitmask": 2 + 3 * 4,  # 16 bits, values
        "bsr2x2": 3 * 4 * 4 + 3 * 1 + 3 * 1,  # blocks (0,0), (1,0), (1,1) of 2x2; 2 block rows + 1 pointers
        "2:4": 8 * 4 + 2,  # 8 slots, 16 bits of positions
    }
    csr = F.to_format(w4x4, "csr")
    assert csr.indptr.tolist() == [0, 1, 1, 2, 3] and csr.indices.tolist() == [1, 3, 0]
    assert csr.values.tolist() == [1.0, -2.0, 3.0]
    csc = F.to_format(w4x4, "csc")
    assert csc.indptr.tolist() == [0, 1, 2, 2, 3] and csc.indices.tolist() == [3, 0, 2]
    assert csc.values.tolist() == [3.0, 1.0, -2.0]
    bm = F.to_format(w4x4, "bitmask")
    assert bm.mask.tolist() == [0b00000010, 0b00011000]  # bits 1 (0,1), 11 (2,3), 12 (3,0)
    assert F.to_format(w4x4.half(), "csr").nbytes == 3 * 2 + 3 + 5


def test_bsr_pads_to_whole_blocks():
    w = torch.zeros(5, 6)
    w[0, 0], w[4, 5] = 1.0, 2.0
    f = F.BSR.from_dense(w, block=(4, 4))
    assert f.padded_shape == (8, 8) and f.values.shape == (2, 4, 4)
    assert f.indptr.tolist() == [0, 1, 2] and f.indices.tolist() == [0, 1]
    assert f.nbytes == 2 * 16 * 4 + 2 + 3 and f.stored_values == 32 and f.nnz == 2
    assert f.values[1, 0, 1] == 2.0  # (4, 5) is row 0, column 1 of block (1, 1)
    assert torch.equal(f.to_dense(), w)
    assert F.BSR.from_dense(w, block=3).block == (3, 3)


def test_conv_weight_is_its_matrix_view():
    w = random_weight((4, 3, 3, 3), 0.3, torch.float32, 0)
    for spec in ["csr", "bsr2x3", "bitmask"]:
        conv, mat = F.to_format(w, spec), F.to_format(w.reshape(4, 27), spec)
        assert conv.matrix_shape == (4, 27) and conv.nbytes == mat.nbytes
        assert all(np.array_equal(a, b) for a, b in zip(conv.arrays().values(), mat.arrays().values()))
        assert conv.to_dense().shape == (4, 3, 3, 3)


@pytest.mark.parametrize("spec", ["dense", "coo", "csr", "csc", "bitmask", "bsr2x2", "2:4"])
@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (2, 0, 3, 3)])
def test_empty_weights(spec, shape):
    f = F.to_format(torch.zeros(shape), spec)
    assert f.to_dense().shape == shape and f.nnz == 0


def test_bfloat16_round_trip():
    w = random_weight((6, 8), 0.5, torch.bfloat16, 3)
    for spec in ["dense", "coo", "csr", "bsr2x2", "bitmask"]:
        back = F.to_format(w, spec).to_dense()
        assert back.dtype == torch.bfloat16 and torch.equal(back, w)


def test_agrees_with_metrics_formulas():
    w = random_weight((8, 12), 0.4, torch.float32, 1, negative_zeros=False)
    assert F.to_format(w, "dense").nbytes == M.dense_bytes(w)
    assert F.to_format(w, "bitmask").nbytes == M.bitmask_bytes(w)
    assert F.to_format(w, "csr").nbytes == M.csr_bytes(w, index_bytes=1)  # uint8 indices and pointers here
    assert F.to_format(w.double(), "bitmask").nbytes == M.bitmask_bytes(w, dtype_bytes=8)


# ---------------------------------------------------------------- index dtypes


@pytest.mark.parametrize("value, dtype", [(0, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16),
                                          (65536, np.uint32), (2**32 - 1, np.uint32), (2**32, np.uint64)])
def test_index_dtype_boundaries(value, dtype):
    assert index_dtype(value) == dtype


def test_index_dtype_switches_with_dimension_and_nnz():
    # column indices go up to cols - 1, pointers up to nnz
    assert F.CSR.from_dense(torch.ones(1, 256)).indices.dtype == np.uint8
    f = F.CSR.from_dense(torch.ones(1, 257))
    assert f.indices.dtype == np.uint16 and f.indptr.dtype == np.uint16
    assert f.nbytes == 257 * 4 + 257 * 2 + 2 * 2
    w = torch.zeros(2, 256)
    w[0, :255] = 1
    assert F.CSR.from_dense(w).indptr.dtype == np.uint8  # nnz 255
    w[1, 0] = 1
    assert F.CSR.from_dense(w).indptr.dtype == np.uint16  # nnz 256
    f = F.CSR.from_dense(torch.ones(1, 65536))
    assert f.indices.dtype == np.uint16 and f.indptr.dtype == np.uint32  # nnz 65536
    w = torch.zeros(1, 65537)
    w[0, -1] = 1
    f = F.COO.from_dense(w)
    assert f.col.dtype == np.uint32 and f.row.dtype == np.uint8 and f.nbytes == 4 + 4 + 1
    assert F.CSC.from_dense(torch.eye(257)).indices.dtype == np.uint16  # row indices up to 256
    assert F.BSR.from_dense(torch.ones(4, 1024), block=(4, 4)).indices.dtype == np.uint8  # 256 block columns
    assert F.BSR.from_dense(torch.ones(4, 1028), block=(4, 4)).indices.dtype == np.uint16


# ---------------------------------------------------------------- N:M bits


def test_nm_metadata_hand_case_2_4():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    f = F.NMCompressed.from_dense(w, n=2, m=4)
    # group 0 keeps positions 1, 3; group 1 its nonzero 0, then the first zero, 1
    assert f.values.tolist() == [[1.0, 2.0, 3.0, 0.0]]
    assert f.positions().tolist() == [[1, 3, 4, 5]]
    assert f.metadata.tolist() == [1 | 3 << 2 | 0 << 4 | 1 << 6]  # 2-bit codes, first in the low bits
    assert f.metadata.dtype == np.uint8 and f.nbytes == 4 * 4 + 1


def test_nm_metadata_3_bit_codes():
    w = torch.zeros(1, 8)
    w[0, [1, 2, 5, 7]] = 1.0
    f = F.to_format(w, "4:8")
    stream = 1 | 2 << 3 | 5 << 6 | 7 << 9  # 12 bits in 2 bytes
    assert f.metadata.tolist() == [stream & 0xFF, stream >> 8]
    assert F.to_format(torch.tensor([[0.0, 1.0]]), "1:2").metadata.tolist() == [1]  # 1 bit


@settings(deadline=None)
@given(bits=st.integers(1, 7), codes=st.lists(st.integers(0, 127), max_size=40))
def test_pack_unpack_codes(bits, codes):
    codes = np.array([c % 2**bits for c in codes], dtype=np.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(codes.size * bits / 8)
    assert unpack_codes(packed, codes.size, bits).tolist() == codes.tolist()


def test_not_nm_names_the_group():
    w = torch.zeros(3, 8)
    w[2, 4:7] = 1.0
    with pytest.raises(UnrepresentableError, match=r"not 2:4: row 2, columns 4\.\.7 hold 3 nonzeros \(at most 2"):
        F.to_format(w, "2:4")
    with pytest.raises(UnrepresentableError, match="multiple of 4.*6 columns"):
        F.to_format(torch.zeros(2, 6), "nm")
    with pytest.raises(UnrepresentableError, match="multiple of 4.*18 columns"):
        F.to_format(torch.zeros(2, 2, 3, 3), "2:4")  # conv: in*kh*kw = 18


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (2.0, 4), (True, 4), (2, None)])
def test_bad_nm_options(n, m):
    with pytest.raises(FormatError, match="0 < n < m"):
        F.NMCompressed.from_dense(torch.zeros(2, 4), n=n, m=m)


# ---------------------------------------------------------------- errors and the registry


@pytest.mark.parametrize("spec", UNSTRUCTURED + ["2:4"])
def test_bad_weights(spec):
    with pytest.raises(FormatError, match=r"at least 2 dimensions.*got shape \(4,\)"):
        F.to_format(torch.zeros(4), spec)
    with pytest.raises(FormatError, match=r"got shape \(\)"):
        F.to_format(torch.tensor(1.0), spec)
    with pytest.raises(TypeError, match="got list"):
        F.to_format([[1.0]], spec)


@pytest.mark.parametrize("block", [0, (0, 4), (4, -1), (2,), "4x4", (2.0, 2), (True, 2)])
def test_bad_block(block):
    with pytest.raises(FormatError, match="block"):
        F.BSR.from_dense(torch.zeros(4, 4), block=block)


def test_registry_and_specs():
    assert F.list_formats() == ["bitmask", "bitmask_bf16", "bitmask_int8", "bsr", "coo", "csc", "csr", "dense",
                              "dense_bf16", "dense_int8", "nm"]
    assert F.get("CSR") is F.CSR and F.get("nm") is F.NMCompressed
    assert F.parse_format("bsr2x8") == (F.BSR, {"block": (2, 8)})
    assert F.parse_format("4:8") == (F.NMCompressed, {"n": 4, "m": 8})
    assert F.to_format(torch.zeros(4, 8), "bsr", block=(2, 8)).spec == "bsr2x8"
    assert F.to_format(torch.zeros(4, 8), "bsr4x4", block=[4, 4]).spec == "bsr4x4"
    assert F.to_format(torch.zeros(4, 8), "nm", n=1, m=4).spec == "1:4"
    for bad in ("diagonal", "bsr4"):
        with pytest.raises(UnknownNameError, match=f"unknown format '{bad}'; valid formats: bitmask, bitmask_bf16, .*'2:4'"):
            F.to_format(torch.zeros(2, 4), bad)
    with pytest.raises(UnknownNameError, match="valid formats"):
        F.get("bsr4x4")
    with pytest.raises(FormatError, match="'csr' takes no option 'block'; valid options: none"):
        F.to_format(torch.zeros(2, 4), "csr", block=2)
    with pytest.raises(FormatError, match="fixes n=2, got n=1"):
        F.to_format(torch.zeros(2, 4), "2:4", n=1)


# ---------------------------------------------------------------- bytes_table


def test_bytes_table_rows_and_totals():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Conv2d(2, 3, 3))
    attach_mask(model[0], "weight", torch.tensor([[True, True, False, False] * 2] * 4))  # 2:4
    attach_mask(model[2], "weight", torch.rand(3, 2, 3, 3) < 0.5)  # 18 columns: not 2:4
    t = F.bytes_table(model)
    assert [r.name for r in t.rows] == ["0.weight", "2.weight"]
    for r, w in zip(t.rows, [model[0].weight, model[2].weight]):
        assert r.bytes == {s: (None if s == "2:4" and r.name == "2.weight" else F.to_format(w, s).nbytes)
                           for s in t.formats}
        assert r.nnz == int(torch.count_nonzero(w)) and r.dtype == "float32"
    assert t.rows[0].bytes["2:4"] == 16 * 4 + 4
    assert t.total.bytes["csr"] == sum(r.bytes["csr"] for r in t.rows) and t.total.bytes["2:4"] is None
    assert t.rows[1].smallest == min((b, s) for s, b in t.rows[1].bytes.items() if b is not None)[1]
    records = json.loads(json.dumps(t.to_records()))
    assert records[-1]["name"] == "total" and records[0]["bytes"]["2:4"] == 68
    assert "2.weight" in str(t) and t.to_markdown().startswith("| weight | shape | nnz | dense |")

    half = F.bytes_table(model, ["dense", "2:4"], dtype=torch.float16)
    assert half.formats == ("dense", "2:4") and half.rows[0].bytes == {"dense": 64, "2:4": 32 + 4}
    assert F.bytes_table(nn.Sequential(model[0]), ["2:4"]).total.bytes == {"2:4": 68}


def test_bytes_table_rejects_unknown_and_bad_specs():
    with pytest.raises(UnknownNameError, match="'ell'"):
        F.bytes_table(nn.Linear(4, 4), ["csr", "ell"])
    with pytest.raises(FormatError, match="block height"):
        F.bytes_table(nn.Linear(4, 4), ["bsr0x4"])


def test_bytes_table_counts_1d_masked_weights_as_rows():
    # couple_batchnorm masks BatchNorm scales and shifts (1-D): counted as 1 x n matrices, exactly
    from sparsenn.structured.channels import couple_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    rows = torch.ones(8, 3 * 3 * 3, dtype=torch.bool)
    rows[[1, 4, 6]] = False  # three pruned channels
    attach_mask(model[0], "weight", rows.reshape(8, 3, 3, 3))
    attach_mask(model[4], "weight", torch.rand(4, 128) < 0.3)
    assert couple_batchnorm(model, torch.randn(2, 3, 6, 6)) == {"1": 3}
    t = F.bytes_table(model)
    names = [r.name for r in t.rows]
    assert "1.weight" in names and "1.bias" in names
    for r in t.rows:
        if r.name.startswith("1."):
            w = model[1].get_parameter(r.name[2:]).detach()
            assert r.shape == (8,) and r.nnz == int(torch.count_nonzero(w)) <= 5
            for spec in t.formats:
                try:
                    expected = F.to_format(w.reshape(1, 8), spec).nbytes
                except UnrepresentableError:
                    expected = None
                assert r.bytes[spec] == expected
            assert r.bytes["dense"] == 8 * 4 and r.bytes["bitmask"] == 1 + r.nnz * 4
            assert r.bytes["csr"] == r.nnz * (4 + 1) + 2 * 1  # a sparse vector: values, uint8 indices, 2 pointers
            assert r.bytes["coo"] == r.nnz * (4 + 1 + 1)
    assert t.rows[names.index("1.weight")].bytes["2:4"] is None  # ones with 3 zeros: not 2:4 along the row
    assert t.total.bytes["dense"] == sum(r.bytes["dense"] for r in t.rows)
    assert t.total.bytes["csr"] == sum(r.bytes["csr"] for r in t.rows)
    assert "1.weight" in str(t) and "| 1.bias | 8 |" in t.to_markdown()
    from sparsenn.backend.formats.table import weight_bytes

    vec = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0])  # 1:2 along the row, so also 2:4
    assert weight_bytes(vec, ["dense", "2:4"]) == {"dense": 32, "2:4": 4 * 4 + 1}
    assert weight_bytes(torch.tensor(2.0), ["dense", "csr"]) == {"dense": 4, "csr": 4 + 1 + 2}
