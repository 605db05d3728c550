"""runtime.load treats the file as hostile: every index, size and field is checked before a layer
is swapped in or a kernel runs; one error type (ArchiveError); the model unchanged on failure.

The packed arrays are read by numba kernels without bounds checks, so before these checks a
bad pointer or block height crashed the process (segfault, double free) and a short bias or
wrong N:M metadata gave wrong numbers. The tests here never run a kernel on unchecked data:
each asserts that the check raises first (and, for the layers' own state, that no kernel ran).
"""

import dataclasses
import functools
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

import sparsenn as sn
from sparsenn import kernels as K
from sparsenn import runtime
from sparsenn.backend.runtime import ArchiveError, SparseConv2d, SparseLinear
from sparsenn.backend.runtime.io import digest
from sparsenn.backend.runtime.validate import DENSE_ROUTES
from sparsenn.core.masks import attach_mask

KINDS = ("csr", "csr_panel", "nm", "bsr")
X = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))


def arch(seed=0):
    """The dense architecture (fresh weights): what load needs besides the file."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()


def pruned(kind):
    model = arch()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (model[0], model[2]):
            if kind == "nm":
                mask = sn.topk_mask(m.weight.abs(), "2:4", 0.5)
            elif kind == "bsr":
                mask = sn.topk_mask(m.weight.abs(), "block4x4", 0.25)
            else:
                mask = torch.rand(m.weight.shape, generator=g) >= 0.9
            m.weight.mul_(mask)
    return model


@functools.lru_cache(maxsize=None)
def original(kind):
    """``(file bytes, {batch: output})`` of the 2-layer MLP converted with ``kind`` forced on both layers."""
    conv = sn.convert(pruned(kind), X[:2], batch_sizes=(1, 8), force=kind, check_inputs=True)
    assert all(isinstance(conv[i], SparseLinear) for i in (0, 2)), conv
    with tempfile.TemporaryDirectory() as d:
        data = Path(runtime.save(conv, Path(d) / "m.safetensors")).read_bytes()
    return data, {b: conv(X[:b]) for b in (1, 8)}


def target():
    """A fresh architecture with a mask attached (load removes masks, but only once the file is checked)."""
    model = arch(seed=3)
    attach_mask(model[0], "weight", torch.rand(32, 64) > 0.5)
    return model


def snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()
                                                 if isinstance(v, torch.Tensor)}


def assert_unchanged(model, snap):
    types, state = snapshot(model)
    assert types == snap[0]
    assert state.keys() == snap[1].keys() and all(torch.equal(state[k], snap[1][k]) for k in state)


def read(data, tmp):
    path = tmp / "in.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def write(path, tensors, meta, sign=True):
    meta = dict(meta)
    if sign:
        meta["sha256"] = digest(tensors, meta)
    path.write_bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return path


def load_fails(path, match, **kw):
    """load raises ArchiveError matching ``match`` and leaves the target as it was."""
    model = target()
    snap = snapshot(model)
    with pytest.raises(ArchiveError, match=match):
        runtime.load(path, model, **kw)
    assert_unchanged(model, snap)


# ------------------------------------------------------------------ one reproducer per finding


def _segment_with_two(ptr):
    """Start of the first segment holding at least two entries."""
    counts = np.diff(ptr.numpy())
    i = int(np.argmax(counts >= 2))
    assert counts[i] >= 2
    return int(ptr[i])


def _set(t, key, i, v):
    t[key] = t[key].clone()
    t[key].view(-1)[i] = v


def _meta(L, layer, key, field, v):
    L[layer]["state"]["kernel_meta"][key][field] = v


CASES = {
    # CSR pointers: out of range, negative, non-monotone (segfaults before), wrong start/length/dtype
    "ptr past the end": ("csr", lambda t, L: _set(t, "0.csr_ptr", -1, 10**6), r"ptr\[-1\] = 1000000"),
    "negative ptr": ("csr", lambda t, L: _set(t, "0.csr_ptr", 5, -10**6), "must not decrease"),
    "non-monotone ptr": ("csr_panel", lambda t, L: _set(t, "0.csr_panel_ptr", 1, int(t["0.csr_panel_ptr"][-1])),
                         "must not decrease"),
    "ptr not from 0": ("csr", lambda t, L: _set(t, "0.csr_ptr", 0, 1), r"ptr\[0\] must be 0"),
    "short ptr": ("csr", lambda t, L: t.update({"0.csr_ptr": t["0.csr_ptr"][:-1].clone()}), "ptr must have shape"),
    "int64 ptr": ("csr", lambda t, L: t.update({"0.csr_ptr": t["0.csr_ptr"].long()}), "ptr must be int32"),
    # CSR indices: outside the panel / the matrix, repeated, in the padding rows
    "idx outside panel": ("csr", lambda t, L: _set(t, "0.csr_idx", 0, 200), "outside its 64-column panel"),
    "idx past in": ("csr_panel", lambda t, L: _set(t, "0.csr_panel_idx", 0, 100), "points past in=64"),
    "repeated idx": ("csr", lambda t, L: _set(t, "0.csr_idx", _segment_with_two(t["0.csr_ptr"]) + 1,
                                              int(t["0.csr_idx"][_segment_with_two(t["0.csr_ptr"])])),
                     "increase strictly"),
    "entry in padding row": ("csr", lambda t, L: _set(t, "0.csr_ptr", 32, int(t["0.csr_ptr"][32]) - 1),
                             "rows past out=32"),
    # truncated values, metadata
    "truncated val": ("csr", lambda t, L: t.update({"0.csr_val": t["0.csr_val"][:-1].clone()}), "val must have shape"),
    "row block not 128": ("csr", lambda t, L: _meta(L, "0", "csr", "rows", 64), "'rows' must be 128"),
    "zero panel": ("csr", lambda t, L: _meta(L, "0", "csr", "panel", 0), "panel must be in"),
    "out mismatch": ("csr", lambda t, L: _meta(L, "0", "csr", "out", 33), "33x64 matrix, the layer is 32x64"),
    "string meta": ("csr", lambda t, L: _meta(L, "0", "csr", "out", "32"), "must map names to integers"),
    # bias: short, missing, extra, wrong dtype
    "short bias": ("csr", lambda t, L: t.update({"0.bias": t["0.bias"][:5].clone()}), r"bias must have shape \(32,\)"),
    "missing bias": ("csr", lambda t, L: t.pop("0.bias"), "has a bias, the file stores none"),
    "float64 bias": ("csr", lambda t, L: t.update({"0.bias": t["0.bias"].double()}), "bias must be float32"),
    # N:M metadata and offsets
    "nm wrong m": ("nm", lambda t, L: _meta(L, "0", "nm", "m", 8), "val must have shape"),
    "nm n >= m": ("nm", lambda t, L: (_meta(L, "0", "nm", "n", 4), _meta(L, "0", "nm", "m", 4)), "0 < n < m"),
    "nm m not dividing in": ("nm", lambda t, L: (_meta(L, "0", "nm", "n", 1), _meta(L, "0", "nm", "m", 3)),
                             "not a multiple of m=3"),
    "nm offset past m": ("nm", lambda t, L: _set(t, "0.nm_off", 0, 7), "outside a group of m=4"),
    "nm repeated offset": ("nm", lambda t, L: _set(t, "0.nm_off", 1, int(t["0.nm_off"][0])), "increase strictly"),
    # BSR: block columns, block height (a double free before), width, shapes, order
    "bsr column out of range": ("bsr", lambda t, L: _set(t, "0.bsr4x4_col", 0, 60000), "outside \\[0, 16\\)"),
    "bsr other height": ("bsr", lambda t, L: _meta(L, "0", "bsr4x4", "h", 16), "ptr must have shape"),
    "bsr bad height": ("bsr", lambda t, L: _meta(L, "0", "bsr4x4", "h", 3), "block height must be one of"),
    "bsr zero width": ("bsr", lambda t, L: _meta(L, "0", "bsr4x4", "w", 0), "block width must be a positive"),
    "bsr val shape": ("bsr", lambda t, L: t.update({"0.bsr4x4_val": t["0.bsr4x4_val"][:, :, :2].contiguous()}),
                      "val must have shape"),
    "bsr ptr past end": ("bsr", lambda t, L: _set(t, "0.bsr4x4_ptr", -1, 10**6), r"ptr\[-1\]"),
    "bsr unsorted": ("bsr", lambda t, L: _set(t, "0.bsr4x4_col", _segment_with_two(t["0.bsr4x4_ptr"]) + 1, 0),
                     "increase strictly"),
    # plan, state, layer entries
    "empty plan": ("csr", lambda t, L: L["0"]["state"].update(plan={}), "plan must have 1 to"),
    "plan to unheld kernel": ("csr", lambda t, L: L["0"]["state"].update(plan={"1": "bsr2x2"}), "routes '1' rows"),
    "plan key 0": ("csr", lambda t, L: L["0"]["state"].update(plan={"0": "csr"}), "positive row counts"),
    "dense without weight": ("csr", lambda t, L: L["0"]["state"].update(plan={"1": "dense"}),
                             "holds no tensor '0.weight'"),
    "unknown kernel": ("csr", lambda t, L: L["0"]["state"]["kernel_of"].update(csr="cusparse"), "names kernel"),
    "missing array name": ("csr", lambda t, L: L["0"]["state"]["kernel_arrays"].update(csr=["ptr", "idx"]),
                           "expected arrays"),
    "state without meta": ("csr", lambda t, L: L["0"]["state"].pop("kernel_meta"), "state must have keys"),
    "unknown layer type": ("csr", lambda t, L: L["0"].update(type="SparseFoo"), "must be {type"),
    "string size": ("csr", lambda t, L: L["0"]["config"].update(in_features="64"), "in_features must be an integer"),
    "wrong size": ("csr", lambda t, L: L["0"]["config"].update(in_features=65), "does not fit the model"),
    "layer not in model": ("csr", lambda t, L: L.update({"9": L["0"]}), "not modules of the given model"),
    "stray tensor": ("csr", lambda t, L: t.update({"0.csr_extra": torch.zeros(3)}), "unexpected"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_packed_state_is_an_archive_error_before_anything_changes(case, tmp_path):
    kind, mutate, match = CASES[case]
    tensors, meta = read(original(kind)[0], tmp_path)
    layers = json.loads(meta["layers"])
    mutate(tensors, layers)
    meta["layers"] = json.dumps(layers)
    load_fails(write(tmp_path / "bad.safetensors", tensors, meta), match)


def test_the_untouched_files_load_and_match(tmp_path):
    for kind in KINDS:
        data, outs = original(kind)
        (tmp_path / "m.safetensors").write_bytes(data)
        loaded = runtime.load(tmp_path / "m.safetensors", target())
        assert "0.weight_mask" not in loaded.state_dict()
        for b, y in outs.items():
            assert torch.equal(loaded(X[:b]), y)


def test_metadata_json_is_checked(tmp_path):
    tensors, meta = read(original("csr")[0], tmp_path)
    bad = {
        "layers": ("{not json", "'layers' is not valid JSON"),
        "summary": ('{"layers": [{"name": 1}]}', "'summary' is malformed"),
        "input_spec": ('[{"kind": "arg", "key": 0, "shape": [64], "ndim": 2, "dtype": "load"}]',
                       "dtype must name a torch dtype"),
        "version": ("3", "reads <= 2"),
    }
    for key, (value, match) in bad.items():
        load_fails(write(tmp_path / "bad.safetensors", tensors, {**meta, key: value}), match)
    load_fails(write(tmp_path / "bad.safetensors", tensors, {**meta, "layers": "[1, 2]"}), "must be a JSON object")
    load_fails(write(tmp_path / "bad.safetensors", tensors, {**meta, "extra": "1"}), r"unknown \['extra'\]")
    unsigned = {k: v for k, v in meta.items() if k != "sha256"}
    load_fails(write(tmp_path / "bad.safetensors", tensors, unsigned, sign=False), r"missing \['sha256'\]")


def test_conv_layers_must_fit_the_architecture(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(torch.rand(m.weight.shape) >= 0.8)
    x = torch.randn(2, 3, 6, 6)
    conv = sn.convert(model, x, batch_sizes=(2,), force="csr")
    assert isinstance(conv[0], SparseConv2d)
    path = runtime.save(conv, tmp_path / "c.safetensors")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    assert torch.equal(runtime.load(path, fresh)(x), conv(x))
    strided = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    snap = snapshot(strided)
    with pytest.raises(ArchiveError, match=r"does not fit the model: 0: file Conv2d\(3, 8.*stride=\(1, 1\)"):
        runtime.load(path, strided)
    assert_unchanged(strided, snap)
    tensors, meta = read(path.read_bytes(), tmp_path)
    layers = json.loads(meta["layers"])
    layers["0"]["config"]["padding_mode"] = "bogus"
    meta["layers"] = json.dumps(layers)
    with pytest.raises(ArchiveError, match="padding_mode must be one of"):
        runtime.load(write(tmp_path / "bad.safetensors", tensors, meta), model)


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    """Before: the sparse layers were swapped in (and masks removed) before the state_dict check failed."""
    tensors, meta = read(original("csr")[0], tmp_path)
    tensors["2.csr_val"] = tensors["2.csr_val"][:-1].clone()  # the second layer is bad, the first fine
    load_fails(write(tmp_path / "bad.safetensors", tensors, meta), "layer '2'")
    tensors, meta = read(original("csr")[0], tmp_path)
    tensors["surplus"] = torch.zeros(1)  # only the whole-state_dict check sees this
    load_fails(write(tmp_path / "bad.safetensors", tensors, meta), r"unexpected \['surplus'\]")


def test_a_single_layer_model_loads_as_its_sparse_layer(tmp_path):
    conv = sn.convert(pruned("csr")[0], X[:2], batch_sizes=(8,), force="csr")
    assert isinstance(conv, SparseLinear)
    path = runtime.save(conv, tmp_path / "l.safetensors")
    loaded = runtime.load(path, nn.Linear(64, 32))
    assert isinstance(loaded, SparseLinear) and torch.equal(loaded(X), conv(X))
    no_bias = nn.Linear(64, 32, bias=False)
    snap = snapshot(no_bias)
    with pytest.raises(ArchiveError, match="has no bias, the file stores one"):
        runtime.load(path, no_bias)
    assert_unchanged(no_bias, snap)


# ------------------------------------------------------------------ the safetensors header


def raw(header, data=b"", n=None):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if n is None else n) + text + data


HEADERS = {
    "too short": (b"\x01\x02", "too short"),
    "header longer than file": (struct.pack("<Q", 10**12) + b"{}", "declares a 1000000000000-byte header"),
    "not json": (struct.pack("<Q", 5) + b"{oops", "not valid JSON"),
    "not utf-8": (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
    "a list": (raw([1, 2]), "must be a JSON object"),
    "deep nesting": (struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    "metadata not strings": (raw({"__metadata__": {"format": 1}}), "map strings to strings"),
    "unknown dtype": (raw({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                      "unknown dtype 'F33'"),
    "absurd shape": (raw({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4),
                     "bytes, its offsets span 4"),
    "negative size": (raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
                      "non-negative integers"),
    "offsets past data": (raw({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4),
                          "data_offsets must be"),
    "overlap": (raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    "wrong format": (raw({"__metadata__": {"format": "pt"}}), "is not a converted sparsenn model"),
    "bad version": (raw({"__metadata__": {"format": "sparsenn-runtime", "version": "x"}}),
                    "version must be a positive integer"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_a_malformed_header_is_an_archive_error_before_reading_tensors(case, tmp_path):
    data, match = HEADERS[case]
    (tmp_path / "h.safetensors").write_bytes(data)
    load_fails(tmp_path / "h.safetensors", match)


def test_size_cap_and_digest(tmp_path):
    data, outs = original("csr")
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    load_fails(path, "more than max_bytes=1000", max_bytes=1000)
    assert torch.equal(runtime.load(path, target(), max_bytes=len(data))(X), outs[8])
    with pytest.raises(ValueError, match="max_bytes must be"):
        runtime.load(path, target(), max_bytes=-1)
    flipped = bytearray(data)
    flipped[-3] ^= 0x10  # a bit of the last tensor's values: only the digest can tell
    path.write_bytes(bytes(flipped))
    load_fails(path, "SHA-256 digest does not match")
    path.write_bytes(data[:-4])
    load_fails(path, "data_offsets must be")


def test_version_1_files_without_a_digest_still_load(tmp_path):
    tensors, meta = read(original("nm")[0], tmp_path)
    meta = {k: v for k, v in meta.items() if k != "sha256"} | {"version": "1"}
    loaded = runtime.load(write(tmp_path / "v1.safetensors", tensors, meta, sign=False), target())
    assert torch.equal(loaded(X), original("nm")[1][8])


# ------------------------------------------------------------------ the layers' own state (state_dict, pickle)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every kernel product run while the fixture is active (the kernels wrapped in a spy)."""
    calls = []
    for name in K.list_kernels():
        spec = K.KERNELS.get(name)

        def spy(*args, _matmul=spec.matmul, _name=name):
            calls.append(_name)
            return _matmul(*args)

        monkeypatch.setitem(K.KERNELS._items, name, dataclasses.replace(spec, matmul=spy))
    return calls


