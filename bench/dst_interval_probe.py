"""The probe behind issue 13's diagnosis: why RigL lost to SET (and SET barely beat static) in short DST runs.

A scratch script kept as it was run (``key=value`` arguments; defaults: the issue's recipe, i.e.
LeNet-300-100 on Fashion-MNIST, 95%, PyTorch's default init, uniform distribution, SGD momentum
0.9 at a constant lr 0.01, batch 64, 5 epochs, seeds 0,1,2, an explicit ``ue=update_every``).
Each run prints the test accuracy and, for SET/RigL, diagnostics of the mask updates:

* ``survival``: share of an update's grown weights still active after the next update;
* ``regrown_prev_dropped``: share of an update's grown weights that the previous update dropped
  (RigL re-growing what it just dropped: an oscillation);
* ``jump_mean`` / ``jump_first5``: training loss on 2,048 fixed training images right after an
  update minus right before it (what the drop costs; grown weights start at 0);
* ``dead_hidden``: hidden units with no active input or no active output, per hidden layer.

Variants: ``protect=1`` (RigL that never drops the weights grown at the previous update: tests
whether young weights judged too early are the cause), ``acc=K`` (RigL growing by the mean gradient
of the K batches before an update instead of one batch), ``dist=erk``, ``rescale=1`` (sparse fan-in
re-initialization), and the benchmark recipe (``data=mnist batch=128 lr=0.1 nesterov=1 sched=cos
wd=0.0005 dist=erk rescale=1``). Batches come from an in-memory shuffler (not ``make_loaders``), so
rows are comparable within this probe, not with ``bench/dst_short_runs.py`` row by row.
Its output, with the configuration of every run on its SUMMARY line, is
``bench/results/dst_interval_probe.log``; docs/DESIGN.md ("Dynamic sparse training: the update
interval") summarizes it. Example::

    python bench/dst_interval_probe.py batch=64 seeds=0,1 methods=set,rigl ue=400 tag=D_ue400
"""
import sys, time, copy, json, statistics
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import torch
import sparsenn as sn
from sparsenn.data.datasets import flatten, load_idx_dataset
from sparsenn.models.zoo import LeNet300100
from sparsenn.train.loop import cosine_schedule, train, evaluate
from sparse_training import MLP

cfg = dict(protect=0, acc=1, probe=1, data="fashion_mnist", model="lenet", epochs=5, seeds="0,1,2", methods="static,set,rigl",
           sparsity=0.95, dist="uniform", rescale=0, lr=0.01, mom=0.9, nesterov=0, wd=0.0, sched="const",
           batch=64, ue=100, df=0.3, ef=0.75, dsched="cosine", threads=1, tag="")
for a in sys.argv[1:]:
    k, v = a.split("="); cfg[k] = type(cfg[k])(v) if not isinstance(cfg[k], str) else v
torch.set_num_threads(cfg["threads"])
mean, std = (0.2860, 0.3530) if cfg["data"] == "fashion_mnist" else (0.1307, 0.3081)
tr, te = load_idx_dataset(cfg["data"], str(ROOT.parent / "shared" / "datasets"))
from torch.utils.data import TensorDataset
norm = lambda d: TensorDataset((d.tensors[0] - mean) / std, d.tensors[1])
tr, te = flatten(norm(tr)), flatten(norm(te))
class Fast:
    def __init__(self, ds, bs, seed, shuffle=True):
        self.x, self.y = ds.tensors; self.bs = bs; self.shuffle = shuffle
        self.g = torch.Generator().manual_seed(seed)
    def __len__(self): return (len(self.y) + self.bs - 1) // self.bs
    def __iter__(self):
        idx = torch.randperm(len(self.y), generator=self.g) if self.shuffle else torch.arange(len(self.y))
        for i in range(0, len(idx), self.bs):
            j = idx[i:i + self.bs]; yield self.x[j], self.y[j]
from sparsenn.create.dst import RigL
class RigLAcc(RigL):
    """RigL growing by |mean gradient over the K batches before the update| (scratch)."""
    K = 1
    def observe(self, ctx):
        if self._armed is None: return
        for n, p in ctx.params.items():
            if p.grad is None: continue
            self._acc[n] = self._acc.get(n, 0) + p.grad.detach().float()
        self._cnt += 1
        if self.sp.schedule.is_update_step(self.sp.step_count + 1):
            self._grad = {n: (a / self._cnt).abs().masked_fill(ctx.masks[n], 0) for n, a in self._acc.items()}
            self._acc, self._cnt = {}, 0
        self._armed = None
def arm(sp, K):
    def f():
        nxt = sp.step_count + 1
        want = any(sp.schedule.is_update_step(nxt + j) for j in range(K)) and sp.method.drop_fraction_at(nxt + K) > 0
        sp.method._armed = nxt if want else None
        sp.dense_grads = sp._dense_for_update = want
    return f
