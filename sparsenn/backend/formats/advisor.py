"""Format advisor: which format stores a weight in the fewest bytes, and which matrix
product runs fastest on this CPU.

``advise(w)`` computes the exact ``nbytes`` of every format (see :mod:`.table`).
``advise(w, use="matmul", batch=B)`` also times ``y = x W^T`` for ``x`` of shape
``(B, in)`` (a linear layer's product; for a conv weight, the unfolded product of its
``(out, in*kh*kw)`` matrix view) with every registered *matmul candidate*: dense
``torch.nn.functional.linear`` (``"dense"``), ``torch.sparse.mm`` on a CSR tensor
(``"torch_csr"``), and whatever other code registered with
:func:`register_matmul_candidate`. Each candidate is checked against a float64
reference first, run ``warmup`` times, then timed ``repeats`` times
(``time.perf_counter``); the advice reports the median. A candidate that raises or
gives a wrong result is skipped, with the reason.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .base import check_weight, matrix_shape
from .table import DEFAULT_FORMATS, weight_bytes

MatmulFn = Callable[[torch.Tensor], torch.Tensor]
"""``x (B, in) -> y (B, out)``, ``y = x W^T``."""
Prepare = Callable[[torch.Tensor], MatmulFn]
"""Called once with the ``(out, in)`` CPU weight matrix; returns the product to time."""

_CANDIDATES: dict[str, Prepare] = {}
USES = ("storage", "matmul")


def register_matmul_candidate(name: str, prepare: Prepare | None = None, *, replace: bool = False):
    """Add a matrix-product implementation the advisor times (usable as a decorator).

    ``prepare(weight)`` receives the weight's ``(out, in)`` matrix view (a CPU tensor of
    the weight's dtype) and returns ``fn(x) -> y`` computing ``x @ weight.T`` for ``x``
    of shape ``(B, in)``; conversion work belongs in ``prepare``, which is not timed.
    Raising in ``prepare`` or ``fn`` (e.g. for an unsupported dtype) skips the candidate.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"candidate name must be a non-empty string, got {name!r}")

    def add(p: Prepare) -> Prepare:
        if not callable(p):
            raise TypeError(f"prepare must be callable, got {type(p).__name__}")
        if name in _CANDIDATES and not replace:
            raise ValueError(f"matmul candidate {name!r} is already registered (pass replace=True)")
        _CANDIDATES[name] = p
        return p

    return add(prepare) if prepare is not None else add


def unregister_matmul_candidate(name: str) -> None:
    """Remove a registered candidate (a KeyError lists the registered ones)."""
    if name not in _CANDIDATES:
        raise KeyError(f"no matmul candidate {name!r}; registered: {', '.join(_CANDIDATES)}")
    del _CANDIDATES[name]


def list_matmul_candidates() -> list[str]:
    """Registered candidate names, in registration order."""
    return list(_CANDIDATES)


@register_matmul_candidate("dense")
def _dense(weight: torch.Tensor) -> MatmulFn:
    w = weight.contiguous()
    return lambda x: F.linear(x, w)


@register_matmul_candidate("torch_csr")
def _torch_csr(weight: torch.Tensor) -> MatmulFn:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        w = weight.to_sparse_csr()
    return lambda x: torch.sparse.mm(w, x.t()).t()


