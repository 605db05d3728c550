"""Datasets (sparsenn.data.datasets): digits, the IDX reader, and real MNIST / Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, needs_datasets, skip_unless_datasets

from sparsenn.data.datasets import (
    MAX_IDX_BYTES,
    DatasetError,
    flatten,
    load_digits_tensors,
    load_idx_dataset,
    make_loaders,
    read_idx,
)

needs_real_data = needs_datasets("mnist", "fashion_mnist")


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_range_split():
    train, test = load_digits_tensors()
    x, y = train.tensors
    xt, yt = test.tensors
    assert len(train) + len(test) == 1797
    assert len(test) == 450  # ceil(0.25 * 1797)
    assert x.shape == (len(train), 64) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert 0.0 <= float(min(x.min(), xt.min())) and float(max(x.max(), xt.max())) == 1.0
    # stratified: every class appears in the test split in proportion
    counts = torch.bincount(yt, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47


def test_digits_deterministic():
    a, b = load_digits_tensors(seed=3), load_digits_tensors(seed=3)
    c = load_digits_tensors(seed=4)
    assert torch.equal(a[0].tensors[0], b[0].tensors[0])
    assert torch.equal(a[1].tensors[1], b[1].tensors[1])
    assert not torch.equal(a[0].tensors[0], c[0].tensors[0])
    assert len(load_digits_tensors(test_fraction=0.5)[1]) == 899


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.2"])
def test_digits_bad_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_tensors(test_fraction=bad)


def test_make_loaders_seeded():
    train, test = load_digits_tensors()
    first = [next(iter(make_loaders(train, test, batch_size=32, seed=7)[0]))[1] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    other = next(iter(make_loaders(train, test, batch_size=32, seed=8)[0]))[1]
    assert not torch.equal(first[0], other)
    tr, te = make_loaders(train, test, batch_size=32)
    assert torch.equal(next(iter(te))[1], test.tensors[1][:32])  # test loader not shuffled
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(train, test, batch_size=0)


def test_flatten_helper():
    x = torch.arange(24.0).reshape(2, 1, 3, 4)
    ds = flatten(torch.utils.data.TensorDataset(x, torch.tensor([0, 1])))
    assert ds.tensors[0].shape == (2, 12)
    assert torch.equal(ds.tensors[0][1], x[1].flatten())


# ----------------------------------------------------------------------------- IDX reader


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand: 0x0000, type code, ndim, big-endian dims, data."""
    be = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(be).tobytes()


CASES = [
    (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08),
    (np.array([-128, -1, 0, 127], dtype=np.int8), 0x09),
    (np.array([[-300, 2], [3, 30000]], dtype=np.int16), 0x0B),
    (np.array([-(2**31), 1, 2**31 - 1], dtype=np.int32), 0x0C),
    (np.array([[1.5, -2.25, 3e-8]], dtype=np.float32), 0x0D),
    (np.array([np.pi, -1e300], dtype=np.float64), 0x0E),
]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("arr,code", CASES)
def test_read_idx_roundtrip(tmp_path, arr, code, compress):
    data = idx_bytes(arr, code)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(data) if compress else data)
    out = read_idx(path)
    assert out.dtype == arr.dtype and out.dtype.isnative
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_read_idx_mnist_magic(tmp_path):
    data = idx_bytes(np.zeros((2, 28, 28), np.uint8), 0x08)
    assert struct.unpack(">I", data[:4])[0] == 2051
    assert struct.unpack(">I", idx_bytes(np.zeros(5, np.uint8), 0x08)[:4])[0] == 2049


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b[:-1], "truncated data"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b"\x01" + b[1:], "bad IDX magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad IDX magic"),
        (lambda b: b[:6], "truncated header"),
        (lambda b: b[:2], "4-byte IDX magic"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_bad_files(tmp_path, mutate, match, compress):
    data = mutate(idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4), 0x08))
    path = tmp_path / "bad-file.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DatasetError, match=match) as e:
        read_idx(path)
    assert "bad-file.idx" in str(e.value)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8), 0x08))[:-10])
    with pytest.raises(DatasetError, match="cut.gz"):
        read_idx(path)


