"""Every CPU kernel against the dense PyTorch product (float64 reference, fp32 rounding bound)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn import kernels as K
from sparsenn.backend.kernels import bsr, csr

BATCHES = (1, 2, 4, 17, 64, 65)


def sparse_weight(out, cols, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    return w * (torch.rand(out, cols, generator=g) >= sparsity)


def nm_weight(out, cols, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    groups = w.reshape(out, cols // m, m)
    keep = groups.abs().argsort(-1, descending=True)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    w = (groups * mask).reshape(out, cols)
    return w * (torch.rand(out, cols, generator=g) >= 0.2)  # some groups with fewer than n nonzeros


def block_weight(out, cols, h, bw, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out // h, cols // bw, generator=g) < density
    return torch.randn(out, cols, generator=g) * keep.repeat_interleave(h, 0).repeat_interleave(bw, 1)


def assert_product(packed, w, batch, bias=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, w.shape[1], generator=g)
    b = torch.randn(w.shape[0], generator=g) if bias else None
    y = K.linear(x, packed, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = F.linear(x.double().abs(), w.double().abs()) + (0 if b is None else b.double().abs())
    tol = 4 * (w.shape[1] + 2) * torch.finfo(torch.float32).eps
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert bool(((y.double() - ref).abs() <= bound * tol + 1e-30).all()), float((y.double() - ref).abs().max())


@pytest.mark.parametrize("kernel", ["csr", "csr_panel"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("batch", BATCHES)
def test_csr_kernels_match_dense(kernel, sparsity, batch):
    w = sparse_weight(150, 600, sparsity)  # 2 row blocks, 3 panels (the last one partial)
    packed = K.pack(w, kernel)
    assert np.array_equal(packed.to_dense(), w.numpy())
    assert_product(packed, w, batch, bias=batch % 2 == 0)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 140), cols=st.integers(1, 300), sparsity=st.sampled_from([0.0, 0.3, 0.8, 0.97, 1.0]),
       batch=st.sampled_from([1, 3, 5, 16, 49]), panel=st.sampled_from([None, 256]), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_csr_random_shapes(out, cols, sparsity, batch, panel, bias, seed):
    w = sparse_weight(out, cols, sparsity, seed)
    packed = K.Packed("csr", *csr.pack(w.numpy(), panel))
    assert np.array_equal(packed.to_dense(), w.numpy())
    assert_product(packed, w, batch, bias, seed)


def test_csr_layout_uses_narrow_indices():
    w = sparse_weight(64, 1000, 0.9)
    assert K.pack(w, "csr").arrays["idx"].dtype == np.uint16
    assert K.pack(w, "csr_panel").arrays["idx"].dtype == np.uint8
    packed = K.pack(w, "csr")
    nnz = int((w != 0).sum())
    assert packed.nbytes == nnz * 6 + packed.arrays["ptr"].nbytes  # fp32 value + uint16 index


@pytest.mark.parametrize("batch", BATCHES)
def test_nm_kernel_matches_dense(batch):
    w = nm_weight(130, 1100, 2, 4)  # 2 row blocks, 5 column panels (the last one partial)
    assert K.detect_nm(w) == (2, 4)
    packed = K.pack(w, "nm", n=2, m=4)
    assert packed.arrays["off"].dtype == np.uint8 and packed.arrays["val"].size == 130 * 1100 // 2
    assert np.array_equal(packed.to_dense(), w.numpy())
    assert_product(packed, w, batch, bias=batch != 4)


@pytest.mark.parametrize("n,m", [(1, 4), (4, 8), (1, 2)])
def test_nm_layout_round_trips(n, m):
    w = nm_weight(300, 80, n, m)
    assert K.detect_nm(w) == (n, m)
    packed = K.pack(w, "nm", n=n, m=m)
    assert np.array_equal(packed.to_dense(), w.numpy()) and packed.nbytes == 300 * 80 // m * n * 5


def test_nm_rejects_weights_that_are_not_nm():
    w = sparse_weight(8, 16, 0.0)
    with pytest.raises(ValueError, match="not 2:4 sparse: a group of 4 columns holds 4 nonzeros"):
        K.pack(w, "nm", n=2, m=4)
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        K.pack(sparse_weight(8, 10, 0.9), "nm", n=2, m=4)
    assert K.detect_nm(w) is None and K.detect_nm(torch.zeros(4, 8)) is None


@pytest.mark.parametrize("h,bw,batch", [(4, 1, 1), (4, 1, 4), (4, 1, 17), (4, 1, 65), (4, 4, 65),
                                         (1, 4, 17), (16, 2, 1)])  # every compiled (h, tile) is slow to build
def test_bsr_kernel_matches_dense(h, bw, batch):
    w = block_weight(64, 96, h, bw, 0.3)
    packed = K.pack(w, "bsr", h=h, w=bw)
    assert np.array_equal(packed.to_dense(), w.numpy())
    assert packed.arrays["val"].shape[1:] == (h, bw)
    assert_product(packed, w, batch, bias=batch != 4)


def test_bsr_detection_and_errors():
    w = block_weight(64, 96, 4, 4, 0.2)
    h, bw, fill = K.detect_blocks(w)[0]
    assert (h, bw, fill) == (4, 4, 1.0)
    assert bsr.kernel_block(12, 3) == (4, 3) and bsr.kernel_block(32, 1) == (16, 1)
    assert K.detect_blocks(sparse_weight(64, 96, 0.9)) == []  # random zeros: no block is filled
    with pytest.raises(ValueError, match="block height must be one of"):
        K.pack(w, "bsr", h=3, w=4)
    with pytest.raises(ValueError, match="not divisible into 4x5 blocks"):
        K.pack(w, "bsr", h=4, w=5)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(16, 32), (24, 48), (32, 30), (48, 64)]), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([1, 2, 4, 8]), st.floats(0.05, 0.6), st.floats(0.5, 1.0), st.integers(0, 2**16))
def test_block_detection_skipping_equals_measuring_every_shape(shape, h, bw, density, keep, seed):
    """detect_blocks skips shapes with a too-empty divisor (fill only falls as blocks grow): the
    result must be what measuring every shape gives, on weights with blocks partly emptied."""
    out, cols = shape
    g = torch.Generator().manual_seed(seed)
    w = block_weight(out - out % h or h, cols - cols % bw or bw, h, bw, density, seed)
    w = w * (torch.rand(w.shape, generator=g) < keep)  # knock some entries out of the kept blocks
    found = []
    for bh, bww in K.BLOCKS if torch.count_nonzero(w) else ():  # brute force: every shape measured
        if bsr.check_blocks(w.numpy(), bh, bww) is None:
            fill = bsr.block_fill(w.numpy(), bh, bww)
            if fill >= K.MIN_BLOCK_FILL:
                found.append((bh, bww, fill))
    found.sort(key=lambda t: (-round(t[2], 6), -t[0] * t[1], -t[0]))
    assert K.detect_blocks(w, limit=len(K.BLOCKS)) == found


def test_candidates_follow_the_structure():
    assert [k for k, _ in K.candidates(sparse_weight(32, 64, 0.9))] == ["csr", "csr_panel"]
    assert ("nm", {"n": 2, "m": 4}) in K.candidates(nm_weight(32, 64, 2, 4))
    assert ("bsr", {"h": 4, "w": 4}) in K.candidates(block_weight(32, 64, 4, 4, 0.3))


def test_bad_inputs_are_named():
    w = sparse_weight(8, 16, 0.5)
    with pytest.raises(TypeError, match="float32 weights, got torch.float64"):
        K.pack(w.double(), "csr")
    with pytest.raises(ValueError, match="unknown kernel 'nope'; valid kernels: bitmask, bitmask_bf16, bitmask_int8, bsr, conv, csr, csr_panel, dense_bf16, dense_int8, nm"):
        K.pack(w, "nope")
    packed = K.pack(w, "csr")
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 16\), got \(2, 15\)"):
        packed.matmul(np.zeros((2, 15), np.float32))
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        packed.matmul(np.zeros((2, 16)))


def test_results_do_not_depend_on_the_thread_count():
    w = sparse_weight(300, 700, 0.8)
    x = torch.randn(70, 700)
    packed = K.pack(w, "csr_panel")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = K.linear(x, packed)
        torch.set_num_threads(2)
        y2 = K.linear(x, packed)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_numba_follows_torch_thread_count():
    import numba

    before = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            assert K.sync_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
            assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


def test_large_tiles_are_kept_within_the_per_thread_limits(monkeypatch):
    """Tiles above the old 4 MB limit are reused (fresh memory cost BERT-base 10-15% in page faults); the
    per-thread byte and shape limits drop the oldest shapes; release_scratch frees them; too-large tiles are
    made per call. Each result is still the exact packing."""
    from sparsenn.backend.kernels import _tiles

    _tiles.release_scratch()
    rng = np.random.default_rng(3)
    big = rng.standard_normal((2048, 768)).astype(np.float32)  # 6.3 MB of tiles
    a = _tiles.pack_tiles(big, 64, reuse=True)
    assert _tiles.pack_tiles(big, 64, reuse=True) is a
    np.testing.assert_array_equal(a, _tiles.pack_tiles(big, 64))
    monkeypatch.setattr(_tiles, "SCRATCH_TOTAL_BYTES", a.nbytes + 1000)
    small = rng.standard_normal((64, 8)).astype(np.float32)
    s = _tiles.pack_tiles(small, 64, reuse=True)
    assert _tiles.pack_tiles(small, 64, reuse=True) is s
    other = rng.standard_normal((64, 768)).astype(np.float32)
    o = _tiles.pack_tiles(other, 64, reuse=True)  # over the byte limit with `a`: the oldest shape (a's) goes
    assert set(_tiles._SCRATCH.buffers) == {s.shape, o.shape}
    assert _tiles.pack_tiles(big, 64, reuse=True) is not a  # a new buffer, and the older ones dropped
    np.testing.assert_array_equal(_tiles.pack_tiles(big, 64, reuse=True), _tiles.pack_tiles(big, 64))
    monkeypatch.setattr(_tiles, "SCRATCH_MAX_BYTES", 1 << 20)
    b1, b2 = _tiles.pack_tiles(big, 64, reuse=True), _tiles.pack_tiles(big, 64, reuse=True)
    assert b1 is not b2 and big.nbytes > _tiles.SCRATCH_MAX_BYTES  # too large to keep: per call
    np.testing.assert_array_equal(b1, b2)
    monkeypatch.setattr(_tiles, "SCRATCH_SHAPES", 2)
    for cols in (8, 16, 24):
        _tiles.pack_tiles(rng.standard_normal((64, cols)).astype(np.float32), 64, reuse=True)
    assert len(_tiles._SCRATCH.buffers) <= 2
    _tiles.release_scratch()
    assert _tiles._SCRATCH.buffers == {}


def test_reused_tiles_do_not_leak_between_products():
    from sparsenn.backend.kernels import _tiles

    x = np.random.default_rng(0).standard_normal((70, 300)).astype(np.float32)
    a = _tiles.pack_tiles(x, 64, reuse=True)
    assert a.ctypes.data % 64 == 0
    np.testing.assert_array_equal(a, _tiles.pack_tiles(x, 64))
    assert _tiles.pack_tiles(x[:65], 64, reuse=True) is a  # same shape: the same buffer, re-packed
    np.testing.assert_array_equal(a, _tiles.pack_tiles(x[:65], 64))  # padding rows zeroed again
    # products with alternating shapes and batch sizes (one thread's buffers reused) stay exact
    w1, w2 = sparse_weight(200, 300, 0.9, seed=1), sparse_weight(300, 200, 0.9, seed=2)
    for kernel in ("csr", "csr_panel"):
        p1, p2 = K.pack(w1, kernel), K.pack(w2, kernel)
        for batch in (70, 20, 70, 130, 20):
            xb = torch.from_numpy(x[:batch].copy()) if batch <= 70 else torch.randn(batch, 300)
            h = K.linear(xb, p1)
            torch.testing.assert_close(h, xb @ w1.T, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(K.linear(h, p2), h @ w2.T, rtol=1e-4, atol=1e-4)


def test_kernels_are_offered_to_the_format_advisor():
    from sparsenn.backend.formats import advise, list_matmul_candidates

    assert {"sparsenn_csr", "sparsenn_csr_panel", "sparsenn_nm", "sparsenn_bsr"} <= set(list_matmul_candidates())
    advice = advise(sparse_weight(64, 128, 0.9), use="matmul", batch=8, repeats=3, warmup=1,
                    candidates=["dense", "sparsenn_csr", "sparsenn_nm"])
    assert "sparsenn_csr" in advice.times and "sparsenn_nm" in advice.skipped


@settings(max_examples=20, deadline=None)
@given(kernel=st.sampled_from(["csr", "csr_panel", "nm", "bsr"]), blocks=st.integers(1, 70),
       batch=st.integers(4, 200), seed=st.integers(0, 2**16))
def test_job_order_changes_nothing_but_speed(kernel, blocks, batch, seed):
    """Tile by tile or block by block (:func:`._tiles.tile_major`): the same bits, and the dense result."""
    from sparsenn.backend.kernels import _tiles

    out, cols = 4 * blocks, 64
    if kernel == "nm":
        w, options = nm_weight(out, cols, 2, 4, seed=seed), {"n": 2, "m": 4}
    elif kernel == "bsr":  # 4 x 4 blocks, a quarter kept
        keep = torch.rand(blocks, cols // 4, generator=torch.Generator().manual_seed(seed)) < 0.25
        w = sparse_weight(out, cols, 0.0, seed=seed) * keep.repeat_interleave(4, 0).repeat_interleave(4, 1)
        options = {"h": 4, "w": 4}
    else:
        w, options = sparse_weight(out, cols, 0.75, seed=seed), {}
    packed = K.pack(w, kernel, **options)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed + 1))
    try:
        _tiles.FORCE_TILE_MAJOR = True
        by_tile = K.linear(x, packed)
        _tiles.FORCE_TILE_MAJOR = False
        by_block = K.linear(x, packed)
    finally:
        _tiles.FORCE_TILE_MAJOR = None
    assert torch.equal(by_tile, by_block)
    torch.testing.assert_close(by_tile, x @ w.T, rtol=1e-4, atol=1e-4)
