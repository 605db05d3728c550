"""The compressed-tensors "sparse-bitmask" reader against files the old release's compressor writes.

The reference writer is compressed-tensors 0.13.0 (the newest release that still has
``BitmaskCompressor`` and installs beside transformers 5; pinned in the test extra): a tiny
random tensor dict through ``BitmaskTensor`` and a tiny pruned LLaMA through ``ModelCompressor``
(``compress`` + ``save_pretrained(state_dict=...)`` + ``update_config``, llm-compressor's save path).
Everything is built here; nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import json
import shutil

import pytest
import torch
import transformers
from compressed_tensors.compressors import (
    BitmaskCompressor,
    BitmaskTensor,
    ModelCompressor,
)
from compressed_tensors.config import BitmaskConfig
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import sparsenn as sn
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.compress.compressed_tensors import (
    load_compressed_tensors,
    read_sparse_bitmask,
)

CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128}


def _bits(t):
    """The tensor's bit pattern, for bitwise comparisons of any dtype."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _compress(tensors, old_naming=False):
    """The old release's compressed dict: each tensor through ``BitmaskTensor`` under 0.9+ (or pre-0.9) names."""
    out = {}
    for name, t in tensors.items():
        prefix = name if old_naming else name.removesuffix(".weight")
        out.update(BitmaskTensor.from_dense(t).dict(name_prefix=prefix))
    return out


