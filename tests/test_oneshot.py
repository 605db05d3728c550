"""One-shot pruning of pretrained transformers (issue 14): solvers against their defining
properties, the block-by-block pipeline against a direct reference, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsenn as sn
from sparsenn.create.oneshot import (HessianError, OneShotError, magnitude_prune, reconstruction_error,
                                     sparsegpt_prune, wanda_prune, wanda_scores)
from sparsenn.data.text import TextError, calibration_batches

transformers = pytest.importorskip("transformers")


def _llama(layers=2, hidden=32, inter=64, vocab=64, seed=0, heads=4):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert(layers=2, hidden=32, inter=64, vocab=64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _calibration(n=3, length=16, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, length), generator=g) for _ in range(n)]


def _correlated(tokens=400, features=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, features, generator=g) @ torch.randn(features, features, generator=g) \
        + 0.1 * torch.randn(tokens, features, generator=g)


# ----------------------------------------------------------------------------- solvers


def test_sparsegpt_single_pruned_weight_is_the_obs_least_squares_update():
    """Pruning only input 0 of every row: SparseGPT's update is OBS, the exact least-squares re-fit of
    the other weights (Hassibi & Stork 1993), because column 0 is processed first."""
    X = _correlated(features=8).double()
    W = torch.randn(5, 8, dtype=torch.float64)
    W[:, 0] = 1e-4  # the weakest input everywhere: chosen for pruning
    new, keep = sparsegpt_prune(W, X.T @ X, 1 / 8, "unstructured", per_row=True, damp=1e-10)
    assert keep[:, 0].logical_not().all() and keep[:, 1:].all()
    target = X @ W.T  # tokens x rows: what the layer computed
    fit = torch.linalg.lstsq(X[:, 1:], target).solution.T  # the best weights without input 0
    torch.testing.assert_close(new[:, 1:], fit, rtol=1e-5, atol=1e-6)
    assert (new[:, 0] == 0).all()


def test_sparsegpt_with_a_diagonal_hessian_is_wanda_without_an_update():
    """With uncorrelated inputs (diagonal H) the saliency w^2 / [H^-1]_jj^2 = w^2 H_jj is Wanda's score
    squared, and the OBS update of the other weights vanishes."""
    g = torch.Generator().manual_seed(0)
    W, norms = torch.randn(16, 64, generator=g), torch.rand(64, generator=g) + 0.1
    for pattern in ("unstructured", "2:4", "4:8"):
        new, keep = sparsegpt_prune(W, torch.diag(norms), 0.5, pattern, per_row=True, damp=1e-12)
        w_new, w_keep = wanda_prune(W, norms, 0.5, pattern)
        assert torch.equal(keep, w_keep), pattern
        torch.testing.assert_close(new, w_new)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["unstructured", "2:4", "4:8"]), st.sampled_from([4, 8, 128]), st.booleans(),
       st.integers(0, 10_000))
def test_sparsegpt_update_only_lowers_the_error_of_its_mask(pattern, block_size, per_row, seed):
    """The OBS updates compensate: SparseGPT's weights reconstruct better than its mask applied to the
    unchanged weights, and every mask has the requested sparsity and pattern."""
    X = _correlated(seed=seed)
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(seed + 1))
    H = X.T @ X
    new, keep = sparsegpt_prune(W, H, 0.5, pattern, block_size=block_size, per_row=per_row)
    assert (new[~keep] == 0).all() and (~keep).float().mean().item() == pytest.approx(0.5)
    if pattern != "unstructured":
        assert sn.parse_pattern(pattern).obeys(keep)
    elif per_row:
        assert (keep.sum(1) == 16).all()
    assert reconstruction_error(W, new, H) < reconstruction_error(W, W * keep, H)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_stacked_layers_sharing_a_hessian_equal_separate_solves(pattern):
    X = _correlated()
    H = X.T @ X
    q, k = torch.randn(12, 32), torch.randn(4, 32)
    new, keep = sparsegpt_prune(torch.cat([q, k]), H, 0.5, pattern, block_size=8, segments=[12, 4])
    for part, (w, m) in zip((q, k), (sparsegpt_prune(q, H, 0.5, pattern, block_size=8),
                                     sparsegpt_prune(k, H, 0.5, pattern, block_size=8))):
        rows = slice(0, 12) if part is q else slice(12, 16)
        assert torch.equal(keep[rows], m)
        torch.testing.assert_close(new[rows], w)
    with pytest.raises(ValueError, match="segments"):
        sparsegpt_prune(q, H, 0.5, segments=[5, 5])


def test_layers_fed_the_same_input_share_their_statistics():
    from sparsenn.create.oneshot.stats import record_inputs

    model = _llama()
    block = model.model.layers[0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    with record_inputs(layers, "norms") as rec:
        for ids in _calibration(n=2):
            rec.next_batch()
            with torch.no_grad():
                model(ids)
    assert rec.groups() == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert rec.of("self_attn.k_proj") is rec.of("self_attn.q_proj") and rec.of("self_attn.q_proj").tokens == 64


def test_reconstruction_error_from_the_hessian_equals_the_direct_one():
    X = _correlated()
    W = torch.randn(8, 32)
    new, _ = magnitude_prune(W, 0.5)
    direct = ((X @ W.T - X @ new.T).norm() / (X @ W.T).norm()).item()
    assert reconstruction_error(W, new, X.T @ X) == pytest.approx(direct, rel=1e-4)


def test_masks_per_row_and_per_layer_budgets():
    W = torch.randn(6, 40)
    _, keep = magnitude_prune(W, 0.7)  # per row: round(0.7 * 40) = 28 pruned in every row
    assert (keep.sum(1) == 12).all()
    W[0] *= 100  # a loud row: a per-layer budget prunes it less
    _, keep = magnitude_prune(W, 0.7, per_row=False)
    assert keep.sum() == 240 - 168 and keep[0].sum() > 12
    _, keep = wanda_prune(W, torch.ones(40), 0.5, "2:4")
    assert sn.parse_pattern("2:4").obeys(keep)
    with pytest.raises(sn.PatternError, match="2:4 prunes at least 0.5"):
        wanda_prune(W, torch.ones(40), 0.3, "2:4")


def test_wanda_scores_are_magnitude_times_input_norm():
    W = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    torch.testing.assert_close(wanda_scores(W, torch.tensor([4.0, 9.0])), torch.tensor([[2.0, 6.0], [6.0, 1.5]]))


def test_dead_inputs_are_pruned_and_a_hopeless_hessian_is_named():
    X = _correlated(features=16)
    X[:, 3] = 0  # never active
    W = torch.randn(4, 16)
    new, keep = sparsegpt_prune(W, X.T @ X, 0.25, per_row=True)
    assert not keep[:, 3].any() and (new[:, 3] == 0).all()
    with pytest.raises(HessianError, match=r"^l: the Hessian .* not positive definite .*method='wanda'"):
        sparsegpt_prune(W, -torch.eye(16) * 5, 0.5, name="l")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparsegpt_prune(W, torch.full((16, 16), float("nan")), 0.5)
    with pytest.raises(sn.PatternError, match="sparsegpt with 2:4 prunes exactly 0.5"):
        sparsegpt_prune(W, X.T @ X, 0.6, "2:4")


def test_dampening_is_raised_with_a_warning_when_needed():
    """An indefinite H (one eigenvalue -0.075, about -0.05 x its mean diagonal 1.49) factors with 10x the
    dampening, and says so."""
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    eig = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 1.0, 2.0, -0.075], dtype=torch.float64)
    H = q @ torch.diag(eig) @ q.T
    with pytest.warns(RuntimeWarning, match=r"not positive definite with dampening 0.01 x mean\(diag H\); used 0.1"):
        sparsegpt_prune(torch.randn(3, 8), H, 0.5)


# ----------------------------------------------------------------------------- pipeline


def _reference_wanda(model, blocks, batches, sparsity):
    """Wanda block by block through the model's own forward: block i's input norms with blocks < i
    pruned and block i dense (what the pipeline must compute without re-running earlier blocks)."""
    for block in blocks:
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        norms = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
        def record(module, args, output, n):
            norms[n].add_((args[0].reshape(-1, args[0].shape[-1]).double() ** 2).sum(0))  # returns None: output kept

        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: record(mod, a, o, n)) for n, m in linears.items()]
        with torch.no_grad():
            for b in batches:
                model(input_ids=b)
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            new, _ = wanda_prune(m.weight, norms[n], sparsity)
            m.weight.data.copy_(new)


@pytest.mark.parametrize("make,path", [(_llama, "model.layers"), (_bert, "encoder.layer")])
def test_the_pipeline_equals_wanda_through_the_model_forward(make, path):
    model, calib = make(), _calibration()
    reference = copy.deepcopy(model)
    _reference_wanda(reference, reference.get_submodule(path), calib, 0.5)
    sn.oneshot(model, "wanda", 0.5, calibration=calib)
    assert model.oneshot_report.blocks == path
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_oneshot_attaches_masks_that_obey_the_pattern(method, pattern):
    model = _llama()
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    sn.oneshot(model, method, 0.5, pattern, calibration=_calibration())
    masks = sn.get_masks(model)
    assert len(masks) == 2 * 7 and all(n.startswith("model.layers.") for n in masks)
    for name, p, mask in sn.iter_masks(model):
        assert (p[~mask] == 0).all() and abs((~mask).float().mean().item() - 0.5) < 1e-6, name
        if pattern != "unstructured":
            assert sn.parse_pattern(pattern).obeys(mask), name
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    report = model.oneshot_report
    assert len(report.layers) == 14 and all(r.sparsity == pytest.approx(0.5) for r in report.layers)
    if method != "magnitude":
        assert all(0 < r.error < 1 for r in report.layers)
    assert "self_attn.q_proj" in report.table() and report.to_dict()["method"] == method
    assert sn.report(model).total.sparsity > 0.3  # masks attached: the rest of the library applies


def test_blocks_run_in_order_and_one_at_a_time():
    """Memory bound: the model's embeddings run once per batch (to capture the first block's inputs),
    then each block runs twice per batch (statistics, then the pruned block's outputs), block i+1
    only after block i is done: no block's activations are kept beyond the next block's inputs."""
    model, calib = _llama(layers=3), _calibration(n=2)
    events = []
    model.model.embed_tokens.register_forward_hook(lambda *a: events.append("embed"))
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *a, i=i: events.append(i))
    sn.oneshot(model, "sparsegpt", 0.5, calibration=calib)
    assert events == ["embed"] * 2 + [0] * 4 + [1] * 4 + [2] * 4


def test_no_block_output_outlives_its_copy_into_the_next_blocks_inputs():
    """Memory bound, measured on live tensors: whenever a block runs, no earlier block call's output is
    still alive (each is copied into the one hidden-state tensor per batch and dropped), and those
    tensors are the same storages from the first block to the last."""
    import gc
    import weakref

    model, calib = _llama(layers=3), _calibration(n=3)
    outputs, alive, storages = [], [], []
    for block in model.model.layers:
        block.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out[0] if isinstance(out, tuple)
                                                                                  else out)))

        def before(m, args, kwargs):
            gc.collect()
            alive.append(sum(r() is not None for r in outputs))
            hidden = args[0] if args else kwargs["hidden_states"]
            storages.append(hidden.untyped_storage().data_ptr())
        block.register_forward_pre_hook(before, with_kwargs=True)
    sn.oneshot(model, "sparsegpt", 0.5, calibration=calib)
    assert len(alive) == 3 + 3 * 3 * 2 and max(alive) == 0  # 3 captures, then 3 blocks x 3 batches x 2 passes
    assert set(storages) == set(storages[:3]) and len(set(storages[:3])) == 3


def test_kwargs_equal_in_every_batch_are_held_once():
    from sparsenn.create.oneshot.blocks import capture_block_inputs

    model, calib = _llama(layers=2), _calibration(n=4)
    inputs = capture_block_inputs(model, model.model.layers[0], ({"input_ids": c, "use_cache": False} for c in calib))
    cos = [kw["position_embeddings"][0] for kw in inputs.kwargs]
    assert len(inputs) == 4 and all(c is cos[0] for c in cos)
    assert len({h.data_ptr() for h in inputs.hidden}) == 4  # hidden states differ: never shared


def test_padding_tokens_do_not_count_in_the_statistics():
    model = _bert()
    ids = torch.randint(0, 64, (1, 12))
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], 1).long()}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    sn.oneshot(a, "wanda", 0.5, calibration=[ids])
    sn.oneshot(b, "wanda", 0.5, calibration=[padded])
    for (n, m1), (_, m2) in zip(sn.get_masks(a).items(), sn.get_masks(b).items()):
        assert torch.equal(m1, m2), n


def test_sparsegpt_beats_wanda_on_the_model_output():
    model, calib = _llama(layers=2, hidden=64, inter=128), _calibration(n=6, length=32)
    test = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(test).logits
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = sn.oneshot(copy.deepcopy(model), method, 0.5, "2:4", calibration=calib)
        with torch.no_grad():
            errors[method] = ((m(test).logits - ref).norm() / ref.norm()).item()
    assert errors["sparsegpt"] < errors["wanda"], errors


def test_finalize_and_save_after_oneshot(tmp_path):
    model = sn.oneshot(_llama(), "wanda", 0.5, calibration=_calibration())
    sn.save_pretrained(model, tmp_path / "out")
    again = sn.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "out")
    assert set(sn.get_masks(again)) == set(sn.get_masks(model))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


# ----------------------------------------------------------------------------- bad input


def _unchanged(model, before):
    state = model.state_dict()
    return all(torch.equal(p, before[n]) for n, p in state.items()) and set(state) == set(before)


def test_bad_input_names_the_problem_and_changes_nothing():
    model = _llama(hidden=36, inter=72, heads=2)  # 36 inputs: 2:4 fits, 4:8 does not
    before = copy.deepcopy(model.state_dict())
    cases = [
        (dict(method="obc"), "unknown one-shot method 'obc'; valid: magnitude, wanda, sparsegpt"),
        (dict(method="wanda"), "needs calibration data"),
        (dict(method="wanda", pattern="4:8", calibration=_calibration()), r"pattern 4:8 needs an input dimension "
                                                                          r"divisible by 8; not so in model.layers"),
        (dict(method="sparsegpt", sparsity=0.7, pattern="2:4", calibration=_calibration()), "prunes exactly 0.5"),
        (dict(method="wanda", sparsity=1.5, calibration=_calibration()), r"sparsity must be a number in \[0, 1\)"),
        (dict(method="wanda", calibration=[torch.randint(0, 99, (1, 8))]), r"token ids in \[\d+, \d+\], the "
                                                                            r"model's vocabulary is \[0, 64\)"),
        (dict(method="wanda", calibration=torch.zeros(2, 8, dtype=torch.long)), "wrap it in a list"),
        (dict(method="wanda", calibration=[torch.rand(1, 8)]), "input_ids must be a non-empty integer tensor"),
        (dict(method="wanda", blocks="model.nothing", calibration=_calibration()), "has no submodule"),
    ]
    for kwargs, match in cases:
        with pytest.raises(OneShotError, match=match):
            sn.oneshot(model, **kwargs)
        assert _unchanged(model, before) and not sn.get_masks(model), kwargs


def test_nan_activations_are_named_and_say_what_was_pruned():
    model = _llama()
    model.model.embed_tokens.weight.data[5] = float("nan")
    calib = [torch.full((1, 8), 5)]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OneShotError, match=r"model.layers.0.self_attn.q_proj: .*NaN or Inf.*Nothing was changed"):
        sn.oneshot(model, "wanda", 0.5, calibration=calib)
    assert all(torch.equal(p, before[n]) or torch.isnan(p).any() for n, p in model.state_dict().items())
    # a NaN that appears only after block 0: block 0 is pruned, the error says so
    model = _llama()
    model.model.layers[1].input_layernorm.weight.data[:] = float("nan")
    with pytest.raises(OneShotError, match=r"model.layers.1.*NaN or Inf.*Blocks 0-0 of model.layers were already "
                                           r"pruned"):
        sn.oneshot(model, "wanda", 0.5, calibration=_calibration())


# ----------------------------------------------------------------------------- text and perplexity


def test_calibration_windows_are_seeded_random_slices():
    ids = torch.arange(1000)
    batches = calibration_batches(ids, samples=6, length=50, batch_size=4, seed=3)
    assert [tuple(b.shape) for b in batches] == [(4, 50), (2, 50)]
    for row in torch.cat(batches):
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 50))  # consecutive tokens of the text
    assert all(torch.equal(a, b) for a, b in zip(batches, calibration_batches(ids, samples=6, length=50,
                                                                              batch_size=4, seed=3)))
    with pytest.raises(TextError, match="the calibration text has 40 tokens, fewer than one sample of 50"):
        calibration_batches(torch.arange(40), samples=2, length=50)


def test_perplexity_matches_the_model_loss_and_a_brute_force_sliding_window():
    model = _llama(vocab=50)
    ids = torch.randint(0, 50, (90,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
    assert sn.perplexity(model, ids, window=128, stride=64) == pytest.approx(math.exp(loss), rel=1e-5)
    for window, stride in ((30, 10), (30, 30), (25, 7)):
        nll, begin, scored = {}, 0, 1
        while True:
            end = min(begin + window, 90)
            with torch.no_grad():
                logp = model(ids[begin:end][None]).logits[0].log_softmax(-1)
            for t in range(max(scored, begin + 1), end):
                nll[t] = -logp[t - 1 - begin, ids[t]].item()
            scored = end
            if end == 90:
                break
            begin += stride
        expected = math.exp(sum(nll.values()) / len(nll))
        assert sn.perplexity(model, ids, window=window, stride=stride) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="stride 40 > window 30"):
        sn.perplexity(model, ids, window=30, stride=40)
    with pytest.raises(TextError, match=r"vocabulary is \[0, 50\)"):
        sn.perplexity(model, torch.tensor([1, 2, 70]))


def test_embedding_fidelity_is_one_for_the_same_model_and_lower_when_pruned():
    model = _bert()
    batches = [{"input_ids": torch.randint(0, 64, (3, 10))}]
    assert sn.embedding_fidelity(model, model, batches) == pytest.approx(1.0, abs=1e-6)
    pruned = sn.oneshot(copy.deepcopy(model), "wanda", 0.5, calibration=[b["input_ids"] for b in batches])
    assert 0.5 < sn.embedding_fidelity(pruned, model, batches) < 1.0


# ----------------------------------------------------------------------------- allocation and refit


def test_owl_sparsities_by_hand():
    from sparsenn.create.oneshot.allocation import outlier_ratio, owl_sparsities

    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 13.0])], m=2) == 0.25  # mean 4: only 13 > 8
    # ratios 0, 0.5, 1 -> spread 0, lam, 2 lam -> minus the mean lam -> densities 1-s-lam, 1-s, 1-s+lam
    assert owl_sparsities([0.0, 0.5, 1.0], 0.7, lam=0.08) == pytest.approx([0.78, 0.70, 0.62])
    assert owl_sparsities([0.3, 0.3], 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"outside \[0, 1\).*smaller lam"):
        owl_sparsities([0.0, 1.0], 0.95, lam=0.2)


def test_refit_is_the_least_squares_optimum_for_the_mask():
    from sparsenn.create.oneshot.solvers import refit

    X = _correlated(features=16).double()
    W = torch.randn(5, 16, dtype=torch.float64)
    _, keep = magnitude_prune(W, 0.5)
    new = refit(W, keep, X.T @ X, damp=1e-12)
    for r in range(5):
        k = keep[r]
        fit = torch.linalg.lstsq(X[:, k], X @ W[r]).solution
        torch.testing.assert_close(new[r, k], fit, rtol=1e-6, atol=1e-8)
        assert (new[r, ~k] == 0).all()


def test_owl_and_refit_in_the_pipeline():
    model, calib = _llama(layers=3), _calibration()
    owl = sn.oneshot(copy.deepcopy(model), "wanda", 0.6, calibration=calib, distribution="owl", owl_lambda=0.05)
    per_block = [sum(r.sparsity for r in owl.oneshot_report.layers if r.block == b) / 7 for b in range(3)]
    assert sum(per_block) / 3 == pytest.approx(0.6, abs=0.01) and max(per_block) - min(per_block) > 0.05  # rows round
    plain = sn.oneshot(copy.deepcopy(model), "wanda", 0.5, "2:4", calibration=calib)
    fitted = sn.oneshot(copy.deepcopy(model), "wanda", 0.5, "2:4", calibration=calib, refit=True)
    first = [n for n in sn.get_masks(plain) if n.startswith("model.layers.0.")]  # later blocks see other inputs
    assert all(torch.equal(sn.get_masks(plain)[n], sn.get_masks(fitted)[n]) for n in first)
    errors = {r.name: r.error for r in plain.oneshot_report.layers if r.block == 0}
    assert all(r.error < errors[r.name] for r in fitted.oneshot_report.layers if r.block == 0)
    erk = sn.oneshot(copy.deepcopy(model), "magnitude", 0.5, distribution="erk")
    assert len({round(r.sparsity, 3) for r in erk.oneshot_report.layers}) > 1
    with pytest.raises(OneShotError, match="pattern 2:4 fixes every layer at 0.5: use distribution='uniform'"):
        sn.oneshot(model, "wanda", 0.5, "2:4", calibration=calib, distribution="owl")
    with pytest.raises(OneShotError, match="unknown distribution 'global'; valid: uniform, owl, erk, er"):
        sn.oneshot(model, "wanda", 0.5, calibration=calib, distribution="global")
    assert not sn.get_masks(model)


def test_wanda_is_a_registered_method_for_the_sparsifier():
    """method='wanda' ranks |W| * ||X|| under any pattern and distribution of the Sparsifier."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))
    data = [(torch.randn(4, 3, 6, 6) * torch.tensor([1.0, 5.0, 0.1]).reshape(1, 3, 1, 1), torch.zeros(4).long())]
    assert "wanda" in sn.list_methods()
    sp = sn.Sparsifier(model, 0.5, method="wanda", data=data, distribution="global", pattern="unstructured")
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    scores = sp.method.score(sn.ScoreContext(model, weights, {}, data=data))
    x = data[0][0]
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    expected = model[0].weight.detach().abs().reshape(8, 27) * cols.norm(dim=0)
    torch.testing.assert_close(scores["0.weight"], expected.reshape(8, 3, 3, 3), rtol=1e-4, atol=1e-6)
    assert abs(sn.sparsity(model) - 0.5) < 0.01
    sn.Sparsifier(torch.nn.Linear(8, 8), 0.5, method="wanda", data=[(torch.randn(2, 8), None)], pattern="2:4")


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 12))


