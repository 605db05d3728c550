"""Structured pruning that shrinks the network (issue 16): sparsenn's ``shrink`` vs Torch-Pruning.

Parts (``--parts``), on ``--threads`` threads:

- ``cnn``: ResNet-18 (1000 classes) and EfficientNet-Lite0 (ImageNet weights when the package is
  installed) at 224x224, channel ratios 0.3/0.5/0.7 (``importance="l1"``, ``round_to=8``,
  classifier kept): parameters, MACs (``sn.metrics.macs``), latency at batch 1 and 32 (dense and
  shrunk side by side, interleaved medians), the speed-up against the MAC reduction; the same
  with Torch-Pruning's ``MetaPruner`` (L1 magnitude, same ratio and rounding) where it runs;
  and each library's graph-building time.
- ``smollm2``: SmolLM2-135M, MLP channels and query heads per key-value group removed at
  ratios 0.1/0.2/0.3 with ``importance="wanda"`` on 8 x 512 calibration tokens; parameters
  removed and perplexity on ``--eval-tokens`` tokens of evaluation.txt without fine-tuning;
  ``drop_layers`` (Block Influence) for comparison; Torch-Pruning where it runs.
- ``recover`` (not in the default parts): SmolLM2 with 20% fewer parameters, perplexity before and
  after a recovery fine-tune of ``--recover-seconds`` (under the issue's 10 minutes).

    python bench/structured.py --out bench/results/structured
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
from _results import run_meta

TEXT = HERE.parent.parent / "shared" / "datasets" / "text" / "pydocs"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def total_macs(model, x) -> int:
    import sparsenn as sn

    return sum(d for d, _ in sn.metrics.macs(model, x).values())


def side_by_side(fns: dict, budget: float) -> dict:
    from sparsenn.backend.runtime.timing import interleaved_medians

    return interleaved_medians(fns, budget=budget, min_repeats=5, max_repeats=30)


def torch_pruning(model, x, ratio: float, ignored, round_to: int = 8):
    """``(pruned model, graph seconds, error)`` with Torch-Pruning's MetaPruner (L1 magnitude)."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        return None, None, f"not installed ({e})"
    m = copy.deepcopy(model)
    try:
        t0 = time.perf_counter()
        tp.DependencyGraph().build_dependency(m, example_inputs=x)
        graph_s = time.perf_counter() - t0
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                      ignored_layers=[m.get_submodule(n) for n in ignored], round_to=round_to)
        pruner.step()
        return m, graph_s, None
    except Exception as e:  # noqa: BLE001  (coverage is what is measured)
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def part_cnn(args) -> list:
    import torch

    import sparsenn as sn
    from sparsenn.models import ResNet18
    from sparsenn.structured import build_graph

    nets = {"resnet18": (lambda: ResNet18(num_classes=1000), "fc")}
    try:
        from sparsenn.models import load_efficientnet_lite0

        nets["efficientnet_lite0"] = (lambda: load_efficientnet_lite0(pretrained=True), "_fc")
    except Exception as e:  # noqa: BLE001
        log("efficientnet-lite0:", e)
    rows = []
    for name, (make, head) in nets.items():
        model = make().eval()
        x1, x32 = torch.randn(1, 3, 224, 224), torch.randn(args.batch, 3, 224, 224)
        t0 = time.perf_counter()
        build_graph(model, x1)
        sn_graph_s = time.perf_counter() - t0
        base = {"params": count(model), "macs": total_macs(model, x1)}
        for ratio in args.ratios:
            for lib in ("sparsenn", "torch-pruning"):
                if lib == "sparsenn":
                    small, graph_s, err = sn.shrink(model, x1, ratio=ratio, round_to=8, ignore=[head]), sn_graph_s, None
                else:
                    small, graph_s, err = torch_pruning(model, x1, ratio, [head])
                row = {"model": name, "library": lib, "ratio": ratio, "graph_s": graph_s, "error": err, **base}
                if small is not None:
                    small.eval()
                    row.update(params_after=count(small), macs_after=total_macs(small, x1))
                    with torch.inference_mode():
                        for b, x in ((1, x1), (args.batch, x32)):
                            t = side_by_side({"dense": lambda x=x, m=model: m(x), "shrunk": lambda x=x, m=small: m(x)},
                                             args.budget)
                            row[f"dense_ms_b{b}"], row[f"shrunk_ms_b{b}"] = t["dense"] * 1e3, t["shrunk"] * 1e3
                            row[f"speedup_b{b}"] = t["dense"] / t["shrunk"]
                    row["mac_reduction"] = row["macs"] / row["macs_after"]
                rows.append(row)
                log(json.dumps(row))
    return rows