def _pruned_llama(dtype=torch.float32, tie=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    sn.Sparsifier(model, 0.5, include=[torch.nn.Linear], exclude=["lm_head"])
    sn.remove_masks(model)
    return model


def _save_compressed(model, folder, **save_kwargs):
    """llm-compressor's save: compress the state dict, save_pretrained it, write the compression config."""
    config = BitmaskConfig(targets=["Linear"], ignore=["lm_head"], global_sparsity=0.5)
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=config)
    model.save_pretrained(folder, state_dict=compressor.compress(model), **save_kwargs)
    compressor.update_config(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = _pruned_llama()
    root = tmp_path_factory.mktemp("ct")
    _save_compressed(model, root / "single")
    _save_compressed(model, root / "sharded", max_shard_size="40KB")
    return model, root


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    state = model.state_dict()
    return state.keys() == before.keys() and all(_same_bits(state[k], before[k]) for k in state)


# ----------------------------------------------------------------------------- the model


def test_the_old_release_wrote_a_sparse_bitmask_checkpoint(llama):
    _, root = llama
    config = json.loads((root / "single" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    names = set(load_file(root / "single" / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.bitmask" in names and "model.layers.0.mlp.up_proj.weight" not in names
    assert (root / "sharded" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reader_returns_the_pruned_state_dict_bitwise(llama, layout):
    model, root = llama
    got = read_sparse_bitmask(root / layout)
    want = model.state_dict()
    assert got.keys() == want.keys()
    assert all(_same_bits(got[k], want[k]) for k in want)
    ref = dict(BitmaskCompressor(config=BitmaskConfig()).decompress(str(root / layout)))  # the old decompressor
    assert all(_same_bits(got[k], v) for k, v in ref.items())


def test_load_builds_the_model_with_equal_logits(llama):
    model, root = llama
    loaded = load_compressed_tensors(root / "sharded").eval()
    assert type(loaded) is transformers.LlamaForCausalLM
    assert getattr(loaded.config, "quantization_config", None) is None
    assert not sn.get_masks(loaded)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_load_fills_a_given_model_and_attaches_the_bitmasks_as_masks(llama):
    model, root = llama
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    out = load_compressed_tensors(root / "single", target, masks=True)
    assert out is target
    got = target.state_dict()
    assert all(_same_bits(got[k], v) for k, v in model.state_dict().items())
    masks = sn.get_masks(target)
    assert len(masks) == 14 and "lm_head.weight" not in masks
    assert all(torch.equal(m, target.get_parameter(n) != 0) for n, m in masks.items())


def test_bf16_model_with_tied_embeddings(tmp_path):
    model = _pruned_llama(torch.bfloat16, tie=True)
    _save_compressed(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # saved once, under the embedding
    loaded = load_compressed_tensors(tmp_path).eval()
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(_same_bits(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    x = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_masks_a_model_already_has_are_replaced_with_masks_true_and_enforced_without(llama):
    model, root = llama
    for replace in (True, False):
        target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
        sn.Sparsifier(target, 0.9, include=[torch.nn.Linear], exclude=["lm_head"])
        old = {k: m.clone() for k, m in sn.get_masks(target).items()}
        load_compressed_tensors(root / "single", target, masks=replace)
        got, want = target.state_dict(), model.state_dict()
        for name, mask in sn.get_masks(target).items():
            if replace:  # the file's bitmask is the mask now, and the weights are the file's, bit for bit
                assert torch.equal(mask, want[name] != 0) and _same_bits(got[name], want[name])
            else:  # the model's own mask stays and is enforced on the loaded weights
                assert torch.equal(mask, old[name])
                assert _same_bits(got[name], torch.where(mask, want[name], torch.zeros_like(want[name])))


# ----------------------------------------------------------------------------- tensors and edge cases


def _edge_tensors(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 13, generator=g).to(dtype)  # 13 columns: not a multiple of 8
    w[0] = 0  # an all-zero row
    w[2:4] *= (torch.rand(2, 13, generator=g) < 0.5)
    w = torch.where(w == 0, torch.zeros_like(w), w)  # no -0.0: the format counts it as a zero, +0.0 comes back
    # rows 1, 4, 5 fully dense
    return {"a.weight": w, "empty.weight": torch.zeros(3, 8, dtype=dtype), "dense.weight": torch.ones(2, 16, dtype=dtype),
            "vec.weight": torch.tensor([0, 1.5, 0, -2], dtype=dtype), "cube.weight": w.reshape(3, 2, 13),
            "nocols.weight": torch.zeros(4, 0, dtype=dtype), "bias": torch.randn(6, generator=g).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("old_naming", [False, True])
def test_edge_cases_bitwise(tmp_path, dtype, old_naming):
    tensors = _edge_tensors(dtype)
    stored = _compress({k: v for k, v in tensors.items() if k != "bias"}, old_naming) | {"bias": tensors["bias"]}
    save_file(stored, tmp_path / "t.safetensors")
    got = read_sparse_bitmask(tmp_path / "t.safetensors")
    assert got.keys() == tensors.keys()
    assert all(_same_bits(got[k], v) for k, v in tensors.items())


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 11), min_size=1, max_size=3), density=st.floats(0, 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_reader_inverts_the_old_compressor(tmp_path_factory, shape, density, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype) * (torch.rand(shape, generator=g) < density)
    t = torch.where(t == 0, torch.zeros_like(t), t)  # the format keeps no -0.0: it counts as a zero
    path = tmp_path_factory.mktemp("h") / "t.safetensors"
    save_file(_compress({"w.weight": t}), path)
    assert _same_bits(read_sparse_bitmask(path)["w.weight"], t)


# ----------------------------------------------------------------------------- hostile files


def _good():
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    w[w.abs() < 0.6] = 0
    return _compress({"fc.weight": w})


def _forged():
    """label -> (compressed dict, message) for files whose parts disagree."""
    good = _good()

    def edit(**parts):
        return good | {f"fc.{k}": v for k, v in parts.items()}

    bitmask, offsets, values = (good[f"fc.{p}"] for p in ("bitmask", "row_offsets", "compressed"))
    offsets_off = offsets.clone()
    offsets_off[3] += 1
    padded = bitmask.clone()
    padded[1, 1] |= 0x80  # column 15 of 12
    missing = {k: v for k, v in good.items() if k != "fc.row_offsets"}
    return {
        "forged shape": (edit(shape=torch.tensor([5, 20])), "bitmask must be uint8 of shape"),
        "forged rows": (edit(shape=torch.tensor([6, 12])), "bitmask must be uint8 of shape"),
        "negative dim": (edit(shape=torch.tensor([-5, 12])), "negative"),
        "shape not 1-D": (edit(shape=torch.tensor([[5, 12]])), "1-D int64"),
        "bitmask too short": (edit(bitmask=bitmask[:, :1].contiguous()), "bitmask must be uint8 of shape"),
        "bitmask as int8": (edit(bitmask=bitmask.view(torch.int8)), "bitmask must be uint8"),
        "padding bits": (edit(bitmask=padded), "padding bits"),
        "too few values": (edit(compressed=values[:-1].contiguous()), "flags"),
        "too many values": (edit(compressed=torch.cat([values, values[:1]])), "flags"),
        "more values than the shape": (edit(compressed=torch.ones(61)), "at most 60"),
        "row offset": (edit(row_offsets=offsets_off), "row_offsets\\[3\\]"),
        "row offsets shape": (edit(row_offsets=offsets[:-1].contiguous()), "row_offsets must be int64 of shape"),
        "missing part": (missing, "fc.row_offsets missing"),
        "plain and compressed": (good | {"fc.weight": torch.zeros(5, 12)}, "both plain and compressed"),
    }


@pytest.mark.parametrize("label", list(_forged()))
def test_forged_parts_are_refused(tmp_path, label):
    tensors, message = _forged()[label]
    save_file(tensors, tmp_path / "t.safetensors")
    with pytest.raises(ArchiveError, match=message):
        read_sparse_bitmask(tmp_path / "t.safetensors")


def test_truncated_and_oversized_files_are_refused(tmp_path):
    save_file(_good(), tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-7])
    with pytest.raises(ArchiveError, match="data_offsets"):
        read_sparse_bitmask(tmp_path / "cut.safetensors")
    with pytest.raises(ArchiveError, match="max_bytes"):
        read_sparse_bitmask(tmp_path / "good.safetensors", max_bytes=len(data) - 1)
    save_file(_compress({"z.weight": torch.zeros(64, 64)}), tmp_path / "zeros.safetensors")  # 16 KiB dense
    size = (tmp_path / "zeros.safetensors").stat().st_size
    assert size < 2000
    with pytest.raises(ArchiveError, match="decompressed tensors would take 16384 bytes, more than max_bytes=2000"):
        read_sparse_bitmask(tmp_path / "zeros.safetensors", max_bytes=2000)
    assert read_sparse_bitmask(tmp_path / "zeros.safetensors", max_bytes=16384)["z.weight"].shape == (64, 64)
    with pytest.raises(ValueError, match="max_bytes must be"):
        read_sparse_bitmask(tmp_path / "good.safetensors", max_bytes=-1)


def _folder_case(root, tmp_path, label):
    """A copy of the sharded folder with one hostile change; returns (folder, message)."""
    folder = tmp_path / label.replace(" ", "_")
    shutil.copytree(root / "sharded", folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    config = json.loads((folder / "config.json").read_text())
    first = min(index["weight_map"].values())
    if label == "shard outside":
        shutil.move(folder / first, tmp_path / first)
        index["weight_map"] = {k: ("../" + v if v == first else v) for k, v in index["weight_map"].items()}
        message = "plain file name"
    elif label == "absolute shard":
        index["weight_map"] = {k: str(folder / v) for k, v in index["weight_map"].items()}
        message = "plain file name"
    elif label == "index misses a tensor":
        index["weight_map"].pop("model.norm.weight")
        message = "'model.norm.weight' of .* is not in the weight_map"
    elif label == "index names the wrong shard":
        shards = list(index["weight_map"].values())
        name = next(k for k, v in index["weight_map"].items() if v != first and shards.count(v) > 1)
        index["weight_map"][name] = first
        message = f"{name!r} is mapped to"
    elif label == "forged row offsets":
        shard = next(f for f in sorted(set(index["weight_map"].values()))
                     if "model.layers.1.mlp.up_proj.row_offsets" in load_file(folder / f))
        tensors = load_file(folder / shard)
        tensors["model.layers.1.mlp.up_proj.row_offsets"][5] -= 1
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        message = "row_offsets\\[5\\]"
    elif label == "2:4 format":
        config["quantization_config"]["sparsity_config"]["format"] = "sparse-24-bitmask"
        message = "sparsity format 'sparse-24-bitmask' is not supported; supported: sparse-bitmask, dense"
    elif label == "quantized":
        config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"]}}
        message = "quantized"
    index_path.write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return folder, message


@pytest.mark.parametrize("label", ["shard outside", "absolute shard", "index misses a tensor",
                                   "index names the wrong shard", "forged row offsets", "2:4 format", "quantized"])
def test_hostile_folders_are_refused_and_the_model_is_unchanged(llama, tmp_path, label):
    _, root = llama
    folder, message = _folder_case(root, tmp_path, label)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    before = _state(target)
    with pytest.raises(ArchiveError, match=message):
        load_compressed_tensors(folder, target, masks=True)
    assert _unchanged(target, before) and not sn.get_masks(target)


def test_a_checkpoint_that_does_not_fit_the_model_changes_nothing(llama):
    _, root = llama
    for cfg, message in [(CONFIG | {"intermediate_size": 96}, "in the checkpoint, .* in the model"),
                         (CONFIG | {"num_hidden_layers": 3}, "no tensor 'model.layers.2"),
                         (CONFIG | {"num_hidden_layers": 1}, "not in LlamaForCausalLM's state_dict")]:
        target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        before = _state(target)
        with pytest.raises(ArchiveError, match=message):
            load_compressed_tensors(root / "single", target)
        assert _unchanged(target, before)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    before = _state(target)
    with pytest.raises(ArchiveError, match="model.to"):
        load_compressed_tensors(root / "single", target)
    assert _unchanged(target, before)


def test_remote_code_and_unknown_model_types_are_refused(llama, tmp_path):
    _, root = llama
    shutil.copytree(root / "single", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(model_type="evil-remote", auto_map={"AutoModelForCausalLM": "evil.Model"})
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchiveError, match="model_type 'evil-remote'"):
        load_compressed_tensors(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        load_compressed_tensors(tmp_path / "nothing")
