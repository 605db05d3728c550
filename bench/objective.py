"""Sparsity through the objective on MNIST (issue 6): which methods make *exact* zeros?

LeNet-300-100 trained from the same initialization for the same number of epochs by:
plain L1 (its subgradient, through autograd, with SGD), proximal SGD (the same SGD step,
then soft-thresholding: stochastic ISTA), FISTA (restarted every 50 steps), proximal Adam --
all on the same objective ``CE + lambda * sum |w|`` over the Linear weights -- sparse
variational dropout (Molchanov et al. 2017) and gradual magnitude pruning (Zhu & Gupta
2017). SGD has no momentum, so that plain L1 and proximal SGD differ only in how the
penalty enters (with heavy-ball momentum the effective gradient step is lr / (1 - beta)
while the prox still thresholds by lr * lambda). Reported: test error, achieved weight sparsity (exact zeros / Linear
weights), the count of exact zeros and of weights below 1e-3 in magnitude.

Activation sparsity: LeNet-300-100 with an L1 penalty on its ReLU outputs (exact zeros per
layer, measured by ``sparsenn.core.metrics.input_sparsity``), and a 784-196-784 sparse
autoencoder (sigmoid code) with and without the KL(rho || rho_hat) penalty of Ng (2011):
reconstruction MSE, mean code activation rho_hat, fraction of code activations below 0.05.

    python bench/objective.py                 # the full table (under 10 minutes on 2 idle cores)
    python bench/objective.py --quick         # a smoke run on a subset (< 1 minute)

One seed. Every run uses the library's trainer (sparsenn.train.loop) with a per-iteration cosine
learning-rate decay.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import run_meta, write_results  # noqa: E402

import sparsenn as sn  # noqa: E402
from reproduce import MNIST_MEAN, MNIST_STD, _subset, err, normalize  # noqa: E402
from sparsenn import variational  # noqa: E402
from sparsenn.data.datasets import load_idx_dataset, make_loaders  # noqa: E402
from sparsenn.models.zoo import LeNet300100, SparseAutoencoder  # noqa: E402
from sparsenn.train.loop import cosine_schedule, train  # noqa: E402

SMALL = 1e-3  # "near zero" for the small-weight count


@dataclass
class Budget:
    epochs: int = 10
    lr: float = 0.1  # SGD (no momentum) for dense, L1 subgradient, proximal SGD, GMP; and FISTA
    fista_restart: int = 50  # FISTA restarts its momentum every 50 steps (without: diverges at lr 0.1)
    adam_lr: float = 1e-3  # proximal Adam
    svd_lr: float = 3e-3  # Adam for sparse VD
    strengths: tuple = (3e-4, 1e-3)  # lambda of CE + lambda * sum |w|
    svd_kl_scales: tuple = (0.3, 1.0)  # multiples of the ELBO's KL weight 1/N
    gmp_sparsities: tuple = (0.9, 0.98)
    act_l1: float = 1e-3  # ActivationL1 strength on LeNet's ReLUs
    sae_epochs: int = 10
    sae_lr: float = 3e-3  # Adam for the autoencoder
    sae_rho: float = 0.05
    sae_kl: float = 0.03  # beta, the weight of the KL sparsity term (the MSE is a per-pixel mean)
    sae_l1: float = 1e-3
    batch: int = 128


# ----------------------------------------------------------------------------- measurement


def weight_counts(model: nn.Module) -> dict:
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    small = sum(int((w.abs() < SMALL).sum()) for w in weights)
    return {"sparsity": zeros / total, "zeros": zeros, "small": small, "total": total}


def _weights_and_rest(model: nn.Module) -> list[dict]:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    rest = [p for p in model.parameters() if all(p is not w for w in weights)]
    return [{"params": weights}, {"params": rest, "l1": 0.0}]


def fit(model, loader, opt, epochs, loss_fn=None, sp=None, on_step=None, on_epoch=None):
    sched = cosine_schedule(opt, max(1, epochs * len(loader)))
    train(model, loader, opt, epochs=epochs, sparsifier=sp, scheduler=sched, loss_fn=loss_fn,
          on_step=on_step, on_epoch=on_epoch)
    return model


def sgd(params, lr):
    """Plain SGD, the smooth step that proximal SGD adds soft-thresholding to."""
    return torch.optim.SGD(params, lr=lr)


# ----------------------------------------------------------------------------- the weight-sparsity rows


def weight_rows(init, train_loader, test_loader, b: Budget, log):
    """One row per (method, setting), each trained from ``init`` for ``b.epochs`` epochs."""
    ce = nn.functional.cross_entropy
    n_train, steps = len(train_loader.dataset), b.epochs * len(train_loader)

    def dense(_):
        m = copy.deepcopy(init)
        return fit(m, train_loader, sgd(m.parameters(), b.lr), b.epochs)

    def l1_subgradient(lam):
        m = copy.deepcopy(init)
        penalty = sn.L1(m, strength=lam, include=nn.Linear)
        return fit(m, train_loader, sgd(m.parameters(), b.lr), b.epochs, loss_fn=lambda out, y: ce(out, y) + penalty())

    def proximal_sgd(lam):
        m = copy.deepcopy(init)
        return fit(m, train_loader, sn.ProximalSGD(_weights_and_rest(m), lr=b.lr, l1=lam), b.epochs)

    def fista(lam):
        m = copy.deepcopy(init)
        opt = sn.FISTA(_weights_and_rest(m), lr=b.lr, l1=lam, restart_every=b.fista_restart)
        # the parameters hold the extrapolated point: load the sparse iterate x_k after every epoch
        return fit(m, train_loader, opt, b.epochs, on_epoch=lambda *_: opt.load_iterate())

    def proximal_adam(lam):
        m = copy.deepcopy(init)
        return fit(m, train_loader, sn.ProximalAdam(_weights_and_rest(m), lr=b.adam_lr, l1=lam), b.epochs)

    def sparse_vd(kl_scale):
        m = variational.convert(copy.deepcopy(init))
        step = [0]

        def loss_fn(out, y):  # the KL weight is warmed up linearly over the first half (Molchanov et al.)
            warm = min(1.0, step[0] / max(1, steps // 2))
            return ce(out, y) + kl_scale * warm * variational.kl_divergence(m) / n_train

        fit(m, train_loader, torch.optim.Adam(m.parameters(), lr=b.svd_lr), b.epochs, loss_fn=loss_fn,
            on_step=lambda: step.__setitem__(0, step[0] + 1))
        return variational.prune(m)  # log alpha > 3 -> exact zeros under masks

    def gmp(sparsity):
        m = copy.deepcopy(init)
        sched = sn.Polynomial(begin_step=0, end_step=int(steps * 0.7), frequency=max(1, steps // 50))
        sp = sn.Sparsifier(m, sparsity=sparsity, method="magnitude", distribution="global", schedule=sched)
        return fit(m, train_loader, sp.wrap(sgd(m.parameters(), b.lr)), b.epochs, sp=sp)

    runs = [("dense (SGD)", "-", dense, None)]
    for lam in b.strengths:
        runs += [(name, f"lambda={lam:g}", make, lam) for name, make in (
            ("L1 subgradient (SGD)", l1_subgradient), ("proximal SGD (ISTA)", proximal_sgd), ("FISTA", fista),
            ("proximal Adam", proximal_adam))]
    runs += [("sparse VD", f"KL x{k:g}", sparse_vd, k) for k in b.svd_kl_scales]
    runs += [("GMP", f"target={s:.0%}", gmp, s) for s in b.gmp_sparsities]

    rows, models = [], {}
    for method, setting, make, arg in runs:
        t0 = time.time()
        model = make(arg)
        seconds = time.time() - t0
        counts = weight_counts(model)
        sn.masks_from_zeros(model)  # zeros become masks: the library's own count must agree
        assert abs(sn.sparsity(model) - counts["sparsity"]) < 1e-9
        row = {"method": method, "setting": setting, "error": err(model, test_loader), **counts, "seconds": seconds}
        rows.append(row)
        models[(method, setting)] = model
        log(f"  {method:<22} {setting:<14} error={row['error']:.2f}% sparsity={row['sparsity']:.4f} "
            f"zeros={row['zeros']} |w|<{SMALL:g}={row['small']} ({seconds:.0f} s)")
    return rows, models


# ----------------------------------------------------------------------------- activation sparsity


def relu_rows(init, dense_model, train_loader, test_loader, b: Budget, log):
    """LeNet-300-100's hidden ReLU outputs: exact-zero fraction per layer without and with ActivationL1."""
    probe = test_loader.dataset.tensors[0][:2000]

    def record(label, model):
        zeros = sn.metrics.input_sparsity(model, probe)  # the input of fc2 is relu(fc1), of fc3 relu(fc2)
        row = {"method": label, "error": err(model, test_loader), "relu1_zeros": zeros["fc2"],
               "relu2_zeros": zeros["fc3"]}
        log(f"  ReLU {label:<28} error={row['error']:.2f}% zeros relu1={row['relu1_zeros']:.3f} "
            f"relu2={row['relu2_zeros']:.3f}")
        return row

    rows = [record("dense (SGD)", dense_model)]
    m = copy.deepcopy(init)
    with sn.ActivationL1(m, "relu", strength=b.act_l1) as penalty:
        fit(m, train_loader, sgd(m.parameters(), b.lr), b.epochs,
            loss_fn=lambda out, y: nn.functional.cross_entropy(out, y) + penalty())
    rows.append(record(f"activation L1 {b.act_l1:g}", m))
    return rows


