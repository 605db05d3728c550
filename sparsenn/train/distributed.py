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
at every forward: harmless while the masks are equal, but it costs 1 byte per masked weight
per step; ``broadcast_buffers=False`` is safe for the masks because they are verified
(below) instead. What the broadcast does *not* do is touch the weights: a rank whose masks
differed from rank 0's gets rank 0's masks over weights zeroed by its own (zeros where rank 0
keeps a weight, values where rank 0 prunes one until the next masked step zeroes them). DDP
never broadcasts parameters after construction and the all-reduced gradients move every rank
alike, so that difference stays for the rest of training, and a check after the broadcast sees
equal masks. Hence masks are compared where they are set, before anything changes.

A Sparsifier may also be built after DDP, from the DDP model or from ``ddp.module``: both
give the unprefixed parameter names (``fc1.weight``, not ``module.fc1.weight``), and the DDP
model's ``process_group`` is used for checks.

Verification: :func:`check_masks_consistent` compares per-layer digests of the masks (a
128-bit BLAKE2b hash of the shape and the bits, :func:`mask_digests`) across the ranks with
two small all-reduces and raises :class:`MaskMismatchError` on every rank, naming the layers
that differ and which ranks hold which mask. When ``torch.distributed`` is initialized
(``check_distributed=True``, the default) the Sparsifier checks in ``set_masks`` (so at every
``update``) the masks it is about to install, before any mask or weight changes, and before the
next optimizer step (or ``sp.step()``) after masks were drawn at construction (by then a DDP
built afterwards has broadcast rank 0's) or set through ``add_dependents`` or
``load_state_dict``. These calls are collectives: every rank of the group must make them.
Each first meets the other ranks through the group's store (:mod:`.rendezvous`): a rank that
is alone in the call raises :class:`~sparsenn.train.rendezvous.RanksOutOfStepError` after
``arrival_timeout`` seconds (default :data:`DEFAULT_ARRIVAL_TIMEOUT_S`), naming the ranks
that did not come, instead of hanging in a collective until the group's timeout. Pass
``check_distributed=False`` to a Sparsifier used on one rank only.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.masks import get_masks
from .rendezvous import RanksOutOfStepError, meet

__all__ = ["DEFAULT_ARRIVAL_TIMEOUT_S", "MaskMismatchError", "RanksOutOfStepError", "check_masks_consistent",
           "compare_masks_across_ranks", "is_distributed", "mask_digests", "unwrap_model"]

DEFAULT_ARRIVAL_TIMEOUT_S = 60.0  # how long a rank waits for the others at a mask check before raising


class MaskMismatchError(RuntimeError):
    """The ranks of a process group hold different masks. ``layers`` names the layers that differ;
    ``ranks`` maps each to its ranks grouped by the mask they hold (``{"fc.weight": [[0, 2], [1]]}``)."""

    def __init__(self, message: str, layers: list[str] | None = None,
                 ranks: dict[str, list[list[int]]] | None = None):
        super().__init__(message)
        self.layers = list(layers or [])
        self.ranks = dict(ranks or {})


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


def mask_digests(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """``int64 (layers, 3)`` per mask: kept count and the two 64-bit words of a 128-bit BLAKE2b digest
    of its shape and its bits (as ``bool``, in row-major order, packed 8 to a byte). Equal masks give
    equal rows on any device; different ones collide with probability ``2**-128``."""
    rows = []
    for mask in masks.values():
        bits = mask.detach().to(device="cpu", dtype=torch.bool).contiguous().numpy()
        h = hashlib.blake2b(repr(tuple(mask.shape)).encode(), digest_size=16)
        h.update(np.packbits(bits.reshape(-1)).tobytes())
        words = np.frombuffer(h.digest(), dtype="<i8")
        rows.append([int(bits.sum()), int(words[0]), int(words[1])])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 3)


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


def arrival_timeout_seconds(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"arrival timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def compare_masks_across_ranks(masks: dict[str, torch.Tensor], group: Any = None, *,
                               call: str = "compare_masks_across_ranks",
                               timeout: float = DEFAULT_ARRIVAL_TIMEOUT_S) -> int:
    """Raise :class:`MaskMismatchError` on every rank if the ranks of ``group`` hold different ``masks``.

    A collective: every rank waits at most ``timeout`` seconds for the others to reach it (else
    :class:`~sparsenn.train.rendezvous.RanksOutOfStepError`), then compares the layout (names,
    shapes, which call) and the per-layer :func:`mask_digests` in two all-reduces. ``call`` names the
    caller in messages. Returns how many ranks were compared (1, doing nothing, without a group of 2+).
    """
    import torch.distributed as dist

    timeout = arrival_timeout_seconds(timeout)
    if not is_distributed(group):
        return 1
    world = dist.get_world_size(group)
    meet(group, call, timeout)
    device = _collective_device(group, masks)

    # 1) the same call, the same parameters, the same shapes on every rank (else the next all-reduce would not line up)
    layout = "\n".join(f"{n}:{tuple(m.shape)}" for n, m in masks.items()).encode()
    header = torch.tensor([len(masks), zlib.crc32(layout), zlib.crc32(call.encode())], dtype=torch.int64)
    hi, lo = _max_min(header, group, device)
    if not torch.equal(hi, lo):
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (call, [f"{n}{tuple(m.shape)}" for n, m in masks.items()]), group=group)
        calls = [c for c, _ in gathered]
        if len(set(calls)) > 1:
            raise RanksOutOfStepError(
                f"the ranks are in different sparsenn calls: "
                f"{', '.join(f'rank {r} in {c}' for r, c in enumerate(calls))}. Every rank of the process group "
                f"must make the same calls in the same order", [], call)
        layers = [set(names) for _, names in gathered]
        mine = layers[dist.get_rank(group)]
        differ = sorted(set().union(*layers) - set.intersection(*layers))
        raise MaskMismatchError(
            f"the {world} ranks mask different parameters or shapes: not on every rank: "
            f"{', '.join(differ)}; this rank masks {len(mine)}. Build the same model and Sparsifier "
            f"(same include/exclude) on every rank", [d.split("(")[0] for d in differ])

    # 2) per-layer digests
    digests = mask_digests(masks)
    hi, lo = _max_min(digests.reshape(-1), group, device)
    bad = (hi.reshape(-1, 3) != lo.reshape(-1, 3)).any(1).tolist()
    names = [n for n, b in zip(masks, bad) if b]
    if names:
        raise _mismatch(masks, digests, names, group, call)
    return world


