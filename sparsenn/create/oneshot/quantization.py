"""``quantize``: put a model's Linear weights on int8 grids from calibration data, for ``sn.convert(weights="int8")``.

``sn.convert(model, x, weights="int8")`` stores each weight row as ``q * s`` with ``q`` int8.
Rounding the float weight to nearest (``method="rtn"``) ignores what the layer computes;
GPTQ (:mod:`.gptq`, Frantar et al. 2023) rounds column by column and lets the columns not
yet rounded compensate, on the layer's calibration inputs. ``quantize`` writes the rounded
weights into the float model (still float32 tensors, every entry ``q * s``); ``convert``
then finds each row's grid (:func:`sparsenn.backend.formats.quantized.quantize_int8`) and
stores exactly these values, so the converted model computes what the quantized float
model computes, and the float model can be evaluated (perplexity) before converting.

Choices, and why:

* **Hessians from the full-precision model**: one forward pass per calibration batch
  with hooks accumulates ``H = X^T X`` (float64) of every selected Linear's inputs
  (Linears fed the same tensor, q/k/v or gate/up, share one), all layers at once; not
  block by block on the already quantized model as in the paper. int8 changes the
  activations little, and one pass is simple and cheap; every ``H`` is held until the
  end (one per distinct input: about 0.8 GB for SmolLM2-135M; ``include=`` quantizes a
  subset at a time).
* **The LM head is included** (every ``nn.Linear`` by default): it is the largest single
  contribution to the perplexity change. A head tied to the input embedding (SmolLM2,
  ``lm_head.weight is embed_tokens.weight``) is **untied** first: the head gets its own
  parameter, so the embedding stays float32 (``config.tie_word_embeddings`` becomes
  False, so ``save_pretrained`` / ``from_pretrained`` keep them apart). The report lists
  the untied layers.
* **Masks are kept**: zeros stay zeros (the solver's mask is the weight's zeros and the
  attached sparsenn mask), mask buffers stay attached; a kept weight may round to 0.
* **Nothing changes on an error**: every layer is solved before any weight is written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ...core import checks
from ...core.masks import (
    attach_mask,
    get_pattern,
    has_mask,
    masked_parameters,
    zero_masked_,
)
from ...core.progress import Bar
from .blocks import OneShotError
from .gptq import gptq_int8, off_grid_rows, rtn_int8
from .pipeline import _accepts, _as_batches
from .solvers import HessianError
from .stats import record_inputs

__all__ = ["QUANTIZE_BITS", "QUANTIZE_METHODS", "QuantizeError", "QuantizeReport", "QuantizedLayer", "quantize"]

QUANTIZE_METHODS = ("gptq", "rtn")
QUANTIZE_BITS = (8,)


class QuantizeError(ValueError):
    """``quantize`` cannot go on: bad arguments, model or calibration data (the model is left unchanged)."""


@dataclass
class QuantizedLayer:
    """One quantized Linear: name, shape, relative reconstruction error ``||W X^T - Q X^T|| / ||W X^T||`` on
    the calibration inputs of round to nearest and of GPTQ (``None`` without data / for ``rtn``), seconds,
    and the rows not exactly on their int8 grid (0)."""

    name: str
    shape: tuple[int, int]
    rtn_error: float | None
    gptq_error: float | None
    seconds: float
    off_grid_rows: int = 0


@dataclass
class QuantizeReport:
    """What :func:`quantize` did: settings, the layers whose tie was undone, per-layer results, seconds."""

    method: str
    bits: int
    calibration_batches: int
    calibration_tokens: int
    untied: list[str] = field(default_factory=list)
    layers: list[QuantizedLayer] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def off_grid_rows(self) -> int:
        """Rows of all layers that ``convert(weights="int8")`` would not store exactly (0)."""
        return sum(r.off_grid_rows for r in self.layers)

    def table(self) -> str:
        """A plain-text table, one row per layer."""
        head = f"{'layer':<44} {'shape':>12} {'rtn error':>10} {'gptq error':>10} {'time':>7}"
        untied = f"; untied from their embedding: {', '.join(self.untied)}" if self.untied else ""
        title = (f"quantize {self.method} int{self.bits}: {len(self.layers)} layers, {self.calibration_batches} "
                 f"calibration batches ({self.calibration_tokens} tokens), {self.off_grid_rows} rows off their "
                 f"grid, {self.seconds:.1f} s{untied}")
        lines = [title, head, "-" * len(head)]
        for r in self.layers:
            rtn = "-" if r.rtn_error is None else f"{r.rtn_error:.5f}"
            gptq = "-" if r.gptq_error is None else f"{r.gptq_error:.5f}"
            lines.append(f"{r.name:<44} {'x'.join(map(str, r.shape)):>12} {rtn:>10} {gptq:>10} {r.seconds:>6.2f}s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "off_grid_rows": self.off_grid_rows}

    def __str__(self) -> str:
        return self.table()


def _names(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise QuantizeError(f"{what} must be a string or an iterable of name substrings, got "
                            f"{type(value).__name__}") from None
    if not all(isinstance(v, str) for v in out):
        raise QuantizeError(f"{what} must hold strings (substrings of Linear names), got {out!r}")
    return out


def _select(model: nn.Module, include: tuple[str, ...] | None, exclude: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The Linears to quantize, by name substring, each module once; checked before anything runs."""
    layers: dict[str, nn.Linear] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or id(m) in seen:
            continue
        if include is not None and not any(s in name for s in include):
            continue
        if any(s in name for s in exclude):
            continue
        seen.add(id(m))
        layers[name] = m
    if not layers:
        raise QuantizeError(f"no Linear layer to quantize in {type(model).__name__} (include="
                            f"{None if include is None else list(include)}, exclude={list(exclude)})")
    owners: dict[int, list[str]] = {}
    for name, m in layers.items():
        w = m.weight
        if w.dtype not in (torch.float32, torch.float64):
            raise QuantizeError(f"{name}: weight of dtype {w.dtype}; int8 grids are written into float32 (or "
                                "float64) weights: call model.float() first")
        if not torch.isfinite(w).all():
            raise QuantizeError(f"{name}: the weight holds NaN or Inf")
        owners.setdefault(id(w), []).append(name)
    shared = [names for names in owners.values() if len(names) > 1]
    if shared:
        raise QuantizeError(f"{' and '.join(shared[0])} share one weight but see different inputs; quantize one "
                            "of them (exclude=[...])")
    return layers


