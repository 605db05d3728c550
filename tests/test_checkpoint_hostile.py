"""Checkpoints from strangers: every tensor and field is checked before anything changes.

Each hostile file here is self-consistent (its checksums recomputed), so it is the checks of
``sn.load`` that must refuse it, with :class:`sparsenn.CheckpointError` naming the field, and
leave the model, sparsifier and optimizer exactly as they were."""

import copy
import json
import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

import sparsenn as sn
from conftest import TinyMLP, make_batches


def _setup(seed=0, steps=3):
    torch.manual_seed(seed)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.9, method="movement",
                       schedule=sn.Polynomial(begin_step=2, end_step=10, frequency=2))
    opt = sp.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05))
    for x, y in make_batches(n=steps, seed=seed):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    return model, sp, opt


# ----------------------------------------------------------------------------- raw file editing


def _raw(path):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, json.loads(meta["tree"]), tensors


def _write(path, meta, tree, tensors):
    meta = dict(meta)
    meta["tree"] = json.dumps(tree)
    if "checksums" in meta:
        from sparsenn.train.checkpoint_format import crc32

        meta["checksums"] = json.dumps({"tree": zlib.crc32(meta["tree"].encode()),
                                        "tensors": {k: crc32(t) for k, t in tensors.items()}})
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


def _container(node):
    for tag in ("__dict__", "__tuple__", "__items__"):
        if isinstance(node, dict) and tag in node:
            return node[tag]
    return node


def _child(node, key):
    c = _container(node)
    if isinstance(node, dict) and "__items__" in node:
        return next(v for k, v in c if k == key)
    return c[key]


def _set(tree, path, value):
    """Replace the encoded node at ``path`` (keys through the encoded dicts, lists and items)."""
    node = tree
    for key in path[:-1]:
        node = _child(node, key)
    c = _container(node)
    if isinstance(node, dict) and "__items__" in node:
        next(pair for pair in c if pair[0] == path[-1])[1] = value
    else:
        c[path[-1]] = value


def _snapshot(model, sp=None, opt=None):
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "masks": [mp.name for mp in sn.masked_parameters(model)],
            "sparsifier": None if sp is None else copy.deepcopy(sp.state_dict()),
            "optimizer": None if opt is None else copy.deepcopy(opt.state_dict())}


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, sp, opt = _setup()
    path = sn.save(tmp_path_factory.mktemp("base") / "ck.safetensors", model, sp, optimizer=opt, extra={"epoch": 3})
    return _raw(path)


def _mask_as(dtype):
    def edit(tree, tensors):
        _set(tree, ["model", "fc1.weight_mask"], {"__tensor__": "model/fc1.weight_mask"})
        tensors["model/fc1.weight_mask"] = torch.ones(32, 16, dtype=dtype)
    return edit


def _tensor(key, value):
    def edit(tree, tensors):
        tensors[key] = value(tensors[key]) if callable(value) else value
    return edit


def _sparsifier(tree):
    return tree["sparsifier"]["__dict__"]


def _field(path, value):
    def edit(tree, tensors):
        _set(tree, path, value)
    return edit


