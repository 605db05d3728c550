"""Meet the other ranks before a collective, with a short timeout: a rank that is alone raises, it does not hang.

A collective (all-reduce, broadcast, ...) that only some ranks of a process group enter waits for
the group's timeout (30 minutes by default with gloo, 10 with NCCL) and then fails with a message
that says nothing about why; worse, if the other ranks are meanwhile in a *different* collective,
the two get paired and the group's later collectives no longer line up. So before its mask checks
sparsenn meets the other ranks through the group's key-value store (the ``TCPStore`` every process
group has), which is not a collective and leaves the group untouched:

* the ``n``-th meeting on a group (every rank counts its own meetings; every rank makes the same
  calls in the same order, so the counts agree) has keys ``sparsenn/meet/<n>/...`` in the store;
* each rank writes ``rank<r>`` (which call it is in, for the message) and increments ``arrived``;
  the rank that brings ``arrived`` to the world size writes the verdict ``go``;
* the others wait for a verdict at most ``timeout`` seconds; one that times out lists the ranks
  whose key is missing and writes ``abort``. The verdict is written with ``compare_set``, so the
  first writer wins and every rank follows the same verdict, even when the last rank arrives just
  as another gives up;
* on ``abort`` every rank that reaches this meeting, then or later, raises
  :class:`RanksOutOfStepError`, naming the ranks that had not arrived: a late rank raises at
  once instead of waiting for ranks that have already left. Nothing was sent over the process group,
  so its collectives still line up and training can go on after the error is handled.

What a timeout cannot tell: whether a missing rank is merely slow, crashed, or will never make
this call. The timeout must therefore exceed the longest gap between ranks reaching the same
call (they start it right after a common collective such as the gradient all-reduce, so the gap is
local compute: scoring, a data-dependent score's batches); it is the caller's choice.
"""

from __future__ import annotations

import json
import weakref
from datetime import timedelta
from typing import Any

__all__ = ["RanksOutOfStepError", "meet"]

_PREFIX = "sparsenn/meet"
_meetings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # process group -> meetings started on it


class RanksOutOfStepError(RuntimeError):
    """Not every rank of a process group made the same collective sparsenn call.

    ``missing``: the ranks (in the group) that had not reached it when a rank gave up waiting;
    ``call``: the call this rank was in."""

    def __init__(self, message: str, missing: list[int] | None = None, call: str = ""):
        super().__init__(message)
        self.missing = list(missing or [])
        self.call = call


def _group_store(group: Any) -> tuple[Any, Any] | None:
    """``(process group object, its store)``, or ``None`` when torch does not expose the store."""
    try:
        from torch.distributed import distributed_c10d as c10d

        pg = group if group is not None else c10d._get_default_group()
        return pg, c10d._get_process_group_store(pg)
    except (AttributeError, KeyError, RuntimeError, ValueError):  # private API: absent in other torch builds
        return None


def meet(group: Any, call: str, timeout: float) -> bool:
    """Wait until every rank of ``group`` has reached its matching call, at most ``timeout`` seconds.

    Returns True after meeting, False when the group's store is not reachable (nothing was
    checked; the caller's collectives then wait for the group's own timeout). Raises
    :class:`RanksOutOfStepError` when a rank gave up waiting for this meeting, on every rank that
    reaches it. ``call`` names this rank's call (``"set_masks"``) in the messages.
    """
    import torch.distributed as dist

    found = _group_store(group)
    if found is None:
        return False
    pg, store = found
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = _meetings.get(pg, 0)
    _meetings[pg] = n + 1
    key = f"{_PREFIX}/{n}"
    store.set(f"{key}/rank{rank}", call)
    if store.add(f"{key}/arrived", 1) >= world:
        verdict = store.compare_set(f"{key}/verdict", "", "go")
    else:
        try:
            store.wait([f"{key}/verdict"], timedelta(seconds=timeout))
            verdict = store.get(f"{key}/verdict")
        except RuntimeError:  # DistStoreError: timed out (a store that is gone fails again just below)
            missing = [r for r in range(world) if not store.check([f"{key}/rank{r}"])]
            give_up = json.dumps({"rank": rank, "missing": missing, "call": call, "timeout": timeout})
            verdict = store.compare_set(f"{key}/verdict", "", give_up)
    _forget(store, n - 2, rank)
    verdict = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
    if verdict == "go":
        return True
    info = json.loads(verdict)
    missing, waiter = info["missing"], info["rank"]
    names = ", ".join(f"rank {r}" for r in missing) or "(none by then: the last rank arrived too late)"
    if waiter == rank:
        head = (f"{call}: rank {rank} waited {timeout:g} s for the other ranks of the process group; "
                f"not arrived: {names}.")
    else:
        head = (f"{call}: rank {waiter} gave up on this call after waiting {info['timeout']:g} s "
                f"(in {info['call']}) for {names}; rank {rank} arrived too late.")
    raise RanksOutOfStepError(
        f"{head} {call} is a collective: every rank of the group must make the same sparsenn calls "
        f"(set_masks, update, the check before an optimizer step, check_masks_consistent) in the same "
        f"order. Call it on every rank (not under 'if rank == 0'), or raise the timeout if a rank is only "
        f"slow. Nothing was sent over the process group: the call is abandoned on every rank that "
        f"reaches it, and the group's collectives still line up.", missing, call)


def _forget(store: Any, n: int, rank: int) -> None:
    """Delete meeting ``n``'s keys: every rank that has started meeting ``n + 2`` has seen its verdict."""
    if n < 0:
        return
    key = f"{_PREFIX}/{n}"
    store.delete_key(f"{key}/rank{rank}")
    if rank == 0:
        store.delete_key(f"{key}/arrived")
        store.delete_key(f"{key}/verdict")
