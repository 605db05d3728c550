"""Metrics: weight sparsity, storage bytes, multiply-accumulates, activation sparsity, dead units.

A weight is viewed as a matrix: rows are ``shape[0]`` (output units, filters,
embeddings), columns everything else flattened (a 1-D tensor is one row), as in
:mod:`sparsenn.core.patterns`. Counts are of *exact* zeros, which masked weights hold.

The measured weights are the masked parameters; a model without masks (e.g. after
:func:`~sparsenn.core.masks.remove_masks`) is measured on the weights that usually
carry sparsity: every parameter with ``ndim >= 2`` named ``weight`` of a
``Linear``, ``Conv1d/2d/3d`` or ``Embedding``, and ``MultiheadAttention``'s
``in_proj_weight`` (or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ).

The batch metrics (:func:`macs`, :func:`activation_sparsity`, :func:`input_sparsity`,
:func:`dead_inputs`) run one forward pass in eval mode (dropout off, batch norm on
its running statistics, none updated) under ``torch.no_grad``; every module's
train/eval flag is restored and every hook removed afterwards, even on error.
``batch_input`` is a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
(``model(**x)``). A module called several times accumulates over its calls.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .masks import get_pattern, masked_parameters

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


# ---------------------------------------------------------------- weights


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def measured_weights(model: nn.Module) -> list[tuple[str, nn.Module, str, str | None]]:
    """``(name, module, attr, pattern)`` of every weight the metrics measure (see module doc).

    ``pattern`` is the mask's pattern name, or ``None`` when the model has no masks.
    """
    masked = masked_parameters(model)
    if masked:
        return [(mp.name, mp.module, mp.attr, get_pattern(mp.module, mp.attr)) for mp in masked]
    out = []
    for name, p in model.named_parameters():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if p.dim() < 2 or isinstance(p, nn.parameter.UninitializedParameter):
            continue
        if (isinstance(module, (nn.Linear, nn.Embedding, *_CONVS)) and attr == "weight") or (
            isinstance(module, nn.MultiheadAttention) and attr in _MHA_WEIGHTS
        ):
            out.append((name, module, attr, None))
    return out


def _nnz(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t.detach()))


def sparsity(model: nn.Module) -> float:
    """Global fraction of exact zeros over the measured weights (0.0 if there are none)."""
    weights = [getattr(m, a) for _, m, a, _ in measured_weights(model)]
    total = sum(w.numel() for w in weights)
    return 0.0 if total == 0 else 1.0 - sum(_nnz(w) for w in weights) / total


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """``{weight name: fraction of exact zeros}`` for every measured weight."""
    out = {}
    for name, module, attr, _ in measured_weights(model):
        w = getattr(module, attr)
        out[name] = 0.0 if w.numel() == 0 else 1.0 - _nnz(w) / w.numel()
    return out


# ---------------------------------------------------------------- bytes
# Byte *formulas* at a given value width (``dtype_bytes``) and, for CSR, a fixed index
# width (int32 by default, the width of torch's CSR tensors), so a report can state
# "fp32 with int32 indices" whatever the weight's dtype. The exact bytes of a stored
# weight, with the smallest index dtype that fits, are ``sparsenn.backend.formats``'
# ``to_format(w, name).nbytes``; the two agree for dense, bitmask and N:M at
# ``dtype_bytes = itemsize``, and for CSR when the column indices and the row pointers
# both get ``index_bytes``-wide dtypes there (tests/test_formats.py checks this).


def _check_weight(weight) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    return weight.detach()


def _check_bytes(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    return (1, math.prod(shape)) if len(shape) <= 1 else (shape[0], math.prod(shape[1:]))


def dense_bytes(weight: torch.Tensor, dtype_bytes: int = 4) -> int:
    """``numel * dtype_bytes``: the dense tensor."""
    return _check_weight(weight).numel() * _check_bytes("dtype_bytes", dtype_bytes)


def csr_bytes(weight: torch.Tensor, dtype_bytes: int = 4, index_bytes: int = 4) -> int:
    """CSR of the matrix view: ``nnz`` values + ``nnz`` column indices + ``rows + 1`` row pointers.

    Indices are int32 (``index_bytes=4``) by default; ``sparsenn.backend.formats.CSR`` stores
    the smallest unsigned dtype that fits instead (see the note above).
    """
    w = _check_weight(weight)
    dtype_bytes, index_bytes = _check_bytes("dtype_bytes", dtype_bytes), _check_bytes("index_bytes", index_bytes)
    nnz, rows = _nnz(w), _rows_cols(w.shape)[0]
    return nnz * dtype_bytes + nnz * index_bytes + (rows + 1) * index_bytes


def bitmask_bytes(weight: torch.Tensor, dtype_bytes: int = 4) -> int:
    """One bit per element, rounded up to whole bytes, + ``nnz`` values: ``ceil(numel/8) + nnz*dtype_bytes``."""
    w = _check_weight(weight)
    return math.ceil(w.numel() / 8) + _nnz(w) * _check_bytes("dtype_bytes", dtype_bytes)


def nm_bytes(weight: torch.Tensor, n: int = 2, m: int = 4, dtype_bytes: int = 4) -> int | None:
    """Compressed N:M storage, or ``None`` if the weight is not N:M sparse.

    ``rows * cols * n/m`` kept slots of ``dtype_bytes`` each (a group with fewer than
    ``n`` nonzeros still stores ``n`` slots) + ``ceil(log2(m))`` bits of position
    metadata per kept slot, rounded up to whole bytes (2 bits per kept value for 2:4,
    as in NVIDIA's sparse tensor core layout). ``None`` unless ``cols % m == 0`` and
    every group of ``m`` consecutive columns holds at most ``n`` nonzeros.
    """
    w = _check_weight(weight)
    for label, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"N:M needs integers 0 < n < m, got {label}={v!r}")
    if not 0 < n < m:
        raise ValueError(f"N:M needs integers 0 < n < m, got {n}:{m}")
    dtype_bytes = _check_bytes("dtype_bytes", dtype_bytes)
    rows, cols = _rows_cols(w.shape)
    if cols % m or w.numel() == 0:
        return None
    if (w.reshape(-1, m) != 0).sum(1).max() > n:
        return None
    slots = rows * cols // m * n
    return slots * dtype_bytes + math.ceil(slots * math.ceil(math.log2(m)) / 8)


# ---------------------------------------------------------------- hook plumbing


def call_model(model: nn.Module, batch_input: Any) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, a tuple/list or a dict input."""
    if isinstance(batch_input, torch.Tensor):
        return model(batch_input)
    if isinstance(batch_input, (tuple, list)):
        return model(*batch_input)
    if isinstance(batch_input, dict):
        return model(**batch_input)
    else:
        raise TypeError(
            f"batch_input must be a tensor, a tuple/list of positional arguments or a dict of keyword "
            f"arguments, got {type(batch_input).__name__}"
        )


def _run_hooked(model: nn.Module, batch_input: Any, modules: list[tuple[str, nn.Module]],
                hook: Callable[[str, nn.Module, tuple, dict, Any], None]) -> None:
    """One eval-mode, no-grad forward pass calling ``hook(name, module, args, kwargs, output)``
    after each call of each of ``modules``; hooks removed and train flags restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(
                lambda mod, args, kwargs, out, _n=name: hook(_n, mod, args, kwargs, out), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            call_model(model, batch_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _mha_qkv(args: tuple, kwargs: dict) -> list[torch.Tensor | None]:
    names = ("query", "key", "value")
    return [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]


def _primary_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input a sparse kernel of ``module`` would read (``query`` for attention)."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_qkv(args, kwargs)[0]
    return _first_tensor(list(args) + list(kwargs.values()))


def _owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning a masked parameter (or a measured weight, when unmasked), once each."""
    owners = {id(m) for _, m, _, _ in measured_weights(model)}
    return [(n, m) for n, m in model.named_modules() if id(m) in owners]


# ---------------------------------------------------------------- MACs


def _mha_macs(name: str, mha: nn.MultiheadAttention, args: tuple, kwargs: dict,
              add: Callable[[str, int, int], None]) -> int:
    """Add the projections' MACs per parameter name; return the attention products' MACs."""
    q, k, v = _mha_qkv(args, kwargs)
    k = q if k is None else k
    v = k if v is None else v
    if q.dim() == 3:
        n, L, S = (q.shape[0], q.shape[1], k.shape[1]) if mha.batch_first else (q.shape[1], q.shape[0], k.shape[0])
    else:
        n, L, S = 1, q.shape[0], k.shape[0]
    E = mha.embed_dim
    if mha.in_proj_weight is not None:
        w = mha.in_proj_weight
        pw = [(_join(name, "in_proj_weight"), w[i * E:(i + 1) * E]) for i in range(3)]
    else:
        pw = [(_join(name, a), getattr(mha, a)) for a in _MHA_WEIGHTS[1:]]
    for (pname, w), tokens in zip(pw + [(_join(name, "out_proj.weight"), mha.out_proj.weight)], (L, S, S, L)):
        add(pname, n * tokens * w.numel(), n * tokens * _nnz(w))
    s_attn = S + (mha.bias_k is not None) + bool(mha.add_zero_attn)
    return 2 * n * L * s_attn * E  # Q K^T and A V, each L*S*E per batch element


def _accumulate(table: dict[str, list[int]], key: str, dense: int, sparse: int) -> None:
    acc = table.setdefault(key, [0, 0])
    acc[0] += dense
    acc[1] += sparse


MacsTable = dict[str, tuple[int, int]]


def macs_by_param(model: nn.Module, example_input: Any) -> tuple[MacsTable, MacsTable]:
    """``(per weight name, per module name)`` ``(dense, sparse)`` MACs; see :func:`macs`.

    The per-weight table holds projections only; the per-module one adds attention's
    activation products to its ``MultiheadAttention``.
    """
    per_param: dict[str, list[int]] = {}
    per_module: dict[str, list[int]] = {}
    mha_out = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.MultiheadAttention, *_CONVS)) and id(m) not in mha_out]

    def hook(name, module, args, kwargs, out):
        def add(pname, dense, sparse):
            _accumulate(per_param, pname, dense, sparse)
            _accumulate(per_module, name, dense, sparse)

        if isinstance(module, nn.MultiheadAttention):
            attn = _mha_macs(name, module, args, kwargs, add)
            _accumulate(per_module, name, attn, attn)
            return
        w, pname = module.weight, _join(name, "weight")
        if isinstance(module, nn.Linear):
            positions = _primary_input(module, args, kwargs).numel() // module.in_features
        else:  # convolution: batch * output positions
            y = _first_tensor(out)
            positions = y.numel() // y.shape[-len(module.kernel_size) - 1]
        add(pname, positions * w.numel(), positions * _nnz(w))

    _run_hooked(model, example_input, layers, hook)
    return ({k: tuple(v) for k, v in per_param.items()}, {k: tuple(v) for k, v in per_module.items()})


