"""The sparse kernels worth considering for a layer's weight, packed.

On the CPU: :func:`sparsenn.backend.kernels.candidates` (both CSR layouts, ``nm`` for an
N:M weight, ``bsr`` for block-sparse ones), plus the block shape a recorded ``blockHxW``
mask pattern names; restricted to ``kernels`` when given. On CUDA: a 2:4 weight gets
``torch.sparse.to_sparse_semi_structured`` (``"semi_structured"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import kernels as K
from .layers import SEMI_STRUCTURED


def kernel_key(kernel: str, options: dict[str, int]) -> str:
    """How a packed weight is named in a layer: the kernel, with the block for BSR (``"bsr4x1"``)."""
    return f"bsr{options['h']}x{options['w']}" if kernel == "bsr" else kernel


WEIGHTS = ("fp32", "bf16", "int8")  # the precisions of sparsenn.convert(weights=...)


def candidate_kernels(w2d: torch.Tensor, kernels: Sequence[str] | None, pattern: str | None,
                      weights: str = "fp32", conv: tuple[int, int] | None = None) -> list[tuple[str, dict[str, int]]]:
    """``[(kernel, options)]`` that fit the ``(out, in)`` weight ``w2d`` on its device.

    ``weights="fp32"``: the float32 kernels (CSR, N:M, BSR, bitmask), and for a convolution
    that can run direct (``conv=(kh, kw)``) the ``conv`` kernel (no im2col). ``"bf16"`` /
    ``"int8"``: the bitmask kernel with values of that precision, and the dense kernel of
    that precision (for layers that are not sparse, e.g. a language model's head).
    """
    if weights != "fp32":
        if w2d.device.type != "cpu":
            return []
        cands = [(f"bitmask_{weights}", {}), (f"dense_{weights}", {})]
        return [c for c in cands if kernels is None or c[0] in kernels]
    if w2d.device.type == "cuda":
        found = K.detect_nm(w2d.float().cpu())
        if found is not None and found != (4, 8):  # every other detected pattern is also 2:4
            return [(SEMI_STRUCTURED, {})]
        return []
    cands = K.candidates(w2d) + [("bitmask", {})]
    if conv is not None:
        cands.append(("conv", {"kh": conv[0], "kw": conv[1]}))
    if pattern and pattern.startswith("block"):  # a recorded block pattern: make sure it is timed
        try:
            h, w = (int(v) for v in pattern[5:].split("x"))
            kh, kw = K.bsr.kernel_block(h, w)
            if ("bsr", {"h": kh, "w": kw}) not in cands and K.bsr.check_blocks(w2d.numpy(), kh, kw) is None:
                cands.append(("bsr", {"h": kh, "w": kw}))
        except ValueError:
            pass
    if kernels is not None:
        cands = [c for c in cands if c[0] in kernels]
    return cands


@dataclass
class PackedCandidates:
    """A layer's candidates: ``packed[key]`` (CPU kernels), ``kinds`` (every key, 2:4 included), failures."""

    packed: dict[str, K.Packed] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def pack_candidates(w2d: torch.Tensor, cands: list[tuple[str, dict[str, int]]]) -> PackedCandidates:
    """Pack ``w2d`` for every candidate; a kernel that cannot hold it is noted and skipped."""
    out = PackedCandidates()
    for kernel, options in cands:
        if kernel == SEMI_STRUCTURED:
            continue
        try:
            p = K.pack(w2d, kernel, **options)
        except (ValueError, TypeError) as e:
            out.notes.append(f"{kernel}: {e}")
            continue
        out.packed[kernel_key(kernel, options)] = p
    out.kinds = list(out.packed) + [SEMI_STRUCTURED for c in cands if c[0] == SEMI_STRUCTURED]
    return out
