"""Sparse Linear training kernels (sparsenn.backend.training) against the dense PyTorch computation on
the masked weight: forward, input gradient, weight gradient at the active positions, bias gradient;
a 50-step SGD training run; thread-count independence; the structure's checks and the layer's state_dict."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsenn.backend.kernels._jit import sync_threads
from sparsenn.backend.training import (
    SparseLinearFunction,
    SparseStructure,
    SparseTrainingLinear,
)
from sparsenn.backend.training import kernels as K

U = 2.0**-24  # float32 unit roundoff


def make_mask(out, cols, density, seed=0, empty_row=None, empty_col=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out, cols, generator=g) < density
    if empty_row is not None:
        mask[empty_row] = False
    if empty_col is not None:
        mask[:, empty_col] = False
    return mask


def run_sparse(mask, batch, lead=(), bias=True, seed=1, need_x=True, need_v=True):
    """The layer's forward + backward; returns (layer, x, y, gy)."""
    torch.manual_seed(seed)
    out, cols = mask.shape
    layer = SparseTrainingLinear(cols, out, mask, bias=bias)
    layer.values.requires_grad_(need_v)
    x = torch.randn(*lead, batch, cols, requires_grad=need_x)
    y = layer(x)
    gy = torch.randn_like(y)
    if need_x or need_v or bias:
        y.backward(gy)
    return layer, x, y, gy


def bound(n_terms, abs_sum):
    """A rigorous bound on a float32 sum of ``n_terms`` products (gamma_n times the sum of their magnitudes),
    plus the rounding of the inputs to float32 (none here: they are float32 already)."""
    return (n_terms + 2) * U * abs_sum + 1e-30


def check_against_dense(layer, x, y, gy, need_x=True, need_v=True):
    mask = layer.mask()
    w = layer.dense_weight().double()
    assert torch.equal(w != 0, mask & (w != 0))  # zeros outside the mask
    x2 = x.detach().reshape(-1, layer.in_features).double()
    gy2 = gy.reshape(-1, layer.out_features).double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(layer.out_features, dtype=torch.float64)
    n_in, n_out, n_b = layer.in_features, layer.out_features, x2.shape[0]
    ref = F.linear(x2, w, b)
    err = (y.detach().reshape(-1, n_out).double() - ref).abs()
    assert (err <= bound(n_in + 1, x2.abs() @ w.abs().T + b.abs())).all()
    if need_x:
        ref_dx = gy2 @ w
        err = (x.grad.reshape(-1, n_in).double() - ref_dx).abs()
        assert (err <= bound(n_out, gy2.abs() @ w.abs())).all()
    if need_v:
        rows, cols = mask.nonzero(as_tuple=True)
        ref_dw = (gy2.T @ x2)[rows, cols]  # row-major order = values' order
        abs_dw = (gy2.abs().T @ x2.abs())[rows, cols]
        assert layer.values.grad.shape == (layer.nnz,)
        assert ((layer.values.grad.double() - ref_dw).abs() <= bound(n_b, abs_dw)).all()
    if layer.bias is not None:
        assert ((layer.bias.grad.double() - gy2.sum(0)).abs() <= bound(n_b, gy2.abs().sum(0))).all()


CASES = [  # (out, in, density, batch, empty_row, empty_col)
    (1000, 784, 0.05, 128, None, None),
    (37, 53, 0.3, 1, 5, 7),
    (37, 53, 0.3, 128, 0, 52),
    (64, 48, 0.1, 17, 63, 0),
    (10, 100, 0.5, 33, 3, 50),
    (5, 3, 1.0, 65, None, None),  # fully dense
    (1, 1, 1.0, 2, None, None),
    (9, 70, 1.0, 128, None, None),
    (12, 20, 0.0, 7, None, None),  # all-zero mask
    (130, 1, 0.5, 49, None, None),
    (1, 130, 0.5, 16, None, None),
]


@pytest.mark.parametrize("out,cols,density,batch,er,ec", CASES)
def test_matches_dense(out, cols, density, batch, er, ec):
    mask = make_mask(out, cols, density, empty_row=er, empty_col=ec)
    layer, x, y, gy = run_sparse(mask, batch)
    assert y.shape == (batch, out)
    check_against_dense(layer, x, y, gy)


@pytest.mark.parametrize("need_x,need_v,bias", [(True, False, True), (False, True, False), (False, False, True),
                                                (True, True, False)])
