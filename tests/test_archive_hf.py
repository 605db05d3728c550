"""A pruned transformers model through the sparse archive: rebuilt from the manifest alone, same logits,
much smaller than save_pretrained, and straight into sparsenn.convert."""

import copy

import pytest
import torch

import sparsenn as sn
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.compress import archive

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(config).eval()
    sn.oneshot(model, "magnitude", 0.7)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_llama_round_trip_rebuilt_from_the_manifest(pruned, tmp_path):
    path = archive.save(tmp_path / "llama.sparsenn", pruned)
    loaded = archive.load(path)
    assert type(loaded) is type(pruned)
    assert loaded.config.to_dict() == pruned.config.to_dict()
    assert sn.masks.get_masks(loaded).keys() == sn.masks.get_masks(pruned).keys()
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(pruned, ids), _logits(loaded, ids))
    converted = sn.convert(loaded, {"input_ids": ids[:1]}, batch_sizes=(1,), budget=0.02, time_limit=10)
    assert torch.allclose(_logits(converted, ids[:1]), _logits(pruned, ids[:1]), atol=1e-4)


def test_archive_is_much_smaller_than_save_pretrained(pruned, tmp_path):
    dense = copy.deepcopy(pruned)
    sn.masks.remove_masks(dense)  # save_pretrained of the same weights, without mask buffers
    dense.save_pretrained(tmp_path / "hf")
    hf = (tmp_path / "hf" / "model.safetensors").stat().st_size
    exact = archive.save(tmp_path / "llama.sparsenn", pruned).stat().st_size
    # 70% of the block weights pruned: 0.3 x 4 bytes + 1 bit per weight; embeddings and head dense
    assert exact < 0.5 * hf, (exact, hf)
    int8 = archive.save(tmp_path / "q.sparsenn", pruned, codec="bitmask_int8").stat().st_size
    assert int8 < 0.25 * hf, (int8, hf)
    loaded = archive.load(tmp_path / "q.sparsenn")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    ref, out = _logits(pruned, ids), _logits(loaded, ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_a_given_model_is_filled_and_a_wrong_one_untouched(pruned, tmp_path):
    path = archive.save(tmp_path / "llama.sparsenn", pruned)
    same = transformers.LlamaForCausalLM(pruned.config)
    assert archive.load(path, same) is same
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in pruned.state_dict().items())
    config = copy.deepcopy(pruned.config)
    config.intermediate_size = 96
    other = transformers.LlamaForCausalLM(config)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ArchiveError, match="mlp"):
        archive.load(path, other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
