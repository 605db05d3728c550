"""Dynamic sparse training at short and long budgets (issue 13): static vs SET vs RigL at 95%.

Two parts, every row trained through the library's trainer (``sparsenn.train.loop``):

* ``bench``: the two models of ``bench/sparse_training.py`` (LeNet-300-100 on MNIST, the
  784-1000-1000-1000-10 ReLU MLP on Fashion-MNIST) and its recipe (SGD, Nesterov 0.9, lr
  0.1, weight decay 5e-4, cosine per iteration, batch 128; ERK; random masks at step 0,
  the same for the three methods at a seed; sparse fan-in re-initialization), at 95%
  sparsity for 5, 20 and 60 epochs, SET and RigL with the library's defaults (an update
  every ``3 * isqrt(total_steps)`` steps, drop fraction 0.3 cosine to 0 at 75% of training).
  Target: error(RigL) <= error(SET) <= error(static), mean over seeds, at every length on
  both models.
* ``issue``: the case reported in issue 13: LeNet-300-100 on Fashion-MNIST, PyTorch's
  default initialization (no re-initialization), the Sparsifier's default distribution
  (uniform), SGD with momentum 0.9 at a constant lr 0.01, batch 64, 5 epochs (``--issue-epochs``),
  95%: static, and SET / RigL with the old fixed interval (``update_every=100``), the new
  default, and a longer interval (``update_every=800``).

Rows are appended to ``PREFIX.rows.jsonl`` as they finish; a rerun skips the rows already
there (resume), and ``--shard I/N`` runs every N-th job so that N processes share the grid.
Each process writes ``PREFIX.md`` / ``PREFIX.json`` from all the rows in the file when it
ends (``--report-only`` just writes them).

    python bench/dst_short_runs.py --out bench/results/dst_short_runs --shard 0/2 &   # full grid,
    python bench/dst_short_runs.py --out bench/results/dst_short_runs --shard 1/2     # two processes
    python bench/dst_short_runs.py --quick                                             # smoke run (< 2 min)

``--quick``: 4,000 training and 1,000 test images, one seed, 1 and 2 epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import run_meta, write_results  # noqa: E402
from sparse_training import FASHION_MEAN, FASHION_STD, MLP, dst_summary  # noqa: E402

import sparsenn as sn  # noqa: E402
from reproduce import MNIST_MEAN, MNIST_STD, _subset, err, normalize  # noqa: E402
from sparsenn.data.datasets import flatten, load_idx_dataset, make_loaders  # noqa: E402
from sparsenn.models.zoo import LeNet300100  # noqa: E402
from sparsenn.train.loop import cosine_schedule, train  # noqa: E402

SPARSITY = 0.95
EPOCHS = [5, 20, 60]
METHODS = ["static", "set", "rigl"]
LABELS = {"static": "static", "set": "SET", "rigl": "RigL"}
OLD_UPDATE_EVERY = 100  # the fixed default before issue 13
LONG_UPDATE_EVERY = 800  # a longer interval than the default, for the issue's small steps (lr 0.01, batch 64)
MASK_SEED, RESCALE_SEED = 10_000, 20_000  # as bench/sparse_training.py: independent of the init's seed


@dataclass(frozen=True)
class Recipe:
    """How one part trains: data, init, distribution, optimizer, schedule."""

    dataset: str
    distribution: str = "erk"
    rescale: bool = True
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    cosine: bool = True
    batch: int = 128


MODELS = {  # key: (name, dataset, constructor)
    "lenet300100": ("LeNet-300-100", "mnist", LeNet300100),
    "mlp": ("MLP 784-1000-1000-1000-10", "fashion_mnist", MLP),
}
ISSUE = ("LeNet-300-100, Fashion-MNIST, issue 13 recipe", "lenet300100")
ISSUE_RECIPE = Recipe("fashion_mnist", distribution="uniform", rescale=False, lr=0.01, nesterov=False,
                      weight_decay=0.0, cosine=False, batch=64)
STATS = {"mnist": (MNIST_MEAN, MNIST_STD), "fashion_mnist": (FASHION_MEAN, FASHION_STD)}


@dataclass(frozen=True)
class Job:
    part: str  # "bench" or "issue"
    model: str  # a MODELS key
    epochs: int
    seed: int
    method: str
    update_every: int | None  # None: the library's default

    @property
    def key(self) -> str:
        return f"{self.part}/{self.model}/{self.epochs}/{self.seed}/{self.method}/{self.update_every}"

    @property
    def variant(self) -> str:
        if self.method == "static":
            return "static"
        every = "default" if self.update_every is None else f"every {self.update_every}"
        return f"{LABELS[self.method]} ({every})" if self.part == "issue" else LABELS[self.method]


def make_jobs(parts: list[str], models: list[str], epochs: list[int], seeds: int,
              issue_epochs: list[int]) -> list[Job]:
    """Cheap jobs first (so partial results cover every length early), seeds interleaved."""
    jobs = []
    if "issue" in parts:
        jobs += [Job("issue", ISSUE[1], e, s, m, u) for e in sorted(issue_epochs) for s in range(seeds)
                 for m, u in [("static", None), ("set", OLD_UPDATE_EVERY), ("rigl", OLD_UPDATE_EVERY),
                              ("set", None), ("rigl", None), ("set", LONG_UPDATE_EVERY), ("rigl", LONG_UPDATE_EVERY)]]
    if "bench" in parts:
        jobs += [Job("bench", k, e, s, m, None) for e in sorted(epochs) for k in models for s in range(seeds)
                 for m in METHODS]
    return jobs


def load_data(dataset: str, data_dir: str, sizes: tuple):
    tr, te = load_idx_dataset(dataset, data_dir)
    mean, std = STATS[dataset]
    tr, te = flatten(normalize(tr, mean, std)), flatten(normalize(te, mean, std))
    if sizes[0]:
        tr = _subset(tr, sizes[0], 0)
    if sizes[1]:
        te = _subset(te, sizes[1], 0)
    return tr, te


def run_job(job: Job, recipe: Recipe, data) -> dict:
    """Train one row; the initialization, the masks and the batch order depend on the seed only."""
    t0 = time.time()
    torch.manual_seed(job.seed)
    model = MODELS[job.model][2]()  # the same initialization for every method of a seed
    train_loader, test_loader = make_loaders(*data, batch_size=recipe.batch, seed=job.seed)
    torch.manual_seed(1000 + job.seed)
    steps = job.epochs * len(train_loader)
    kw = {"total_steps": steps}
    if job.update_every is not None:
        kw["update_every"] = job.update_every
    sp = sn.Sparsifier(model, sparsity=SPARSITY, method=job.method, distribution=recipe.distribution,
                       seed=MASK_SEED + job.seed, **kw)
    if recipe.rescale:
        sn.rescale_for_sparse_fan_in(model, seed=RESCALE_SEED + job.seed)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                  nesterov=recipe.nesterov, weight_decay=recipe.weight_decay))
    train(model, train_loader, opt, epochs=job.epochs, sparsifier=sp,
          scheduler=cosine_schedule(opt, steps) if recipe.cosine else None)
    updates = dst_summary(model, sp)
    alive = [u["survival"] for u in updates if u["survival"] is not None]
    return {**asdict(job), "key": job.key, "variant": job.variant, "steps": steps,
            "update_every_used": sp.method.update_every if job.method != "static" else None,
            "sparsity": sn.sparsity(model), "error": err(model, test_loader), "updates": len(updates),
            "survival": statistics.mean(alive) if alive else None, "seconds": time.time() - t0,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


# ----------------------------------------------------------------------------- summary and target


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> dict:
    """``{(part, model, epochs, variant): {"error", "std", "n", "sparsity", "updates", "update_every",
    "survival"}}``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["part"], r["model"], r["epochs"], r["variant"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        mean, std = _mean_std([r["error"] for r in rs])
        alive = [r["survival"] for r in rs if r["survival"] is not None]
        out[key] = {"error": mean, "std": std, "n": len(rs), "sparsity": statistics.mean(r["sparsity"] for r in rs),
                    "updates": statistics.mean(r["updates"] for r in rs), "update_every": rs[0]["update_every_used"],
                    "survival": statistics.mean(alive) if alive else None}
    return out


def order_target(summary: dict) -> dict:
    """error(RigL) <= error(SET) <= error(static) at every (model, epochs) of the bench part with all three."""
    points = []
    for model in MODELS:
        for epochs in sorted({k[2] for k in summary if k[0] == "bench" and k[1] == model}):
            e = {m: summary.get(("bench", model, epochs, LABELS[m])) for m in METHODS}
            if any(v is None for v in e.values()):
                continue
            points.append({"model": MODELS[model][0], "epochs": epochs, "n": min(v["n"] for v in e.values()),
                           **{m: e[m]["error"] for m in METHODS},
                           "rigl_le_set": e["rigl"]["error"] <= e["set"]["error"],
                           "set_le_static": e["set"]["error"] <= e["static"]["error"]})
    both = [p["rigl_le_set"] and p["set_le_static"] for p in points]
    return {"target": "error(RigL) <= error(SET) <= error(static) at 95%, mean over seeds, every model and length",
            "evaluated": bool(points), "points": points, "met": all(both) if points else None,
            "points_met": sum(both)}


def markdown(summary: dict, target: dict, meta: dict) -> str:
    lines = [f"Commands: {', '.join(f'`{c}`' for c in meta['commands'])}  ",
             f"Machine: {meta['machine']}; date {meta['date']}; compute {meta['row_minutes']:.0f} min summed over "
             f"rows; seeds {meta['seeds']}; train/test images {meta['sizes']}; sparsity {SPARSITY:.0%}.", ""]
    bench = {k: v for k, v in summary.items() if k[0] == "bench"}
    if bench:
        lines += ["**Benchmark** (test error %, mean ± std over seeds; SET/RigL: library defaults, "
                  "the update interval and updates per run in the diagnostics below)", ""]
        epochs = sorted({k[2] for k in bench})
        lines += ["| model | method | " + " | ".join(f"{e} epochs" for e in epochs) + " |",
                  "|---|---|" + "---|" * len(epochs)]
        for model in MODELS:
            for m in METHODS:
                cells = [bench.get(("bench", model, e, LABELS[m])) for e in epochs]
                if any(cells):
                    lines.append(f"| {MODELS[model][0]} | {LABELS[m]} | " + " | ".join(
                        "" if c is None else f"{c['error']:.2f} ± {c['std']:.2f} (n={c['n']})" for c in cells) + " |")
        lines.append("")
        verdict = {None: "not evaluated", True: "**met**", False: "**not met**"}[target["met"]]
        lines += [f"**Target**: {target['target']}: {verdict}"
                  + (f" ({target['points_met']} of {len(target['points'])} points)." if target["points"] else "."), "",
                  "| model | epochs | static | SET | RigL | RigL <= SET | SET <= static |",
                  "|---|---|---|---|---|---|---|"]
        for p in target["points"]:
            lines.append(f"| {p['model']} | {p['epochs']} | {p['static']:.2f} | {p['set']:.2f} | {p['rigl']:.2f} | "
                         f"{'yes' if p['rigl_le_set'] else 'no'} | {'yes' if p['set_le_static'] else 'no'} |")
        lines.append("")
    issue = {k: v for k, v in summary.items() if k[0] == "issue"}
    if issue:
        lines += [f"**Issue 13 recipe** ({ISSUE[0]}: default PyTorch init, uniform distribution, SGD momentum 0.9, "
                  "constant lr 0.01, batch 64; test error %, mean ± std over seeds)", "",
                  "| epochs | method | update every | updates per run | error | grown alive % |",
                  "|---|---|---|---|---|---|"]
        for (_, _, e, variant), v in sorted(issue.items(), key=lambda kv: (kv[0][2], kv[0][3])):
            alive = "-" if v["survival"] is None else f"{100 * v['survival']:.1f}"
            lines.append(f"| {e} | {variant} | {v['update_every'] or '-'} | {v['updates']:g} | "
                         f"{v['error']:.2f} ± {v['std']:.2f} (n={v['n']}) | {alive} |")
        lines.append("")
    if bench:
        lines += ["**DST diagnostics** (per run; grown alive: share of an update's grown weights still active "
                  "after the next update, averaged over updates and seeds)", "",
                  "| model | epochs | method | steps per run | update every | updates per run | grown alive % |",
                  "|---|---|---|---|---|---|---|"]
        for (_, model, e, variant), v in sorted(bench.items(), key=lambda kv: (list(MODELS).index(kv[0][1]),
                                                                                kv[0][2], kv[0][3])):
            if variant != "static":
                alive = "-" if v["survival"] is None else f"{100 * v['survival']:.1f}"
                lines.append(f"| {MODELS[model][0]} | {e} | {variant} | {meta['steps'].get(f'{model}/{e}', '?')} | "
                             f"{v['update_every']} | {v['updates']:g} | {alive} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["key"]] = row  # a rerun of the same job replaces the older row
    return list(rows.values())


def report(rows: list[dict], seeds: int, sizes: tuple, start: float, argv, out: str | None) -> tuple[dict, dict]:
    summary = summarize(rows)
    target = order_target(summary)
    meta = run_meta("dst_short_runs.py", argv, start, seeds=seeds, sizes=f"{sizes[0] or 'all'}/{sizes[1] or 'all'}",
                    commands=sorted({r["command"] for r in rows}) or [f"python bench/dst_short_runs.py "
                                                                       f"{' '.join(argv or [])}"],
                    row_minutes=sum(r["seconds"] for r in rows) / 60,
                    steps={f"{r['model']}/{r['epochs']}": r["steps"] for r in rows if r["part"] == "bench"},
                    issue_recipe=asdict(ISSUE_RECIPE),
                    bench_recipes={k: asdict(Recipe(v[1])) for k, v in MODELS.items()})
    md = markdown(summary, target, meta)
    print(md)
    if out:
        table = [{"part": k[0], "model": k[1], "epochs": k[2], "variant": k[3], **v} for k, v in summary.items()]
        write_results(out, md, {"meta": meta, "summary": table, "target": target, "rows": rows})
    return summary, target


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run on a subset (< 2 minutes)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    ap.add_argument("--models", default="lenet300100,mlp", help="comma-separated: lenet300100, mlp")
    ap.add_argument("--epochs", default=None, help="comma-separated lengths (default 5,20,60; 1,2 with --quick)")
    ap.add_argument("--parts", default="issue,bench", help="comma-separated: issue, bench")
    ap.add_argument("--issue-epochs", default=None, help="comma-separated lengths of the issue part (default 5; "
                                                         "the shortest --epochs with --quick)")
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th job starting at I (default 0/1: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--train-size", type=int, default=None, help="training images (default all; 4000 with --quick)")
    ap.add_argument("--test-size", type=int, default=None, help="test images (default all; 1000 with --quick)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--out", default=None, help="PREFIX: rows in PREFIX.rows.jsonl, tables in PREFIX.md/.json")
    ap.add_argument("--report-only", action="store_true", help="write the tables from PREFIX.rows.jsonl and stop")
    args = ap.parse_args(argv)
    start = time.time()
    q = args.quick
    seeds = args.seeds or (1 if q else 3)
    epochs = _ints(args.epochs) if args.epochs else ([1, 2] if q else EPOCHS)
    sizes = (args.train_size or (4000 if q else None), args.test_size or (1000 if q else None))
    models = [k.strip() for k in args.models.split(",") if k.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for k in models:
        if k not in MODELS:
            ap.error(f"unknown model {k!r}; valid: {', '.join(MODELS)}")
    for p in parts:
        if p not in ("issue", "bench"):
            ap.error(f"unknown part {p!r}; valid: issue, bench")
    issue_epochs = _ints(args.issue_epochs) if args.issue_epochs else [min(epochs) if q else 5]
    if any(e < 1 for e in epochs + issue_epochs):
        ap.error(f"epochs must be >= 1, got {epochs + issue_epochs}")
    try:
        index, count = (int(x) for x in args.shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        ap.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    if args.report_only and not args.out:
        ap.error("--report-only needs --out PREFIX")
    torch.set_num_threads(args.threads)
    rows_path = Path(args.out + ".rows.jsonl") if args.out else None
    rows = _read_rows(rows_path) if rows_path else []
    if not args.report_only:
        done = {r["key"] for r in rows}
        jobs = [j for i, j in enumerate(make_jobs(parts, models, epochs, seeds, issue_epochs))
                if i % count == index and j.key not in done]
        command = f"python bench/dst_short_runs.py {' '.join(argv if argv is not None else sys.argv[1:])}"
        data = {}
        for job in jobs:
            recipe = ISSUE_RECIPE if job.part == "issue" else Recipe(MODELS[job.model][1])
            if recipe.dataset not in data:
                data[recipe.dataset] = load_data(recipe.dataset, args.data_dir, sizes)
            row = {**run_job(job, recipe, data[recipe.dataset]), "command": command}
            rows.append(row)
            if rows_path:
                rows_path.parent.mkdir(parents=True, exist_ok=True)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"  {job.part} {MODELS[job.model][0]} {job.epochs} ep seed {job.seed} {job.variant:<18} "
                  f"error {row['error']:.2f}% sparsity {row['sparsity']:.4f} updates {row['updates']} "
                  f"({row['seconds']:.0f} s)", flush=True)
        if rows_path:
            rows = _read_rows(rows_path)  # with the other shards' rows
    summary, target = report(rows, seeds, sizes, start, argv, args.out)
    return summary, target, rows


if __name__ == "__main__":
    main()
