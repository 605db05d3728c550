"""The per-token operations around SmolLM2-135M's products, decoding (issue 15): compiled RMSNorm, the
one-query attention kernel, and the in-place KV cache, each against what it replaces.

- ``ops``: one 576-wide row through ``FusedRMSNorm`` (compiled kernel) and ``F.rms_norm``; one
  query token of 9 heads over 3 key/value heads of width 64 at cache lengths 64, 128 and 192
  through ``decode_attention`` and ``F.scaled_dot_product_attention`` (each pair side by side:
  ``interleaved_medians``, rounds of about 2 s);
- ``decode``: SmolLM2-135M magnitude-pruned to 70% per block Linear, converted with
  ``weights="int8"`` (every layer ``bitmask_int8``), decoding with ``sn.generation_speed``
  (``--new-tokens`` after a prompt of 64 and of 1,024 random tokens), ``FusedAttention``
  appending to the cache in place and running the kernel (``buffers + kernel``, the default),
  appending in place with transformers' SDPA (``buffers + sdpa``), and the same model made to
  use ``cache.update`` and SDPA (``cat + sdpa``), interleaved ``--rounds`` times in one
  process; greedy tokens are checked equal.

    python bench/decode_ops.py --out bench/results/decode_ops
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _results import log, run_meta  # noqa: E402


def ops() -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from sparsenn.backend.kernels.attention import decode_attention
    from sparsenn.backend.runtime.norms import FusedRMSNorm
    from sparsenn.backend.runtime.timing import interleaved_medians

    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(576, generator=g))
    norm, x = FusedRMSNorm(w, 1e-5), torch.randn(1, 1, 576, generator=g)
    out = {}

    def us(fns: dict) -> dict:  # side by side, interleaved (the runtime's own timing rounds)
        return {name: s * 1e6 for name, s in interleaved_medians(fns, budget=2.0, max_repeats=1000).items()}

    with torch.inference_mode():
        out["rms_norm_us"] = us({"FusedRMSNorm (compiled)": lambda: norm(x),
                                 "F.rms_norm": lambda: F.rms_norm(x, (576,), w, 1e-5)})
        for length in (64, 128, 192):
            kb, vb = torch.randn(1, 3, 256, 64, generator=g), torch.randn(1, 3, 256, 64, generator=g)
            q, res = torch.randn(1, 9, 1, 64, generator=g), np.empty((9, 64), dtype=np.float32)
            k, v = kb[:, :, :length], vb[:, :, :length]
            out[f"attention_us_L{length}"] = us({
                "decode_attention": lambda: decode_attention(q[0, :, 0].numpy(), kb[0].numpy(), vb[0].numpy(),
                                                             length, 0.125, res),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True)})
    return out


def decode(args) -> dict:
    import torch

    import _smollm2
    import sparsenn as sn
    import sparsenn.backend.runtime.attention as attention
    from decode_breakdown import prune

    model, _ = _smollm2.load()
    model.eval()
    prune(model, 0.7)
    prompts = {n: torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
               for n in (64, 1024)}
    c = sn.convert(model, {"input_ids": prompts[64]}, batch_sizes=(1,), weights="int8", force="bitmask_int8",
                   time_limit=None, verify=False)
    fast, decodes = attention.append_kv, attention.FusedAttention._decodes
    # (append, kernel): None from append makes FusedAttention call cache.update; without the kernel it calls SDPA
    variants = {"buffers + kernel": (fast, decodes), "buffers + sdpa": (fast, lambda *a: False),
                "cat + sdpa": (lambda *a: None, decodes)}

    def use(name):
        attention.append_kv, attention.FusedAttention._decodes = variants[name]

    tokens = {}
    with torch.inference_mode():
        for name in variants:
            use(name)
            tokens[name] = c.generate(prompts[64], max_new_tokens=32, do_sample=False)
    first = next(iter(tokens.values()))
    out = {"same_tokens": all(bool(torch.equal(first, t)) for t in tokens.values())}
    for n, prompt in prompts.items():
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name in variants:
                use(name)
                times[name].append(sn.generation_speed(c, prompt, args.new_tokens, repeats=3)
                                   .decode_s_per_token * 1e3)
        out[f"prompt_{n}"] = {name: {"median_ms": statistics.median(v), "runs_ms": v} for name, v in times.items()}
        log(f"prompt {n}: " + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items()))
    use("buffers + kernel")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write PREFIX.json")
    args = ap.parse_args()
    t_start = time.time()

    import torch

    torch.set_num_threads(args.threads)
    result = {"ops": ops()}
    log(json.dumps(result["ops"]))
    result["decode"] = decode(args)
    out = {**run_meta("decode_ops.py", None, t_start), **result}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