def autoencoder_rows(train_x, test_x, b: Budget, seed: int, log):
    """784-196-784 sparse autoencoder on [0, 1] pixels: reconstruction vs sparsity of the sigmoid code."""
    train_loader, _ = make_loaders(TensorDataset(train_x, train_x), TensorDataset(test_x, test_x),
                                   batch_size=b.batch, seed=seed)
    mse = nn.functional.mse_loss
    settings = [("no penalty", None),
                (f"KL rho={b.sae_rho:g}, beta={b.sae_kl:g}",
                 lambda m: sn.ActivationKL(m, "hidden", rho=b.sae_rho, strength=b.sae_kl)),
                (f"L1 on the code {b.sae_l1:g}", lambda m: sn.ActivationL1(m, "hidden", strength=b.sae_l1))]
    rows = []
    for label, make_penalty in settings:
        torch.manual_seed(seed)
        m = SparseAutoencoder(784, 196)
        t0 = time.time()
        penalty = make_penalty(m) if make_penalty else None

        def loss_fn(out, x, penalty=penalty):
            return mse(out, x) if penalty is None else mse(out, x) + penalty()

        fit(m, train_loader, torch.optim.Adam(m.parameters(), lr=b.sae_lr), b.sae_epochs, loss_fn=loss_fn)
        if penalty is not None:
            penalty.remove()
        m.eval()
        with torch.no_grad():
            code = m.encode(test_x)
            row = {"method": label, "mse": mse(m(test_x), test_x).item(), "rho_hat": code.mean().item(),
                   "below_0.05": (code < 0.05).float().mean().item(),
                   "exact_zeros": sn.metrics.activation_sparsity(m, test_x)["hidden"],
                   "seconds": time.time() - t0}
        rows.append(row)
        log(f"  autoencoder {label:<24} mse={row['mse']:.4f} rho_hat={row['rho_hat']:.3f} "
            f"<0.05: {row['below_0.05']:.3f}")
    return rows