def _mismatch(masks: dict[str, torch.Tensor], digests: torch.Tensor, names: list[str], group: Any,
              call: str) -> MaskMismatchError:
    """The error for layers whose digests differ, naming which ranks hold which mask (one all-gather)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    index = {n: i for i, n in enumerate(masks)}
    mine = {n: tuple(digests[index[n]].tolist()) for n in names}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    ranks, parts = {}, []
    for n in names:
        by_mask: dict[tuple, list[int]] = {}
        for r, rows in enumerate(gathered):
            by_mask.setdefault(rows[n], []).append(r)
        ranks[n] = list(by_mask.values())
        shown = [f"{'ranks' if len(rs) > 1 else 'rank'} {', '.join(map(str, rs))} keep{'' if len(rs) > 1 else 's'} "
                 f"{row[0]}" for row, rs in list(by_mask.items())[:4]]
        more = f" | {len(by_mask) - 4} more masks" if len(by_mask) > 4 else ""
        parts.append(f"{n} ({' | '.join(shown)}{more} of {masks[n].numel()})")
    unchanged = " The new masks were not applied on any rank." if call == "set_masks" else ""
    return MaskMismatchError(
        f"masks differ across the {world} ranks of the process group in {len(names)} layer(s) at {call}: "
        f"{'; '.join(parts)}.{unchanged} Training on them would silently diverge (DDP's buffer broadcast "
        f"would give every rank rank 0's masks but leave the weights each rank zeroed with its own). Every "
        f"rank must compute the same masks: the same Sparsifier arguments and seed, the same data for "
        f"data-dependent scores, the same weights (attach masks before wrapping in DistributedDataParallel, "
        f"which broadcasts rank 0's), and no rank-local edits of the masks", names, ranks)


def check_masks_consistent(sparsifier_or_model: Any, group: Any = None, *, timeout: float | None = None,
                           call: str = "check_masks_consistent") -> int:
    """Raise :class:`MaskMismatchError` on every rank if the ranks of ``group`` hold different masks.

    Args:
        sparsifier_or_model: a :class:`~sparsenn.Sparsifier` (its masks and dependents) or a
            model (every mask in it), possibly wrapped in ``DistributedDataParallel``.
        group: the process group; default the sparsifier's ``process_group``, the DDP model's,
            or the default group.
        timeout: seconds to wait for the other ranks to reach this call before raising
            :class:`~sparsenn.train.rendezvous.RanksOutOfStepError`; default the sparsifier's
            ``arrival_timeout``, else :data:`DEFAULT_ARRIVAL_TIMEOUT_S`.
        call: the caller's name in messages.

    A collective: every rank of the group must call it. Returns how many ranks were
    compared (1, doing nothing, when ``torch.distributed`` is not initialized or the group
    has one rank).
    """
    if hasattr(sparsifier_or_model, "enforced") and hasattr(sparsifier_or_model, "model"):
        masks = {mp.name: mp.mask for mp in sparsifier_or_model.enforced}
        own_group = getattr(sparsifier_or_model, "process_group", None)
        own_timeout = getattr(sparsifier_or_model, "arrival_timeout", DEFAULT_ARRIVAL_TIMEOUT_S)
    elif isinstance(sparsifier_or_model, nn.Module):
        module, own_group = unwrap_model(sparsifier_or_model)
        masks = get_masks(module)
        own_timeout = DEFAULT_ARRIVAL_TIMEOUT_S
    else:
        raise TypeError(f"check_masks_consistent expects a Sparsifier or an nn.Module, "
                        f"got {type(sparsifier_or_model).__name__}")
    return compare_masks_across_ranks(masks, group if group is not None else own_group, call=call,
                                      timeout=own_timeout if timeout is None else timeout)
