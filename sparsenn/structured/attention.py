"""Attention heads: pruning whole heads of (grouped-query) attention (``transformers`` configs: :mod:`.config`).

The channel graph (:mod:`.graph`) stops at the ``view`` that splits a projection's output
into heads, so heads are handled here, per attention module with ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` (``nn.Linear``) and ``head_dim`` (LLaMA, Mistral, Qwen, SmolLM and
other ``transformers`` decoders). With grouped-query attention (Ainslie et al. 2023) each
key-value head serves ``num_key_value_groups`` query heads. Two ways keep the structure:

- ``"query"``: the same number of query heads is removed from every key-value group
  (``q_proj`` rows and ``o_proj`` columns; ``num_key_value_groups`` falls); the key-value
  cache is unchanged;
- ``"kv_groups"``: whole key-value groups go (their key and value heads and all their
  query heads); the cache shrinks too.

A removed head's output is multiplied by its (removed) ``o_proj`` columns, so masking those
columns to zero gives exactly the shrunk model's output. Head importance is the norm of
the head's ``q_proj`` rows and ``o_proj`` columns (with ``"kv_groups"`` also ``k_proj``,
``v_proj``), each projection normalised by its mean, as for channels; with ``"taylor"``
the same members' ``|sum w * dL/dw|``; with ``"wanda"`` or ``"flap"``, activation-weighted
``o_proj`` columns. Heads are always ranked per attention module (``global_ratio`` ranks
channel groups only).
"""

from __future__ import annotations

import torch
from torch import nn

from .surgery import keep_columns, keep_rows

