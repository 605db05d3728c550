"""Data-parallel training (DistributedDataParallel) with masks that stay identical on every rank.

Every rank of a DDP process group (Li et al. 2020, "PyTorch Distributed: Experiences on
Accelerating Data Parallel Training") must hold the same masks after every update, or the
ranks silently train different sparse networks. The :class:`~sparsenn.Sparsifier` keeps them
identical by construction:

* its gradient hooks are post-accumulate-grad hooks: they run on each rank's local
  ``.grad`` inside the parameter's AccumulateGrad node, before DDP's reducer hook reads
  ``.grad`` into its bucket. So ``.grad`` at the optimizer step is the all-reduced (averaged)
  gradient of what the hooks left: RigL (Evci et al. 2020) grows by the same ``|dense gradient|`` on every rank,
  the one of the global batch;
* random scores and SET's random growth (Mocanu et al. 2018) come from the sparsifier's
  own generator, seeded with ``seed`` on every rank (pass the same seed everywhere);
* magnitude drops and magnitude pruning read the weights, which DDP keeps identical.

Data-dependent scores (``snip``, ``grasp``, ``taylor``, ``obd``) read the sparsifier's
``data`` on each rank: pass the same batches on every rank.

Recommended order::

    model = Net()                                     # same init everywhere, or DDP's rank 0 wins
    sp = sn.Sparsifier(model, 0.9, method="rigl", total_steps=T, seed=0)   # masks are buffers now
    ddp = DistributedDataParallel(model)              # broadcasts rank 0's weights and masks
    opt = sp.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1))
    for x, y in loader:                               # each rank its shard; loss averaged over the shard
        opt.zero_grad(); loss_fn(ddp(x), y).backward(); opt.step(); sp.step()

The masks are persistent buffers (``fc1.weight_mask``), so DDP broadcasts rank 0's copy
when it is constructed and, by default (``broadcast_buffers``/``forward_sync_buffers``),
at every forward: harmless, the masks are equal, but it costs 1 byte per masked weight
per step; ``broadcast_buffers=False`` is safe for the masks because they are verified
(below) instead. A Sparsifier may also be built after DDP, from the DDP model or from
``ddp.module``: both give the unprefixed parameter names (``fc1.weight``, not
``module.fc1.weight``), and the DDP model's ``process_group`` is used for checks.

Verification: :func:`check_masks_consistent` compares a per-layer checksum of the masks
across the ranks (two small all-reduces) and raises :class:`MaskMismatchError` on every
rank, naming the layers that differ. When ``torch.distributed`` is initialized the
Sparsifier calls it at the end of every ``update`` (``check_distributed=True``, the
default), before the next forward, where DDP's buffer broadcast would overwrite a
differing mask and hide weights already zeroed differently; and before the next optimizer
step (or ``sp.step()``) after masks were drawn at construction (by then a DDP built
afterwards has broadcast rank 0's) or set through ``set_masks``, ``add_dependents`` or
``load_state_dict``. These calls are collectives: every rank of the group must make
them. Pass ``check_distributed=False`` to a Sparsifier used on one rank only.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from ..core.masks import get_masks

__all__ = ["MaskMismatchError", "check_masks_consistent", "is_distributed", "mask_checksums", "unwrap_model"]

_PRIME = 2_147_483_647  # 2**31 - 1: keeps every checksum term < 2**62, sums exact in int64


class MaskMismatchError(RuntimeError):
    """The ranks of a process group hold different masks; ``layers`` names those that differ."""

    def __init__(self, message: str, layers: list[str] | None = None):
        super().__init__(message)
        self.layers = list(layers or [])


def _wrappers() -> tuple[type, ...]:
    from torch.nn.parallel import DataParallel

    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # builds without torch.distributed
        return (DataParallel,)
    return (DistributedDataParallel, DataParallel)


def unwrap_model(model: nn.Module) -> tuple[nn.Module, Any]:
    """``(module, process_group)``: the module inside a ``DistributedDataParallel`` (or
    ``DataParallel``) wrapper, whose parameter names lack the leading ``"module."``, and the
    wrapper's process group (``None`` for other models)."""
    group = None
    while isinstance(model, _wrappers()):
        group = getattr(model, "process_group", group)
        model = model.module
    return model, group


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is initialized and this rank is in a ``group`` of 2+ ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1 and dist.get_rank(group) >= 0