import sparsenn.create.dst as D
class RigLProtect(RigL):
    """RigL whose drop step skips the weights grown at the previous update (scratch, to test the cause)."""
    @torch.no_grad()
    def update_masks(self, sparsifier, sparsity):
        if not sparsifier.history:
            return None
        step = sparsifier.step_count
        f = self.drop_fraction_at(step)
        masks, layers = {}, {}
        try:
            for mp in sparsifier.masked:
                old = mp.mask
                active = old.reshape(1, -1)
                k = int(round(f * int(active.sum())))
                score = mp.param.detach().abs().float().reshape(1, -1).clone()
                young = self._grown.get(mp.name)
                if young is not None:
                    score[young.reshape(1, -1)] = float("inf")
                drop = D._pick_drops(active, score, k) if k else torch.zeros_like(active)
                grow = torch.zeros_like(active)
                if drop.any():
                    g = self._grow_score(mp.name, active.shape, lambda t: t.reshape(1, -1), sparsifier.generator)
                    grow = D._pick_grows(~active, g, drop.sum(1))
                new = ((active & ~drop) | grow).reshape(old.shape)
                prev = self._grown.get(mp.name)
                survived = None if prev is None or not prev.any() else int((new & prev).sum())
                layers[mp.name] = {"dropped": int(drop.sum()), "grown": int(grow.sum()), "active": int(new.sum()),
                                   "params": old.numel(), "survived": survived,
                                   "survival": None if survived is None else survived / int(prev.sum()),
                                   "changed": int((new ^ old).sum()), "mask_change": 0.0}
                masks[mp.name] = new
                self._grown[mp.name] = grow.reshape(old.shape)
            self.history.append({"step": int(step), "drop_fraction": f, "layers": layers})
            return masks
        finally:
            self._grad = None
res = {}; diag = {}
for seed in [int(s) for s in cfg["seeds"].split(",")]:
    torch.manual_seed(seed)
    init = LeNet300100() if cfg["model"] == "lenet" else MLP()
    for m in cfg["methods"].split(","):
        t0 = time.time()
        trl, tel = Fast(tr, cfg["batch"], seed), Fast(te, 1000, 0, False)
        torch.manual_seed(1000 + seed)
        model = copy.deepcopy(init)
        steps = cfg["epochs"] * len(trl)
        kw = {}
        if m in ("set", "rigl"):
            kw = dict(total_steps=steps, drop_fraction=cfg["df"], end_fraction=cfg["ef"], drop_schedule=cfg["dsched"])
            if cfg["ue"] > 0: kw["update_every"] = cfg["ue"]
        sp = None
        if m != "dense":
            mm = m
            if m == "rigl" and cfg["protect"]:
                mm = RigLProtect(**kw); kw = {}
            if m == "rigl" and cfg["acc"] > 1:
                mm = RigLAcc(**kw); kw = {}; mm._acc, mm._cnt = {}, 0
            sp = sn.Sparsifier(model, sparsity=cfg["sparsity"], method=mm, distribution=cfg["dist"], seed=10000 + seed, **kw)
            if cfg["rescale"]: sn.rescale_for_sparse_fan_in(model, seed=20000 + seed)
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["mom"], nesterov=bool(cfg["nesterov"]), weight_decay=cfg["wd"])
        if sp: sp.wrap(opt)
        if sp and isinstance(sp.method, RigLAcc):
            sp.method.sp = sp; sp._arm_dense_grads = arm(sp, cfg["acc"]); sp._arm_dense_grads()
        jumps = []; regrow = []
        if sp and m != "static" and cfg["probe"]:
            px, py = tr.tensors[0][:2048], tr.tensors[1][:2048]
            orig = sp.update
            state = {"prev_drop": None}
            def upd(*a, orig=orig, model=model, sp=sp, state=state):
                with torch.no_grad(): l0 = torch.nn.functional.cross_entropy(model(px), py).item()
                old = {n: m.clone() for n, m in sp.masks.items()}
                orig(*a)
                new = sp.masks
                drop = {n: old[n] & ~new[n] for n in old}; grow = {n: new[n] & ~old[n] for n in old}
                if state["prev_drop"] is not None:
                    g = sum(int(grow[n].sum()) for n in old)
                    if g: regrow.append(sum(int((grow[n] & state["prev_drop"][n]).sum()) for n in old) / g)
                state["prev_drop"] = drop
                with torch.no_grad(): l1 = torch.nn.functional.cross_entropy(model(px), py).item()
                jumps.append(l1 - l0)
            sp.update = upd
        sch = cosine_schedule(opt, steps) if cfg["sched"] == "cos" else None
        train(model, trl, opt, epochs=cfg["epochs"], sparsifier=sp, scheduler=sch)
        acc = 100 * evaluate(model, tel)
        nup = len(sp.method.history) if sp and hasattr(sp.method, "history") else 0
        res.setdefault(m, []).append(acc)
        extra = ""
        if sp:
            ms = [mp.mask for mp in sp.masked]
            dead = [int(((m1.sum(1) == 0) | (m2.sum(0) == 0)).sum()) for m1, m2 in zip(ms[:-1], ms[1:])]
            extra += f" dead_hidden={dead}"
        if sp and m != "static":
            surv = [l["survival"] for h in sp.method.history for l in h["layers"].values() if l["survival"] is not None]
            sl = {k: statistics.mean([h["layers"][k]["survival"] for h in sp.method.history if h["layers"][k]["survival"] is not None] or [0]) for k in sp.method.history[0]["layers"]}
            extra += f" survival={statistics.mean(surv):.3f} per_layer=" + ",".join(f"{v:.2f}" for v in sl.values())
            if regrow: extra += f" regrown_prev_dropped={statistics.mean(regrow):.3f}"
            if jumps: extra += f" jump_mean={statistics.mean(jumps):.4f} jump_first5=" + ",".join(f"{j:.3f}" for j in jumps[:5])
            diag.setdefault(m, []).append(statistics.mean(surv))
        print(f"seed={seed} {m:6s} acc={acc:.2f} updates={nup} steps={steps} ({time.time()-t0:.0f}s)" + extra, flush=True)
summary = {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0) for m, v in res.items()}
print("SUMMARY", cfg["tag"], json.dumps({k: v for k, v in cfg.items() if k != "tag"}), " ".join(f"{m}={a:.2f}±{s:.2f}" for m, (a, s) in summary.items()), flush=True)