ATTENTION = ("query", "kv_groups", "none")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every attention module this file can shrink."""
    return [(n, m) for n, m in model.named_modules()
            if all(isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and isinstance(getattr(m, "head_dim", None), int)]


def _heads(m: nn.Module) -> tuple[int, int, int]:
    """``(query heads, key-value heads, head_dim)`` from the projections' shapes."""
    d = m.head_dim
    q, kv = m.q_proj.out_features, m.k_proj.out_features
    if q % d or kv % d or (q // d) % (kv // d) or m.v_proj.out_features != kv or m.o_proj.in_features != q:
        raise ValueError(f"projections of {type(m).__name__} do not split into heads of {d}")
    return q // d, kv // d, d


def _score(w: torch.Tensor, p: int, dim: int, d: int) -> torch.Tensor:
    """Per head: the norm of its ``d`` rows (``dim=0``) or columns (``dim=1``) of ``w``, divided by the mean."""
    w = w.detach().float()
    per = (w.abs() ** p).sum(1 - dim).reshape(-1, d).sum(1) ** (1 / p)
    return per / per.mean() if per.mean() > 0 else per


def _taylor(lin: nn.Linear, dim: int, d: int) -> torch.Tensor:
    """Per head: ``|sum of w * dL/dw|`` over its ``d`` rows (``dim=0``, with their bias) or columns of ``lin``,
    divided by the mean (Molchanov et al. 2019's first-order Taylor importance)."""
    if lin.weight.grad is None:
        raise ValueError("importance='taylor': an attention projection has no gradient (requires_grad=False?); "
                         "pass the attention module in ignore= or attention='none'")
    wg = lin.weight.detach().float() * lin.weight.grad.float()
    per = wg.sum(1 - dim)
    if dim == 0 and lin.bias is not None and lin.bias.grad is not None:
        per = per + lin.bias.detach().float() * lin.bias.grad.float()
    per = per.reshape(-1, d).sum(1).abs()
    return per / per.mean() if per.mean() > 0 else per


def head_scores(m: nn.Module, importance: str, kv_groups: bool, seed: int = 0,
                o_norms: torch.Tensor | None = None, o_vars: torch.Tensor | None = None) -> torch.Tensor:
    """Query heads' scores ``(kv, rep)`` (``kv_groups``: the groups' scores ``(kv,)``). ``"wanda"``
    with ``o_norms`` (each ``o_proj`` input column's norm over the calibration run): per head
    ``sum over its columns of ||x_col|| * sum_rows |W_o[:, col]|``; ``"flap"`` with ``o_vars`` (the
    columns' variances): ``sum over its columns of Var(x_col) * ||W_o[:, col]||^2`` (An et al. 2024);
    ``"taylor"``: ``|sum w * dL/dw|`` over the head's ``q_proj`` rows and ``o_proj`` columns (and
    ``k_proj``, ``v_proj`` rows for whole groups), from the projections' ``.grad``."""
    nq, nkv, d = _heads(m)
    stats = o_norms if importance == "wanda" else o_vars if importance == "flap" else None
    if stats is not None:
        w = m.o_proj.weight.detach().float()
        per = ((w.pow(2) if importance == "flap" else w.abs()).sum(0) * stats).reshape(nq, d).sum(1)
        q = (per / per.mean() if per.mean() > 0 else per).reshape(nkv, nq // nkv)
        return q.sum(1) if kv_groups else q
    if importance == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(nkv, generator=g) if kv_groups else torch.rand(nkv, nq // nkv, generator=g)
    if importance == "taylor":
        q = (_taylor(m.q_proj, 0, d) + _taylor(m.o_proj, 1, d)).reshape(nkv, nq // nkv)
        return q.sum(1) + _taylor(m.k_proj, 0, d) + _taylor(m.v_proj, 0, d) if kv_groups else q
    p = 2 if importance in ("l2", "filter_l2") else 1
    q = _score(m.q_proj.weight, p, 0, d) + _score(m.o_proj.weight, p, 1, d)
    q = q.reshape(nkv, nq // nkv)
    if not kv_groups:
        return q
    return q.sum(1) + _score(m.k_proj.weight, p, 0, d) + _score(m.v_proj.weight, p, 0, d)


def plan_heads(m: nn.Module, ratio: float, importance: str, mode: str, seed: int = 0,
               o_norms: torch.Tensor | None = None, o_vars: torch.Tensor | None = None) -> torch.Tensor | None:
    """Kept query heads (sorted indices, ``None``: all) of one module; ``kv_groups``: of whole groups."""
    nq, nkv, _ = _heads(m)
    rep = nq // nkv
    if mode == "kv_groups":
        keep = nkv - int(ratio * nkv)
        if keep == nkv:
            return None
        groups = torch.topk(head_scores(m, importance, True, seed, o_norms, o_vars), keep).indices.sort().values
        return (groups[:, None] * rep + torch.arange(rep)).flatten()
    keep = rep - int(ratio * rep)
    if keep == rep:
        return None
    per_group = torch.topk(head_scores(m, importance, False, seed, o_norms, o_vars), keep, dim=1).indices.sort(dim=1).values
    return (torch.arange(nkv)[:, None] * rep + per_group).flatten()


def zero_heads_kept(m: nn.Module) -> torch.Tensor | None:
    """Query heads whose ``o_proj`` columns are not all zero (``None``: all of them)."""
    nq, _, d = _heads(m)
    alive = m.o_proj.weight.detach().reshape(m.o_proj.out_features, nq, d).ne(0).any(2).any(0)
    return None if bool(alive.all()) else alive.nonzero().flatten()


def _rows(d: int, heads: torch.Tensor) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d)).flatten()


@torch.no_grad()
def shrink_heads(m: nn.Module, kept: torch.Tensor) -> None:
    """Keep query heads ``kept`` of ``m`` (whole key-value groups when every head of a group goes)."""
    nq, nkv, d = _heads(m)
    rep = nq // nkv
    groups = torch.unique(kept // rep)
    per_group = len(kept) // len(groups)
    if len(kept) % len(groups) or any(int((kept // rep == g).sum()) != per_group for g in groups):
        raise ValueError("every kept key-value group must keep the same number of query heads")
    rows = _rows(d, kept)
    keep_rows(m.q_proj, rows)
    keep_columns(m.o_proj, rows)
    if len(groups) < nkv:
        kv_rows = _rows(d, groups)
        keep_rows(m.k_proj, kv_rows)
        keep_rows(m.v_proj, kv_rows)
    if hasattr(m, "num_key_value_groups"):
        m.num_key_value_groups = per_group
    for attr, value in (("num_heads", len(kept)), ("num_key_value_heads", len(groups))):
        if hasattr(m, attr):
            setattr(m, attr, value)


__all__ = [
    "ATTENTION",
    "attention_modules",
    "head_scores",
    "plan_heads",
    "shrink_heads",
    "zero_heads_kept",
]