def macs(model: nn.Module, example_input: Any) -> dict[str, tuple[int, int]]:
    """``{module name: (dense MACs, sparse MACs)}`` of one forward pass at ``example_input``.

    Linear: ``rows * in * out`` dense, ``rows * nnz(W)`` sparse, with ``rows`` the
    product of the input's leading dims. Conv1d/2d/3d: ``N * out_positions * out_ch *
    in_ch/groups * prod(kernel)`` dense, ``N * out_positions * nnz(W)`` sparse.
    MultiheadAttention: q, k and v projections (each with its own rows of
    ``in_proj_weight``, or ``q/k/v_proj_weight``) + ``out_proj`` (not counted again
    as a Linear), plus the activation products ``Q K^T`` and ``A V`` (``L*S*E`` each
    per batch element, dense in both counts). Bias adds, norms and activations are
    not counted; other modules (Embedding lookups included) are absent.
    """
    return macs_by_param(model, example_input)[1]


# ---------------------------------------------------------------- activations


def _zero_fractions(model: nn.Module, batch_input: Any, modules: list[tuple[str, nn.Module]],
                    pick: Callable[[nn.Module, tuple, dict, Any], torch.Tensor | None]) -> dict[str, float]:
    counts: dict[str, list[int]] = {}

    def hook(name, module, args, kwargs, out):
        t = pick(module, args, kwargs, out)
        if t is not None:
            acc = counts.setdefault(name, [0, 0])
            acc[0] += t.numel() - _nnz(t)
            acc[1] += t.numel()

    _run_hooked(model, batch_input, modules, hook)
    return {n: (z / t if t else 0.0) for n, (z, t) in counts.items()}


