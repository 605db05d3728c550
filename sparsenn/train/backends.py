"""Training backends of :class:`~sparsenn.Sparsifier`: how the masked layers are stored while they train.

``backend="dense"`` (the default) keeps every masked parameter dense, its zeros enforced by the
mask hooks. Any other name is looked up in :data:`TRAINING_BACKENDS`, where a higher layer
registers what it provides (``"sparse"``: :mod:`sparsenn.backend.training.swap`, SparseProp-style
sparse Linear layers); the train layer only knows the protocol below, used by
:mod:`.layer_swap`.

A backend object has ``name``, ``layer_type`` (the class of its sparse layers) and:

- ``refusal(module, attr) -> str | None``: why ``module.<attr>`` cannot be stored sparse;
- ``measure(module, mask, x, needs_input_grad=) -> {"dense": s, "sparse": s}``: one training step
  of the layer each way on input ``x``;
- ``to_sparse(module, mask) -> layer``: the sparse layer (its parameter ``values`` holds the active
  entries; the bias parameter is ``module``'s own);
- ``write_back(layer, module)``: the layer's weight into ``module``'s dense parameter, in place;
- ``gather(layer, dense) -> (nnz,)`` and ``scatter(layer, values, fill) -> dense``: per-element
  tensors (optimizer state) between the two layouts.
"""

from __future__ import annotations

from ..core.registry import Registry

TRAINING_BACKENDS: Registry = Registry("training backend")


def training_backend(name: str):
    """The backend object for ``name`` (``None`` for ``"dense"``); unknown names list the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name.lower() == "dense":
        return None
    if name.lower() not in TRAINING_BACKENDS:
        valid = ", ".join(repr(n) for n in ["dense", *TRAINING_BACKENDS.names()])
        raise ValueError(f"unknown training backend {name!r}; valid backends: {valid}")
    return TRAINING_BACKENDS.get(name)


__all__ = ["TRAINING_BACKENDS", "training_backend"]
