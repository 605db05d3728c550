"""``sn.shrink``'s newer importances and rankings: Taylor (against a hand computation), FLAP's fluctuation
metric (against a direct computation of the recorded statistics), global ratios (how many go, from where,
the cap), and a channel ``Sparsifier`` finalized into a shrunk model."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from sparsenn.structured import couple_batchnorm, couple_bias, group_importance
from sparsenn.structured.attention import attention_modules, head_scores
from sparsenn.structured.graph import build_graph
from sparsenn.structured.shrink import ShrinkError


def mlp(seed=0, widths=(3, 4, 2)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2])).eval()


def hand_taylor(model, x, t):
    """The Taylor group score of the hidden channels of Linear-ReLU-Linear with ``L = 0.5 ||y - t||^2``,
    gradients written out: ``dL/dy = y - t``, ``dL/dW2 = dy^T h``, ``dh = dy W2``, ``dz = dh * (z > 0)``,
    ``dL/dW1 = dz^T x``, ``dL/db1 = sum dz``. Producer: ``|sum_j W1[c, j] dW1[c, j] + b1[c] db1[c]|``;
    consumer: ``|sum_i W2[i, c] dW2[i, c]|``; each divided by its mean, summed."""
    w1, b1, w2, b2 = (p.detach() for p in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    z = x @ w1.T + b1
    h = z.clamp(min=0)
    dy = h @ w2.T + b2 - t
    dw2 = dy.T @ h
    dz = (dy @ w2) * (z > 0)
    dw1, db1 = dz.T @ x, dz.sum(0)
    producer = ((w1 * dw1).sum(1) + b1 * db1).abs()
    consumer = (w2 * dw2).sum(0).abs()
    return producer, consumer, producer / producer.mean() + consumer / consumer.mean()


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
T = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))


def loss_fn(out):
    return 0.5 * (out - T).pow(2).sum()


def test_taylor_matches_a_hand_computation_from_either_gradient_source():
    model = mlp()
    producer, consumer, expected = hand_taylor(model, X, T)
    # the first-order change of the loss is the same seen from either side of a ReLU: z * dL/dz = h * dL/dh
    torch.testing.assert_close(producer, consumer)
    with_grads = copy.deepcopy(model)
    loss_fn(with_grads(X)).backward()
    g = build_graph(with_grads, X).group_of("0")
    torch.testing.assert_close(group_importance(with_grads, g, "taylor"), expected)
    top2 = sorted(torch.topk(expected, 2).indices.tolist())
    # from loss_fn (one run on a copy): the model passed in is untouched, gradients included
    shrunk = sn.shrink(model, X, ratio=0.5, importance="taylor", loss_fn=loss_fn)
    assert shrunk.shrink_kept == {"0": top2}
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in shrunk.parameters())
    # from the .grad the user's backward left: used as they are, and left as they are
    before = {n: p.grad.clone() for n, p in with_grads.named_parameters()}
    assert sn.shrink(with_grads, X, ratio=0.5, importance="taylor").shrink_kept == {"0": top2}
    assert all(torch.equal(p.grad, before[n]) for n, p in with_grads.named_parameters())


def test_taylor_refuses_what_cannot_give_gradients():
    model = mlp()
    with pytest.raises(ValueError, match=r"importance='taylor' needs gradients: call loss.backward\(\) on the model "
                                         r"first, or pass loss_fn="):
        sn.shrink(model, X, ratio=0.5, importance="taylor")
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(6, 2\)"):
        sn.shrink(model, X, ratio=0.5, importance="taylor", loss_fn=lambda out: out)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        sn.shrink(model, X, ratio=0.5, importance="taylor", loss_fn="mse")
    with pytest.raises(ValueError, match="loss_fn is used by importance='taylor' only, not by importance='l1'"):
        sn.shrink(model, X, ratio=0.5, loss_fn=loss_fn)
    frozen = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    frozen[0].requires_grad_(False)
    frozen[2].requires_grad_(False)  # the hidden group of "0" (rows of 0, columns of 2) gets no gradient
    with pytest.raises(ValueError, match=r"no gradient reaches the layers of the group produced by \['0'\]"):
        sn.shrink(frozen, X, ratio=0.5, importance="taylor", loss_fn=loss_fn)


def test_flap_is_the_input_variance_times_the_squared_weight_column():
    model = mlp(widths=(5, 8, 3))
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(3)) * 2 + 1
    graph = build_graph(model, x)
    with torch.no_grad():
        h = F.relu(model[0](x))
    var = h.var(0, unbiased=False)
    torch.testing.assert_close(graph.input_vars["2"], var, rtol=1e-5, atol=1e-6)
    flap = var * model[2].weight.detach().pow(2).sum(0)
    torch.testing.assert_close(group_importance(model, graph.group_of("0"), "flap", graph), flap / flap.mean())
    torch.testing.assert_close(group_importance(model, graph.group_of("0"), "flap", graph, normalise=False), flap)
    kept = sorted(torch.topk(flap, 4).indices.tolist())
    assert sn.shrink(model, x, ratio=0.5, importance="flap").shrink_kept == {"0": kept}


def test_flap_on_convolutions_takes_the_variance_over_batch_and_positions_and_flatten_repeats():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 4, 3)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.relu(self.b(F.relu(self.a(x)))), 1))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(7, 2, 4, 4)
    graph = build_graph(model, x)
    with torch.no_grad():
        h = F.relu(model.a(x))
        y = torch.flatten(F.relu(model.b(h)), 1)
    var_b = h.transpose(0, 1).reshape(6, -1).var(1, unbiased=False)
    flap_a = var_b * model.b.weight.detach().pow(2).sum((0, 2, 3))
    torch.testing.assert_close(group_importance(model, graph.group_of("a"), "flap", graph), flap_a / flap_a.mean(),
                               rtol=1e-4, atol=1e-6)
    per_col = y.var(0, unbiased=False) * model.fc.weight.detach().pow(2).sum(0)  # 4 channels x 4 positions
    flap_b = per_col.reshape(4, 4).sum(1)
    torch.testing.assert_close(group_importance(model, graph.group_of("b"), "flap", graph), flap_b / flap_b.mean(),
                               rtol=1e-4, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(chunks=st.lists(st.integers(1, 9), min_size=1, max_size=4), shift=st.floats(-100, 100),
       seed=st.integers(0, 1000))
def test_statistics_of_a_layer_called_several_times_are_those_of_all_its_inputs(chunks, shift, seed):
    """Variance (and norms, zero fractions) merged over calls equal those of the concatenated inputs, even far
    from zero mean."""

    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, xs):
            return torch.stack([self.b(F.relu(self.a(x))).sum(0) for x in xs])

    torch.manual_seed(seed)
    model = Looped().eval()
    xs = [torch.randn(n, 3) + shift for n in chunks]
    graph = build_graph(model, (xs,))
    with torch.no_grad():
        h = F.relu(model.a(torch.cat(xs)))
    scale = h.abs().max().clamp(min=1)
    torch.testing.assert_close(graph.input_vars["b"], h.var(0, unbiased=False), rtol=1e-4, atol=1e-5 * scale ** 2)
    torch.testing.assert_close(graph.input_norms["b"], h.norm(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graph.input_zeros["b"], h.eq(0).float().mean(0))


def _llama():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))


def test_flap_and_taylor_head_scores_and_llama_shrinks_to_the_masked_model():
    from test_shrink_transformers import masked_like

    model = _llama()
    graph = build_graph(model, {"input_ids": IDS})
    name, attn = attention_modules(model)[0]
    v = graph.input_vars[f"{name}.o_proj"]
    per = (attn.o_proj.weight.detach().pow(2).sum(0) * v).reshape(6, 8).sum(1)
    torch.testing.assert_close(head_scores(attn, "flap", False, o_vars=v), (per / per.mean()).reshape(2, 3))
    lm_loss = lambda out: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
    for kw in ({"importance": "flap"}, {"importance": "taylor", "loss_fn": lm_loss},
               {"importance": "taylor", "loss_fn": lm_loss, "attention": "kv_groups"}):
        shrunk = sn.shrink(model, {"input_ids": IDS}, ratio=0.5, **kw)
        assert shrunk.config.intermediate_size == 48
        with torch.no_grad():
            torch.testing.assert_close(shrunk(IDS).logits, masked_like(model, shrunk)(IDS).logits, rtol=1e-4,
                                       atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


class Three(nn.Module):
    """Three hidden groups of 16 channels with the same fan-in: ``a``, ``b`` and ``c``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.a, self.b, self.c = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(F.relu(self.c(F.relu(self.b(F.relu(self.a(F.relu(self.inp(x)))))))))


