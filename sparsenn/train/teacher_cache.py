"""Teacher logits computed once for a fixed dataset and kept on disk (safetensors).

Distilling many students (sparsities, seeds) from one teacher on data without random
augmentation runs the same teacher forward passes every epoch of every run; the cache runs
them once. A cache is only valid for the data and the teacher it was computed from, so the file
records, beside the ``(N, ...)`` float32 logits:

* ``data_digest``: SHA-256 of the inputs in dataset order (count, per-sample shape and dtype, bytes);
* ``teacher_digest``: SHA-256 of the teacher's ``state_dict`` (names, dtypes, shapes, bytes);
* ``logits_digest``: SHA-256 of the logits' bytes.

:meth:`TeacherCache.load` recomputes the data digest (and the teacher's when given) and refuses
a stale cache (other data, another teacher) or a damaged one (edited logits, wrong sizes, not a
cache) with a :class:`TeacherCacheError` that says which, instead of training on wrong targets.
The digests detect changes, not forgery: anyone can recompute them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_write
from .distillation import logits_of

__all__ = ["TeacherCache", "TeacherCacheError", "module_digest"]

FORMAT = "sparsenn-teacher-cache"
VERSION = "1"
MAX_CACHE_BYTES = 64 << 30  # a larger file is refused before reading


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used: stale (other data or teacher), damaged, or not a cache."""


def module_digest(module: nn.Module) -> str:
    """SHA-256 over a module's ``state_dict``: names, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _inputs(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not torch.is_tensor(x):
        raise TypeError(f"a teacher cache needs datasets whose items are tensors or (input tensor, ...) tuples; "
                        f"got inputs of type {type(x).__name__}")
    return x


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"a teacher cache needs a map-style dataset with len(), got {type(dataset).__name__}") from None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class _Digest:
    """SHA-256 of a dataset's inputs streamed batch by batch; independent of the batch size."""

    def __init__(self, count: int):
        self.h, self.count, self.head = hashlib.sha256(), count, None
        self.h.update(f"{count}|".encode())

    def update(self, x: torch.Tensor) -> None:
        head = f"{x.dtype}|{tuple(x.shape[1:])}"
        if self.head is None:
            self.h.update(head.encode())
            self.head = head
        elif head != self.head:
            raise TypeError(f"dataset inputs change shape or dtype ({self.head} then {head}); a cache needs fixed "
                            "inputs")
        self.h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _data_digest(dataset: Dataset, batch_size: int) -> str:
    digest = _Digest(len(dataset))
    for batch in _loader(dataset, batch_size):
        digest.update(_inputs(batch))
    return digest.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class _WithLogits(Dataset):
    """``dataset[i]`` followed by the teacher's logits for sample ``i``."""

    def __init__(self, dataset: Dataset, logits: torch.Tensor):
        self.dataset, self.logits = dataset, logits

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (*item, self.logits[i]) if isinstance(item, (tuple, list)) else (item, self.logits[i])