def test_partial_gradients(need_x, need_v, bias):
    mask = make_mask(40, 30, 0.2)
    layer, x, y, gy = run_sparse(mask, 20, bias=bias, need_x=need_x, need_v=need_v)
    check_against_dense(layer, x, y, gy, need_x=need_x, need_v=need_v)
    assert (x.grad is None) != need_x
    assert (layer.values.grad is None) != need_v


def test_leading_dims():
    mask = make_mask(24, 40, 0.25)
    layer, x, y, gy = run_sparse(mask, 5, lead=(3, 2))
    assert y.shape == (3, 2, 5, 24) and x.grad.shape == x.shape
    check_against_dense(layer, x, y, gy)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 70), cols=st.integers(1, 70), batch=st.integers(1, 130),
       density=st.sampled_from([0.0, 0.03, 0.2, 0.6, 1.0]), seed=st.integers(0, 1000))
def test_matches_dense_random(out, cols, batch, density, seed):
    mask = make_mask(out, cols, density, seed=seed)
    layer, x, y, gy = run_sparse(mask, batch, seed=seed)
    check_against_dense(layer, x, y, gy)


def test_retain_graph_and_no_grad():
    mask = make_mask(30, 20, 0.3)
    layer = SparseTrainingLinear(20, 30, mask)
    x = torch.randn(9, 20, requires_grad=True)
    y = layer(x)
    y.sum().backward(retain_graph=True)
    g1 = layer.values.grad.clone()
    y.sum().backward()
    assert torch.allclose(layer.values.grad, 2 * g1)
    with torch.no_grad():
        y2 = layer(x)
    assert torch.equal(y2, y.detach())
    assert torch.equal(layer(torch.zeros(0, 20)), torch.zeros(0, 30))


def test_identical_on_one_and_two_threads():
    mask = make_mask(300, 200, 0.1)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert sync_threads() == min(threads, __import__("numba").config.NUMBA_NUM_THREADS)
            layer, x, y, _ = run_sparse(mask, 128, seed=3)
            results.append((y.detach(), x.grad, layer.values.grad, layer.bias.grad))
    finally:
        torch.set_num_threads(before)
        sync_threads()
    for a, b in zip(*results):
        assert torch.equal(a, b)


class MLP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def test_training_matches_masked_dense():
    torch.manual_seed(0)
    sizes = (20, 48, 33, 5)
    dense = MLP(sizes)
    masks = [make_mask(lin.out_features, lin.in_features, d, seed=i) for i, (lin, d) in
             enumerate(zip(dense.layers, (0.3, 0.1, 0.5)))]
    with torch.no_grad():
        for lin, m in zip(dense.layers, masks):
            lin.weight.mul_(m)
    sparse = MLP(sizes)
    sparse.layers = nn.ModuleList(SparseTrainingLinear.from_linear(lin, m) for lin, m in zip(dense.layers, masks))
    opts = [torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) for model in (dense, sparse)]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(50)]
    for x, t in data:
        losses = []
        for model, opt in zip((dense, sparse), opts):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            for lin, m in zip(dense.layers, masks):
                lin.weight.mul_(m)
        assert math.isclose(losses[0], losses[1], rel_tol=1e-5)
    for lin, sp in zip(dense.layers, sparse.layers):
        torch.testing.assert_close(sp.dense_weight(), lin.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sp.bias.detach(), lin.bias.detach(), rtol=1e-5, atol=1e-6)
    assert losses[1] < F.cross_entropy(MLP(sizes)(data[0][0]), data[0][1]).item()  # it learned something


