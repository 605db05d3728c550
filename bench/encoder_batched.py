"""BERT-base at batch 16 x 128 tokens (issue 15): the batched products' job order, the GELU epilogue, q/k/v views.

Job order. A batched product (:mod:`sparsenn.backend.kernels._tiles`) is split into jobs of (block of 128
output rows, tile of 64 activation rows). Taken block by block, every block re-reads all the
tiles; taken tile by tile, every tile re-reads the whole weight. ``_tiles.tile_major`` picks the
order that reads fewer bytes. This script times both orders side by side
(``interleaved_medians``, rounds alternating the two) on BERT-base, magnitude-pruned per
encoder Linear, at batch 16 x 128 tokens (2,048 rows):

- ``layers``: the four products of one encoder block (q/k/v stacked, attention output,
  intermediate, output) through ``csr_panel`` on a random 2,048-row input;
- ``model``: the whole ``BertModel`` converted with ``sn.convert(..., force="csr_panel")``
  (every encoder Linear on that kernel, no timing at conversion), outputs checked equal
  (bit for bit) between the orders.

Fusions. The same converted model with its ``LinearActivation`` modules (the kernel applies the
GELU as it writes each block of the intermediate product) against the product, then the
``GELUActivation`` module; and with its ``FusedSelfAttention`` modules (q/k/v read as views of the
stacked product) against ``BertSelfAttention``'s own forward (each sibling a contiguous copy),
each pair side by side; and with ``FusedSelfAttention``'s compiled attention (``kernels/self_attention.py``)
against the same module calling transformers' SDPA function on the q/k/v views.

    python bench/encoder_batched.py --out bench/results/encoder_batched
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _results import log, run_meta, write_results  # noqa: E402
from transformer_runtime import magnitude_prune  # noqa: E402


def forced(flag):
    """A context for ``_tiles.FORCE_TILE_MAJOR`` (``None``: the runtime's choice)."""
    from contextlib import contextmanager

    from sparsenn.backend.kernels import _tiles

    @contextmanager
    def ctx():
        before = _tiles.FORCE_TILE_MAJOR
        _tiles.FORCE_TILE_MAJOR = flag
        try:
            yield
        finally:
            _tiles.FORCE_TILE_MAJOR = before

    return ctx()


def both(call, budget: float) -> dict:
    """``{"block by block": ms, "chosen": ms}`` of ``call()`` side by side."""
    from sparsenn.backend.runtime.timing import interleaved_medians

    def under(flag):
        def f():
            with forced(flag):
                call()
        return f

    t = interleaved_medians({"block by block": under(False), "chosen": under(None)}, budget=budget,
                            min_repeats=7, max_repeats=25, block=1)
    return {k: v * 1e3 for k, v in t.items()}


def part(sparsity: float, args) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    import sparsenn as sn
    from sparsenn import kernels as K
    from sparsenn.backend.kernels import _tiles

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and ".encoder." in f".{n}" and "weight" in n]
    magnitude_prune(model, sparsity, set(names))
    rows = args.batch * args.seq
    layer = model.encoder.layer[0]
    weights = {"qkv": torch.cat([layer.attention.self.query.weight, layer.attention.self.key.weight,
                                 layer.attention.self.value.weight]),
               "attention.output": layer.attention.output.dense.weight,
               "intermediate": layer.intermediate.dense.weight, "output": layer.output.dense.weight}
    out = {"sparsity": sparsity, "rows": rows, "layers": {}}
    for name, w in weights.items():
        packed = K.pack(w.detach(), "csr_panel")
        x = torch.randn(rows, w.shape[1])
        xp_bytes = rows * w.shape[1] * 4
        weight_bytes = sum(a.nbytes for a in packed.arrays.values())
        out["layers"][name] = {"shape": list(w.shape), "weight_MB": weight_bytes / 1e6, "tiles_MB": xp_bytes / 1e6,
                               "tile_by_tile": _tiles.tile_major(-(-rows // 64), -(-w.shape[0] // 128),
                                                                  w.shape[1] * 64 * 4, weight_bytes),
                               "ms": both(lambda: K.linear(x, packed), args.budget)}
        log(name, json.dumps(out["layers"][name]))
    inputs = {"input_ids": torch.randint(0, 30000, (args.batch, args.seq)),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    c = sn.convert(model, inputs, batch_sizes=(args.batch,), force="csr_panel", time_limit=None)
    with torch.inference_mode():
        with forced(False):
            a = c(**inputs).last_hidden_state
        with forced(None):
            b = c(**inputs).last_hidden_state
        out["model_outputs_equal"] = bool(torch.equal(a, b))
        out["model_max_abs_error_vs_dense"] = float((b - model(**inputs).last_hidden_state).abs().max())
        out["model_ms"] = both(lambda: c(**inputs), args.budget * 4)
        log("model", json.dumps({k: out[k] for k in ("model_outputs_equal", "model_ms")}))
        out["gelu"] = epilogue_vs_separate(c, inputs, args.budget * 4)
        out["attention"] = views_vs_copies(c, inputs, args.budget * 4)
        out["attention_kernel"] = kernel_vs_sdpa(c, inputs, args.budget * 4)
    log("gelu", json.dumps(out["gelu"]), "attention", json.dumps(out["attention"]), "attention kernel",
        json.dumps(out["attention_kernel"]))
    return out


def fused_vs_unfused(c, inputs: dict, budget: float, kind: type, unfused) -> dict:
    """The converted model with its ``kind`` modules against the same model with each of them running
    ``unfused(module, *args, **kwargs)`` (what the module it replaced did), side by side."""
    from contextlib import contextmanager

    import torch

    from sparsenn.backend.runtime.timing import interleaved_medians

    fused = [m for m in c.modules() if isinstance(m, kind)]

    @contextmanager
    def without():
        for m in fused:
            m.forward = lambda *a, m=m, **k: unfused(m, *a, **k)
        try:
            yield
        finally:
            for m in fused:
                del m.forward

    def run_without():
        with without():
            c(**inputs)

    with torch.inference_mode():
        a = c(**inputs).last_hidden_state
        with without():
            b = c(**inputs).last_hidden_state
        t = interleaved_medians({"unfused": run_without, "fused": lambda: c(**inputs)}, budget=budget,
                                min_repeats=7, max_repeats=25, block=1)
    return {"modules": len(fused), "max_abs_difference": float((a - b).abs().max()),
            **{f"{k}_ms": v * 1e3 for k, v in t.items()}}


def epilogue_vs_separate(c, inputs: dict, budget: float) -> dict:
    """GELU in the kernels' epilogue against the product, then the activation module (what BertIntermediate did)."""
    from sparsenn.backend.runtime.linear_activation import LinearActivation

    return fused_vs_unfused(c, inputs, budget, LinearActivation,
                            lambda m, h: m._modules[m.act_name](m._modules[m.linear_name](h)))


def views_vs_copies(c, inputs: dict, budget: float) -> dict:
    """Self-attention reading q/k/v as views of the stacked product against BertSelfAttention's own forward
    (each sibling returning a contiguous copy of its columns)."""
    from sparsenn.backend.runtime.encoder_attention import FusedSelfAttention

    return fused_vs_unfused(c, inputs, budget, FusedSelfAttention,
                            lambda m, *a, **k: m.original_forward(m, *a, **k))


def kernel_vs_sdpa(c, inputs: dict, budget: float) -> dict:
    """``FusedSelfAttention`` with the compiled attention (``kernels/self_attention.py``) against the same module
    calling transformers' SDPA function on the q/k/v views."""
    from sparsenn.backend.runtime.encoder_attention import FusedSelfAttention

    def sdpa(m, *a, **k):
        m._compiled_applies = lambda y, kw: False  # shadows the method: the attention function runs
        try:
            return FusedSelfAttention.forward(m, *a, **k)
        finally:
            del m._compiled_applies

    return fused_vs_unfused(c, inputs, budget, FusedSelfAttention, sdpa)


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` ({result['machine']}, {result['date']})", "",
             "| sparsity | product | weight MB | tiles MB | order chosen | block by block ms | chosen ms | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for name, L in r["layers"].items():
            ms = L["ms"]
            lines.append(f"| {r['sparsity']:.0%} | {name} {tuple(L['shape'])} | {L['weight_MB']:.2f} | "
                         f"{L['tiles_MB']:.1f} | {'tile by tile' if L['tile_by_tile'] else 'block by block'} | "
                         f"{ms['block by block']:.2f} | {ms['chosen']:.2f} | "
                         f"{ms['block by block'] / ms['chosen']:.2f}x |")
        ms = r["model_ms"]
        lines.append(f"| {r['sparsity']:.0%} | whole model (outputs equal: {r['model_outputs_equal']}) | | | | "
                     f"{ms['block by block']:.1f} | {ms['chosen']:.1f} | {ms['block by block'] / ms['chosen']:.2f}x |")
    lines += ["", "| sparsity | fusion | modules | unfused ms | fused ms | speed-up | max abs difference |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for what, key in (("GELU in the epilogue", "gelu"), ("q/k/v as views", "attention"),
                          ("compiled attention (vs SDPA)", "attention_kernel")):
            g = r[key]
            lines.append(f"| {r['sparsity']:.0%} | {what} | {g['modules']} | {g['unfused_ms']:.1f} | "
                         f"{g['fused_ms']:.1f} | {g['unfused_ms'] / g['fused_ms']:.2f}x | {g['max_abs_difference']:.2g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",")], default=[0.8, 0.9])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per timing round of a product")
    ap.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = ap.parse_args()
    t_start = time.time()

    import torch

    torch.set_num_threads(args.threads)
    rows = [part(s, args) for s in args.sparsities]
    result = {**run_meta("encoder_batched.py", None, t_start), "rows": rows}
    md = markdown(result)
    print(md)
    if args.out:
        write_results(args.out, md, result)


if __name__ == "__main__":
    main()
