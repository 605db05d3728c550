"""Checkpoints: safetensors + JSON, bit-identical resume, atomic writes."""

import json

import pytest
import safetensors
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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


# ----------------------------------------------------------------------------- masks enforced on load


def _with_ghosts(model):
    """A state_dict whose weights are non-zero at every masked position (as written by a buggy tool)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, _, mask in sn.iter_masks(model):
        state[name][~mask] = 7.0
    return state


@pytest.mark.parametrize("target_has_masks", [True, False])
def test_load_enforces_the_masks_it_loads(tmp_path, target_has_masks):
    model, sp, opt = _setup()
    _train(model, sp, opt, make_batches(n=10))
    ghost = TinyMLP()
    ghost.load_state_dict(_with_ghosts(model), strict=False)  # weights only: TinyMLP has no mask buffers
    for name, mask in sn.get_masks(model).items():  # the same masks, attached without zeroing
        module, attr = name.rsplit(".", 1)
        ghost.get_submodule(module).register_buffer(attr + "_mask", mask.clone())
    assert any(bool((p[~m] != 0).any()) for _, p, m in sn.iter_masks(ghost))
    path = sn.save(tmp_path / "ck.safetensors", ghost)
    target = _setup(seed=7)[0] if target_has_masks else TinyMLP()
    sn.load(path, target)
    for name, p, mask in sn.iter_masks(target):
        assert not bool(p[~mask].any()), name
    assert sn.sparsity(target) == pytest.approx(0.9, abs=1e-3)


# ----------------------------------------------------------------------------- checksums


def _data_range(path, key):
    """Byte range of tensor ``key`` in a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


@pytest.mark.parametrize("key", ["model/fc1.weight", "model/fc2.weight_mask", "optimizer0/state/0/exp_avg",
                                 "sparsifier/generator"])
def test_a_flipped_bit_is_refused_naming_the_tensor(tmp_path, key):
    model, sp, opt = _setup()
    _train(model, sp, opt, make_batches(n=3))
    path = sn.save(tmp_path / "ck.safetensors", model, sp, optimizer=opt)
    begin, end = _data_range(path, key)
    raw = bytearray(path.read_bytes())
    raw[(begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    fresh, sp2, opt2 = _setup(seed=5)
    with pytest.raises(sn.CheckpointError, match=f"tensor '{key}': checksum mismatch.*corrupted"):
        sn.load(path, fresh, sp2, optimizer=opt2)


@settings(max_examples=60, deadline=None)
@given(where=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_any_single_bit_flip_anywhere_in_the_file_is_refused(tmp_path_factory, where, bit):
    path = _flip_base(tmp_path_factory)
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    # half the draws in the header (metadata, names, shapes, offsets), half in the tensors' bytes
    pos = int(where * 2 * header) if where < 0.5 else header + int((where - 0.5) * 2 * (len(raw) - header))
    raw[pos] ^= 1 << bit
    bad = path.with_name(f"flipped-{pos}-{bit}.safetensors")
    bad.write_bytes(bytes(raw))
    with pytest.raises(sn.CheckpointError):
        ckpt.read(bad)


_FLIP_BASE = {}


def _flip_base(factory):
    if "path" not in _FLIP_BASE:
        model, sp, opt = _setup()
        _train(model, sp, opt, make_batches(n=3))
        _FLIP_BASE["path"] = sn.save(factory.mktemp("flip") / "ck.safetensors", model, sp, optimizer=opt,
                                     extra={"epoch": 3})
    return _FLIP_BASE["path"]


def _version1_file(path, model):
    """A checkpoint as sparsenn wrote it before checksums: bool masks, no 'checksums' metadata."""
    from safetensors.torch import save as st_save

    tensors = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    tree = {"model": {"__dict__": {k: {"__tensor__": f"model/{k}"} for k in model.state_dict()}},
            "sparsifier": None, "optimizers": [], "extra": {"__dict__": {"epoch": 1}}}
    path.write_bytes(st_save(tensors, metadata={"format": "sparsenn-checkpoint", "version": "1",
                                                 "tree": json.dumps(tree)}))
    return path


def test_version1_checkpoints_load_with_a_warning(tmp_path):
    model, sp, opt = _setup()
    _train(model, sp, opt, make_batches(n=10))
    path = _version1_file(tmp_path / "v1.safetensors", model)
    fresh = TinyMLP()
    with pytest.warns(UserWarning, match="version 1 checkpoint, written without checksums"):
        assert sn.load(path, fresh) == {"epoch": 1}
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_version2_without_checksums_is_refused(tmp_path):
    model = _setup()[0]
    path = sn.save(tmp_path / "ck.safetensors", model)
    with safetensors.safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["checksums"]
    from safetensors.torch import save as st_save

    path.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(sn.CheckpointError, match="metadata field 'checksums' is missing"):
        sn.load(path, TinyMLP())


# ----------------------------------------------------------------------------- masks as bits, file size


def test_masks_are_stored_as_bits(tmp_path):
    model = _setup()[0]
    path = sn.save(tmp_path / "ck.safetensors", model)
    with safetensors.safe_open(str(path), "pt") as f:
        tree = json.loads(f.metadata()["tree"])
        packed = f.get_tensor("model/fc1.weight_mask")
    assert tree["model"]["__dict__"]["fc1.weight_mask"] == {"__bits__": "model/fc1.weight_mask", "shape": [32, 16]}
    assert packed.dtype == torch.uint8 and packed.shape == (32 * 16 // 8,)
    assert torch.equal(ckpt.read(path)["model"]["fc1.weight_mask"], model.fc1.weight_mask)


@pytest.mark.parametrize("n", [1, 7, 9, 64, 65])
def test_bits_round_trip_any_length(n):
    from sparsenn.train.checkpoint_format import pack_bits, unpack_bits

    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(mask)
    assert packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, [n], "m"), mask)
    with pytest.raises(sn.CheckpointError, match="bytes of packed bits"):
        unpack_bits(torch.cat([packed, packed[:1]]), [n], "m")
    if n % 8:
        with pytest.raises(sn.CheckpointError, match="padding bits"):
            unpack_bits(packed | 1, [n], "m")


def test_lenet_300_100_checkpoint_is_about_the_dense_size(tmp_path):
    """Dense fp32 weights + one bit per mask entry: ~1.03x the dense weights (a byte per entry was ~1.25x)."""
    torch.manual_seed(0)
    model = sn.models.zoo.LeNet300100()
    sn.Sparsifier(model, sparsity=0.9)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    size = sn.save(tmp_path / "ck.safetensors", model).stat().st_size
    assert size <= 1.04 * dense, (size, dense)


# ----------------------------------------------------------------------------- atomic writes


def _temp_name(target, pid, host=None):
    from sparsenn.train.atomic import _host

    return target.parent / f".{target.name}.{host or _host()}.{pid}.0123abcd.tmp"


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no such process now (unless the pid is reused at once)


def test_a_killed_save_leaves_no_temporary_behind_after_the_next_save(tmp_path):
    import os

    model = _setup()[0]
    target = tmp_path / "ck.safetensors"
    dead = _temp_name(target, _dead_pid())
    live = _temp_name(target, os.getppid())  # a live writer (our parent process): never touched
    other_host = _temp_name(target, _dead_pid(), host="elsewhere")  # another machine on a shared folder
    other_target = _temp_name(tmp_path / "other.safetensors", _dead_pid())
    unrelated = tmp_path / f".{target.name}.notes.tmp"
    for p in (dead, live, other_host, other_target, unrelated):
        p.write_bytes(b"partial checkpoint")
    sn.save(target, model)
    assert not dead.exists()
    assert live.exists() and other_host.exists() and other_target.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".tmp") == ["ck.safetensors"]


def test_file_mode_follows_the_umask(tmp_path):
    import os
    import stat

    model = _setup()[0]
    old = os.umask(0o022)
    try:
        path = sn.save(tmp_path / "ck.safetensors", model)
        os.umask(0o077)
        private = sn.save(tmp_path / "private.safetensors", model)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    import os
    import stat

    model = _setup()[0]
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), os.path.exists(tmp_path / "ck.safetensors")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    sn.save(tmp_path / "ck.safetensors", model)
    assert synced == [(False, False), (True, True)]  # the file's bytes, then the folder after the rename