# ----------------------------------------------------------------------------- report


def markdown(weight, relu, sae, meta) -> str:
    lines = [f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}; date {meta['date']}; wall time {meta['seconds'] / 60:.1f} min; "
             f"one seed; {meta['epochs']} epochs per row.", "",
             "**LeNet-300-100 on MNIST: weight sparsity from the objective** (sparsity = exact zeros / "
             f"{weight[0]['total']:,} Linear weights)", "",
             f"| method | setting | test error % | sparsity | exact zeros | \\|w\\| < {SMALL:g} |",
             "|---|---|---|---|---|---|"]
    for r in weight:
        lines.append(f"| {r['method']} | {r['setting']} | {r['error']:.2f} | {r['sparsity']:.1%} | "
                     f"{r['zeros']:,} | {r['small']:,} |")
    lines += ["", "**LeNet-300-100: ReLU activation sparsity per layer** (fraction of exact zeros on 2,000 test "
              "images, `sparsenn.core.metrics.input_sparsity`)", "",
              "| model | test error % | relu(fc1) zeros | relu(fc2) zeros |", "|---|---|---|---|"]
    for r in relu:
        lines.append(f"| {r['method']} | {r['error']:.2f} | {r['relu1_zeros']:.1%} | {r['relu2_zeros']:.1%} |")
    lines += ["", "**Sparse autoencoder 784-196-784 (sigmoid code) on MNIST test images** (pixels in [0, 1])", "",
              "| penalty | reconstruction MSE | mean activation rho_hat | code < 0.05 | exact zeros |",
              "|---|---|---|---|---|"]
    for r in sae:
        lines.append(f"| {r['method']} | {r['mse']:.4f} | {r['rho_hat']:.3f} | {r['below_0.05']:.1%} | "
                     f"{r['exact_zeros']:.1%} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small smoke run on a subset (< 1 minute)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per row (default 10; 1 with --quick)")
    ap.add_argument("--train-size", type=int, default=None, help="training images (default all; 3000 with --quick)")
    ap.add_argument("--test-size", type=int, default=None, help="test images (default all; 1000 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("SPARSENN_DATA_DIR")
                    or str(ROOT.parent / "shared" / "datasets"),
                    help="folder holding mnist/ and fashion_mnist/ (default: $SPARSENN_DATA_DIR, else "
                         "../shared/datasets)")
    ap.add_argument("--out", default=None, help="write results JSON and Markdown next to this path prefix")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    start = time.time()
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    budget = Budget()
    if args.quick:
        budget.epochs = budget.sae_epochs = 1
    if args.epochs is not None:
        budget.epochs = budget.sae_epochs = args.epochs
    raw_tr, raw_te = load_idx_dataset("mnist", args.data_dir)
    n_train, n_test = args.train_size or (3000 if args.quick else None), args.test_size or (1000 if args.quick else None)
    if n_train:
        raw_tr = _subset(raw_tr, n_train, 0)
    if n_test:
        raw_te = _subset(raw_te, n_test, 0)
    tr, te = normalize(raw_tr, MNIST_MEAN, MNIST_STD), normalize(raw_te, MNIST_MEAN, MNIST_STD)
    train_loader, test_loader = make_loaders(tr, te, batch_size=budget.batch, seed=args.seed)

    torch.manual_seed(args.seed)
    init = LeNet300100()
    weight, models = weight_rows(init, train_loader, test_loader, budget, log)
    relu = relu_rows(init, models[("dense (SGD)", "-")], train_loader, test_loader, budget, log)
    sae = autoencoder_rows(raw_tr.tensors[0].flatten(1), raw_te.tensors[0].flatten(1), budget, args.seed, log)

    meta = run_meta("objective.py", argv, start, epochs=budget.epochs, budget=asdict(budget))
    md = markdown(weight, relu, sae, meta)
    print(md)
    if args.out:
        write_results(args.out, md, {"meta": meta, "weights": weight, "relu": relu, "autoencoder": sae})
    return weight, relu, sae


if __name__ == "__main__":
    main()
