"""Structured pruning that shrinks the network (issue 16): sparsenn's ``shrink`` vs Torch-Pruning.

Parts (``--parts``), on ``--threads`` threads:

- ``cnn``: ResNet-18 (1000 classes) and EfficientNet-Lite0 (ImageNet weights when the package is
  installed) at 224x224, channel ratios 0.3/0.5/0.7 (``importance="l1"``, ``round_to=8``,
  classifier kept; ``--cnn-round-to``): parameters, MACs (``sn.metrics.macs``), latency at batch 1 and 32 (dense and
  shrunk side by side, interleaved medians), the speed-up against the MAC reduction; the same
  with Torch-Pruning's ``MetaPruner`` (L1 magnitude, same ratio and rounding) where it runs;
  and each library's graph-building time. ``--deploy`` times every model (dense and shrunk alike) as an
  inference deployment runs it: BatchNorm folded into the convolutions, activations in channels_last.
- ``smollm2``: SmolLM2-135M, MLP channels and query heads per key-value group removed at
  ratios 0.1/0.2/0.3 with ``importance="wanda"`` on 8 x 512 calibration tokens; parameters
  removed and perplexity on ``--eval-tokens`` tokens of evaluation.txt without fine-tuning;
  ``drop_layers`` (Block Influence) for comparison; Torch-Pruning where it runs.
- ``recover`` (not in the default parts): SmolLM2 with 20% fewer parameters, perplexity before and
  after a recovery fine-tune of ``--recover-seconds`` (under the issue's 10 minutes).
- ``finetune`` (not in the default parts): SmallVGG and a small ResNet trained on Fashion-MNIST, shrunk
  at ``--ratios`` of their channels by sparsenn and by Torch-Pruning (L1, ``round_to=1``, classifier
  kept), each fine-tuned the same number of steps: parameters, MACs, latency at batch 1 and 32
  before/after, test accuracy before/after the fine-tune; plus rows at equal parameter count
  (``--equal``: a sparsenn configuration, and Torch-Pruning at the ratio bisected so its parameter
  count is within 1% of sparsenn's). ``--quick``: a smoke run of the same code on tiny data (< 1 min).

    python bench/structured.py --out bench/results/structured
    python bench/structured.py --parts finetune --out bench/results/structured.finetune
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
from _results import log, run_meta

TEXT = HERE.parent.parent / "shared" / "datasets" / "text" / "pydocs"
DATASETS = HERE.parent.parent / "shared" / "datasets"


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def total_macs(model, x) -> int:
    import sparsenn as sn

    return sum(d for d, _ in sn.metrics.macs(model, x).values())


def side_by_side(fns: dict, budget: float) -> dict:
    from sparsenn.backend.runtime.timing import interleaved_medians

    return interleaved_medians(fns, budget=budget, min_repeats=5, max_repeats=30)


def torch_pruning(model, x, ratio: float, ignored, round_to: int | None = 8):
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


def deployed(model, x, deploy: bool):
    """The model as an inference deployment runs it: BatchNorm folded into the convolutions
    (sparsenn's runtime fusion, what ``sn.convert`` does) and activations in channels_last."""
    if not deploy:
        return model
    import torch

    from sparsenn.backend.runtime.fusion import fold_batchnorm

    m = copy.deepcopy(model).eval()
    fold_batchnorm(m, x)
    return m.to(memory_format=torch.channels_last)


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
        if args.models and name not in args.models:
            continue
        model = make().eval()
        x1, x32 = torch.randn(1, 3, 224, 224), torch.randn(args.batch, 3, 224, 224)
        t0 = time.perf_counter()
        build_graph(model, x1)
        sn_graph_s = time.perf_counter() - t0
        base = {"params": count(model), "macs": total_macs(model, x1)}
        for ratio in args.ratios:
            for lib in ("sparsenn", "torch-pruning"):
                if lib == "sparsenn":
                    small = sn.shrink(model, x1, ratio=ratio, round_to=args.cnn_round_to, ignore=[head])
                    graph_s, err = sn_graph_s, None
                else:
                    small, graph_s, err = torch_pruning(model, x1, ratio, [head], round_to=args.cnn_round_to)
                row = {"model": name, "library": lib, "ratio": ratio, "round_to": args.cnn_round_to,
                       "deploy": args.deploy, "graph_s": graph_s, "error": err, **base}
                if small is not None:
                    small.eval()
                    row.update(params_after=count(small), macs_after=total_macs(small, x1))
                    dense_run, small_run = deployed(model, x1, args.deploy), deployed(small, x1, args.deploy)
                    with torch.inference_mode():
                        for b, x in ((1, x1), (args.batch, x32)):
                            if args.deploy:
                                x = x.contiguous(memory_format=torch.channels_last)
                            t = side_by_side({"dense": lambda x=x, m=dense_run: m(x),
                                              "shrunk": lambda x=x, m=small_run: m(x)}, args.budget)
                            row[f"dense_ms_b{b}"], row[f"shrunk_ms_b{b}"] = t["dense"] * 1e3, t["shrunk"] * 1e3
                            row[f"speedup_b{b}"] = t["dense"] / t["shrunk"]
                    row["mac_reduction"] = row["macs"] / row["macs_after"]
                rows.append(row)
                log(json.dumps(row))
    return rows


def ratio_for_removed(model, ids, target: float, extra) -> float:
    """The ``shrink`` ratio that removes ``target`` of ``model``'s parameters (bisected; ``extra(ratio)``: more
    keywords). How many channels go depends on the ratio only, not on which, so the bisection uses random
    importance on a short input."""
    import sparsenn as sn

    total, lo, hi = count(model), 0.0, 0.9
    for _ in range(10):
        mid = (lo + hi) / 2
        small = sn.shrink(model, {"input_ids": ids}, ratio=mid, importance="random", **extra(mid))
        removed = 1 - count(small) / total
        lo, hi = (mid, hi) if removed < target else (lo, mid)
        if abs(removed - target) < 0.002:
            return mid
    return (lo + hi) / 2


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
    methods = {"MLP + query heads": lambda r: {}, "MLP + query heads + hidden size": lambda r: {"hidden": r / 4},
               "MLP channels only": lambda r: {"attention": "none"}}
    methods = {k: v for k, v in methods.items() if k in args.llm_methods}
    for target in args.llm_targets:  # a fraction of the parameters to remove
        for label, extra in methods.items():
            ratio = ratio_for_removed(model, calib_ids[:1, :16], target, extra)
            t0 = time.perf_counter()
            small = sn.shrink(model, example, ratio=ratio, importance="wanda", **extra(ratio))
            secs = time.perf_counter() - t0
            with torch.inference_mode():
                ppl = sn.perplexity(small, eval_ids, window=512, stride=512)
            row = {"model": "smollm2-135m", "method": f"sparsenn shrink wanda ({label})", "target": target,
                   "ratio": ratio, **extra(ratio), "seconds": secs, "params": count(small),
                   "removed": 1 - count(small) / rows[0]["params"], "perplexity": ppl, "vs_dense": ppl / dense_ppl,
                   "notes": small.shrink_notes[-1:]}
            rows.append(row)
            log(json.dumps(row))
            del small
    if args.no_drop:
        return rows
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


def small_resnet(num_classes: int = 10):
    """A ResNet for 28x28 grey images: a 3x3 stem (16 channels), three stages of one :class:`BasicBlock`
    (16, 32, 64 channels; the last two stride 2 with a 1x1 projection shortcut), global average pooling
    and a linear classifier (He et al. 2016, the CIFAR-style ResNet-8 shape)."""
    from torch import nn

    from sparsenn.models import BasicBlock

    def stage(cin, cout, stride):
        down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        return BasicBlock(cin, cout, stride, down)

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         stage(16, 16, 1), stage(16, 32, 2), stage(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def train(model, x, y, *, epochs: float, lr: float, batch: int = 128, seed: int = 0) -> float:
    """Adam (cosine decay to 0) on ``(x, y)`` for ``epochs`` passes (a fraction: that many steps) in a seeded
    order, so two models given the same arguments see the same batches; returns the seconds."""
    import torch
    import torch.nn.functional as F

    steps = max(1, int(epochs * len(x) / batch))
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(x), generator=gen) for _ in range(int(epochs) + 1)])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


