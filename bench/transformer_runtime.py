"""Sparse transformers (and CNNs) on the CPU, end to end (issue 15): sparsenn vs PyTorch, ONNX Runtime, DeepSparse.

Parts (``--parts``, default all), each side by side in one process on ``--threads`` threads:

- ``smollm2``: SmolLM2-135M (``bench/_smollm2.py``) pruned with Wanda (``sn.oneshot``, 32 x 512
  calibration tokens of calibration.txt) at 50%, 70% and 2:4; decode ms/token at batch 1
  (``--new-tokens`` after a 64-token prompt, ``sn.generation_speed``) and prefill of 512 tokens,
  every engine (and the stubs below) kept in memory and timed at the end in ``--repeats``
  interleaved rounds (medians):
  dense fp32, PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` of every Linear),
  and ``sn.convert(weights="fp32" / "int8")`` of each pruned model. Perplexity on
  ``--eval-tokens`` tokens of evaluation.txt of the pruned fp32 and int8 models, each layer
  running its decode (one-row) kernel. Bytes per
  token read by each engine (the weights its Linear layers read at one row), the
  memory-bandwidth bound they imply (a streaming read measured here), and the ceiling
  of the issue: the decode time with every block Linear a zero-cost stub.
- ``bert``: ``transformers.BertModel(BertConfig())`` magnitude-pruned (each Linear in the
  encoder, unstructured) at 70, 80, 90%, sequence 128, batch 1 and 16: dense PyTorch,
  ONNX Runtime dense (opset 17), sparsenn (``sn.convert``, fp32), and DeepSparse 1.8 on
  the pruned ONNX file when ``--deepsparse-python`` names its Python (it needs <= 3.11).
- ``convnets``: a ResNet-18 (``sparsenn.models.ResNet18``, 1000 classes) and EfficientNet-Lite0
  (when available) magnitude-pruned at 80/90% (every Conv2d with groups=1 and the Linear;
  depthwise convolutions stay dense), 224x224, batch 1 and 16: dense PyTorch, ONNX Runtime
  dense, sparsenn, and DeepSparse with ``--deepsparse-python``.

DeepSparse runs in its own Python (``bench/deepsparse_engines.py``, a server holding the compiled
engines) and is timed in the same interleaved rounds as the engines of this process, one forward
pass per request; rows record the request's round trip (``deepsparse_round_trip_ms``), which
its times include.

    python bench/transformer_runtime.py --out bench/results/transformer_runtime
    python bench/transformer_runtime.py --parts bert --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _results import log, run_meta  # noqa: E402

TEXT = HERE.parent.parent / "shared" / "datasets" / "text" / "pydocs"


# ------------------------------------------------------------------ common


def stream_bandwidth(threads: int) -> float:
    """Bytes/s of a streaming read of 1 GiB (``torch.sum`` of float32, best of 5) on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def magnitude_prune(model, sparsity: float, names) -> None:
    """Zero the smallest-magnitude entries of each listed 2-D+ weight (per layer, unstructured)."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                k = int(p.numel() * sparsity)
                if k:
                    thr = p.abs().flatten().kthvalue(k).values
                    p[p.abs() <= thr] = 0


def decode_bytes(model) -> int:
    """Bytes the Linear layers of ``model`` read for one row: the dense weights, or each converted layer's
    one-row kernel's packed arrays (dense weight where that is dense); dynamic-int8 layers: int8 weights."""
    import torch
    from torch import nn

    from sparsenn.backend.runtime import SparseLinear
    from sparsenn.backend.runtime.layers import DENSE

    total = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            k = m.kernel_for(1)
            total += m.weight.numel() * 4 if k == DENSE else m.packed(k).nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif type(m).__name__ == "Linear" and "quantized" in type(m).__module__:
            w = m.weight()
            total += w.numel() + 4 * w.shape[0] if w.qscheme() == torch.per_channel_affine else w.numel()
    return total


# ------------------------------------------------------------------ SmolLM2


@contextlib.contextmanager
def decode_plan(model):
    """Every converted layer runs its one-row (decode) kernel whatever the row count: the perplexity of
    the weights decoding uses (on 512-token windows the plan would pick its 64-row entries instead)."""
    from sparsenn.backend.runtime import SparseLinear

    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for m in layers:
        m.forced = m.kernel_for(1)
    try:
        yield
    finally:
        for m in layers:
            m.forced = None


