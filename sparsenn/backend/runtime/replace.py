"""Swapping modules: a sparse layer in for a dense one, the dense one back, and what a layer holds."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import kernels as K
from .layers import SparseConv2d, SparseLinear


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    """``mixin`` over ``base`` (made once per pair): ``mixin``'s methods first, an instance of ``base`` too."""
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(mixin.__name__, (mixin, base), {"__module__": mixin.__module__,
                                                                 "__qualname__": mixin.__qualname__,
                                                                 "_replaces": key})
    return _SUBCLASSES[key]


def _rebuild(mixin: type, base: type) -> nn.Module:
    """An empty instance of ``mixin`` over ``base`` (unpickling and deep copies fill in its state)."""
    cls = _subclass(mixin, base)
    return cls.__new__(cls)


class KeepsClass(nn.Module):
    """Base of a module that replaces another and stays an instance of the replaced module's class.

    ``transformers`` records outputs by class (``output_attentions=True`` hooks every
    ``LlamaAttention``, ``BertSelfAttention``, ...); a replacement that is not an instance would be
    skipped, and its attention weights silently missing. ``Cls(original)`` is therefore an
    instance of ``Cls`` over ``type(original)``, with ``Cls``'s methods first (made once per pair;
    pickled and deep-copied as that pair). Subclasses call ``nn.Module.__init__(self)``, not
    ``super().__init__()`` (which would reach the replaced class's ``__init__``).
    """

    def __new__(cls, original: nn.Module | None = None, *args, **kwargs):
        if isinstance(original, nn.Module) and "_replaces" not in cls.__dict__ and not isinstance(original, cls):
            cls = _subclass(cls, type(original))
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        replaces = type(self).__dict__.get("_replaces")
        if replaces is None:
            return super().__reduce_ex__(protocol)
        return _rebuild, replaces, self.__getstate__()


def has_forward_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward (pre-)hooks: a replacement that calls its parts directly would skip them."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs)


def adopt(new: nn.Module, original: nn.Module, attributes: tuple[str, ...] = ()) -> None:
    """Give ``new`` the children of ``original`` under the same names, in order (so the state dict is
    unchanged), and those of ``attributes`` that ``original`` has; ``new.original`` names its class."""
    for name, child in original.named_children():
        new.add_module(name, child)
    for name in attributes:
        if hasattr(original, name):
            setattr(new, name, getattr(original, name))
    new.original = type(original).__name__


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the model (``new`` itself when ``name`` is ``""``)."""
    if not name:
        return new
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    return model


def replace_checked(model: nn.Module, names: list[str] | None, accepts: Callable[[nn.Module], bool],
                    build: Callable[[nn.Module], nn.Module], what: str) -> list[str]:
    """Replace (in place) each module of ``model`` that ``accepts`` by ``build(module)``; the names replaced.

    ``names``: only these, each accepted and all distinct (else ``ValueError`` "not <what>: ..."
    naming them, and nothing changes); ``None``: every module accepted."""
    modules = dict(model.named_modules())
    if names is None:
        chosen = [n for n, m in modules.items() if n and accepts(m)]
    else:
        bad = [n for n in names if not n or n not in modules or not accepts(modules[n])]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"not {what}: {bad or names}")
        chosen = list(names)
    for n in chosen:
        replace_module(model, n, build(modules[n]))
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """In-place form of :func:`replace_module` for a submodule (``name`` not empty); kept for callers."""
    replace_module(model, name, new)


def build_sparse_layer(module: nn.Module, name: str, plan: dict[int, str], packed: dict[str, K.Packed],
                       w: torch.Tensor) -> SparseLinear | SparseConv2d:
    """The sparse counterpart of a Linear/Conv2d with ``plan`` (``{rows: kernel}``) and the packed weights it uses."""
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.from_conv(module, plan, packed, label=name, weight=w)
    return SparseLinear.from_linear(module, plan, packed, label=name, weight=w)


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLinear | SparseConv2d]]:
    """``(name, layer)`` of every sparse layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]


def held_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of the tensors ``module`` itself holds, by what they are.

    A sparse layer: each packed kernel's arrays (by kernel key), the dense ``weight`` if it
    keeps one, ``bias``. A PyTorch layer: ``weight`` and ``bias`` (its own parameters).
    """
    if isinstance(module, (SparseLinear, SparseConv2d)):
        held = {key: sum(module.get_buffer(f"{key}_{a}").nbytes for a in arrays)
                for key, arrays in module.kernel_arrays.items()}
    else:
        held = {}
    for attr in ("weight", "bias"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            held[attr] = t.numel() * t.element_size()
    return held
