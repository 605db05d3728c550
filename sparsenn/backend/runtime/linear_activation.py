"""A sparse Linear followed by GELU as one product whose kernel applies the GELU (a fused epilogue).

BERT's feed-forward up-projection (``BertIntermediate``: ``dense`` then ``intermediate_act_fn``) and
modules like it compute ``gelu(x W^T + b)``. Run as two modules, the GELU reads and writes the
product's whole output once more: 25 MB per layer for BERT-base at batch 16 x 128 tokens, and
about 5% of the converted model's time there. :class:`LinearActivation` calls the sparse layer
with ``activation="gelu"`` instead (:meth:`.layers.SparseLinear.activated`): kernels with an
epilogue (``csr``, ``csr_panel``, ``nm``) apply it to each block of outputs right after writing
it, while it is in cache (:mod:`sparsenn.backend.kernels._activations`); the dense path and
kernels without an epilogue (``bitmask``, ``bsr``, ...) apply ``F.gelu`` after the product.

:func:`fuse_linear_activations` replaces a module only when it is shown to compute exactly
``act(linear(x))``: two children, a :class:`.layers.SparseLinear` and a module equal to exact
GELU (``F.gelu`` with ``approximate="none"``) on a sample spanning [-10, 10]; no hooks on it or
them; and on a random input its output equals ``act(linear(x))`` (the same operations) and
:class:`LinearActivation`'s (within the epilogue's rounding, ``1e-5`` of the largest value). The
new module keeps the same children under the same names, so the state dict is unchanged and a
child restored to its dense module later runs as before.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels._activations import TORCH_FUNCTIONS
from .layers import SparseLinear
from .replace import adopt, has_forward_hooks, replace_checked

ACTIVATIONS_ATTR = "fused_linear_activations"  #: on a converted model: the names of the modules replaced

FUNCTIONS = TORCH_FUNCTIONS  #: activation name (the kernels' epilogue) -> the PyTorch function it equals


class LinearActivation(nn.Module):
    """``act(linear(x))`` as ``linear.activated(x, "gelu")``; the children of the module it replaces, unchanged."""

    def __init__(self, original: nn.Module, linear: str, act: str, activation: str = "gelu"):
        super().__init__()
        if activation not in FUNCTIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(FUNCTIONS)}")
        adopt(self, original)
        self.linear_name, self.act_name, self.activation = linear, act, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self._modules[self.linear_name]
        if type(linear) is SparseLinear:
            return linear.activated(x, self.activation)
        return self._modules[self.act_name](linear(x))  # a child restored to its dense module

    def extra_repr(self) -> str:
        return f"replaces {self.original}: {self.activation}({self.linear_name}(x)) in the kernel"


def _parts(m: nn.Module) -> tuple[str, str] | None:
    """``(linear child, activation child)`` names if ``m`` has exactly those two children and no hooks."""
    children = list(m.named_children())
    if isinstance(m, LinearActivation) or len(children) != 2 or any(has_forward_hooks(c) for _, c in children) \
            or has_forward_hooks(m):
        return None
    linear = [n for n, c in children if type(c) is SparseLinear]
    if len(linear) != 1:
        return None
    act = next(n for n, _ in children if n != linear[0])
    return linear[0], act


def _equal(a, b, rtol: float) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * max(scale, 1e-30)))


@torch.no_grad()
def activation_of(module: nn.Module) -> str | None:
    """The name in :data:`FUNCTIONS` of the function ``module`` computes on a sample in [-10, 10] (``None``: none)."""
    z = torch.linspace(-10, 10, 4001).reshape(1, 1, -1)
    try:
        got = module(z)
    except Exception:  # noqa: BLE001  (a module that cannot run on that input is not an activation)
        return None
    return next((name for name, f in FUNCTIONS.items() if _equal(got, f(z), 1e-6)), None)


@torch.no_grad()
def fusable(m: nn.Module) -> bool:
    """Whether ``m`` computes ``gelu(linear(x))`` with a sparse ``linear`` that :class:`LinearActivation` runs."""
    parts = _parts(m)
    if parts is None:
        return False
    linear, act = (m.get_submodule(n) for n in parts)
    activation = activation_of(act)
    if activation is None:
        return False
    x = torch.randn(2, 3, linear.in_features, generator=torch.Generator().manual_seed(0))
    try:
        want = m(x)
        same_ops = act(linear(x))
        got = LinearActivation(m, *parts, activation)(x)
    except Exception:  # noqa: BLE001
        return False
    return _equal(same_ops, want, 0.0) and _equal(got, want, 1e-5)


def fuse_linear_activations(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace (in place) each module of ``model`` that computes ``gelu(sparse_linear(x))`` by
    :class:`LinearActivation`; the names replaced.

    ``names``: only these (each must pass :func:`fusable`, else ``ValueError`` naming it, and
    nothing changes); ``None``: every module that passes."""

    def build(m: nn.Module) -> LinearActivation:
        linear, act = _parts(m)
        return LinearActivation(m, linear, act, activation_of(m.get_submodule(act)))

    return replace_checked(model, names, fusable, build, "a sparse Linear followed by GELU")


__all__ = ["ACTIVATIONS_ATTR", "FUNCTIONS", "LinearActivation", "activation_of", "fusable", "fuse_linear_activations"]
