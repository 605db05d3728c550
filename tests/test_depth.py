"""Depth pruning: Block Influence (ShortGPT) scores and ``sn.drop_layers``.

References: hand-made blocks with known cosines; the original model with the dropped
blocks made identities (their ``forward`` returning the input) for the outputs.
"""

import pytest
import torch
from torch import nn

import sparsenn as sn
from sparsenn.models import ResNet18


class Scale(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.lin = nn.Linear(4, 4)  # a block has submodules
        self.f = f

    def forward(self, x):
        return self.f(x)


def test_block_influence_is_one_minus_the_cosine():
    x = torch.randn(5, 4)
    model = nn.Sequential(Scale(lambda t: t), Scale(lambda t: -t), Scale(lambda t: t * 3), nn.ReLU())
    scores = sn.block_influence(model, x)
    assert set(scores) == {"0", "1", "2"}  # nn.ReLU is a single layer, not a block
    assert scores["0"] == pytest.approx(0.0, abs=1e-6) and scores["1"] == pytest.approx(2.0, abs=1e-6)
    assert scores["2"] == pytest.approx(0.0, abs=1e-6)
    model = nn.Sequential(Scale(lambda t: t + torch.flip(t, [1])))
    ref = 1 - torch.nn.functional.cosine_similarity(x, x + torch.flip(x, [1]), dim=1).mean()
    assert sn.block_influence(model, x)["0"] == pytest.approx(float(ref), abs=1e-6)


def identity_forward(module):
    module.forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]


def test_resnet_blocks_drop_to_identity_and_outputs_match():
    torch.manual_seed(0)
    model = ResNet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    dropped = sn.drop_layers(model, x, 2)
    assert len(dropped.dropped) == 2
    # the first block of stages 2-4 changes the shape (stride 2): not a candidate
    assert set(dropped.block_scores) == {"layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}
    assert set(dropped.dropped) <= set(dropped.block_scores)
    for name in dropped.dropped:
        assert isinstance(dropped.get_submodule(name), nn.Identity)
        identity_forward(model.get_submodule(name))  # the reference: the original with those blocks skipped
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), model(x))


def test_transformer_layers_are_deleted_and_the_model_still_generates_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 12))
    dropped = sn.drop_layers(model, {"input_ids": ids}, 2)
    assert dropped.config.num_hidden_layers == 2 and len(dropped.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in dropped.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 4  # the input is unchanged
    for name in dropped.dropped:
        identity_forward(model.get_submodule(name))
    with torch.no_grad():
        torch.testing.assert_close(dropped(ids).logits, model(ids).logits)
        assert dropped.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 15)
    dropped.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, dropped(ids).logits)


def test_bad_requests_are_named():
    x = torch.randn(2, 4)
    model = nn.ModuleList([Scale(lambda t: t), Scale(lambda t: -t)])
    wrapper = nn.Sequential(Scale(lambda t: t))
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        sn.drop_layers(wrapper, x, -1)
    with pytest.raises(ValueError, match=r"only 1 shape-preserving blocks were found: \['0'\]"):
        sn.drop_layers(wrapper, x, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = model

        def forward(self, t):
            for layer in self.layers:
                t = layer(t)
            return t

    with pytest.raises(ValueError, match="would remove every layer of 'layers'"):
        sn.drop_layers(Net(), x, 2)