HOSTILE = {
    "float64 weight": (_tensor("model/fc1.weight", lambda t: t.double()), r"model/fc1\.weight: dtype torch\.float64"),
    "int8 weight": (_tensor("model/fc2.weight", lambda t: t.to(torch.int8)), r"model/fc2\.weight: dtype torch\.int8"),
    "float mask": (_mask_as(torch.float32), r"model/fc1\.weight_mask: dtype torch\.float32, the model's is torch\.bool"),
    "uint8 mask": (_mask_as(torch.uint8), r"model/fc1\.weight_mask: dtype torch\.uint8"),
    "weight shape": (_tensor("model/fc3.bias", torch.zeros(5)), r"model/fc3\.bias: shape \(5,\)"),
    "optimizer state shape": (_tensor("optimizer0/state/0/exp_avg", torch.zeros(3)),
                              r"optimizers/0/state/0/exp_avg: shape \(3,\)"),
    "optimizer state dtype": (_tensor("optimizer0/state/0/exp_avg_sq", lambda t: t.double()),
                              r"optimizers/0/state/0/exp_avg_sq: dtype torch\.float64"),
    "optimizer step NaN": (_tensor("optimizer0/state/1/step", torch.tensor(float("nan"))),
                           r"optimizers/0/state/1/step: expected a finite real scalar"),
    "optimizer step negative": (_tensor("optimizer0/state/1/step", torch.tensor(-3.0)),
                                r"optimizers/0/state/1/step: a step count must be >= 0"),
    "optimizer lr string": (_field(["optimizers", 0, "param_groups", 0, "lr"], "abc"),
                            r"optimizers/0/param_groups/0/lr: 'abc' does not fit"),
    "optimizer lr negative": (_field(["optimizers", 0, "param_groups", 0, "lr"], -1.0),
                              r"optimizers/0/param_groups/0/lr: expected a number >= 0"),
    "optimizer betas": (_field(["optimizers", 0, "param_groups", 0, "betas"], {"__tuple__": [0.9, 2.0]}),
                        r"optimizers/0/param_groups/0/betas: expected numbers in \[0, 1\)"),
    "optimizer unknown param id": (_field(["optimizers", 0, "param_groups", 0, "params"], [0, 1, 2, 3, 4, 99]),
                                   r"optimizers/0/state/5: no parameter with id 5"),
    "sparsity NaN": (_field(["sparsifier", "sparsity"], float("nan")), r"sparsifier/sparsity: .* got nan"),
    "sparsity -5": (_field(["sparsifier", "sparsity"], -5), r"sparsifier/sparsity: expected a sparsity in \[0, 1\)"),
    "sparsity 1": (_field(["sparsifier", "sparsity"], 1.0), r"sparsifier/sparsity: .* got 1\.0"),
    "step NaN": (_field(["sparsifier", "step_count"], float("nan")), r"sparsifier/step_count: expected an integer"),
    "step inf": (_field(["sparsifier", "step_count"], float("inf")), r"sparsifier/step_count: .* got inf"),
    "step string": (_field(["sparsifier", "step_count"], "abc"), r"sparsifier/step_count: .* got 'abc'"),
    "step negative": (_field(["sparsifier", "step_count"], -1), r"sparsifier/step_count: .* got -1"),
    "step float": (_field(["sparsifier", "step_count"], 2.5), r"sparsifier/step_count: .* got 2\.5"),
    "history string": (_field(["sparsifier", "history"], "abc"), r"sparsifier/history: expected a list"),
    "history short entry": (_field(["sparsifier", "history"], [[1]]), r"sparsifier/history/0: expected \[step"),
    "history sparsity": (_field(["sparsifier", "history"], [[2, 7.0]]), r"sparsifier/history/0/1: .* got 7\.0"),
    "history future step": (_field(["sparsifier", "history"], [[99, 0.5]]), r"sparsifier/history/0/0: .* \[0, 3\]"),
    "history order": (_field(["sparsifier", "history"], [[2, 0.5], [1, 0.6]]), r"sparsifier/history/1: step 1"),
    "generator length": (_tensor("sparsifier/generator", torch.zeros(10, dtype=torch.uint8)),
                         r"sparsifier/generator: expected a torch\.uint8 tensor of shape"),
    "generator dtype": (_tensor("sparsifier/generator", lambda t: t.float()), r"sparsifier/generator"),
    "other parameters": (_field(["sparsifier", "config", "parameters"], ["fc1.weight", "fc2.weight"]),
                         r"sparsifier/config/parameters: the checkpoint's sparsifier masks"),
    "other method": (_field(["sparsifier", "config", "method"], "magnitude"),
                     r"sparsifier/config/method: .* uses 'magnitude', this one 'movement'"),
    "method state shape": (_tensor("sparsifier/method/fc2.weight", torch.zeros(3, 3)),
                           r"sparsifier/method/fc2\.weight: shape \(3, 3\)"),
    "method state unknown parameter": (lambda tree, t: _sparsifier(tree)["method"]["__dict__"].update(
        {"fc9.weight": _sparsifier(tree)["method"]["__dict__"].pop("fc1.weight")}),
        r"sparsifier/method/fc9\.weight: not a parameter this sparsifier masks"),
    "missing sparsifier key": (lambda tree, t: _sparsifier(tree).pop("history"),
                               r"sparsifier: expected the keys \['config', 'generator', 'history'"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_checkpoint_is_refused_and_changes_nothing(saved, tmp_path, case):
    edit, match = HOSTILE[case]
    meta, tree, tensors = copy.deepcopy(saved)
    edit(tree, tensors)
    path = _write(tmp_path / "hostile.safetensors", meta, tree, tensors)
    model, sp, opt = _setup(seed=1, steps=2)
    before = _snapshot(model, sp, opt)
    with pytest.raises(sn.CheckpointError, match=match):
        sn.load(path, model, sp, optimizer=opt)
    assert _same(_snapshot(model, sp, opt), before)


def test_unmasked_model_gets_no_masks_when_a_stray_key_is_refused(saved, tmp_path):
    """``fc1.weight_orig`` does not end in ``_mask``: it is unexpected, not the mask of ``fc1.weight``."""
    meta, tree, tensors = copy.deepcopy(saved)
    _set(tree, ["model", "fc1.weight_orig"], {"__tensor__": "model/fc1.weight_orig"})
    tensors["model/fc1.weight_orig"] = torch.zeros(32, 16)
    path = _write(tmp_path / "stray.safetensors", meta, tree, tensors)
    model = TinyMLP()
    before = _snapshot(model)
    with pytest.raises(sn.CheckpointError, match=r"unexpected \['fc1\.weight_orig'\]"):
        sn.load(path, model)
    assert _same(_snapshot(model), before) and not sn.get_masks(model)


def test_masks_for_a_model_without_masks_are_checked_before_attaching(saved, tmp_path):
    meta, tree, tensors = copy.deepcopy(saved)
    _mask_as(torch.float32)(tree, tensors)
    path = _write(tmp_path / "float-mask.safetensors", meta, tree, tensors)
    model = TinyMLP()
    before = _snapshot(model)
    with pytest.raises(sn.CheckpointError, match=r"model/fc1\.weight_mask: dtype torch\.float32"):
        sn.load(path, model)
    assert _same(_snapshot(model), before) and not sn.get_masks(model)


def test_transfer_masks_refuses_non_boolean_masks_from_a_checkpoint(saved, tmp_path):
    meta, tree, tensors = copy.deepcopy(saved)
    _mask_as(torch.float32)(tree, tensors)
    path = _write(tmp_path / "float-mask.safetensors", meta, tree, tensors)
    model = TinyMLP()
    before = _snapshot(model)
    with pytest.raises(sn.CheckpointError, match=r"masks must be boolean: model/fc1\.weight_mask: dtype torch\.float32"):
        sn.transfer_masks(path, model)
    assert _same(_snapshot(model), before) and not sn.get_masks(model)


def test_malformed_tree_entries_are_refused(saved, tmp_path):
    cases = {
        "unreferenced tensor": (lambda tree, t: t.__setitem__("stray", torch.zeros(2)), "'stray' is stored but"),
        "tensor referenced twice": (_field(["model", "fc2.bias"], {"__tensor__": "model/fc1.bias"}),
                                    "referred to twice"),
        "missing tensor": (_field(["model", "fc2.bias"], {"__tensor__": "nope"}), "'nope', which is not in the file"),
        "unknown tag": (_field(["model", "fc2.bias"], {"__pickle__": "x"}), r"model/fc2\.bias: malformed entry"),
        "packed bits too short": (_tensor("model/fc1.weight_mask", lambda t: t[:-1]), "bytes of packed bits"),
        "packed bits shape": (_field(["model", "fc1.weight_mask"], {"__bits__": "model/fc1.weight_mask",
                                                                    "shape": [-1, 16]}), "non-negative integers"),
        "section missing": (lambda tree, t: tree.pop("extra"), "must have exactly the keys"),
        "extra not a dict": (lambda tree, t: tree.__setitem__("extra", [1]), "extra: expected a dict"),
    }
    for case, (edit, match) in cases.items():
        meta, tree, tensors = copy.deepcopy(saved)
        edit(tree, tensors)
        path = _write(tmp_path / "bad.safetensors", meta, tree, tensors)
        with pytest.raises(sn.CheckpointError, match=match):
            sn.load(path, TinyMLP())


# ----------------------------------------------------------------------------- mutations of a real checkpoint


def _positions(node, path=()):
    """Every position in the encoded tree: ``(path, node)``, the sections' own nodes excluded."""
    if path:
        yield path, node
    if isinstance(node, dict) and "__items__" in node:
        for k, v in node["__items__"]:
            yield from _positions(v, path + (k,))
    elif isinstance(node, dict) and any(t in node for t in ("__dict__", "__tuple__")):
        c = _container(node)
        for k, v in (c.items() if isinstance(c, dict) else enumerate(c)):
            yield from _positions(v, path + (k,))
    elif isinstance(node, dict) and not any(t in node for t in ("__tensor__", "__bits__")):
        for k, v in node.items():
            yield from _positions(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _positions(v, path + (i,))


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.lists(st.integers(-3, 40), max_size=3),
    st.sampled_from([{"__tensor__": "model/fc1.weight"}, {"__dict__": {}}, {"__tuple__": [1, 2]},
                     {"__bits__": "model/fc1.weight_mask", "shape": [32, 16]}, {"__items__": [[0, 1]]}]))
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.uint8,
          torch.bool]


@st.composite
def mutations(draw, saved):
    meta, tree, tensors = copy.deepcopy(saved)
    kind = draw(st.sampled_from(["value", "tensor", "tensor", "drop tensor"]))
    if kind == "value":
        positions = list(_positions(tree))
        path, _ = draw(st.sampled_from(positions))
        _set(tree, list(path), draw(JSON_VALUES))
    else:
        key = draw(st.sampled_from(sorted(tensors)))
        if kind == "drop tensor":
            del tensors[key]
        else:
            old = tensors[key]
            shape = draw(st.sampled_from([tuple(old.shape), (), (3,), tuple(old.shape)[::-1],
                                          tuple(d + 1 for d in old.shape)]))
            dtype = draw(st.sampled_from(DTYPES))
            tensors[key] = (torch.rand(shape) * 4 - 1).to(dtype)
    return meta, tree, tensors, kind


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_checkpoint_loads_or_fails_cleanly(saved, tmp_path, data):
    meta, tree, tensors, kind = data.draw(mutations(saved))
    path = _write(tmp_path / "mutated.safetensors", meta, tree, tensors)
    model, sp, opt = _setup(seed=1, steps=2)
    before = _snapshot(model, sp, opt)
    try:
        sn.load(path, model, sp, optimizer=opt)
    except sn.CheckpointError:
        assert _same(_snapshot(model, sp, opt), before)
        return
    after = _snapshot(model, sp, opt)  # loaded: the model's dtypes and shapes, its masks enforced
    assert all(after["model"][k].dtype == v.dtype and after["model"][k].shape == v.shape
               for k, v in before["model"].items())
    for name, p, mask in sn.iter_masks(model):
        assert not bool(p[~mask].any()), name
    assert 0 <= sp.sparsity < 1 and sp.step_count >= 0


# ----------------------------------------------------------------------------- the command line's rebuild


ZOO_META = {"model": {"name": "lenet300100", "args": {}}, "input_shape": [1, 8, 8], "seed": 0}


def _zoo_checkpoint(tmp_path, meta):
    torch.manual_seed(0)
    model = sn.models.zoo.LeNet300100(in_features=64)
    return sn.save(tmp_path / "zoo.safetensors", model, extra={"sparsenn": meta}), model


@pytest.mark.parametrize("change, match", [
    ({"model": {"name": "lenet300100", "args": {"num_classes": 10**12}}},
     r"extra\.sparsenn\.model\.args\.num_classes: expected an integer in \[1, 100000\], got 1000000000000"),
    ({"input_shape": [10**5, 10**5, 100]},
     r"extra\.sparsenn\.input_shape: \[100000, 100000, 100\] has 1000000000000 elements per sample; at most 16777216"),
    ({"seed": 10**23}, r"extra\.sparsenn\.seed: expected an integer in \[0, 4294967295\], got 10{23}"),
    ({"seed": "abc"}, r"extra\.sparsenn\.seed: .* got 'abc'"),
    ({"model": {"name": "smallvgg", "args": {"widths": list(range(1, 200))}}},
     r"extra\.sparsenn\.model\.args\.widths: a list of 199 entries; at most 64"),
    ({"model": {"name": "lenet300100", "args": {"num_classes": 1000}}},
     r"checkpoint does not fit the model lenet300100\(num_classes=1000\): fc3\.weight: model \(1000, 100\) "
     r"vs checkpoint \(10, 100\)"),
    ({"model": {"name": "lenet300100", "args": {"in_features": 2**20}}},  # 1.2 GB if it were built for real
     r"fc1\.weight: model \(300, 1048576\) vs checkpoint \(300, 64\)"),
    ({"model": {"name": "lenet300100", "args": {"depth": 3}}}, r"cannot build the model lenet300100\(depth=3\)"),
    ({"data": {"name": "digits", "batch_size": -1}}, r"extra\.sparsenn\.data\.batch_size: expected an integer in \[1, 65536\]"),
    ({"metrics": {"accuracy": "high"}}, r"extra\.sparsenn\.metrics"),
])
def test_model_from_checkpoint_refuses_absurd_metadata(tmp_path, change, match):
    from sparsenn.cli.recipes import model_from_checkpoint

    path, _ = _zoo_checkpoint(tmp_path, {**ZOO_META, **change})
    with pytest.raises(sn.CheckpointError, match=match):
        model_from_checkpoint(path)


def test_model_from_checkpoint_within_bounds_rebuilds_the_model(tmp_path, capsys):
    from sparsenn.cli.main import main
    from sparsenn.cli.recipes import model_from_checkpoint

    path, model = _zoo_checkpoint(tmp_path, ZOO_META)
    rebuilt, meta = model_from_checkpoint(path)
    assert meta["model"] == {"name": "lenet300100", "args": {}} and meta["seed"] == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    with pytest.raises(ValueError, match=r"--model-arg\.num_classes: expected an integer in \[1, 100000\]"):
        model_from_checkpoint(path, "lenet300100", {"num_classes": 10**12})
    bad, _ = _zoo_checkpoint(tmp_path, {**ZOO_META, "seed": 10**23})
    assert main(["report", str(bad)]) == 2
    assert "extra.sparsenn.seed: expected an integer in [0, 4294967295], got 1" in capsys.readouterr().err
