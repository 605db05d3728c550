"""Deep Compression (Han, Mao & Dally 2016): k-means weight sharing, trained codebooks, deep_compress, the codec."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.compress.deep_compression import decode_layer, deep_compress, encode_layer
from sparsenn.compress.weight_sharing import (
    codebooks,
    finalize_sharing,
    fine_tune_shared,
    kmeans_1d,
    linear_init,
    share_weights,
    shared_layers,
    weight_sharing,
)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))
    return torch.equal(a, b)


def masked_mlp(seed: int = 0, sparsity: float = 0.8) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    sn.Sparsifier(model, sparsity=sparsity, distribution="global")
    return model


def batches(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


# ------------------------------------------------------------------ k-means


def test_kmeans_hand_cases():
    assert linear_init(torch.tensor([3.0, 0.0, 12.0]), 3).tolist() == [0.0, 6.0, 12.0]
    centroids, labels = kmeans_1d(torch.tensor([0.0, 1, 2, 10, 11, 12]), 2)  # init 0, 12; split at 6
    assert centroids.tolist() == [1.0, 11.0] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    # init 0, 9 -> {0, 2, 3} {9} -> 5/3, 9 -> the split moves to 5.33, nothing changes
    centroids, labels = kmeans_1d(torch.tensor([0.0, 2, 3, 9]), 2)
    assert centroids.tolist() == pytest.approx([5 / 3, 9.0]) and labels.tolist() == [0, 0, 0, 1]
    # a point half-way between two centroids goes to the lower one; an empty cluster keeps its place
    centroids, labels = kmeans_1d(torch.tensor([0.0, 1.0, 4.0]), 3)  # init 0, 2, 4
    assert labels.tolist() == [0, 0, 2] and centroids.tolist() == [0.5, 2.0, 4.0]


def test_kmeans_matches_sklearn_with_the_same_init():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-0.1, 0.03, 300), rng.normal(0.08, 0.02, 200)])
    init = np.linspace(values.min(), values.max(), 8)
    ours, labels = kmeans_1d(torch.from_numpy(values), 8)
    ref = KMeans(n_clusters=8, init=init.reshape(-1, 1), n_init=1, algorithm="lloyd", tol=0.0,
                 max_iter=300).fit(values.reshape(-1, 1))
    np.testing.assert_allclose(ours.numpy(), ref.cluster_centers_.ravel(), rtol=0, atol=1e-12)
    assert labels.tolist() == ref.labels_.tolist()


# ------------------------------------------------------------------ trained weight sharing


def test_codebook_gradient_is_the_gradient_summed_per_cluster():
    model = masked_mlp()
    reference = copy.deepcopy(model)
    share_weights(model, bits=2, index_bits=8)
    layer, (_, _, p) = model[0], next(shared_layers(model))
    ref_layer = reference[0]
    with torch.no_grad():
        ref_layer.weight.copy_(layer.weight)  # the dense layer holding the shared weights
    x, r = torch.randn(5, 20), torch.randn(5, 16)
    (layer(x) * r).sum().backward()
    (ref_layer(x) * r).sum().backward()
    grad = ref_layer.weight.grad
    expected = torch.stack([grad[p.kept & (p.cluster == c)].sum() for c in range(4)])
    torch.testing.assert_close(layer.parametrizations.weight.original0.grad, expected)


def test_masks_and_clusters_survive_fine_tuning():
    model = masked_mlp()
    mask = model[0].weight_mask.clone()
    plans = share_weights(model, bits=3, index_bits=8)
    assert [n for n, _ in model.named_parameters()] == ["0.bias", "0.parametrizations.weight.original0", "2.bias",
                                                        "2.parametrizations.weight.original0"]
    before = model[0].weight.detach().clone()
    fine_tune_shared(model, batches(), epochs=2, lr=0.5)  # a large step: everything moves
    assert not torch.equal(model[0].weight.detach(), before)
    finalize_sharing(model)
    assert isinstance(model[0].weight, nn.Parameter) and not list(shared_layers(model))
    w = model[0].weight.detach()
    assert torch.equal(model[0].weight_mask, mask)
    assert (w[~mask].view(torch.int32) == 0).all()  # exact +0.0 where pruned
    assert torch.unique(w[mask]).numel() <= plans["0.weight"].clusters <= 8
    assert sorted(model.state_dict()) == ["0.bias", "0.weight", "0.weight_mask", "2.bias", "2.weight",
                                          "2.weight_mask"]


def test_layer_without_mask_keeps_its_zeros_and_context_manager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 10))
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.1] = 0.0
    zeros = model[0].weight == 0
    with weight_sharing(model, bits=4) as plans:
        assert set(codebooks(model)) == {"0.weight"}
        assert plans["0.weight"].kept == int((~zeros).sum())
    w = model[0].weight.detach()
    assert (w[zeros] == 0).all() and torch.unique(w[~zeros]).numel() <= 16


def test_fillers_take_one_code():
    layer = nn.Linear(100, 1)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, [0, 1, 2, 99]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    plans = share_weights(layer, bits=2, index_bits=2)  # the gap of 96 needs fillers
    plan = plans["weight"]
    assert plan.clusters == 3 and plan.fillers == 96 // 4 and plan.entries == 4 + 24


def test_bad_arguments_name_the_value_and_the_choices():
    model = masked_mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"bits must be an int in \[1, 12\], got 13"):
        share_weights(model, bits=13)
    with pytest.raises(ValueError, match="'9'.*valid: 'conv', 'fc', '0', '2'"):
        share_weights(model, bits={"9": 4})
    with pytest.raises(ValueError, match="layers names 'fc'.*valid: '0', '2'"):
        share_weights(model, layers=["fc"])
    with pytest.raises(ValueError, match="float32"):
        share_weights(copy.deepcopy(model).double())
    assert all(bits_equal(v, state[k]) for k, v in model.state_dict().items())  # nothing changed
    share_weights(model, layers=["0"])
    with pytest.raises(ValueError, match="already parametrized"):
        share_weights(model)
    with pytest.raises(TypeError, match="fine_tune"):
        deep_compress(masked_mlp(), fine_tune=3)


# ------------------------------------------------------------------ deep_compress


def test_deep_compress_leaves_the_input_and_decompresses_exactly():
    model = masked_mlp()
    state = copy.deepcopy(model.state_dict())
    calls = []
    result = deep_compress(model, bits=4, index_bits=3, fine_tune=lambda m: calls.append(
        fine_tune_shared(m, batches(), lr=0.05)))
    assert len(calls) == 1
    assert all(bits_equal(v, state[k]) for k, v in model.state_dict().items())  # input unchanged
    shared = result.model.state_dict()
    assert sorted(shared) == sorted(state)
    assert torch.equal(shared["0.weight_mask"], state["0.weight_mask"])
    restored = result.decompress()
    assert all(bits_equal(v, shared[k]) for k, v in restored.state_dict().items())
    fresh = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))  # no masks: they are attached
    result.decompress(into=fresh)
    assert sorted(fresh.state_dict()) == sorted(shared)
    assert all(bits_equal(v, shared[k]) for k, v in fresh.state_dict().items())
    assert max(result.bytes("huffman"), result.bytes("shared")) < result.bytes("dense")  # tiny: tables dominate
    assert result.ratio() == result.bytes("dense") / result.bytes("huffman")


def test_fine_tune_with_the_library_loop_by_arguments():
    result = deep_compress(masked_mlp(), fine_tune={"loader": batches(), "epochs": 1, "lr": 0.01})
    assert len(result.layers) == 2
    with pytest.raises(ValueError, match="loader"):
        deep_compress(masked_mlp(), fine_tune={"epochs": 1})


def test_byte_counts_by_hand():
    layer = nn.Linear(8, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0, 0, 0, 0, 0, 0, -0.5], [0, 0, 0, 0.5, 0, 0, 0, 0]]))
    result = deep_compress(nn.Sequential(layer), bits=2, index_bits=2)
    # kept at 0, 7, 11: gaps 0, (filler 3), 2, 3 -> 4 entries; codebook {0.5, -0.5} + the fillers' zero
    arrays, meta = result.encodings["0.weight"]
    assert (meta["entries"], meta["kept"], meta["zero_slot"]) == (4, 3, True)
    assert arrays["codebook"].tolist() == [0.5, -0.5]
    # cluster symbols 1 0 2 1 (freq 1, 2, 1: lengths 2, 1, 2); gaps 0 3 2 3 (lengths 2, -, 2, 1): 6 bits each
    assert arrays["weight_code_lengths"].tolist() == [2, 1, 2]
    assert arrays["index_code_lengths"].tolist() == [2, 0, 2, 1]
    assert arrays["weight_stream"].size == arrays["index_stream"].size == 1
    bias = 2 * 4
    assert result.bytes("dense") == 16 * 4 + bias
    assert result.bytes("pruned") == 4 * (2 * 3 + 2 + 1) + bias  # values + column indices + row pointers
    assert result.bytes("shared") == 1 + 1 + 8 + bias  # 4 x 2 bits, 4 x 2 bits, two float32 centroids
    assert result.bytes("huffman") == 1 + 1 + 3 + 4 + 8 + bias
    assert [r["stage"] for r in result.report()] == ["dense", "pruned", "shared", "huffman"]
    assert "Huffman-coded" in result.markdown()
    assert result.as_dict()["layers"][0]["cluster_bits"] == 2.0


# ------------------------------------------------------------------ the codec


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 400), st.integers(1, 6), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_encode_decode_round_trip(numel, index_bits, density, seed):
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([0.25, -1.5, -0.0, float("nan"), 3.0])
    w = palette[torch.randint(0, 5, (numel,), generator=g)]
    w[torch.rand(numel, generator=g) > density] = 0.0
    arrays, meta = encode_layer(w, index_bits=index_bits)
    assert set(meta) <= {"codec", "version", "dtype", "numel", "bits", "index_bits", "entries", "kept", "zero_slot"}
    assert all(isinstance(v, (int, str, bool)) for v in meta.values())
    assert bits_equal(decode_layer(arrays, meta), w)


def test_encode_layer_refuses_what_it_cannot_give_back():
    w = torch.arange(1, 40, dtype=torch.float32)
    with pytest.raises(ValueError, match="39 distinct kept values.*bits=5 allows 32: share its weights first"):
        encode_layer(w, bits=5)
    with pytest.raises(ValueError, match="float32"):
        encode_layer(w.double())
    with pytest.raises(ValueError, match="masked position 0"):
        encode_layer(w, mask=torch.zeros(39, dtype=torch.bool))
    mask = torch.rand(3, 4) > 0.5
    w = torch.where(mask, torch.tensor(0.0), torch.tensor(0.0)) + mask.float()
    arrays, meta = encode_layer(w, mask=mask)
    out, kept = decode_layer(arrays, meta, shape=(3, 4), return_kept=True)
    assert bits_equal(out, w) and torch.equal(kept, mask)


def encoded():
    w = torch.zeros(10, 10)
    w[0, 0], w[3, 3], w[9, 9] = 1.0, -2.0, 1.0
    return encode_layer(w, index_bits=3)  # gaps 0, 32, 65 need fillers


def tampered(change):
    arrays, meta = encoded()
    arrays, meta = {k: v.copy() for k, v in arrays.items()}, dict(meta)
    change(arrays, meta)
    return arrays, meta


def _set(mapping, key, value):
    mapping[key] = value


@pytest.mark.parametrize("change, words", [
    (lambda a, m: m.pop("kept"), "missing keys"),
    (lambda a, m: _set(m, "codec", "zip"), "codec 'zip'"),
    (lambda a, m: _set(m, "dtype", "float16"), "dtype 'float16'"),
    (lambda a, m: _set(m, "numel", 10**12), "numel"),
    (lambda a, m: _set(m, "numel", True), "numel"),
    (lambda a, m: _set(m, "entries", 101), "entries"),
    (lambda a, m: _set(m, "kept", m["entries"] + 1), "kept"),
    (lambda a, m: _set(m, "bits", 1), "do not fit bits=1"),
    (lambda a, m: _set(m, "zero_slot", 1), "zero_slot"),
    (lambda a, m: _set(a, "codebook", a["codebook"].astype(np.float64)), "codebook"),
    (lambda a, m: _set(a, "extra", np.zeros(1, np.uint8)), "exactly"),
    (lambda a, m: _set(a, "weight_code_lengths", np.append(a["weight_code_lengths"], np.uint8(0))), "cluster table"),
    (lambda a, m: _set(a, "index_code_lengths", np.zeros(9, np.uint8)), "index table"),
    (lambda a, m: _set(a, "index_stream", a["index_stream"][:1]), "truncated|cannot fit"),
    (lambda a, m: _set(a, "weight_code_lengths", np.full(a["weight_code_lengths"].size, 1, np.uint8)),
     "over-subscribed"),
    (lambda a, m: _set(m, "numel", 98), "outside"),
    (lambda a, m: _set(m, "kept", 2), "3 kept entries decoded"),
])
def test_decode_layer_rejects_hostile_input(change, words):
    with pytest.raises(ArchiveError, match=words):
        decode_layer(*tampered(change))


def test_decode_layer_checks_fillers_and_shape():
    arrays, meta = encoded()
    assert decode_layer(arrays, meta, shape=(10, 10))[9, 9] == 1.0
    with pytest.raises(ArchiveError, match="shape"):
        decode_layer(arrays, meta, shape=(10, 11))
    with pytest.raises(ArchiveError, match="numel"):
        decode_layer(arrays, meta, max_elements=50)
    # a layer whose every entry is a filler, or a filler with a short gap, is refused
    w = torch.zeros(20)
    w[19] = 1.0
    arrays, meta = encode_layer(w, index_bits=2)  # 4 fillers, then the weight
    symbols_flipped = dict(arrays, weight_stream=np.zeros_like(arrays["weight_stream"]))
    with pytest.raises(ArchiveError, match="filler"):
        decode_layer(symbols_flipped, meta)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_decode_layer_fuzz_raises_only_archive_errors(data):
    arrays, meta = encoded()
    key = data.draw(st.sampled_from(["weight_stream", "index_stream", "weight_code_lengths", "index_code_lengths"]))
    a = arrays[key].copy()
    i = data.draw(st.integers(0, a.size - 1))
    a[i] = data.draw(st.integers(0, 255))
    try:
        out = decode_layer(dict(arrays, **{key: a}), meta)
    except ArchiveError:
        return
    assert out.shape == (100,)


def test_convolutions_get_the_paper_widths_and_decompress_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    sn.Sparsifier(model, sparsity=0.7, distribution="global")
    result = deep_compress(model)
    assert {n: (p.bits, p.index_bits) for n, p in result.plans.items()} == {"0.weight": (8, 8), "2.weight": (5, 5)}
    restored = result.decompress()
    shared = result.model.state_dict()
    assert all(bits_equal(v, shared[k]) for k, v in restored.state_dict().items())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(restored(x), result.model(x))
