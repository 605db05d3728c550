"""``sparsenn.convert``: a pruned model -> an inference model, sparse where that is measured faster.

Steps (all on a deep copy; the model passed in is never changed):

1. Masks are removed (masked weights hold exact zeros already; torch parametrizations
   and ``torch.nn.utils.prune`` are read through ``module.weight``, the effective weight).
2. One eval-mode forward pass at ``example_input`` records the input of every
   ``nn.Linear`` and ``nn.Conv2d``. Layers the runtime cannot convert keep their dense
   module and get a note in the summary: other layer types, subclasses that override
   ``forward``, grouped convolutions, non-float32 weights or inputs on the CPU, layers
   the forward pass never called as modules (e.g. ``nn.MultiheadAttention.out_proj``).
3. Per layer and per batch size ``b`` in ``batch_sizes``: the layer's input is tiled
   from the recorded one to ``b`` samples, and the dense layer and every kernel that fits
   the weight (:func:`sparsenn.backend.kernels.candidates`; on CUDA, 2:4 weights with
   ``torch.sparse.to_sparse_semi_structured``) are timed by interleaved repetitions
   (:mod:`.timing`). A sparse kernel is chosen at ``b`` when its median is at least
   ``margin`` (default 5%) below the dense median, else the dense product (up to
   ``SPMV_MAX_ROWS`` rows, matrix-vector products bound by reading the weight, only
   formats no larger than the dense weight compete): the choice is
   made *per batch size*, so a layer may run sparse at batch 1 and dense at batch 64.
   Other batch sizes use the nearest measured one (log scale).
4. Each converted layer is checked against the dense layer on the measured inputs
   (``allclose``); a kernel that disagrees is dropped and noted. A layer dense at every
   batch size stays the original ``nn.Linear`` / ``nn.Conv2d`` module.
5. With ``verify=True`` (default), the converted model's output is checked against the
   dense model's, and both are timed end to end (interleaved medians) at each batch
   size where some layer runs sparse. Where the converted model is *not faster* than
   the dense one (no margin: a tie or noise goes to dense), every layer runs dense at
   that batch size (noted); layers left dense at every batch size get their original
   module back. The check is made twice (before and after that clean-up), and falling
   back on either, so a measured slowdown has two chances to be caught and none to
   survive. ``summary.model_times`` holds the last measurement at every batch size (when
   no layer runs sparse anywhere, the result is the dense model and is timed once, as
   both).

Cost of the converted model where it runs dense: a layer dense at every batch size is
the PyTorch module itself; a layer sparse at some batch size runs its dense batch sizes
through one memo lookup and ``F.linear`` / ``F.conv2d`` (no Python checks; measured a
little below ``nn.Linear``'s own call). So at a batch size where every layer runs dense
the converted model costs what the dense model costs.

Bad inputs: a sparse kernel never reads an input it cannot take: the sparse layers
check dtype and feature shape first (TypeError / ValueError naming the layer, the
expected and the given). On a converted layer's dense path PyTorch's error is re-raised
as that same TypeError / ValueError; layers kept as PyTorch modules (and a result with
no sparse layer, which is the dense model) raise PyTorch's own errors, as the dense
model does. ``check_inputs=True`` adds a model-level forward pre-hook that rejects
inputs whose dtype or non-batch shape differ from ``example_input``'s before any layer
runs (TypeError / ValueError naming the input, expected and given); it costs about a
microsecond per call (5% of a 20 us model), so it is off by default and is not part of
the timed comparison. :func:`sparsenn.backend.runtime.save` / ``load`` keep it.

The result is the converted copy with a ``conversion_summary`` attribute
(:class:`~.summary.ConversionSummary`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...core.masks import get_pattern, masked_parameters, remove_masks
from .. import kernels as K
from ..kernels._tiles import SPMV_MAX_ROWS
from .layers import DENSE, SEMI_STRUCTURED, SparseConv2d, SparseLinear
from .summary import ConversionSummary, LayerSummary
from .timing import interleaved_medians

INPUT_SPEC_ATTR = "_sparsenn_input_spec"  # JSON-ready: saved with the model
INPUT_CHECK_ATTR = "_sparsenn_input_check"  # the same with torch types, for the hook
_CONVERTIBLE = (nn.Linear, nn.Conv2d)


# ------------------------------------------------------------------ inputs


def _tensors(example: Any) -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` of the tensors of a model input: ``x``, ``(x, y)`` or ``{"x": x}``."""
    if isinstance(example, torch.Tensor):
        return [("input", example)]
    if isinstance(example, (tuple, list)):
        return [(f"input[{i}]", t) for i, t in enumerate(example) if isinstance(t, torch.Tensor)]
    if isinstance(example, dict):
        return [(f"input[{k!r}]", t) for k, t in example.items() if isinstance(t, torch.Tensor)]
    return []


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return model(example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(**example)


def _tile(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` repeated along dim 0 to exactly ``n`` entries."""
    reps = -(-n // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous()


def _at_batch(example: Any, n: int, batch0: int) -> Any:
    def one(t):
        return _tile(t, n) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch0 else t

    if isinstance(example, torch.Tensor):
        return one(example)
    if isinstance(example, (tuple, list)):
        return type(example)(one(t) for t in example)
    return {k: one(v) for k, v in example.items()}


def _input_spec(example: Any) -> list[dict[str, Any]]:
    spec = []
    if isinstance(example, torch.Tensor):
        items = [("arg", 0, example)]
    elif isinstance(example, (tuple, list)):
        items = [("arg", i, t) for i, t in enumerate(example)]
    else:
        items = [("kwarg", k, t) for k, t in example.items()]
    for kind, key, t in items:
        if isinstance(t, torch.Tensor):
            spec.append({"kind": kind, "key": key, "shape": list(t.shape[1:]), "ndim": t.dim(),
                         "dtype": str(t.dtype).removeprefix("torch.")})
    return spec


def _shape_text(ndim: int, rest: Sequence[int]) -> str:
    return "(" + ", ".join(["B", *map(str, rest)]) + ")" if ndim else "()"


def _fast_spec(spec: list[dict[str, Any]]) -> list[tuple]:
    """The spec with torch types, for a check that costs about a microsecond per call."""
    return [(s["kind"] == "arg", s["key"], s["ndim"], torch.Size(s["shape"]), getattr(torch, s["dtype"]), s)
            for s in spec]


def check_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a converted model: the input's dtype and non-batch shape must match the example's."""
    for positional, key, ndim, shape, dtype, s in module.__dict__.get(INPUT_CHECK_ATTR, ()):
        if positional:
            if key >= len(args):
                continue
            t = args[key]
        elif key in kwargs:
            t = kwargs[key]
        else:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != ndim or t.shape[1:] != shape:
            _bad_input(t, s)


def _bad_input(t: Any, s: dict[str, Any]) -> None:
    where = f"input {s['key']}" if s["kind"] == "arg" else f"input {s['key']!r}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor, got {type(t).__name__}")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype != s["dtype"]:
        raise TypeError(f"{where}: the converted model expects dtype {s['dtype']}, got {dtype}")
    raise ValueError(f"{where}: the converted model expects shape {_shape_text(s['ndim'], s['shape'])} "
                     f"(any batch size B), got {tuple(t.shape)}")


def attach_input_check(model: nn.Module, spec: list[dict[str, Any]]) -> None:
    model.__dict__[INPUT_SPEC_ATTR] = spec
    model.__dict__[INPUT_CHECK_ATTR] = _fast_spec(spec)
    if not any(h is check_inputs for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(check_inputs, with_kwargs=True)


# ------------------------------------------------------------------ checks


def _check_args(model, example_input, batch_sizes, margin) -> tuple[tuple[int, ...], int]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = _tensors(example_input)
    if not tensors:
        raise TypeError("example_input must be a tensor, a tuple/list of arguments or a dict of keyword "
                        f"arguments holding at least one tensor, got {type(example_input).__name__}")
    first = tensors[0][1]
    if first.dim() == 0:
        raise ValueError("example_input's first tensor must have a batch dimension (dim 0), got a scalar")
    if isinstance(batch_sizes, int) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive integers, got {batch_sizes!r}")
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch_sizes must hold positive integers, got {b!r} in {tuple(batch_sizes)}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"margin must be a number in [0, 1), got {margin!r}")
    return tuple(sorted(set(batch_sizes))), int(first.shape[0])


def _why_not(name: str, module: nn.Module, x: torch.Tensor | None, calls: int) -> str | None:
    """Why a Linear/Conv2d is kept dense without measuring (``None`` if it can be converted)."""
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides forward; only plain {base.__name__} layers are converted"
    if calls == 0 or x is None:
        return "not called as a module by the example input (e.g. attention's out_proj); kept dense"
    w = module.weight
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"groups={module.groups}: grouped and depthwise convolutions stay dense"
    if w.device.type == "cpu":
        if w.dtype != torch.float32:
            return f"weight dtype {str(w.dtype).removeprefix('torch.')}: the CPU kernels take float32"
        if x.dtype != torch.float32:
            return f"input dtype {str(x.dtype).removeprefix('torch.')}: the CPU kernels take float32"
    elif w.device.type != "cuda":
        return f"weights on {w.device.type}: sparse kernels exist for the CPU (and 2:4 on CUDA)"
    return None


def _candidates(w2d: torch.Tensor, kernels: Sequence[str] | None, pattern: str | None
                ) -> list[tuple[str, dict[str, int]]]:
    if w2d.device.type == "cuda":
        found = K.detect_nm(w2d.float().cpu())
        if found is not None and found != (4, 8):  # every other detected pattern is also 2:4
            return [(SEMI_STRUCTURED, {})]
        return []
    cands = K.candidates(w2d)
    if pattern and pattern.startswith("block"):  # a recorded block pattern: make sure it is timed
        try:
            h, w = (int(v) for v in pattern[5:].split("x"))
            kh, kw = K.bsr.kernel_block(h, w)
            if ("bsr", {"h": kh, "w": kw}) not in cands and K.bsr.check_blocks(w2d.numpy(), kh, kw) is None:
                cands.append(("bsr", {"h": kh, "w": kw}))
        except ValueError:
            pass
    if kernels is not None:
        cands = [c for c in cands if c[0] in kernels]
    return cands


def _layer_input(x0: torch.Tensor, module: nn.Module, b: int, batch0: int) -> torch.Tensor:
    """The layer's input at model batch size ``b``: the recorded input tiled along its batch dim."""
    if isinstance(module, nn.Conv2d):
        return _tile(x0 if x0.dim() == 4 else x0.unsqueeze(0), b)
    if x0.dim() >= 2 and x0.shape[0] == batch0:
        return _tile(x0, b)
    rows0 = x0.numel() // x0.shape[-1]
    rows = max(1, round(rows0 * b / batch0))
    return _tile(x0.reshape(rows0, x0.shape[-1]), rows)


def _rows(module: nn.Module, x: torch.Tensor) -> int:
    """Rows of the layer's matrix product for input ``x``."""
    if isinstance(module, nn.Conv2d):
        return (x.shape[0] if x.dim() == 4 else 1) * _conv_out_pixels(module, x)
    return x.numel() // x.shape[-1]


def _conv_out_pixels(conv: nn.Conv2d, x: torch.Tensor) -> int:
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ho = (x.shape[-2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[-1] + left + right - dw * (kw - 1) - 1) // sw + 1
    return ho * wo


def _close(y: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    err = (y.float() - ref.float()).abs()
    scale = ref.float().abs().max().clamp_min(1e-6)
    worst = float(err.max()) if err.numel() else 0.0
    return bool(torch.allclose(y.float(), ref.float(), rtol=1e-4, atol=1e-5 * float(scale))), worst


def _build(module: nn.Module, name: str, plan: dict[int, str], packed: dict[str, K.Packed],
           w: torch.Tensor) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.from_conv(module, plan, packed, label=name, weight=w)
    return SparseLinear.from_linear(module, plan, packed, label=name, weight=w)


# ------------------------------------------------------------------ convert


@torch.no_grad()
def convert(model: nn.Module, example_input: Any, batch_sizes: Sequence[int] = (1, 64), *,
            kernels: Sequence[str] | None = None, margin: float = 0.05, budget: float = 0.2,
            verify: bool = True, check_inputs: bool = False, force: str | None = None) -> nn.Module:
    """An inference copy of ``model`` whose Linear/Conv2d layers run sparse kernels where measured faster.

    ``example_input``: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
    (``model(**x)``) whose tensors have the batch in dim 0. ``batch_sizes``: the model
    batch sizes to measure and choose for. ``kernels``: restrict the sparse candidates
    to these names (:func:`sparsenn.backend.kernels.list_kernels`). ``margin``: how much faster
    (fraction of the dense time) a kernel must be to be chosen. ``budget``: seconds of
    timing per layer and batch size. ``force``: skip the measurements and run this
    kernel (or ``"semi_structured"`` on CUDA) at every batch size wherever it fits (for
    tests and experiments: the "never slower" guarantee then does not hold).
    ``check_inputs``: add the model-level input check (see the module docstring; the
    layers check their own inputs either way). Returns the converted copy (``eval()``
    mode) with a ``conversion_summary`` attribute; see the module docstring for the steps.
    """
    batch_sizes, batch0 = _check_args(model, example_input, batch_sizes, margin)
    if kernels is not None:
        unknown = [k for k in kernels if k not in K.KERNELS]
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; valid kernels: {', '.join(K.list_kernels())}")
    if force is not None and force not in K.KERNELS and force != SEMI_STRUCTURED:
        raise ValueError(f"unknown kernel {force!r} to force; valid kernels: "
                         f"{', '.join([*K.list_kernels(), SEMI_STRUCTURED])}")
    threads = K.sync_threads()
    patterns = {mp.name: get_pattern(mp.module, mp.attr) for mp in masked_parameters(model)}
    converted = copy.deepcopy(model).eval()
    remove_masks(converted)
    summary = ConversionSummary(batch_sizes, threads, float(margin))

    order = {n: i for i, (n, _) in enumerate(converted.named_modules())}
    # 1. record the inputs of every Linear / Conv2d
    inputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = []
    layers = [(n, m) for n, m in converted.named_modules() if isinstance(m, _CONVERTIBLE)]
    for n, m in layers:
        def hook(mod, args, _n=n):
            calls[_n] = calls.get(_n, 0) + 1
            if _n not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[_n] = args[0].detach().clone()
        handles.append(m.register_forward_pre_hook(hook))
    try:
        reference = _call(converted, example_input)
    finally:
        for h in handles:
            h.remove()

    # layers with weights the runtime does not convert
    convertible_ids = {id(m) for _, m in layers}
    for n, m in converted.named_modules():
        if id(m) in convertible_ids or n == "":
            continue
        own = [p for pn, p in m.named_parameters(recurse=False) if p.dim() >= 2]
        if own and not any(isinstance(c, _CONVERTIBLE) for c in m.modules() if c is not m):
            summary.layers.append(LayerSummary(
                n, type(m).__name__, tuple(own[0].shape),
                note=f"{type(m).__name__} is not converted (the runtime converts Linear and Conv2d); kept dense"))
        elif own:
            summary.layers.append(LayerSummary(
                n, type(m).__name__, tuple(own[0].shape),
                note=f"{type(m).__name__}'s own weights are used outside its submodules' forward; kept dense"))

    # 2-4. measure and choose per layer
    for name, module in layers:
        w = module.weight.detach()
        w2d = w.reshape(w.shape[0], -1)
        nnz = int(torch.count_nonzero(w2d))
        row = LayerSummary(name, type(module).__name__, tuple(w.shape), 1.0 - nnz / max(w2d.numel(), 1),
                           bytes={"dense": w2d.numel() * w2d.element_size()})
        summary.layers.append(row)
        why = _why_not(name, module, inputs.get(name), calls.get(name, 0))
        if why is None:
            cands = _candidates(w2d, kernels, patterns.get(f"{name}.weight"))
            if force is not None:
                cands = [c for c in cands if c[0] == force][:1]
            if not cands:
                why = ("no sparse kernel fits this weight on its device; kept dense" if force is None else
                       f"the forced kernel {force!r} does not fit this weight on its device; kept dense")
        if why is not None:
            row.note = why
            continue
        packed: dict[str, K.Packed] = {}
        notes = []
        for kernel, options in cands:
            if kernel == SEMI_STRUCTURED:
                continue
            try:
                p = K.pack(w2d, kernel, **options)
            except (ValueError, TypeError) as e:
                notes.append(f"{kernel}: {e}")
                continue
            key = kernel_key(kernel, options)
            packed[key] = p
            row.formats[key] = p.describe()
            row.bytes[key] = p.nbytes
        kinds = list(packed) + [SEMI_STRUCTURED for c in cands if c[0] == SEMI_STRUCTURED]
        if SEMI_STRUCTURED in kinds:
            row.formats[SEMI_STRUCTURED] = "torch 2:4 semi-structured (CUDA)"
        if not kinds:
            row.note = "; ".join([*notes, "no kernel could pack this weight; kept dense"])
            continue
        probe = _build(module, name, {1: DENSE}, packed, w)
        x0 = inputs[name]
        chosen: dict[int, str] = {}
        for b in batch_sizes:
            xb = _layer_input(x0, module, b, batch0)
            row.rows[b] = _rows(module, xb)
            if force is not None:
                chosen[b] = kinds[0]
            else:
                fns = {DENSE: (lambda xb=xb, module=module: module(xb))}
                for kind in kinds:
                    fns[kind] = (lambda xb=xb, kind=kind, probe=probe: _forced(probe, kind, xb))
                try:
                    times = interleaved_medians(fns, budget=budget, device=w.device)
                except Exception as e:  # e.g. semi-structured unsupported for this shape/dtype
                    bad = _first_failing(fns)
                    if bad is None or bad == DENSE:
                        raise
                    notes.append(f"{bad}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    fns.pop(bad)
                    kinds = [k for k in kinds if k != bad]
                    times = interleaved_medians(fns, budget=budget, device=w.device)
                row.times[b] = times
                sparse = {k: t for k, t in times.items() if k != DENSE}
                # Up to SPMV_MAX_ROWS rows the kernels run matrix-vector products, bound by reading the
                # weight: a format larger than the dense weight can only win by noise (a near-dense CSR
                # at batch 1 once timed 7% faster at conversion and 24% slower a minute later).
                if row.rows[b] <= SPMV_MAX_ROWS:
                    dense_bytes = w.numel() * w.element_size()
                    sparse = {k: t for k, t in sparse.items() if row.bytes.get(k, 0) <= dense_bytes}
                best = min(sparse, key=sparse.get) if sparse else None
                chosen[b] = best if best is not None and sparse[best] < times[DENSE] * (1 - margin) else DENSE
            # 4. the chosen kernel must agree with the dense layer on this input
            if chosen[b] != DENSE:
                ok, worst = _close(_forced(probe, chosen[b], xb), module(xb))
                if not ok:
                    notes.append(f"{chosen[b]} disagreed with the dense layer at batch {b} "
                                 f"(max abs error {worst:.3g}); dense used")
                    chosen[b] = DENSE
        row.choice = dict(chosen)
        if all(k == DENSE for k in chosen.values()):
            notes.append("dense was faster at every batch size; kept dense" if force is None else "kept dense")
            row.note = "; ".join(notes)
            continue
        row.note = "; ".join(notes)
        plan = {row.rows[b]: chosen[b] for b in batch_sizes}
        used = {k: packed[k] for k in set(chosen.values()) if k in packed}
        new = _build(module, name, plan, used, w)
        if name:
            _replace(converted, name, new)
        else:  # the model is a single layer
            converted = new
    summary.layers.sort(key=lambda r: order.get(r.name, len(order)))

    # 5. whole model: same output, never slower
    if verify:
        converted = _verify(converted, model, example_input, reference, batch_sizes, batch0, summary, budget,
                            timing=force is None)
    converted.eval()
    converted.conversion_summary = summary
    if check_inputs:
        attach_input_check(converted, _input_spec(example_input))
    return converted


def kernel_key(kernel: str, options: dict[str, int]) -> str:
    """How a packed weight is named in a layer: the kernel, with the block for BSR (``"bsr4x1"``)."""
    return f"bsr{options['h']}x{options['w']}" if kernel == "bsr" else kernel


def _forced(layer: nn.Module, kernel: str, x: torch.Tensor) -> torch.Tensor:
    layer.forced = kernel
    try:
        return layer(x)
    finally:
        layer.forced = None


def _first_failing(fns: dict[str, Any]) -> str | None:
    for name, fn in fns.items():
        try:
            fn()
        except Exception:  # noqa: BLE001
            return name
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def _sparse_layers(model: nn.Module) -> list[tuple[str, SparseLinear | SparseConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]


def _verify(converted: nn.Module, model: nn.Module, example_input: Any, reference: Any,
            batch_sizes: tuple[int, ...], batch0: int, summary: ConversionSummary, budget: float,
            timing: bool = True) -> nn.Module:
    """Check the converted model's output; time it against the dense one (see the module doc)."""
    _check_output(converted, example_input, reference)
    if not timing:
        return converted
    dense_model = copy.deepcopy(model).eval()
    remove_masks(dense_model)
    inputs = {b: _at_batch(example_input, b, batch0) for b in batch_sizes}

    def compare(b: int, model_b: nn.Module) -> tuple[float, float]:
        xb = inputs[b]
        fns = {"dense": lambda: _call(dense_model, xb), "converted": lambda: _call(model_b, xb)}
        times = interleaved_medians(fns, budget=2 * budget, min_repeats=7, max_repeats=60)
        return times["dense"], times["converted"]

    def sparse_at(b: int) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in _sparse_layers(converted) if summary.layer(n).choice.get(b, DENSE) != DENSE]

    def fall_back(b: int, times: tuple[float, float]) -> None:
        for lname, layer in sparse_at(b):
            rows = summary.layer(lname).rows.get(b)
            if layer.weight is None:  # keep the dense weight for this batch size
                w = dense_model.get_submodule(lname).weight.detach()
                layer.weight = w.reshape(w.shape[0], -1).clone()
            layer.set_plan(rows, DENSE)
            summary.layer(lname).choice[b] = DENSE
        summary.notes.append(f"batch {b}: the converted model measured {times[1] * 1e3:.4f} ms vs dense "
                             f"{times[0] * 1e3:.4f} ms (not faster); every layer runs dense at this batch size")

    for b in batch_sizes:  # first look, with every converted layer in place
        if sparse_at(b):
            times = compare(b, converted)
            if times[1] >= times[0]:
                fall_back(b, times)
    converted = _restore_dense_layers(converted, dense_model, summary)
    if not _sparse_layers(converted):  # the dense model itself: one timing stands for both
        summary.notes.append("no layer runs sparse at any batch size: the converted model is the dense model")
        for b in batch_sizes:
            t = interleaved_medians({"dense": lambda xb=inputs[b]: _call(dense_model, xb)}, budget=budget,
                                    min_repeats=7, max_repeats=60)["dense"]
            summary.model_times[b] = (t, t)
        return converted
    for b in batch_sizes:  # second look, after the clean-up; its times are the ones reported
        times = compare(b, converted)
        if sparse_at(b) and times[1] >= times[0]:
            fall_back(b, times)
            converted = _restore_dense_layers(converted, dense_model, summary)
            times = compare(b, converted)
        summary.model_times[b] = times
    _check_output(converted, example_input, reference)
    return converted


def _check_output(converted: nn.Module, example_input: Any, reference: Any) -> None:
    out = _call(converted, example_input)
    refs = [reference] if isinstance(reference, torch.Tensor) else \
        [t for t in (reference.values() if isinstance(reference, dict) else reference)
         if isinstance(t, torch.Tensor)] if isinstance(reference, (tuple, list, dict)) else []
    outs = [out] if isinstance(out, torch.Tensor) else \
        [t for t in (out.values() if isinstance(out, dict) else out)
         if isinstance(t, torch.Tensor)] if isinstance(out, (tuple, list, dict)) else []
    for y, r in zip(outs, refs):
        ok, worst = _close(y, r)
        if not ok:
            raise RuntimeError(f"the converted model's output differs from the dense model's "
                               f"(max abs error {worst:.3g}); please report this as a bug")


def _restore_dense_layers(converted: nn.Module, dense_model: nn.Module, summary: ConversionSummary) -> nn.Module:
    """A sparse layer that runs dense at every batch size gets its original (dense) module back."""
    for lname, layer in _sparse_layers(converted):
        if all(k == DENSE for k in layer.plan.values()):
            original = copy.deepcopy(dense_model.get_submodule(lname))
            row = summary.layer(lname)
            row.note = "; ".join(filter(None, [row.note, "dense at every batch size after the whole-model check"]))
            if not lname:
                return original
            _replace(converted, lname, original)
    return converted
