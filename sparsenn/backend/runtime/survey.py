"""Which layers of a model can be converted, and the input each one saw.

One eval-mode forward pass at the example input records the input of every
``nn.Linear`` and ``nn.Conv2d`` (and how long the pass took: the cost model scales it
to estimate what the whole-model check will cost). Layers the runtime cannot convert
keep their dense module and get a note: other weight-bearing layer types, subclasses
that override ``forward``, grouped convolutions, non-float32 weights or inputs on the
CPU, layers the forward pass never called as modules (e.g.
``nn.MultiheadAttention.out_proj``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .inputs import call_model, tile
from .summary import LayerSummary

CONVERTIBLE = (nn.Linear, nn.Conv2d)


@dataclass
class Survey:
    """What one forward pass showed: the convertible layers in model order, their inputs and call counts."""

    layers: list[tuple[str, nn.Module]]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    reference: Any = None  #: the model's output at the example input
    seconds: float = 0.0  #: wall time of the recording pass


def record_layers(model: nn.Module, example_input: Any) -> Survey:
    """Run ``model`` once on ``example_input`` and record the first input of every Linear/Conv2d."""
    survey = Survey([(n, m) for n, m in model.named_modules() if isinstance(m, CONVERTIBLE)])
    handles = []
    for n, m in survey.layers:
        def hook(mod, args, _n=n):
            survey.calls[_n] = survey.calls.get(_n, 0) + 1
            if _n not in survey.inputs and args and isinstance(args[0], torch.Tensor):
                survey.inputs[_n] = args[0].detach().clone()
        handles.append(m.register_forward_pre_hook(hook))
    try:
        t0 = time.perf_counter()
        survey.reference = call_model(model, example_input)
        survey.seconds = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return survey


def unconverted_modules(model: nn.Module, survey: Survey) -> list[LayerSummary]:
    """Summary rows for modules with matrix weights that the runtime does not convert (kept dense)."""
    convertible_ids = {id(m) for _, m in survey.layers}
    rows = []
    for n, m in model.named_modules():
        if id(m) in convertible_ids or n == "":
            continue
        own = [p for pn, p in m.named_parameters(recurse=False) if p.dim() >= 2]
        if not own:
            continue
        held = {"weight": sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))}
        if not any(isinstance(c, CONVERTIBLE) for c in m.modules() if c is not m):
            note = f"{type(m).__name__} is not converted (the runtime converts Linear and Conv2d); kept dense"
        else:
            note = f"{type(m).__name__}'s own weights are used outside its submodules' forward; kept dense"
        rows.append(LayerSummary(n, type(m).__name__, tuple(own[0].shape), note=note, held=held))
    return rows


def why_not(module: nn.Module, x: torch.Tensor | None, calls: int) -> str | None:
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


def layer_input(x0: torch.Tensor, module: nn.Module, b: int, batch0: int) -> torch.Tensor:
    """The layer's input at model batch size ``b``: the recorded input tiled along its batch dim."""
    if isinstance(module, nn.Conv2d):
        return tile(x0 if x0.dim() == 4 else x0.unsqueeze(0), b)
    if x0.dim() >= 2 and x0.shape[0] == batch0:
        return tile(x0, b)
    rows0 = x0.numel() // x0.shape[-1]
    rows = max(1, round(rows0 * b / batch0))
    return tile(x0.reshape(rows0, x0.shape[-1]), rows)


def rows_at(x0: torch.Tensor, module: nn.Module, b: int, batch0: int) -> int:
    """Rows of the layer's matrix product at model batch size ``b`` (those of :func:`layer_input`)."""
    if isinstance(module, nn.Conv2d):
        return b * _conv_out_pixels(module, x0)
    if x0.dim() >= 2 and x0.shape[0] == batch0:
        return b * (x0.numel() // (x0.shape[0] * x0.shape[-1]))
    return max(1, round(x0.numel() // x0.shape[-1] * b / batch0))


def _conv_out_pixels(conv: nn.Conv2d, x: torch.Tensor) -> int:
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ho = (x.shape[-2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[-1] + left + right - dw * (kw - 1) - 1) // sw + 1
    return ho * wo
