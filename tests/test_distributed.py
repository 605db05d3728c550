"""DistributedDataParallel (Li et al. 2020): 2 gloo processes on localhost against a 1-process run.

RigL (Evci et al. 2020) must grow from the all-reduced gradient and SET (Mocanu et al.
2018) from the seeded generator, so 2 ranks with half of each global batch give the
1-process result on the global batch: identical masks, weights within float tolerance.
All distributed cases run in one pair of spawned processes (module fixture) to keep the
file fast; each test checks its part of what the ranks saved.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing.connection import wait

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import sparsenn as sn
from sparsenn.core.masks import attach_mask
from sparsenn.train.distributed import (MaskMismatchError, RanksOutOfStepError, check_masks_consistent, mask_digests,
                                        unwrap_model)


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is unavailable")

WORLD = 2
STEPS, UPDATE_EVERY, GLOBAL_BATCH = 40, 5, 16
D_IN, HIDDEN, D_OUT = 12, 48, 5
METHODS = ("rigl", "set", "static", "magnitude")
TIMEOUT_S = 90  # a hang fails the test instead of blocking CI


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, D_OUT))


def _config(method: str) -> dict:
    if method == "magnitude":  # gradual magnitude pruning (Zhu & Gupta 2017)
        return {"sparsity": 0.8, "method": "magnitude",
                "schedule": sn.Polynomial(begin_step=0, end_step=30, frequency=UPDATE_EVERY)}
    return {"sparsity": 0.8, "method": method, "distribution": "erk", "update_every": UPDATE_EVERY,
            "total_steps": STEPS, "seed": 7}


def _global_batches():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randint(0, D_OUT, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def _train(method: str, rank: int = 0, world: int = 1) -> dict:
    """Sparsifier before DDP (the recommended order); each rank trains on its half of every global batch."""
    model = _net()
    sp = sn.Sparsifier(model, **_config(method))
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)  # broadcast_buffers: rank 0's masks at every forward
    opt = sp.wrap(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
    grow_grads = []
    if method == "rigl":  # record the |gradient| RigL grows by
        observe = sp.method.observe

        def recording_observe(ctx):
            observe(ctx)
            if sp.method._grad is not None:
                grow_grads.append({n: g.clone() for n, g in sp.method._grad.items()})

        sp.method.observe = recording_observe
    updates = [{n: m.clone() for n, m in sp.masks.items()}]  # the initial masks, then one per update
    for x, y in _global_batches():
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()  # mean: the all-reduced average is the global-batch gradient
        opt.step()
        if sp.step():
            updates.append({n: m.clone() for n, m in sp.masks.items()})
    return {"updates": updates, "grow_grads": grow_grads,
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "history": getattr(sp.method, "history", None), "names": list(sp.names)}


# ----------------------------------------------------------------------------- cases run on every rank


def _hook_order_case(rank: int) -> torch.Tensor:
    """A post-accumulate-grad hook that edits ``.grad`` in place (what the Sparsifier registers) runs
    before DDP's reducer reads ``.grad``: the edited gradient is what gets all-reduced."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    ddp = DistributedDataParallel(lin)

    def scale(p: torch.Tensor) -> None:
        p.grad.mul_(rank + 1)

    lin.weight.register_post_accumulate_grad_hook(scale)
    ddp(torch.ones(2, 4)).sum().backward()  # local gradient: 2 everywhere
    return lin.weight.grad.clone()


def _masked_grad_case(rank: int) -> dict:
    """After a DDP backward (no optimizer step yet) ``.grad`` is exactly 0 wherever the mask is False."""
    from torch.nn.parallel import DistributedDataParallel

    model = _net()
    sp = sn.Sparsifier(model, 0.5, method="static", seed=3)
    ddp = DistributedDataParallel(model)
    torch.manual_seed(rank)  # a different local batch on each rank
    ddp(torch.randn(8, D_IN)).pow(2).sum().backward()
    return {mp.name: mp.param.grad[~mp.mask].abs().max().item() for mp in sp.masked}


