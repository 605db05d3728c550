"""sn.export_onnx: pruned MLP, CNN (Conv + BatchNorm + residual) and tiny transformers to ONNX with sparse
initializers; onnx.checker, ONNX Runtime against PyTorch, file sizes, the user's model untouched, bad input."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import sparsenn as sn
from sparsenn.compress import onnx_export
from sparsenn.compress.onnx_export import OnnxExportReport, export_onnx


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ResidualCNN(nn.Module):
    """Conv + BatchNorm stem, one residual block, pooled linear head."""

    def __init__(self, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(x + y).mean(dim=(2, 3)))


def _pruned_cnn():
    torch.manual_seed(1)
    model = ResidualCNN()
    with torch.no_grad():  # running statistics that are not the identity
        for _ in range(3):
            model(torch.randn(8, 3, 12, 12) * 2 + 0.5)
    sn.one_shot_prune(model, 0.9)
    return model


def _pruned_mlp():
    torch.manual_seed(0)
    model = MLP()
    sn.one_shot_prune(model, 0.9)
    return model


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(config)
    sn.one_shot_prune(model, 0.9, include=[nn.Linear, nn.Embedding])
    return model


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=128, max_position_embeddings=32)
    model = transformers.BertModel(config)
    sn.one_shot_prune(model, 0.9, include=[nn.Linear, nn.Embedding])
    return model


def _tokens(batch, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 3:] = 0  # one padded sequence
    return {"input_ids": torch.randint(0, 128, (batch, length), generator=g), "attention_mask": mask}


# (factory, example inputs at batch b, dense/sparse file ratio it must beat)
CASES = {
    "mlp": (_pruned_mlp, lambda b: torch.randn(b, 64), 0.4),
    "cnn": (_pruned_cnn, lambda b: torch.randn(b, 3, 12, 12), 0.4),
    "llama": (_llama, _tokens, 0.5),
    "bert": (_bert, _tokens, 0.6),
}


def _ort_outputs(path, example):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in example.items()} if isinstance(example, dict) else \
        {session.get_inputs()[0].name: example.numpy()}
    return session.run(None, feeds)


def _torch_outputs(model, example):
    training = model.training
    with torch.no_grad():
        model.eval()
        out = model(**example) if isinstance(example, dict) else model(example)
        model.train(training)
    if isinstance(out, torch.Tensor):
        return [out.numpy()]
    return [v.numpy() for v in out.values() if isinstance(v, torch.Tensor)]  # not the key-value cache


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    """One model exported sparse and dense (the export itself is checked in the tests below)."""
    name = request.param
    factory, inputs, ratio = CASES[name]
    model = factory()
    model.train()  # the export must not change it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp(name)
    sparse = export_onnx(model, inputs(2), folder / "sparse.onnx")
    dense = export_onnx(model, inputs(2), folder / "dense.onnx", sparse_initializers=False)
    return name, model, before, inputs, ratio, sparse, dense


def test_checker_passes_and_sparse_initializers_present_only_when_asked(exported):
    name, _, _, _, _, sparse, dense = exported
    for report in (sparse, dense):
        onnx.checker.check_model(onnx.load(str(report.path)))
    graph = onnx.load(str(sparse.path)).graph
    assert sparse.num_sparse_initializers == len(graph.sparse_initializer) > 0
    assert {s.values.name for s in graph.sparse_initializer} == {s.name for s in sparse.sparse}
    assert all(s.sparsity >= 0.85 for s in sparse.sparse if s.numel >= 256)
    dense_graph = onnx.load(str(dense.path)).graph
    assert len(dense_graph.sparse_initializer) == 0 and dense.num_sparse_initializers == 0
    masks = [n for n in (*[i.name for i in graph.initializer], *[i.name for i in graph.input],
                         *[s.values.name for s in graph.sparse_initializer]) if n.endswith("weight_mask")]
    assert masks == []  # sparsenn's masks are neither initializers nor inputs
    assert len(graph.input) == (1 if name in ("mlp", "cnn") else 2)


def test_onnx_runtime_matches_pytorch_at_two_batch_sizes(exported):
    _, model, _, inputs, _, sparse, dense = exported
    for batch in (2, 5):  # 2 is the example's batch; 5 needs the dynamic batch axis
        example = inputs(batch)
        expected = _torch_outputs(model, example)
        for report in (sparse, dense):
            got = _ort_outputs(report.path, example)
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_sparse_file_much_smaller_and_report_sizes_are_the_files(exported):
    _, _, _, _, ratio, sparse, dense = exported
    assert sparse.file_bytes == sparse.path.stat().st_size and dense.file_bytes == dense.path.stat().st_size
    assert sparse.dense_file_bytes == dense.file_bytes == dense.dense_file_bytes
    assert sparse.file_bytes < ratio * dense.file_bytes, str(sparse)  # tiny transformers: the graph is half the file
    sparse_graph, dense_graph = onnx.load(str(sparse.path)).graph, onnx.load(str(dense.path)).graph
    weights = sum(t.ByteSize() for t in (*sparse_graph.initializer, *sparse_graph.sparse_initializer))
    assert weights < 0.35 * sum(t.ByteSize() for t in dense_graph.initializer)  # 90% zeros: 0.1 * 12 / 4 = 0.3
    assert sparse.compression == pytest.approx(dense.file_bytes / sparse.file_bytes)
    text = str(sparse)
    assert str(sparse.path) in text and all(s.name in text for s in sparse.sparse)


def test_users_model_unchanged(exported):
    _, model, before, *_ = exported
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and any(k.endswith("_mask") for k in after)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_initializers_keep_the_models_parameter_names(tmp_path):
    report = export_onnx(_pruned_mlp(), torch.randn(3, 64), tmp_path / "m.onnx", dynamic_batch=False)
    assert {s.name for s in report.sparse} == {"fc1.weight", "fc2.weight", "fc3.weight"}
    graph = onnx.load(str(report.path)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [3, 64]  # fixed batch
    assert report.input_names == ("input",) and report.output_names == ("output",)


def test_names_min_sparsity_and_opset(tmp_path):
    model = _pruned_mlp()
    report = export_onnx(model, (torch.randn(2, 64),), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                         opset=13, min_sparsity=0.95)
    model_proto = onnx.load(str(report.path))
    assert report.num_sparse_initializers == 0  # 90% zeros < 95%
    assert [i.name for i in model_proto.graph.input] == ["x"] and [o.name for o in model_proto.graph.output] == ["y"]
    assert {o.domain: o.version for o in model_proto.opset_import}[""] == 13


def test_transformers_outputs_are_named_by_their_keys(exported):
    name, _, _, _, _, sparse, _ = exported
    expected = {"llama": ("logits",), "bert": ("last_hidden_state", "pooler_output")}.get(name, ("output",))
    assert sparse.output_names == expected
    assert tuple(o.name for o in onnx.load(str(sparse.path)).graph.output) == expected


def test_torch_prune_and_parametrizations_are_resolved(tmp_path):
    torch.manual_seed(4)
    model = MLP()
    prune.l1_unstructured(model.fc1, "weight", amount=0.9)  # weight_orig + weight_mask + a forward pre-hook
    parametrizations.weight_norm(model.fc2)  # parametrizations.weight.original0/1
    sn.one_shot_prune(model, 0.9, include=["fc3"])
    x = torch.randn(4, 64)
    report = export_onnx(model, x, tmp_path / "m.onnx")
    names = {i.name for i in onnx.load(str(report.path)).graph.initializer} | {s.name for s in report.sparse}
    assert not any("mask" in n or "orig" in n or "parametrizations" in n for n in names), names
    assert "fc1.weight" in {s.name for s in report.sparse}
    np.testing.assert_allclose(_ort_outputs(report.path, x)[0], _torch_outputs(model, x)[0], rtol=1e-4, atol=1e-5)
    assert hasattr(model.fc1, "weight_orig") and "weight" in model.fc2.parametrizations  # the user's model kept


@pytest.mark.parametrize("bad, error, words", [
    ([1, 2], TypeError, r"example_inputs\[0\] must be a tensor, got int"),
    ("text", TypeError, "example_inputs must be a tensor.*got str"),
    (None, TypeError, "got NoneType"),
    ((), ValueError, "example_inputs is empty"),
    ({"x": 3}, TypeError, r"example_inputs\['x'\] must be a tensor"),
])
def test_bad_example_inputs_named(tmp_path, bad, error, words):
    with pytest.raises(error, match=words):
        export_onnx(MLP(), bad, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, True, "0.5"])
def test_min_sparsity_out_of_range_named(tmp_path, value):
    with pytest.raises(ValueError, match=r"min_sparsity must be a number in \[0, 1\], got"):
        export_onnx(MLP(), torch.randn(2, 64), tmp_path / "m.onnx", min_sparsity=value)


def test_bad_path_opset_flags_and_names(tmp_path):
    x, model = torch.randn(2, 64), MLP()
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(model, x, tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        export_onnx(model, x, 3)
    with pytest.raises(ValueError, match=r"opset must be an int in \[9, 20\].*got 5"):
        export_onnx(model, x, tmp_path / "m.onnx", opset=5)
    with pytest.raises(TypeError, match="sparse_initializers must be True or False, got 'yes'"):
        export_onnx(model, x, tmp_path / "m.onnx", "yes")
    with pytest.raises(ValueError, match=r"input_names has 2 names \['a', 'b'\], the model has 1"):
        export_onnx(model, x, tmp_path / "m.onnx", input_names=["a", "b"])
    with pytest.raises(ValueError, match="same first .batch. dimension"):
        export_onnx(nn.Bilinear(3, 4, 2), (torch.randn(2, 3), torch.randn(3, 4)), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        export_onnx(lambda x: x, x, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_too_large_refused_before_anything_is_written(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)
    with pytest.raises(ValueError, match="2 GiB"):
        export_onnx(_pruned_mlp(), torch.randn(2, 64), target)
    assert target.read_bytes() == b"previous"


def test_report_type():
    assert OnnxExportReport.__dataclass_params__.frozen
