"""Datasets for tests and benchmarks, read from local files only (never the network).

* :func:`load_digits_tensors` -- scikit-learn's bundled 8x8 digits (UCI optdigits).
* :func:`load_idx_dataset` -- MNIST (LeCun et al., 1998) and Fashion-MNIST (Xiao et al.,
  2017, arXiv:1708.07747) from the original IDX gzip files, SHA-256 verified.
* :func:`read_idx` -- a reader for the IDX format (http://yann.lecun.com/exdb/mnist/).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DatasetError",
    "IDX_DATASETS",
    "MAX_IDX_BYTES",
    "flatten",
    "load_digits_tensors",
    "load_idx_dataset",
    "make_loaders",
    "read_idx",
]


class DatasetError(ValueError):
    """A dataset file is missing, corrupt, or not what was expected."""


# ----------------------------------------------------------------------------- digits


def load_digits_tensors(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 8x8 digits as ``(N, 64)`` float32 in [0, 1] and int64 labels.

    The train/test split is stratified by class and deterministic for a given ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
        0.0 < test_fraction < 1.0
    ):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (
        TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)),
    )


# ----------------------------------------------------------------------------- IDX

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
MAX_IDX_BYTES = 1 << 30  #: the most data :func:`read_idx` reads by default (MNIST's training images: 47 MB)


_CHUNK = 1 << 20


def _open_regular(path: Path):
    """``path`` opened for binary reading, refused unless a regular file. The open does not block
    (``O_NONBLOCK``: a FIFO with no writer would block a plain open forever) and the check is on
    the opened file (``fstat``), so nothing can be swapped in between."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DatasetError(f"{path}: cannot open ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a file")
        raise DatasetError(f"{path}: not a regular file ({kind})")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_up_to(stream, n: int) -> bytearray:
    """Up to ``n`` bytes from ``stream``, read in chunks (fewer only at the end of the stream)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx(path: str | Path, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain, detected by the gzip magic bytes).

    Returns an array in native byte order with the shape stored in the header. The file
    is streamed: the header is read and checked first (at most ``max_bytes`` of data,
    computed without overflow), then exactly the declared number of bytes, then one more
    to refuse trailing data, so a gzip bomb is never inflated beyond the declared size.
    Raises :class:`DatasetError` naming the file on a non-regular file (a FIFO, a device),
    a bad magic, a declared size over ``max_bytes``, truncation or trailing bytes.
    """
    path = Path(path)
    with _open_regular(path) as f:
        compressed = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f, mode="rb") if compressed else f
        try:
            return _read_idx_stream(stream, path, max_bytes, None if compressed else os.fstat(f.fileno()).st_size)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({e})") from None


