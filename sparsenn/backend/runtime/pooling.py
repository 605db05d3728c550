"""Max pooling through the compiled kernel where it is faster than PyTorch's (ResNet-style stems).

Once the convolutions are sparse, the dense operations around them are a larger share of the
model: ResNet-18's stem max pool took 2.7 of the 11.9 ms of the converted network at batch 1 (PyTorch's
CPU ``max_pool2d`` on contiguous NCHW input; an ad hoc per-module timing on a 2-core Xeon, 2026-12-07),
and PyTorch's pool alone 42 ms at batch 16 (``bench/pooling.py``), where the network took 159 ms.
:class:`CompiledMaxPool2d` is an ``nn.MaxPool2d`` (same settings, no state) whose contiguous
float32 NCHW CPU inputs without autograd go through
:func:`sparsenn.backend.kernels.pooling.max_pool2d`; any other input (channels-last, another
dtype, a tensor that needs gradients) runs ``nn.MaxPool2d.forward``, unchanged.

:func:`compile_pools` (a step of ``convert``) replaces a plain ``nn.MaxPool2d`` with settings the
kernel takes (:func:`~sparsenn.backend.kernels.pooling.supported`, no ``return_indices``, no hooks)
only where, on the input it receives from the example (tiled to every batch size converted for),
the kernel's output equals PyTorch's and it is faster at every batch size. Archives list the
modules replaced (``pools``) and ``load`` replaces them again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import pooling
from . import inputs as I
from .replace import has_forward_hooks, replace_checked
from .timing import interleaved_medians

POOLS_ATTR = "compiled_pools"  #: on a converted model: the names of the max pools replaced


class CompiledMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose contiguous float32 NCHW inputs run the compiled kernel."""

    @classmethod
    def of(cls, pool: nn.MaxPool2d) -> CompiledMaxPool2d:
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)
        return new.train(pool.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _takes(self, x):
            return torch.from_numpy(pooling.max_pool2d(x.detach().numpy(), self.kernel_size, self.stride,
                                                       self.padding))
        return super().forward(x)


def _takes(pool: nn.MaxPool2d, x: Any) -> bool:
    """Whether the kernel runs ``pool`` on ``x``: a plain contiguous float32 NCHW CPU tensor without autograd whose
    output has at least one row and column (else PyTorch's pooling runs, and raises its own errors)."""
    return (type(x) is torch.Tensor and x.dtype == torch.float32 and x.dim() == 4 and x.device.type == "cpu"
            and x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad) and x.numel() > 0
            and min(pooling.output_size(x.shape[2], x.shape[3], pool.kernel_size, pool.stride, pool.padding)) >= 1)


def _faster(pool: nn.MaxPool2d, fast: CompiledMaxPool2d, x: torch.Tensor, budget: float) -> bool:
    """Whether ``fast`` equals ``F.max_pool2d`` on ``x`` and is faster than ``pool`` (interleaved medians)."""
    if not torch.equal(fast(x), F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding)):
        return False
    t = interleaved_medians({"torch": lambda: pool(x), "kernel": lambda: fast(x)}, budget=budget, min_repeats=5,
                            max_repeats=15, block=1)
    return t["kernel"] < t["torch"]


def compilable(m: nn.Module) -> bool:
    """A plain ``nn.MaxPool2d`` (not a subclass) without hooks or ``return_indices``, with settings the kernel takes."""
    return (type(m) is nn.MaxPool2d and not m.return_indices and not has_forward_hooks(m)
            and pooling.supported(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode))


def compile_pools(model: nn.Module, names: list[str]) -> list[str]:
    """Replace the max pools ``names`` of ``model`` (in place) by :class:`CompiledMaxPool2d` (each must pass
    :func:`compilable`, else ``ValueError`` naming it, and nothing changes); the names replaced."""
    return replace_checked(model, names, compilable, CompiledMaxPool2d.of, "max pools the compiled kernel takes")


@torch.inference_mode()
def faster_pools(model: nn.Module, example_input: Any, batch_sizes: tuple[int, ...], budget: float = 0.05
                 ) -> list[str]:
    """The names of the :func:`compilable` max pools of ``model`` that receive a contiguous float32 NCHW input
    on ``example_input`` and for which, on that input tiled to each of ``batch_sizes``, the kernel equals
    ``F.max_pool2d`` and is faster (interleaved medians, ``budget`` seconds per round)."""
    pools = {n: m for n, m in model.named_modules() if n and compilable(m)}
    if not pools:
        return []
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0] if a else None))
             for n, m in pools.items()]
    try:
        I.call_model(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    chosen = []
    for name, x in seen.items():
        pool = pools[name]
        if _takes(pool, x):
            fast = CompiledMaxPool2d.of(pool)
            if all(_faster(pool, fast, I.tile(x, b), budget) for b in batch_sizes):
                chosen.append(name)
    return chosen


__all__ = ["POOLS_ATTR", "CompiledMaxPool2d", "compilable", "compile_pools", "faster_pools"]
