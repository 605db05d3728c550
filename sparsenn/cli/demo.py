"""``sparsenn demo``: the whole story on one small network, with no data files.

On scikit-learn's bundled 8x8 digits (or MNIST with ``data="mnist"``) a
LeNet-300-100-style MLP is

1. trained dense;
2. copied and pruned to 90% sparsity by gradual magnitude pruning while it keeps
   training (cubic schedule, Zhu & Gupta 2017);
3. trained from scratch at 90% sparsity with RigL (Evci et al. 2020; ERK layer budget);
4. both sparse models are converted to the sparse runtime (:func:`sparsenn.convert`)
   and timed against the dense model at batch sizes 1 and 64.

A table (accuracy, sparsity, weight bytes, latency vs dense) is printed and an HTML
report with plots plus a Markdown summary is written to ``out``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.schedules import Polynomial
from ..data.datasets import make_loaders
from ..models.zoo import LeNet300100
from ..report.html import RunSummary, summary_table, write_report
from ..report.layer_report import report
from ..train.loop import evaluate, train
from ..train.sparsifier import Sparsifier

__all__ = ["DEFAULT_EPOCHS", "run_demo"]

#: (dense, gradual magnitude pruning, RigL from scratch) epochs and batch size per dataset
DEFAULT_EPOCHS = {"digits": (30, 60, 90, 64), "mnist": (4, 8, 12, 128), "fashion_mnist": (4, 8, 12, 128)}


def _text_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), "-" * len(line(head)), *(line(r) for r in body)])


def run_demo(sparsity: float = 0.9, dense_epochs: int | None = None, prune_epochs: int | None = None,
             rigl_epochs: int | None = None, seed: int = 0, *, data: str = "digits", data_dir: str | None = None,
             subset: int | None = None, out: str | Path | None = "sparsenn-demo", convert: bool = True,
             threads: int | None = 1, progress: bool = False, print_fn: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Run the demo; returns its numbers (accuracies, sparsities, latencies, seconds, report paths).

    ``subset``: use only the first N training and N // 4 test samples (tests, smoke runs).
    ``out=None`` writes no report. ``convert=False`` skips the sparse runtime. ``threads``:
    PyTorch intra-op threads while the demo runs (1 by default: the matrices are tiny, and
    one thread is fastest and fair to both dense and sparse timings); ``None`` keeps the
    current setting.
    """
    if data not in DEFAULT_EPOCHS:
        raise ValueError(f"unknown demo data {data!r}; valid: {', '.join(DEFAULT_EPOCHS)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    d_ep, p_ep, r_ep, batch = DEFAULT_EPOCHS[data]
    dense_epochs = d_ep if dense_epochs is None else dense_epochs
    prune_epochs = p_ep if prune_epochs is None else prune_epochs
    rigl_epochs = r_ep if rigl_epochs is None else rigl_epochs
    for name, value in (("dense_epochs", dense_epochs), ("prune_epochs", prune_epochs), ("rigl_epochs", rigl_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(sparsity, dense_epochs, prune_epochs, rigl_epochs, seed, data, data_dir, subset, batch, out,
                    convert, progress, print_fn)
    finally:
        torch.set_num_threads(old_threads)


def _run(sparsity, dense_epochs, prune_epochs, rigl_epochs, seed, data, data_dir, subset, batch, out, convert,
         progress, print_fn) -> dict[str, Any]:
    from .recipes.runner import build_data

    start = time.perf_counter()
    if data != "digits" and data_dir is None:
        raise ValueError(f"--data {data} needs --data-dir DIR (the folder holding the IDX gzip files)")
    train_set, test_set = build_data({"name": data, "data_dir": data_dir, "subset": subset,
                                      "test_subset": None if subset is None else max(1, subset // 4),
                                      "verify": True}, seed)
    train_loader, test_loader = make_loaders(train_set, test_set, batch_size=batch, seed=seed)
    features = train_set.tensors[0][0].numel()
    torch.manual_seed(seed)
    model = LeNet300100(in_features=features)
    side = int(round(features ** 0.5))
    where = "bundled with scikit-learn" if data == "digits" else f"from {data_dir}"
    print_fn(f"{data}: {len(train_set)} train / {len(test_set)} test images ({side}x{side}, {where})")
    print_fn(f"model: LeNet-300-100-style MLP {features}-300-100-10, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters")

    # 1. dense
    train(model, train_loader, torch.optim.Adam(model.parameters(), lr=1e-3), epochs=dense_epochs,
          progress="dense" if progress else False)
    dense_acc = evaluate(model, test_loader)
    print_fn(f"1. dense: {dense_epochs} epochs, test accuracy {dense_acc:.2%}")

    # 2. gradual magnitude pruning of a copy, while training on
    pruned = copy.deepcopy(model)
    steps = prune_epochs * len(train_loader)
    schedule = Polynomial(begin_step=0, end_step=max(1, int(steps * 2 / 3)), frequency=max(1, steps // 60),
                          exponent=3)
    sp = Sparsifier(pruned, sparsity=sparsity, method="magnitude", schedule=schedule)
    train(pruned, train_loader, sp.wrap(torch.optim.Adam(pruned.parameters(), lr=5e-4)), epochs=prune_epochs,
          sparsifier=sp, progress="prune (GMP)" if progress else False)
    pruned_acc = evaluate(pruned, test_loader)
    example = next(iter(test_loader))[0]
    gmp_report = report(pruned, example_input=example)
    sp.finalize()  # plain parameters with exact zeros
    print_fn(f"2. gradual magnitude pruning to {sparsity:.0%} (cubic over {schedule.end_step} of {steps} steps): "
             f"test accuracy {pruned_acc:.2%}")

    # 3. RigL from scratch
    torch.manual_seed(seed + 1)
    rigl = LeNet300100(in_features=features)
    steps = rigl_epochs * len(train_loader)
    update_every = max(1, min(100, steps // 40))
    sp = Sparsifier(rigl, sparsity=sparsity, method="rigl", distribution="erk", total_steps=steps,
                    update_every=update_every, drop_fraction=0.3, seed=seed)
    from ..create.init import rescale_for_sparse_fan_in

    rescale_for_sparse_fan_in(rigl, seed=seed)
    train(rigl, train_loader, sp.wrap(torch.optim.Adam(rigl.parameters(), lr=1e-3)), epochs=rigl_epochs,
          sparsifier=sp, progress="RigL" if progress else False)
    rigl_acc = evaluate(rigl, test_loader)
    rigl_report = report(rigl, example_input=example, sparsifier=sp)
    sp.finalize()
    print_fn(f"3. RigL from scratch at {sparsity:.0%} (ERK, update every {update_every} of {steps} steps): "
             f"test accuracy {rigl_acc:.2%}")

    # 4. the sparse runtime
    measured: dict[str, Any] = {"dense": None, "gmp": None, "rigl": None}
    notes: list[str] = []
    if convert:
        from ..backend.inference import RuntimeUnavailable, measure

        try:
            measured["gmp"] = measure(pruned, example, progress=progress)
            measured["rigl"] = measure(rigl, example, progress=progress)
            print_fn("4. converted both to the sparse runtime and timed them against the dense model")
        except RuntimeUnavailable as e:
            notes.append(f"Latency not measured: {e}.")
            print_fn(f"4. conversion skipped: {e}")

    dense_run = RunSummary("dense", dense_acc, 0.0)
    dense_run.dense_bytes = dense_run.sparse_bytes = sum(p.numel() * p.element_size() for name, p in
                                                         model.named_parameters() if name.endswith("weight"))
    runs = [dense_run,
            RunSummary.from_model(f"GMP {sparsity:.0%}", pruned, gmp_report, accuracy=pruned_acc,
                                  inference=measured["gmp"]),
            RunSummary.from_model(f"RigL {sparsity:.0%}", rigl, rigl_report, accuracy=rigl_acc,
                                  inference=measured["rigl"])]
    if measured["gmp"] is not None:  # the dense row: its own timing is the reference
        runs[0].latency = {b: (d, d) for b, (d, _) in measured["gmp"].latency.items()}
    print_fn("")
    print_fn(_text_table(*summary_table(runs)))
    result: dict[str, Any] = {
        "dense_accuracy": dense_acc, "pruned_accuracy": pruned_acc, "rigl_accuracy": rigl_acc,
        "sparsity": gmp_report.total.sparsity, "rigl_sparsity": rigl_report.total.sparsity,
        "latency": {k: v.latency for k, v in measured.items() if v is not None}, "files": {},
    }
    if out is not None:
        title = f"sparsenn demo: LeNet-300-100 on {data}, {sparsity:.0%} sparse"
        description = (f"Dense training ({dense_epochs} epochs), gradual magnitude pruning of a copy "
                       f"({prune_epochs} epochs, cubic schedule), RigL from scratch ({rigl_epochs} epochs, ERK), "
                       f"both converted to the sparse runtime and timed against the dense model.")
        result["files"] = write_report(out, runs, title=title, description=description, notes=notes)
    result["seconds"] = time.perf_counter() - start
    for kind, path in result["files"].items():
        print_fn(f"{kind} report: {path}")
    print_fn(f"done in {result['seconds']:.1f} s")
    return result