def mask_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """``int64 (layers, 3)`` per mask: kept count, sum of kept flat indices ``i``, and sum of
    ``i**2 mod (2**31 - 1)``. Exact integer sums, so equal masks give equal checksums on any
    device; moving kept positions changes them unless the moves cancel in both sums."""
    rows = []
    for mask in masks.values():
        idx = mask.detach().reshape(-1).nonzero().squeeze(1)
        r = idx % _PRIME
        rows.append(torch.stack([torch.tensor(idx.numel(), device=idx.device), idx.sum(), (r * r % _PRIME).sum()]))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.int64)
    return torch.stack([row.to("cpu") for row in rows]).to(torch.int64)


def _collective_device(group: Any, masks: dict[str, torch.Tensor]) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if backend in ("gloo", "mpi") or "cpu:" in backend:
        return torch.device("cpu")
    dev = next((m.device for m in masks.values() if m.device.type != "cpu"), None)
    if dev is not None:
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _max_min(values: torch.Tensor, group: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise max and min over the group's ranks, in one all-reduce."""
    import torch.distributed as dist

    both = torch.cat([values, -values]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()
    n = values.shape[0]
    return both[:n], -both[n:]


def check_masks_consistent(sparsifier_or_model: Any, group: Any = None) -> int:
    """Raise :class:`MaskMismatchError` on every rank if the ranks of ``group`` hold different masks.

    Args:
        sparsifier_or_model: a :class:`~sparsenn.Sparsifier` (its masks and dependents) or a
            model (every mask in it), possibly wrapped in ``DistributedDataParallel``.
        group: the process group; default the sparsifier's ``process_group``, the DDP model's,
            or the default group.

    A collective: every rank of the group must call it. Returns how many ranks were
    compared (1, doing nothing, when ``torch.distributed`` is not initialized or the group
    has one rank).
    """
    import torch.distributed as dist

    if hasattr(sparsifier_or_model, "enforced") and hasattr(sparsifier_or_model, "model"):
        masks = {mp.name: mp.mask for mp in sparsifier_or_model.enforced}
        own_group = getattr(sparsifier_or_model, "process_group", None)
    elif isinstance(sparsifier_or_model, nn.Module):
        module, own_group = unwrap_model(sparsifier_or_model)
        masks = get_masks(module)
    else:
        raise TypeError(f"check_masks_consistent expects a Sparsifier or an nn.Module, "
                        f"got {type(sparsifier_or_model).__name__}")
    group = group if group is not None else own_group
    if not is_distributed(group):
        return 1
    world = dist.get_world_size(group)
    device = _collective_device(group, masks)

    # 1) the same parameters, with the same shapes, on every rank (else the next all-reduce would not line up)
    layout = "\n".join(f"{n}:{tuple(m.shape)}" for n, m in masks.items()).encode()
    header = torch.tensor([len(masks), zlib.crc32(layout)], dtype=torch.int64)
    hi, lo = _max_min(header, group, device)
    if not torch.equal(hi, lo):
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [f"{n}{tuple(m.shape)}" for n, m in masks.items()], group=group)
        mine = set(gathered[dist.get_rank(group)])
        differ = sorted(set().union(*map(set, gathered)) - set.intersection(*map(set, gathered)))
        raise MaskMismatchError(
            f"the {world} ranks mask different parameters or shapes: not on every rank: "
            f"{', '.join(differ)}; this rank masks {len(mine)}. Build the same model and Sparsifier "
            f"(same include/exclude) on every rank", [d.split("(")[0] for d in differ])

    # 2) per-layer checksums
    sums = mask_checksums(masks)
    hi, lo = _max_min(sums.reshape(-1), group, device)
    hi, lo = hi.reshape(-1, 3), lo.reshape(-1, 3)
    bad = (hi != lo).any(1).tolist()
    names = [n for n, b in zip(masks, bad) if b]
    if names:
        detail = ", ".join(f"{n} (kept {int(lo[i, 0])}..{int(hi[i, 0])} of {masks[n].numel()})"
                           for i, n in enumerate(masks) if bad[i])
        raise MaskMismatchError(
            f"masks differ across the {world} ranks of the process group in {len(names)} layer(s): {detail}. "
            f"Training on them would silently diverge. Every rank must compute the same masks: the same "
            f"Sparsifier arguments and seed, the same data for data-dependent scores, the same weights "
            f"(attach masks before wrapping in DistributedDataParallel, which broadcasts rank 0's), and no "
            f"rank-local edits of the masks", names)
    return world