def _read_idx_stream(stream, path: Path, max_bytes: int, file_size: int | None) -> np.ndarray:
    raw = _read_up_to(stream, 4)
    if len(raw) < 4:
        raise DatasetError(f"{path}: expected a 4-byte IDX magic number, found only {len(raw)} bytes")
    zero, code, ndim = bytes(raw[:2]), raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DatasetError(
            f"{path}: bad IDX magic 0x{raw[:4].hex().upper()}; expected 0x0000TTDD with "
            f"type code TT in {{{valid}}} (e.g. 0x00000803 = 2051 for MNIST images, "
            f"0x00000801 = 2049 for labels)"
        )
    header = 4 + 4 * ndim
    dims = _read_up_to(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DatasetError(
            f"{path}: truncated header; expected {header} bytes for {ndim} dims, found {4 + len(dims)}"
        )
    shape = tuple(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
    if expected > max_bytes:
        raise DatasetError(f"{path}: header declares shape {shape} of {dtype.name}, {expected} data bytes; "
                           f"at most {max_bytes} (max_bytes)")
    if file_size is not None and file_size - header != expected:  # plain file: its size says it all
        found = file_size - header
        what = "truncated data" if found < expected else "size mismatch (trailing bytes)"
        raise DatasetError(f"{path}: {what}; shape {shape} of {dtype.name} needs {expected} data bytes, "
                           f"found {found}")
    data = _read_up_to(stream, expected)
    if len(data) < expected:
        raise DatasetError(f"{path}: truncated data; shape {shape} of {dtype.name} needs {expected} data "
                           f"bytes, found {len(data)}")
    if stream.read(1):
        raise DatasetError(f"{path}: size mismatch (trailing bytes); shape {shape} of {dtype.name} needs "
                           f"{expected} data bytes, and more follow")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


# ----------------------------------------------------------------------------- MNIST / Fashion-MNIST

_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: SHA-256 of the official release files, keyed by dataset folder then file name.
IDX_DATASETS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}
_ALIASES = {"fashion-mnist": "fashion_mnist"}
_COUNTS = {"train": 60000, "t10k": 10000}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_sha256sums(sums: Path) -> dict[str, str]:
    """``{relative path: digest}`` from a ``sha256sum``-format file."""
    out: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            out[Path(parts[1].lstrip("*").strip()).as_posix()] = parts[0].lower()
    return out


def load_idx_dataset(
    name: str, root: str | Path, *, verify: bool = True, flatten: bool = False
) -> tuple[TensorDataset, TensorDataset]:
    """Load MNIST or Fashion-MNIST from the four original IDX gzip files under ``root``.

    ``root`` is either the folder holding ``mnist/`` and ``fashion_mnist/`` or the dataset
    folder itself. Images are float32 ``(N, 1, 28, 28)`` in [0, 1] (``(N, 784)`` with
    ``flatten=True``), labels int64. With ``verify`` every file's SHA-256 is checked
    against the official digests and against any ``SHA256SUMS`` file found in ``root``.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in IDX_DATASETS:
        valid = sorted([*IDX_DATASETS, *_ALIASES])
        raise ValueError(f"unknown IDX dataset {name!r}; valid names: {', '.join(valid)}")
    root = Path(root)
    folder = next((root / d for d in (key, name.lower()) if (root / d).is_dir()), root)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist (looking for {key!r})")

    paths = {f: folder / f for f in _FILES}
    for f, p in paths.items():
        if p.exists() and not p.is_file():
            raise DatasetError(f"{key} file {f!r} in {folder} is not a regular file")
        if not p.is_file():
            raise DatasetError(
                f"missing {key} file {f!r} in {folder}; expected the original IDX gzip file "
                f"{f} from the official release"
            )

    if verify:
        sources = [("built-in official digest", IDX_DATASETS[key])]
        for sums in dict.fromkeys([root / "SHA256SUMS", folder / "SHA256SUMS"]):
            if sums.is_file():
                listed = _read_sha256sums(sums)
                rel = {f: p.relative_to(sums.parent).as_posix() for f, p in paths.items()}
                sources.append((str(sums), {f: listed[r] for f, r in rel.items() if r in listed}))
        for f, p in paths.items():
            actual = _sha256(p)
            for source, digests in sources:
                expected = digests.get(f)
                if expected is not None and expected != actual:
                    raise DatasetError(
                        f"checksum mismatch for {p}: expected SHA-256 {expected} ({source}), "
                        f"actual {actual}; the file is corrupt or not the original release "
                        f"(pass verify=False to skip)"
                    )

    splits = []
    for split in ("train", "t10k"):
        img_path, lbl_path = paths[f"{split}-images-idx3-ubyte.gz"], paths[f"{split}-labels-idx1-ubyte.gz"]
        images, labels = read_idx(img_path), read_idx(lbl_path)
        n = _COUNTS[split]
        if images.dtype != np.uint8 or images.shape != (n, 28, 28):
            raise DatasetError(
                f"{img_path}: expected uint8 images of shape {(n, 28, 28)}, "
                f"found {images.dtype} {images.shape}"
            )
        if labels.dtype != np.uint8 or labels.shape != (n,):
            raise DatasetError(
                f"{lbl_path}: expected {n} uint8 labels, found {labels.dtype} {labels.shape}"
            )
        if labels.max() > 9:
            raise DatasetError(f"{lbl_path}: labels must be in 0..9, found max {int(labels.max())}")
        x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
        if flatten:
            x = x.reshape(n, -1)
        splits.append(TensorDataset(x, torch.from_numpy(labels).long()))
    return splits[0], splits[1]


# ----------------------------------------------------------------------------- helpers


def flatten(dataset: TensorDataset) -> TensorDataset:
    """The same samples with inputs reshaped to ``(N, features)``, e.g. MNIST as ``(N, 784)``."""
    if not isinstance(dataset, TensorDataset):
        raise TypeError(f"flatten expects a TensorDataset, got {type(dataset).__name__}")
    x, *rest = dataset.tensors
    return TensorDataset(x.reshape(x.shape[0], -1), *rest)


def make_loaders(
    train: TensorDataset, test: TensorDataset, batch_size: int = 64, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """A shuffled train loader (seeded ``torch.Generator``) and an unshuffled test loader."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
        DataLoader(test, batch_size=batch_size, shuffle=False),
    )
