"""Splitting a labelled data set among federated clients: IID, or a few classes per client.

* :func:`iid_split`: a seeded shuffle cut into equal parts (sizes differ by at most one).
* :func:`classes_per_client_split`: every client holds exactly ``classes_per_client`` distinct
  classes, the pathological non-IID split of McMahan et al. 2017 ("Communication-Efficient
  Learning of Deep Networks from Decentralized Data", Sec. 3, two classes per client) made strict:
  their shards of a label-sorted set can give a client one class twice or split it across a shard
  boundary. Each class is dealt to as many clients as the total allows (the counts differ by at
  most one) and its samples are shuffled and cut into that many equal parts.

Both return one sorted ``int64`` index tensor per client; :func:`client_datasets` turns them
into ``torch.utils.data.Subset`` objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset

__all__ = ["classes_per_client_split", "client_datasets", "iid_split"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _labels(labels) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t.long()


def iid_split(num_samples: int, num_clients: int, *, seed: int = 0) -> list[torch.Tensor]:
    """A seeded random permutation of ``range(num_samples)`` cut into ``num_clients`` near-equal parts."""
    _positive_int("num_clients", num_clients)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < num_clients:
        raise ValueError(f"num_samples must be an integer >= num_clients ({num_clients}), got {num_samples!r}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in torch.tensor_split(perm, num_clients)]


def _deal(classes: list[int], num_clients: int, per_client: int, gen: torch.Generator) -> list[list[int]]:
    """``per_client`` distinct classes per client, every class dealt equally often (within one).

    The deck is a sequence of fresh random permutations of the classes, dealt ``per_client`` cards
    at a time; where a hand spans two permutations, the classes it already holds go to the end of
    the next one (so the hand completes with new classes; ``per_client <= len(classes)``).
    """
    slots: list[int] = []
    while len(slots) < num_clients * per_client:
        perm = [classes[i] for i in torch.randperm(len(classes), generator=gen).tolist()]
        held = slots[len(slots) - len(slots) % per_client:]
        slots += [k for k in perm if k not in held] + [k for k in perm if k in held]
    return [sorted(slots[c * per_client:(c + 1) * per_client]) for c in range(num_clients)]


def classes_per_client_split(labels, num_clients: int, classes_per_client: int = 2, *,
                             seed: int = 0) -> list[torch.Tensor]:
    """Each client gets ``classes_per_client`` distinct classes; each class's samples are shared equally
    among the clients that hold it (see the module doc)."""
    labels = _labels(labels)
    _positive_int("num_clients", num_clients)
    _positive_int("classes_per_client", classes_per_client)
    classes = sorted(set(labels.tolist()))
    if classes_per_client > len(classes):
        raise ValueError(f"classes_per_client={classes_per_client} but the labels hold only {len(classes)} classes")
    gen = torch.Generator().manual_seed(seed)
    hands = _deal(classes, num_clients, classes_per_client, gen)
    holders = {k: [c for c, hand in enumerate(hands) if k in hand] for k in classes}
    parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
    for k in classes:
        if not holders[k]:
            continue
        members = (labels == k).nonzero().squeeze(1)
        if members.numel() < len(holders[k]):
            raise ValueError(f"class {k} has {members.numel()} samples for {len(holders[k])} clients")
        members = members[torch.randperm(members.numel(), generator=gen)]
        for c, part in zip(holders[k], torch.tensor_split(members, len(holders[k]))):
            parts[c].append(part)
    return [torch.cat(p).sort().values for p in parts]


def client_datasets(dataset: Dataset, splits: Sequence[torch.Tensor]) -> list[Subset]:
    """One ``Subset`` of ``dataset`` per client."""
    return [Subset(dataset, s.tolist()) for s in splits]
