"""sparsenn.convert's procedure (issue 13): cost-model screening, enforced time caps, progress,
honest summaries (bytes held, 1.00x where dense), torch.compile of a converted model."""

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from sparsenn.backend import inference
from sparsenn.backend.runtime import SparseLinear, inputs, timing
from sparsenn.backend.runtime.cost import COST_MODEL, SLACK, Product
from sparsenn.core import progress as pg


def mlp(d=64, h=128, layers=2, sparsity=0.9, seed=0):
    torch.manual_seed(seed)
    mods = [nn.Linear(d, h), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(h, h), nn.ReLU()]
    model = nn.Sequential(*mods, nn.Linear(h, 10)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
    return model


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture
def slow_linear(monkeypatch):
    """Every dense nn.Linear call takes at least ``delay["s"]`` seconds (sleeps first)."""
    delay = {"s": 0.01}
    real = nn.Linear.forward

    def forward(self, x):
        time.sleep(delay["s"])
        return real(self, x)

    monkeypatch.setattr(nn.Linear, "forward", forward)
    return delay


# ------------------------------------------------------------------ time caps


def test_interleaved_medians_stops_at_max_seconds():
    def slow():
        time.sleep(0.02)

    t0 = time.perf_counter()
    with pytest.raises(timing.TimingCapReached, match="0.05 s") as info:
        timing.interleaved_medians({"a": slow, "b": slow}, budget=0.05, min_repeats=3, max_seconds=0.05)
    assert time.perf_counter() - t0 < 1.0 and info.value.estimate["a"] >= 0.02
    # a cheap comparison runs its rounds and stops early once `stop` says the answer is clear
    rounds = []
    out = timing.interleaved_medians({"a": lambda: None, "b": lambda: None}, budget=10, min_repeats=3,
                                     max_seconds=5, stop=lambda med: rounds.append(med) or True)
    assert set(out) == {"a", "b"} and len(rounds) == 1


def test_first_call_compiling_is_not_counted_against_the_cap():
    """A kernel's first call in a process compiles or loads it (0.1-0.2 s with numba): that is not its
    cost. It used to exhaust a small cap, so the first layer using each kernel stayed dense."""
    calls = []

    def compiles_first():
        if not calls:
            time.sleep(0.3)
        calls.append(1)

    out = timing.interleaved_medians({"a": lambda: None, "b": compiles_first}, budget=0.01, min_repeats=3,
                                     max_seconds=0.2)
    assert set(out) == {"a", "b"} and out["b"] < 0.05


def test_budget_caps_each_layer(slow_linear):
    """Each dense call sleeps 10 ms: 3 rounds of (dense, csr, csr_panel) cannot fit in budget=0.05 s,
    so each layer is chosen on its one timed call each (the kernels beat the sleeping dense call by far
    more than 25%), and the conversion does not run past its caps."""
    model = mlp()
    t0 = time.perf_counter()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), budget=0.05, screen=False, verify=False)
    elapsed = time.perf_counter() - t0
    s = conv.conversion_summary
    chosen = 0
    for r in s.layers:  # each batch size: chosen on one call each (a first call compiling is not counted)
        assert r.note.count("chosen from one timed call each") == 2, r.note
        chosen += r.note.count("chosen from one timed call each")
        assert all(r.times[b]["dense"] >= 0.01 and r.choice[b] != "dense" for b in r.times)
    assert chosen == 6
    # 3 layers x 2 batch sizes: the warm-up calls, the cap and a little more each
    assert elapsed < 3 * 2 * 0.15 + 1.0


def test_time_limit_leaves_the_rest_dense_and_says_so(slow_linear):
    slow_linear["s"] = 0.004
    model = mlp(layers=5)  # 6 layers x 2 batch sizes, each timing up to its budget of 0.3 s
    t0 = time.perf_counter()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), budget=0.3, time_limit=0.5, screen=False,
                      verify=False)
    elapsed = time.perf_counter() - t0
    s = conv.conversion_summary
    assert elapsed < 1.5  # unlimited, this takes 12 x 0.3 s
    assert any("time limit (0.5 s) reached" in n for n in s.notes)
    assert any("time limit reached" in r.note for r in s.layers)
    for r in s.layers:  # what was not timed runs dense
        assert all(r.choice[b] == "dense" for b in (1, 8) if b not in r.times)
    x = torch.randn(3, 64)
    assert close(conv(x), model(x))
    assert s.time_limit == 0.5 and "time limit 0.5 s" in str(s)