@dataclass
class Advice:
    """What :func:`advise` found; ``str()`` prints a short table.

    ``bytes``: exact ``nbytes`` per format spec (``None`` where the format cannot hold
    the weight); ``smallest``: the spec with the fewest bytes (the earlier one on a tie).
    For ``use="matmul"``: ``times`` (median seconds per candidate), ``fastest``,
    ``skipped`` (candidate -> reason), ``batch``, ``repeats`` and torch's CPU ``threads``.
    """

    use: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    bytes: dict[str, int | None]
    smallest: str
    batch: int | None = None
    times: dict[str, float] | None = None
    fastest: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    repeats: int | None = None
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if k == "shape" else v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        numel = math.prod(self.shape)
        sparsity = 1 - self.nnz / numel if numel else 0.0
        dense = self.bytes.get("dense")
        lines = [f"weight {'x'.join(map(str, self.shape))} {self.dtype}, nnz {self.nnz} ({sparsity:.1%} zeros)",
                 "format      bytes" + ("    vs dense" if dense else "")]
        for spec, b in self.bytes.items():
            ratio = f"  {b / dense:9.3f}x" if dense and b is not None else ""
            mark = "  <- smallest" if spec == self.smallest else ""
            lines.append(f"{spec:<9} {'-' if b is None else b:>8}{ratio}{mark}")
        if self.times is not None:
            lines.append(f"y = x W^T at batch {self.batch}, median of {self.repeats} runs, {self.threads} threads")
            for name, t in self.times.items():
                mark = "  <- fastest" if name == self.fastest else ""
                lines.append(f"{name:<12} {t * 1e6:>10.1f} us{mark}")
            lines += [f"{name:<12} skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _positive_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_result(y: object, ref: torch.Tensor, bound: torch.Tensor, eps: float) -> str | None:
    """Why ``y`` is not the product (``None`` if it is, within ``|x| |W|^T`` rounding bounds)."""
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(ref.shape):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        return f"returned {got}, expected a tensor of shape {tuple(ref.shape)}"
    err = (y.detach().double() - ref).abs()
    if not bool((err <= bound * eps + 1e-300).all()):
        return f"wrong result: max error {float(err.max()):.3g} exceeds the rounding bound"
    return None


def _measure(matrix: torch.Tensor, batch: int, names: Sequence[str], warmup: int, repeats: int,
             seed: int) -> tuple[dict[str, float], dict[str, str]]:
    cols = matrix.shape[1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cols, generator=g).to(matrix.dtype)
    ref = F.linear(x.double(), matrix.double())
    bound = F.linear(x.double().abs(), matrix.double().abs())
    eps = 4 * (cols + 2) * torch.finfo(matrix.dtype).eps if matrix.dtype.is_floating_point else 0.0
    times, skipped = {}, {}
    for name in names:
        try:
            with torch.inference_mode():
                fn = _CANDIDATES[name](matrix)
                why = _check_result(fn(x), ref, bound, eps)
                if why is None:
                    for _ in range(warmup):
                        fn(x)
                    samples = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        fn(x)
                        samples.append(time.perf_counter() - t0)
                    times[name] = statistics.median(samples)
        except Exception as e:  # noqa: BLE001  (a candidate that cannot run here is skipped, not fatal)
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if why is not None:
            skipped[name] = why
    return times, skipped


def advise(weight: torch.Tensor, use: str = "storage", *, batch: int = 1,
           formats: Sequence[str] = DEFAULT_FORMATS, candidates: Sequence[str] | None = None,
           warmup: int = 3, repeats: int = 10, seed: int = 0) -> Advice:
    """The smallest format for ``weight``, and for ``use="matmul"`` the fastest product at ``batch``.

    ``formats``: specs to size (see :func:`sparsenn.backend.formats.to_format`); ``candidates``:
    registered matmul candidates to time (default all, see :func:`list_matmul_candidates`).
    Timings are of this machine at this moment; the byte counts are exact.
    """
    if use not in USES:
        raise ValueError(f"use must be one of {', '.join(map(repr, USES))}, got {use!r}")
    w = check_weight(weight)
    sizes = weight_bytes(w, formats)
    held = [(b, i, f) for i, (f, b) in enumerate(sizes.items()) if b is not None]
    if not held:
        raise ValueError(f"none of the formats {list(formats)} can hold a weight of shape {tuple(w.shape)}")
    advice = Advice(use, tuple(w.shape), str(w.dtype).removeprefix("torch."), int(torch.count_nonzero(w)),
                    sizes, min(held)[2])
    if use == "matmul":
        batch = _positive_int("batch", batch)
        warmup, repeats = _positive_int("warmup", warmup, 0), _positive_int("repeats", repeats)
        names = list_matmul_candidates() if candidates is None else list(candidates)
        unknown = [n for n in names if n not in _CANDIDATES]
        if unknown:
            raise ValueError(f"unknown matmul candidates {unknown}; registered: {', '.join(_CANDIDATES)}")
        times, skipped = _measure(w.reshape(matrix_shape(tuple(w.shape))), batch, names, warmup, repeats, seed)
        advice.batch, advice.repeats, advice.threads = batch, repeats, torch.get_num_threads()
        advice.times, advice.skipped = times, skipped
        advice.fastest = min(times, key=times.get) if times else None
    return advice
