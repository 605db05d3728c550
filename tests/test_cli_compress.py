"""``sparsenn compress`` and ``sparsenn export``: a checkpoint or a Hugging Face folder in, an archive / ONNX file out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsenn as sn
from sparsenn.cli.main import main
from sparsenn.cli.recipes import model_from_checkpoint

onnxruntime = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

TINY = ["--set", "data.subset=256", "--set", "data.test_subset=64", "--set", "train.epochs=1",
        "--set", "train.dense_epochs=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by `sparsenn run` (magnitude, 90%) on tiny digits."""
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "magnitude", "--quiet", "--out", str(out), *TINY, "--set", "outputs.report=[text]"]) == 0
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny LLaMA with 80% of its block weights pruned, saved by sn.save_pretrained (masks beside it)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sn.one_shot_prune(model, 0.8, include=["*layers*proj.weight"])
    folder = tmp_path_factory.mktemp("hf") / "model"
    sn.save_pretrained(model, folder)
    return folder, model


def test_compress_prints_every_stage_and_writes_a_loadable_archive(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.sparsenn"
    assert main(["-q", "compress", str(checkpoint), "-o", str(out), "--fc-bits", "4"]) == 0
    text = capsys.readouterr().out
    for stage in ("dense fp32", "pruned (CSR)", "weight-shared", "Huffman-coded", "archive file"):
        assert stage in text
    original, _ = model_from_checkpoint(checkpoint)
    loaded = sn.archive.load(out)
    for (name, p), (_, q) in zip(original.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p == 0, q == 0), name  # the zeros stay where they were
        if name.endswith("weight"):
            assert q[q != 0].unique().numel() <= 2 ** 4, name  # 4-bit cluster indices: at most 16 values


def test_compress_lossless_gives_back_the_exact_model(checkpoint, tmp_path, capsys):
    out = tmp_path / "l.sparsenn"
    assert main(["-q", "compress", str(checkpoint), "-o", str(out), "--lossless"]) == 0
    assert "smaller" in capsys.readouterr().out
    original, _ = model_from_checkpoint(checkpoint)
    loaded = sn.archive.load(out)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))


def test_export_runs_in_onnxruntime_like_pytorch(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["-q", "export", str(checkpoint), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sparse initializers" in text and "densifies" in text
    model, meta = model_from_checkpoint(checkpoint)
    x = torch.rand(3, *meta["input_shape"])
    got = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model.eval()(x).numpy(), rtol=1e-4, atol=1e-5)
    assert main(["-q", "export", str(checkpoint), "-o", str(tmp_path / "d.onnx"), "--dense"]) == 0
    assert "dense initializers" in capsys.readouterr().out
    assert (tmp_path / "d.onnx").stat().st_size > 2 * out.stat().st_size


def test_hugging_face_folder_compresses_and_exports(hf_folder, tmp_path, capsys):
    folder, model = hf_folder
    assert main(["-q", "compress", str(folder), "-o", str(tmp_path / "hf.sparsenn"), "--lossless"]) == 0
    loaded = sn.archive.load(tmp_path / "hf.sparsenn")
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert main(["-q", "export", str(folder), "-o", str(tmp_path / "hf.onnx"), "--seq-len", "8"]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "hf.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.arange(8).view(1, 8)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 8), dtype=np.int64)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(input_ids=ids).logits.numpy(), rtol=1e-4, atol=1e-4)
    capsys.readouterr()


@pytest.mark.parametrize("argv,message", [
    (["compress", "missing.safetensors", "-o", "x.sparsenn"], "no such checkpoint file or Hugging Face model folder"),
    (["export", "missing.safetensors", "-o", "x.onnx"], "no such checkpoint file or Hugging Face model folder"),
])
def test_bad_sources_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_finetune_without_data_and_model_flags_on_a_folder_exit_2(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder
    assert main(["compress", str(folder), "-o", str(tmp_path / "x"), "--finetune-epochs", "1"]) == 2
    assert "--finetune-epochs needs training data" in capsys.readouterr().err
    assert main(["export", str(folder), "-o", str(tmp_path / "x.onnx"), "--model", "lenet300100"]) == 2
    assert "apply to checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(folder), "-o", "x.onnx", "--min-sparsity", "1.5"])
    assert "expected a number in [0, 1], got 1.5" in capsys.readouterr().err
