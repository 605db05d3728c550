"""Prune one weight matrix from its input statistics: magnitude, Wanda, SparseGPT.

A Linear ``y = x W^T`` sees calibration inputs ``X`` (tokens x inputs). The statistics
are ``H = X^T X`` (the Hessian of the layer's squared reconstruction error, up to a
factor 2) or only its diagonal, the squared input norms ``||X_j||^2``.

* ``magnitude``: ``|W|`` per output row.
* ``wanda``: ``|W_ij| * ||X_j||_2`` per output row (Sun et al. 2023, "A Simple and
  Effective Pruning Approach for Large Language Models"); weights unchanged.
* ``sparsegpt``: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot". Columns are processed left to right in blocks; a pruned
  weight's error is spread over the not yet processed columns of its row through the
  inverse Hessian (the optimal brain surgeon update), in lazy batches (one matrix
  product per block). The mask is chosen adaptively per block from
  ``w^2 / [H^-1]_jj^2`` of the already updated weights (every ``m`` columns for N:M).
  ``H`` is dampened by ``damp * mean(diag H)``; inputs never active in the calibration
  (``H_jj = 0``) are pruned.

The reconstruction error ``||W X^T - W' X^T||_F / ||W X^T||_F`` is computed from ``H``:
``sqrt(tr(D H D^T) / tr(W H W^T))`` with ``D = W - W'``.
"""

from __future__ import annotations

import math
import warnings

import torch

from ...core import checks
from ...core.patterns import NM, Pattern, PatternError, Row, Unstructured, parse_pattern
from ...core.selection import top_k_stable
from .masks import keep_mask, pruned_count

Tensor = torch.Tensor

__all__ = ["HessianError", "live_hessian", "magnitude_prune", "obs_sweep", "reconstruction_error", "refit",
           "sparsegpt_prune", "wanda_prune", "wanda_scores"]

DAMP_RETRIES = 4  # dampening x10 each retry before giving up on a Hessian


class HessianError(ValueError):
    """A layer's Hessian stays not positive definite after dampening (SparseGPT cannot invert it)."""


def _check_weight(weight: Tensor, name: str | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{name or 'weight'}: expected a 2-D weight (outputs x inputs), got shape "
                         f"{tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name or 'weight'}: the weight holds NaN or Inf")


