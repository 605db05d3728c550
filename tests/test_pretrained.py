"""Masked transformers models through save_pretrained / from_pretrained: no unexpected keys, masks beside.

Tiny randomly initialised Llama and BERT configs built here; nothing is downloaded
(``HF_HUB_OFFLINE=1``).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

import sparsenn as sn  # noqa: E402
from sparsenn.train.pretrained import MASKS_FILE, MaskFileError, load_masks, save_masks  # noqa: E402

transformers = pytest.importorskip("transformers")


def _llama(tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=128, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _masks(model):
    return {n: m.clone() for n, m in sn.get_masks(model).items()}


def test_plain_save_pretrained_of_a_masked_model_has_unexpected_keys(tmp_path):
    """The problem: the mask buffers land in model.safetensors and from_pretrained drops them."""
    model = _llama()
    sn.Sparsifier(model, 0.5)
    model.save_pretrained(tmp_path)
    _, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] and all(k.endswith("_mask") for k in info["unexpected_keys"])


@pytest.mark.parametrize("tie", [False, True])
def test_llama_round_trip_without_unexpected_keys_and_masks_reattached(tmp_path, tie):
    model = _llama(tie)
    sn.Sparsifier(model, 0.5, include=[nn.Linear, nn.Embedding])
    sn.save_pretrained(model, tmp_path)
    assert (tmp_path / MASKS_FILE).is_file()
    plain, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert not sn.get_masks(plain)  # plain loading: a dense model holding the exact zeros
    x = torch.randint(0, 128, (2, 7))
    assert torch.equal(plain(x).logits, model(x).logits)
    loaded, info = sn.from_pretrained(transformers.LlamaForCausalLM, tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"]
    want, got = _masks(model), _masks(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(loaded(x).logits, model(x).logits)
    sp = sn.attach_sparsifier(loaded)  # resume sparse training on the loaded model
    opt = sp.wrap(torch.optim.SGD(loaded.parameters(), lr=0.1))
    loaded(x, labels=x).loss.backward()
    opt.step()
    assert all((p[~m] == 0).all() for _, p, m in sn.iter_masks(loaded))


def test_bert_classifier_and_finalize_path(tmp_path):
    model = _bert()
    with pytest.warns(sn.DenseOutputLayerWarning, match="'classifier'"):
        sp = sn.Sparsifier(model, 0.5, pattern="channel")
    assert "classifier.weight" not in sp.names
    sn.save_pretrained(model, tmp_path / "masked")
    ids = torch.randint(0, 128, (2, 9))
    loaded = sn.from_pretrained(transformers.BertForSequenceClassification, tmp_path / "masked").eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert sn.masks.get_pattern(loaded.bert.encoder.layer[0].intermediate.dense, "weight") == "channel"
    sp.finalize()  # the other clean path: plain parameters, the dense model's keys
    model.save_pretrained(tmp_path / "final")
    plain, info = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "final",
                                                                             output_loading_info=True)
    assert not info["unexpected_keys"] and torch.equal(plain.eval()(ids).logits, model(ids).logits)


def test_saving_without_masks_removes_a_stale_masks_file(tmp_path):
    model = _llama()
    sn.Sparsifier(model, 0.5)
    sn.save_pretrained(model, tmp_path)
    sn.save_pretrained(model, tmp_path, masks=False)
    assert not (tmp_path / MASKS_FILE).exists()
    assert not sn.get_masks(sn.from_pretrained(transformers.AutoModelForCausalLM, tmp_path))
    sn.save_pretrained(model, tmp_path)
    loaded = sn.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    assert sn.get_masks(loaded).keys() == sn.get_masks(model).keys()


def test_dense_state_dict_has_the_unmasked_keys():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    keys = set(model.state_dict())
    sn.Sparsifier(model, 0.5)
    state = sn.dense_state_dict(model)
    assert set(state) == keys and (state["0.weight"] == 0).sum() == 12
    with pytest.raises(TypeError, match="no save_pretrained"):
        sn.save_pretrained(model, "unused")


def _bad_files(tmp_path, model):
    good = tmp_path / "good.safetensors"
    save_masks(model, good)
    meta = {"format": "sparsenn-masks", "version": "1", "patterns": "{}"}
    mask = sn.get_masks(model)["0.weight"]
    cases = {"unknown parameter": ({"9.weight": mask}, meta),
             "wrong shape": ({"0.weight": torch.ones(3, 3, dtype=torch.bool)}, meta),
             "not boolean": ({"0.weight": mask.float()}, meta),
             "not a masks file": ({"0.weight": mask}, {"format": "other"}),
             "future version": ({"0.weight": mask}, {**meta, "version": "99"})}
    for label, (tensors, md) in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path), metadata=md)
        yield label, path
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    yield "truncated", truncated


def test_hostile_masks_files_are_rejected_and_change_nothing(tmp_path):
    source = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    sn.Sparsifier(source, 0.5)
    for label, path in _bad_files(tmp_path, source):
        target = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(MaskFileError):
            load_masks(target, path)
        after = target.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), label
    with pytest.raises(FileNotFoundError):
        load_masks(source, tmp_path / "missing.safetensors")