def test_structure_round_trip_and_checks():
    mask = make_mask(17, 23, 0.3, empty_row=4, empty_col=9)
    s = SparseStructure.from_mask(mask)
    assert s.problem() is None and s.nnz == int(mask.sum())
    assert np.array_equal(s.mask(), mask.numpy())
    w = np.random.default_rng(0).standard_normal((17, 23)).astype(np.float32) * mask.numpy()
    assert np.array_equal(s.to_dense(s.gather(w)), w)
    assert np.array_equal(s.gather(w)[s.perm], w.T[mask.numpy().T])  # perm: CSC order -> values

    def broken(**change):
        arrays = {n: getattr(s, n).copy() for n in ("indptr", "indices", "col_ptr", "row_idx", "perm")}
        for name, fn in change.items():
            fn(arrays[name])
        return SparseStructure(17, 23, **arrays).problem()

    assert "indices" in broken(indices=lambda a: a.__setitem__(0, 23))
    assert "indices" in broken(indices=lambda a: a.__setitem__(1, -1))
    assert "row_idx" in broken(row_idx=lambda a: a.__setitem__(0, 99))
    assert "perm" in broken(perm=lambda a: a.__setitem__(0, a[1]))
    assert "indptr" in broken(indptr=lambda a: a.__setitem__(-1, a[-1] + 1))
    assert "col_ptr" in broken(col_ptr=lambda a: a.__setitem__(3, a[4] + 1))
    assert broken(perm=lambda a: a.__setitem__(slice(0, 2), a[[1, 0]])) is not None
    with pytest.raises(ValueError, match="invalid sparse structure"):
        SparseStructure.from_arrays(17, 23, s.indptr, s.indices.astype(np.int64), s.col_ptr, s.row_idx, s.perm)


def test_type_errors():
    layer = SparseTrainingLinear(6, 4, make_mask(4, 6, 0.5))
    with pytest.raises(TypeError, match="float32 CPU"):
        layer(torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 CPU"):
        SparseLinearFunction.apply(torch.randn(3, 6), layer.values.detach().double(), None, layer.structure)
    with pytest.raises(ValueError, match="6 features"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="SparseStructure"):
        SparseLinearFunction.apply(torch.randn(3, 6), layer.values, None, "csr")
    with pytest.raises(ValueError, match="shape"):
        SparseTrainingLinear(6, 4, torch.ones(6, 4, dtype=torch.bool))


def test_linear_round_trip_and_state_dict():
    torch.manual_seed(0)
    lin = nn.Linear(31, 19)
    mask = make_mask(19, 31, 0.2)
    layer = SparseTrainingLinear.from_linear(lin, mask)
    dense = layer.dense_weight()
    assert torch.equal(dense, lin.weight.detach() * mask)
    back = layer.to_linear()
    assert torch.equal(back.weight, dense) and torch.equal(back.bias, lin.bias)
    x = torch.randn(8, 31)
    torch.testing.assert_close(layer(x), back(x), rtol=1e-5, atol=1e-6)
    assert "in_features=31, out_features=19" in repr(layer) and "nnz=" in repr(layer)
    assert set(layer.state_dict()) == {"values", "bias", "indptr", "indices", "col_ptr", "row_idx", "perm"}

    other = SparseTrainingLinear(31, 19, make_mask(19, 31, 0.6, seed=5))  # another nnz
    other.load_state_dict(layer.state_dict())
    assert other.nnz == layer.nnz and torch.equal(other.dense_weight(), dense)
    assert torch.equal(other(x), layer(x))

    bad = layer.state_dict()
    bad["indices"] = bad["indices"].clone()
    bad["indices"][0] = 31
    with pytest.raises(RuntimeError, match="indices must lie"):
        other.load_state_dict(bad)

    # a buffer changed in place is checked again before the next product
    with torch.no_grad():
        layer.indices[0] = 1000
    with pytest.raises(ValueError, match="indices must lie"):
        layer(x)


def test_kernel_argument_checks():
    s = SparseStructure.from_mask(make_mask(8, 16, 0.5))
    v = np.ones(s.nnz, dtype=np.float32)
    x = np.ones((5, 16), dtype=np.float32)
    y = np.empty((5, 8), dtype=np.float32)
    K.forward(s, v, K.tiles(x), None, y)
    np.testing.assert_allclose(y, s.mask().sum(1)[None, :].repeat(5, 0).astype(np.float32))
    with pytest.raises(ValueError, match="values"):
        K.forward(s, v[:-1], K.tiles(x), None, y)
    with pytest.raises(ValueError, match="tiles"):
        K.forward(s, v, K.tiles(np.ones((5, 15), dtype=np.float32)), None, y)
    with pytest.raises(ValueError, match="tiles"):
        K.forward(s, v, K.tiles(np.ones((200, 16), dtype=np.float32)), None, y)
    with pytest.raises(ValueError, match="same tiling"):
        K.weight_grad(s, K.tiles(np.ones((5, 8), dtype=np.float32)), K.tiles(np.ones((50, 16), dtype=np.float32)),
                      np.empty(s.nnz, dtype=np.float32))
