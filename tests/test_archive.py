"""The sparse archive (sparsenn.compress.archive): exact round trips, masks, codecs, sizes, clear errors."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsenn as sn
from sparsenn.backend.runtime.errors import ArchiveError
from sparsenn.compress import archive, codecs


def _same(a: dict, b: dict) -> bool:
    """Bit for bit: same keys, dtypes, shapes and bytes."""
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        x, y = x.detach().contiguous(), b[k].detach().contiguous()
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.element_size()]
        if x.numel() and not np.array_equal(codecs.to_storage(x).view(bits), codecs.to_storage(y).view(bits)):
            return False
    return True


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 10))


def _cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model.train()
    model(torch.randn(4, 1, 12, 12))  # running statistics and num_batches_tracked move
    return model


@pytest.mark.parametrize("layout", ["a.sparsenn", "folder/"])
def test_mlp_round_trip_is_exact_into_a_model_and_rebuilt(tmp_path, layout):
    model = _mlp()
    sn.Sparsifier(model, sparsity=0.8)
    path = archive.save(f"{tmp_path}/{layout}", model)
    assert path.is_dir() == layout.endswith("/")
    into = _mlp(seed=1)
    assert archive.load(path, into) is into
    rebuilt = archive.load(path)
    for m in (into, rebuilt):
        assert _same(model.state_dict(), m.state_dict())
        assert sn.masks.get_masks(m).keys() == sn.masks.get_masks(model).keys()
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    assert rebuilt[2].p == 0.1


def test_cnn_with_batchnorm_round_trip(tmp_path):
    model = _cnn()
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.2] = 0
    path = archive.save(tmp_path / "cnn.sparsenn", model)
    rebuilt = archive.load(path)
    assert _same(model.state_dict(), rebuilt.state_dict())
    assert rebuilt[4].stride == (2, 2) and rebuilt[0].bias is None and rebuilt[2].inplace
    x = torch.randn(2, 1, 12, 12)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def test_registry_model_is_rebuilt_by_name(tmp_path):
    model = sn.models.make_model("smallvgg", widths=(4, 8), num_classes=3)
    path = archive.save(tmp_path / "vgg.sparsenn", model)
    assert archive.read(path).manifest["model"]["registry"] == {
        "name": "smallvgg", "kwargs": {"num_classes": 3, "widths": [4, 8]}}
    rebuilt = archive.load(path)
    assert type(rebuilt) is type(model) and _same(model.state_dict(), rebuilt.state_dict())


def test_masks_come_back_and_the_sparsifier_keeps_working(tmp_path):
    model = _mlp()
    sn.Sparsifier(model, sparsity=0.9)
    mask = model[0].weight_mask
    mask[0, :3] = True  # kept positions holding exact zeros: the mask is not the weight's zero pattern
    with torch.no_grad():
        model[0].weight[0, :3] = 0
    path = archive.save(tmp_path / "m.sparsenn", model)
    manifest = archive.read(path).manifest
    assert manifest["masks"] == {"3.weight_mask": "3.weight"}  # derived: no bytes
    assert manifest["tensors"]["0.weight_mask"]["codec"] == "bits"
    loaded = archive.load(path, _mlp(seed=3))
    assert torch.equal(loaded[0].weight_mask, mask) and torch.equal(loaded[3].weight_mask, model[3].weight_mask)
    sp = sn.Sparsifier(loaded, sparsity=0.9)
    opt = sp.wrap(torch.optim.SGD(loaded.parameters(), lr=0.1))
    for _ in range(3):
        opt.zero_grad()
        loaded(torch.randn(8, 32)).square().mean().backward()
        opt.step()
        sp.step()
    for _, p, m in sn.masks.iter_masks(loaded):
        assert (p[~m] == 0).all()


def _nm_weight(n, m, rows=16, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    groups = w.reshape(-1, m)
    keep = groups.abs().argsort(dim=1, descending=True)[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return torch.where(mask, groups, 0.0).reshape(rows, cols)


def test_nm_codec_is_exact_and_auto_picks_it_when_smaller(tmp_path):
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(_nm_weight(1, 4))
        model[1].weight.copy_(_nm_weight(2, 4, cols=16))
    path = archive.save(tmp_path / "nm.sparsenn", model, codec={"1.weight": ("nm", {"n": 2, "m": 4})})
    tensors = archive.read(path).manifest["tensors"]
    assert (tensors["0.weight"]["codec"], tensors["0.weight"]["meta"]) == ("nm", {"n": 1, "m": 4})
    assert (tensors["1.weight"]["codec"], tensors["1.weight"]["meta"]) == ("nm", {"n": 2, "m": 4})
    assert _same(model.state_dict(), archive.load(path).state_dict())


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(codecs.NM_PATTERNS), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**16),
       st.booleans())
def test_nm_codec_property(pattern, rows, groups, seed, sparser):
    n, m = pattern
    w = _nm_weight(n, m, rows, groups * m, seed)
    if sparser:
        w[:, ::2] = 0  # fewer than n in some groups: padding slots
    w[w == 0] = torch.tensor(-0.0)  # signed zeros are entries too: -0.0 is stored as a value
    problem = codecs.get_codec("nm").fits(w)
    if problem is not None:  # -0.0 counts as nonzero: the pattern may no longer hold
        with pytest.raises(ValueError):
            codecs.nm_encode(w, n, m)
        return
    arrays, meta = codecs.nm_encode(w)
    out = codecs.nm_decode(arrays, meta, tuple(w.shape), "float32")
    assert torch.equal(out.view(torch.int32), w.view(torch.int32))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=3), st.sampled_from(sorted(codecs.DTYPES)),
       st.floats(0, 1), st.integers(0, 2**16))
def test_exact_codecs_round_trip_bit_for_bit(shape, dtype, density, seed):
    torch.manual_seed(seed)
    t_dtype = codecs.DTYPES[dtype][0]
    raw = torch.randint(-(2**7), 2**7, shape, dtype=torch.int64)
    if t_dtype == torch.bool:
        t = raw > 0
    else:
        keep = torch.rand(shape) < density
        t = torch.where(keep, torch.randn(shape) * 4 if t_dtype.is_floating_point else raw, 0)
        t = (t.abs() if not t_dtype.is_signed else t).to(t_dtype)
    for name in ("dense", "bitmask", "bits", codecs.choose(t)[0]):
        codec = codecs.get_codec(name)
        if codec.fits(t) is not None:
            continue
        arrays, meta = codec.encode(t)
        out = codec.decode(arrays, meta, tuple(shape), dtype)
        assert out.dtype == t_dtype and _same({"t": t}, {"t": out}), name


def test_signed_zeros_and_nan_payloads_survive(tmp_path):
    model = nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0] = -0.0
        model.weight[1, 1] = float("nan")
        model.bias[0] = -0.0
    loaded = archive.load(archive.save(tmp_path / "z.sparsenn", model))
    assert _same(model.state_dict(), loaded.state_dict())
    assert archive.read(tmp_path / "z.sparsenn").manifest["tensors"]["weight"]["codec"] == "bitmask"


def test_int8_is_opt_in_and_within_its_bound(tmp_path):
    model = _mlp()
    sn.Sparsifier(model, sparsity=0.7)
    exact = archive.read(archive.save(tmp_path / "e.sparsenn", model)).manifest["tensors"]
    assert {e["codec"] for e in exact.values()} <= {"dense", "bitmask", "nm", "bits"}
    path = archive.save(tmp_path / "q.sparsenn", model, codec="bitmask_int8")
    tensors = archive.read(path).manifest["tensors"]
    assert tensors["0.weight"]["codec"] == "bitmask_int8" and tensors["0.bias"]["codec"] == "dense"
    loaded = archive.load(path, _mlp(seed=5))
    for name in ("0.weight", "3.weight"):
        w, q = model.state_dict()[name], loaded.state_dict()[name]
        bound = w.abs().amax(dim=1, keepdim=True) / 254  # half an int8 step of max|w_row| / 127
        assert ((w - q).abs() <= bound * (1 + 1e-6)).all()
        assert torch.equal(q == 0, w == 0) or ((q == 0) >= (w == 0)).all()  # zeros stay zeros
    assert torch.equal(loaded.state_dict()["0.bias"], model.state_dict()["0.bias"])
    assert torch.equal(loaded[0].weight_mask, model[0].weight_mask)  # the mask is the original's, not q's


def test_archive_is_much_smaller_than_dense_at_90_percent(tmp_path):
    model = sn.models.make_model("lenet300100")
    sn.Sparsifier(model, sparsity=0.9, distribution="uniform")
    dense = sum(p.numel() * 4 for p in model.parameters())
    path = archive.save(tmp_path / "lenet.sparsenn", model)
    size = path.stat().st_size
    # 10% of the values (4 bytes) + 1 bit per weight = 0.131 of fp32; the biases and the header on top
    assert size < 0.15 * dense, (size, dense)
    assert _same(model.state_dict(), archive.load(path).state_dict())


def test_tied_tensors_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    path = archive.save(tmp_path / "t.sparsenn", model)
    manifest = archive.read(path).manifest
    assert manifest["aliases"] == {"head.weight": "emb.weight"}
    into = Tied()
    archive.load(path, into)
    assert into.head.weight is into.emb.weight and torch.equal(into.emb.weight, model.emb.weight)
    with pytest.raises(ArchiveError, match="pass model="):
        archive.load(path)  # a custom class: never imported by name


def test_every_dtype_and_odd_shapes(tmp_path):
    class Holder(nn.Module):
        def __init__(self, fill):
            super().__init__()
            for i, (name, (dtype, _)) in enumerate(codecs.DTYPES.items()):
                g = torch.Generator().manual_seed(i + fill)
                v = torch.randint(0, 3, (3, 5), generator=g)
                self.register_buffer(f"b_{name}", (v > 1) if dtype == torch.bool else v.to(dtype))
            self.register_buffer("scalar", torch.tensor(2.5 + fill))
            self.register_buffer("empty", torch.zeros(0, 4))

    model = Holder(0)
    path = archive.save(tmp_path / "d.sparsenn", model)
    into = Holder(1)
    archive.load(path, into)
    assert _same(model.state_dict(), into.state_dict())


@pytest.mark.skipif(not codecs._register_deep(), reason="sparsenn.compress.deep_compression has no "
                    "encode_layer/decode_layer yet")
def test_deep_compression_codec(tmp_path):
    model = _mlp()
    sn.Sparsifier(model, sparsity=0.8)
    path = archive.save(tmp_path / "deep.sparsenn", model, codec={"0.weight": "deep"})
    assert archive.read(path).manifest["tensors"]["0.weight"]["codec"] == "deep"
    loaded = archive.load(path, _mlp(seed=1))
    w, q = model[0].weight, loaded[0].weight
    assert torch.equal(q == 0, w == 0)  # pruned weights stay pruned
    assert (q - w).abs().max() <= w.abs().max()  # shared values lie within the weights' range


def test_save_refuses_bad_arguments_clearly(tmp_path):
    model = _mlp()
    with pytest.raises(ValueError, match="unknown codec 'zip'.*bitmask"):
        archive.save(tmp_path / "x", model, codec="zip")
    with pytest.raises(ValueError, match="'nope'.*not a tensor"):
        archive.save(tmp_path / "x", model, codec={"nope": "dense"})
    with pytest.raises(ValueError, match="cannot store '0.weight'.*not 2:4"):
        archive.save(tmp_path / "x", model, codec={"0.weight": ("nm", {"n": 2, "m": 4})})
    with pytest.raises(ValueError, match="min_sparsity"):
        archive.save(tmp_path / "x", model, min_sparsity=2)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        archive.save(tmp_path / "x", {"w": torch.ones(2)})
    assert not (tmp_path / "x").exists()


def test_mismatch_leaves_the_model_untouched(tmp_path):
    path = archive.save(tmp_path / "m.sparsenn", _mlp())
    other = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 11))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ArchiveError, match="3.weight"):
        archive.load(path, other)
    assert _same(before, other.state_dict())
    wrong_dtype = _mlp().double()
    with pytest.raises(ArchiveError, match="dtype"):
        archive.load(path, wrong_dtype)
    fewer = nn.Sequential(nn.Linear(32, 48))
    with pytest.raises(ArchiveError, match="strict=False"):
        archive.load(path, fewer)
    archive.load(path, fewer, strict=False)
    assert torch.equal(fewer[0].weight, _mlp()[0].weight)


def test_min_sparsity_keeps_mildly_sparse_tensors_dense(tmp_path):
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight[:, :40] = 0  # 62.5% zeros
    auto = archive.read(archive.save(tmp_path / "a.sparsenn", model)).manifest["tensors"]["weight"]["codec"]
    kept = archive.read(archive.save(tmp_path / "b.sparsenn", model, min_sparsity=0.7)
                        ).manifest["tensors"]["weight"]["codec"]
    assert (auto, kept) == ("bitmask", "dense")


def test_bytes_and_digest_in_the_manifest(tmp_path):
    model = _mlp()
    path = archive.save(tmp_path / "m.sparsenn", model)
    manifest = archive.read(path).manifest
    assert manifest["format"] == "sparsenn-archive" and manifest["schema_version"] == 1
    assert manifest["bytes"]["dense"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert len(manifest["sha256"]) == 64
    assert manifest["model"]["modules"][1] == {"name": "0", "class": "torch.nn.Linear",
                                               "args": {"in_features": 32, "out_features": 48, "bias": True}}
    assert math.isclose(manifest["bytes"]["stored"], sum(np.prod(e["shape"]) * 4
                                                         for e in manifest["tensors"].values()))