def test_whole_model_check_is_set_aside_first(monkeypatch):
    """With no time left for the whole-model check, nothing is timed: an unverified sparse layer never survives."""
    def no_timing(*a, **k):
        raise AssertionError("nothing may be timed when the check cannot fit")

    monkeypatch.setattr(timing, "interleaved_medians", no_timing)
    model = mlp()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), time_limit=1e-3, screen=False)
    s = conv.conversion_summary
    assert all(type(conv[i]) is nn.Linear for i in (0, 2, 4))
    assert sum("the whole-model check there would take about" in n for n in s.notes) == 2
    assert s.speedup(1) == s.speedup(8) == 1.0


@pytest.mark.parametrize("bad", [0, -1.0, "1", True])
def test_bad_limits_are_named(bad):
    with pytest.raises(ValueError, match="budget must be a positive number of seconds"):
        sn.convert(mlp(), torch.randn(1, 64), budget=bad)
    with pytest.raises(ValueError, match="time_limit must be a positive number of seconds or None"):
        sn.convert(mlp(), torch.randn(1, 64), time_limit=bad)


# ------------------------------------------------------------------ cost model


def test_candidates_predicted_far_slower_are_not_timed(monkeypatch):
    timed = []

    def fake(fns, **kw):
        timed.append(set(fns))
        return {k: (1.0 if k == "dense" else 0.5) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", fake)
    real_dense = COST_MODEL.dense
    monkeypatch.setattr(COST_MODEL, "sparse", lambda p, key, packed: 10 * real_dense(p))
    model = mlp()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), kernels=["csr", "csr_panel"])
    s = conv.conversion_summary
    assert timed == [] and all(type(conv[i]) is nn.Linear for i in (0, 2, 4))
    for r in s.layers:
        assert set(r.predicted) == {1, 8} and set(r.predicted[1]) == {"dense", "csr", "csr_panel"}
        assert f"every kernel predicted more than {SLACK:g}x dense's time" in r.note
        assert "best sparse predicted 10.0x slower; not timed" in r.cell(1)
    # predicted within SLACK: timed (and here, with the fake timings, chosen)
    monkeypatch.setattr(COST_MODEL, "sparse", lambda p, key, packed: 0.5 * real_dense(p))
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), kernels=["csr", "csr_panel"])
    assert {"dense", "csr", "csr_panel"} in timed and isinstance(conv[2], SparseLinear)


def test_noisy_probes_cannot_make_more_rows_cheaper():
    """A probe slowed by another job (16 rows measured at a low rate, 64 at a high one) once
    predicted 4 rows cheaper than 2; predictions are monotone in the rows by construction."""
    from sparsenn.backend.runtime.cost import Rates
    r = Rates(call=1e-6, stream=1e9, batched=((16, 1e8), (64, 1e10), (1024, 1e9)))
    times = [r.seconds(rows, 1000) for rows in range(1, 2048)]
    assert all(a <= b for a, b in zip(times, times[1:]))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 300), st.sampled_from([(32, 64), (128, 96), (64, 200)]), st.booleans())
def test_cost_model_predictions_grow_with_rows_and_nonzeros(rows, shape, conv):
    out, cols = shape
    g = torch.Generator().manual_seed(rows)
    dense_w = torch.randn(out, cols, generator=g)
    sparse_w = dense_w * (torch.rand(out, cols, generator=g) < 0.1)
    p, p2 = Product(rows, cols, out, conv), Product(2 * rows, cols, out, conv)
    assert 0 < COST_MODEL.dense(p) <= COST_MODEL.dense(p2) < float("inf")
    for kernel in ("csr", "csr_panel"):
        few, many = sn.kernels.pack(sparse_w, kernel), sn.kernels.pack(dense_w, kernel)
        assert 0 < COST_MODEL.sparse(p, kernel, few) <= COST_MODEL.sparse(p, kernel, many)
        assert COST_MODEL.sparse(p, kernel, few) <= COST_MODEL.sparse(p2, kernel, few)


# ------------------------------------------------------------------ summary


