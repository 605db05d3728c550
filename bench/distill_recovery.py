"""Sparse recovery of SmolLM2-135M after one-shot pruning (issue 19): a short masked fine-tune with a
wall-clock budget, distilling from the dense model vs the plain language-model loss.

For each target (``--targets``: 50% unstructured and 2:4 by default) the dense model is pruned with
``sn.oneshot`` (Wanda, Sun et al. 2023; ``--samples`` windows of ``--length`` tokens of calibration.txt);
then, for each loss (``--losses``), a copy of the pruned model is fine-tuned with
``sparsenn.train.recovery.recover`` for ``--budget-s`` seconds of wall clock (teacher forward passes
included) on windows of ``--train-length`` tokens of calibration.txt (a different seed than the
calibration windows; evaluation.txt is never trained on), AdamW at ``--lr``, gradient norm clipped at 1:

* ``distill``: KL divergence to the dense model's next-token distribution at every position
  (temperature ``--temperature``, weight ``--alpha``; Hinton et al. 2015);
* ``lm``: the next-token cross-entropy.

The masks that ``sn.oneshot`` attached are kept exact by masked-optimizer hooks (checked after each run:
every pruned weight is 0.0 and the masks are unchanged). Perplexity: the first ``--eval-tokens`` tokens of
evaluation.txt in disjoint windows of ``--window`` tokens (``sn.perplexity``, as ``bench/oneshot.py``),
before and after recovery. PyTorch runs on ``--threads`` threads (default 2).

    python bench/distill_recovery.py --out bench/results/distill_recovery         # full: 4 x 600 s (~1 h)
    python bench/distill_recovery.py --budget-s 20 --samples 4 --eval-tokens 2048 # smoke run (~3 min, quiet machine)

The learning rate (5e-5) is a common fine-tuning value, not tuned; one step trains on ``--train-batch``
windows (default one 512-token window, the evaluation's window length).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _smollm2
from _results import log, run_meta, write_results
from oneshot import TEXT, _target

import sparsenn as sn
from sparsenn.core.masks import get_masks, masked_parameters
from sparsenn.data.text import calibration_batches, read_text, tokenize
from sparsenn.train.recovery import RECOVERY_LOSSES, recover


def masks_exact(model, masks: dict[str, torch.Tensor]) -> bool:
    """The masks are the ones given and every masked weight is exactly zero."""
    now = get_masks(model)
    if now.keys() != masks.keys() or any(not torch.equal(now[n], m) for n, m in masks.items()):
        return False
    return all(not bool(mp.param[~mp.mask].any()) for mp in masked_parameters(model))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="0.5,2:4", help="comma-separated: a sparsity (unstructured) or N:M")
    ap.add_argument("--losses", default="distill,lm", help=f"comma-separated, of: {', '.join(RECOVERY_LOSSES)}")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock seconds of recovery per run")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows for Wanda")
    ap.add_argument("--length", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--train-length", type=int, default=512, help="tokens per training window")
    ap.add_argument("--train-batch", type=int, default=1, help="windows per training step")
    ap.add_argument("--train-windows", type=int, default=2048, help="training windows drawn (cycled if used up)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of the KL term for loss distill")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="PREFIX: table in PREFIX.md, rows in PREFIX.json")
    args = ap.parse_args(argv)
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    unknown = [x for x in losses if x not in RECOVERY_LOSSES]
    if unknown:
        ap.error(f"unknown losses {unknown}; valid: {', '.join(RECOVERY_LOSSES)}")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    start = time.time()
    torch.set_num_threads(args.threads)

    dense, tokenizer = _smollm2.load()
    for p in dense.parameters():
        p.requires_grad_(False)  # the teacher: never trained, no gradients kept
    eval_ids = tokenize(tokenizer, read_text(TEXT / "evaluation.txt"))[:args.eval_tokens]
    train_ids = tokenize(tokenizer, read_text(TEXT / "calibration.txt"))

    def ppl(model):
        return sn.perplexity(model, eval_ids, window=args.window, stride=args.window)

    dense_ppl = ppl(dense)
    log(f"dense perplexity {dense_ppl:.2f}")
    train_batches = calibration_batches(train_ids, samples=args.train_windows, length=args.train_length,
                                        batch_size=args.train_batch, seed=args.seed + 1)
    rows = []
    for target in targets:
        pruned = copy.deepcopy(dense)
        for p in pruned.parameters():
            p.requires_grad_(True)
        calibration = calibration_batches(train_ids, samples=args.samples, length=args.length, seed=args.seed)
        t0 = time.perf_counter()
        sn.oneshot(pruned, method="wanda", calibration=calibration, measure_error=False, **_target(target))
        prune_s = time.perf_counter() - t0
        masks = {n: m.clone() for n, m in get_masks(pruned).items()}
        before = ppl(pruned)
        log(f"{target}: one-shot Wanda in {prune_s:.0f} s, perplexity {before:.2f}")
        for loss in losses:
            model = copy.deepcopy(pruned)
            result = recover(model, train_batches, teacher=dense if loss == "distill" else None, loss=loss,
                             time_budget_s=args.budget_s, lr=args.lr, temperature=args.temperature,
                             alpha=args.alpha)
            after = ppl(model)
            exact = masks_exact(model, masks)
            rows.append({"target": target, "loss": loss, "dense_ppl": dense_ppl, "oneshot_ppl": before,
                         "recovered_ppl": after, "prune_s": prune_s, "steps": result.steps, "tokens": result.tokens,
                         "recovery_s": result.seconds, "first_losses": result.losses[:5],
                         "last_losses": result.losses[-5:], "masks_exact": exact,
                         "sparsity": sn.report(model).total.sparsity})
            log(f"{target} {loss}: {result.steps} steps ({result.tokens} tokens) in {result.seconds:.0f} s, "
                f"perplexity {before:.2f} -> {after:.2f}, masks exact: {exact}")
            if not exact:
                raise SystemExit(f"{target} {loss}: the masks did not stay exact")
            del model
        del pruned

    meta = run_meta("distill_recovery.py", argv, start)
    lines = [f"Command: `{meta['command']}`  ",
             (f"Machine: {meta['machine']}; date {meta['date']}; wall time {meta['seconds'] / 60:.1f} min. "
             f"Wanda calibration {args.samples} x {args.length} tokens, recovery on {args.train_batch} x "
             f"{args.train_length}-token windows of calibration.txt, AdamW lr {args.lr:g}, {args.budget_s:g} s per run; "
             f"perplexity on {args.eval_tokens} tokens of evaluation.txt (windows of {args.window}, disjoint); "
             f"distill: T={args.temperature:g}, alpha={args.alpha:g}."), "",
             f"Dense SmolLM2-135M: perplexity {dense_ppl:.2f}.", "",
             "| target | loss | one-shot ppl | recovered ppl | change | steps | tokens | recovery (s) | masks exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['loss']} | {r['oneshot_ppl']:.2f} | {r['recovered_ppl']:.2f} | "
                     f"{r['recovered_ppl'] / r['oneshot_ppl'] - 1:+.1%} | {r['steps']} | {r['tokens']} | "
                     f"{r['recovery_s']:.0f} | {'yes' if r['masks_exact'] else 'NO'} |")
    text = "\n".join(lines)
    if args.out:
        write_results(args.out, text, {"meta": meta, "rows": rows})
    print(text)
    return rows


if __name__ == "__main__":
    main()