def test_runtime_save_still_writes_atomically(tmp_path, monkeypatch):
    """backend.runtime.io uses the same atomic_write (same signature: path, bytes)."""
    from sparsenn.backend.runtime import io as runtime_io

    calls = []
    monkeypatch.setattr(runtime_io, "atomic_write", lambda path, data: calls.append((path, len(data))))
    runtime_io.save(nn.Sequential(nn.Linear(4, 2)), tmp_path / "m.sparse")
    assert calls and calls[0][0] == tmp_path / "m.sparse" and calls[0][1] > 0
    ckpt.atomic_write(tmp_path / "x.bin", b"abc")
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "adadelta": lambda ps: torch.optim.Adadelta(ps),
    "adamax": lambda ps: torch.optim.Adamax(ps),
    "nadam": lambda ps: torch.optim.NAdam(ps),
    "radam": lambda ps: torch.optim.RAdam(ps),
    "asgd": lambda ps: torch.optim.ASGD(ps),
    "rprop": lambda ps: torch.optim.Rprop(ps),
    "adafactor": lambda ps: torch.optim.Adafactor(ps),
    "lbfgs": lambda ps: torch.optim.LBFGS(ps, history_size=3, max_iter=2),
}


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adafactor" or hasattr(torch.optim, "Adafactor")])
def test_every_torch_optimizer_state_passes_the_checks(tmp_path, name):
    """The shape/dtype rules for optimizer state accept what torch's own optimizers keep."""
    torch.manual_seed(0)
    model = TinyMLP()
    sp = sn.Sparsifier(model, sparsity=0.5)
    opt = sp.wrap(OPTIMIZERS[name](model.parameters()))
    x, y = make_batches(n=1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    path = sn.save(tmp_path / "ck.safetensors", model, sp, optimizer=opt)
    torch.manual_seed(1)
    model2 = TinyMLP()
    sp2 = sn.Sparsifier(model2, sparsity=0.5)
    opt2 = sp2.wrap(OPTIMIZERS[name](model2.parameters()))
    sn.load(path, model2, sp2, optimizer=opt2)
    assert str(opt2.state_dict()) == str(opt.state_dict())


def test_float64_and_integer_buffers_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    sn.Sparsifier(model, sparsity=0.5)
    model(torch.randn(5, 4, dtype=torch.float64))  # running stats and num_batches_tracked (int64) move
    path = sn.save(tmp_path / "ck.safetensors", model)
    fresh = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    sn.load(path, fresh)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    with pytest.raises(sn.CheckpointError, match=r"model/0\.weight: dtype torch\.float64, the model's is torch\.float32"):
        sn.load(path, nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)))
