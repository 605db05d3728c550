"""Tests for sparsenn.core.schedules against hand-computed values."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenn.core.registry import UnknownNameError
from sparsenn.core.schedules import (
    SCHEDULES,
    Constant,
    Exponential,
    Iterative,
    Linear,
    OneShot,
    Polynomial,
    Schedule,
    list_schedules,
    make_schedule,
)


def updates(s, upto=60):
    return [t for t in range(upto) if s.is_update_step(t)]


def test_names():
    assert list_schedules() == [
        "constant", "exponential", "iterative", "linear", "one_shot", "polynomial"
    ]
    assert SCHEDULES.get("polynomial") is Polynomial


def test_cubic():
    s = Polynomial(begin_step=0, end_step=10)
    # 0.9 + (0 - 0.9) * (1 - t/10)**3
    # t=1: 0.9*(1 - 0.729) = 0.2439; t=5: 0.9*(1 - 0.125) = 0.7875; t=8: 0.9*(1 - 0.008) = 0.8928
    assert s.sparsity_at(1, 0.9) == pytest.approx(0.2439)
    assert s.sparsity_at(5, 0.9) == pytest.approx(0.7875)
    assert s.sparsity_at(8, 0.9) == pytest.approx(0.8928)
    assert s.sparsity_at(10, 0.9) == 0.9 and s.sparsity_at(11, 0.9) == 0.9
    # with an offset and initial 0.5: t=15 -> progress 0.5 -> 0.9 - 0.4*0.125 = 0.85
    s = Polynomial(begin_step=10, end_step=20, exponent=3)
    assert s.sparsity_at(9, 0.9, 0.5) == 0.5
    assert s.sparsity_at(15, 0.9, 0.5) == pytest.approx(0.85)
    # exponent 1 is linear: 0.9 - 0.4*0.5 = 0.7
    assert Polynomial(begin_step=10, end_step=20, exponent=1).sparsity_at(15, 0.9, 0.5) == pytest.approx(0.7)


def test_linear():
    s = Linear(begin_step=10, end_step=20)
    assert s.sparsity_at(0, 0.8, 0.2) == 0.2
    assert s.sparsity_at(12, 0.8, 0.2) == pytest.approx(0.2 + 0.6 * 0.2)  # 0.32
    assert s.sparsity_at(15, 0.8, 0.2) == pytest.approx(0.5)
    assert s.sparsity_at(20, 0.8, 0.2) == 0.8


def test_exponential():
    s = Exponential(begin_step=0, end_step=10)
    # density 1 -> 0.01: d(t) = 0.01**(t/10); t=5: 0.1 -> 0.9; t=2: 10**-0.4 = 0.398107
    assert s.sparsity_at(5, 0.99) == pytest.approx(0.9)
    assert s.sparsity_at(2, 0.99) == pytest.approx(1 - 10**-0.4)
    # initial 0.5 (d=0.5) -> 0.875 (d=0.125): halfway d = 0.5*0.25**0.5 = 0.25 -> 0.75
    assert s.sparsity_at(5, 0.875, 0.5) == pytest.approx(0.75)
    assert s.sparsity_at(10, 0.99) == 0.99


def test_target_exact_at_end():
    target = 0.1 + 0.2  # not representable nicely; must come back bit-exact
    for s in (Linear(begin_step=3, end_step=17), Exponential(begin_step=3, end_step=17),
              Polynomial(begin_step=3, end_step=17, exponent=2.5), Iterative(begin_step=3, end_step=17, rounds=4),
              Constant(begin_step=3, end_step=17), OneShot(begin_step=17)):
        assert s.sparsity_at(17, target, 0.1) == target
        assert s.sparsity_at(1000, target, 0.1) == target


def test_one_shot_and_constant():
    s = OneShot(begin_step=7, end_step=100)
    assert s.end_step == 7
    assert [s.sparsity_at(t, 0.9) for t in (6, 7, 8)] == [0.0, 0.9, 0.9]
    assert updates(s) == [7]
    c = Constant(begin_step=10, end_step=25, frequency=4)
    assert [c.sparsity_at(t, 0.8, 0.3) for t in (9, 10, 11, 30)] == [0.3, 0.8, 0.8, 0.8]
    assert updates(c) == [10, 14, 18, 22]  # end_step 25 not on the grid: not forced
    assert updates(Constant(begin_step=10, end_step=22, frequency=4)) == [10, 14, 18, 22]
    assert updates(Constant(begin_step=5, end_step=5)) == [5]


def test_gradual_update_steps():
    for cls in (Linear, Exponential, Polynomial):
        assert updates(cls(begin_step=10, end_step=25, frequency=4)) == [10, 14, 18, 22, 25]
        assert updates(cls(begin_step=0, end_step=6, frequency=2)) == [0, 2, 4, 6]


def test_iterative():
    s = Iterative(begin_step=2, end_step=10, rounds=3)
    # p = 1 - 0.125**(1/3) = 0.5; rounds at 2 + round(i*8/2) = 2, 6, 10
    assert s.fraction_per_round(0.875) == pytest.approx(0.5)
    assert s.round_steps == [2, 6, 10]
    assert updates(s) == [2, 6, 10]
    got = [s.sparsity_at(t, 0.875) for t in range(12)]
    assert got[:2] == [0.0, 0.0]
    assert got[2:6] == pytest.approx([0.5] * 4)
    assert got[6:10] == pytest.approx([0.75] * 4)
    assert got[10:] == [0.875, 0.875]
    # from 0.5 to 0.875 in 2 rounds: p = 1 - (0.125/0.5)**0.5 = 0.5; after round 1: 1 - 0.5*0.5
    s = Iterative(begin_step=0, end_step=10, rounds=2)
    assert s.round_steps == [0, 10]
    assert s.fraction_per_round(0.875, 0.5) == pytest.approx(0.5)
    assert s.sparsity_at(0, 0.875, 0.5) == pytest.approx(0.75)
    assert s.sparsity_at(9, 0.875, 0.5) == pytest.approx(0.75)
    assert Iterative(begin_step=100, end_step=200, rounds=5).round_steps == [100, 125, 150, 175, 200]
    one = Iterative(begin_step=0, end_step=10, rounds=1)
    assert one.round_steps == [10]
    assert [one.sparsity_at(t, 0.5) for t in (0, 9, 10)] == [0.0, 0.0, 0.5]


def test_round_trip():
    for s in (OneShot(begin_step=3), Constant(begin_step=1, end_step=9, frequency=2),
              Linear(begin_step=0, end_step=5), Exponential(begin_step=2, end_step=8, frequency=3),
              Polynomial(begin_step=0, end_step=10, exponent=2.0), Iterative(begin_step=0, end_step=9, rounds=4)):
        d = s.to_dict()
        assert d["name"] == s.name
        assert make_schedule(json.loads(json.dumps(d))) == s
        assert make_schedule(s) is s
    assert Polynomial(begin_step=0, end_step=4).to_dict() == {
        "name": "polynomial", "begin_step": 0, "end_step": 4, "frequency": 1, "exponent": 3.0
    }
    assert make_schedule("constant") == Constant()
    assert make_schedule("ONE_SHOT") == OneShot()


def test_construction_errors():
    with pytest.raises(ValueError, match="begin_step must be an int >= 0, got -1"):
        Linear(begin_step=-1, end_step=5)
    with pytest.raises(ValueError, match="end_step must be >= begin_step=5, got 3"):
        Constant(begin_step=5, end_step=3)
    with pytest.raises(ValueError, match="frequency must be an int >= 1, got 0"):
        Linear(begin_step=0, end_step=5, frequency=0)
    with pytest.raises(ValueError, match="end_step must be > begin_step=4, got 4"):
        Polynomial(begin_step=4, end_step=4)
    with pytest.raises(ValueError, match="linear: end_step must be > begin_step=0, got 0"):
        make_schedule("linear")  # default end_step=0 is not a valid gradual schedule
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got 0"):
        Iterative(begin_step=0, end_step=5, rounds=0)
    with pytest.raises(ValueError, match="rounds=5 need end_step - begin_step >= 4, got 2"):
        Iterative(begin_step=0, end_step=2, rounds=5)
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=f"exponent must be a finite number > 0, got {bad}"):
            Polynomial(begin_step=0, end_step=5, exponent=bad)
    with pytest.raises(TypeError):
        Polynomial(0, 5, 1, 3.0)  # hyperparameters are keyword-only


def test_call_errors():
    s = Linear(begin_step=0, end_step=10)
    with pytest.raises(ValueError, match=r"target sparsity must be a number in \[0, 1\), got 1.0"):
        s.sparsity_at(3, 1.0)
    with pytest.raises(ValueError, match=r"initial sparsity must be in \[0, target=0.5\], got 0.6"):
        s.sparsity_at(3, 0.5, 0.6)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        s.sparsity_at(-1, 0.5)
    with pytest.raises(ValueError, match="target sparsity"):
        Iterative(begin_step=0, end_step=4).fraction_per_round(-0.1)
    with pytest.raises(UnknownNameError, match="unknown schedule 'cubic'.*polynomial"):
        make_schedule("cubic")
    with pytest.raises(ValueError, match="needs a 'name' key"):
        make_schedule({"begin_step": 0})
    with pytest.raises(ValueError, match=r"unknown linear arguments \['rounds'\]; valid: begin_step"):
        make_schedule({"name": "linear", "end_step": 5, "rounds": 3})
    with pytest.raises(TypeError):
        make_schedule(3)


@st.composite
def schedules(draw):
    cls = draw(st.sampled_from([OneShot, Constant, Linear, Exponential, Polynomial, Iterative]))
    begin = draw(st.integers(0, 10))
    span = draw(st.integers(1, 30))
    kw = dict(begin_step=begin, end_step=begin + span, frequency=draw(st.integers(1, 7)))
    if cls is Polynomial:
        kw["exponent"] = draw(st.floats(0.1, 8.0))
    if cls is Iterative:
        kw["rounds"] = draw(st.integers(1, span + 1))
    return cls(**kw)


@settings(max_examples=150, deadline=None)
@given(s=schedules(), target=st.floats(0.0, 0.999), frac=st.floats(0.0, 1.0))
def test_monotone_and_bounded(s: Schedule, target, frac):
    initial = target * frac
    values = [s.sparsity_at(t, target, initial) for t in range(s.end_step + 5)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert all(initial <= v <= target for v in values)
    assert values[: s.begin_step] == [initial] * s.begin_step
    assert values[s.end_step :] == [target] * 5
    ups = updates(s, s.end_step + 5)
    first = s.round_steps[0] if isinstance(s, Iterative) else s.begin_step
    assert ups and ups[0] == first and ups[-1] <= s.end_step
