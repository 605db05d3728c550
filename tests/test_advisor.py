"""The format advisor: exact byte choice; measured products checked for structure, never for speed."""

import math

import pytest
import torch
import torch.nn.functional as Fn

from sparsenn import formats as F
from sparsenn.backend.formats.advisor import unregister_matmul_candidate


def sparse(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)


def nbytes_or_none(w, spec):
    try:
        return F.to_format(w, spec).nbytes
    except F.UnrepresentableError:
        return None


@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
def test_storage_picks_the_byte_minimum(density):
    w = sparse((16, 32), density)
    a = F.advise(w)
    assert a.use == "storage" and a.times is None and a.fastest is None
    assert a.bytes == {s: nbytes_or_none(w, s) for s in a.bytes}
    held = {s: b for s, b in a.bytes.items() if b is not None}
    assert a.smallest == min(held, key=lambda s: (held[s], list(held).index(s)))
    assert a.nnz == int(torch.count_nonzero(w)) and a.shape == (16, 32) and a.dtype == "float32"
    assert "<- smallest" in str(a)


def test_storage_hand_cases():
    assert F.advise(torch.ones(4, 4)).smallest == "dense"  # nothing to skip
    w = torch.zeros(4, 4)
    w[0, 1] = 1.0
    a = F.advise(w, formats=["dense", "coo", "csr", "bitmask"])
    assert a.bytes == {"dense": 64, "coo": 6, "csr": 10, "bitmask": 6} and a.smallest == "coo"  # tie: earlier
    nm = torch.tensor([[1.0, 2.0, 0.0, 0.0] * 4] * 4)
    assert F.advise(nm, formats=["dense", "2:4", "bitmask"]).bytes == {"dense": 256, "2:4": 128 + 8, "bitmask": 8 + 128}


def test_matmul_structure():
    w = sparse((24, 40), 0.1)
    a = F.advise(w, "matmul", batch=3, warmup=1, repeats=2)
    assert a.batch == 3 and a.repeats == 2 and a.threads >= 1
    assert set(a.times) | set(a.skipped) == set(F.list_matmul_candidates())
    assert "dense" in a.times  # F.linear always runs on float32
    assert all(math.isfinite(t) and t > 0 for t in a.times.values())
    assert a.fastest == min(a.times, key=a.times.get)
    text = str(a)
    assert "<- fastest" in text and "batch 3" in text and "<- smallest" in text


def test_matmul_conv_weight_and_half():
    a = F.advise(sparse((4, 2, 3, 3), 0.5), "matmul", batch=2, candidates=["dense"], warmup=0, repeats=1)
    assert list(a.times) == ["dense"] and a.skipped == {}
    h = F.advise(sparse((8, 16), 0.3).half(), "matmul", warmup=0, repeats=1)
    assert set(h.times) | set(h.skipped) == set(F.list_matmul_candidates())  # e.g. no half CSR product on CPU


@pytest.fixture
def registered():
    names = []

    def register(name, prepare):
        F.register_matmul_candidate(name, prepare)
        names.append(name)

    yield register
    for n in names:
        unregister_matmul_candidate(n)


def test_registered_candidates_are_checked_and_timed(registered):
    calls = []

    def good(weight):
        calls.append(tuple(weight.shape))
        wt = weight.t().contiguous()
        return lambda x: x @ wt

    registered("test_good", good)
    registered("test_wrong", lambda weight: (lambda x: 2 * Fn.linear(x, weight)))
    registered("test_shape", lambda weight: (lambda x: Fn.linear(x, weight).t()))
    registered("test_raises", lambda weight: (_ for _ in ()).throw(NotImplementedError("no kernel for this")))
    assert F.list_matmul_candidates()[:2] == ["dense", "torch_csr"]
    w = sparse((3, 2, 2, 2), 0.5)
    a = F.advise(w, "matmul", batch=4, warmup=0, repeats=1)
    assert calls == [(3, 8)]  # prepare sees the matrix view
    assert "test_good" in a.times
    assert a.skipped["test_wrong"].startswith("wrong result")
    assert "expected a tensor of shape (4, 3)" in a.skipped["test_shape"]
    assert a.skipped["test_raises"] == "NotImplementedError: no kernel for this"
    with pytest.raises(ValueError, match="already registered"):
        F.register_matmul_candidate("test_good", good)
    F.register_matmul_candidate("test_good", good, replace=True)


def test_bad_arguments():
    w = torch.ones(2, 4)
    with pytest.raises(ValueError, match="use must be one of 'storage', 'matmul', got 'speed'"):
        F.advise(w, "speed")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"batch must be an integer >= 1, got {bad!r}"):
            F.advise(w, "matmul", batch=bad)
    with pytest.raises(ValueError, match="repeats"):
        F.advise(w, "matmul", repeats=0)
    with pytest.raises(ValueError, match=r"unknown matmul candidates \['numba'\]; registered: dense, torch_csr"):
        F.advise(w, "matmul", candidates=["numba"])
    with pytest.raises(ValueError, match="none of the formats"):
        F.advise(torch.ones(2, 6), formats=["2:4"])
    with pytest.raises(F.FormatError, match="at least 2 dimensions"):
        F.advise(torch.ones(3))
    with pytest.raises(KeyError, match="no matmul candidate 'nope'"):
        unregister_matmul_candidate("nope")