def test_summary_reports_the_bytes_the_layers_hold(monkeypatch):
    model = mlp()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), force="csr")
    s = conv.conversion_summary
    for r in s.layers:
        layer = conv.get_submodule(r.name)
        assert set(r.held) == {"csr", "bias"}  # only csr runs: no dense weight kept
        assert r.held_bytes == sum(b.nbytes for b in layer.buffers())
        assert r.dense_held_bytes == layer.out_features * (layer.in_features + 1) * 4
    assert s.held_bytes() == (sum(r.dense_held_bytes for r in s.layers), sum(r.held_bytes for r in s.layers))
    assert f"holds {s.layers[0].held_bytes} bytes: csr" in str(s) and "bytes held by the layers" in str(s)

    def sparse_at_8(fns, **kw):  # every kernel wins at batch 8 only; the whole model is faster there
        if "converted" in fns:
            return {"dense": 1.0, "converted": 0.5}
        big = "csr" in fns and fns["dense"]().shape[0] == 8
        return {k: (1.0 if k == "dense" or not big else 0.5) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", sparse_at_8)
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), screen=False)
    s = conv.conversion_summary
    for r in s.layers:
        layer = conv.get_submodule(r.name)
        assert r.choice == {1: "dense", 8: r.choice[8]} and r.choice[8] != "dense"
        assert set(r.held) == {r.choice[8], "weight", "bias"}  # dense at batch 1: the weight is kept
        assert r.held_bytes == sum(b.nbytes for b in layer.buffers())
    assert s.speedup(1) == 1.0 and 1 not in s.model_times and s.speedup(8) == 2.0


