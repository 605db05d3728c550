"""zero_masked(_): the compiled loop equals masked_fill(~mask, 0) bit for bit, for every dtype and layout."""

import pytest
import torch

import sparsenn as sn
from sparsenn.core.masks import zero_masked, zero_masked_

SPECIAL = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5, 2.0, 1e-30]


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_bit_identical_to_masked_fill(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(SPECIAL), torch.randn(200, generator=g)]).to(dtype).reshape(13, 16)
    mask = torch.rand(13, 16, generator=g) < 0.4
    want = x.masked_fill(~mask, 0)
    assert torch.equal(_bits(zero_masked(x, mask)), _bits(want))
    y = x.clone()
    assert zero_masked_(y, mask) is y and torch.equal(_bits(y), _bits(want))
    # strided inputs: a transposed tensor in place, an expanded one out of place
    t = x.t().contiguous().t()
    zero_masked_(t, mask)
    assert not t.is_contiguous() and torch.equal(_bits(t), _bits(want))
    row = x[:1].expand(13, 16)
    assert torch.equal(_bits(zero_masked(row, mask)), _bits(row.masked_fill(~mask, 0)))


def test_other_dtypes_fall_back_to_masked_fill():
    x = torch.arange(6).reshape(2, 3)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert zero_masked(x, mask).tolist() == [[0, 0, 2], [0, 4, 0]]
    c = torch.ones(2, 3, dtype=torch.complex64)
    assert zero_masked_(c, mask).abs().tolist() == [[1, 0, 1], [0, 1, 0]]


def test_masked_weights_stay_exact_zero_with_nan_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    sp = sn.Sparsifier(model, sparsity=0.5, method="random")
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    mask = sp.masks["0.weight"]
    model(torch.randn(3, 6)).sum().backward()
    w = model[0].weight
    w.grad[~mask] = float("nan")  # after the gradient hook: only the optimizer hooks stand in the way
    opt.step()
    assert torch.isfinite(w).all() and (w[~mask] == 0).all() and not torch.signbit(w[~mask]).any()
    assert (opt.state[w]["momentum_buffer"][~mask] == 0).all()
