"""Swapping masked layers for sparse-training layers, and back (``Sparsifier(backend="sparse")``).

A swapped layer is replaced in its parent module by the backend's sparse layer
(:mod:`.backends`), whose parameter ``values`` holds only the active weights; the original
``nn.Linear`` is kept aside, its mask buffer current and its dense weight emptied, and comes
back (the same module and parameter objects) when the layer is swapped back:

- before every mask update (scores, drops and growth see the dense weights, as on the
  masked-dense path), and for a step whose dense gradient a method asks for (RigL's update
  steps); the Sparsifier swaps the layers in again after;
- for a checkpoint (:meth:`Sparsifier.densified`): files are the same as the masked-dense
  path's, so either backend loads them;
- at ``finalize``: the model holds its own ``nn.Linear`` layers again.

Every optimizer the Sparsifier wrapped follows each move: the parameter in its groups is
replaced and its per-element state (momentum, Adam's moments, ...) is gathered at the active
positions or scattered back (the optimizer's initial value elsewhere, zero for all but
Adagrad); other state (step counters) is kept. State that is not per element cannot be
moved: such an optimizer is refused with a ValueError before anything changes.

``swap="measured"`` (the default) swaps a layer only where one training step of it is
measured faster sparse than masked-dense (SparseProp, Nikdan et al. 2023, does the same):
the first training forward pass records each candidate's input, the next ``Sparsifier.step``
times both and swaps the winners; a layer whose number of active weights changed (gradual
pruning) is timed again at the next update. ``swap="always"`` swaps every candidate at once.
:meth:`LayerSwap.report` says per layer what was measured and decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.masks import MaskedParam
from .masked_optim import initial_value

SWAP_MODES = ("measured", "always")
MARGIN = 0.95  # a layer goes sparse if its measured step is below this fraction of the masked-dense one
MAX_SAMPLE_ROWS = 4096  # rows of a layer's recorded input kept for timing


@dataclass
class _Row:
    name: str
    mp: MaskedParam  # the original module and attribute: its mask buffer stays current
    parent: nn.Module | None
    child: str
    shape: tuple[int, ...]  # the dense weight's
    refusal: str | None = None
    layer: nn.Module | None = None  # the sparse layer while swapped
    sample: torch.Tensor | None = None  # a recorded input (measured mode)
    needs_input_grad: bool = True
    hook: Any = None
    measured_nnz: int | None = None
    timing: dict[str, float] = field(default_factory=dict)
    sparse: bool | None = None  # the decision; None: not measured yet


def _parent(model: nn.Module, module_name: str) -> tuple[nn.Module | None, str]:
    if not module_name:
        return None, ""
    parent_name, _, child = module_name.rpartition(".")
    return model.get_submodule(parent_name), child


def check_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, shape: tuple[int, ...]) -> None:
    """ValueError if ``optimizer`` keeps state of ``param`` (of ``shape``) that is neither per element nor a scalar."""
    for key, value in optimizer.state.get(param, {}).items():
        if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(shape):
            raise ValueError(f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} for a "
                             f"parameter of shape {tuple(shape)}; backend='sparse' can only move per-element "
                             "optimizer state: use backend='dense' with this optimizer")


@torch.no_grad()
def replace_in_optimizer(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor,
                         convert: Callable[[torch.Tensor, float], torch.Tensor], shape: tuple[int, ...]) -> None:
    """``old`` -> ``new`` in ``optimizer``'s groups; its per-element state (tensors of ``shape``, the shape ``old``
    has in use) converted by ``convert(tensor, fill)``, ``fill`` the optimizer's initial value."""
    group = None
    for g in optimizer.param_groups:
        for i, p in enumerate(g["params"]):
            if p is old:
                g["params"][i], group = new, g
    if group is None:
        return
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            k: convert(v, initial_value(optimizer, group, k))
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) == tuple(shape) else v
            for k, v in state.items()}