def test_a_layer_checks_loaded_state_before_its_first_product(kernel_calls, tmp_path):
    (tmp_path / "m.safetensors").write_bytes(original("csr")[0])
    layer = runtime.load(tmp_path / "m.safetensors", arch())[0]
    h = X[:4]
    kernel_calls.clear()  # (converting the original ran kernels)
    good = layer(h)
    assert kernel_calls == ["csr"]
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in layer.state_dict().items()}
    bad = {**sd, "csr_ptr": sd["csr_ptr"].clone()}
    bad["csr_ptr"][-1] = 10**6
    layer.load_state_dict(bad)  # torch copies tensors of the right shape as they are
    with pytest.raises(ArchiveError, match=r"SparseLinear '0': packed weight 'csr' \(csr\): ptr\[-1\]"):
        layer(h)
    assert kernel_calls == ["csr"]  # the kernel never saw the bad pointers
    plan = dict(layer.plan)
    with pytest.raises(ArchiveError, match="plan must have 1 to"):
        layer.load_state_dict({**sd, "_extra_state": {**sd["_extra_state"], "plan": {}}})
    assert layer.plan == plan
    with pytest.raises(ArchiveError, match="does not hold"):
        layer.load_state_dict({**sd, "_extra_state": {**sd["_extra_state"], "plan": {"1": "dense"}}})
    layer.load_state_dict(sd)
    assert torch.equal(layer(h), good)


