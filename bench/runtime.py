"""Sparse inference on the CPU (issue 5): sparsenn's runtime side by side with other engines.

Workloads (fp32): an MLP 1024-4096-4096-1024 (ReLU), BERT-base shapes: the feed-forward
block 768->3072->768 (GELU) and one 768x768 projection. Each is magnitude-pruned per
layer (unstructured at 0, 50, 70, 80, 90, 95, 98% and 2:4) with sparsenn's own
``topk_mask``, then timed at batch 1, 16, 64 and 128 by:

- ``dense``: the PyTorch model (``torch.inference_mode``);
- ``torch_csr``: every Linear as ``torch.sparse.mm`` with a CSR weight;
- ``onnxruntime``: ONNX Runtime on the dense model exported with ``torch.onnx.export``
  (opset 17);
- ``sparsenn``: ``sparsenn.convert(model, x, batch_sizes=<the batches>)``;
- ``deepsparse``: DeepSparse 1.8 on the same ONNX file, in its own virtual environment
  (``--deepsparse-python``; DeepSparse needs Python <= 3.11 and opset <= 17), timed in
  a subprocess after the others, one engine compiled per batch size.

The in-process engines are timed together on the same input, in rounds of short blocks
(random order per round; each block first runs untimed calls for 2 ms so that the previous
engine's spinning thread pool has gone quiet; medians; ``sparsenn.backend.runtime.timing``).
Every output is checked against the dense model. Targets are computed from the measured
numbers; ``--out PREFIX`` writes ``PREFIX.json`` and ``PREFIX.md`` (command, machine,
date, versions).

    python bench/runtime.py --out bench/results/runtime    # the full table (~15 min on 2 idle cores)
    python bench/runtime.py --quick --out /tmp/rt           # a smoke run on small shapes (< 1 minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparsenn as sn  # noqa: E402
from sparsenn.core.patterns import topk_mask  # noqa: E402
from sparsenn.backend.runtime.timing import interleaved_medians  # noqa: E402

LEVELS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, "2:4")
BATCHES = (1, 16, 64, 128)
NOISE = 0.05  # "never slower than dense" allows this much measurement noise
DEFAULT_DS_PYTHON = ROOT.parent / "ds-venv" / "bin" / "python"


# ----------------------------------------------------------------------------- workloads


def workloads(quick: bool) -> dict[str, tuple[nn.Module, int]]:
    """``{name: (model, in_features)}``; ``--quick`` shrinks every width by 8."""
    s = 8 if quick else 1
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024 // s, 4096 // s), nn.ReLU(), nn.Linear(4096 // s, 4096 // s), nn.ReLU(),
                        nn.Linear(4096 // s, 1024 // s))
    ffn = nn.Sequential(nn.Linear(768 // s, 3072 // s), nn.GELU(), nn.Linear(3072 // s, 768 // s))
    proj = nn.Sequential(nn.Linear(768 // s, 768 // s))
    return {"mlp": (mlp.eval(), 1024 // s), "bert_ffn": (ffn.eval(), 768 // s), "bert_proj": (proj.eval(), 768 // s)}


def level_name(level) -> str:
    return level if isinstance(level, str) else f"{level:.0%}"


@torch.no_grad()
def prune(model: nn.Module, level) -> nn.Module:
    """Per-layer magnitude pruning: unstructured at ``level`` or the N:M pattern ``level`` ("2:4")."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if isinstance(level, str):
                n, mm = (int(v) for v in level.split(":"))
                mask = topk_mask(m.weight.abs(), level, n / mm)
            else:
                mask = topk_mask(m.weight.abs(), "unstructured", 1.0 - level)
            m.weight.mul_(mask)
    return model


# ----------------------------------------------------------------------------- engines


