"""One-shot pruning of SmolLM2-135M (issue 14): magnitude, Wanda, SparseGPT and the library's best
combination at 50% and 70% unstructured, 2:4 and 4:8; perplexity on the evaluation text.

Calibration: ``--samples`` windows of ``--length`` tokens at seeded random offsets of
``calibration.txt`` (the papers: 128 x 2048 tokens of C4); evaluation: the first
``--eval-tokens`` tokens of ``evaluation.txt``, disjoint windows of ``--window`` tokens
(``--stride`` = window), token-weighted. Every configuration runs in a fresh process (the
model loaded from the float32 cache, see ``bench/_smollm2.py``), so its peak RSS (the
process's maximum resident set, model load and evaluation included) is its own; the
pruning wall time covers ``sn.oneshot`` only. Rows are appended to ``PREFIX.rows.jsonl``
as they finish (a rerun skips those already there).

    python bench/oneshot.py --out bench/results/oneshot                    # every configuration
    python bench/oneshot.py --configs dense,wanda/2:4 --samples 8          # a subset
    python bench/oneshot.py --quick                                        # smoke run: 2 samples, 1k tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TEXT = Path(os.environ.get("SPARSENN_DATA_DIR", ROOT.parent / "shared" / "datasets")) / "text" / "pydocs"
TARGETS = ["0.5", "0.7", "2:4", "4:8"]
METHODS = {  # name: sn.oneshot keywords (sparsity / pattern come from the target)
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "best": {"method": "sparsegpt", "refit": True},  # + permute=True for N:M targets (see _kwargs)
}
#: "stream/0.5": SparseGPT at 50% through sn.oneshot_streaming (the model is never loaded whole; the pruned
#: folder is loaded afterwards for the perplexity, which must equal sparsegpt/0.5's)
CONFIGS = ["dense"] + [f"{m}/{t}" for m in METHODS for t in TARGETS] + ["stream/0.5"]


def _kwargs(method: str, target: str) -> dict:
    """sn.oneshot keywords of a configuration: the method's, the target's, and for the library's best
    combination on N:M targets the input-channel permutation."""
    kw = {**METHODS[method], **_target(target)}
    if method == "best" and ":" in target:
        kw["permute"] = True
    return kw


def _target(t: str) -> dict:
    """``0.5`` / ``0.7``: unstructured at that sparsity; ``N:M``: that pattern at 1 - N/M."""
    if ":" in t:
        n, m = (int(x) for x in t.split(":"))
        return {"sparsity": 1 - n / m, "pattern": t}
    return {"sparsity": float(t), "pattern": "unstructured"}


class PeakRSS:
    """Samples this process's resident set (``/proc/self/statm``) every ``interval`` seconds in a thread:
    the peak while the ``with`` block runs (``ru_maxrss`` only knows the peak since the process started,
    model loading included)."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval, self.peak_mb, self._stop = interval, current_rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, current_rss_mb())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(config: str, args) -> dict:
    """Load, prune, evaluate one configuration in this process; the row."""
    import torch

    import _smollm2
    import sparsenn as sn
    from sparsenn.data.text import calibration_batches, read_text, tokenize

    torch.set_num_threads(args.threads)
    if config.startswith("stream/"):
        return _run_streamed(config, args)
    t0 = time.perf_counter()
    model, tokenizer = _smollm2.load()
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mb()
    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    row = {"config": config, "samples": args.samples, "length": args.length, "eval_tokens": args.eval_tokens,
           "window": args.window, "threads": args.threads, "load_s": load_s, "fp32_mb": fp32_mb}
    prune_s = 0.0
    if config != "dense":
        method, target = config.split("/")
        calibration = calibration_batches(tokenizer, TEXT / "calibration.txt", samples=args.samples,
                                          length=args.length, seed=args.seed)
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            sn.oneshot(model, calibration=calibration, progress=not args.quiet, measure_error=False,
                       **_kwargs(method, target))
        prune_s = time.perf_counter() - t0
        row["rss_pruning_peak_mb"] = peak.peak_mb
        layers = model.oneshot_report.layers
        errors = [r.error for r in layers if r.error is not None]
        row["mean_layer_error"] = sum(errors) / len(errors) if errors else None
        row["sparsity"] = sn.report(model).total.sparsity
    ids = tokenize(tokenizer, read_text(TEXT / "evaluation.txt"))[:args.eval_tokens]
    t0 = time.perf_counter()
    ppl = sn.perplexity(model, ids, window=args.window, stride=args.window)
    row.update(perplexity=ppl, prune_s=prune_s, eval_s=time.perf_counter() - t0, rss_loaded_mb=rss_loaded,
               rss_process_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _run_streamed(config: str, args) -> dict:
    """SparseGPT through sn.oneshot_streaming into a temporary folder: the peak RSS while pruning holds the
    non-block weights, one block and the calibration activations, never the whole model."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import _smollm2
    import sparsenn as sn
    from sparsenn.data.text import calibration_batches, read_text, tokenize

    source = _smollm2.model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    rss_loaded = current_rss_mb()
    target = config.split("/")[1]
    calibration = calibration_batches(tokenizer, TEXT / "calibration.txt", samples=args.samples,
                                      length=args.length, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            report = sn.oneshot_streaming(source, Path(out) / "pruned", calibration=calibration,
                                          progress=not args.quiet, measure_error=False, **_kwargs("sparsegpt", target))
        prune_s = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(Path(out) / "pruned", dtype=torch.float32).eval()
    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    errors = [r.error for r in report.layers if r.error is not None]
    ids = tokenize(tokenizer, read_text(TEXT / "evaluation.txt"))[:args.eval_tokens]
    t0 = time.perf_counter()
    ppl = sn.perplexity(model, ids, window=args.window, stride=args.window)
    return {"config": config, "samples": args.samples, "length": args.length, "eval_tokens": args.eval_tokens,
            "window": args.window, "threads": args.threads, "load_s": 0.0, "fp32_mb": fp32_mb,
            "rss_pruning_peak_mb": peak.peak_mb, "mean_layer_error": sum(errors) / len(errors) if errors else None,
            "sparsity": sum(r.sparsity * r.shape[0] * r.shape[1] for r in report.layers)
            / sum(r.shape[0] * r.shape[1] for r in report.layers),
            "perplexity": ppl, "prune_s": prune_s, "eval_s": time.perf_counter() - t0, "rss_loaded_mb": rss_loaded,
            "rss_process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def report(rows: list[dict], args, argv) -> str:
    from _results import run_meta, write_results

    by = {r["config"]: r for r in rows}
    dense = by.get("dense", {}).get("perplexity")
    meta = run_meta("oneshot.py", argv, time.time())
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; date {meta['date']}; calibration "
             f"{args.samples} x {args.length} tokens of calibration.txt; perplexity on {args.eval_tokens} tokens of "
             f"evaluation.txt (windows of {args.window}, disjoint).", "",
             "| method | target | perplexity | ratio to dense | pruning (s) | RSS loaded (MB) | peak RSS pruning (MB) "
             "| peak / fp32 model |", "|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        r = by.get(config)
        if r is None:
            continue
        method, _, target = config.partition("/")
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else "-"
        peak = r.get("rss_pruning_peak_mb")
        stale = " (before the memory fix 46d2ae5)" if r.get("memory_fix") is False else ""
        peak_cells = "- | -" if peak is None else f"{peak:.0f}{stale} | {peak / r['fp32_mb']:.2f}"
        lines.append(f"| {method} | {target or '-'} | {r['perplexity']:.2f} | {ratio} | {r['prune_s']:.0f} | "
                     f"{r['rss_loaded_mb']:.0f} | {peak_cells} |")
    text = "\n".join(lines)
    if args.out:
        write_results(args.out, text, {"meta": meta, "rows": rows})
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 calibration samples of 128 tokens, 1024 eval tokens")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=None, help="PREFIX: rows in PREFIX.rows.jsonl, table in PREFIX.md/.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration, print its row
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.length, args.eval_tokens = 2, 128, 1024
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args)), flush=True)
        return None
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; valid: {', '.join(CONFIGS)}")
    rows_path = Path(f"{args.out}.rows.jsonl") if args.out else None
    rows = _rows(rows_path) if rows_path else []
    same = lambda r: (r["samples"], r["length"], r["eval_tokens"], r["window"]) == (  # noqa: E731
        args.samples, args.length, args.eval_tokens, args.window)
    rows = [r for r in rows if same(r)]
    done = {r["config"] for r in rows}
    passthrough = ["--samples", str(args.samples), "--length", str(args.length), "--eval-tokens", str(args.eval_tokens),
                   "--window", str(args.window), "--seed", str(args.seed), "--threads", str(args.threads)]
    for config in configs:
        if config in done:
            continue
        proc = subprocess.run([sys.executable, __file__, "--one", config, *passthrough, *(["--quiet"] * args.quiet)],
                              capture_output=True, text=True)
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not found:
            raise SystemExit(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(found[-1])
        rows.append(row)
        print(f"{config:>20}: perplexity {row['perplexity']:.2f}, pruning {row['prune_s']:.0f} s, "
              f"peak RSS while pruning {row.get('rss_pruning_peak_mb', 0):.0f} MB", flush=True)
        if rows_path:
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    text = report(rows, args, argv)
    print(text)
    return rows


if __name__ == "__main__":
    main()
