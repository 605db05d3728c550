"""One-row (token-by-token decoding) products of SmolLM2's layer shapes, weights cold: ``nn.Linear`` fp32,
``dense_int8`` and ``bitmask_int8`` at 50/70/90% unstructured sparsity, microseconds per call.

Each kernel rotates over ``--matrices`` distinct copies of its weight (default 30, more until its copies
hold at least ``--min-mb`` MB, twice a 32 MB L3) so that, as in a model decoding, every call reads its
weight from memory rather than from the caches. The activations stay the same (hot). Each timing is the
best of ``--repeats`` passes of ``--rounds`` sweeps over the copies, the kernels taking turns.

    python bench/bitmask_decode.py --threads 2
    python bench/bitmask_decode.py --threads 1 --min-mb 0   # 30 copies: some kernels' fit in a 32 MB L3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sparsenn.backend import kernels as K

SHAPES = ((1536, 576), (576, 1536), (576, 576), (192, 576))  # SmolLM2-135M: mlp up/gate, down, q/o, k/v
SPARSITIES = (0.5, 0.7, 0.9)


def _weight(out: int, cols: int, sparsity: float, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    w = g.standard_normal((out, cols)).astype(np.float32)
    w[g.random((out, cols)) < sparsity] = 0
    return w


def _time(kernels: dict, x, y, rounds: int, repeats: int) -> dict:
    """Best over ``repeats`` of the mean microseconds per call of each ``kernels[name]`` (a list of calls,
    ``rounds`` sweeps over it). The kernels take turns within every repeat, so that a burst of other work
    on the machine does not fall on one of them only."""
    for calls in kernels.values():  # warm up: compile, fault in pages
        for f in calls:
            f(x, y)
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(repeats):
        for name, calls in kernels.items():
            t0 = time.perf_counter()
            for _ in range(rounds):
                for f in calls:
                    f(x, y)
            best[name] = min(best[name], (time.perf_counter() - t0) / (rounds * len(calls)))
    return {name: t * 1e6 for name, t in best.items()}


def _copies(p: K.Packed, n: int) -> list[K.Packed]:
    return [K.Packed(p.kernel, {k: v.copy() for k, v in p.arrays.items()}, dict(p.meta)) for _ in range(n)]


def _count(nbytes: int, args) -> int:
    return max(args.matrices, int(np.ceil(args.min_mb * 2**20 / nbytes)))


def _row_calls(name: str, w: np.ndarray, args, bias: np.ndarray):
    p = K.pack(w, name)
    row = K.KERNELS.get(name).row
    return [row(q.arrays, q.meta, bias) for q in _copies(p, _count(p.nbytes, args))]


def _linear_calls(w: np.ndarray, args, bias: np.ndarray):
    calls = []
    for _ in range(_count(w.nbytes, args)):
        wt, bt = torch.from_numpy(w.copy()), torch.from_numpy(bias.copy())

        def f(x, y, wt=wt, bt=bt):  # as a model calls it: a (1, in) row, a new output
            return torch.nn.functional.linear(x[None], wt, bt)
        calls.append(f)
    return calls


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--matrices", type=int, default=30, help="distinct weight copies per kernel (at least)")
    ap.add_argument("--min-mb", type=float, default=64.0,
                    help="more copies until the dense_int8 ones hold this many MB (0: exactly --matrices)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="OUTxIN,...")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--no-linear", action="store_true", help="skip nn.Linear fp32 (F.linear, weights as copies)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print(f"threads {torch.get_num_threads()}, copies >= {args.matrices} and >= {args.min_mb:g} MB per kernel, "
          f"rounds {args.rounds}, best of {args.repeats}; us per call")
    head = "| out x in | nn.Linear fp32 | dense_int8 |" + "".join(
        f" bitmask_int8 {s:.0%} (/ dense_int8) |" for s in sparsities)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for out, cols in shapes:
        x = torch.randn(cols)
        y = torch.empty(out)
        bias = np.random.default_rng(7).standard_normal(out).astype(np.float32)
        w = _weight(out, cols, 0.0, seed=1)
        kernels = {} if args.no_linear else {"linear": _linear_calls(w, args, bias)}
        kernels["dense_int8"] = _row_calls("dense_int8", w, args, bias)
        for s in sparsities:
            kernels[s] = _row_calls("bitmask_int8", _weight(out, cols, s, seed=2), args, bias)
        t = _time(kernels, x, y, args.rounds, args.repeats)
        del kernels
        lin = "-" if args.no_linear else f"{t['linear']:.1f}"
        dense = t["dense_int8"]
        cells = [f"{t[s]:.1f} ({t[s] / dense:.2f})" for s in sparsities]
        print(f"| {out}x{cols} | {lin} | {dense:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