class LayerSwap:
    """The masked layers of one Sparsifier that a training backend may store sparse (see the module)."""

    def __init__(self, backend, model: nn.Module, masked: list[MaskedParam],
                 optimizers: Callable[[], list[torch.optim.Optimizer]], mode: str = "measured"):
        if mode not in SWAP_MODES:
            raise ValueError(f"swap must be one of {', '.join(map(repr, SWAP_MODES))}, got {mode!r}")
        self.backend, self.mode, self._optimizers = backend, mode, optimizers
        uses: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1
        self.rows: list[_Row] = []
        self._settled = False
        for mp in masked:
            module_name = mp.name.rpartition(".")[0]
            parent, child = _parent(model, module_name)
            row = _Row(mp.name, mp, parent, child, tuple(mp.param.shape))
            if parent is None:
                row.refusal = "it is the model itself (nothing to replace it in)"
            elif uses.get(id(mp.module), 0) > 1:
                row.refusal = "the module is reachable under more than one name"
            else:
                row.refusal = backend.refusal(mp.module, mp.attr)
            self.rows.append(row)

    # -- state --------------------------------------------------------------------------------------
    @property
    def swapped(self) -> list[str]:
        return [r.name for r in self.rows if r.layer is not None]

    def report(self) -> list[dict[str, Any]]:
        """Per masked parameter: swapped or not, why, and the measured step times (milliseconds)."""
        out = []
        for r in self.rows:
            row: dict[str, Any] = {"name": r.name, "swapped": r.layer is not None}
            if r.refusal:
                row["reason"] = f"not a candidate: {r.refusal}"
            elif self.mode == "always":
                row["reason"] = "swap='always'"
            elif r.sparse is None:
                row["reason"] = "not measured yet (measured at the step after the first training forward pass)"
            elif not r.timing:
                row["reason"] = "nothing masked: no zeros to skip"
            else:
                d, s = r.timing["dense"], r.timing["sparse"]
                row.update(dense_ms=1e3 * d, sparse_ms=1e3 * s, batch=int(r.sample.shape[0]),
                           reason=f"measured {'faster' if r.sparse else 'not faster'} sparse "
                                  f"({1e3 * s:.3g} vs {1e3 * d:.3g} ms per step)")
            out.append(row)
        return out

    # -- moves --------------------------------------------------------------------------------------
    def sync(self, dense: bool) -> None:
        """``dense``: every layer back to masked-dense. Otherwise swap the layers that should be sparse,
        measuring those not measured at their current number of active weights."""
        if dense:
            self.unswap_all()
            return
        if self._settled:  # nothing changed since the last pass (every step calls this)
            return
        self._settled = True
        try:
            for r in self.rows:
                if r.refusal or r.layer is not None:
                    continue
                if self.mode == "measured" and not self._decide(r):
                    continue
                problem = self.backend.refusal(r.mp.module, r.mp.attr)
                if problem:  # hooks the user added since
                    r.refusal = problem
                    continue
                self._swap(r)
        except BaseException:
            self._settled = False
            raise

    def _decide(self, r: _Row) -> bool:
        mask = r.mp.mask
        nnz = int(mask.sum())
        if nnz == mask.numel():  # nothing masked (yet): no zeros to skip
            r.measured_nnz, r.sparse, r.timing = nnz, False, {}
            return False
        if r.sample is None:
            if r.hook is None:
                r.hook = r.mp.module.register_forward_pre_hook(self._recorder(r))
            self._settled = False  # decided once the hook has recorded an input
            return False
        if r.measured_nnz != nnz:
            r.timing = self.backend.measure(r.mp.module, r.mp.mask, r.sample, needs_input_grad=r.needs_input_grad)
            r.measured_nnz, r.sparse = nnz, r.timing["sparse"] < MARGIN * r.timing["dense"]
        return bool(r.sparse)

    def _recorder(self, r: _Row):
        def hook(module, args):
            if module.training and torch.is_grad_enabled() and args and torch.is_tensor(args[0]):
                x = args[0]
                r.sample = x.detach().reshape(-1, x.shape[-1])[:MAX_SAMPLE_ROWS].clone()
                r.needs_input_grad = bool(x.requires_grad)
                r.hook.remove()
                r.hook = None
                self._settled = False
        return hook

    def remove_hooks(self) -> None:
        for r in self.rows:
            if r.hook is not None:
                r.hook.remove()
                r.hook = None

    @torch.no_grad()
    def _swap(self, r: _Row) -> None:
        module, weight = r.mp.module, r.mp.param
        optimizers = self._optimizers()
        for opt in optimizers:  # before anything changes
            check_optimizer_state(opt, weight, r.shape)
        if r.hook is not None:
            r.hook.remove()
            r.hook = None
        layer = self.backend.to_sparse(module, r.mp.mask)
        for opt in optimizers:
            replace_in_optimizer(opt, weight, layer.values, lambda t, fill: self.backend.gather(layer, t), r.shape)
        setattr(r.parent, r.child, layer)
        weight.grad = None
        weight.data = weight.data.new_empty(0)  # the dense copy is not kept while the layer trains sparse
        r.layer = layer

    @torch.no_grad()
    def _unswap(self, r: _Row) -> None:
        layer, module = r.layer, r.mp.module
        self.backend.write_back(layer, module)
        for opt in self._optimizers():
            replace_in_optimizer(opt, layer.values, r.mp.param,
                                 lambda t, fill: self.backend.scatter(layer, t, fill), tuple(layer.values.shape))
        setattr(r.parent, r.child, module)
        r.layer = None

    def unswap_all(self) -> None:
        self._settled = False  # masks may change before the next sync
        for r in self.rows:
            if r.layer is not None:
                self._unswap(r)

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """A newly wrapped optimizer that holds a swapped layer's dense weight moves to its values."""
        for r in self.rows:
            if r.layer is not None:
                check_optimizer_state(optimizer, r.mp.param, r.shape)
        for r in self.rows:
            if r.layer is not None:
                layer = r.layer
                replace_in_optimizer(optimizer, r.mp.param, layer.values,
                                     lambda t, fill, layer=layer: self.backend.gather(layer, t), r.shape)


__all__ = ["MARGIN", "SWAP_MODES", "LayerSwap", "check_optimizer_state", "replace_in_optimizer"]