def _hessians(model: nn.Module, layers: dict[str, nn.Linear], batches: list[dict[str, Any]]) -> record_inputs:
    """``X^T X`` of every layer's inputs over the calibration (padding excluded), from the model as given."""
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    current: dict[str, Any] = {"mask": None}
    was_training = model.training
    model.eval()
    try:
        with record_inputs(layers, "hessian", lambda: current["mask"]) as recorder:
            for batch in batches:
                mask = batch.get("attention_mask")
                current["mask"] = None if mask is None else mask.bool()
                recorder.next_batch()
                model(**batch, **extra)
    except OneShotError as e:
        raise QuantizeError(str(e)) from None
    finally:
        model.train(was_training)
    missing = [n for n in layers if not recorder.seen(n)]
    if missing:
        raise QuantizeError(f"{', '.join(missing)}: never called in the model's forward pass on the calibration "
                            "data; leave them out with exclude=[...]")
    return recorder


def _relative_errors(weight: torch.Tensor, rounded: list[torch.Tensor], hessian: torch.Tensor) -> list[float]:
    """``||W X^T - Q X^T|| / ||W X^T||`` for each ``Q`` in ``rounded``, from ``H = X^T X``: the quantity of
    :func:`.solvers.reconstruction_error`, with float32 products (the differences are formed before
    multiplying, so nothing cancels) and float64 sums, and ``W H`` once for all."""
    H = hessian.to(torch.float32)
    den = float(((weight @ H) * weight).sum(dtype=torch.float64))
    out = []
    for q in rounded:
        D = weight - q
        num = float(((D @ H) * D).sum(dtype=torch.float64))  # (rows, cols) @ (cols, cols)
        out.append(math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0)
    return out


def _solve(layers: dict[str, nn.Linear], masks: dict[int, tuple[torch.Tensor, str]], recorder: record_inputs | None,
           method: str, damp: float, block_size: int, bar: Bar) -> dict[str, tuple[torch.Tensor, QuantizedLayer]]:
    """Every layer's weight on its grid and its report row; layers sharing an input are solved as one
    stacked matrix under their one inverse Hessian (rows are independent: the same as separate solves)."""
    groups = recorder.groups() if recorder is not None else [[n] for n in layers]
    out = {}
    for group in groups:
        t0 = time.perf_counter()
        weights = []
        for n in group:
            w = layers[n].weight.detach().to(torch.float32)
            mask = masks.get(id(layers[n].weight))
            weights.append(w if mask is None else torch.where(mask[0], w, torch.zeros((), dtype=w.dtype)))
        rows = [w.shape[0] for w in weights]
        H = recorder.of(group[0]).hessian if recorder is not None else None
        name = ", ".join(group)
        if method == "gptq":
            new, scale = gptq_int8(torch.cat(weights), H, damp=damp, block_size=block_size, name=name)
            new, scale = new.split(rows), scale.split(rows)
        else:
            solved = [rtn_int8(w, name=name) for w in weights]
            new, scale = [q for q, _ in solved], [s for _, s in solved]
        seconds = time.perf_counter() - t0
        for n, w, q, s in zip(group, weights, new, scale):
            stored = q.to(layers[n].weight.dtype)
            rtn = gptq = None
            if H is not None and method == "gptq":
                rtn, gptq = _relative_errors(w, [rtn_int8(w)[0], q], H)
            elif H is not None:
                (rtn,) = _relative_errors(w, [q], H)
            out[n] = (stored, QuantizedLayer(n, tuple(w.shape), rtn, gptq, seconds * w.shape[0] / sum(rows),
                                             off_grid_rows(stored, s)))
        bar.update(len(group))
    return out


