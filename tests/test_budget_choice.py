"""A layer whose timing rounds do not fit in ``budget``: chosen from one call each only when clearly faster.

The timer is replaced by one that reports fixed per-call times and refuses the rounds, as
the real one does for a layer too large for the budget; the rule under test is
``selection._from_first_calls`` (25% faster than dense, and at one row no format larger
than the dense weight).
"""

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.backend.runtime import selection, timing


def pruned_linear(density, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 256)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < density)
    return model


def fake_timer(per_call):
    """``interleaved_medians`` that calls each function twice, then refuses the layer's rounds (the
    whole-model check, dense against converted, gets the converted model 2x faster)."""

    def timer(fns, **kw):
        if set(fns) == {"dense", "converted"}:
            return {"dense": 2.0, "converted": 1.0}
        estimate = {}
        for name, fn in fns.items():
            fn()
            fn()
            estimate[name] = per_call.get(name, 1.0)
        raise timing.TimingCapReached("3 rounds of about 9 s do not fit in 0.2 s", estimate)

    return timer


@pytest.mark.parametrize("csr_time, chosen", [(0.5, "csr"), (0.9, "dense")])
def test_one_call_choice_needs_a_clear_win(monkeypatch, csr_time, chosen):
    monkeypatch.setattr(timing, "interleaved_medians", fake_timer({"dense": 1.0, "csr": csr_time}))
    conv = sn.convert(pruned_linear(0.1), torch.randn(64, 256), batch_sizes=(64,), kernels=["csr"], screen=False)
    row = conv.conversion_summary.layer("0")
    assert row.choice[64] == chosen
    if chosen == "csr":
        assert "csr chosen from one timed call each" in row.note and row.times[64] == {"dense": 1.0, "csr": 0.5}
    else:
        assert "not timed within budget" in row.note


def test_one_call_choice_at_one_row_keeps_the_byte_rule(monkeypatch):
    # a near-dense weight: its CSR is larger than the dense weight, so at one row it may not win on time alone
    monkeypatch.setattr(timing, "interleaved_medians", fake_timer({"dense": 1.0, "csr": 0.1}))
    model = pruned_linear(0.95)
    conv = sn.convert(model, torch.randn(1, 256), batch_sizes=(1,), kernels=["csr"], screen=False)
    row = conv.conversion_summary.layer("0")
    assert row.bytes["csr"] > row.bytes["dense"]
    assert row.choice[1] == "dense"


def test_from_first_calls_needs_every_function_timed():
    assert selection._from_first_calls({"dense": 1.0}, {"dense": None, "csr": None}, ["csr"]) is None
    assert selection._from_first_calls({"dense": 1.0, "csr": 0.7}, {"dense": None, "csr": None}, ["csr"]) == "csr"
    assert selection._from_first_calls({"dense": 1.0, "csr": 0.7}, {"dense": None, "csr": None}, []) is None
