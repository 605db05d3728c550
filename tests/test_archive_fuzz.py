"""Archives from strangers: byte flips, truncations and forged manifests give ArchiveError, nothing else,
with no large allocation, and leave the target model exactly as it was.

Forged archives are re-signed (their SHA-256 recomputed), so it is the checks of ``load``, not the
digest, that must refuse them."""

import copy
import json
import os
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save
from torch import nn

import sparsenn as sn
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.backend.runtime.header import read_header
from sparsenn.compress import archive

CAP = 1 << 20  # max_bytes of every load here: nothing a forged file declares may allocate more


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8), nn.BatchNorm1d(8))
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real archive of every exact codec: bitmask and masks (pruned), nm, dense, bits."""
    model = _model()
    sn.Sparsifier(model, sparsity=0.75, include=["0.weight"])
    with torch.no_grad():
        w = model[2].weight
        keep = w.reshape(-1, 4).abs().argsort(dim=1, descending=True)[:, :1]
        mask = torch.zeros(w.numel() // 4, 4, dtype=torch.bool).scatter_(1, keep, True).reshape(w.shape)
        w.mul_(mask).add_(0.0)  # 1:4, zeros as +0.0
        w[w == 0] = 0.0
    model[0].weight_mask[0, 0] = True  # a mask that is not the weight's zero pattern: stored as bits
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    path = archive.save(tmp_path_factory.mktemp("a") / "m.sparsenn", model)
    codecs_used = {e["codec"] for e in archive.read(path).manifest["tensors"].values()}
    assert codecs_used == {"bitmask", "nm", "dense", "bits"}, codecs_used
    return path, model


def _target():
    model = _model(seed=7)
    return model, copy.deepcopy(model.state_dict())


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) or (v.isnan().any() and
                                                  torch.equal(after[k].isnan(), v.isnan())) for k, v in before.items())


def _refused(path, match=None, model=None):
    model, before = (model, copy.deepcopy(model.state_dict())) if model is not None else _target()
    with pytest.raises(ArchiveError, match=match):
        archive.load(path, model, max_bytes=CAP)
    assert _unchanged(model, before)


# ----------------------------------------------------------------------------- raw bytes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_byte_flips_are_refused_or_harmless(saved, tmp_path, data):
    path, model = saved
    raw = bytearray(path.read_bytes())
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                               max_size=3))
    for at, xor in flips:
        raw[at] ^= xor
    bad = tmp_path / "flipped.sparsenn"
    bad.write_bytes(bytes(raw))
    target, before = _target()
    try:
        archive.load(bad, target, max_bytes=CAP)
    except ArchiveError:
        assert _unchanged(target, before)
    else:  # only a flip the format cannot see (JSON whitespace padding) may load, and then exactly
        assert _unchanged(target, model.state_dict())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**9))
def test_truncations_are_refused(saved, tmp_path, cut):
    path, _ = saved
    raw = path.read_bytes()
    bad = tmp_path / "cut.sparsenn"
    bad.write_bytes(raw[: cut % len(raw)])
    _refused(bad)


def test_a_larger_file_than_max_bytes_is_refused_before_reading(saved):
    path, _ = saved
    target, before = _target()
    with pytest.raises(ArchiveError, match="max_bytes=100"):
        archive.load(path, target, max_bytes=100)
    assert _unchanged(target, before)


# ----------------------------------------------------------------------------- forged manifests


def _open(path):
    entries, meta = read_header(path, None)
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    from sparsenn.compress.archive import _NUMPY

    arrays = {k: np.frombuffer(raw[start + e.begin: start + e.end], dtype=_NUMPY[e.dtype]).reshape(e.shape).copy()
              for k, e in entries.items()}
    return json.loads(meta["manifest"]), arrays


def _forge(path, out, edit, sign=True):
    """Write ``out``: the archive at ``path`` after ``edit(manifest, arrays)``, re-signed."""
    manifest, arrays = _open(path)
    stored = manifest["bytes"]["stored"]
    edit(manifest, arrays)
    if isinstance(manifest.get("bytes"), dict) and manifest["bytes"].get("stored") == stored:
        manifest["bytes"]["stored"] = sum(a.nbytes for a in arrays.values())  # as a forger would
    if sign:
        manifest["sha256"] = archive.digest(manifest, arrays)
    text = json.dumps(manifest)
    out.write_bytes(st_save(arrays, metadata={"format": "sparsenn-archive", "manifest": text}))
    return out


def _set(key, field, value):
    def edit(manifest, arrays):
        manifest["tensors"][key][field] = value
    return edit


def _array(name, value):
    def edit(manifest, arrays):
        arrays[name] = value
    return edit


HUGE = [2**31, 2**31, 2**31]
FORGERIES = {
    "huge shape": (_set("0.bias", "shape", HUGE), "max_bytes"),
    "huge shape, bitmask": (_set("0.weight", "shape", HUGE), "max_bytes"),
    "negative dimension": (_set("0.bias", "shape", [-24]), "shape"),
    "boolean dimension": (_set("0.bias", "shape", [True]), "shape"),
    "too many dimensions": (_set("0.bias", "shape", [1] * 65), "shape"),
    "unknown dtype": (_set("0.bias", "dtype", "complex128"), "unknown dtype"),
    "wrong dtype": (_set("0.bias", "dtype", "float64"), "dtype"),
    "unknown codec": (_set("0.bias", "codec", "pickle"), "unknown codec 'pickle'"),
    "nnz too large": (_set("0.weight", "meta", {"nnz": 10**12}), "nnz"),
    "nnz disagrees with the mask": (_set("0.weight", "meta", {"nnz": 5}), "nnz|values"),
    "nnz not an integer": (_set("0.weight", "meta", {"nnz": "96"}), "nnz"),
    "extra meta": (_set("0.weight", "meta", {"nnz": 96, "x": 1}), "meta"),
    "n >= m": (_set("2.weight", "meta", {"n": 4, "m": 4}), "'n'"),
    "m = 0": (_set("2.weight", "meta", {"n": 1, "m": 0}), "'m'"),
    "m too large": (_set("2.weight", "meta", {"n": 1, "m": 2**40}), "'m'"),
    "nm codes out of range": (lambda m, a: (m["tensors"]["2.weight"].update(meta={"n": 1, "m": 3}),
                                            a.update({"2.weight/values": np.zeros(64, np.float32),
                                                      "2.weight/metadata": np.full(16, 0xFF, np.uint8)})),
                              "position 3 >= m=3"),
    "nm codes not increasing": (lambda m, a: (m["tensors"]["2.weight"].update(meta={"n": 2, "m": 4}),
                                              a.update({"2.weight/values": np.zeros(96, np.float32),
                                                        "2.weight/metadata": np.zeros(24, np.uint8)})),
                                "increasing"),
    "nm metadata short": (_array("2.weight/metadata", np.zeros(3, np.uint8)), "metadata"),
    "values of another dtype": (_array("0.weight/values", np.zeros(96, np.float64)), "dtype"),
    "values too short": (_array("0.weight/values", np.zeros(3, np.float32)), "values"),
    "mask padding bits": (lambda m, a: (m["tensors"]["0.weight_mask"].update(shape=[383]),
                                        a.update({"0.weight_mask/bits": np.full(48, 0xFF, np.uint8)})), "padding"),
    "bool values not 0/1": (_array("3.num_batches_tracked/values", np.array([7], np.int32)), "dtype"),
    "array nothing refers to": (_array("extra/values", np.zeros(2, np.float32)), "nothing refers to"),
    "newer schema": (lambda m, a: m.update(schema_version=2), "newer sparsenn.*upgrade"),
    "schema not an int": (lambda m, a: m.update(schema_version="1"), "schema_version"),
    "unknown key": (lambda m, a: m.update(pickle="cos\nsystem"), "unknown"),
    "wrong format": (lambda m, a: m.update(format="other"), "format"),
    "alias to nothing": (lambda m, a: m["aliases"].update({"0.bias": "nope"}), "alias"),
    "mask of nothing": (lambda m, a: m["masks"].update({"x_mask": "x"}), "mask"),
    "deep nesting": (lambda m, a: m["tensors"]["0.bias"].update(meta=json.loads("[" * 40 + "]" * 40)),
                     "deeper"),
    "bytes disagree": (lambda m, a: m["bytes"].update(stored=1), "bytes"),
    "arrays with a path": (_set("0.bias", "arrays", ["../values"]), "arrays"),
    "missing tensor": (lambda m, a: (m["tensors"].pop("0.bias"), a.pop("0.bias/values")), "0.bias"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_manifests_are_refused(saved, tmp_path, name):
    path, _ = saved
    edit, match = FORGERIES[name]
    bad = _forge(path, tmp_path / "forged.sparsenn", edit)
    tracemalloc.start()
    try:
        _refused(bad, match)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * CAP, peak  # numpy allocations are traced: nothing sized by a forged number


def test_forged_bytes_without_a_new_digest_fail_the_digest(saved, tmp_path):
    path, _ = saved
    bad = _forge(path, tmp_path / "f.sparsenn", _array("0.bias/values", np.ones(24, np.float32)), sign=False)
    _refused(bad, "SHA-256")


def test_raw_header_forgeries(saved, tmp_path):
    path, _ = saved
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])

    def write(h, tail=raw[8 + n:]):
        text = json.dumps(h).encode()
        out = tmp_path / "h.sparsenn"
        out.write_bytes(len(text).to_bytes(8, "little") + text + tail)
        return out

    key = "0.bias/values"
    for offsets in ([-4, 92], [0, 2**64], [2**63, 2**63 + 96], [10**9, 10**9 + 96]):
        h = copy.deepcopy(header)
        h[key]["data_offsets"] = offsets
        _refused(write(h), "data_offsets|shape")
    h = copy.deepcopy(header)
    h[key]["shape"] = [2**62]
    _refused(write(h), "bytes|offsets")
    bad = tmp_path / "u.sparsenn"
    bad.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe\x00{" + raw[8 + n:])
    _refused(bad, "JSON")
    bad.write_bytes((2**63).to_bytes(8, "little") + raw[8:])
    _refused(bad, "header")
    h = copy.deepcopy(header)
    h["__metadata__"]["manifest"] = h["__metadata__"]["manifest"][:-1] + ', "tensors": {}}'
    _refused(write(h), "repeats the key")
    h["__metadata__"]["manifest"] = "\ud800"
    _refused(write(h), "JSON")
    h["__metadata__"]["manifest"] = "[" * 100_000 + "]" * 100_000
    _refused(write(h), "JSON|deeper")
    h["__metadata__"]["manifest"] = '{"format": "sparsenn-archive", "schema_version": NaN}'
    _refused(write(h), "non-finite|schema_version")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_manifest_edits_never_raise_anything_else(saved, tmp_path, data):
    """Any JSON value at any place of the manifest (re-signed): ArchiveError, or a load equal to a sound one."""
    path, _ = saved
    manifest, _ = _open(path)
    places = []

    def walk(node, at):
        places.append(at)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, at + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, at + (i,))

    walk(manifest, ())
    at = data.draw(st.sampled_from(places[1:]))
    value = data.draw(st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8)
                                   | st.floats(allow_nan=False, allow_infinity=False),
                                   lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                       max_size=3), max_leaves=6))

    def edit(m, arrays):
        node = m
        for k in at[:-1]:
            node = node[k]
        node[at[-1]] = value

    bad = _forge(path, tmp_path / "r.sparsenn", edit)
    for target in (None, _model(seed=3)):
        before = None if target is None else copy.deepcopy(target.state_dict())
        try:
            loaded = archive.load(bad, target, max_bytes=CAP)
        except ArchiveError:
            assert target is None or _unchanged(target, before)
        else:
            assert isinstance(loaded, nn.Module)


# ----------------------------------------------------------------------------- folders


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_folder_manifest_flips_are_refused_or_harmless(saved, tmp_path, data):
    _, model = saved
    folder = archive.save(f"{tmp_path}/flip/", model)
    raw = bytearray((folder / "manifest.json").read_bytes())
    at, xor = data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(1, 255))
    raw[at] ^= xor
    (folder / "manifest.json").write_bytes(bytes(raw))
    target, before = _target()
    try:
        archive.load(folder, target, max_bytes=CAP)
    except ArchiveError:
        assert _unchanged(target, before)
    else:
        assert _unchanged(target, model.state_dict())


def test_folder_payload_names_cannot_escape(saved, tmp_path):
    _, model = saved
    folder = archive.save(f"{tmp_path}/arch/", model)
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes((folder / "tensors.safetensors").read_bytes())
    text = (folder / "manifest.json").read_text()
    for name in ("../secret.safetensors", "/etc/passwd", "..", ".", "sub/x", "", "a\\..\\b"):
        manifest = json.loads(text)
        manifest["payload"] = name
        (folder / "manifest.json").write_text(json.dumps(manifest))
        _refused(folder, "payload")
    os.symlink(outside, folder / "link.safetensors")
    manifest = json.loads(text)
    manifest["payload"] = "link.safetensors"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "outside the folder")
    (folder / "manifest.json").write_bytes(b"\xff\xfe not utf-8")
    _refused(folder, "JSON")
    (folder / "manifest.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", folder / "manifest.json")
    _refused(folder, "outside the folder|not a file")


def test_forged_model_descriptions_build_nothing_unsafe(saved, tmp_path):
    path, _ = saved

    def klass(name):
        def edit(m, a):
            m["model"]["modules"][0]["class"] = name
            m["model"]["class"] = name
        return edit

    def registry(entry):
        return lambda m, a: m["model"].update(registry=entry)

    def transformers(entry):
        return lambda m, a: m["model"].update(transformers=entry)

    def giant_linear(m, a):
        m["model"]["modules"][1]["args"] = {"in_features": 10**6, "out_features": 10**6, "bias": True}

    cases = [(klass("os.system"), "pass model="), (klass("builtins.eval"), "pass model="),
             (registry({"name": "os.system", "kwargs": {}}), "registry"),
             (registry({"name": "lenet5", "kwargs": {"num_classes": -1}}), "cannot be built"),
             (registry({"name": "lenet5", "kwargs": {}}), "max_bytes|does not match"),
             (transformers({"class": "LlamaForCausalLM", "config": {"model_type": "llama",
                                                                    "auto_map": {"AutoModel": "evil.Model"}}}),
              "remote code"),
             (transformers({"class": "Evil", "config": {"model_type": "llama"}}), "auto mappings"),
             (transformers({"class": "LlamaForCausalLM", "config": {"model_type": "llama",
                                                                    "num_hidden_layers": 10**6}}), "exceeds"),
             (transformers({"class": "LlamaForCausalLM", "config": {"model_type": "no-such-model"}}), "config"),
             (giant_linear, "max_bytes|does not match")]
    for edit, match in cases:
        bad = _forge(path, tmp_path / "model.sparsenn", edit)
        tracemalloc.start()
        try:
            with pytest.raises(ArchiveError, match=match):
                archive.load(bad, max_bytes=CAP)
        finally:
            tracemalloc.stop()