def part_smollm2(args) -> list:
    import _smollm2
    import torch

    import sparsenn as sn
    from sparsenn.data.text import calibration_batches, read_text, tokenize

    model, tok = _smollm2.load()
    model.eval()
    eval_ids = tokenize(tok, read_text(TEXT / "evaluation.txt"))[:args.eval_tokens]
    calib = calibration_batches(tok, TEXT / "calibration.txt", samples=8, length=512, seed=0)
    calib_ids = torch.cat([b["input_ids"] if isinstance(b, dict) else b for b in calib])[:8]
    example = {"input_ids": calib_ids}
    with torch.inference_mode():
        dense_ppl = sn.perplexity(model, eval_ids, window=512, stride=512)
    rows = [{"model": "smollm2-135m", "method": "dense", "params": count(model), "perplexity": dense_ppl}]
    log(json.dumps(rows[0]))
    for ratio in args.llm_ratios:
        t0 = time.perf_counter()
        small = sn.shrink(model, example, ratio=ratio, importance="wanda")
        secs = time.perf_counter() - t0
        with torch.inference_mode():
            ppl = sn.perplexity(small, eval_ids, window=512, stride=512)
        row = {"model": "smollm2-135m", "method": "sparsenn shrink wanda (MLP + query heads)", "ratio": ratio,
               "seconds": secs, "params": count(small), "removed": 1 - count(small) / rows[0]["params"],
               "perplexity": ppl, "vs_dense": ppl / dense_ppl, "notes": small.shrink_notes[-1:]}
        rows.append(row)
        log(json.dumps(row))
        del small
    for n in args.drop:
        short = sn.drop_layers(model, {"input_ids": calib_ids[:2]}, n)
        with torch.inference_mode():
            ppl = sn.perplexity(short, eval_ids, window=512, stride=512)
        row = {"model": "smollm2-135m", "method": f"sparsenn drop_layers n={n}", "params": count(short),
               "removed": 1 - count(short) / rows[0]["params"], "perplexity": ppl, "vs_dense": ppl / dense_ppl,
               "dropped": short.dropped}
        rows.append(row)
        log(json.dumps(row))
    small, graph_s, err = torch_pruning(model, calib_ids[:1], 0.2, ["lm_head"])
    row = {"model": "smollm2-135m", "method": "torch-pruning MetaPruner l1 ratio 0.2 (defaults)", "error": err,
           "graph_s": graph_s}
    if small is not None:
        try:
            with torch.inference_mode():
                row.update(params=count(small), perplexity=sn.perplexity(small, eval_ids, window=512, stride=512))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"pruned model fails: {type(e).__name__}: {str(e).splitlines()[0]}"
    rows.append(row)
    log(json.dumps(row))
    return rows


def part_recover(args) -> list:
    """SmolLM2 at 20% fewer parameters (MLP channels, ratio 0.338, wanda), then a recovery fine-tune of
    ``--recover-seconds`` on calibration.txt (AdamW, lr 1e-4 after 20 warm-up steps, 2 x 256-token windows)."""
    import _smollm2
    import torch

    import sparsenn as sn
    from sparsenn.data.text import calibration_batches, read_text, tokenize

    model, tok = _smollm2.load()
    model.eval()
    eval_ids = tokenize(tok, read_text(TEXT / "evaluation.txt"))[:args.eval_tokens]
    calib_ids = torch.cat(calibration_batches(tok, TEXT / "calibration.txt", samples=8, length=512, seed=0))
    with torch.inference_mode():
        dense_ppl = sn.perplexity(model, eval_ids, window=512, stride=512)
    small = sn.shrink(model, {"input_ids": calib_ids}, ratio=0.338, importance="wanda", attention="none")
    removed = 1 - count(small) / count(model)
    del model
    with torch.inference_mode():
        before = sn.perplexity(small, eval_ids, window=512, stride=512)
    train_ids = tokenize(tok, read_text(TEXT / "calibration.txt"))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(small.parameters(), lr=1e-4, weight_decay=0.0)
    small.train()
    t0, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < args.recover_seconds:
        starts = torch.randint(0, len(train_ids) - 257, (2,), generator=gen)
        x = torch.stack([train_ids[s:s + 256] for s in starts])
        for group in opt.param_groups:
            group["lr"] = 1e-4 * min(1.0, (step + 1) / 20)
        loss = small(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
    seconds = time.perf_counter() - t0
    small.eval()
    with torch.inference_mode():
        after = sn.perplexity(small, eval_ids, window=512, stride=512)
    row = {"model": "smollm2-135m", "method": "shrink ratio 0.338 wanda (MLP) + recovery fine-tune",
           "removed": removed, "dense_perplexity": dense_ppl, "perplexity_before": before, "perplexity_after": after,
           "vs_dense_before": before / dense_ppl, "vs_dense_after": after / dense_ppl, "steps": step,
           "fine_tune_s": seconds, "tokens": step * 512, "loss_first_last": [losses[0], losses[-1]] if losses else None}
    log(json.dumps(row))
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="cnn,smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--llm-ratios", default="0.1,0.2,0.3")
    ap.add_argument("--drop", default="3,6")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--recover-seconds", type=float, default=570.0, help="fine-tune time (the target allows 600 s)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.llm_ratios = [float(r) for r in args.llm_ratios.split(",")]
    args.drop = [int(n) for n in args.drop.split(",") if n]
    import torch

    start = time.time()
    torch.set_num_threads(args.threads)
    result = {}
    parts = args.parts.split(",")
    if "cnn" in parts:
        result["cnn"] = part_cnn(args)
    if "smollm2" in parts:
        result["smollm2"] = part_smollm2(args)
    if "recover" in parts:
        result["recover"] = part_recover(args)
    result = {**run_meta("structured.py", None, start), **result}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(text)


if __name__ == "__main__":
    main()