def test_layout_checks_accept_every_pack(tmp_path):
    """What pack makes always passes its kernel's check (odd sizes, several panels and blocks)."""
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (130, 300), (129, 513)]:
        w = ((rng.random(shape) < 0.2) * rng.standard_normal(shape)).astype(np.float32)
        for kind, opts in [("csr", {}), ("csr_panel", {}), ("bsr", {"h": 1, "w": 1})]:
            assert K.pack(w, kind, **opts).problem() is None
    w = torch.randn(40, 64)
    for n, m in [(1, 2), (2, 4), (1, 8), (4, 8)]:
        wn = w * sn.topk_mask(w.abs(), f"{n}:{m}", n / m)
        wn[0] = 0
        assert K.pack(wn, "nm", n=n, m=m).problem() is None


# ------------------------------------------------------------------ fuzzing


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _header_end(data):
    return 8 + struct.unpack("<Q", data[:8])[0]


@st.composite
def byte_mutations(draw):
    kind = draw(st.sampled_from(KINDS))
    data = bytearray(original(kind)[0])
    end = _header_end(data)
    for _ in range(draw(st.integers(1, 3))):
        n = len(data)
        where = draw(st.one_of(st.integers(0, min(end, n) - 1), st.integers(0, n - 1)))  # the header often
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete"]))
        if op == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[where] = draw(st.sampled_from([0, 0x20, 0x22, 0x2C, 0x30, 0x39, 0x5B, 0x7B, 0x7D, 0xFF]))
        elif op == "truncate":
            del data[where:]
            if not data:
                break
        elif op == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[where:where + draw(st.integers(1, 8))]
            if not data:
                break
    return kind, bytes(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(byte_mutations())
def test_fuzz_file_bytes(fuzz_dir, mutation):
    """Flipped, replaced, inserted, deleted bytes and truncations: a clean ArchiveError, or (the change
    was harmless, e.g. in the header's padding) the original model's output bit for bit."""
    kind, data = mutation
    path = fuzz_dir / "bytes.safetensors"
    path.write_bytes(data)
    model = target()
    snap = snapshot(model)
    try:
        loaded = runtime.load(path, model)
    except ArchiveError as e:
        event("ArchiveError: " + str(e).replace(repr(str(path)), "")[:40])
        assert_unchanged(model, snap)
        return
    event("loaded")
    for b, y in original(kind)[1].items():
        assert torch.equal(loaded(X[:b]), y)


INTS = [-(2**31), -1, 0, 1, 2, 3, 4, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 65535, 2**31 - 1]
# finite: a NaN activation times a weight a kernel skips (or stores as a zero) is the kernels' semantics,
# not the file's, so the dense reference could not say what the right answer is
FLOATS = [0.0, -0.0, 1.0, -7.5, 1e3]
DTYPES = [np.int32, np.int64, np.uint8, np.uint16, np.int16, np.float32, np.float64]
META_VALUES = [*INTS, 2**31, 2**63, -(2**63), "4", None, 1.5, True, [1], {}]


@st.composite
def tensor_mutation(draw, tensors):
    """Change one tensor: an element, its length, dtype or shape, or drop it (numpy: torch lacks uint16 ops)."""
    name = draw(st.sampled_from(sorted(tensors)))
    old = tensors[name].numpy()
    a = old.reshape(-1).copy()
    op = draw(st.sampled_from(["set", "set", "set", "truncate", "extend", "dtype", "reshape", "delete", "swap"]))
    note(f"{op} {name}")
    if op == "delete":
        del tensors[name]
        return
    if op == "set" and a.size:
        i = draw(st.integers(0, a.size - 1))
        if a.dtype.kind == "f":
            a[i] = draw(st.sampled_from(FLOATS))
        else:
            info = np.iinfo(a.dtype)
            near = [*INTS, int(a[i]) + 1, int(a[i]) - 1]
            a[i] = draw(st.sampled_from([v for v in near if info.min <= v <= info.max]))
        note(f"  [{i}] = {a[i]} (was {old.reshape(-1)[i]})")
    elif op == "truncate" and a.size:
        a = a[:draw(st.integers(0, a.size - 1))]
    elif op == "extend":
        a = np.concatenate([a, a[-1:] if a.size else np.zeros(1, a.dtype)])
    elif op == "dtype":
        a = a.astype(draw(st.sampled_from(DTYPES)))
    elif op == "swap" and a.size > 1:
        i = draw(st.integers(0, a.size - 2))
        a[[i, i + 1]] = a[[i + 1, i]]
    if op == "reshape":
        a = a.reshape(1, -1)
    elif a.size == old.size:
        a = a.reshape(old.shape)
    tensors[name] = torch.from_numpy(np.ascontiguousarray(a))


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def meta_mutation(draw, trees):
    """Change one field of the metadata's JSON (the layers, the input check or the summary)."""
    paths = [p for p, _ in _paths(trees) if len(p) > 1]
    path = draw(st.sampled_from(paths))
    parent = trees
    for k in path[:-1]:
        parent = parent[k]
    op = draw(st.sampled_from(["set", "set", "delete", "kernel", "plan"]))
    note(f"{op} {path}")
    if op == "delete":
        del parent[path[-1]]
    elif op == "kernel":
        parent[path[-1]] = draw(st.sampled_from([*K.list_kernels(), *DENSE_ROUTES, "bsr4x4", "bsr2x2"]))
    elif op == "plan" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["0", "1", "-3", "8", "64", "x", "99999999999999999999"]))] = parent[path[-1]]
    else:
        old = parent[path[-1]]
        choices = META_VALUES + ([old + 1, old - 1, 2 * old] if isinstance(old, int) else [])
        parent[path[-1]] = draw(st.sampled_from(choices))