def lost(model, shrunk):
    return {n: m.out_features - shrunk.get_submodule(n).out_features for n, m in model.named_children()
            if n != "out"}


def test_global_raw_takes_more_from_a_layer_whose_channels_all_matter_less():
    model = Three().eval()
    with torch.no_grad():
        model.b.weight.mul_(0.2)  # every row of b is small
    x = torch.randn(8, 4)
    local = sn.shrink(model, x, ratio=0.25, importance="filter_l1")
    assert lost(model, local) == {"inp": 4, "a": 4, "b": 4, "c": 4}
    raw = sn.shrink(model, x, ratio=0.25, global_ratio="raw", importance="filter_l1")
    assert sum(lost(model, raw).values()) == 16 and lost(model, raw)["b"] == 14  # capped at int(0.9 * 16)
    capped = sn.shrink(model, x, ratio=0.25, global_ratio="raw", max_group_ratio=0.5,
                        importance="filter_l1")
    assert sum(lost(model, capped).values()) == 16 and lost(model, capped)["b"] == 8
    # "mean" judges a channel against its own group: a uniform scale drops out, the layer is not singled out
    unscaled = sn.shrink(Three().eval(), x, ratio=0.25, global_ratio=True, importance="filter_l1")
    assert sn.shrink(model, x, ratio=0.25, global_ratio=True, importance="filter_l1").shrink_kept == unscaled.shrink_kept
    with torch.no_grad():
        torch.testing.assert_close(raw(x), model_masked(model, raw)(x))


