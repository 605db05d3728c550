"""The inference runtime: conversion against the dense model, choices, bad input, save/load."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sparsenn as sn
from sparsenn import runtime
from sparsenn.core.masks import attach_mask
from sparsenn.backend.runtime import SparseConv2d, SparseLinear, inputs, timing
from sparsenn.backend.runtime.layers import _nearest


def prune_(model, sparsity=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
    return model.eval()


def mlp(d=64, h=128, seed=0):
    torch.manual_seed(seed)
    return prune_(nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)))


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_convert_matches_dense_and_summarizes():
    model = mlp()
    x = torch.randn(3, 64)
    conv = sn.convert(model, x, batch_sizes=(1, 8), budget=0.01)
    for b in (1, 2, 8, 33):
        xb = torch.randn(b, 64)
        assert close(conv(xb), model(xb))
    s = conv.conversion_summary
    assert [r.name for r in s.layers] == ["0", "2", "4"] and s.batch_sizes == (1, 8)
    for r in s.layers:
        assert r.sparsity == pytest.approx(0.9, abs=0.05) and set(r.choice) == {1, 8}
        for b, k in r.choice.items():  # sparse only where measured faster than dense by the margin
            assert k == "dense" or r.times[b][k] < r.times[b]["dense"] * (1 - s.margin)
        assert r.converted == isinstance(conv.get_submodule(r.name), SparseLinear)
    # the whole model is timed where some layer runs sparse; elsewhere it is the dense model (1.00x)
    assert set(s.model_times) == {b for b in (1, 8) if s.sparse_at(b)}
    for b, (dense, converted) in s.model_times.items():  # never measured slower: a tie goes to dense
        assert converted < dense and s.speedup(b) == dense / converted
    text = str(s)
    for b in (1, 8):
        if not s.sparse_at(b):
            assert s.speedup(b) == 1.0 and f"batch {b}: every layer dense: the dense model (1.00x)" in text
    assert "batch 1" in text and "batch 8" in text and "0" in text
    d = s.to_dict()
    json.dumps(d)
    assert [r["name"] for r in d["layers"]] == ["0", "2", "4"] and len(s.to_records()) == 3
    assert model[0].__class__ is nn.Linear  # the original model is untouched


@pytest.mark.parametrize("kernel", ["csr", "csr_panel"])
def test_forced_kernels_match_dense(kernel):
    model = mlp()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 64), force=kernel)
    assert all(isinstance(conv[i], SparseLinear) for i in (0, 2, 4))
    assert conv[0].plan == {1: kernel, 64: kernel}
    for b in (1, 5, 64, 100):
        x = torch.randn(b, 64)
        assert close(conv(x), model(x))
    x3 = torch.randn(2, 3, 64)  # leading dims are rows
    assert close(conv[0](x3), model[0](x3))


def test_nm_and_block_weights_get_their_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    with torch.no_grad():
        model[0].weight.mul_(sn.topk_mask(model[0].weight.abs(), "2:4", 0.5))
        model[2].weight.mul_(sn.topk_mask(model[2].weight.abs(), "block4x4", 0.25))
    conv = sn.convert(model, torch.randn(1, 64), batch_sizes=(1, 16), force="nm")
    assert conv[0].plan == {1: "nm", 16: "nm"} and isinstance(conv[2], nn.Linear)
    assert "forced kernel 'nm' does not fit" in conv.conversion_summary.layer("2").note
    conv = sn.convert(model, torch.randn(1, 64), batch_sizes=(1, 16), force="bsr")
    assert conv[2].plan == {1: "bsr4x4", 16: "bsr4x4"}
    for b in (1, 16):
        x = torch.randn(b, 64)
        assert close(conv(x), model(x))


def test_masked_and_parametrized_weights_are_read_through_their_effective_weights():
    model = mlp(seed=1)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn_like(m.weight))  # dense again
    attach_mask(model[0], "weight", torch.rand(model[0].weight.shape) > 0.8)

    class Halve(nn.Module):
        def forward(self, w):
            return w * (w.abs() > 0.5)

    parametrize.register_parametrization(model[2], "weight", Halve())
    x = torch.randn(4, 64)
    conv = sn.convert(model, x, batch_sizes=(4,), force="csr")
    assert close(conv(x), model(x))
    assert "0.weight_mask" in model.state_dict() and not any(k.endswith("_mask") for k in conv.state_dict())
    assert conv.conversion_summary.layer("0").sparsity == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize("kw", [
    dict(kernel_size=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=2, padding=(2, 1), dilation=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect", bias=False),
    dict(kernel_size=3, padding="same"),
])
def test_conv2d_matches_dense(kw):
    torch.manual_seed(0)
    model = prune_(nn.Sequential(nn.Conv2d(8, 16, **kw), nn.ReLU()), 0.8)
    x = torch.randn(2, 8, 9, 10)
    conv = sn.convert(model, x, batch_sizes=(1, 2), force="csr_panel")
    assert isinstance(conv[0], SparseConv2d)
    assert close(conv(x), model(x))
    assert close(conv(x[:1]), model(x[:1]))
    assert close(conv[0](x[0]), model[0](x[0]))  # unbatched (C, H, W)


def test_unconvertible_layers_stay_dense_and_are_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
            self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)
            self.fp16 = nn.Linear(16, 16).half()
            self.unused = nn.Linear(16, 16)

        def forward(self, idx):
            h = self.emb(idx)
            h = self.conv1d(h.transpose(1, 2)).transpose(1, 2)
            h = h + self.depthwise(h.reshape(-1, 4, 2, 2)).reshape(h.shape)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.fc(h) + self.fp16(h.half()).float()

    model = prune_(Net())
    idx = torch.randint(0, 20, (2, 5))
    conv = sn.convert(model, idx, batch_sizes=(2,), force="csr")
    assert close(conv(idx), model(idx))
    notes = {r.name: r.note for r in conv.conversion_summary.layers}
    assert "Embedding is not converted" in notes["emb"]
    assert "Conv1d is not converted" in notes["conv1d"]
    assert "groups=4" in notes["depthwise"]
    assert "not called as a module" in notes["attn.out_proj"] and "not called" in notes["unused"]
    assert "weight dtype float16" in notes["fp16"]
    assert isinstance(conv.fc, SparseLinear) and type(conv.fp16) is nn.Linear
    assert "attn" in notes and "emb" in str(conv.conversion_summary)


def test_bad_input_shape_and_dtype_are_clear_errors():
    # default: the layers check their own input (sparse path: before the kernel reads it)
    conv = sn.convert(mlp(), torch.randn(2, 64), batch_sizes=(2,), force="csr")
    with pytest.raises(ValueError, match=r"SparseLinear '0' expects input of shape \(\*, 64\), got \(2, 63\)"):
        conv(torch.randn(2, 63))
    with pytest.raises(TypeError, match="SparseLinear '0' expects float32 input, got float64"):
        conv(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="SparseLinear '0' expects a tensor, got list"):
        conv[0]([[0.0] * 64])
    with pytest.raises(ValueError, match=r"SparseLinear '2' expects input of shape \(\*, 128\), got \(\)"):
        conv[2](torch.tensor(1.0))
    assert conv(torch.randn(3, 2, 64)).shape == (3, 2, 10)  # leading dims are rows, as for nn.Linear
    # with check_inputs=True the model's input is checked against the example before any layer runs
    strict = sn.convert(mlp(), torch.randn(2, 64), batch_sizes=(2,), force="csr", check_inputs=True)
    with pytest.raises(ValueError, match=r"expects shape \(B, 64\) \(any batch size B\), got \(2, 63\)"):
        strict(torch.randn(2, 63))
    with pytest.raises(TypeError, match="expects dtype float32, got float64"):
        strict(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expects shape \(B, 64\)"):
        strict(torch.randn(3, 2, 64))


def test_bad_input_on_the_dense_path_gives_the_layers_error():
    # a layer sparse at batch 64 and dense at batch 1: the dense path runs F.linear unchecked,
    # and a wrong input there is reported like on the sparse path
    lin = mlp()[0]
    layer = SparseLinear.from_linear(lin, {1: "dense", 64: "csr"}, {"csr": sn.kernels.pack(lin.weight, "csr")},
                                     label="fc")
    x = torch.randn(1, 64)
    assert torch.equal(layer(x), F.linear(x, lin.weight, lin.bias))
    for rows in (1, 64):
        with pytest.raises(ValueError, match=r"SparseLinear 'fc' expects input of shape \(\*, 64\), got"):
            layer(torch.randn(rows, 63))
        with pytest.raises(TypeError, match="SparseLinear 'fc' expects float32 input, got float64"):
            layer(torch.randn(rows, 64, dtype=torch.float64))
    conv2d = prune_(nn.Conv2d(4, 8, 3, padding=1))
    sc = SparseConv2d.from_conv(conv2d, {1: "dense", 10_000: "csr"}, {"csr": sn.kernels.pack(conv2d.weight, "csr")},
                                label="c")
    xc = torch.randn(1, 4, 5, 5)
    assert close(sc(xc), conv2d(xc)) and close(sc(xc[0]), conv2d(xc[0]))
    with pytest.raises(ValueError, match=r"SparseConv2d 'c' expects input of shape \(N, 4, H, W\)"):
        sc(torch.randn(1, 3, 5, 5))
    with pytest.raises(TypeError, match="SparseConv2d 'c' expects float32 input, got float64"):
        sc(xc.double())


def test_all_dense_result_is_the_dense_model_and_raises_pytorchs_errors(monkeypatch):
    def dense_wins(fns, **kw):
        return {k: (1.0 if k == "dense" else 2.0) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", dense_wins)
    model = mlp()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), screen=False)
    assert all(type(conv[i]) is nn.Linear for i in (0, 2, 4)) and not conv._forward_pre_hooks
    s = conv.conversion_summary
    assert s.model_times == {} and s.speedup(1) == s.speedup(8) == 1.0  # the dense model: nothing to time
    assert "the converted model is the dense model" in str(s) and "(1.00x)" in str(s)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # what the dense model says
        conv(torch.randn(2, 63))
    strict = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 8), check_inputs=True)  # asked for: kept
    with pytest.raises(ValueError, match=r"expects shape \(B, 64\)"):
        strict(torch.randn(2, 63))


def test_bad_arguments_are_named():
    model = mlp()
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="batch_sizes must hold positive integers, got 0"):
        sn.convert(model, x, batch_sizes=(0, 4))
    with pytest.raises(ValueError, match="batch_sizes must be a non-empty sequence"):
        sn.convert(model, x, batch_sizes=64)
    with pytest.raises(ValueError, match=r"margin must be a number in \[0, 1\), got 1.5"):
        sn.convert(model, x, margin=1.5)
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        sn.convert(model, "x")
    with pytest.raises(ValueError, match="unknown kernels \\['nope'\\]; valid kernels: bitmask, bitmask_bf16, bitmask_int8, bsr, conv, csr, csr_panel, dense_bf16, dense_int8, nm"):
        sn.convert(model, x, kernels=["nope"])


def test_dispatch_uses_the_nearest_measured_batch():
    plan = {1: "csr", 64: "dense"}
    assert [_nearest(plan, r) for r in (1, 2, 7, 8, 9, 64, 1000)] == \
        ["csr", "csr", "csr", "dense", "dense", "dense", "dense"]  # 8 = sqrt(64): the tie goes up
    layer = SparseLinear.from_linear(mlp()[0], plan, {"csr": sn.kernels.pack(mlp()[0].weight, "csr")})
    x = torch.randn(100, 64)
    assert close(layer(x), mlp()[0](x)) and close(layer(x[:1]), mlp()[0](x[:1]))


def test_save_and_load_without_measuring(tmp_path, monkeypatch):
    model = mlp()
    x = torch.randn(5, 64)
    conv = sn.convert(model, x, batch_sizes=(1, 5), force="csr_panel", check_inputs=True)
    path = runtime.save(conv, tmp_path / "m.safetensors")

    def no_timing(*a, **k):
        raise AssertionError("load must not measure")

    monkeypatch.setattr(timing, "interleaved_medians", no_timing)
    loaded = runtime.load(path, mlp(seed=3))  # the architecture, other weights
    assert torch.equal(loaded(x), conv(x))
    assert loaded[0].plan == conv[0].plan and loaded.conversion_summary.to_dict() == conv.conversion_summary.to_dict()
    with pytest.raises(ValueError, match=r"expects shape \(B, 64\)"):
        loaded(torch.randn(1, 32))
    with pytest.raises(ValueError, match="does not fit the model"):
        runtime.load(path, nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                         nn.Linear(128, 11)))
    with pytest.raises(ValueError, match="is not a converted sparsenn model"):
        sn.save(tmp_path / "ckpt.safetensors", model)
        runtime.load(tmp_path / "ckpt.safetensors", mlp())


def test_torch_save_and_state_dict_round_trip(tmp_path):
    model = mlp()
    x = torch.randn(4, 64)
    conv = sn.convert(model, x, batch_sizes=(4,), force="csr")
    torch.save(conv, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(again(x), conv(x))
    layer = conv[2]
    skeleton = SparseLinear(128, 128, {1: "dense"}, {k: layer.packed(k) for k in layer.kernel_meta},
                            weight=torch.zeros(128, 128), bias=torch.zeros(128))
    skeleton.load_state_dict(layer.state_dict(), strict=False)  # the plan comes with the extra state
    assert skeleton.plan == layer.plan
    h = torch.randn(4, 128)
    assert torch.equal(skeleton(h), layer(h))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (2:4 semi-structured sparse tensors)")
def test_cuda_24_layers_use_semi_structured_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128)).half().cuda().eval()
    with torch.no_grad():
        model[0].weight.mul_(sn.topk_mask(model[0].weight.abs().float(), "2:4", 0.5).cuda())
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    conv = sn.convert(model, x, batch_sizes=(64,), force="semi_structured")
    assert conv[0].plan == {64: "semi_structured"}
    assert torch.allclose(conv(x), model(x), rtol=1e-2, atol=1e-2)
    measured = sn.convert(model, x, batch_sizes=(64,))
    assert torch.allclose(measured(x), model(x), rtol=1e-2, atol=1e-2)


def test_f_linear_reference_is_what_dense_layers_compute():
    # the dense fallback of SparseLinear is F.linear itself
    lin = mlp()[0]
    layer = SparseLinear.from_linear(lin, {1: "dense"})
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, lin.weight, lin.bias))


@pytest.fixture
def seen(monkeypatch):
    """``{"batch": b}``: the batch size of the latest whole-model call (``inputs.call_model``)."""
    seen, real_call = {}, inputs.call_model

    def call(model, x):
        seen["batch"] = x.shape[0]
        return real_call(model, x)

    monkeypatch.setattr(inputs, "call_model", call)
    return seen


def test_whole_model_check_falls_back_to_dense_where_the_converted_model_is_slower(monkeypatch, seen):
    slow_at = {1}  # batch sizes where the (faked) whole-model timing finds the converted model slower

    def fake_times(fns, **kw):  # every kernel beats its dense layer
        if "converted" in fns:
            fns["converted"]()  # records its batch size
            return {"dense": 1.0, "converted": 2.0 if seen["batch"] in slow_at else 0.5}
        return {k: (1.0 if k == "dense" else 0.5) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", fake_times)
    model = mlp()
    conv = sn.convert(model, torch.randn(4, 64), batch_sizes=(1, 8), screen=False)
    s = conv.conversion_summary
    assert all(r.choice[1] == "dense" and r.choice[8] != "dense" for r in s.layers)
    assert all(isinstance(conv[i], SparseLinear) and conv[i].kernel_for(1) == "dense" for i in (0, 2, 4))
    assert "batch 1: the converted model measured 2000.0000 ms vs dense 1000.0000 ms (not faster)" in str(s)
    assert 1 not in s.model_times and s.speedup(1) == 1.0 and s.model_times[8] == (1.0, 0.5)
    for b in (1, 8):
        x = torch.randn(b, 64)
        assert close(conv(x), model(x))
    slow_at.add(8)  # slower at every batch size: the dense modules come back
    conv = sn.convert(model, torch.randn(4, 64), batch_sizes=(1, 8), screen=False)
    assert all(type(conv[i]) is nn.Linear for i in (0, 2, 4))
    assert "after the whole-model check" in conv.conversion_summary.layer("0").note


def test_whole_model_check_has_no_margin_and_looks_twice(monkeypatch, seen):
    looks = {}  # batch -> timings handed out in turn: a tie at batch 1; batch 8 faster, then slower on the second look
    plan = {1: [(1.0, 1.0)], 8: [(1.0, 0.5), (1.0, 1.2), (1.0, 1.1)]}

    def fake_times(fns, **kw):
        if "converted" in fns:
            fns["converted"]()
            b = seen["batch"]
            i = looks.get(b, 0)
            looks[b] = i + 1
            d, c = plan[b][min(i, len(plan[b]) - 1)]
            return {"dense": d, "converted": c}
        if set(fns) == {"dense"}:
            return {"dense": 1.0}
        return {k: (1.0 if k == "dense" else 0.5) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", fake_times)
    model = mlp()
    conv = sn.convert(model, torch.randn(4, 64), batch_sizes=(1, 8), screen=False)
    s = conv.conversion_summary
    assert all(type(conv[i]) is nn.Linear for i in (0, 2, 4))  # a tie at 1, slower on the 2nd look at 8
    assert all(set(r.choice.values()) == {"dense"} for r in s.layers)
    text = str(s)
    assert "batch 1: the converted model measured" in text and "batch 8: the converted model measured" in text
    assert looks == {1: 1, 8: 2}  # batch 8 passed the first look and failed the second
    assert "(not faster)" in text and "the converted model is the dense model" in text and s.model_times == {}
    for b in (1, 8):
        x = torch.randn(b, 64)
        assert torch.equal(conv(x), model(x))


def test_dense_path_of_a_mixed_layer_is_f_linear_without_checks():
    lin = mlp()[0]
    layer = SparseLinear.from_linear(lin, {1: "dense", 64: "csr"}, {"csr": sn.kernels.pack(lin.weight, "csr")})
    x1, x64 = torch.randn(1, 64), torch.randn(64, 64)
    layer(x1), layer(x64)  # the plan's route is memoized per row count

    def no_checks(x):
        raise AssertionError("the dense path must not check its input")

    layer._check_input = no_checks
    assert torch.equal(layer(x1), F.linear(x1, lin.weight, lin.bias))
    with pytest.raises(AssertionError, match="must not check"):  # the sparse path checks before the kernel
        layer(x64)
    del layer._check_input
    layer.forced = "csr"  # measuring: overrides the memo
    assert close(layer(x1), lin(x1)) and layer.kernel_for(1) == "csr"
    layer.forced = None
    assert layer.kernel_for(1) == "dense"
    layer.set_plan(1, "csr")  # a new plan drops the memo
    assert layer.kernel_for(1) == "csr" and close(layer(x1), lin(x1))


def test_unconvertible_layers_stay_dense_when_measured(monkeypatch):
    # measured (not forced): a grouped conv, a Conv1d and coupled BatchNorm masks (1-D) stay as they are
    from sparsenn.structured.channels import couple_batchnorm

    def sparse_wins(fns, **kw):
        if "converted" in fns:
            return {"dense": 1.0, "converted": 0.5}
        return {k: (1.0 if k == "dense" else 0.5) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", sparse_wins)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.conv1d = nn.Conv1d(8, 4, 1)
            self.fc = nn.Linear(4 * 36, 10)

        def forward(self, x):
            h = self.grouped(torch.relu(self.bn(self.conv(x))))
            return self.fc(self.conv1d(h.flatten(2)).flatten(1))

    torch.manual_seed(0)
    model = Net().eval()
    for m in (model.conv, model.grouped, model.fc):
        attach_mask(m, "weight", torch.rand(m.weight.shape) > 0.9)
    mask = torch.ones(model.conv.weight.shape, dtype=torch.bool)
    mask[[2, 5]] = False
    attach_mask(model.conv, "weight", mask & (torch.rand(mask.shape) > 0.5))
    x = torch.randn(2, 3, 6, 6)
    assert couple_batchnorm(model, x) == {"bn": 2}
    conv = sn.convert(model, x, batch_sizes=(1, 2), screen=False)
    assert close(conv(x), model(x)) and close(conv(x[:1]), model(x[:1]))
    s = conv.conversion_summary
    notes = {r.name: r.note for r in s.layers}
    assert "groups=2" in notes["grouped"] and type(conv.grouped) is nn.Conv2d
    assert "Conv1d is not converted" in notes["conv1d"] and type(conv.conv1d) is nn.Conv1d
    assert isinstance(conv.conv, SparseConv2d) and isinstance(conv.fc, SparseLinear)
    # no matrix weight: not a layer to convert (folded into the convolution before it instead)
    assert "bn" not in notes and type(conv.bn) is nn.Identity and conv.folded_batchnorm == [("conv", "bn")]
    assert "groups=2" in str(s) and "Conv1d is not converted" in str(s)


def test_formats_larger_than_dense_never_chosen_for_matrix_vector_products(monkeypatch):
    """Up to SPMV_MAX_ROWS rows the product is bound by reading the weight: a CSR of a dense weight
    (1.5x its bytes) must not be chosen there even if its timing happens to come out faster."""
    def fake_medians(fns, **kwargs):  # every sparse candidate "measures" 3x faster than dense
        return {k: (1.0 if k == "dense" else 0.3) for k in fns}

    monkeypatch.setattr(timing, "interleaved_medians", fake_medians)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))  # 0% sparse: CSR is larger than dense
    conv = sn.convert(model, torch.randn(1, 64), batch_sizes=(1, 64), verify=False, screen=False)
    layer = conv.conversion_summary.layers[0]
    assert layer.choice[1] == "dense"
    assert layer.choice[64] != "dense"  # batched products may still pick a bigger format
    assert all(layer.bytes[k] > 64 * 64 * 4 for k in layer.bytes if k != "dense" and k.startswith("csr"))


@pytest.mark.parametrize("kernel", ["csr", "csr_panel"])
def test_a_replaced_buffer_is_what_the_next_product_reads(kernel):
    """Assigning a buffer (``layer.bias = ...``) after a call must not leave the kernels reading the old one."""
    model = mlp()
    conv = sn.convert(model, torch.randn(2, 64), batch_sizes=(1, 64), force=kernel)
    x = torch.randn(3, 64)
    conv[0](x)  # the first product caches numpy views of the buffers
    with torch.no_grad():
        model[0].bias = nn.Parameter(torch.randn_like(model[0].bias))
    conv[0].bias = model[0].bias.detach().clone()
    assert close(conv[0](x), model[0](x))
    conv[0].bias = torch.ones(3)  # the wrong length is named, before a kernel reads it
    with pytest.raises(ValueError, match="bias"):
        conv[0](x)