def part_smollm2(args, bandwidth: float) -> dict:
    import torch
    from torch import nn

    import _smollm2
    import sparsenn as sn
    from sparsenn.data.text import calibration_batches, read_text, tokenize

    model, tok = _smollm2.load()
    prompt_text = read_text(TEXT / "calibration.txt")
    ids = tokenize(tok, prompt_text)
    prompt, prefill = ids[:64].unsqueeze(0), ids[1000:1512].unsqueeze(0)
    eval_ids = tokenize(tok, read_text(TEXT / "evaluation.txt"))[:args.eval_tokens]
    rows: list = []
    out = {"rows": rows}

    timed: list = []  # (key, model, prefill ids or None): timed together at the end, in interleaved rounds

    def measure(name, m, **extra):
        """The engine's row; its decode and prefill times are filled in by ``time_rounds`` at the end."""
        b = decode_bytes(m)
        row = {"engine": name, "bytes_per_token": b, **extra}
        rows.append(row)
        timed.append((name, m, prefill))
        return row

    dense = measure("dense fp32", model, sparsity=0.0)
    # the ceiling: every block Linear a zero-cost stub (what block kernels alone can at most give)
    stub = copy.deepcopy(model)

    class Stub(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], self.n)

    for name, m in list(stub.named_modules()):
        if isinstance(m, nn.Linear) and ".layers." in name:
            stub.set_submodule(name, Stub(m.out_features))
    timed.append(("stub", stub, None))
    # the same with the head converted as the int8 models convert it: the floor of every int8 row
    stub8 = sn.convert(stub, {"input_ids": prompt}, batch_sizes=(1,), weights="int8", time_limit=None, budget=0.1,
                       verify=False)
    timed.append(("stub int8 head", stub8, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    qrow = measure("torch dynamic int8", q, sparsity=0.0)
    with torch.inference_mode():
        qrow["perplexity"] = sn.perplexity(q, eval_ids, window=512, stride=512)
        dense["perplexity"] = sn.perplexity(model, eval_ids, window=512, stride=512)
    calibration = calibration_batches(tok, TEXT / "calibration.txt", samples=args.samples, length=512, seed=0)
    for target in args.targets:
        pruned = copy.deepcopy(model)
        kw = {"sparsity": float(target)} if ":" not in target else \
            {"pattern": f"{target.split(':')[0]}:{target.split(':')[1]}"}
        t0 = time.perf_counter()
        sn.oneshot(pruned, method="wanda", calibration=calibration, progress=False, measure_error=False, **kw)
        log(f"smollm2: wanda {target} in {time.perf_counter() - t0:.0f} s")
        with torch.inference_mode():
            ppl_fp32 = sn.perplexity(pruned, eval_ids, window=512, stride=512)
        variants = [("fp32", "fp32")] + [("int8", "int8" if how == "rtn" else "int8 gptq") for how in args.int8]
        for weights, label in variants:
            source = pruned
            if label == "int8 gptq":  # weights put on their int8 grids by GPTQ first (sn.quantize), the mask kept
                t0 = time.perf_counter()
                source = sn.quantize(copy.deepcopy(pruned), calibration, method="gptq")
                log(f"smollm2: gptq {target} in {time.perf_counter() - t0:.0f} s")
            t0 = time.perf_counter()
            c = sn.convert(source, {"input_ids": prompt}, batch_sizes=(1, 64), weights=weights, time_limit=None,
                           budget=0.1)
            conv_s = time.perf_counter() - t0
            s = c.conversion_summary
            kernels = {}
            for r in s.layers:
                k = r.choice.get(1)
                if k:
                    kernels[k] = kernels.get(k, 0) + 1
            with torch.inference_mode(), decode_plan(c):
                ppl = sn.perplexity(c, eval_ids, window=512, stride=512)
            measure(f"sparsenn {target} {label}", c, sparsity=target, convert_s=conv_s, perplexity=ppl,
                    perplexity_fp32_sparse=ppl_fp32, decode_kernels=kernels,
                    max_abs_logit_error=s.accuracy.get("max_abs_error"))
            log(f"smollm2: converted {target} {label} in {conv_s:.0f} s")
        del pruned
    times = time_rounds(timed, prompt, args)
    for row in rows:
        decode, prefill_s = times[row["engine"]]
        row.update(decode_ms=decode * 1e3, decode_tokens_per_s=1 / decode, prefill_512_ms=prefill_s * 1e3,
                   bandwidth_fraction=row["bytes_per_token"] / bandwidth / decode)
        log(json.dumps(row))
    out["stub_decode_ms"] = times["stub"][0] * 1e3
    out["ceiling"] = dense["decode_ms"] / out["stub_decode_ms"]
    out["stub_int8_head_decode_ms"] = times["stub int8 head"][0] * 1e3
    out["ceiling_int8_head"] = dense["decode_ms"] / out["stub_int8_head_decode_ms"]
    log(f"smollm2: stub ceiling {out['stub_decode_ms']:.1f} ms (head fp32), {out['stub_int8_head_decode_ms']:.1f} ms "
        "(head int8)")
    return out


def time_rounds(engines: list, prompt, args) -> dict:
    """``{key: (decode s/token, prefill s)}``: medians over ``args.repeats`` rounds, each round timing every engine
    once (``sn.generation_speed`` with one repeat, after its warm-up generate) in an order rotated per round, so
    that a slow spell of the machine falls on all engines alike rather than on the ones timed then."""
    import sparsenn as sn

    got: dict = {key: ([], []) for key, _, _ in engines}
    for r in range(args.repeats):
        k = r % len(engines)
        for key, m, prefill in engines[k:] + engines[:k]:
            log(f"smollm2: round {r + 1}/{args.repeats}: timing {key}")
            s = sn.generation_speed(m, prompt, args.new_tokens, prefill_ids=prefill, repeats=1)
            got[key][0].append(s.decode_s_per_token)
            got[key][1].append(s.prefill_s)
    return {key: (statistics.median(d), statistics.median(p)) for key, (d, p) in got.items()}


# ------------------------------------------------------------------ ONNX helpers


def export(model, example: tuple, path: Path, names: list[str]) -> str | None:
    import torch

    model.eval()  # export restores the mode it found: a module made in train mode would leave dropout on
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, str(path), opset_version=17, input_names=names, output_names=["y"],
                              dynamic_axes={n: {0: "batch"} for n in names}, dynamo=False)
        import onnx

        m = onnx.load(str(path))
        if m.ir_version > 8:
            m.ir_version = 8
            onnx.save(m, str(path))
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


class DeepSparse:
    """DeepSparse 1.8 engines in their own Python (``bench/deepsparse_engines.py``), one forward pass per request,
    so that they are timed in the same interleaved rounds as this process's engines (:func:`side_by_side`).

    Until the twelfth session DeepSparse was timed in its own process before the other engines: on this shared
    machine a slow spell then fell on one side of the comparison only (BERT-base at 80%, batch 16: DeepSparse
    measured 603-677 ms in four runs of one afternoon)."""

    def __init__(self, python: str, threads: int, folder: str):
        self.threads, self.folder, self.loaded, self.errors = threads, folder, set(), {}
        self.stderr = open(os.path.join(folder, "deepsparse.log"), "w")  # its log lines; a full pipe would block it
        self.proc = subprocess.Popen([python, "-u", str(HERE / "deepsparse_engines.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.version = None

    def _ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.flush()
            raise RuntimeError(f"the DeepSparse server exited ({self.proc.poll()}): "
                               f"{Path(self.stderr.name).read_text()[-500:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def load(self, key: str, path: Path, batch: int, arrays: list) -> None:
        """Compile ``path`` for ``batch`` with inputs ``arrays`` (NumPy); a failure is kept in ``errors[key]``."""
        import numpy as np

        files = []
        for i, a in enumerate(arrays):
            files.append(os.path.join(self.folder, f"{key}_{i}.npy"))
            np.save(files[-1], a)
        try:
            self.version = self._ask(op="load", key=key, path=str(path), batch=batch, threads=self.threads,
                                     feeds=files).get("version")
            self.loaded.add(key)
        except RuntimeError as e:
            self.errors[key] = f"error: {e}"
            log("deepsparse:", key, e)

    def runner(self, key: str):
        return lambda: self._ask(op="run", key=key)

    def round_trip(self) -> float:
        """Median seconds of an empty request (part of every timed DeepSparse call)."""
        ts = []
        for _ in range(50):
            t = time.perf_counter()
            self._ask(op="ping")
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
        self.stderr.close()


@contextlib.contextmanager
def deepsparse_server(python: str | None, threads: int, folder: str, why: str | None):
    """A :class:`DeepSparse` when ``python`` is given and the model exported (``why`` is ``None``), else ``None``."""
    ds = DeepSparse(python, threads, folder) if python and why is None else None
    try:
        yield ds
    finally:
        if ds is not None:
            ds.close()


def with_deepsparse(fns: dict, ds, key: str) -> dict:
    """``fns`` plus DeepSparse's engine ``key`` when it compiled."""
    return {**fns, "deepsparse": ds.runner(key)} if ds is not None and key in ds.loaded else fns


def deepsparse_cell(t: dict, ds, key: str):
    """The row's ``deepsparse_ms``: the median, the compile error, or ``None`` (not run)."""
    if "deepsparse" in t:
        return t["deepsparse"] * 1e3
    return ds.errors.get(key) if ds is not None else None


def side_by_side(fns: dict, budget: float) -> dict:
    from sparsenn.backend.runtime.timing import interleaved_medians

    return interleaved_medians(fns, budget=budget, min_repeats=5, max_repeats=40)


# ------------------------------------------------------------------ BERT


def part_bert(args) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    import sparsenn as sn

    torch.manual_seed(0)
    base = BertModel(BertConfig()).eval()
    names = [n for n, p in base.named_parameters() if p.dim() == 2 and ".encoder." in f".{n}" and "weight" in n]
    rows = []
    batches = (1, 16) if not args.quick else (1, 2)
    seq = 128 if not args.quick else 32
    for sparsity in args.bert_sparsities:
        model = copy.deepcopy(base)
        magnitude_prune(model, sparsity, set(names))
        inputs = {b: {"input_ids": torch.randint(0, 30000, (b, seq)), "attention_mask": torch.ones(b, seq,
                                                                                                    dtype=torch.long)}
                  for b in batches}
        t0 = time.perf_counter()
        c = sn.convert(model, inputs[batches[0]], batch_sizes=batches, time_limit=None, budget=0.2)
        conv_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "bert.onnx"

            class Wrap(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, input_ids, attention_mask):
                    return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

            why = export(Wrap(model).eval(), (inputs[batches[0]]["input_ids"], inputs[batches[0]]["attention_mask"]), path,
                         ["input_ids", "attention_mask"])
            sess = ort_session(path, args.threads) if why is None else None
            with deepsparse_server(args.deepsparse_python, args.threads, d, why) as ds:
                for b in batches if ds is not None else ():
                    ds.load(f"b{b}", path, b, [inputs[b]["input_ids"].numpy(), inputs[b]["attention_mask"].numpy()])
                trip = ds.round_trip() if ds is not None else None
                for b in batches:
                    x = inputs[b]
                    feed = {k: v.numpy() for k, v in x.items()}
                    with torch.inference_mode():
                        ref = model(**x).last_hidden_state
                        ok = torch.allclose(c(**x).last_hidden_state, ref, rtol=1e-3, atol=1e-3)
                        fns = {"dense": lambda: model(**x), "sparsenn": lambda: c(**x)}
                        if sess is not None:
                            fns["onnxruntime"] = lambda: sess.run(None, feed)
                        t = side_by_side(with_deepsparse(fns, ds, f"b{b}"), budget=args.budget)
                    row = {"model": "bert-base", "sparsity": sparsity, "batch": b, "seq": seq, "convert_s": conv_s,
                           "outputs_match": bool(ok), **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                           "deepsparse_ms": deepsparse_cell(t, ds, f"b{b}"),
                           "deepsparse_round_trip_ms": None if trip is None else trip * 1e3,
                           "export_error": why, "sparse_layers_at_batch": sum(1 for r in c.conversion_summary.layers
                                                                             if r.choice.get(b, "dense") != "dense")}
                    rows.append(row)
                    log(json.dumps(row))
    return {"rows": rows}


# ------------------------------------------------------------------ CNNs


def part_convnets(args) -> dict:
    import torch

    import sparsenn as sn
    from sparsenn.models import ResNet18

    nets = {"resnet18": lambda: ResNet18(num_classes=1000)}
    try:
        from sparsenn.models import load_efficientnet_lite0

        nets["efficientnet_lite0"] = lambda: load_efficientnet_lite0(pretrained=True)
    except Exception as e:  # noqa: BLE001
        log("efficientnet-lite0 not available:", e)
    rows = []
    batches = (1, 16) if not args.quick else (1, 2)
    side = 224 if not args.quick else 64
    for name, make in nets.items():
        try:
            base = make().eval()
        except Exception as e:  # noqa: BLE001
            log(f"{name}: {e}")
            continue
        names = [n for n, m in base.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                 and getattr(m, "groups", 1) == 1]
        weights = {f"{n}.weight" for n in names}
        for sparsity in args.cnn_sparsities:
            model = copy.deepcopy(base)
            magnitude_prune(model, sparsity, weights)
            xs = {b: torch.randn(b, 3, side, side) for b in batches}
            t0 = time.perf_counter()
            c = sn.convert(model, xs[batches[0]], batch_sizes=batches, time_limit=None, budget=0.2)
            conv_s = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "net.onnx"
                why = export(model, (xs[batches[0]],), path, ["x"])
                sess = ort_session(path, args.threads) if why is None else None
                with deepsparse_server(args.deepsparse_python, args.threads, d, why) as ds:
                    for b in batches if ds is not None else ():
                        ds.load(f"b{b}", path, b, [xs[b].numpy()])
                    trip = ds.round_trip() if ds is not None else None
                    for b in batches:
                        x = xs[b]
                        with torch.inference_mode():
                            ok = torch.allclose(c(x), model(x), rtol=1e-3, atol=1e-3)
                            fns = {"dense": lambda: model(x), "sparsenn": lambda: c(x)}
                            if sess is not None:
                                fns["onnxruntime"] = lambda: sess.run(None, {"x": x.numpy()})
                            t = side_by_side(with_deepsparse(fns, ds, f"b{b}"), budget=args.budget)
                        kernels = [r.choice.get(b, "dense") for r in c.conversion_summary.layers]
                        row = {"model": name, "sparsity": sparsity, "batch": b, "convert_s": conv_s,
                               "outputs_match": ok, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                               "deepsparse_ms": deepsparse_cell(t, ds, f"b{b}"),
                               "deepsparse_round_trip_ms": None if trip is None else trip * 1e3, "export_error": why,
                               "kernels": {k: kernels.count(k) for k in sorted(set(kernels))}}
                        rows.append(row)
                        log(json.dumps(row))
    return {"rows": rows}


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="smollm2,bert,convnets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32, help="Wanda calibration windows of 512 tokens")
    ap.add_argument("--int8", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"],
                    help="int8 rows: round to nearest in convert, and/or GPTQ (sn.quantize) before convert")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--targets", default="0.5,0.7,2:4")
    ap.add_argument("--bert-sparsities", default="0.7,0.8,0.9")
    ap.add_argument("--cnn-sparsities", default="0.8,0.9")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per engine and cell of the timing rounds")
    ap.add_argument("--deepsparse-python", default=None, help="a Python (<= 3.11) with deepsparse==1.8.0")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="write PREFIX.json")
    args = ap.parse_args()
    args.targets = args.targets.split(",")
    args.bert_sparsities = [float(s) for s in args.bert_sparsities.split(",")]
    args.cnn_sparsities = [float(s) for s in args.cnn_sparsities.split(",")]
    import torch

    start = time.time()
    torch.set_num_threads(args.threads)
    bw = stream_bandwidth(args.threads)
    result = {}
    parts = args.parts.split(",")
    if "smollm2" in parts:
        result["smollm2"] = part_smollm2(args, bw)
    if "bert" in parts:
        result["bert"] = part_bert(args)
    if "convnets" in parts:
        result["convnets"] = part_convnets(args)
    result = {**run_meta("transformer_runtime.py", None, start, cpu_count=os.cpu_count(),
                         stream_bandwidth_GBps=bw / 1e9), **result}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(text)


if __name__ == "__main__":
    main()