def gzip_bomb(header: bytes, inflated: int) -> bytes:
    """``header`` then ``inflated`` zero bytes, gzip-compressed to ~1/1000 (repeated gzip members)."""
    chunk = 16 << 20
    member = gzip.compress(b"\0" * chunk, compresslevel=9)
    return gzip.compress(header) + member * (inflated // chunk)


def idx_header(shape: tuple[int, ...], code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape)


def _bounded(fn) -> tuple[Exception | None, float, int]:
    """Run ``fn``; return what it raised, its seconds and its peak Python allocation in bytes."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
        error = None
    except Exception as e:  # noqa: BLE001
        error = e
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return error, seconds, peak


def test_read_idx_a_gzip_bomb_behind_a_small_header_stops_after_the_declared_data(tmp_path):
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip_bomb(idx_header((10,)), 1 << 30))  # 1 GiB of zeros behind a 10-byte array
    assert path.stat().st_size < 2 << 20
    error, seconds, peak = _bounded(lambda: read_idx(path))
    assert isinstance(error, DatasetError) and "bomb.gz" in str(error) and "trailing bytes" in str(error)
    assert seconds < 1 and peak < 32 << 20


def test_read_idx_refuses_a_declared_size_over_the_limit_before_reading_it(tmp_path):
    path = tmp_path / "huge.gz"
    path.write_bytes(gzip_bomb(idx_header((65536, 65536, 64)), 64 << 20))
    error, seconds, peak = _bounded(lambda: read_idx(path))
    assert isinstance(error, DatasetError), error
    assert str(error) == (f"{path}: header declares shape (65536, 65536, 64) of uint8, 274877906944 data bytes; "
                          f"at most {MAX_IDX_BYTES} (max_bytes)")
    assert seconds < 0.5 and peak < 8 << 20
    small = tmp_path / "small.idx"
    small.write_bytes(idx_bytes(np.zeros((4, 4), np.uint8), 0x08))
    with pytest.raises(DatasetError, match="16 data bytes; at most 15"):
        read_idx(small, max_bytes=15)


def test_read_idx_a_dimension_product_that_overflows_int64_is_a_dataset_error(tmp_path):
    path = tmp_path / "wrap.idx"  # 2**31 * 2**31 * 4 = 2**64: 0 in int64 arithmetic, like its empty data
    path.write_bytes(idx_header((2**31, 2**31, 4)))
    with pytest.raises(DatasetError, match=r"wrap.idx: header declares shape \(2147483648, 2147483648, 4\) of "
                                           r"uint8, 18446744073709551616 data bytes; at most"):
        read_idx(path)


def test_read_idx_a_truncated_gzip_stream_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "short.gz"  # declares 512 MiB, holds 100 bytes: no 512 MiB buffer up front
    path.write_bytes(gzip.compress(idx_header((512 << 20,)) + bytes(100)))
    error, _, peak = _bounded(lambda: read_idx(path))
    assert isinstance(error, DatasetError) and "truncated data" in str(error) and "found 100" in str(error)
    assert peak < 8 << 20


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_read_idx_refuses_a_fifo_at_once_instead_of_blocking(tmp_path):
    fifo = tmp_path / "train-images-idx3-ubyte.gz"
    os.mkfifo(fifo)
    outcome: dict[str, Exception] = {}

    def read():
        try:
            read_idx(fifo)
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(2)
    if reader.is_alive():  # blocked in open(): give it a writer so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(2)
        pytest.fail("read_idx blocked on a FIFO")
    assert isinstance(outcome.get("error"), DatasetError)
    assert str(outcome["error"]) == f"{fifo}: not a regular file (a FIFO)"
    with pytest.raises(DatasetError, match=r"mnist file 'train-images-idx3-ubyte.gz' in .* is not a regular file"):
        load_idx_dataset("mnist", tmp_path, verify=False)


# ----------------------------------------------------------------------------- real data


def test_unknown_name():
    with pytest.raises(ValueError, match="fashion_mnist.*mnist"):
        load_idx_dataset("cifar10", DATA_DIR)


@pytest.fixture(scope="module")
def mnist():
    return load_idx_dataset("mnist", skip_unless_datasets("mnist"), verify=True)


@needs_real_data
def test_mnist(mnist):
    train, test = mnist
    x, y = train.tensors
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert len(test) == 10000
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.tensors[1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(y).tolist()[:2] == [5923, 6742]


@needs_real_data
def test_fashion_mnist_flat_and_alias():
    train, test = load_idx_dataset("fashion-mnist", DATA_DIR / "fashion_mnist", flatten=True)
    assert train.tensors[0].shape == (60000, 784) and len(test) == 10000
    assert train.tensors[1][:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test.tensors[1][:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.bincount(train.tensors[1]).tolist() == [6000] * 10


@needs_real_data
def test_flatten_real(mnist):
    flat = flatten(mnist[1])
    assert flat.tensors[0].shape == (10000, 784)
    assert torch.equal(flat.tensors[0][0], mnist[1].tensors[0][0].flatten())


def copy_mnist(tmp_path: Path) -> Path:
    dst = tmp_path / "mnist"
    shutil.copytree(DATA_DIR / "mnist", dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


@needs_real_data
def test_corrupted_byte_fails_checksum(tmp_path):
    dst = copy_mnist(tmp_path)
    target = dst / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="checksum mismatch") as e:
        load_idx_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg
    assert "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6" in msg


@needs_real_data
def test_sha256sums_file_is_checked(tmp_path):
    dst = copy_mnist(tmp_path)
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  mnist/train-labels-idx1-ubyte.gz\n")
    with pytest.raises(DatasetError, match="checksum mismatch.*SHA256SUMS"):
        load_idx_dataset("mnist", tmp_path)
    # a SHA256SUMS beside the files with bare names is honoured too
    (tmp_path / "SHA256SUMS").unlink()
    (dst / "SHA256SUMS").write_text(f"{'0' * 64} *train-labels-idx1-ubyte.gz\n")
    with pytest.raises(DatasetError, match="train-labels"):
        load_idx_dataset("mnist", dst)
    assert len(load_idx_dataset("mnist", dst, verify=False)[1]) == 10000  # verify=False skips it


@needs_real_data
def test_missing_file(tmp_path):
    dst = copy_mnist(tmp_path)
    (dst / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz") as e:
        load_idx_dataset("mnist", tmp_path)
    assert "original IDX gzip" in str(e.value) and str(dst) in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="missing mnist file"):
        load_idx_dataset("mnist", tmp_path)


def test_the_real_data_folder_is_sparsenn_data_dir_else_shared_datasets(monkeypatch, tmp_path):
    from conftest import ROOT, data_dir

    monkeypatch.setenv("SPARSENN_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("SPARSENN_DATA_DIR")
    assert data_dir() == ROOT.parent / "shared" / "datasets"
