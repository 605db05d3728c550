"""Literature reproduction on MNIST: test error vs sparsity for the classic pruning methods.

LeNet-300-100 and LeNet-5 (Caffe) at 80/90/95/98% sparsity, for: dense, random
pruning at init, one-shot magnitude + fine-tuning, iterative pruning and fine-tuning
(IPFT, Han et al. 2015), gradual magnitude pruning (GMP, Zhu & Gupta 2017), lottery
tickets (Frankle & Carbin 2019) vs their random re-initialization, SNIP (Lee et al.
2019) and GraSP (Wang et al. 2020); mean and spread over seeds. Plus one structured
row: SmallVGG on Fashion-MNIST with 50% of channels removed by Network Slimming vs
L1-filter vs random (accuracy and FLOPs).

    python bench/reproduce.py                 # the full table (about an hour on 2 cores)
    python bench/reproduce.py --quick         # a smoke run on a subset (< 3 minutes)

Every run uses the library's built-in trainer (sparsenn.train.loop) and Sparsifier.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import run_meta, write_results  # noqa: E402

import sparsenn as sn  # noqa: E402
from sparsenn.data.datasets import load_idx_dataset, make_loaders  # noqa: E402
from sparsenn.models.zoo import LeNet5, LeNet300100, SmallVGG  # noqa: E402
from sparsenn.train.loop import cosine_schedule, evaluate, train  # noqa: E402

NEVER = sn.OneShot(begin_step=10**12)  # a schedule that never fires: masks are set by hand


@dataclass
class Budget:
    dense_epochs: int  # dense training, also round 0 of the lottery ticket
    scratch_epochs: int  # training a sparse network from initialization (random, SNIP, GraSP, LTH)
    ft_epochs: int  # fine-tuning after one-shot pruning and after each IPFT round
    gmp_epochs: int  # gradual pruning during training from the dense model
    pai_epochs: int  # training the sparse network found by SNIP or GraSP (pruning at initialization)
    pai_lr: float = 0.1  # learning rate for the random, SNIP and GraSP rows
    lr: float = 0.1  # SGD, Nesterov momentum 0.9, weight decay 5e-4, per-iteration cosine decay
    ft_lr_scale: float = 0.3  # Han et al.: fine-tune at a reduced learning rate
    weight_decay: float = 5e-4
    batch: int = 128


@dataclass
class Setup:
    name: str
    make: callable
    budget: Budget
    sparsities: list[float]
    extra_snip: list[float] = field(default_factory=list)  # SNIP's published point (99% for LeNet-5)
    ipft_extra: list[float] = field(default_factory=lambda: [0.92])  # Han et al.'s published point (92%)
    ipft_levels: list[float] = field(default_factory=lambda: [0.5, 0.7])  # extra IPFT rounds before the first target
    pai_init: str = "default"  # "xavier": Glorot-normal weights before SNIP/GraSP scoring, as in Lee et al. 2019


def variance_scaling_init(model):
    """Glorot-normal weights and zero biases for Linear/Conv layers (the VS init of Lee et al. 2019, SNIP)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return model


def prune_at_init(init, setup, method, sparsity, score_batch, seed, distribution="global"):
    """A mask fixed at initialization (random, SNIP or GraSP), survivors rescaled for their sparse fan-in."""
    m = copy.deepcopy(init)
    if setup.pai_init == "xavier" and method != "random":
        variance_scaling_init(m)
    sp = sn.Sparsifier(m, sparsity=sparsity, method=method, distribution=distribution,
                       data=None if method == "random" else [score_batch], seed=seed)
    sn.rescale_for_sparse_fan_in(m, seed=seed)
    return m, sp


