"""Scores from data that carry no signal are an error, not a mask chosen by memory position.

With all-zero gradients (a loss that does not depend on the weights, inputs that are all
zero) SNIP, Taylor, OBD and GraSP score every weight 0, and top-k with ties to the lower
index used to keep the first weights of each layer in memory order, silently. Data-free
scores (magnitude, random) may tie legitimately (an all-equal initialisation) and keep
the documented tie rule. RigL with a flat gradient grows at random (SET's rule) and says so.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenn as sn
from conftest import TinyMLP, make_batches


def _no_signal_loss(out, y):
    return (out * 0.0).sum()  # depends on the output, but its gradient is zero everywhere


@pytest.mark.parametrize("method", ["snip", "taylor", "obd", "grasp", "movement"])
def test_zero_gradients_raise_naming_method_and_layers(method):
    torch.manual_seed(0)
    model = TinyMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.ConstantScoresError, match=rf"score '{method}'.*'fc1.weight', 'fc2.weight', "
                                                     r"'fc3.weight'.*loss_fn.*score_batches"):
        sn.Sparsifier(model, 0.5, method=method, data=make_batches(n=2), loss_fn=_no_signal_loss)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_only_the_layers_without_signal_are_named():
    """All-zero inputs: the first layer's gradient x^T delta is zero; deeper layers still learn from
    the biases. Uniform: per layer, so fc1 is named alone; global: one ranking, not constant."""
    torch.manual_seed(0)
    data = [(torch.zeros(8, 16), torch.randint(0, 4, (8,)))]
    with pytest.raises(sn.ConstantScoresError, match=r"layer 'fc1.weight' \(all 0\)") as err:
        sn.Sparsifier(TinyMLP(), 0.5, method="snip", data=data)
    assert "fc2" not in str(err.value) and "exclude=['fc1']" in str(err.value)
    sn.Sparsifier(TinyMLP(), 0.5, method="snip", data=data, distribution="global")  # one ranking with signal


def test_global_distribution_checks_all_layers_together():
    torch.manual_seed(0)
    with pytest.raises(sn.ConstantScoresError, match="taylor.*all layers together"):
        sn.Sparsifier(TinyMLP(), 0.5, method="taylor", data=make_batches(n=1), loss_fn=_no_signal_loss,
                      distribution="global")


def test_data_free_scores_keep_the_tie_rule():
    model = TinyMLP()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.1)  # an all-equal initialisation
    sp = sn.Sparsifier(model, 0.5, method="magnitude")
    assert sp.masks["fc1.weight"].reshape(-1)[: 16 * 32 // 2].all()  # documented: ties to the lower index
    sn.Sparsifier(TinyMLP(), 0.5, method="random")
    sn.Sparsifier(TinyMLP(), 0.8, method="set", total_steps=10)


def test_no_choice_no_error():
    """Equal scores are harmless where nothing is chosen: a dense layer (override 0) or one unit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 4))
    sn.Sparsifier(model, 0.1, method="snip", data=make_batches(n=1, d_in=1), loss_fn=_no_signal_loss,
                  overrides={"1.weight": 0.0})


def test_iterative_update_checks_only_the_weights_still_competing():
    """After a first informative prune, pruned weights score -inf: the check looks at the survivors."""
    torch.manual_seed(0)
    model = TinyMLP()
    signal = {"on": True}

    def loss_fn(out, y):
        return F.cross_entropy(out, y) if signal["on"] else (out * 0.0).sum()

    sp = sn.Sparsifier(model, 0.5, method="snip", data=make_batches(n=1), loss_fn=loss_fn)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    signal["on"] = False
    with pytest.raises(sn.ConstantScoresError, match="snip"):
        sp.update(0.8)
    assert all(torch.equal(masks[n], m) for n, m in sp.masks.items())  # nothing changed
    sp.update(0.5)  # no weight to remove: the survivors' equal scores choose nothing


def test_rigl_on_a_flat_gradient_grows_at_random_and_says_so():
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, 0.8, method="rigl", update_every=1, total_steps=10, drop_schedule="constant")
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    x, _ = make_batches(n=1)[0]
    opt.zero_grad()
    (model(x) * 0.0).sum().backward()  # dense gradient: zero everywhere
    opt.step()
    with pytest.warns(RuntimeWarning, match=r"rigl.*'fc1.weight'.*at random"):
        sp.step()
    h = sp.method.history[-1]
    assert h["grown_at_random"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for name, mask in sp.masks.items():
        n = mask.numel()
        grown = torch.nonzero(mask.reshape(-1)).squeeze(1)
        assert grown.float().mean() > 0.25 * n  # not packed at the start of the tensor (lowest indices)
    opt.zero_grad()
    F.cross_entropy(model(x), make_batches(n=1)[0][1]).backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sp.step()  # an informative gradient: RigL's own rule, no warning
    assert sp.method.history[-1]["grown_at_random"] == []
