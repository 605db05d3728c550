"""Federated averaging on MNIST with sparse communication (issue 19): accuracy vs bytes communicated.

FedAvg (McMahan et al. 2017) with 20 clients, every client in every round, the 784-200-200-10
ReLU MLP of that paper ("2NN", 199,210 parameters), plain SGD on the clients (lr 0.05, batch
50, one local epoch per round), run through ``sparsenn.federated.simulate``: every exchange is a
real message whose bytes are counted (headers included, no transport framing). Two splits of
the 60,000 training images: IID (3,000 random images per client) and non-IID (every client
holds exactly two classes, 3,000 images). Methods:

* ``dense``: float32 updates up, the whole model down;
* ``top10_ef`` / ``top1_ef``: the 10% / 1% largest entries of each tensor's update, with error
  feedback on each client; the whole model down;
* ``top1_ef_both``: top-1% with error feedback both ways (the server compresses the averaged update);
* ``stc``: Sparse Ternary Compression at 1% both ways with error feedback (Sattler et al. 2019);
* ``sparse90``: the model pruned to 90% at initialization (magnitude, ERK, sparse fan-in rescale)
  whose mask the server fixes; clients train under it and send the kept values only; the kept
  values down (the mask once).

Rows go to ``PREFIX.rows.jsonl`` as they finish (a rerun resumes); ``--shard I/N`` runs every
N-th job. ``PREFIX.md`` / ``.json`` get one table per split, ``PREFIX.png`` accuracy against the
cumulative bytes (up + down).

    python bench/federated.py --shard 0/2 & python bench/federated.py --shard 1/2   # two processes
    python bench/federated.py --quick                                              # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import log, run_meta, write_results

import sparsenn as sn
from sparsenn.data.datasets import load_idx_dataset
from sparsenn.federated import (
    classes_per_client_split,
    client_datasets,
    iid_split,
    simulate,
)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLITS = {"iid": "IID", "noniid": "non-IID (2 classes per client)"}
METHODS = {  # name: (label, simulate keyword arguments, sparse model)
    "dense": ("dense", {}, False),
    "top10_ef": ("top-10% + EF", {"compressor": {"name": "topk", "fraction": 0.1}}, False),
    "top1_ef": ("top-1% + EF", {"compressor": {"name": "topk", "fraction": 0.01}}, False),
    "top1_ef_both": ("top-1% + EF, both ways", {"compressor": {"name": "topk", "fraction": 0.01},
                                               "downlink": {"name": "topk", "fraction": 0.01}}, False),
    "stc": ("STC 1%, both ways", {"compressor": {"name": "stc", "fraction": 0.01},
                                  "downlink": {"name": "stc", "fraction": 0.01}}, False),
    "sparse90": ("90%-sparse model (server mask)", {}, True),
}
TARGETS = (0.85, 0.90, 0.95)  # report the bytes spent until the test accuracy first reaches these


def mlp() -> nn.Module:
    """McMahan et al.'s 2NN: 784-200-200-10 with ReLU."""
    return nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))


def model_fn(sparse: bool, seed: int):
    def build() -> nn.Module:
        torch.manual_seed(seed)
        model = mlp()
        if sparse:  # masks the server fixes: one-shot magnitude at initialization, ERK densities
            sn.Sparsifier(model, sparsity=0.9, distribution="erk", seed=10_000 + seed)
            sn.rescale_for_sparse_fan_in(model, seed=20_000 + seed)
        return model
    return build


def load_data(data_dir: str, train_size: int | None, test_size: int | None):
    tr, te = load_idx_dataset("mnist", data_dir, flatten=True)
    tr = TensorDataset((tr.tensors[0] - MNIST_MEAN) / MNIST_STD, tr.tensors[1])
    te = TensorDataset((te.tensors[0] - MNIST_MEAN) / MNIST_STD, te.tensors[1])
    if train_size:
        tr = TensorDataset(*(t[:train_size] for t in tr.tensors))
    if test_size:
        te = TensorDataset(*(t[:test_size] for t in te.tensors))
    return tr, te


def run(split: str, method: str, data, args) -> dict:
    tr, te = data
    labels = tr.tensors[1]
    parts = (iid_split(len(labels), args.clients, seed=args.seed) if split == "iid"
             else classes_per_client_split(labels, args.clients, 2, seed=args.seed))
    label, kwargs, sparse = METHODS[method]
    t0 = time.time()

    def progress(r):
        if r.round % 10 == 0 or r.round == args.rounds:
            log(f"  {split} {method} round {r.round}: accuracy {r.accuracy:.4f} ({time.time() - t0:.0f} s)")

    result = simulate(model_fn(sparse, args.seed), client_datasets(tr, parts), rounds=args.rounds, test_data=te,
                      local_epochs=args.local_epochs, lr=args.lr, batch_size=args.batch, seed=args.seed,
                      on_round=progress, **kwargs)
    up = down = 0
    curve = []
    for r in result.rounds:
        up, down = up + r.bytes_up, down + r.bytes_down
        curve.append({"round": r.round, "accuracy": r.accuracy, "bytes_up": up, "bytes_down": down})
    return {"key": f"{split}/{method}", "split": split, "method": method, "label": label, "curve": curve,
            "accuracy": result.accuracy, "best": max(c["accuracy"] for c in curve), "bytes_up": up,
            "bytes_down": down, "sparsity": sn.sparsity(result.model), "seconds": time.time() - t0}


