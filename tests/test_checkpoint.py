"""Checkpoints: safetensors + JSON, bit-identical resume, atomic writes."""

import json

import pytest
import safetensors
import torch
from torch import nn

import sparsenn as sn
import sparsenn.train.checkpoint as ckpt
from conftest import TinyMLP, make_batches


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.9, method="movement",
                       schedule=sn.Polynomial(begin_step=2, end_step=10, frequency=2))
    opt = sp.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05))
    return model, sp, opt


def _train(model, sp, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()


def test_resume_is_bit_identical(tmp_path):
    data = make_batches(n=14, seed=3)
    model, sp, opt = _setup()
    _train(model, sp, opt, data)  # never interrupted

    m1, sp1, opt1 = _setup()
    _train(m1, sp1, opt1, data[:5])
    path = sn.save(tmp_path / "ck.safetensors", m1, sp1, optimizer=opt1, extra={"epoch": 5})
    del m1, sp1, opt1
    m2, sp2, opt2 = _setup(seed=123)  # different init: everything must come from the file
    assert sn.load(path, m2, sp2, optimizer=opt2) == {"epoch": 5}
    assert sp2.step_count == 5
    _train(m2, sp2, opt2, data[5:])
    for (k, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert sp.history == sp2.history


def test_file_is_safetensors_with_json_no_pickle(tmp_path):
    model, sp, opt = _setup()
    path = sn.save(tmp_path / "ck.safetensors", model, sp, optimizer=opt)
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "sparsenn-checkpoint"
    tree = json.loads(meta["tree"])
    assert tree["sparsifier"]["__dict__"]["config"]["__dict__"]["method"] == "movement"
    assert "model/fc1.weight_mask" in keys
    assert b"\x80\x04" not in path.read_bytes()[:64]  # not a pickle stream


def test_load_into_unmasked_model_attaches_masks(tmp_path):
    model, sp, opt = _setup()
    _train(model, sp, opt, make_batches(n=10))
    path = sn.save(tmp_path / "ck.safetensors", model)
    fresh = TinyMLP()
    sn.load(path, fresh)
    assert sn.sparsity(fresh) == pytest.approx(0.9, abs=1e-3)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    model, sp, opt = _setup()
    path = tmp_path / "ck.safetensors"
    sn.save(path, model, sp, optimizer=opt)
    good = path.read_bytes()
    _train(model, sp, opt, make_batches(n=3))

    real_fsync = ckpt.os.fsync

    def crash(fd):
        raise OSError("disk vanished")  # after part of the bytes were written

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(OSError, match="disk vanished"):
        sn.save(path, model, sp, optimizer=opt)
    monkeypatch.setattr(ckpt.os, "fsync", real_fsync)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temporary left behind


def test_bad_checkpoints(tmp_path):
    model, sp, _ = _setup()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sn.load(tmp_path / "missing.safetensors", model)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a sparsenn checkpoint"):
        sn.load(other, model)
    path = sn.save(tmp_path / "ck.safetensors", model)
    wrong = nn.Sequential(nn.Linear(16, 4))
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the model"):
        sn.load(path, wrong)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())