def _conv_data(batches=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, 6, 6, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0]).reshape(1, 4, 1, 1),
             torch.zeros(16).long()) for _ in range(batches)]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_is_a_registered_method_equal_to_the_solver(pattern):
    """method='sparsegpt' in the Sparsifier: every layer's (weights, mask) is sparsegpt_prune on its matrix
    view with H = X^T X of its inputs (unfolded patches for the convolution) over the drawn batches."""
    model, data = _conv_net(), _conv_data()
    dense = copy.deepcopy(model)
    sp = sn.Sparsifier(model, 0.5, method="sparsegpt", data=data, score_batches=2, pattern=pattern)
    assert "sparsegpt" in sn.list_methods() and sp.method.config() == {"block_size": 128, "damp": 0.01}
    x = torch.cat([d[0] for d in data])
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 36).double()
    hidden = torch.relu(dense[0](x)).flatten(1).double()
    for name, layer, H in (("0.weight", dense[0], cols.T @ cols), ("3.weight", dense[3], hidden.T @ hidden)):
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        ref_w, ref_keep = sparsegpt_prune(w, H, 0.5, pattern)
        got = dict(model.named_parameters())[name].detach().reshape(w.shape)
        torch.testing.assert_close(got, ref_w, rtol=1e-4, atol=1e-5)
        assert torch.equal(sp.masks[name].reshape(w.shape), ref_keep), name
        if pattern == "2:4":
            assert (sp.masks[name].reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    out, ref = model(x), dense(x)
    magnitude = copy.deepcopy(dense)
    sn.Sparsifier(magnitude, 0.5, method="magnitude", pattern=pattern)
    assert (out - ref).norm() < (magnitude(x) - ref).norm()  # the update pays on the model's output
    sp.finalize()
    assert sn.sparsity(model) == pytest.approx(0.5, abs=0.01)


def test_sparsegpt_in_the_sparsifier_refuses_what_it_cannot_do_and_changes_nothing():
    model, data = _conv_net(), _conv_data(1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot produce pattern .channel.; it supports: unstructured, per_row, N:M"):
        sn.Sparsifier(model, 0.5, method="sparsegpt", data=data, pattern="channel", exclude=["3"])
    with pytest.raises(ValueError, match="data"):
        sn.Sparsifier(model, 0.5, method="sparsegpt")
    with pytest.raises(ValueError, match="block_size"):
        sn.Sparsifier(model, 0.5, method="sparsegpt", data=data, block_size=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    sp = sn.Sparsifier(model, 0.5, method="sparsegpt", data=data)
    with pytest.raises(ValueError, match="prunes once, from unmasked weights"):
        sp.update(0.7)
    assert sn.sparsity(model) == pytest.approx(0.5, abs=0.01)


def test_permuted_inputs_keep_the_function_and_more_importance():
    """RIA-style permutation: the block computes the same function, and the N:M mask keeps at least the
    importance it kept without (Zhang et al. 2024)."""
    from sparsenn.create.oneshot.permute import kept_importance, nm_permutation

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 64, generator=g) * torch.rand(64, generator=g) ** 4
    perm = nm_permutation(scores, 2, 4)
    assert sorted(perm.tolist()) == list(range(64))
    assert kept_importance(scores[:, perm], 2, 4) > kept_importance(scores, 2, 4)

    model, calib = _llama(layers=2), _calibration()
    ids = torch.randint(0, 64, (2, 16), generator=g)
    plain = sn.oneshot(copy.deepcopy(model), "wanda", 0.5, "2:4", calibration=calib)
    permuted = sn.oneshot(copy.deepcopy(model), "wanda", 0.5, "2:4", calibration=calib, permute=True)
    down = "model.layers.0.mlp.down_proj"
    assert not torch.equal(sn.get_masks(plain)[down + ".weight"], sn.get_masks(permuted)[down + ".weight"])
    assert sn.parse_pattern("2:4").obeys(sn.get_masks(permuted)[down + ".weight"])
    errors = {m: {r.name: r.error for r in x.oneshot_report.layers} for m, x in (("p", plain), ("q", permuted))}
    assert errors["q"][down] < errors["p"][down]
    # the permutation alone leaves the function unchanged: undo the pruning by checking a dense copy
    from sparsenn.create.oneshot.pipeline import _permute_inputs
    from sparsenn.create.oneshot.stats import record_inputs

    dense = copy.deepcopy(model)
    block = dense.model.layers[0]
    layers = {f"model.layers.0.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        before = dense(ids).logits
        with record_inputs(layers, "norms") as rec:
            rec.next_batch()
            dense(calib[0])
        assert _permute_inputs(block, layers, rec, sn.parse_pattern("2:4")) == [down]
        torch.testing.assert_close(dense(ids).logits, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(OneShotError, match="pattern 'unstructured' is not N:M"):
        sn.oneshot(model, "wanda", 0.5, calibration=calib, permute=True)


@pytest.mark.parametrize("per_row", [False, True])
def test_sparsegpt_block_budgets_add_up_to_the_layer_budget(per_row):
    """Each column block prunes its share, so the layer (or each row) ends at round(s * size) exactly."""
    W, H = torch.randn(7, 100), torch.eye(100) * 3
    for s in (0.33, 0.5, 0.71):
        _, keep = sparsegpt_prune(W, H, s, block_size=16, per_row=per_row)
        assert int((~keep).sum()) == round(s * 700)
        if per_row:
            assert ((~keep).sum(1) == round(s * 100)).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_row_pattern_is_per_row_budgets(method):
    """pattern='per_row' (every output row keeps the same count) equals per_row=True; the masks obey it."""
    calib = _calibration()
    a, b = _llama(), _llama()
    sn.oneshot(a, method, 0.5, "per_row", calib)
    sn.oneshot(b, method, 0.5, "unstructured", calib, per_row=True)
    for (n, m1), (_, m2) in zip(sn.get_masks(a).items(), sn.get_masks(b).items()):
        assert torch.equal(m1, m2) and sn.parse_pattern("per_row").obeys(m1), n
        assert set(m1.sum(1).tolist()) == {m1.shape[1] // 2}
