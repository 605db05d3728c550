"""JIT-compiled CPU kernels for ``y = x W^T + b`` with a sparse weight and dense activations.

Kernels (numba, compiled on first use and cached; see :mod:`._jit`):

=============  ==============================================================  ============
name           layout                                                          applies to
=============  ==============================================================  ============
``csr``        CSR, 16-bit column indices, rows in blocks of 128               any weight
``csr_panel``  CSR in 256-column panels, 8-bit column indices                  any weight
``nm``         N:M slots: values + 8-bit offsets in the group, no pointers     N:M weights
``bsr``        ``h x w`` dense blocks, one index per block                     block sparse
``bitmask``    a bit per column + packed float32 values (also ``_bf16``,       any weight
               ``_int8`` with per-row scales: ``bitmask_bf16``, ``bitmask_int8``)
``dense_int8`` every entry, int8 with per-row scales (also ``dense_bf16``)     any weight
``conv``       CSR of a convolution's taps (int32), run without im2col         Conv2d
               (:mod:`.conv`, Elsen et al. 2020); options ``kh``, ``kw``       (groups=1)
=============  ==============================================================  ============

Each packs a float32 ``(out, in)`` matrix into numpy arrays once (:func:`pack`) and
multiplies with batches of rows (:meth:`Packed.matmul`): a sparse matrix-vector product
for 1-3 rows, otherwise batch tiles of 16 or 64 rows accumulated in vector registers.
Parallel over output row blocks (and batch tiles) on ``torch.get_num_threads()``
threads. :func:`candidates` lists the kernels (with options) that fit a weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...core.registry import Registry
from . import _activations, bitmask, bsr, conv, csr, nm
from ._jit import sync_threads


@dataclass(frozen=True)
class Kernel:
    """A registered kernel: ``pack(weight, **options) -> (arrays, meta)``, ``matmul``, ``unpack``;
    ``check(arrays, meta)`` says why arrays not made by ``pack`` here are unsafe for ``matmul``
    (``None`` if they are what ``pack`` makes; a kernel without it cannot be loaded from a file)."""

    name: str
    pack: Callable[..., tuple[dict[str, np.ndarray], dict[str, int]]]
    matmul: Callable[[dict, dict, np.ndarray, np.ndarray, np.ndarray], None]
    unpack: Callable[[dict, dict], np.ndarray]
    describe: Callable[[dict[str, int]], str]
    check: Callable[[dict, dict], str | None] | None = None
    #: ``row(arrays, meta, bias) -> f(x, y)``: a bound one-row product (``x (in,)``, ``y (out,)``), if the kernel has one
    row: Callable[[dict, dict, np.ndarray], Callable[[np.ndarray, np.ndarray], None]] | None = None
    #: whether ``matmul`` takes ``act=`` (a code of ``_activations.ACTIVATIONS``) and applies it to each block of
    #: outputs as it writes them (:mod:`._activations`)
    activations: bool = False


KERNELS: Registry[Kernel] = Registry("kernel")
KERNELS.register("csr", Kernel("csr", lambda w: csr.pack(w), csr.matmul, csr.unpack,
                               lambda m: "CSR, uint16 column indices", csr.check_packed, activations=True))
KERNELS.register("csr_panel", Kernel("csr_panel", lambda w: csr.pack(w, csr.PANEL), csr.matmul, csr.unpack,
                                     lambda m: f"CSR in {m['panel']}-column panels, uint8 column indices",
                                     csr.check_packed, activations=True))
KERNELS.register("nm", Kernel("nm", nm.pack, nm.matmul, nm.unpack,
                              lambda m: f"{m['n']}:{m['m']} slots, uint8 offsets", nm.check_packed,
                              activations=True))
KERNELS.register("bsr", Kernel("bsr", bsr.pack, bsr.matmul, bsr.unpack,
                               lambda m: f"BSR {m['h']}x{m['w']} blocks", bsr.check_packed))
for _name, _values, _dense in (("bitmask", "float32", False), ("bitmask_bf16", "bfloat16", False),
                               ("bitmask_int8", "int8", False), ("dense_bf16", "bfloat16", True),
                               ("dense_int8", "int8", True)):
    KERNELS.register(_name, Kernel(_name, lambda w, _v=_values, _d=_dense: bitmask.pack(w, _v, _d), bitmask.matmul,
                                   bitmask.unpack, bitmask.describe, bitmask.check_packed, bitmask.row_product))
KERNELS.register("conv", Kernel("conv", conv.pack_matrix, conv.matmul_matrix, conv.unpack_matrix,
                                conv.describe_matrix, conv.check_matrix))
#: kernels whose values are rounded (bfloat16) or quantized (int8): chosen only with ``weights=``
QUANTIZED = {"bitmask_bf16": "bf16", "bitmask_int8": "int8", "dense_bf16": "bf16", "dense_int8": "int8"}


def list_kernels() -> list[str]:
    """Registered kernel names (sorted)."""
    return KERNELS.names()


def _matrix(weight: Any) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        if weight.dim() < 2:
            raise ValueError(f"weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
        if weight.dtype != torch.float32:
            raise TypeError(f"the CPU kernels take float32 weights, got {weight.dtype}")
        weight = weight.detach().cpu().reshape(weight.shape[0], -1).numpy()
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D (out, in) matrix, got shape {w.shape}")
    if w.dtype != np.float32:
        raise TypeError(f"the CPU kernels take float32 weights, got {w.dtype}")
    return np.ascontiguousarray(w)


@dataclass
class Packed:
    """A weight packed for one kernel: ``arrays`` (numpy) and ``meta`` (ints, incl. ``out``/``in``)."""

    kernel: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, int]
    _zeros: np.ndarray | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays (what the kernel reads per product)."""
        return sum(a.nbytes for a in self.arrays.values())

    def describe(self) -> str:
        return KERNELS.get(self.kernel).describe(self.meta)

    def problem(self) -> str | None:
        """Why these arrays are unsafe for the kernel to read (``None``: they are a layout its
        ``pack`` makes). Packs made here need no check; arrays from a file or a
        ``state_dict`` do, before the first :meth:`matmul`."""
        check = KERNELS.get(self.kernel).check
        if check is None:
            return f"kernel {self.kernel!r} registers no check of its arrays, so they cannot be trusted"
        return check(self.arrays, self.meta)

    def to_dense(self) -> np.ndarray:
        return KERNELS.get(self.kernel).unpack(self.arrays, self.meta)

    def matmul(self, x: np.ndarray, bias: np.ndarray | None = None, out: np.ndarray | None = None,
               activation: str | None = None) -> np.ndarray:
        """``activation(x @ W.T + bias)`` for float32 ``x (B, in)``; ``out`` (C-contiguous ``(B, out)``) is
        written if given. ``activation``: ``None`` or a name of :data:`._activations.ACTIVATIONS`
        (``"gelu"``), applied in the kernel's epilogue where it has one, else in a pass after it."""
        act = _activations.code(activation)
        rows, cols = self.meta["out"], self.meta["in"]
        if x.ndim != 2 or x.shape[1] != cols:
            raise ValueError(f"x must have shape (batch, {cols}), got {x.shape}")
        if x.dtype != np.float32:
            raise TypeError(f"x must be float32, got {x.dtype}")
        if bias is None:
            if self._zeros is None:
                self._zeros = np.zeros(rows, dtype=np.float32)
            bias = self._zeros
        if out is None:
            out = np.empty((x.shape[0], rows), dtype=np.float32)
        spec = KERNELS.get(self.kernel)
        if act and spec.activations:
            spec.matmul(self.arrays, self.meta, np.ascontiguousarray(x), bias, out, act)
        else:
            spec.matmul(self.arrays, self.meta, np.ascontiguousarray(x), bias, out)
            if act:
                _activations.activate_rows(out, act)
        return out