def meaning(model, x):
    """What the file says ``model`` computes: each sparse layer's route as a dense product with the matrix
    its packed arrays describe (read with the kernels' unpack, not with the kernels)."""
    for m in model:
        if isinstance(m, SparseLinear):
            kernel = m.kernel_for(x.shape[0])
            w = m.weight if kernel in DENSE_ROUTES else torch.from_numpy(m.packed(kernel).to_dense())
            x = F.linear(x, w, m.bias)
        else:
            x = m(x)
    return x


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.data())
def test_fuzz_hostile_contents(fuzz_dir, kind, data):
    """Index arrays, values, dtypes, shapes and JSON fields changed by someone who then signs the file
    (the digest does not stop a forger): a clean ArchiveError with the model unchanged, or a model
    that computes exactly what the file describes; never a crash."""
    tensors, meta = read(original(kind)[0], fuzz_dir)
    trees = {k: json.loads(meta[k]) for k in ("layers", "input_spec", "summary")}
    for _ in range(data.draw(st.integers(1, 2))):
        if data.draw(st.booleans()):
            data.draw(tensor_mutation(tensors))
        else:
            data.draw(meta_mutation(trees))
    meta.update({k: json.dumps(v) for k, v in trees.items()})
    path = write(fuzz_dir / "hostile.safetensors", tensors, meta)
    model = target()
    snap = snapshot(model)
    try:
        loaded = runtime.load(path, model)
    except ArchiveError as e:
        event("ArchiveError: " + str(e).replace(repr(str(path)), "").split(": ")[-1][:30])
        assert_unchanged(model, snap)
        return
    event("loaded")
    for b in (1, 8):
        try:
            y = loaded(X[:b])
        except (TypeError, ValueError) as e:  # the file's input check may now ask for other inputs
            assert "the converted model expects" in str(e)
            continue
        ref = meaning(loaded, X[:b])
        note(f"batch {b}: max difference {(y - ref).abs().max()}")
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4, equal_nan=True), (y, ref)
