"""``sparsenn demo``: dense training, then gradual magnitude pruning to 90%, with a report.

On scikit-learn's bundled 8x8 digits (no files, no network) a LeNet-300-100-style MLP
with 64 inputs is trained dense; a copy is pruned to 90% sparsity by gradual
magnitude pruning with the cubic schedule (Zhu & Gupta 2017) while it keeps training,
then finalized. The per-layer report and the accuracy before and after are printed.
"""

from __future__ import annotations

import copy
import time

import torch

from .data import load_digits_tensors, make_loaders
from .models import LeNet300100
from .report import report
from .schedules import Polynomial
from .sparsifier import Sparsifier
from .train import evaluate, train


def run_demo(sparsity: float = 0.9, dense_epochs: int = 30, prune_epochs: int = 60, seed: int = 0,
             print_fn=print) -> dict:
    """Run the demo; returns its numbers (accuracies, sparsity, seconds)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    train_set, test_set = load_digits_tensors(seed=seed)
    train_loader, test_loader = make_loaders(train_set, test_set, batch_size=64, seed=seed)
    model = LeNet300100(in_features=64)
    print_fn(f"digits: {len(train_set)} train / {len(test_set)} test images (8x8, bundled with scikit-learn)")
    print_fn(f"model: LeNet-300-100 style MLP 64-300-100-10, {sum(p.numel() for p in model.parameters()):,} parameters")

    train(model, train_loader, torch.optim.Adam(model.parameters(), lr=1e-3), epochs=dense_epochs)
    dense_acc = evaluate(model, test_loader)
    print_fn(f"dense: {dense_epochs} epochs, test accuracy {dense_acc:.2%}")

    pruned = copy.deepcopy(model)
    steps = prune_epochs * len(train_loader)
    schedule = Polynomial(begin_step=0, end_step=int(steps * 2 / 3), frequency=max(1, steps // 60), exponent=3)
    sp = Sparsifier(pruned, sparsity=sparsity, method="magnitude", schedule=schedule)
    opt = sp.wrap(torch.optim.Adam(pruned.parameters(), lr=5e-4))
    train(pruned, train_loader, opt, epochs=prune_epochs, sparsifier=sp)
    pruned_acc = evaluate(pruned, test_loader)

    example = next(iter(test_loader))[0]
    rep = report(pruned, example_input=example)
    print_fn("")
    print_fn(f"gradual magnitude pruning to {sparsity:.0%} (cubic schedule over {schedule.end_step} of {steps} steps):")
    print_fn(str(rep))
    print_fn("")
    sp.finalize()  # plain parameters with exact zeros
    result = {
        "dense_accuracy": dense_acc, "pruned_accuracy": pruned_acc, "sparsity": rep.total.sparsity,
        "seconds": time.perf_counter() - start,
    }
    print_fn(f"{'model':<8} {'accuracy':>9} {'sparsity':>9}")
    print_fn(f"{'dense':<8} {dense_acc:>9.2%} {0:>9.1%}")
    print_fn(f"{'pruned':<8} {pruned_acc:>9.2%} {result['sparsity']:>9.1%}")
    print_fn(f"done in {result['seconds']:.1f} s")
    return result