def accuracy(model, x, y, batch: int = 1000) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        right = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return right / len(x)


def equal_params(make_sparsenn, model, x, head: str, nominal: float, round_to: int | None, tol: float = 0.01):
    """sparsenn and Torch-Pruning models with parameter counts within ``tol`` of each other: sparsenn at
    ``nominal``, then at ``nominal`` +- 0.01, +- 0.02, +- 0.03 (the nearest first), each matched by Torch-Pruning
    at the ratio bisected over ``[0, 0.95]`` (its count falls as the ratio rises). Both libraries keep whole
    channels, so a count can only move in steps of one channel of one group: at a given sparsenn ratio
    Torch-Pruning may have no ratio within ``tol``. Returns ``(sparsenn ratio, sparsenn model, Torch-Pruning
    ratio, Torch-Pruning model)``: the first pair within ``tol``, else the closest pair."""
    import torch_pruning as tp

    counts: dict[float, tuple[int, object]] = {}

    def pruned(r):
        if r not in counts:
            m = copy.deepcopy(model)
            tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=r,
                                 ignored_layers=[m.get_submodule(head)], round_to=round_to).step()
            counts[r] = (count(m), m)
        return counts[r]

    best = None
    for k in (0, 1, -1, 2, -2, 3, -3):
        r_sn = round(nominal + 0.01 * k, 4)
        small = make_sparsenn(r_sn)
        target = count(small)
        lo, hi = 0.0, 0.95
        for _ in range(16):
            mid = (lo + hi) / 2
            n, m = pruned(mid)
            gap = abs(n / target - 1)
            if best is None or gap < best[0]:
                best = (gap, r_sn, small, mid, m)
            if gap <= tol / 4:
                break
            lo, hi = (mid, hi) if n > target else (lo, mid)
        if best[0] <= tol:
            break
    return best[1:]