def activation_sparsity(model: nn.Module, batch_input: Any) -> dict[str, float]:
    """``{leaf module name: fraction of exact zeros in its output}`` (first tensor of a tuple)."""
    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    return _zero_fractions(model, batch_input, leaves, lambda m, a, k, out: _first_tensor(out))


def _float_input(module, args, kwargs, out=None) -> torch.Tensor | None:
    t = _primary_input(module, args, kwargs)
    return t if t is not None and t.is_floating_point() else None


def input_sparsity(model: nn.Module, batch_input: Any) -> dict[str, float]:
    """``{module name: fraction of exact zeros in its input}`` for each module owning a masked weight.

    The input is the first tensor argument (``query`` for attention); integer inputs
    (Embedding indices) and modules never called as modules (an attention's
    ``out_proj``) are absent. Works whether the model uses ``nn.ReLU`` or ``F.relu``.
    """
    return _zero_fractions(model, batch_input, _owners(model), _float_input)


def dead_units(model: nn.Module) -> dict[str, int]:
    """``{weight name: rows (output units, filters) whose incoming weights are all zero}``."""
    out = {}
    for name, module, attr, _ in measured_weights(model):
        w = getattr(module, attr).detach()
        rows, cols = _rows_cols(w.shape)
        out[name] = int((~(w.reshape(rows, cols) != 0).any(1)).sum()) if cols else rows
    return out


def dead_inputs(model: nn.Module, batch_input: Any) -> dict[str, int]:
    """``{module name: input features exactly zero for every sample of the batch}``.

    Features are the last dim (Linear, attention's ``query``) or the channel dim
    (dim 1, or 0 for an unbatched input, of a convolution), for each module owning
    a masked weight; same inputs as :func:`input_sparsity`.
    """
    alive: dict[str, torch.Tensor] = {}

    def hook(name, module, args, kwargs, out):
        x = _float_input(module, args, kwargs)
        if x is None or x.dim() == 0:
            return
        dim = -1
        if isinstance(module, _CONVS):
            dim = 1 if x.dim() == len(module.kernel_size) + 2 else 0
        a = (x != 0).movedim(dim, 0).reshape(x.shape[dim], -1).any(1)
        alive[name] = a | alive[name] if name in alive and alive[name].shape == a.shape else a

    _run_hooked(model, batch_input, _owners(model), hook)
    return {n: int((~a).sum()) for n, a in alive.items()}