def pack(weight: Any, kernel: str, **options: int) -> Packed:
    """Pack a float32 weight (a tensor, viewed as ``(shape[0], rest)``, or a 2-D array) for ``kernel``.

    Options: ``nm`` takes ``n`` and ``m``; ``bsr`` takes ``h`` and ``w``. A weight the
    kernel cannot hold raises ValueError saying why.
    """
    spec = KERNELS.get(kernel)
    arrays, meta = spec.pack(_matrix(weight), **options)
    return Packed(spec.name, arrays, meta)


def linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, W, bias)`` through ``packed`` (float32 CPU tensors, any leading dims),
    followed by ``activation`` (``None`` or ``"gelu"``, see :meth:`Packed.matmul`)."""
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], packed.meta["out"], dtype=torch.float32)
    packed.matmul(x2.numpy(), None if bias is None else bias.detach().contiguous().numpy(), y.numpy(), activation)
    return y.reshape(*lead, packed.meta["out"])


# ------------------------------------------------------------------ which kernels fit a weight

NM_PATTERNS = ((1, 8), (1, 4), (2, 8), (1, 2), (2, 4), (4, 8))  # sparsest first; smaller m first
BLOCKS = tuple((h, w) for h in bsr.HEIGHTS for w in (1, 2, 4, 8, 16) if h * w > 1)
MIN_BLOCK_FILL = 0.8
MIN_NM_FILL = 0.75


def detect_nm(weight: Any) -> tuple[int, int] | None:
    """The sparsest of :data:`NM_PATTERNS` that ``weight`` obeys along its rows (``None`` if none)."""
    w = _matrix(weight)
    if not w.size or not np.count_nonzero(w):
        return None
    return next(((n, m) for n, m in NM_PATTERNS if nm.check_nm(w, n, m) is None), None)


def detect_blocks(weight: Any, limit: int = 2) -> list[tuple[int, int, float]]:
    """Up to ``limit`` ``(h, w, fill)`` block shapes for :mod:`.bsr`, best first.

    Shapes from :data:`BLOCKS` that tile the matrix with ``fill`` (nonzeros / stored
    block entries) >= MIN_BLOCK_FILL (0.8), ordered by fill, then by block area (larger first).
    """
    w = _matrix(weight)
    if not w.size or not np.count_nonzero(w):
        return []
    found, empty = [], []
    for h, bw in sorted(BLOCKS, key=lambda s: s[0] * s[1]):
        # Fill only falls as blocks grow: a kept h x bw block holds at least one kept block of any
        # shape dividing it. So a shape with a too-empty (or non-tiling) divisor is skipped unmeasured;
        # on an unstructured weight that is every shape once 1x2 and 2x1 fail (2.4 s -> 0.2 s on ResNet-18).
        if any(h % eh == 0 and bw % ew == 0 for eh, ew in empty):
            continue
        if bsr.check_blocks(w, h, bw) is None:
            fill = bsr.block_fill(w, h, bw)
            if fill >= MIN_BLOCK_FILL:
                found.append((h, bw, fill))
                continue
        empty.append((h, bw))
    found.sort(key=lambda t: (-round(t[2], 6), -t[0] * t[1], -t[0]))
    return found[:limit]


def candidates(weight: Any, *, max_blocks: int = 2) -> list[tuple[str, dict[str, int]]]:
    """``[(kernel, options)]`` worth timing for ``weight``: CSR both ways; ``nm`` if the weight
    is N:M (:func:`detect_nm`) with at least ``MIN_NM_FILL`` (75%) of the slots nonzero (a
    90%-sparse random weight may happen to be 4:8, but the slots would be mostly padding);
    ``bsr`` for its best block shapes (:func:`detect_blocks`)."""
    w = _matrix(weight)
    out: list[tuple[str, dict[str, int]]] = [("csr", {}), ("csr_panel", {})]
    found = detect_nm(w)
    if found is not None and np.count_nonzero(w) >= MIN_NM_FILL * w.size * found[0] / found[1]:
        out.append(("nm", {"n": found[0], "m": found[1]}))
    out += [("bsr", {"h": h, "w": bw}) for h, bw, _ in detect_blocks(w, max_blocks)]
    return out


def _register_with_advisor() -> None:
    """Offer the kernels to :func:`sparsenn.backend.formats.advise` (``use="matmul"``) as ``sparsenn_<kernel>``."""
    try:
        from ..formats import list_matmul_candidates, register_matmul_candidate
    except ImportError:  # the formats package is optional here
        return

    def prepare(kernel: str) -> Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        def make(weight: torch.Tensor):
            options: dict[str, int] = {}
            if kernel == "nm":
                found = detect_nm(weight)
                if found is None:
                    raise ValueError("the weight is not N:M sparse for any of " + str(NM_PATTERNS))
                options = {"n": found[0], "m": found[1]}
            elif kernel == "bsr":
                blocks = detect_blocks(weight, 1)
                if not blocks:
                    raise ValueError(f"no block shape fills at least {MIN_BLOCK_FILL:.0%} of its blocks")
                options = {"h": blocks[0][0], "w": blocks[0][1]}
            packed = pack(weight, kernel, **options)
            return lambda x: linear(x, packed)

        return make

    registered = set(list_matmul_candidates())
    for name in list_kernels():
        if name != "conv" and f"sparsenn_{name}" not in registered:  # conv: a convolution's, not a matmul
            register_matmul_candidate(f"sparsenn_{name}", prepare(name))


_register_with_advisor()

__all__ = ["BLOCKS", "KERNELS", "NM_PATTERNS", "QUANTIZED", "Kernel", "Packed", "candidates", "detect_blocks", "detect_nm",
           "linear", "list_kernels", "pack", "sync_threads"]
