"""torch's load_state_dict enforces the masks it loads: no weight a checkpoint holds at a masked position
survives the load, whichever way the state dict is loaded."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsenn as sn
from conftest import TinyMLP


def _dirty_state(model, seed=0):
    """The model's state dict with every weight non-zero, masks included (a hand-edited or foreign file)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 1.0 + torch.rand(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def _assert_zero_where_masked(model):
    for name, p, mask in sn.iter_masks(model):
        assert (p.detach()[~mask].view(torch.int32) == 0).all(), name


def _masked_model(sparsity=0.7, seed=0):
    torch.manual_seed(seed)
    model = TinyMLP()
    sn.Sparsifier(model, sparsity=sparsity, method="random", seed=seed)
    return model


@pytest.mark.parametrize("how", ["strict", "non_strict", "assign", "submodule"])
def test_loading_weights_nonzero_at_masked_positions_zeroes_them(how):
    model = _masked_model()
    state = _dirty_state(model)
    if how == "strict":
        model.load_state_dict(state)
    elif how == "non_strict":
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc3.")}, strict=False)
    elif how == "assign":
        model.load_state_dict(state, assign=True)
    else:
        model.fc2.load_state_dict({k[len("fc2."):]: v for k, v in state.items() if k.startswith("fc2.")})
    _assert_zero_where_masked(model)


def test_loaded_masks_are_the_ones_enforced():
    """A checkpoint with other masks: the model takes its masks and its weights, zeroed by those masks."""
    model = _masked_model(seed=0)
    other = _masked_model(seed=1)
    state = _dirty_state(other, seed=1)
    model.load_state_dict(state)
    for name, mask in sn.get_masks(model).items():
        assert torch.equal(mask, state[name + "_mask"])
    _assert_zero_where_masked(model)
    kept = {n: p.detach()[m] for n, p, m in sn.iter_masks(model)}
    for n, values in kept.items():
        assert torch.equal(values, state[n][state[n + "_mask"]])  # kept weights are loaded as they are


def test_assign_load_of_a_non_bool_mask_becomes_a_bool_mask():
    model = _masked_model()
    state = _dirty_state(model)
    state = {k: v.float() if k.endswith("_mask") else v for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    for _, p, mask in sn.iter_masks(model):
        assert mask.dtype is torch.bool and mask.device == p.device
    _assert_zero_where_masked(model)


def test_masks_enforced_after_deepcopy_and_training_still_masked():
    model = _masked_model()
    clone = copy.deepcopy(model)  # the load hook travels with the modules
    clone.load_state_dict(_dirty_state(model))
    _assert_zero_where_masked(clone)


def test_model_without_masks_refuses_mask_keys_or_takes_them_first():
    """A model without masks does not know mask keys: strict loading raises (torch's unexpected keys),
    nothing is silently dropped; masks_in_state_dict + load_masks attach them, then the load enforces."""
    from sparsenn.core.masks import load_masks, masks_in_state_dict

    source = _masked_model()
    state = _dirty_state(source)
    torch.manual_seed(0)
    plain = TinyMLP()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict(state)
    result = plain.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == sorted(k for k in state if k.endswith("_mask"))
    load_masks(plain, masks_in_state_dict(plain, state))
    plain.load_state_dict(state)
    for name, mask in sn.get_masks(plain).items():
        assert torch.equal(mask, state[name + "_mask"])
    _assert_zero_where_masked(plain)


def test_finalized_model_has_no_load_hook_left():
    from sparsenn.core.masks import _enforce_loaded_masks

    model = _masked_model()
    sp = sn.Sparsifier(model, sparsity=0.5, include=["fc1"])
    sp.finalize()
    sn.remove_masks(model)
    for m in model.modules():
        assert not any(h is _enforce_loaded_masks for h in m._load_state_dict_post_hooks.values())
    assert set(model.state_dict()) == set(TinyMLP().state_dict())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sparsity=st.sampled_from([0.3, 0.7, 0.95]),
       strict=st.booleans(), assign=st.booleans(), drop=st.sets(st.sampled_from(["fc1", "fc2", "fc3"])))
def test_any_load_leaves_masked_weights_exactly_zero(seed, sparsity, strict, assign, drop):
    model = _masked_model(sparsity, seed)
    state = _dirty_state(_masked_model(sparsity, seed + 1), seed)
    if drop:  # partial state dicts: only through strict=False
        strict = False
        state = {k: v for k, v in state.items() if k.split(".")[0] not in drop}
    model.load_state_dict(state, strict=strict, assign=assign)
    _assert_zero_where_masked(model)
