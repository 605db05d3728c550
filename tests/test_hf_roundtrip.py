"""A pruned ``transformers`` model through ``save_pretrained`` / ``from_pretrained`` as plain safetensors, zeros kept.

``tests/test_pretrained.py`` covers the masks file (fp32, one file, logits equal, hostile masks
files); here every tensor is compared bit for bit, in bf16 and in shards too, and the saved
files are checked to be plain safetensors (the dense model's keys, nothing else). Tiny randomly
initialised LLaMA; nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import pytest
import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import BitmaskConfig
from safetensors import safe_open

import sparsenn as sn
from sparsenn.compress.compressed_tensors import (
    load_compressed_tensors,
    read_sparse_bitmask,
)
from sparsenn.core.masks import get_pattern
from sparsenn.train.pretrained import MASKS_FILE

CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128}
CASES = {"fp32 one file": (torch.float32, None, False), "bf16 shards tied": (torch.bfloat16, "40KB", True)}


def _bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _llama(dtype, tie):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM._from_config(config, dtype=dtype).eval()  # as from_pretrained builds it


def _stored(folder):
    """{name: tensor} of the model's weight files in the folder (one file or shards; not the masks file)."""
    out = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def _zeros_kept(state, again):
    """Every zero came back as +0.0 (all bits clear) at the same place, every other entry bit for bit."""
    for name, want in state.items():
        got = again[name]
        assert _same_bits(got, want), name
        assert torch.equal(_bits(got) == 0, want == 0), name  # no -0.0 crept in: exact zeros


@pytest.mark.parametrize("case", list(CASES))
def test_plain_transformers_round_trip_keeps_the_zeros_bitwise(tmp_path, case):
    dtype, shard, tie = CASES[case]
    model = _llama(dtype, tie)
    sn.Sparsifier(model, 0.5, include=[torch.nn.Linear], exclude=["lm_head"])
    sn.remove_masks(model)  # plain parameters holding exact zeros
    state = model.state_dict()
    assert (state["model.layers.0.mlp.up_proj.weight"] == 0).float().mean() == 0.5
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    stored = _stored(tmp_path)  # plain safetensors: the dense model's names, no masks, nothing packed
    assert set(stored) <= set(state) and not any(k.endswith("_mask") for k in stored)
    _zeros_kept({k: state[k] for k in stored}, stored)
    assert _same_bits(read_sparse_bitmask(tmp_path)["model.layers.1.mlp.down_proj.weight"],
                      state["model.layers.1.mlp.down_proj.weight"])  # a plain folder reads as is
    again, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _zeros_kept(state, again.state_dict())
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(again.eval()(x).logits, model(x).logits)


def test_sparsenn_round_trip_in_bf16_shards_brings_the_masks_back_bitwise(tmp_path):
    model = _llama(torch.bfloat16, tie=True)
    sn.Sparsifier(model, 0.5, pattern="2:4", include=[torch.nn.Linear], exclude=["lm_head"])
    masks = {k: m.clone() for k, m in sn.get_masks(model).items()}
    sn.save_pretrained(model, tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / MASKS_FILE).is_file()
    stored = _stored(tmp_path)
    assert stored.keys() <= sn.dense_state_dict(model).keys()  # plain weights; the masks are in their own file
    loaded = sn.from_pretrained(transformers.LlamaForCausalLM, tmp_path, dtype=torch.bfloat16)
    got = sn.get_masks(loaded)
    assert got.keys() == masks.keys() and all(torch.equal(got[k], masks[k]) for k in masks)
    assert get_pattern(loaded.model.layers[0].mlp.up_proj, "weight") == "2:4"
    _zeros_kept(sn.dense_state_dict(model), sn.dense_state_dict(loaded))


def test_a_sparse_bitmask_checkpoint_becomes_a_plain_one_with_masks(tmp_path):
    """The interchange path: a compressed-tensors checkpoint (old release's writer) -> sparsenn -> plain safetensors."""
    model = _llama(torch.float32, tie=False)
    sn.Sparsifier(model, 0.5, include=[torch.nn.Linear], exclude=["lm_head"])
    sn.remove_masks(model)
    compressor = ModelCompressor.from_pretrained_model(
        model, sparsity_config_or_format=BitmaskConfig(targets=["Linear"], ignore=["lm_head"]))
    model.save_pretrained(tmp_path / "ct", state_dict=compressor.compress(model))
    compressor.update_config(tmp_path / "ct")
    loaded = load_compressed_tensors(tmp_path / "ct", masks=True)
    sn.save_pretrained(loaded, tmp_path / "plain")
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text()
    again = sn.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "plain")
    assert len(sn.get_masks(again)) == 14
    assert all(torch.equal(m, model.get_parameter(n) != 0) for n, m in sn.get_masks(again).items())
    _zeros_kept(model.state_dict(), sn.dense_state_dict(again))