def model_masked(model, shrunk):
    from test_shrink import masked_like

    return masked_like(model, shrunk)


def test_global_mean_takes_more_from_a_group_with_a_tail_of_weak_channels():
    model = Three().eval()
    with torch.no_grad():
        model.a.weight[:8] *= 0.05  # half of a's channels are weak, the other groups are alike
    shrunk = sn.shrink(model, torch.randn(8, 4), ratio=0.125, global_ratio=True)  # 8 of 64 channels
    assert lost(model, shrunk)["a"] == 8 and shrunk.shrink_kept["a"] == list(range(8, 16))


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(2, 12), min_size=1, max_size=4), ratio=st.floats(0.0, 0.95),
       importance=st.sampled_from(["l1", "random", "wanda", "flap", "taylor"]), mode=st.sampled_from(["mean", "raw"]),
       round_to=st.integers(1, 3), seed=st.integers(0, 1000))
def test_global_ratio_removes_ratio_of_all_channels_and_stays_exact(widths, ratio, importance, mode, round_to, seed):
    """Whatever the widths: ``int(ratio * total)`` channels go (fewer only where ``round_to`` rounds a kept count
    up), no group loses more than the cap, the shrunk model equals the masked one; or the cap makes the ratio
    impossible and that is said."""
    torch.manual_seed(seed)
    layers = [nn.Linear(3, widths[0])] + [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    model = nn.Sequential(*[m for lin in layers for m in (lin, nn.ReLU())], nn.Linear(widths[-1], 2)).eval()
    x = torch.randn(5, 3)
    kw = {"loss_fn": lambda out: out.pow(2).sum()} if importance == "taylor" else {}
    total = sum(widths)
    if ratio > 0.9:
        with pytest.raises(ValueError, match="is more than max_group_ratio=0.9"):
            sn.shrink(model, x, ratio=ratio, importance=importance, global_ratio=mode, **kw)
        return
    if int(ratio * total) > sum(int(0.9 * w) for w in widths):
        with pytest.raises(ShrinkError, match="max_group_ratio=0.9 lets the groups lose only"):
            sn.shrink(model, x, ratio=ratio, importance=importance, global_ratio=mode, **kw)
        return
    shrunk = sn.shrink(model, x, ratio=ratio, importance=importance, global_ratio=mode, round_to=round_to, **kw)
    kept = [len(shrunk.shrink_kept.get(str(2 * i), range(w))) for i, w in enumerate(widths)]
    assert all(w - k <= int(0.9 * w) for w, k in zip(widths, kept))
    assert all(k == w or k % round_to == 0 for w, k in zip(widths, kept))
    if round_to == 1:
        assert total - sum(kept) == int(ratio * total)
    else:
        assert int(ratio * total) - (round_to - 1) * len(widths) <= total - sum(kept) <= int(ratio * total)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), model_masked(model, shrunk)(x), rtol=1e-4, atol=1e-5)