def _untie(model: nn.Module, layer: nn.Linear, masks: dict[int, tuple[torch.Tensor, str]],
           owners: dict[int, set[int]]) -> bool:
    """Give ``layer`` its own weight parameter if the weight also belongs to another module (a tied LM
    head; ``owners``: parameter id -> ids of the modules holding it); its mask, if any, is copied to it.
    Returns whether it was tied."""
    weight = layer.weight
    if not owners.get(id(weight), set()) - {id(layer)}:
        return False
    mask = masks.get(id(weight))
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if mask is not None:
        layer._buffers.pop("weight_mask", None)  # a tied mask is one tensor under every name: keep the other's
        attach_mask(layer, "weight", mask[0].clone(), pattern=mask[1])
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is layer:
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for c in {id(config): config, id(text): text}.values():
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
    return True


@torch.no_grad()
def quantize(model: nn.Module, calibration: Iterable[Any] | None = None, *, method: str = "gptq", bits: int = 8,
             damp: float = 0.01, block_size: int = 128, include: Iterable[str] | str | None = None,
             exclude: Iterable[str] | str = (), progress: bool = False) -> nn.Module:
    """Round ``model``'s Linear weights onto per-row int8 grids in place, so that
    ``sn.convert(model, x, weights="int8")`` stores exactly these values; returns the model with the
    :class:`QuantizeReport` as ``model.quantize_report``.

    ``method``: ``"gptq"`` (Frantar et al. 2023; :func:`.gptq.gptq_int8`, needs ``calibration``)
    or ``"rtn"`` (round to nearest on the same grids: what ``convert`` alone does; the
    baseline). ``calibration``: an iterable of ``input_ids`` tensors (1-D or batch x tokens)
    or of dicts of model inputs (with ``attention_mask``: padding is left out), as for
    ``sn.oneshot``. ``bits``: 8 (the only precision the int8 kernels run). ``damp``:
    dampening of each Hessian, a fraction of its mean diagonal. ``block_size``: columns per
    lazy update. ``include`` / ``exclude``: substrings of Linear names (default: every
    ``nn.Linear``, the LM head included). Each row's grid is ``max|w_i| / 127`` of the
    weight as given; zeros and attached masks are kept. A head tied to the input embedding
    is untied first so that the embedding stays float32 (the module docstring says why and
    what else this does). The report gives, per layer, the relative reconstruction error on
    the calibration inputs of round to nearest and of GPTQ, from the float model's
    activations (not re-computed block by block after quantizing).
    """
    t_start = time.perf_counter()
    if method not in QUANTIZE_METHODS:
        raise QuantizeError(f"unknown quantization method {method!r}; valid: {', '.join(QUANTIZE_METHODS)}")
    if isinstance(bits, bool) or bits not in QUANTIZE_BITS:
        raise QuantizeError(f"bits={bits!r} is not supported; valid: {', '.join(map(str, QUANTIZE_BITS))} (the "
                            "int8 kernels of sn.convert)")
    try:
        damp = checks.positive("damp", damp)
    except (ValueError, TypeError) as e:
        raise QuantizeError(str(e)) from None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise QuantizeError(f"block_size must be an int >= 1, got {block_size!r}")
    include_ = _names(include, "include")
    exclude_ = _names(exclude, "exclude") or ()
    layers = _select(model, include_, exclude_)
    try:
        batches = _as_batches(calibration, model)
    except OneShotError as e:
        raise QuantizeError(str(e)) from None
    if method == "gptq" and not batches:
        raise QuantizeError("method 'gptq' needs calibration data: calibration=<iterable of input_ids tensors> "
                            "(non-empty); method='rtn' needs none")
    masks = {id(mp.param): (mp.mask, get_pattern(mp.module, mp.attr)) for mp in masked_parameters(model)}
    report = QuantizeReport(method, bits, len(batches), sum(int(b["input_ids"].numel()) for b in batches))

    recorder = _hessians(model, layers, batches) if batches else None
    bar = Bar(len(layers), f"quantize {method}", unit="layer", enabled=progress)
    try:
        solved = _solve(layers, masks, recorder, method, damp, block_size, bar)
    except (HessianError, ValueError, RuntimeError) as e:
        raise QuantizeError(f"{e}. Nothing was changed.") from e
    finally:
        bar.close()
    del recorder

    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    for name, layer in layers.items():  # nothing failed: write every layer
        if _untie(model, layer, masks, owners):
            report.untied.append(name)
        weight, row = solved[name]
        layer.weight.data.copy_(weight)
        if has_mask(layer, "weight"):
            zero_masked_(layer.weight, layer.weight_mask)
        report.layers.append(row)
    report.seconds = time.perf_counter() - t_start
    model.quantize_report = report
    return model