def _mismatch_case(rank: int) -> dict:
    """Corrupt one position of rank 1's mask of '2.weight': the next check raises on both ranks."""
    from torch.nn.parallel import DistributedDataParallel

    model = _net()
    sp = sn.Sparsifier(model, 0.5, method="set", update_every=2, total_steps=20, seed=1)
    ddp = DistributedDataParallel(model)
    out = {"compared": (check_masks_consistent(sp), check_masks_consistent(ddp))}
    if rank == 1:
        with torch.no_grad():
            model[2].weight_mask[0, 0] = ~model[2].weight_mask[0, 0]
    for what, obj in (("sparsifier", sp), ("ddp", ddp)):
        try:
            check_masks_consistent(obj)
            out[what] = None
        except MaskMismatchError as e:
            out[what] = (str(e), e.layers)
    return out


def _auto_mismatch_case(rank: int) -> dict:
    """SET with a different generator state on rank 1: the Sparsifier's own check at the first update raises."""
    from torch.nn.parallel import DistributedDataParallel

    model = _net()
    sp = sn.Sparsifier(model, 0.8, method="set", update_every=2, total_steps=20, seed=3)
    ddp = DistributedDataParallel(model)
    opt = sp.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1))
    if rank == 1:
        sp.generator.manual_seed(999)
    for x, y in _global_batches()[:6]:
        opt.zero_grad()
        F.cross_entropy(ddp(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
        opt.step()
        try:
            sp.step()
        except MaskMismatchError as e:
            return {"step": sp.step_count, "message": str(e), "layers": e.layers}
    return {"step": None}


def _initial_masks_case(rank: int) -> dict:
    """Different seeds per rank. Sparsifier before DDP: DDP broadcasts rank 0's masks, training is fine.
    Sparsifier on the DDP model after wrapping: nothing syncs them, the first optimizer step raises."""
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    model = _net()
    sp = sn.Sparsifier(model, 0.8, method="static", seed=rank)
    ddp = DistributedDataParallel(model)
    opt = sp.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1))
    for x, y in _global_batches()[:3]:
        opt.zero_grad()
        F.cross_entropy(ddp(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
        opt.step()
        sp.step()
    out["before_ddp_masks"] = {n: m.clone() for n, m in sp.masks.items()}

    model = _net()
    ddp = DistributedDataParallel(model)
    sp = sn.Sparsifier(ddp, 0.8, method="static", seed=rank)
    opt = sp.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _global_batches()[0]
    F.cross_entropy(ddp(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
    try:
        opt.step()
        out["after_ddp"] = None
    except MaskMismatchError as e:
        out["after_ddp"] = (str(e), e.layers)
    out["after_ddp_unchanged"] = all(torch.equal(before[n], p) for n, p in model.named_parameters())
    return out


def _layout_case(rank: int) -> tuple[str, list[str]] | None:
    """Ranks masking different parameters: caught before comparing checksums, the extra layer named."""
    sp = sn.Sparsifier(_net(), 0.5, include=["0", "2"] if rank == 0 else ["0"])
    try:
        check_masks_consistent(sp)
    except MaskMismatchError as e:
        return str(e), e.layers
    return None


def _outcome(fn, *args) -> dict:
    """``fn``'s error (type, message, layers/ranks/missing) or None, and how long the call took."""
    t0 = time.perf_counter()
    try:
        fn(*args)
        err = None
    except Exception as e:  # recorded, asserted on in the tests
        err = {"type": type(e).__name__, "message": str(e), "layers": getattr(e, "layers", None),
               "ranks": getattr(e, "ranks", None), "missing": getattr(e, "missing", None)}
    return {"error": err, "seconds": time.perf_counter() - t0}


def _kept(n: int, positions) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(positions)] = True
    return mask


def _permuted_case(rank: int) -> dict:
    """Masks with the same kept count, sum of kept indices and sum of their squares ({0,4,5} vs {1,2,6}:
    3 kept, 9 = 9, 41 = 41) but different positions: the cross-rank check must still tell them apart."""
    lin = nn.Linear(4, 2, bias=False)
    attach_mask(lin, "weight", _kept(8, (0, 4, 5) if rank == 0 else (1, 2, 6)).reshape(2, 4))
    return _outcome(check_masks_consistent, lin)


def _differing_set_masks_case(rank: int) -> dict:
    """Under DDP's default broadcast_buffers=True both ranks call set_masks with different masks for
    '2.weight': it raises right there on both ranks, naming the layer and which ranks hold which mask,
    and changes nothing (no mask, no weight) on either. The same masks on both ranks go through."""
    from torch.nn.parallel import DistributedDataParallel

    model = _net()
    sp = sn.Sparsifier(model, 0.5, method="static", seed=5)
    ddp = DistributedDataParallel(model)  # broadcast_buffers=True: rank 0's masks at every forward
    opt = sp.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1))
    x, y = _global_batches()[0]
    x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
    before_masks = {n: m.clone() for n, m in sp.masks.items()}
    before_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(100 + rank)  # a different new mask on each rank
    new = {"2.weight": torch.rand(model[2].weight.shape, generator=g) < 0.5}
    out = {"differ": _outcome(sp.set_masks, new)}
    out["masks_unchanged"] = all(torch.equal(before_masks[n], m) for n, m in sp.masks.items())
    out["weights_unchanged"] = all(torch.equal(before_weights[n], p) for n, p in model.named_parameters())
    same = {"2.weight": torch.rand(model[2].weight.shape, generator=torch.Generator().manual_seed(7)) < 0.5}
    out["same"] = _outcome(sp.set_masks, same)
    out["same_applied"] = torch.equal(sp.masks["2.weight"], same["2.weight"])
    out["check_pending_after_same"] = sp._check_pending  # checked at set_masks: no second check at the step
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
    out["weights_after_step"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


LONELY_TIMEOUT_S = 1.0


def _lonely_set_masks_case(rank: int) -> dict:
    """Only rank 0 calls set_masks: it raises after ``arrival_timeout`` naming rank 1, instead of hanging
    in a collective. Nothing was sent over the process group, so rank 1's collectives still line up: it
    meets rank 0 at a barrier, its own late set_masks raises at once (rank 0 abandoned that call), and
    afterwards both ranks' set_masks go through."""
    import torch.distributed as dist

    model = _net()
    sp = sn.Sparsifier(model, 0.5, method="static", seed=2, arrival_timeout=LONELY_TIMEOUT_S)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    masks["0.weight"] = ~masks["0.weight"]
    out = {}
    if rank == 0:
        out["alone"] = _outcome(sp.set_masks, masks)
        out["alone_unchanged"] = not torch.equal(sp.masks["0.weight"], masks["0.weight"])
    dist.barrier()
    if rank == 1:
        out["late"] = _outcome(sp.set_masks, masks)
    out["together"] = _outcome(sp.set_masks, masks)
    out["together_applied"] = torch.equal(sp.masks["0.weight"], masks["0.weight"])
    # both ranks arrive, but in different calls: told apart by the call's name, nothing applied
    out["different_calls"] = _outcome(check_masks_consistent, sp) if rank == 0 else _outcome(sp.set_masks, masks)
    return out


def _names_case() -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = _net()
    ddp = DistributedDataParallel(model)
    sp = sn.Sparsifier(ddp, 0.5, seed=0)
    out = {"ddp_names": list(sp.names), "ddp_mask_keys": list(sp.masks), "model_is_inner": sp.model is model,
           "group_is_ddp": sp.process_group is ddp.process_group, "unwrap": unwrap_model(ddp)[0] is model}
    sp.finalize()
    sp = sn.Sparsifier(ddp.module, 0.5, seed=0)
    out["module_names"] = list(sp.names)
    sp.finalize()
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        results = {"hook": _hook_order_case(rank), "masked_grad": _masked_grad_case(rank)}
        t0 = time.perf_counter()
        results["train"] = {m: _train(m, rank, world) for m in METHODS}
        results["train_s"] = time.perf_counter() - t0
        results["mismatch"] = _mismatch_case(rank)
        results["auto_mismatch"] = _auto_mismatch_case(rank)
        results["initial"] = _initial_masks_case(rank)
        results["names"] = _names_case()
        results["layout"] = _layout_case(rank)
        results["permuted"] = _permuted_case(rank)
        results["differing_set_masks"] = _differing_set_masks_case(rank)
        results["lonely"] = _lonely_set_masks_case(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears down
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter finalization, where gloo/TCPStore threads occasionally abort (SIGABRT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """What each of the 2 ranks saved; fails (never hangs) if a rank errs or the pair exceeds TIMEOUT_S."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned children
        if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ \
                and os.path.exists("/sys/class/net/lo"):
            mp.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the hostname resolves to
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, WORLD, port, out), daemon=True) for r in range(WORLD)]
        for p in procs:
            p.start()
        start = time.monotonic()
        deadline = start + TIMEOUT_S
        pending = list(procs)
        while pending and time.monotonic() < deadline:
            wait([p.sentinel for p in pending], timeout=max(0.0, deadline - time.monotonic()))
            pending = [p for p in pending if p.is_alive()]
            if pending and any(p.exitcode for p in procs if p not in pending):  # the others would block on it
                deadline = min(deadline, time.monotonic() + 5)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        errors = ""
        for r in range(WORLD):
            path = os.path.join(out, f"rank{r}.err")
            if os.path.exists(path):
                errors += f"\n--- rank {r} ---\n" + open(path).read()
        codes = [p.exitcode for p in procs]
        if hung:
            pytest.fail(f"ranks {hung} still running after {time.monotonic() - start:.0f} s (a hang?), "
                        f"killed{errors}")
        saved = [os.path.exists(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
        if errors or not all(saved):
            pytest.fail(f"a rank failed (exit codes {codes}, results saved {saved}){errors}")
        if any(codes):  # every rank saved its results after the last collective: a crash in torch's teardown
            warnings.warn(f"ranks exited with codes {codes} after saving their results (gloo teardown)")
        yield [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """The same training in this process on the whole global batch (torch.distributed not initialized)."""
    return {m: _train(m) for m in METHODS}


# ----------------------------------------------------------------------------- tests


def test_grad_hooks_run_before_ddp_reducer(ranks):
    # rank r scales its local gradient (2) by r + 1 in place after accumulation; DDP averages the result
    for res in ranks:
        torch.testing.assert_close(res["hook"], torch.full((3, 4), 2.0 * 1.5))


def test_masked_gradients_are_zero_after_ddp_backward(ranks):
    for res in ranks:
        assert res["masked_grad"] and all(v == 0.0 for v in res["masked_grad"].values()), res["masked_grad"]


@pytest.mark.parametrize("method", METHODS)
def test_ddp_matches_single_process(ranks, reference, method):
    ref, r0, r1 = reference[method], ranks[0]["train"][method], ranks[1]["train"][method]
    assert len(ref["updates"]) == len(r0["updates"]) == len(r1["updates"]) > 0
    for i, (a, b, c) in enumerate(zip(ref["updates"], r0["updates"], r1["updates"])):
        for name in a:
            assert torch.equal(b[name], c[name]), f"update {i}: ranks hold different masks for {name}"
            assert torch.equal(a[name], b[name]), f"update {i}: DDP mask of {name} differs from 1 process"
    for name, w in ref["weights"].items():
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
        torch.testing.assert_close(r0["weights"][name], w, atol=1e-5, rtol=1e-4, msg=name)
    assert r0["history"] == ref["history"]
    if method in ("rigl", "set"):  # the masks really moved
        assert any(layer["mask_change"] > 0 for h in ref["history"] for layer in h["layers"].values())
    if method == "rigl":  # grown by the all-reduced gradient = the global-batch gradient
        assert len(r0["grow_grads"]) == len(ref["grow_grads"]) == 5  # updates at steps 5..25 (f_30 = 0)
        for a, b, c in zip(ref["grow_grads"], r0["grow_grads"], r1["grow_grads"]):
            for name in a:
                torch.testing.assert_close(b[name], c[name], atol=0, rtol=0)
                torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-4)


def test_corrupted_mask_raises_on_every_rank(ranks):
    for res in ranks:
        case = res["mismatch"]
        assert case["compared"] == (2, 2)
        for what in ("sparsifier", "ddp"):
            assert case[what] is not None, f"check on the {what} did not raise"
            message, layers = case[what]
            assert layers == ["2.weight"]
            assert "2.weight" in message and "0.weight" not in message


def test_sparsifier_checks_after_every_update(ranks):
    for res in ranks:
        case = res["auto_mismatch"]
        assert case["step"] == 2, "the first update (step 2) should have raised"
        assert case["layers"] and all(n in ("0.weight", "2.weight", "4.weight") for n in case["layers"])
        assert "differ across the 2 ranks" in case["message"]
    assert ranks[0]["auto_mismatch"]["layers"] == ranks[1]["auto_mismatch"]["layers"]


def test_initial_masks_broadcast_by_ddp_or_checked(ranks):
    a, b = ranks[0]["initial"], ranks[1]["initial"]
    for name, m in a["before_ddp_masks"].items():  # the recommended order: DDP made rank 0's masks everyone's
        assert torch.equal(m, b["before_ddp_masks"][name]), name
    for res in (a, b):  # built after DDP with different seeds: caught before the first optimizer step
        assert res["after_ddp"] is not None
        assert set(res["after_ddp"][1]) == {"0.weight", "2.weight", "4.weight"}
        assert res["after_ddp_unchanged"]


def test_different_parameter_sets_raise(ranks):
    for res in ranks:
        assert res["layout"] is not None
        message, layers = res["layout"]
        assert layers == ["2.weight"] and "mask different parameters" in message


def test_ddp_model_and_module_give_same_names(ranks):
    for res in ranks:
        case = res["names"]
        assert case["ddp_names"] == case["module_names"] == ["0.weight", "2.weight", "4.weight"]
        assert case["ddp_mask_keys"] == case["ddp_names"]
        assert case["model_is_inner"] and case["group_is_ddp"] and case["unwrap"]


def test_masks_with_equal_index_sums_are_told_apart(ranks):
    for rank, res in enumerate(ranks):
        err = res["permuted"]["error"]
        assert err is not None, f"rank {rank}: masks {{0,4,5}} vs {{1,2,6}} passed the check"
        assert err["type"] == "MaskMismatchError" and err["layers"] == ["weight"]
        assert err["ranks"] == {"weight": [[0], [1]]}
        assert "rank 0" in err["message"] and "rank 1" in err["message"]


def test_set_masks_with_different_masks_raises_before_ddp_hides_it(ranks):
    for rank, res in enumerate(ranks):
        case = res["differing_set_masks"]
        err = case["differ"]["error"]
        assert err is not None, f"rank {rank}: set_masks with different masks did not raise"
        assert err["type"] == "MaskMismatchError" and err["layers"] == ["2.weight"]
        assert err["ranks"] == {"2.weight": [[0], [1]]}
        assert "set_masks" in err["message"] and "2.weight" in err["message"]
        assert case["masks_unchanged"] and case["weights_unchanged"]
        assert case["same"]["error"] is None and case["same_applied"]
        assert not case["check_pending_after_same"]
    a, b = (res["differing_set_masks"]["weights_after_step"] for res in ranks)
    for name in a:  # the ranks did not diverge
        assert torch.equal(a[name], b[name]), name


def test_set_masks_on_one_rank_raises_within_the_timeout(ranks):
    alone = ranks[0]["lonely"]["alone"]
    assert alone["error"] is not None, "set_masks on rank 0 alone returned"
    assert alone["error"]["type"] == RanksOutOfStepError.__name__ and alone["error"]["missing"] == [1]
    assert LONELY_TIMEOUT_S <= alone["seconds"] < LONELY_TIMEOUT_S + 3, alone["seconds"]
    message = alone["error"]["message"]
    assert "set_masks" in message and "rank 1" in message and "every rank" in message
    assert ranks[0]["lonely"]["alone_unchanged"]
    late = ranks[1]["lonely"]["late"]  # rank 1 reaches the call rank 0 gave up on: raises at once
    assert late["error"] is not None and late["error"]["type"] == RanksOutOfStepError.__name__
    assert late["seconds"] < LONELY_TIMEOUT_S and "rank 0" in late["error"]["message"]
    for res in ranks:  # no collective was left half-done: the group still works
        assert res["lonely"]["together"]["error"] is None, res["lonely"]["together"]
        assert res["lonely"]["together_applied"]


def test_ranks_in_different_mask_calls_raise(ranks):
    for res in ranks:
        err = res["lonely"]["different_calls"]["error"]
        assert err is not None and err["type"] == RanksOutOfStepError.__name__
        assert "rank 0 in check_masks_consistent" in err["message"] and "rank 1 in set_masks" in err["message"]


# ----------------------------------------------------------------------------- single process


def test_check_is_a_no_op_without_distributed():
    model = _net()
    sp = sn.Sparsifier(model, 0.5)
    assert check_masks_consistent(sp) == 1 and check_masks_consistent(model) == 1
    with pytest.raises(TypeError, match="Sparsifier or an nn.Module"):
        check_masks_consistent("model")
    with pytest.raises(TypeError, match="check_distributed"):
        sn.Sparsifier(_net(), 0.5, check_distributed="yes")
    for bad in (0, -1.0, float("nan"), "5", True):
        with pytest.raises(ValueError, match="arrival timeout must be a positive number"):
            sn.Sparsifier(_net(), 0.5, arrival_timeout=bad)
    with pytest.raises(ValueError, match="arrival timeout"):
        check_masks_consistent(model, timeout=0)


def test_mask_digests_tell_moved_positions_apart():
    a, b = _kept(8, (0, 4, 5)), _kept(8, (1, 2, 6))  # 3 kept each, index sums 9 = 9, squares 41 = 41
    da, db = mask_digests({"a": a}), mask_digests({"b": b})
    assert da[0, 0] == db[0, 0] == 3
    assert not torch.equal(da, db)
    assert torch.equal(da, mask_digests({"a": a.clone()}))
    assert not torch.equal(mask_digests({"a": a}), mask_digests({"a": a.reshape(2, 4)}))  # the shape counts
    assert mask_digests({}).shape == (0, 3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.lists(st.booleans(), min_size=1, max_size=40),
       st.sampled_from(["bool", "float", "uint8", "strided"]))
def test_mask_digests_equal_exactly_for_equal_masks(bits_a, bits_b, form):
    a, b = torch.tensor(bits_a), torch.tensor(bits_b)
    same = torch.equal(a, b)  # same shape and same bits
    if form == "float":  # a 0/1 mask of another dtype is the boolean mask it converts to
        b = b.float()
    elif form == "uint8":
        b = b.to(torch.uint8)
    elif form == "strided":  # a non-contiguous view hashes its values in logical order
        b = torch.stack([b, ~b], 1)[:, 0]
        assert not b.is_contiguous() or b.numel() == 1
    assert torch.equal(mask_digests({"m": a}), mask_digests({"m": b})) == same


def test_meet_uses_the_group_store_and_falls_back_without_it(tmp_path, monkeypatch):
    """The rendezvous reads the store through a private torch function: with this torch it is there
    (a world of one meets at once); where it is not, the checks still run, without the early meeting."""
    import torch.distributed as dist

    from sparsenn.train import rendezvous

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert rendezvous._group_store(None) is not None
        assert rendezvous.meet(None, "set_masks", timeout=5.0) is True
        sp = sn.Sparsifier(_net(), 0.5, seed=0)
        masks = {n: m.clone() for n, m in sp.masks.items()}
        monkeypatch.setattr(rendezvous, "_group_store", lambda group: None)
        assert rendezvous.meet(None, "set_masks", timeout=5.0) is False
        masks["0.weight"] = masks["0.weight"].flip(0)
        sp.set_masks(masks)  # the digests are still compared over the group, without the meeting
        assert torch.equal(sp.masks["0.weight"], masks["0.weight"])
        assert check_masks_consistent(sp) == 1
    finally:
        dist.destroy_process_group()
