"""int8 weights by GPTQ with a fixed sparsity mask, from a Linear's input statistics ``H = X^T X``.

Frantar, Ashkboos, Hoefler & Alistarh 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers". Every row gets a symmetric int8 grid whose step is
fixed up front from the *original* weight, ``s_i = max_j |w_ij| / 127`` (1 for an all-zero
row). The columns are processed left to right (:func:`.solvers.obs_sweep`, the loop
SparseGPT uses): each column is rounded to its grid, ``clamp(round(w / s), -127, 127) * s``,
and its rounding error is spread over the columns not yet processed through the upper
Cholesky factor of the dampened inverse Hessian, so that later columns compensate for it.
That minimizes ``||W X^T - Q X^T||`` far better than rounding every weight to nearest
(``rtn``), which ignores the inputs.

Sparsity is kept as in SparseGPT's joint sparsification and quantization (Frantar &
Alistarh 2023): the mask is fixed, the positions that are zero in the given weight are
"quantized" to 0 (their updated value's error is propagated like any other column's), so
the result has zeros wherever the weight had them. A kept weight may round to ``q = 0``, as
it may with round to nearest. Inputs never active in the calibration (``H_jj = 0``) cannot
be measured: their weights are rounded to nearest and nothing is propagated from or to
them (their row and column of ``H`` are the identity's).
"""

from __future__ import annotations

import math

import torch

from .solvers import _check_weight, _inverse_hessian_factor, live_hessian, obs_sweep

Tensor = torch.Tensor

__all__ = ["INT8_MAX", "gptq_int8", "off_grid_rows", "round_to_grid", "row_scales", "rtn_int8"]

INT8_MAX = 127  # symmetric grid: q in [-127, 127]
CHUNK_FLOATS = 1 << 15  # rows x block_size floats of one row chunk of the sweep (128 KB)


def row_scales(weight: Tensor) -> Tensor:
    """float32 ``(rows,)``: ``max_j |w_ij| / 127``, 1 for an all-zero row (the step of convert's int8)."""
    amax = weight.detach().to(torch.float32).abs().amax(dim=1) if weight.shape[1] else \
        torch.zeros(weight.shape[0], dtype=torch.float32)
    scale = amax / INT8_MAX
    return torch.where(scale > 0, scale, torch.ones((), dtype=scale.dtype))


def round_to_grid(w: Tensor, scale: Tensor) -> Tensor:
    """``clamp(round(w / s), -127, 127) * s`` with ``s`` per row of ``w`` (``scale`` broadcast on its
    last dimension: a column ``w`` of shape ``(rows,)`` or a matrix ``(rows, cols)`` with ``scale[:, None]``)."""
    return torch.clamp(torch.round(w / scale), -INT8_MAX, INT8_MAX) * scale


def rtn_int8(weight: Tensor, *, name: str | None = None) -> tuple[Tensor, Tensor]:
    """``(weight on its grid (float32), scale)`` by round to nearest (the baseline; zeros stay zero)."""
    _check_weight(weight, name)
    W = weight.detach().to(torch.float32)
    scale = row_scales(W)
    return round_to_grid(W, scale.unsqueeze(1)), scale


def gptq_int8(weight: Tensor, hessian: Tensor, *, damp: float = 0.01, block_size: int = 128,
              name: str | None = None) -> tuple[Tensor, Tensor]:
    """``(weight on its grid (float32, rows x cols), scale (float32, rows))`` by GPTQ with the weight's
    zeros as a fixed mask (module docstring).

    Every entry of the result is exactly ``q * scale[i]`` in float32 with ``q`` an integer in
    ``[-127, 127]``, and 0 wherever ``weight`` is 0. ``hessian``: ``X^T X`` of the calibration
    inputs (inputs x inputs, any positive scale), dampened by ``damp * mean(diag H)``.
    ``block_size``: columns per lazy batch update (the result does not depend on it beyond
    float rounding).
    """
    _check_weight(weight, name)
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"{name or 'weight'}: Hessian shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if not torch.isfinite(hessian).all():
        raise ValueError(f"{name or 'weight'}: the Hessian holds NaN or Inf (NaN/Inf calibration activations)")
    if not (isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1):
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a number > 0, got {damp!r}")
    W = weight.detach().to(torch.float32).clone()
    keep = W != 0
    scale = row_scales(W)
    H, _ = live_hessian(hessian)
    U = _inverse_hessian_factor(H, damp, name).to(torch.float32)
    del H
    zero = torch.zeros((), dtype=W.dtype)

    def column(part: slice, i1: int, W1: Tensor, d: Tensor, i: int) -> Tensor:
        return torch.where(keep[part, i1 + i], round_to_grid(W1[:, i], scale[part]), zero)

    # rows are independent: each block is swept a chunk of rows at a time, small enough to stay in the
    # cache (the rank-1 updates of a tall matrix, the LM head's 49152 rows, otherwise stream it once per
    # column) and below torch's parallel grain size (32768 elements), so each per-column step runs on one
    # thread (on a loaded machine, threads contending over such small steps made them 10-30x slower);
    # the lazy update of the later columns stays one product over all rows per block
    obs_sweep(W, U, block_size, column, chunk_rows=max(1, CHUNK_FLOATS // block_size))
    return W, scale


def off_grid_rows(weight: Tensor, scale: Tensor, tolerance: float = 1e-4) -> int:
    """How many rows of ``weight`` (as float32) are not ``q * scale`` with integers ``|q| <= 127`` (each
    ``w / s`` within ``tolerance`` of such an integer): 0 for the output of :func:`gptq_int8`, stored in
    float32 or float64. Every row that is on its grid is recovered by ``sn.convert(weights="int8")``."""
    x = weight.detach().to(torch.float32) / scale.to(torch.float32).unsqueeze(1)
    bad = ((x - torch.round(x)).abs() > tolerance) | (x.abs() > INT8_MAX + tolerance)
    return int(bad.any(dim=1).sum())
