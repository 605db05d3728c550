"""``sparsenn bench`` without a source checkout: sparse vs dense inference latency.

For each sparsity a registered model (random initialization, seeded) is pruned by
magnitude, one-shot and uniform, converted to the sparse runtime
(:func:`sparsenn.backend.inference.measure`) and timed against dense PyTorch at each batch
size on random 28x28 inputs. Accuracy does not enter: this measures the runtime, not
the pruning. The literature benchmarks (accuracy vs sparsity on MNIST) are the
``bench/`` scripts of a source checkout (``sparsenn bench --script NAME``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["builtin_bench"]


def builtin_bench(model: str = "lenet300100", sparsities: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99),
                  batch_sizes: Sequence[int] = (1, 64), *, threads: int | None = None, progress: bool = False,
                  print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time the dense and converted ``model`` at each sparsity and batch size; prints a table, returns rows."""
    from ..backend.inference import measure, runtime_convert
    from ..core.progress import Bar
    from ..models.zoo import make_model
    from ..train.sparsifier import Sparsifier
    from .demo import _text_table

    runtime_convert()  # fail before any work when the runtime is missing
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    try:
        example = torch.rand(max(batch_sizes), 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with Bar(len(sparsities), "bench", enabled=progress) as bar:
            for s in sparsities:
                torch.manual_seed(0)
                net = make_model(model)
                sp = Sparsifier(net, s, method="magnitude", schedule="one_shot")
                sp.finalize()
                m = measure(net, example, batch_sizes=batch_sizes)
                rows.append({"sparsity": s, "dense_bytes": m.dense_bytes, "sparse_bytes": m.sparse_bytes,
                             "formats": m.formats, "latency": dict(m.latency)})
                bar.update()
    finally:
        torch.set_num_threads(old)
    head = ["sparsity", "weight KiB (dense -> sparse)"]
    for b in batch_sizes:
        head += [f"b={b} dense ms", f"b={b} sparse ms", f"b={b} speedup"]
    body = []
    for r in rows:
        cells = [f"{r['sparsity']:.0%}", f"{r['dense_bytes'] / 1024:.1f} -> {r['sparse_bytes'] / 1024:.1f}"]
        for b in batch_sizes:
            d, s_ = r["latency"][b]
            cells += [f"{1000 * d:.3f}", f"{1000 * s_:.3f}", f"{d / s_:.2f}x"]
        body.append(cells)
    print_fn(f"{model}: magnitude-pruned (uniform), sparse runtime vs dense PyTorch, "
             f"{torch.get_num_threads() if threads is None else threads} thread(s), median of timed rounds")
    print_fn(_text_table(head, body))
    return rows