def _apply(weight: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def magnitude_prune(weight: Tensor, sparsity: float, pattern: Pattern | str = "unstructured", *,
                    per_row: bool = True, name: str | None = None) -> tuple[Tensor, Tensor]:
    """``(pruned weight, keep mask)`` by ``|W|``, per output row by default."""
    _check_weight(weight, name)
    keep = keep_mask(weight.detach().abs().float(), pattern, sparsity, per_row=per_row, name=name)
    return _apply(weight.detach(), keep), keep


def wanda_scores(weight: Tensor, input_sq_norms: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2``: a weight's magnitude times its input's norm over the calibration tokens."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"input norms have shape {tuple(input_sq_norms.shape)}, the weight {tuple(weight.shape)} "
                         f"needs ({weight.shape[1]},)")
    return weight.detach().abs().float() * input_sq_norms.float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_prune(weight: Tensor, input_sq_norms: Tensor, sparsity: float, pattern: Pattern | str = "unstructured",
                *, per_row: bool = True, name: str | None = None) -> tuple[Tensor, Tensor]:
    """``(pruned weight, keep mask)`` by Wanda's score, per output row by default (no weight update)."""
    _check_weight(weight, name)
    keep = keep_mask(wanda_scores(weight, input_sq_norms), pattern, sparsity, per_row=per_row, name=name)
    return _apply(weight.detach(), keep), keep


def reconstruction_error(weight: Tensor, pruned: Tensor, hessian: Tensor) -> float:
    """``||W X^T - W' X^T|| / ||W X^T||`` from ``H = X^T X`` (0 when the layer's output is 0)."""
    H = hessian.to(torch.float64)
    W, D = weight.detach().to(torch.float64), (weight.detach() - pruned.detach()).to(torch.float64)
    num = float(((D @ H) * D).sum())
    den = float(((W @ H) * W).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def live_hessian(hessian: Tensor) -> tuple[Tensor, Tensor]:
    """``(H, dead)``: a float64 copy of ``hessian`` whose dead inputs (never active in the calibration,
    ``H_jj = 0``) have ``H_jj = 1``, so that it can be inverted, and the boolean vector of those inputs
    (their weights cannot matter and are pruned)."""
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def _inverse_hessian_factor(H: Tensor, damp: float, name: str | None) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U``), ``lambda = damp * mean(diag H)``;
    the dampening grows x10 up to DAMP_RETRIES times when a factorization fails (a warning says so)."""
    mean = float(torch.diagonal(H).mean())
    for attempt in range(DAMP_RETRIES + 1):
        lam = damp * (10 ** attempt) * mean
        damped = H.clone()
        damped.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            del L
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    warnings.warn(f"{name or 'layer'}: the Hessian was not positive definite with dampening "
                                  f"{damp:g} x mean(diag H); used {damp * 10 ** attempt:g}", RuntimeWarning,
                                  stacklevel=3)
                return U
    raise HessianError(
        f"{name or 'layer'}: the Hessian of the calibration inputs is not positive definite even with dampening "
        f"{damp * 10 ** DAMP_RETRIES:g} x mean(diag H) (= {damp * 10 ** DAMP_RETRIES * mean:g}); its inputs are "
        f"degenerate (NaN/Inf or too few calibration tokens). Give more calibration data, a larger damp=, or "
        f"method='wanda' (which needs no inverse)")


def obs_sweep(W: Tensor, U: Tensor, block_size: int, column, *, chunk_rows: int | None = None) -> Tensor:
    """The left-to-right sweep shared by SparseGPT and GPTQ (Frantar et al. 2023): ``W`` (rows x cols,
    float32) is overwritten by its pruned / quantized version and returned.

    Column ``j`` is replaced by ``q = column(part, i1, W1, d, i)`` (``j = i1 + i``; ``W1``: the
    rows ``part`` (a slice) of the current block's columns, already updated by every earlier
    column; ``d``: the diagonal of the block's part of ``U``), and the error
    ``(w - q) / U_jj`` is spread over the columns not yet processed through row ``j`` of
    ``U``, the upper Cholesky factor of the dampened inverse Hessian
    (:func:`_inverse_hessian_factor`): the optimal brain surgeon update. Within a block of
    ``block_size`` columns the updates are rank-1; the later blocks get them in one product
    per block (lazy batch updates). ``chunk_rows``: sweep a block this many rows at a time
    (rows are independent when ``column`` decides each row alone, as GPTQ's rounding does;
    SparseGPT's per-block mask needs all rows: ``None``).
    """
    rows, cols = W.shape
    step = rows if chunk_rows is None else max(1, int(chunk_rows))
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        E1 = torch.empty(rows, i2 - i1, dtype=W.dtype)
        for r in range(0, rows, step):
            part = slice(r, min(r + step, rows))
            W1 = W[part, i1:i2].clone()
            for i in range(i2 - i1):
                q = column(part, i1, W1, d, i)
                err = (W1[:, i] - q) / d[i]
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # (rows, 1) * (1, count - i)
                W1[:, i] = q
                E1[part, i] = err
            W[part, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # (rows, count) @ (count, cols - i2)
    return W


def sparsegpt_prune(weight: Tensor, hessian: Tensor, sparsity: float, pattern: Pattern | str = "unstructured", *,
                    block_size: int = 128, damp: float = 0.01, per_row: bool = False,
                    segments: list[int] | None = None, name: str | None = None) -> tuple[Tensor, Tensor]:
    """``(pruned and updated weight, keep mask)`` by SparseGPT (see the module docstring).

    ``pattern``: ``"unstructured"`` (the mask of each block of ``block_size`` columns
    prunes the block's share of the layer's ``round(sparsity * size)`` weights, or with
    ``per_row`` or ``pattern="per_row"`` its share of every row's ``round(sparsity * columns)``;
    the totals are exact)
    or ``"N:M"`` (``n`` of every ``m`` columns
    kept in each row, chosen when the group's first column is reached). ``hessian``:
    ``X^T X`` of the calibration inputs (inputs x inputs, any positive scale). ``segments``:
    row counts of layers stacked into ``weight`` that share the inputs (and so the Hessian):
    each keeps its own per-block budget, so the result equals separate calls.
    """
    _check_weight(weight, name)
    pattern = parse_pattern(pattern)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"{name or 'weight'}: Hessian shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if not torch.isfinite(hessian).all():
        raise ValueError(f"{name or 'weight'}: the Hessian holds NaN or Inf (NaN/Inf calibration activations)")
    if not isinstance(pattern, (Unstructured, Row, NM)):
        raise PatternError(f"sparsegpt supports the patterns unstructured, per_row and N:M, got {pattern.name!r}")
    per_row = per_row or isinstance(pattern, Row)
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a number > 0, got {damp!r}")
    sparsity = checks.sparsity("sparsity", sparsity)
    nm = pattern if isinstance(pattern, NM) else None
    if nm is not None:
        nm.check(weight.shape, name)
        if abs(sparsity - (1 - nm.max_density)) > 1e-9:
            raise PatternError(f"{name or 'weight'}: sparsegpt with {nm.name} prunes exactly "
                               f"{1 - nm.max_density:g} of the weights; got sparsity {sparsity:g}")
        block_size = max(nm.m, block_size // nm.m * nm.m)  # a group never straddles two blocks

    segments = [rows] if segments is None else [int(r) for r in segments]
    if sum(segments) != rows or min(segments) < 1:
        raise ValueError(f"segments {segments} must be positive row counts adding up to {rows}")
    W = weight.detach().to(torch.float32).clone()
    H, dead = live_hessian(hessian)
    W[:, dead] = 0.0  # an input never active in the calibration: the weight cannot matter there
    U = _inverse_hessian_factor(H, damp, name).to(torch.float32)
    del H
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    zero = torch.zeros((), dtype=W.dtype)

    def column(part: slice, i1: int, W1: Tensor, d: Tensor, i: int) -> Tensor:  # part: every row
        count = W1.shape[1]
        if nm is None and i == 0:  # the block's mask, from the updated weights of its first column
            saliency = W1 ** 2 / d.unsqueeze(0) ** 2
            if per_row:  # this block's share of each row's budget: the rows end at round(s * cols) exactly
                share = pruned_count(sparsity, i1 + count) - pruned_count(sparsity, i1)
                pruned[:, i1:i1 + count] = ~keep_mask(saliency, "unstructured", share / count, per_row=True)
            else:  # this block's share of each layer's budget: the layer ends at round(s * size) exactly
                parts = [top_k_stable((-part).reshape(-1), pruned_count(sparsity, part.shape[0] * (i1 + count))
                                      - pruned_count(sparsity, part.shape[0] * i1)).reshape(part.shape)
                         for part in saliency.split(segments)]
                pruned[:, i1:i1 + count] = torch.cat(parts)
        if nm is not None and i % nm.m == 0:  # the group's mask when its first column is reached
            saliency = W1[:, i:i + nm.m] ** 2 / d[i:i + nm.m].unsqueeze(0) ** 2
            lowest = torch.topk(saliency, nm.m - nm.n, dim=1, largest=False).indices
            pruned[:, i1 + i:i1 + i + nm.m].scatter_(1, lowest, True)
        return torch.where(pruned[:, i1 + i], zero, W1[:, i])

    W = obs_sweep(W, U, block_size, column)
    keep = ~pruned & ~dead.unsqueeze(0)
    W = torch.where(keep, W, torch.zeros((), dtype=W.dtype))
    return W.to(weight.dtype), keep


def refit(weight: Tensor, keep: Tensor, hessian: Tensor, *, damp: float = 0.01, start: Tensor | None = None,
          iterations: int = 25, tolerance: float = 1e-4, name: str | None = None) -> Tensor:
    """The kept weights re-fitted to the least-squares optimum: per row, ``argmin (w - w')^T H (w - w')``
    with ``w'`` zero where ``keep`` is False, i.e. ``w'_K = (H_KK + lambda I)^-1 (H w)_K``
    (``lambda = damp * mean(diag H)``).

    The optimum for a fixed mask, which SparseGPT's left-to-right updates approach (each
    compensates only on columns not yet processed). Solved for every row at once by
    Jacobi-preconditioned conjugate gradients on the masked normal equations (one
    ``rows x cols`` times ``cols x cols`` product per iteration; no per-row ``k x k``
    system is formed), from ``start`` (e.g. SparseGPT's weights; default the masked
    weights), for at most ``iterations`` steps or until every row's residual is below
    ``tolerance`` times its right-hand side.
    """
    _check_weight(weight, name)
    _, cols = weight.shape
    if keep.shape != weight.shape or hessian.shape != (cols, cols):
        raise ValueError(f"{name or 'weight'}: keep {tuple(keep.shape)} and Hessian {tuple(hessian.shape)} do not "
                         f"fit the weight {tuple(weight.shape)}")
    H = hessian.detach().to(torch.float64)
    H = H + damp * float(torch.diagonal(H).mean()) * torch.eye(cols, dtype=H.dtype)
    K = keep.to(torch.float64)
    W = weight.detach().to(torch.float64)
    b = (W @ H) * K
    x = (W * K if start is None else start.detach().to(torch.float64) * K)
    precond = K / torch.diagonal(H).clamp_min(1e-30).unsqueeze(0)
    r = b - (x @ H) * K
    z = precond * r
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    norm_b = b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    for _ in range(iterations):
        if bool((r.norm(dim=1, keepdim=True) <= tolerance * norm_b).all()):
            break
        Ap = (p @ H) * K
        alpha = rz / (p * Ap).sum(1, keepdim=True).clamp_min(1e-300)
        x = x + alpha * p
        r = r - alpha * Ap
        z = precond * r
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    if not torch.isfinite(x).all():
        raise HessianError(f"{name or 'layer'}: the refit diverged (NaN/Inf); use a larger damp=")
    return (x * K).to(weight.dtype)
