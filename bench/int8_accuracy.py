"""int8 weights of a pruned SmolLM2-135M: the perplexity change of round to nearest vs GPTQ (``sn.quantize``).

For each target (``--targets``, default 50%, 70% and 2:4) SmolLM2-135M (``bench/_smollm2.py``) is
pruned with Wanda (``sn.oneshot``, ``--samples`` x 512 calibration tokens of calibration.txt), then
quantized to int8 per output row in three ways, every ``nn.Linear`` including the (untied) LM head:

- ``rtn``: round to nearest on ``max|w| / 127`` (``sn.quantize(method="rtn")``: what
  ``sn.convert(weights="int8")`` does to a float weight);
- ``gptq``: ``sn.quantize(method="gptq")`` with the same calibration windows (never evaluation.txt);
- ``gptq converted``: the GPTQ model through ``sn.convert(weights="int8")`` with every Linear forced to
  the ``bitmask_int8`` kernel (one-row kernel), which must store exactly the values ``sn.quantize``
  wrote (the round trip: largest difference between a packed, dequantized weight and the module's).

Perplexity on the first ``--eval-tokens`` tokens of evaluation.txt (windows of 512, stride 512), and
its change relative to the same sparse model in float32. ``--split`` adds the head alone and the
block Linears alone, for both methods.

    python bench/int8_accuracy.py                       # writes bench/results/int8_accuracy.{json,md}
    python bench/int8_accuracy.py --quick               # a smoke run (small calibration and text)
    python bench/int8_accuracy.py --resume              # go on after an interrupted run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _results import log, run_meta, write_results

TEXT = HERE.parent.parent / "shared" / "datasets" / "text" / "pydocs"


def change(ppl: float, ref: float) -> float:
    """Relative change in percent."""
    return 100.0 * (ppl / ref - 1.0)


def roundtrip(model, converted) -> float:
    """Largest ``|dequantized packed weight - module weight| / max|module weight row|`` over every converted
    Linear (0 up to float32 rounding when convert stores exactly what sn.quantize wrote)."""
    import numpy as np

    from sparsenn.backend.runtime import SparseLinear

    worst = 0.0
    for name, m in converted.named_modules():
        if not isinstance(m, SparseLinear):
            continue
        w = model.get_submodule(name).weight.detach().float().numpy()
        amax = np.abs(w).max(axis=1, keepdims=True)
        amax[amax == 0] = 1.0
        for key in m.kernel_meta:
            worst = max(worst, float((np.abs(m.packed(key).to_dense() - w) / amax).max()))
    return worst


def evaluate(args, on_row=lambda partial: None) -> dict:
    import _smollm2
    import torch

    import sparsenn as sn
    from sparsenn.data.text import calibration_batches, read_text, tokenize

    model, tok = _smollm2.load()
    eval_ids = tokenize(tok, read_text(TEXT / "evaluation.txt"))[:args.eval_tokens]
    calibration = calibration_batches(tok, TEXT / "calibration.txt", samples=args.samples, length=args.length,
                                      seed=0)
    prompt = calibration[0][:, :16]

    def ppl(m) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            p = sn.perplexity(m, eval_ids, window=args.window, stride=args.window)
        log(f"  perplexity {p:.4f} ({time.perf_counter() - t0:.0f} s)")
        return p

    rows: list[dict] = list(args.done)
    result = {"model": "SmolLM2-135M", "calibration": f"{args.samples} x {args.length} tokens of calibration.txt",
              "evaluation": f"{eval_ids.numel()} tokens of evaluation.txt, window {args.window}", "rows": rows}
    for target in args.targets:
        if any(r["target"] == target for r in rows):
            log(f"target {target}: kept from the earlier run (--resume)")
            continue
        log(f"target {target}")
        pruned = copy.deepcopy(model)
        kw = {"pattern": target} if ":" in target else {"sparsity": float(target)}
        t0 = time.perf_counter()
        sn.oneshot(pruned, method="wanda", calibration=calibration, measure_error=False, **kw)
        log(f"  wanda {time.perf_counter() - t0:.0f} s")
        row = {"target": target, "sparsity": sn.sparsity(pruned), "ppl_fp32": ppl(pruned)}
        variants = [("rtn", "rtn", None, ()), ("gptq", "gptq", None, ())]
        if args.split:
            variants += [("rtn_head", "rtn", "lm_head", ()), ("gptq_head", "gptq", "lm_head", ()),
                         ("rtn_blocks", "rtn", None, ("lm_head",)), ("gptq_blocks", "gptq", None, ("lm_head",))]
        for label, method, include, exclude in variants:
            q = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            sn.quantize(q, calibration if method == "gptq" else None, method=method, include=include, exclude=exclude)
            report = q.quantize_report
            log(f"  {label}: quantized in {time.perf_counter() - t0:.0f} s, {report.off_grid_rows} rows off grid, "
                f"untied {report.untied}")
            row[f"ppl_{label}"] = ppl(q)
            row[f"{label}_change_pct"] = change(row[f"ppl_{label}"], row["ppl_fp32"])
            row[f"{label}_seconds"] = report.seconds
            if label == "gptq":
                errors = [(r.rtn_error, r.gptq_error) for r in report.layers]
                row["layers"] = len(errors)
                row["mean_layer_error_rtn"] = sum(e[0] for e in errors) / len(errors)
                row["mean_layer_error_gptq"] = sum(e[1] for e in errors) / len(errors)
                row["head_error_rtn"], row["head_error_gptq"] = next(
                    (r.rtn_error, r.gptq_error) for r in report.layers if r.name == "lm_head")
                row["off_grid_rows"] = report.off_grid_rows
                row["untied"] = report.untied
                if args.convert:
                    t0 = time.perf_counter()
                    c = sn.convert(q, {"input_ids": prompt}, batch_sizes=(1,), weights="int8", force="bitmask_int8",
                                   time_limit=None)
                    log(f"  converted in {time.perf_counter() - t0:.0f} s")
                    row["roundtrip_max_rel_diff"] = roundtrip(q, c)
                    row["ppl_gptq_converted"] = ppl(c)
                    row["gptq_converted_change_pct"] = change(row["ppl_gptq_converted"], row["ppl_fp32"])
                    del c
            del q
        log("  " + json.dumps({k: v for k, v in row.items() if k.startswith(("ppl", "target")) or "change" in k}))
        rows.append(row)
        on_row(result)
        del pruned
    return result


def markdown(result: dict) -> str:
    rows = result["rows"]
    extra = [k for k in ("rtn_head", "gptq_head", "rtn_blocks", "gptq_blocks") if f"ppl_{k}" in rows[0]]
    head = ["target", "fp32", "rtn int8", "gptq int8"] + (["gptq converted"] if "ppl_gptq_converted" in rows[0]
                                                         else []) + extra
    title = (f"{result['model']}, Wanda; perplexity on {result['evaluation']}; calibration {result['calibration']}; "
             "int8 change relative to the fp32 sparse model")
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["target"], f"{r['ppl_fp32']:.3f}"]
        for k in ["rtn", "gptq"] + (["gptq_converted"] if "ppl_gptq_converted" in r else []) + extra:
            cells.append(f"{r[f'ppl_{k}']:.3f} ({r[f'{k}_change_pct']:+.2f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="0.5,0.7,2:4", help="sparsities and N:M patterns, comma-separated")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (Wanda and GPTQ)")
    ap.add_argument("--length", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--split", action="store_true", help="also the head alone and the block Linears alone")
    ap.add_argument("--no-convert", dest="convert", action="store_false",
                    help="skip the converted (sn.convert int8) model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 x 128 calibration tokens, 1024 eval tokens, 50%%")
    ap.add_argument("--out", default=None, help="PREFIX of PREFIX.json / PREFIX.md (default "
                    "bench/results/int8_accuracy; none with --quick)")
    ap.add_argument("--resume", action="store_true", help="keep the targets already in PREFIX.json (written "
                    "after every target) and run the others")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.length, args.eval_tokens, args.window = 4, 128, 1024, 256
        args.targets = "0.5"
    args.targets = args.targets.split(",")
    out = args.out or (None if args.quick else str(HERE / "results" / "int8_accuracy"))
    args.done = []
    if args.resume and out and Path(out + ".json").is_file():
        args.done = json.loads(Path(out + ".json").read_text()).get("rows", [])
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()

    def save(partial: dict) -> str:  # after every target: a crash keeps the rows done
        payload = {**run_meta("int8_accuracy.py", argv, start), **partial}
        text = markdown(payload)
        if out:
            write_results(out, text, payload)
        return text

    result = evaluate(args, save)
    print(save(result))
    return result


if __name__ == "__main__":
    main()