def part_finetune(args) -> list:
    """Fashion-MNIST: train, shrink (sparsenn / Torch-Pruning), fine-tune the same steps, measure."""
    import torch
    import torch.nn.functional as F

    import sparsenn as sn
    from sparsenn.data.datasets import load_idx_dataset
    from sparsenn.models import SmallVGG

    train_set, test_set = load_idx_dataset("fashion_mnist", DATASETS)
    (xtr, ytr), (xte, yte) = train_set.tensors, test_set.tensors
    xtr, xte = (xtr - 0.2860) / 0.3530, (xte - 0.2860) / 0.3530
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(xtr), generator=gen)
    base_idx, ft_idx = pick[:args.base_samples], pick[:args.ft_samples]
    xte, yte = xte[:args.test_samples], yte[:args.test_samples]
    calib_x, calib_y = xtr[pick[-args.calib:]], ytr[pick[-args.calib:]]  # held out of every training
    x1, x32 = xte[:1], xte[:args.batch]
    nets = {"smallvgg": (lambda: SmallVGG(widths=tuple(args.vgg_widths)), "classifier"),
            "small_resnet": (small_resnet, "8")}
    rows = []

    def measure(row, model, small):
        small.eval()
        row.update(params_after=count(small), macs_after=total_macs(small, x1),
                   removed=1 - count(small) / row["params"], acc_before_ft=accuracy(small, xte, yte))
        with torch.inference_mode():
            for b, x in ((1, x1), (args.batch, x32)):
                t = side_by_side({"dense": lambda x=x: model(x), "shrunk": lambda x=x: small(x)}, args.ft_budget)
                row[f"dense_ms_b{b}"], row[f"shrunk_ms_b{b}"] = t["dense"] * 1e3, t["shrunk"] * 1e3
                row[f"speedup_b{b}"] = t["dense"] / t["shrunk"]
        row["ft_s"] = train(small, xtr[ft_idx], ytr[ft_idx], epochs=args.ft_epochs, lr=args.ft_lr, seed=args.seed + 1)
        row["acc_after_ft"] = accuracy(small, xte, yte)
        row["mac_reduction"] = row["macs"] / row["macs_after"]
        rows.append(row)
        log(json.dumps(row))

    for name, (make, head) in nets.items():
        torch.manual_seed(args.seed)
        model = make()
        train_s = train(model, xtr[base_idx], ytr[base_idx], epochs=args.base_epochs, lr=args.base_lr, seed=args.seed)
        base = {"model": name, "params": count(model), "macs": total_macs(model, x1)}
        dense = {**base, "library": "dense", "train_s": train_s, "acc": accuracy(model, xte, yte),
                 "train_samples": len(base_idx), "epochs": args.base_epochs}
        rows.append(dense)
        log(json.dumps(dense))
        rt = args.ft_round_to
        for ratio in args.ratios:
            for lib in ("sparsenn", "torch-pruning"):
                row = {**base, "library": lib, "ratio": ratio, "importance": "l1", "acc_dense": dense["acc"]}
                if lib == "sparsenn":
                    small = sn.shrink(model, calib_x, ratio=ratio, round_to=rt, ignore=[head])
                else:
                    small, _, err = torch_pruning(model, calib_x[:1], ratio, [head], round_to=rt)
                    if small is None:
                        rows.append({**row, "error": err})
                        continue
                measure(row, model, small)
        for spec in args.equal:
            kind, ratio = spec.split(":")
            kw = {"importance": kind}
            if kind == "taylor_global":
                kw = {"importance": "taylor", "global_ratio": True,
                      "loss_fn": lambda out: F.cross_entropy(out, calib_y)}
            elif kind not in ("l1", "filter_l1", "group_l1"):
                raise ValueError(f"--equal: unknown configuration {kind!r}; valid: l1, filter_l1, group_l1, "
                                 "taylor_global")
            t0 = time.perf_counter()
            r_sn, small, r_tp, tp_model = equal_params(
                lambda r, kw=kw, m=model, h=head, rt=rt: sn.shrink(m, calib_x, ratio=r, round_to=rt, ignore=[h], **kw),
                model, calib_x[:1], head, float(ratio), rt)
            label = f"equal params: sparsenn {kind} at {ratio}"
            extra = {"equal": label, "match_s": time.perf_counter() - t0, "acc_dense": dense["acc"]}
            measure({**base, "library": "sparsenn", "ratio": r_sn, "importance": kw["importance"],
                     "global_ratio": kw.get("global_ratio", False), **extra}, model, small)
            measure({**base, "library": "torch-pruning", "ratio": r_tp, "importance": "l1",
                     "params_vs_sparsenn": count(tp_model) / count(small) - 1, **extra}, model, tp_model)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=None, help="cnn,smollm2 (default), recover, finetune (default with --quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--llm-targets", default="0.1,0.2,0.3", help="smollm2: fractions of the parameters to remove")
    ap.add_argument("--llm-methods", default="MLP + query heads,MLP + query heads + hidden size,MLP channels only",
                    help="smollm2: which shrink settings (comma-separated labels)")
    ap.add_argument("--no-drop", action="store_true", help="smollm2: skip drop_layers and Torch-Pruning")
    ap.add_argument("--drop", default="3,6")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default="", help="cnn: only these models (comma-separated; default all)")
    ap.add_argument("--cnn-round-to", type=int, default=8, help="cnn: channel counts rounded to this multiple")
    ap.add_argument("--deploy", action="store_true",
                    help="cnn: time dense and shrunk models alike with BatchNorm folded and channels_last activations")
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--recover-seconds", type=float, default=570.0, help="fine-tune time (the target allows 600 s)")
    ap.add_argument("--base-samples", type=int, default=15000, help="finetune: training images for the dense model")
    ap.add_argument("--base-epochs", type=float, default=1.0)
    ap.add_argument("--base-lr", type=float, default=2e-3)
    ap.add_argument("--ft-samples", type=int, default=4000, help="finetune: training images for each fine-tune")
    ap.add_argument("--ft-epochs", type=float, default=1.0)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--ft-round-to", type=int, default=1)
    ap.add_argument("--ft-budget", type=float, default=0.1, help="finetune: seconds per latency round")
    ap.add_argument("--test-samples", type=int, default=5000)
    ap.add_argument("--calib", type=int, default=256, help="finetune: images for the graph and Taylor's gradients")
    ap.add_argument("--vgg-widths", default="32,64,128")
    ap.add_argument("--equal", default="l1:0.7,taylor_global:0.5",
                    help="finetune: sparsenn configurations matched by Torch-Pruning at equal parameters")
    ap.add_argument("--seed", type=int, default=0, help="finetune: data split, initialisation and batch order")
    ap.add_argument("--quick", action="store_true", help="finetune: a smoke run on tiny data (under a minute)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.base_samples, args.base_epochs, args.ft_samples, args.ft_epochs = 128, 1.0, 256, 1.0
        args.test_samples, args.ft_budget, args.batch, args.ratios, args.calib = 300, 0.01, 8, "0.5", 32
        args.equal = "l1:0.7,taylor_global:0.5"
    args.parts = args.parts or ("finetune" if args.quick else "cnn,smollm2")
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.models = [m for m in args.models.split(",") if m]
    args.llm_targets = [float(r) for r in args.llm_targets.split(",")]
    args.llm_methods = [m.strip() for m in args.llm_methods.split(",")]
    args.drop = [int(n) for n in args.drop.split(",") if n]
    args.vgg_widths = [int(w) for w in args.vgg_widths.split(",")]
    args.equal = [e for e in args.equal.split(",") if e]
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
    if "finetune" in parts:
        result["finetune"] = part_finetune(args)
    result = {**run_meta("structured.py", None, start), **result}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(text)


if __name__ == "__main__":
    main()
