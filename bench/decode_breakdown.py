"""Where a SmolLM2-135M decoding step goes, with and without sibling products (issue 15).

SmolLM2-135M magnitude-pruned to 70% per block Linear (the weights' values do not matter for
speed), converted with ``weights="int8"`` and every layer forced to ``bitmask_int8``, once with
``fuse_siblings=True`` (q/k/v and gate/up stacked, gated MLPs) and once with ``False``:

- ``products``: one token's block products run back to back on random inputs (the layers'
  own one-row path, nothing else), median of 20;
- ``decode``: ``sn.generation_speed`` (the model's ``generate``, under ``inference_mode``),
  ``--new-tokens`` after a 64-token prompt, with PyTorch's dynamic int8 model in the same process;
- ``split`` (fused model only): one instrumented ``generate``, the time per token spent in the
  block products, the head and the sibling slices (the slices' time includes the stacked
  q/k/v products they start); the rest is the model's own work.

    python bench/decode_breakdown.py --out bench/results/decode_breakdown
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _results import log, run_meta  # noqa: E402


def prune(model, sparsity: float) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".layers." in n and p.dim() == 2:
                thr = p.abs().flatten().kthvalue(int(p.numel() * sparsity)).values
                p[p.abs() <= thr] = 0


def products_ms(model, rounds: int = 20) -> tuple[int, float]:
    """``(layers, median ms)`` of one token's block products back to back."""
    import torch

    from sparsenn.backend.runtime import SparseLinear

    layers = [m for n, m in model.named_modules() if isinstance(m, SparseLinear) and "lm_head" not in n]
    xs = [torch.randn(1, 1, m.in_features) for m in layers]
    with torch.inference_mode():
        for m, x in zip(layers, xs):
            m(x)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for m, x in zip(layers, xs):
                m(x)
            times.append(time.perf_counter() - t)
    return len(layers), statistics.median(times) * 1e3


def split_ms(model, prompt, new_tokens: int) -> dict:
    """Per token: ms in the block products, the head and the sibling slices, from one instrumented generate."""
    import torch

    from sparsenn.backend.runtime import SparseLinear
    from sparsenn.backend.runtime.siblings import SiblingSlice

    model = copy.deepcopy(model)
    acc = {"blocks": 0.0, "head": 0.0, "slices": 0.0}

    def wrap(mod, key):
        inner = mod.forward

        def timed(x):
            t = time.perf_counter()
            y = inner(x)
            acc[key] += time.perf_counter() - t
            return y
        mod.forward = timed

    for n, m in model.named_modules():
        if isinstance(m, SparseLinear):
            wrap(m, "head" if "lm_head" in n else "blocks")
        elif isinstance(m, SiblingSlice):
            wrap(m, "slices")

    def run(n):
        for k in acc:
            acc[k] = 0.0
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, dict(acc)

    with torch.inference_mode():
        run(2)
        t1, a1 = run(new_tokens + 1)
        t0, a0 = run(1)
    out = {k: (a1[k] - a0[k]) / new_tokens * 1e3 for k in acc}
    out["total"] = (t1 - t0) / new_tokens * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write PREFIX.json")
    args = ap.parse_args()
    t_start = time.time()

    import torch

    import _smollm2
    import sparsenn as sn

    torch.set_num_threads(args.threads)
    model, _ = _smollm2.load()
    model.eval()
    prune(model, args.sparsity)
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    models = {f"sparsenn fuse_siblings={f}": sn.convert(model, {"input_ids": prompt}, batch_sizes=(1,),
                                                         weights="int8", force="bitmask_int8", time_limit=None,
                                                         fuse_siblings=f, verify=False)
              for f in (True, False)}
    rows = {}
    for name, m in models.items():
        n, ms = products_ms(m)
        rows[name] = {"block_products": n, "products_ms": ms}
        log(f"{name}: {n} block products, {ms:.2f} ms per token")
    models["torch dynamic int8"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                                          dtype=torch.qint8)
    decode = {k: [] for k in models}
    for _ in range(2):  # interleaved
        for name, m in models.items():
            decode[name].append(sn.generation_speed(m, prompt, args.new_tokens, repeats=args.repeats)
                                .decode_s_per_token * 1e3)
    for name, v in decode.items():
        rows.setdefault(name, {})["decode_ms"] = min(v)
        log(f"{name}: decode {min(v):.2f} ms per token (best of {len(v)} medians)")
    rows["sparsenn fuse_siblings=True"]["split_ms"] = split_ms(models["sparsenn fuse_siblings=True"], prompt,
                                                               args.new_tokens)
    log(json.dumps(rows["sparsenn fuse_siblings=True"]["split_ms"]))
    out = {**run_meta("decode_breakdown.py", None, t_start), "rows": rows}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