class TeacherCache:
    """A teacher's logits for every sample of a dataset, in dataset order.

    ``TeacherCache.load_or_compute(path, teacher, dataset)`` is the usual entry: it loads the file
    (checked against the data and the teacher) or computes and saves it. ``cache.loader(batch_size)``
    yields ``(input, target, teacher_logits)`` batches for :func:`~sparsenn.train.distillation.distill`
    or your own loop.
    """

    def __init__(self, dataset: Dataset, logits: torch.Tensor, data_digest: str, teacher_digest: str | None = None):
        if not torch.is_tensor(logits) or logits.dim() < 1 or logits.shape[0] != len(dataset):  # type: ignore[arg-type]
            raise TeacherCacheError(f"logits of shape {tuple(getattr(logits, 'shape', ()))} for a dataset of "
                                    f"{len(dataset)} samples")  # type: ignore[arg-type]
        self.dataset, self.logits = dataset, logits
        self.data_digest, self.teacher_digest = data_digest, teacher_digest

    @classmethod
    @torch.no_grad()
    def compute(cls, teacher: nn.Module, dataset: Dataset, *, batch_size: int = 256) -> TeacherCache:
        """Run ``teacher`` (in eval mode, on its device) over ``dataset`` in order; float32 logits on the CPU."""
        loader = _loader(dataset, batch_size)
        digest = _Digest(len(dataset))  # type: ignore[arg-type]
        device = next(teacher.parameters(), torch.empty(0)).device
        was_training = teacher.training
        teacher.eval()
        chunks = []
        try:
            for batch in loader:
                x = _inputs(batch)
                digest.update(x)
                chunks.append(logits_of(teacher(x.to(device))).detach().float().cpu())
        finally:
            teacher.train(was_training)
        if not chunks:
            raise ValueError("the dataset is empty: nothing to cache")
        return cls(dataset, torch.cat(chunks), digest.hexdigest(), module_digest(teacher))

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache atomically (a temporary file, then a rename): a killed run leaves no half file."""
        logits = self.logits.detach().float().cpu().contiguous()
        meta = {"format": FORMAT, "version": VERSION, "count": str(logits.shape[0]),
                "shape": json.dumps(list(logits.shape)), "data_digest": self.data_digest,
                "teacher_digest": self.teacher_digest or "", "logits_digest": _tensor_digest(logits)}
        atomic_write(path, st_save({"logits": logits}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, dataset: Dataset, *, teacher: nn.Module | None = None,
             batch_size: int = 256, max_bytes: int = MAX_CACHE_BYTES) -> TeacherCache:
        """Read a cache for ``dataset`` (and ``teacher``, when given: its digest is checked too).

        Raises :class:`TeacherCacheError` if the file is not a readable cache, was changed since it was
        written, or was computed from other data or another teacher."""
        path = Path(path)
        if not path.is_file():
            raise TeacherCacheError(f"teacher cache {path}: no such file")
        size = path.stat().st_size
        if size > max_bytes:
            raise TeacherCacheError(f"teacher cache {path}: {size} bytes, more than max_bytes={max_bytes}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, names = f.metadata() or {}, list(f.keys())
                if meta.get("format") != FORMAT:
                    raise TeacherCacheError(f"{path} is not a teacher cache (format {meta.get('format')!r}, "
                                            f"expected {FORMAT!r})")
                if meta.get("version") != VERSION:
                    raise TeacherCacheError(f"teacher cache {path}: version {meta.get('version')!r}; this sparsenn "
                                            f"reads version {VERSION}")
                if names != ["logits"]:
                    raise TeacherCacheError(f"teacher cache {path}: tensors {names}, expected exactly ['logits']")
                logits = f.get_tensor("logits")
        except SafetensorError as e:
            raise TeacherCacheError(f"teacher cache {path} is unreadable: {e}") from None
        try:
            count, shape = int(meta["count"]), json.loads(meta["shape"])
            data_digest, teacher_digest, logits_digest = meta["data_digest"], meta["teacher_digest"], meta["logits_digest"]
        except (KeyError, ValueError) as e:
            raise TeacherCacheError(f"teacher cache {path}: metadata field {e} missing or malformed") from None
        if logits.dtype != torch.float32 or list(logits.shape) != shape or logits.shape[0] != count:
            raise TeacherCacheError(f"teacher cache {path}: logits {logits.dtype} {tuple(logits.shape)} disagree with "
                                    f"the recorded float32 {shape}")
        if _tensor_digest(logits) != logits_digest:
            raise TeacherCacheError(f"teacher cache {path}: the logits were changed since the cache was written "
                                    "(their SHA-256 differs from the recorded one); delete the file and recompute")
        if count != len(dataset):  # type: ignore[arg-type]
            raise TeacherCacheError(f"teacher cache {path} is stale: computed for {count} samples, the dataset has "
                                    f"{len(dataset)}; delete the file to recompute")  # type: ignore[arg-type]
        if _data_digest(dataset, batch_size) != data_digest:
            raise TeacherCacheError(f"teacher cache {path} is stale: the dataset's inputs (or their order) differ "
                                    "from those the logits were computed on; delete the file to recompute")
        if teacher is not None and module_digest(teacher) != teacher_digest:
            raise TeacherCacheError(f"teacher cache {path} is stale: it was computed by another teacher (the "
                                    "weights' SHA-256 differs); delete the file to recompute")
        return cls(dataset, logits, data_digest, teacher_digest or None)

    @classmethod
    def load_or_compute(cls, path: str | os.PathLike, teacher: nn.Module, dataset: Dataset, *,
                        batch_size: int = 256) -> TeacherCache:
        """:meth:`load` if ``path`` exists (a stale or damaged file raises; it is never overwritten
        silently), else :meth:`compute` and :meth:`save`."""
        if Path(path).exists():
            return cls.load(path, dataset, teacher=teacher, batch_size=batch_size)
        cache = cls.compute(teacher, dataset, batch_size=batch_size)
        cache.save(path)
        return cache

    def with_logits(self) -> Dataset:
        """The dataset whose items are ``(*dataset[i], logits[i])``."""
        return _WithLogits(self.dataset, self.logits)

    def loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0) -> DataLoader:
        """Batches ``(input, target, teacher_logits)``, shuffled with a seeded generator."""
        generator = torch.Generator().manual_seed(int(seed))
        return DataLoader(self.with_logits(), batch_size=batch_size, shuffle=shuffle, generator=generator)
