"""Input-channel permutations that raise the importance an N:M mask keeps.

N:M keeps ``n`` of every ``m`` *consecutive* inputs. Which inputs share a group is an
accident of the layout: two important channels in one group compete for its ``n``
places while a group of weak ones keeps weak weights. Permuting the inputs, and the
outputs of the layer that produces them the same way, leaves the function unchanged and
lets the mask keep more. Zhang et al. 2024 ("Plug-and-Play: An Efficient Post-training
Pruning Method for Large Language Models", RIA) allocate channels to groups by
importance and refine the assignment; here: channels sorted by total importance are dealt
to the groups in a snake order (each group gets a balanced share of strong and weak
channels), then pairs of groups swap channels while that raises the kept importance
(exact for the two groups, so every accepted swap raises the total).
"""

from __future__ import annotations

import torch

__all__ = ["kept_importance", "nm_permutation"]


def kept_importance(scores: torch.Tensor, n: int, m: int) -> float:
    """Sum over rows and groups of the ``n`` largest scores of every ``m`` consecutive columns."""
    rows, cols = scores.shape
    return float(scores.reshape(rows, cols // m, m).topk(n, dim=2).values.sum())


def _group_value(block: torch.Tensor, n: int) -> torch.Tensor:
    """``block``: (..., rows, m) scores of one group's channels; the kept importance per group."""
    return block.topk(n, dim=-1).values.sum(dim=(-1, -2))


def nm_permutation(scores: torch.Tensor, n: int, m: int, *, rounds: int = 2,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation ``perm`` of the columns such that ``scores[:, perm]`` keeps at least as much
    importance under N:M as the snake allocation, and never less than the identity.

    ``rounds``: passes of pairwise swap refinement over random pairings of the groups.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns are not divisible by M={m}")
    s = scores.detach().float()
    groups = cols // m
    order = torch.argsort(s.sum(0), descending=True, stable=True)
    slots = torch.arange(cols)
    lane, rank = slots // groups, slots % groups
    group_of = torch.where(lane % 2 == 0, rank, groups - 1 - rank)  # snake: 0..G-1, G-1..0, ...
    assign = torch.empty(groups, m, dtype=torch.long)
    assign[group_of, lane] = order
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    for _ in range(rounds):
        pairing = torch.randperm(groups, generator=g)
        for a, b in pairing[: groups - groups % 2].reshape(-1, 2).tolist():
            ga, gb = assign[a], assign[b]
            both = torch.cat([ga, gb])  # 2m channels
            block = s[:, both]  # rows x 2m
            base = float(_group_value(block[:, :m], n) + _group_value(block[:, m:], n))
            # every swap of one channel of a with one of b: (m*m) candidate pairs of groups
            ia = torch.arange(m).repeat_interleave(m)
            ib = torch.arange(m).repeat(m) + m
            idx = torch.arange(2 * m).repeat(m * m, 1)
            idx[torch.arange(m * m), ia], idx[torch.arange(m * m), ib] = ib, ia
            cand = block[:, idx].permute(1, 0, 2)  # (m*m, rows, 2m)
            value = _group_value(cand[..., :m], n) + _group_value(cand[..., m:], n)
            best = int(torch.argmax(value))
            if float(value[best]) > base + 1e-6 * abs(base):
                swapped = both[idx[best]]
                assign[a], assign[b] = swapped[:m], swapped[m:]
    perm = assign.reshape(-1)
    if kept_importance(s[:, perm], n, m) < kept_importance(s, n, m):
        return torch.arange(cols)
    return perm
