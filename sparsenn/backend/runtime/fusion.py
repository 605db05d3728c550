"""Folding inference-mode BatchNorm into the convolution before it (what every inference engine does).

In eval mode ``BatchNorm2d(conv(x))`` is ``conv'(x)`` with ``W' = W * s`` (per output
channel) and ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)`` (Ioffe &
Szegedy 2015; the folding of Jacob et al. 2018, section 3.2). Scaling a row keeps its
zeros, so a pruned convolution stays exactly as sparse, and the BatchNorm's pass over
the activations disappears (on ResNet-18 at batch 16 the BatchNorms cost about a tenth
of the dense model's time).

A pair is folded only when it is shown safe: the BatchNorm's only input is the
convolution's output, that output has no other user, and each module is called exactly
once. Two ways to see it:

- the graph: the model traced with ``torch.fx`` (convolution and normalization modules
  as leaves, so subclasses with their own ``forward``, e.g. TensorFlow "SAME" padding,
  are not traced into);
- a recorded run, for models that do not trace (an input check on ``x.shape`` in
  ``forward`` is enough to stop ``torch.fx``): one forward pass on the example input with
  hooks on the convolutions and BatchNorms and a ``TorchFunctionMode`` that sees every
  operation a convolution's output goes into. A pair is folded when the output is
  passed straight to the BatchNorm and nothing else reads it (shape queries aside)
  and it is not among the model's outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ...core.recording import reads_values, tensors_in
from .replace import replace_module

_NORM = nn.modules.batchnorm._BatchNorm


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, _NORM)) or super().is_leaf_module(m, qualname)


def foldable_pairs(model: nn.Module, example_input: Any = None) -> tuple[list[tuple[str, str]], str | None]:
    """``([(conv name, batchnorm name)], why none could be looked for)`` of the pairs that can be folded.

    The traced graph decides; a model that does not trace is run once on ``example_input``
    (see the module docstring) when one is given."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return [], None
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001  (any tracing failure: record a run instead)
        if example_input is None:
            return [], f"BatchNorm not folded: the model does not trace with torch.fx ({type(e).__name__})"
        try:
            return _recorded_pairs(model, example_input), None
        except Exception as e2:  # noqa: BLE001
            return [], (f"BatchNorm not folded: the model does not trace with torch.fx ({type(e).__name__}) and "
                        f"its recorded run failed ({type(e2).__name__}: {e2})")
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn, src = modules.get(node.target), node.args[0]
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv = modules.get(src.target)
        if (isinstance(conv, nn.Conv2d) and len(src.users) == 1 and calls[src.target] == 1
                and calls[node.target] == 1 and _inference(bn) and conv.weight.shape[0] == bn.num_features):
            pairs.append((src.target, node.target))
    return pairs, None


class _Uses(TorchFunctionMode):
    """Counts, per watched tensor, the operations outside ``inside`` (a module being run) that read it."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}  # id -> the tensor (kept alive: ids stay unique)
        self.uses: dict[int, int] = {}
        self.inside: list[int] = []  # ids of the watched tensors a running BatchNorm was given

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if reads_values(func):
            for t in tensors_in((args, kwargs)):
                if id(t) in self.watched and id(t) not in self.inside:
                    self.uses[id(t)] += 1
        return func(*args, **kwargs)


@torch.no_grad()
def _recorded_pairs(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    """Foldable pairs seen in one run of ``model`` (see the module docstring)."""
    from .inputs import call_model

    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    produced: dict[int, str] = {}  # id of a convolution's output -> the convolution
    fed: dict[str, tuple[str, int]] = {}  # batchnorm -> (convolution, id of its input)
    mode = _Uses()

    def conv_hook(m, args, out):
        calls[names[m]] = calls.get(names[m], 0) + 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = names[m]
            mode.watched[id(out)] = out
            mode.uses[id(out)] = 0

    def bn_pre(m, args):
        calls[names[m]] = calls.get(names[m], 0) + 1
        x = args[0] if len(args) == 1 else None
        if isinstance(x, torch.Tensor) and id(x) in produced:
            fed[names[m]] = (produced[id(x)], id(x))
            mode.inside.append(id(x))
        else:
            mode.inside.append(-1)

    def bn_post(m, args, out):
        mode.inside.pop()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles += [m.register_forward_pre_hook(bn_pre), m.register_forward_hook(bn_post)]
    try:
        with mode:
            out = call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    returned = {id(t) for t in tensors_in(out)}
    modules = dict(model.named_modules())
    pairs = []
    for bn_name, (conv_name, tid) in fed.items():
        bn, conv = modules[bn_name], modules[conv_name]
        if (mode.uses[tid] == 0 and tid not in returned and calls[conv_name] == 1 and calls[bn_name] == 1
                and _inference(bn) and conv.weight.shape[0] == bn.num_features):
            pairs.append((conv_name, bn_name))
    return sorted(pairs)


def _inference(bn: nn.BatchNorm2d) -> bool:
    """Eval mode with running statistics: the BatchNorm is a fixed per-channel affine map."""
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example_input: Any = None) -> tuple[list[tuple[str, str]], str | None]:
    """Fold every safe ``Conv2d -> BatchNorm2d`` pair of ``model`` in place (the BatchNorm becomes
    ``nn.Identity``); returns the folded pairs and, if none could be looked for, why.
    ``example_input`` (as :func:`sparsenn.convert` takes it) lets a model that does not trace be run instead."""
    pairs, why = foldable_pairs(model, example_input)
    fold_pairs(model, pairs)
    return pairs, why


@torch.no_grad()
def fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold the given ``(conv, batchnorm)`` pairs (found safe by :func:`foldable_pairs`) in place."""
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        w = conv.weight
        conv.weight = nn.Parameter((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype), requires_grad=False)
        b = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.bias = nn.Parameter(b.to(w.dtype), requires_grad=False)
        replace_module(model, bn_name, nn.Identity())


__all__ = ["fold_batchnorm", "fold_pairs", "foldable_pairs"]
