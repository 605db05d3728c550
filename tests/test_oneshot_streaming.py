"""Streaming one-shot pruning (issue 14): a model folder pruned one block at a time from its safetensors
files equals the in-memory pipeline, never holds two blocks, and fails without leaving files behind."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import sparsenn as sn
from sparsenn.create.oneshot import OneShotError
from sparsenn.create.oneshot import streaming

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _llama(layers=3, tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calibration(n=3, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, length), generator=g) for _ in range(n)]


def _folder(tmp_path, model, shard="20KB"):
    d = tmp_path / "model"
    model.save_pretrained(d, max_shard_size=shard)
    return d


def _weights(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_mask")}


@pytest.mark.parametrize("method,pattern,options", [
    ("sparsegpt", "unstructured", {}),
    ("sparsegpt", "2:4", {"permute": True, "refit": True}),
    ("wanda", "unstructured", {"distribution": "owl"}),
    ("magnitude", "unstructured", {}),
])
def test_streaming_equals_the_in_memory_pipeline(tmp_path, method, pattern, options):
    model, calib = _llama(), _calibration()
    src = _folder(tmp_path, model)
    ref = copy.deepcopy(model)
    sn.oneshot(ref, method, 0.5, pattern, calib if method != "magnitude" else None, **options)
    report = sn.oneshot_streaming(src, tmp_path / "out", method, 0.5, pattern,
                                  calib if method != "magnitude" else None, **options)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = _weights(ref)
    for k, v in got.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert got.lm_head.weight is got.model.embed_tokens.weight  # the tie survives
    assert [r.name for r in report.layers] == [r.name for r in ref.oneshot_report.layers]
    saved = json.loads((tmp_path / "out" / "sparsenn_oneshot.json").read_text())
    assert saved["method"] == method and len(saved["layers"]) == 3 * 7


def test_streaming_holds_one_block_at_a_time_and_keeps_the_files_dtype(tmp_path, monkeypatch):
    model = _llama(layers=4, tie=False).to(torch.bfloat16)
    src = _folder(tmp_path, model, shard="1GB")  # one file, no index
    resident = []
    load = streaming._Stream.load

    def counting(self, index, block):
        load(self, index, block)
        blocks = self.model.model.layers
        resident.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))
    monkeypatch.setattr(streaming._Stream, "load", counting)
    sn.oneshot_streaming(src, tmp_path / "out", "sparsegpt", 0.5, calibration=_calibration())
    assert resident == [1, 1, 1, 1]
    from safetensors import safe_open

    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name in set(index["weight_map"].values()):
        with safe_open(str(out / name), framework="pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    got = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = got.model.layers[2].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_streaming_failures_name_the_problem_and_write_nothing(tmp_path, monkeypatch):
    model = _llama()
    src = _folder(tmp_path, model)
    out = tmp_path / "out"
    with pytest.raises(OneShotError, match="no config.json"):
        sn.oneshot_streaming(tmp_path / "nowhere", out)
    with pytest.raises(OneShotError, match="is the source folder"):
        sn.oneshot_streaming(src, src, calibration=_calibration())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(OneShotError, match="not empty"):
        sn.oneshot_streaming(src, tmp_path / "busy", calibration=_calibration())
    with pytest.raises(OneShotError, match="unknown options.*'refti'"):
        sn.oneshot_streaming(src, out, calibration=_calibration(), refti=True)
    other = tmp_path / "other"
    _llama().save_pretrained(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OneShotError, match=r"shape of model\.layers\.0\.mlp\.\w+_proj\.weight \(64, 32\)"):
        sn.oneshot_streaming(other, out, calibration=_calibration())
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(OneShotError, match="not a file in the folder"):
        sn.oneshot_streaming(src, out, calibration=_calibration())

    src = _folder(tmp_path / "again", model)
    calls = []
    from sparsenn.create.oneshot import pipeline

    prune = pipeline._prune_block

    def failing(index, *args, **kwargs):  # the third block fails after two were written
        calls.append(index)
        if index == 2:
            raise OneShotError("block 2 went wrong.")
        return prune(index, *args, **kwargs)
    monkeypatch.setattr(pipeline, "_prune_block", failing)
    with pytest.raises(OneShotError, match="block 2 went wrong. The source folder is unchanged; nothing was written"):
        sn.oneshot_streaming(src, out, calibration=_calibration())
    assert calls == [0, 1, 2] and not out.exists()


def test_streaming_an_encoder_with_padding(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "bert")
    g = torch.Generator().manual_seed(2)
    calib = [{"input_ids": torch.randint(0, 64, (2, 12), generator=g),
              "attention_mask": torch.tensor([[1] * 12, [1] * 8 + [0] * 4])} for _ in range(2)]
    ref = copy.deepcopy(model)
    sn.oneshot(ref, "sparsegpt", 0.5, calibration=calib)
    sn.oneshot_streaming(tmp_path / "bert", tmp_path / "out", "sparsegpt", 0.5, calibration=calib)
    got = transformers.AutoModel.from_pretrained(tmp_path / "out")
    expected = _weights(ref)
    assert all(torch.equal(v, expected[k]) for k, v in got.state_dict().items())