def fit(model, loader, epochs, lr, sp=None, penalty=None, weight_decay=5e-4):
    """SGD (Nesterov) with per-iteration cosine decay; the sparsifier (if any) wraps the optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if sp is not None:
        sp.wrap(opt)
    sched = cosine_schedule(opt, max(1, epochs * len(loader)))
    train(model, loader, opt, epochs=epochs, sparsifier=sp, scheduler=sched,
          after_backward=None if penalty is None else penalty.apply_)
    return model


def masked(model, **kw):
    """A Sparsifier that only changes masks when told (``sp.update``)."""
    return sn.Sparsifier(model, sparsity=kw.pop("sparsity", 0.0), schedule=NEVER, **kw)


def err(model, loader):
    return 100.0 * (1.0 - evaluate(model, loader))


def run_setup(setup: Setup, seed: int, train_loader, test_loader, score_batch, log):
    b = setup.budget
    rows = []  # (method, sparsity target, achieved sparsity, error)

    def record(method, target, model):
        e = err(model, test_loader)
        rows.append((method, target, sn.sparsity(model), e))
        log(f"  {setup.name} seed={seed} {method:<16} target={target:.2f} sparsity={sn.sparsity(model):.4f} "
            f"error={e:.2f}%")

    torch.manual_seed(seed)
    init = setup.make()
    theta0 = copy.deepcopy(init.state_dict())

    # dense (also the lottery ticket's round 0 and the start of one-shot, IPFT and GMP)
    dense = fit(copy.deepcopy(init), train_loader, b.dense_epochs, b.lr)
    record("dense", 0.0, dense)

    for s in setup.sparsities:
        # random pruning at initialization (uniform per layer)
        m, sp = prune_at_init(init, setup, "random", s, None, seed, distribution="uniform")
        record("random", s, fit(m, train_loader, b.pai_epochs, b.pai_lr, sp))

        # one-shot global magnitude pruning + fine-tuning
        m = copy.deepcopy(dense)
        sp = sn.Sparsifier(m, sparsity=s, method="magnitude", distribution="global")
        record("one-shot+FT", s, fit(m, train_loader, b.ft_epochs, b.lr * b.ft_lr_scale, sp))

        # gradual magnitude pruning (cubic) while training on from the dense model
        m = copy.deepcopy(dense)
        steps = b.gmp_epochs * len(train_loader)
        sched = sn.Polynomial(begin_step=0, end_step=int(steps * 0.7), frequency=max(1, steps // 50))
        sp = sn.Sparsifier(m, sparsity=s, method="magnitude", distribution="global", schedule=sched)
        record("GMP", s, fit(m, train_loader, b.gmp_epochs, b.lr * b.ft_lr_scale, sp))

        # pruning at initialization: SNIP and GraSP on one batch, then train the sparse network
        for method in ("snip", "grasp"):
            m, sp = prune_at_init(init, setup, method, s, score_batch, seed)
            record(method.upper() if method == "snip" else "GraSP", s, fit(m, train_loader, b.pai_epochs, b.pai_lr, sp))

    for s in setup.extra_snip:
        m, sp = prune_at_init(init, setup, "snip", s, score_batch, seed)
        record("SNIP", s, fit(m, train_loader, b.pai_epochs, b.pai_lr, sp))

    # iterative pruning and fine-tuning (Han et al. 2015): one trajectory through every level
    m = copy.deepcopy(dense)
    sp = masked(m, distribution="global")
    for s in sorted(set(setup.ipft_levels) | set(setup.sparsities) | set(setup.ipft_extra)):
        sp.update(s)
        fit(m, train_loader, b.ft_epochs, b.lr * b.ft_lr_scale, sp)
        if s in setup.sparsities or s in setup.ipft_extra:
            record("IPFT", s, m)

    # lottery ticket (iterative magnitude pruning, reset to theta_0) vs random re-initialization
    ticket = copy.deepcopy(dense)
    sp = masked(ticket, distribution="global")
    for s in setup.sparsities:
        sp.update(s)  # prune the trained weights further
        with torch.no_grad():  # reset the survivors to theta_0
            for name, p in ticket.named_parameters():
                p.copy_(theta0[name])
        sn.apply_masks(ticket)
        fit(ticket, train_loader, b.scratch_epochs, b.lr, sp)
        record("LTH", s, ticket)
        torch.manual_seed(10_000 + 100 * seed + round(100 * s))
        control = setup.make()  # fresh random initialization, the ticket's masks
        _copy_masks(ticket, control)
        csp = masked(control, distribution="global")
        record("LTH reinit", s, fit(control, train_loader, b.scratch_epochs, b.lr, csp))
    return rows


def _copy_masks(src, dst):
    from sparsenn.core.masks import load_masks

    load_masks(dst, {n: m.clone() for n, m in sn.get_masks(src).items()})


def structured_row(fashion_root, seed, quick, log):
    """SmallVGG on Fashion-MNIST, 50% of channels removed: Network Slimming vs L1-filter vs random."""
    from sparsenn import structured

    tr, te = load_idx_dataset("fashion_mnist", fashion_root)
    tr, te = normalize(tr, 0.2860, 0.3530), normalize(te, 0.2860, 0.3530)
    if quick:
        tr, te = _subset(tr, 2000, seed), _subset(te, 1000, seed)
    train_loader, test_loader = make_loaders(tr, te, batch_size=128, seed=seed)
    epochs, ft = (1, 1) if quick else (3, 2)
    make = lambda: SmallVGG(widths=(16, 32, 64))  # noqa: E731
    example = next(iter(test_loader))[0]
    torch.manual_seed(seed)
    base = make()
    results = []
    dense = fit(copy.deepcopy(base), train_loader, epochs, 0.1)
    dense_macs = structured.structured_macs(dense, example)[0]
    results.append(("dense", 0.0, err(dense, test_loader), dense_macs, dense_macs))
    slim = copy.deepcopy(base)
    fit(slim, train_loader, epochs, 0.1, penalty=structured.SlimmingPenalty(slim, strength=1e-4))
    for label, start, method in (("Network Slimming", slim, "bn_gamma"), ("L1-filter", dense, "l1_filter"),
                                 ("random channels", dense, "random")):
        m = copy.deepcopy(start)
        sp = sn.Sparsifier(m, sparsity=0.5, method=method, pattern="channel", include=torch.nn.Conv2d,
                           distribution="global" if method == "bn_gamma" else "uniform",
                           schedule=NEVER, seed=seed)
        sp.update(0.5)
        structured.couple_batchnorm(sp)
        fit(m, train_loader, ft, 0.03, sp)
        d, eff = structured.structured_macs(m, example)
        results.append((label, 0.5, err(m, test_loader), d, eff))
        log(f"  structured {label:<17} error={results[-1][2]:.2f}% MACs {d / 1e6:.2f}M -> {eff / 1e6:.2f}M")
    return results


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual per-pixel statistics of the MNIST training set


def normalize(ds, mean, std):
    return TensorDataset((ds.tensors[0] - mean) / std, ds.tensors[1])


def _subset(ds, n, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n]
    return TensorDataset(*(t[idx] for t in ds.tensors))


def summarize(all_rows):
    """{(model, method, target): (mean err, std err, mean sparsity, n)}"""
    groups: dict = {}
    for model, method, target, achieved, e in all_rows:
        groups.setdefault((model, method, target), []).append((achieved, e))
    out = {}
    for key, vals in groups.items():
        errs = [v[1] for v in vals]
        out[key] = (statistics.mean(errs), statistics.stdev(errs) if len(errs) > 1 else 0.0,
                    statistics.mean(v[0] for v in vals), len(vals))
    return out


METHOD_ORDER = ["dense", "random", "one-shot+FT", "IPFT", "GMP", "LTH", "LTH reinit", "SNIP", "GraSP"]


def markdown(summary, structured_rows, meta):
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; date {meta['date']}; "
             f"wall time {meta['seconds'] / 60:.1f} min; seeds {meta['seeds']}.", ""]
    models = sorted({k[0] for k in summary}, key=["LeNet-300-100", "LeNet-5"].index)
    for model in models:
        targets = sorted({k[2] for k in summary if k[0] == model and k[2] > 0})
        lines += [f"**{model}** (test error %, mean ± std over seeds; achieved sparsity in parentheses)", "",
                  "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        for method in METHOD_ORDER:
            cells = []
            for t in targets:
                key = (model, method, 0.0 if method == "dense" else t)
                if key in summary:
                    m, s, sp, _ = summary[key]
                    cells.append(f"{m:.2f} ± {s:.2f} ({sp:.1%})")
                else:
                    cells.append("")
            if any(cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if structured_rows:
        lines += ["**SmallVGG (16-32-64) on Fashion-MNIST, 50% of conv channels removed** (MACs count only live "
                  "input and output channels)", "", "| criterion | test error % | MACs | reduction |", "|---|---|---|---|"]
        for label, _, e, d, eff in structured_rows:
            lines.append(f"| {label} | {e:.2f} | {eff / 1e6:.2f}M | {d / eff:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small smoke run (< 3 minutes)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    ap.add_argument("--data-dir", default=os.environ.get("SPARSENN_DATA_DIR")
                    or str(ROOT.parent / "shared" / "datasets"),
                    help="folder holding mnist/ and fashion_mnist/ (default: $SPARSENN_DATA_DIR, else "
                         "../shared/datasets)")
    ap.add_argument("--models", default="lenet300100,lenet5")
    ap.add_argument("--no-structured", action="store_true", help="skip the structured (SmallVGG) row")
    ap.add_argument("--structured-only", action="store_true", help="only the structured (SmallVGG) row")
    ap.add_argument("--out", default=None, help="write results JSON and Markdown next to this path prefix")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    seeds = args.seeds or (1 if args.quick else 3)
    start = time.time()
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    tr, te = load_idx_dataset("mnist", args.data_dir)
    tr, te = normalize(tr, MNIST_MEAN, MNIST_STD), normalize(te, MNIST_MEAN, MNIST_STD)
    if args.quick:
        tr, te = _subset(tr, 6000, 0), _subset(te, 2000, 0)
    setups = {
        "lenet300100": Setup("LeNet-300-100", LeNet300100,
                             Budget(dense_epochs=20, scratch_epochs=6, ft_epochs=4, gmp_epochs=6, pai_epochs=10),
                             [0.8, 0.9, 0.95, 0.98]),
        # channels_last: 2.3x faster convolutions on this CPU (4.4 s vs 10.3 s per epoch)
        "lenet5": Setup("LeNet-5", lambda: LeNet5().to(memory_format=torch.channels_last),
                        Budget(dense_epochs=12, scratch_epochs=3, ft_epochs=3, gmp_epochs=3, pai_epochs=4, pai_lr=0.05,
                               lr=0.02),
                        [0.8, 0.9, 0.95, 0.98], extra_snip=[0.99], pai_init="xavier"),
    }
    if args.quick:
        for s in setups.values():
            s.budget = Budget(dense_epochs=2, scratch_epochs=1, ft_epochs=1, gmp_epochs=1, pai_epochs=1,
                              lr=s.budget.lr)
            s.sparsities = [0.9]
            s.extra_snip = []
            s.ipft_extra = []
    all_rows = []
    for key in [] if args.structured_only else args.models.split(","):
        if key not in setups:
            ap.error(f"unknown model {key!r}; valid: {', '.join(setups)}")
        setup = setups[key]
        for seed in range(seeds):
            train_loader, test_loader = make_loaders(tr, te, batch_size=setup.budget.batch, seed=seed)
            score_batch = next(iter(DataLoader(tr, batch_size=100, shuffle=True,
                                               generator=torch.Generator().manual_seed(seed))))
            t0 = time.time()
            for method, target, achieved, e in run_setup(setup, seed, train_loader, test_loader, score_batch, log):
                all_rows.append((setup.name, method, target, achieved, e))
            log(f"{setup.name} seed {seed}: {time.time() - t0:.0f} s")
    structured_rows = [] if args.no_structured else structured_row(args.data_dir, 0, args.quick, log)
    summary = summarize(all_rows)
    meta = run_meta("reproduce.py", argv, start, seeds=seeds)
    md = markdown(summary, structured_rows, meta)
    print(md)
    if args.out:
        write_results(args.out, md, {"meta": meta, "rows": all_rows, "structured": structured_rows})
    return summary, structured_rows


if __name__ == "__main__":
    main()