def test_noise_is_not_shown_as_a_speedup(monkeypatch):
    looks = []

    def fake(fns, **kw):
        if "converted" in fns:
            looks.append(1)
            return {"dense": 1.0, "converted": 0.98}  # faster, by less than the margin
        return {k: (1.0 if k == "dense" else 0.5) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", fake)
    conv = sn.convert(mlp(), torch.randn(2, 64), batch_sizes=(1, 8), screen=False)
    text = str(conv.conversion_summary)
    assert "(1.02x, within the 5% margin: no clear gain)" in text and len(looks) == 4

    def dense_wins(fns, **kw):
        if "converted" in fns:
            raise AssertionError("a model with no sparse layer is the dense model: nothing to time")
        return {k: (1.0 if k == "dense" else 2.0) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", dense_wins)
    conv = sn.convert(mlp(), torch.randn(2, 64), batch_sizes=(1, 8), screen=False)
    s = conv.conversion_summary
    assert s.model_times == {} and s.speedup(1) == s.speedup(8) == 1.0
    assert "batch 1: every layer dense: the dense model (1.00x)" in str(s) and "1.0x)" not in str(s)
    assert s.held_bytes()[0] == s.held_bytes()[1]
    again = type(s).from_dict(s.to_dict())
    assert str(again) == str(s) and again.layers[0].held == s.layers[0].held


def test_measure_reports_dense_batches_as_equal_and_the_held_bytes(monkeypatch):
    def dense_wins(fns, **kw):
        return {k: (1.0 if k == "dense" else 2.0) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", dense_wins)
    monkeypatch.setattr(inference, "measure_latency", lambda module, x, **kw: 0.001 * x.shape[0])
    m = inference.measure(mlp(), torch.randn(2, 64), batch_sizes=(1, 8))
    assert m.latency == {1: (0.001, 0.001), 8: (0.008, 0.008)} and m.speedup(1) == 1.0
    assert (m.dense_held_bytes, m.held_bytes) == m.summary.held_bytes()
    from sparsenn.cli.commands import _print_conversion

    import io
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _print_conversion(m)
    assert f"the converted model's layers hold {m.held_bytes / 1024:.1f} KiB" in out.getvalue()


# ------------------------------------------------------------------ progress, compile, layout


def test_progress_bar_per_layer_and_quiet_mode(capsys):
    model = mlp()
    try:
        pg.set_quiet(False)
        sn.convert(model, torch.randn(2, 64), batch_sizes=(1,), force="csr", progress=True)
        err = capsys.readouterr().err
        assert "convert" in err and "layer" in err
        pg.set_quiet(True)
        sn.convert(model, torch.randn(2, 64), batch_sizes=(1,), force="csr", progress=True)
        assert capsys.readouterr().err == ""
        sn.convert(model, torch.randn(2, 64), batch_sizes=(1,), force="csr")  # library default: silent
        pg.set_quiet(False)
        sn.convert(model, torch.randn(2, 64), batch_sizes=(1,), force="csr")
        assert capsys.readouterr().err == ""
    finally:
        pg.set_quiet(None)


def test_torch_compile_of_a_converted_model_matches_eager():
    """Dynamo used to trace into the kernels' NumPy arrays and fail under inference_mode (a guard
    on those arrays); the sparse layers now run eagerly behind a graph break. backend="eager": the
    failure was in dynamo, and inductor would take seconds to compile even this MLP."""
    torch._dynamo.reset()
    model = mlp()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), force="csr")
    conv[2] = SparseLinear.from_linear(model[2], {1: "dense", 8: "csr"},  # a mixed layer: dense at batch 1
                                       {"csr": sn.kernels.pack(model[2].weight, "csr")})
    compiled = torch.compile(conv, backend="eager")
    for ctx in (torch.inference_mode, torch.no_grad):
        for b in (1, 8, 8):
            x = torch.randn(b, 64)
            with ctx():
                assert torch.equal(compiled(x), conv(x)) and close(conv(x), model(x))
    torch._dynamo.reset()


def test_conversion_modules_are_small_and_keep_their_names():
    from sparsenn.backend.runtime import conversion

    assert conversion.INPUT_SPEC_ATTR == inputs.INPUT_SPEC_ATTR
    assert callable(conversion._replace) and callable(conversion.attach_input_check)
    assert conversion.kernel_key("bsr", {"h": 4, "w": 1}) == "bsr4x1"
    folder = Path(conversion.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert max(sizes.values()) < 500, sizes
    lines = Path(conversion.__file__).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def convert("))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(("def ", "# ---")))
    assert end - start < 80  # convert() is a sequence of named steps


def test_sparse_conv_output_has_the_layout_of_the_input():
    """The kernels write pixel-major (channels_last) outputs; handed on as a strided view to an NCHW
    model, its next BN/add/conv ran up to 3.5x slower and the whole-model check rejected a ResNet-18
    whose layers had each measured faster."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(model[0].weight.shape) > 0.8)
    x = torch.randn(2, 8, 5, 5)
    conv = sn.convert(model, x, batch_sizes=(2,), force="csr")
    assert conv(x).is_contiguous() and conv[0](x[0]).is_contiguous() and close(conv(x), model(x))
    xl = x.contiguous(memory_format=torch.channels_last)
    y = conv(xl)
    assert y.is_contiguous(memory_format=torch.channels_last) and close(y, model(xl))
    assert model(xl).is_contiguous(memory_format=torch.channels_last)  # what F.conv2d does


@pytest.mark.parametrize("module,x0", [
    (nn.Linear(8, 4), torch.randn(3, 8)),
    (nn.Linear(8, 4), torch.randn(3, 5, 8)),  # leading dims are rows
    (nn.Linear(8, 4), torch.randn(15, 8)),  # not the model's batch: rows scale with it
    (nn.Conv2d(2, 4, 3, stride=2, padding=1), torch.randn(3, 2, 9, 7)),
    (nn.Conv2d(2, 4, 3), torch.randn(2, 9, 7)),  # unbatched
])
def test_rows_are_predicted_without_building_the_input(module, x0):
    from sparsenn.backend.runtime.survey import layer_input, rows_at

    for b in (1, 2, 7, 64):
        y = module(layer_input(x0, module, b, 3))
        linear = isinstance(module, nn.Linear)
        rows = y.numel() // y.shape[-1] if linear else y.shape[0] * y.shape[-2] * y.shape[-1]
        assert rows_at(x0, module, b, 3) == rows


def test_dense_path_of_a_mixed_layer_still_is_f_linear():
    lin = mlp()[0]
    layer = SparseLinear.from_linear(lin, {1: "dense", 64: "csr"}, {"csr": sn.kernels.pack(lin.weight, "csr")})
    x = torch.randn(1, 64)
    assert torch.equal(layer(x), F.linear(x, lin.weight, lin.bias))
