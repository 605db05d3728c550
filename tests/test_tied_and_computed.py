"""Tied weights are masked once under any of their names; computed weights (weight norm, spectral norm,
parametrizations) are masked through the parameter that carries their zeros, or refused."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import sparsenn as sn


class TiedLM(nn.Module):
    """An embedding, a body and an LM head sharing the embedding matrix (``head.weight = emb.weight``)."""

    def __init__(self, vocab=24, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.emb(ids))))


def _train(model, sp, steps=3, vocab=24, seed=0):
    opt = sp.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 5), generator=g)
        opt.zero_grad()
        logits = model(ids)
        logits = logits.logits if hasattr(logits, "logits") else logits
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).backward()
        opt.step()
        sp.step()
    return opt


@pytest.mark.parametrize("include", [None, ["head"], ["head.weight"], ["emb"], ["emb.weight"], [nn.Embedding]])
def test_tied_weight_is_selected_once_by_either_name(include):
    torch.manual_seed(0)
    model = TiedLM()
    sp = sn.Sparsifier(model, sparsity=0.5, include=include)
    assert "emb.weight" in sp.names and "head.weight" not in sp.names  # the canonical name, once
    assert model.head.weight_mask is model.emb.weight_mask  # one mask beside both names
    assert list(sn.get_masks(model)).count("emb.weight") == 1
    _train(model, sp)
    mask = model.emb.weight_mask
    assert (model.head.weight[~mask] == 0).all() and model.head.weight is model.emb.weight
    assert abs(1 - mask.float().mean().item() - 0.5) < 0.05


def test_tied_weight_excluded_by_either_name():
    torch.manual_seed(0)
    model = TiedLM()
    sp = sn.Sparsifier(model, sparsity=0.5, exclude=["head"])
    assert sp.names == ["body.weight"]
    assert not hasattr(model.emb, "weight_mask") and not hasattr(model.head, "weight_mask")


def test_tied_masks_in_state_dict_report_and_finalize_agree():
    torch.manual_seed(0)
    model = TiedLM()
    sp = sn.Sparsifier(model, sparsity=0.5)
    _train(model, sp)
    state = model.state_dict()
    assert torch.equal(state["emb.weight_mask"], state["head.weight_mask"])
    rows = [row.name for row in sn.report(model).rows]
    assert rows.count("emb.weight") == 1 and "head.weight" not in rows
    # a checkpoint whose head.weight (loaded after emb.weight) is dense at masked positions
    dirty = {k: (v + 1.0) if k in ("emb.weight", "head.weight") else v for k, v in state.items()}
    model.load_state_dict(dirty)
    mask = model.emb.weight_mask
    assert (model.emb.weight[~mask] == 0).all()
    sp.finalize()
    assert set(model.state_dict()) == set(TiedLM().state_dict())
    assert (model.head.weight[~mask] == 0).all()


def test_load_masks_accepts_either_name_of_a_tied_weight():
    from sparsenn.core.masks import load_masks

    torch.manual_seed(0)
    model = TiedLM()
    mask = torch.rand(model.emb.weight.shape) < 0.5
    with pytest.raises(ValueError, match="tied"):
        load_masks(model, {"emb.weight": mask, "head.weight": ~mask})
    assert not hasattr(model.emb, "weight_mask")  # checked first: nothing attached
    load_masks(model, {"head.weight": mask})
    assert model.emb.weight_mask is model.head.weight_mask and torch.equal(model.emb.weight_mask, mask)
    assert list(sn.get_masks(model)) == ["emb.weight"]


def test_other_mask_makers_share_the_tied_mask():
    from sparsenn.create.regularize.zeros import masks_from_zeros

    torch.manual_seed(0)
    model = TiedLM()
    sn.sparse_init(model, 0.5, distribution="uniform")
    assert model.head.weight_mask is model.emb.weight_mask
    target = TiedLM()
    sn.transfer_masks({"head.weight": model.emb.weight_mask, "body.weight": model.body.weight_mask}, target)
    assert target.head.weight_mask is target.emb.weight_mask
    assert torch.equal(target.emb.weight_mask, model.emb.weight_mask)
    plain = TiedLM()
    masks_from_zeros(plain, include=["head"])
    assert plain.head.weight_mask is plain.emb.weight_mask


def test_hugging_face_tied_lm_head():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=24, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    sp = sn.Sparsifier(model, sparsity=0.5, include=["lm_head"])
    assert sp.names == ["transformer.wte.weight"]
    _train(model, sp)
    mask = model.transformer.wte.weight_mask
    assert model.lm_head.weight_mask is mask and (model.lm_head.weight[~mask] == 0).all()


# -- computed weights -------------------------------------------------------------------------------


def _legacy_weight_norm(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(layer)


@pytest.mark.parametrize("style", ["parametrization", "legacy"])
@pytest.mark.parametrize("include", [None, ["0.weight"], ["0"]])
def test_weight_norm_masks_the_direction_not_the_magnitude(style, include):
    torch.manual_seed(0)
    layer = nn.Linear(20, 10)
    layer = parametrizations.weight_norm(layer) if style == "parametrization" else _legacy_weight_norm(layer)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(10, 4))
    sp = sn.Sparsifier(model, sparsity=0.5, include=include or [nn.Linear])
    v_name = "0.parametrizations.weight.original1" if style == "parametrization" else "0.weight_v"
    assert v_name in sp.names and not any(n.endswith(("original0", "weight_g")) for n in sp.names)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 20)).sum().backward()
        opt.step()
    model(torch.randn(1, 20))  # legacy weight norm recomputes .weight in a forward pre-hook
    effective = model[0].weight
    assert (effective == 0).float().mean().item() == pytest.approx(0.5)  # not 0.73: no whole rows
    assert (effective != 0).any(dim=1).all()


def test_magnitude_vector_is_masked_only_when_asked():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(20, 10)))
    sp = sn.Sparsifier(model, sparsity=0.5, include=["0.parametrizations.weight.original0"])
    assert sp.names == ["0.parametrizations.weight.original0"]


def test_spectral_norm_masks_the_original_weight():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(20, 10)))
    sp = sn.Sparsifier(model, sparsity=0.5)
    assert sp.names == ["0.parametrizations.weight.original"]
    mask = sp.masks["0.parametrizations.weight.original"]
    assert (model[0].weight[~mask] == 0).all()


@pytest.mark.parametrize("make", [lambda: parametrizations.orthogonal(nn.Linear(8, 8)),
                                  lambda: parametrizations.weight_norm(parametrizations.spectral_norm(nn.Linear(8, 8)))])
def test_other_parametrizations_are_refused_clearly_and_can_be_excluded(make):
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot mask '0.weight'.*exclude=\['0'\]"):
        sn.Sparsifier(model, sparsity=0.5)
    assert set(model.state_dict()) == set(before)
    sp = sn.Sparsifier(model, sparsity=0.5, exclude=["0"])
    assert sp.names == ["1.weight"]