def test_global_ratio_arguments_are_checked():
    model, x = Three().eval(), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"global_ratio must be False, True or one of 'mean', 'raw', got 'max'"):
        sn.shrink(model, x, ratio=0.5, global_ratio="max")
    with pytest.raises(ValueError, match="global_ratio ranks channels for a ratio: pass ratio="):
        sn.shrink(model, x, global_ratio=True)
    with pytest.raises(ValueError, match="max_group_ratio caps what each group loses under global_ratio"):
        sn.shrink(model, x, ratio=0.5, max_group_ratio=0.5)
    with pytest.raises(ValueError, match=r"max_group_ratio must be a number in \(0, 1\), got 1.0"):
        sn.shrink(model, x, ratio=0.5, global_ratio=True, max_group_ratio=1.0)
    with pytest.raises(ValueError, match="ratio=0.6 is more than max_group_ratio=0.5"):
        sn.shrink(model, x, ratio=0.6, global_ratio=True, max_group_ratio=0.5)


def test_a_channel_sparsifier_finalizes_into_a_shrunk_model_with_equal_outputs():
    """Masks (``pattern="channel"``) -> ``couple_batchnorm`` / ``couple_bias`` -> ``sn.shrink(model, x)``: every
    pruned channel goes, convolutions followed by BatchNorm and Linear layers with a bias alike."""
    from test_shrink import ConvChain, randomize

    torch.manual_seed(0)
    model = randomize(ConvChain())
    x = torch.randn(2, 3, 16, 16)
    sp = sn.Sparsifier(model, sparsity=0.5, method="l1_filter", pattern="channel", include=["c1", "c2", "fc1"])
    couple_batchnorm(sp, x)
    assert couple_bias(sp) == {"c1": 8, "fc1": 32}
    with torch.no_grad():
        ref = model(x)
    shrunk = sn.shrink(model, x)
    assert (shrunk.c1.out_channels, shrunk.c2.out_channels, shrunk.fc1.out_features) == (8, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), ref, rtol=1e-4, atol=1e-5)
    sp.finalize()  # plain weights with exact zeros: the same channels go
    assert sn.shrink(model, x).shrink_kept == shrunk.shrink_kept


@pytest.mark.parametrize("p", [1, 2])
def test_group_magnitude_reads_every_member_by_hand(p):
    """l1/l2 (alias group_l1/group_l2): producer row norms, BatchNorm |gamma|, and the consumer's columns after
    flatten (4 positions per channel, pooled into one norm), each divided by its mean, summed; filter_l1 reads
    the producer only."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.fc = nn.Linear(6 * 2 * 2, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.max_pool2d(F.relu(self.bn(self.a(x))), 2), 1))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.2, 2.0)
    x = torch.randn(3, 2, 4, 4)
    graph = build_graph(model, x)
    g = graph.group_of("a")
    row = model.a.weight.detach().flatten(1).norm(p=p, dim=1)
    gamma = model.bn.weight.detach().abs()
    col = model.fc.weight.detach().abs().pow(p).sum(0).reshape(6, 4).sum(1).pow(1 / p)
    want = row / row.mean() + gamma / gamma.mean() + col / col.mean()
    torch.testing.assert_close(group_importance(model, g, f"group_l{p}", graph), want)
    torch.testing.assert_close(group_importance(model, g, f"group_l{p}", graph, normalise=False),
                               torch.stack([row, gamma, col]).mean(0))
    torch.testing.assert_close(group_importance(model, g, f"l{p}", graph), want)
    torch.testing.assert_close(group_importance(model, g, f"filter_l{p}", graph), row / row.mean())
    small = sn.shrink(model, x, ratio=0.5, importance=f"group_l{p}")
    assert small.shrink_kept == {"a": sorted(torch.topk(want, 3).indices.tolist())}
    assert sn.shrink(model, x, ratio=0.5, importance=f"l{p}").shrink_kept == small.shrink_kept
    assert sn.shrink(model, x, ratio=0.5, importance=f"filter_l{p}").shrink_kept == {
        "a": sorted(torch.topk(row, 3).indices.tolist())}