def _mb(b: float) -> str:
    return f"{b / 1e6:,.2f}"


def _reach(row: dict, target: float) -> str:
    hit = next((c for c in row["curve"] if c["accuracy"] >= target), None)
    return "not reached" if hit is None else f"{_mb(hit['bytes_up'] + hit['bytes_down'])} (round {hit['round']})"


def table(rows: list[dict], split: str) -> str:
    rows = [r for r in rows if r["split"] == split]
    rows.sort(key=lambda r: list(METHODS).index(r["method"]))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    head = ("| method | final acc. | best acc. | up MB | down MB | total MB | dense total / total | "
            + " | ".join(f"MB to {t:.0%}" for t in TARGETS) + " |")
    lines = [head, "|" + "---|" * (7 + len(TARGETS))]
    for r in rows:
        total = r["bytes_up"] + r["bytes_down"]
        ratio = f"{(dense['bytes_up'] + dense['bytes_down']) / total:.1f}x" if dense else "-"
        lines.append(f"| {r['label']} | {r['accuracy']:.4f} | {r['best']:.4f} | {_mb(r['bytes_up'])} | "
                     f"{_mb(r['bytes_down'])} | {_mb(total)} | {ratio} | "
                     + " | ".join(_reach(r, t) for t in TARGETS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, clients: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.8), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for r in sorted((r for r in rows if r["split"] == split), key=lambda r: list(METHODS).index(r["method"])):
            x = [(c["bytes_up"] + c["bytes_down"]) / 1e6 for c in r["curve"]]
            ax.plot(x, [c["accuracy"] for c in r["curve"]], label=r["label"], marker=".", markersize=3)
        ax.set_xscale("log")
        ax.set_xlabel("total MB communicated (up + down, all clients)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"FedAvg, MNIST, {clients} clients, {SPLITS[split]}")
        late = [c["accuracy"] for r in rows if r["split"] == split for c in r["curve"][min(4, len(r["curve"]) - 1):]]
        ax.set_ylim(math.floor(min(late) * 10) / 10, 1.0)  # from the 5th round on
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 images, 3 rounds, 4 clients")
    ap.add_argument("--rounds", type=int, default=None, help="FedAvg rounds (default 30; 3 with --quick)")
    ap.add_argument("--clients", type=int, default=None, help="clients (default 20; 4 with --quick)")
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated: {', '.join(SPLITS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th job starting at I")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "federated"), help="PREFIX of the outputs")
    ap.add_argument("--report-only", action="store_true", help="write the tables and plot from the rows and stop")
    args = ap.parse_args(argv)
    start = time.time()
    args.rounds = args.rounds or (3 if args.quick else 30)
    args.clients = args.clients or (4 if args.quick else 20)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for s in splits:
        if s not in SPLITS:
            ap.error(f"unknown split {s!r}; valid: {', '.join(SPLITS)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    index, count = (int(x) for x in args.shard.split("/"))
    torch.set_num_threads(args.threads)
    rows_path = Path(args.out + ".rows.jsonl")
    rows = _read_rows(rows_path)
    if not args.report_only:
        done = {r["key"] for r in rows}
        jobs = [(s, m) for s in splits for m in methods]
        jobs = [j for i, j in enumerate(jobs) if i % count == index and f"{j[0]}/{j[1]}" not in done]
        data = load_data(args.data_dir, 2000 if args.quick else None, 1000 if args.quick else None) if jobs else None
        for split, method in jobs:
            row = run(split, method, data, args)
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{split:7s} {method:13s} accuracy {row['accuracy']:.4f} up {_mb(row['bytes_up'])} MB "
                  f"down {_mb(row['bytes_down'])} MB ({row['seconds']:.0f} s)", flush=True)
        rows = _read_rows(rows_path)
    meta = run_meta("federated.py", argv, start, rounds=args.rounds, clients=args.clients,
                    local_epochs=args.local_epochs, lr=args.lr, batch=args.batch, seed=args.seed)
    previous = Path(args.out + ".json")
    if args.report_only and previous.exists():  # the tables of the run that made the rows: keep its command and time
        meta.update({k: v for k, v in json.loads(previous.read_text()).items() if k in meta})
    md = [f"# FedAvg on MNIST with sparse communication\n\n`{meta['command']}` ({meta['machine']}, {meta['date']})\n",
          (f"{args.clients} clients, all in every round, {args.rounds} rounds, {args.local_epochs} local epoch(s) of "
           f"SGD (lr {args.lr}, batch {args.batch}); 784-200-200-10 MLP; bytes summed over all clients.\n")]
    for split, title in SPLITS.items():
        if any(r["split"] == split for r in rows):
            md += [f"## {title}\n", table(rows, split), ""]
    write_results(args.out, "\n".join(md), {**meta, "rows": rows})
    if rows:
        plot(rows, Path(args.out + ".png"), args.clients)
    print("\n".join(md))
    return rows


if __name__ == "__main__":
    main()