class CsrLinear(nn.Module):
    """``y = x W^T + b`` with ``torch.sparse.mm`` on a CSR weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.w = linear.weight.detach().to_sparse_csr()
        self.b = linear.bias.detach()

    def forward(self, x):
        return torch.sparse.mm(self.w, x.t()).t() + self.b


def torch_csr(model: nn.Module) -> nn.Module:
    return nn.Sequential(*[CsrLinear(m) if isinstance(m, nn.Linear) else m for m in model])


def export_onnx(model: nn.Module, in_features: int, path: Path) -> str | None:
    """Export with opset 17 and a dynamic batch; returns why it failed (``None`` on success)."""
    x = torch.randn(2, in_features)
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(path), opset_version=17, input_names=["x"], output_names=["y"],
                                  dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=dynamo)
            import onnx

            m = onnx.load(str(path))
            if m.ir_version > 8:  # DeepSparse 1.8 ships onnx 1.14 (IR version <= 9); opset 17 needs IR 8
                m.ir_version = 8
                onnx.save(m, str(path))
            return None
        except Exception as e:  # noqa: BLE001  (reported in the results)
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return "; ".join(errors)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def deepsparse_python(arg: str | None, quick: bool) -> tuple[str | None, str]:
    """The Python that imports deepsparse, or ``None`` and why not."""
    if arg == "none" or (arg is None and quick):
        return None, "skipped (--deepsparse-python none, or --quick without it)"
    exe = arg or os.environ.get("SPARSENN_DEEPSPARSE_PYTHON") or str(DEFAULT_DS_PYTHON)
    if not Path(exe).exists():
        return None, f"no Python at {exe} (install: python3 -m venv ds-venv && ds-venv/bin/pip install deepsparse==1.8.0)"
    r = subprocess.run([exe, "-c", "import deepsparse; print(deepsparse.__version__)"], capture_output=True, text=True)
    if r.returncode:
        return None, f"{exe} cannot import deepsparse: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return exe, f"deepsparse {r.stdout.strip()} via {exe}"


def run_deepsparse(exe: str, models: list[dict], batches, threads: int, repeats: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"models": models, "batches": list(batches), "threads": threads, "warmup": 3,
                   "repeats": repeats}, f)
    try:
        r = subprocess.run([exe, str(ROOT / "bench" / "deepsparse_worker.py"), f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode:
        return {"results": {}, "errors": {"all": (r.stderr.strip().splitlines() or ["?"])[-1]}}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- measurement


def max_err(y, ref) -> float:
    y = torch.as_tensor(y)
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def sparsenn_bytes(summary, batch: int) -> int:
    """Weight bytes the converted model reads at ``batch``: each layer's chosen kernel's arrays (dense: fp32)."""
    total = 0
    for row in summary.layers:
        kernel = row.choice.get(batch, "dense")
        total += row.bytes.get(kernel, row.bytes.get("dense", 0))
    return total


def bytes_row(model: nn.Module, summary) -> dict:
    table = sn.formats.bytes_table(model, formats=("dense", "csr", "bitmask", "bsr4x4", "2:4"))
    out = {f: table.total.bytes[f] for f in table.formats}
    out["sparsenn b1"] = sparsenn_bytes(summary, 1)
    out["sparsenn b64"] = sparsenn_bytes(summary, 64) if 64 in summary.batch_sizes else None
    return out


@torch.inference_mode()
def bench_cell(name, model, in_features, level, batches, args, tmp: Path, log) -> dict:
    t0 = time.perf_counter()
    example = torch.randn(max(batches), in_features, generator=torch.Generator().manual_seed(1))
    # time_limit=None: the benchmark measures what the runtime can do, however long choosing takes
    converted = sn.convert(model, example[:1], batch_sizes=tuple(batches), budget=args.convert_budget,
                           time_limit=None)
    convert_s = time.perf_counter() - t0
    summary = converted.conversion_summary
    csr_model = torch_csr(model)
    onnx_path = tmp / f"{name}_{level_name(level).replace('%', 'pct').replace(':', 'of')}.onnx"
    onnx_error = export_onnx(model, in_features, onnx_path) if "onnxruntime" in args.engines or args.ds else None
    ort = None
    if "onnxruntime" in args.engines and onnx_error is None:
        try:
            ort = ort_session(onnx_path, args.threads)
        except Exception as e:  # noqa: BLE001
            onnx_error = f"onnxruntime: {type(e).__name__}: {e}"
    cell = {"workload": name, "level": level_name(level), "sparsity": sn.sparsity(model), "convert_s": convert_s,
            "times_ms": {}, "errors": {}, "onnx_error": onnx_error, "onnx_path": None if onnx_error else str(onnx_path),
            "summary": summary.to_dict(), "bytes": bytes_row(model, summary)}
    for b in batches:
        x = example[:b].contiguous()
        xn = x.numpy()
        ref = model(x)
        fns = {"dense": lambda x=x: model(x), "sparsenn": lambda x=x: converted(x)}
        if "torch_csr" in args.engines:
            fns["torch_csr"] = lambda x=x: csr_model(x)
        if ort is not None:
            fns["onnxruntime"] = lambda xn=xn: ort(xn)
        fns = {k: v for k, v in fns.items() if k in args.engines}
        cell["errors"][str(b)] = {k: max_err(f(), ref) for k, f in fns.items() if k != "dense"}
        t = interleaved_medians(fns, budget=args.budget, min_repeats=args.min_repeats, max_repeats=args.max_repeats)
        cell["times_ms"][str(b)] = {k: v * 1e3 for k, v in t.items()}
        log(f"  {name:9s} {level_name(level):>4s} b={b:<3d} " + "  ".join(
            f"{k} {v * 1e3:8.3f}" for k, v in t.items()) + f"  (x{t['dense'] / t['sparsenn']:.2f} vs dense)")
    return cell


# ----------------------------------------------------------------------------- targets and report


def targets(cells: list[dict], ds_note: str) -> list[dict]:
    out = []
    find = {(c["workload"], c["level"]): c for c in cells}
    for wl in sorted({c["workload"] for c in cells}, key=["mlp", "bert_ffn", "bert_proj"].index):
        c90 = find.get((wl, "90%"))
        if c90:
            b = "64" if "64" in c90["times_ms"] else max(c90["times_ms"], key=int)  # --quick has no batch 64
            t = c90["times_ms"][b]
            if "deepsparse" in t:
                out.append({"workload": wl, "target": f"90%, batch {b}: sparsenn <= DeepSparse",
                            "value": f"sparsenn {t['sparsenn']:.3f} ms vs DeepSparse {t['deepsparse']:.3f} ms",
                            "met": t["sparsenn"] <= t["deepsparse"]})
            else:
                out.append({"workload": wl, "target": f"90%, batch {b}: sparsenn <= DeepSparse",
                            "value": f"DeepSparse not measured ({ds_note})", "met": None})
            out.append({"workload": wl, "target": f"90%, batch {b}: >= 4x faster than dense PyTorch",
                        "value": f"{t['dense'] / t['sparsenn']:.2f}x ({t['dense']:.3f} vs {t['sparsenn']:.3f} ms)",
                        "met": t["dense"] / t["sparsenn"] >= 4})
        for c in cells:
            if c["workload"] != wl or "1" not in c["times_ms"] or c["level"] not in ("90%",):
                continue
            t = c["times_ms"]["1"]
            dense_b, sparse_b = c["bytes"]["dense"], c["bytes"]["sparsenn b1"]
            bound = t["dense"] * sparse_b / dense_b
            out.append({"workload": wl, "target": f"{c['level']}, batch 1: >= 80% of the bandwidth bound",
                        "value": f"{bound / t['sparsenn']:.0%} (bound {bound:.3f} ms = dense {t['dense']:.3f} ms x "
                                 f"{sparse_b}/{dense_b} bytes; sparsenn {t['sparsenn']:.3f} ms)",
                        "met": bound / t["sparsenn"] >= 0.8})
        worst = max(((c["times_ms"][b]["sparsenn"] / c["times_ms"][b]["dense"], c["level"], b)
                     for c in cells if c["workload"] == wl for b in c["times_ms"]), default=None)
        if worst:
            out.append({"workload": wl, "target": f"never slower than dense (noise margin {NOISE:.0%})",
                        "value": f"worst sparsenn/dense {worst[0]:.2f} at {worst[1]}, batch {worst[2]}",
                        "met": worst[0] <= 1 + NOISE})
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Sparse inference runtime benchmark{' (quick)' if meta['quick'] else ''}", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- threads: {meta['threads']}; versions: {meta['versions']}", f"- DeepSparse: {meta['deepsparse']}",
             f"- timing: medians in ms over rounds of short blocks per engine, random order per round, "
             f"{meta['budget']} s per cell; DeepSparse timed separately in its own process "
             f"({meta.get('deepsparse_repeats', '?')} runs after 3 warm-up runs per batch size)",
             f"- noise margin for 'never slower than dense': {meta['noise_margin']:.0%}", ""]
    lines += ["## Targets", "", "| workload | target | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['workload']} | {t['target']} | {t['value']} | {met} |")
    engines = [e for e in ("dense", "torch_csr", "onnxruntime", "deepsparse", "sparsenn") if e in meta["engines"]
               or (e == "deepsparse" and meta["deepsparse_used"])]
    for wl in dict.fromkeys(c["workload"] for c in result["cells"]):
        cells = [c for c in result["cells"] if c["workload"] == wl]
        lines += ["", f"## {wl}: latency (ms)", ""]
        for b in meta["batches"]:
            lines += [f"batch {b}:", "", "| sparsity | " + " | ".join(engines) + " | sparsenn vs dense | sparsenn kernels |",
                      "|---|" + "---|" * (len(engines) + 2)]
            for c in cells:
                t = c["times_ms"].get(str(b), {})
                kinds = sorted({r["choice"].get(str(b), "dense") for r in c["summary"]["layers"]})
                lines.append(f"| {c['level']} | " + " | ".join(f"{t[e]:.3f}" if e in t else "-" for e in engines)
                             + f" | {t['dense'] / t['sparsenn']:.2f}x | {', '.join(kinds)} |")
            lines.append("")
    lines += ["## Model bytes per format", "",
              "Exact bytes of the weights (biases excluded): `sparsenn.backend.formats.bytes_table` for dense fp32, CSR "
              "(smallest index dtypes), bitmask, BSR 4x4, 2:4; `sparsenn bN`: the arrays the converted model reads "
              "at batch N.", ""]
    cols = list(result["cells"][0]["bytes"]) if result["cells"] else []
    lines += ["| workload | sparsity | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for c in result["cells"]:
        lines.append(f"| {c['workload']} | {c['level']} | " + " | ".join(
            "-" if c["bytes"][k] is None else f"{c['bytes'][k]:,}" for k in cols) + " |")
    errs = [(c["workload"], c["level"], b, e, v) for c in result["cells"] for b, d in c["errors"].items()
            for e, v in d.items()]
    worst = max(errs, key=lambda r: r[-1], default=None)
    if worst:
        lines += ["", f"Largest output error vs dense (max |y - y_dense| / max |y_dense|): {worst[-1]:.2e} "
                      f"({worst[3]}, {worst[0]} {worst[1]} batch {worst[2]})."]
    onnx_errors = {c["onnx_error"] for c in result["cells"] if c["onnx_error"]}
    if onnx_errors:
        lines += ["", "ONNX export failed: " + "; ".join(sorted(onnx_errors))]
    ex = next((c for c in result["cells"] if c["workload"] == "mlp" and c["level"] == "90%"), None)
    if ex:
        from sparsenn.backend.runtime import ConversionSummary

        lines += ["", "## Conversion summary: mlp at 90%", "", "```",
                  str(ConversionSummary.from_dict(ex["summary"])), "```"]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, 3 levels, batches 1 and 16")
    p.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    p.add_argument("--workloads", default=None, help="comma-separated subset of mlp,bert_ffn,bert_proj")
    p.add_argument("--levels", default=None, help="comma-separated: 0,0.5,...,2:4")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--engines", default="dense,torch_csr,onnxruntime,sparsenn")
    p.add_argument("--deepsparse-python", default=None,
                   help=f"Python with deepsparse installed (default {DEFAULT_DS_PYTHON}; 'none' to skip)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--budget", type=float, default=None, help="seconds of interleaved timing per cell")
    p.add_argument("--convert-budget", type=float, default=None, help="sparsenn.convert's budget per layer and batch")
    p.add_argument("--min-repeats", type=int, default=None)
    p.add_argument("--max-repeats", type=int, default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.budget = args.budget if args.budget is not None else (0.05 if q else 1.5)
    args.convert_budget = args.convert_budget if args.convert_budget is not None else (0.02 if q else 0.3)
    args.min_repeats = args.min_repeats if args.min_repeats is not None else (3 if q else 10)
    args.max_repeats = args.max_repeats if args.max_repeats is not None else (10 if q else 200)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "dense" not in args.engines or "sparsenn" not in args.engines:
        p.error("--engines must include dense and sparsenn")
    torch.set_num_threads(args.threads)
    levels = LEVELS if not q else (0.0, 0.9, "2:4")
    if args.levels:
        levels = tuple(v.strip() if ":" in v else float(v) for v in args.levels.split(","))
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else ((1, 16) if q else BATCHES)
    wls = workloads(q)
    if args.workloads:
        wanted = [w.strip() for w in args.workloads.split(",")]
        bad = [w for w in wanted if w not in wls]
        if bad:
            p.error(f"unknown workloads {bad}; valid: {', '.join(wls)}")
        wls = {k: v for k, v in wls.items() if k in wanted}
    ds_exe, ds_note = deepsparse_python(args.deepsparse_python, q)
    args.ds = ds_exe is not None
    log = (lambda s: print(s, flush=True))
    log(f"threads {args.threads}; DeepSparse: {ds_note}")

    cells = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name, (base, in_features) in wls.items():
            for level in levels:
                model = prune(copy.deepcopy(base), level)
                cells.append(bench_cell(name, model, in_features, level, batches, args, tmp, log))
        if ds_exe is not None:
            models = [{"key": f"{c['workload']}|{c['level']}", "path": c["onnx_path"],
                       "in_features": wls[c["workload"]][1]} for c in cells if c["onnx_path"]]
            log(f"DeepSparse: {len(models)} models x {len(batches)} batch sizes ...")
            ds = run_deepsparse(ds_exe, models, batches, args.threads, 10 if q else 50)
            for c in cells:
                for b, t in ds.get("results", {}).get(f"{c['workload']}|{c['level']}", {}).items():
                    c["times_ms"][b]["deepsparse"] = t * 1e3
            if ds.get("errors"):
                ds_note += f"; errors: {ds['errors']}"

    import numba
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numba": numba.__version__}
    try:
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    result = {
        "meta": {"command": " ".join(["python", "bench/runtime.py", *map(shlex.quote, argv if argv is not None
                                                                          else sys.argv[1:])]),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                 "threads": args.threads, "versions": versions, "quick": q, "batches": list(batches),
                 "levels": [level_name(v) for v in levels], "engines": args.engines, "deepsparse": ds_note,
                 "deepsparse_used": ds_exe is not None, "deepsparse_repeats": 10 if q else 50,
                 "budget": args.budget, "noise_margin": NOISE},
        "cells": cells,
    }
    result["targets"] = targets(cells, ds_note)
    for t in result["targets"]:
        log(f"{t['workload']}: {t['target']}: {t['value']} -> {t['met']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text(markdown(result))
        log(f"wrote {args.out}.json and {args.out}.md")
    return result


if __name__ == "__main__":
    main()
