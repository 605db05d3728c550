"""Sparse initialization: random masks at init, sparse fan-in rescaling, mask transfer.

* :func:`sparse_init` draws random masks with per-layer densities from a distribution
  (ERK: Evci et al. 2020, "Rigging the Lottery"; ER: Mocanu et al. 2018, SET; or
  uniform) and re-initializes the kept weights for their *sparse* fan-in.
* :func:`rescale_for_sparse_fan_in` does the re-initialization alone.
* :func:`transfer_masks` copies masks from another model or a checkpoint file.

Sparse fan-in rescaling (Evci et al. 2022, "Gradient Flow in Sparse Neural Networks
and How Lottery Tickets Win"; the same idea in Liu et al. 2019, "Sparse Evolutionary
Deep Learning with over one Million Artificial Neurons on Commodity Hardware"). A weight
is viewed as a matrix, rows = output units (``shape[0]``), columns = everything else
flattened. For row ``i`` with ``k_i`` active inputs (kept entries of the mask row)::

    std_i = gain / sqrt(k_i)
    kaiming_uniform:  w_ij ~ U(-sqrt(3) * std_i, sqrt(3) * std_i)
    kaiming_normal:   w_ij ~ N(0, std_i ** 2)

and ``w_ij = 0`` where the mask is ``False`` (rows with ``k_i = 0`` stay all zero).
The default ``gain = sqrt(2 / (1 + a**2))`` with ``a = sqrt(5)``, i.e. ``1 / sqrt(3)``,
is PyTorch's default for Linear and Conv (``kaiming_uniform_(w, a=sqrt(5))``), so a dense
mask gives back PyTorch's default distribution ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
For ``x ~ N(0, 1)`` each pre-activation ``(W x)_i`` then has variance ``gain**2``
whatever the sparsity, as in the dense layer. Only weights with two or more dimensions
are rescaled; 1-D parameters (biases, norms) and Embedding tables, whose default init
does not depend on fan-in, keep their values (masked entries are still zeroed).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Mapping

import torch
from torch import nn

from ..core import checks
from ..core.distributions import DISTRIBUTIONS, layer_densities
from ..core.masks import MASK_SUFFIX, attach_mask_by_name, attach_masks, get_pattern, masked_parameters
from ..core.patterns import check_layers, parse_pattern
from ..core.registry import UnknownNameError
from ..core.targets import Selector, select_parameters
from ..train import checkpoint

__all__ = ["rescale_for_sparse_fan_in", "sparse_init", "transfer_masks"]

RESCALE_MODES = ("kaiming_normal", "kaiming_uniform")
DEFAULT_GAIN = math.sqrt(2.0 / (1.0 + 5.0))  # PyTorch's Linear/Conv default: kaiming_uniform_(a=sqrt(5))


def _check_sparsity(value) -> float:
    return checks.sparsity("sparsity", value)


def _check_mode(mode) -> str:
    if not isinstance(mode, str) or mode.lower() not in RESCALE_MODES:
        raise UnknownNameError(f"unknown rescale mode {mode!r}; valid modes: {', '.join(RESCALE_MODES)}")
    return mode.lower()


def _check_gain(gain) -> float:
    if gain is None:
        return DEFAULT_GAIN
    if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or not 0 < gain < math.inf:
        raise ValueError(f"gain must be a positive finite number, got {gain!r}")
    return float(gain)


def _split(name: str) -> tuple[str, str]:
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def _fan_in_scaled(module: nn.Module, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))


@torch.no_grad()
def _rescale(param: torch.Tensor, mask: torch.Tensor, mode: str, gain: float,
             generator: torch.Generator | None) -> None:
    """Redraw ``param`` in place: row ``i`` gets std ``gain / sqrt(active inputs of row i)``."""
    rows = mask.reshape(mask.shape[0], -1).to("cpu")
    fan_in = rows.sum(1, dtype=torch.float32).clamp_(min=1.0)  # empty rows are zeroed by the mask
    std = (gain / fan_in.sqrt())[:, None]
    if mode == "kaiming_uniform":
        w = (torch.rand(rows.shape, generator=generator) * 2 - 1) * (math.sqrt(3.0) * std)
    else:
        w = torch.randn(rows.shape, generator=generator) * std
    w = w.masked_fill_(~rows, 0.0).reshape(param.shape)
    param.copy_(w.to(device=param.device, dtype=param.dtype))


_RESCALE_SALT = 0x5CA1E_0F_FA1  # decorrelates rescale draws from random-mask draws with the same seed


def rescale_for_sparse_fan_in(
    model: nn.Module, *, mode: str = "kaiming_uniform", seed: int | None = None, gain: float | None = None
) -> list[str]:
    """Re-initialize every masked weight for its sparse fan-in (Evci et al. 2022); see the module docstring.

    ``mode``: ``"kaiming_uniform"`` or ``"kaiming_normal"``. ``seed``: seeds a private
    ``torch.Generator`` (``None``: the global RNG), salted so that the seed which drew a
    random mask (``method="random"``, DST ``init="random"``) never redraws the same
    stream: without the salt every kept weight (high score) would come out positive. ``gain``: default ``1/sqrt(3)``,
    PyTorch's Linear/Conv default; ``sqrt(2)`` is He et al. 2015 for ReLU. Returns the
    names rescaled.
    """
    mode, gain = _check_mode(mode), _check_gain(gain)
    masked = masked_parameters(model)
    if not masked:
        raise ValueError(f"{type(model).__name__} has no masks to rescale for; attach masks first")
    generator = None if seed is None else torch.Generator().manual_seed((int(seed) + _RESCALE_SALT) % 2**63)
    done = []
    for mp in masked:
        if _fan_in_scaled(mp.module, mp.param):
            _rescale(mp.param, mp.mask, mode, gain, generator)
            done.append(mp.name)
    return done


def sparse_init(
    model: nn.Module,
    sparsity: float,
    *,
    distribution: str = "erk",
    pattern: str = "unstructured",
    include: Selector = None,
    exclude: Selector = None,
    overrides: dict[str, float] | None = None,
    seed: int = 0,
    rescale: bool | str = True,
) -> dict[str, torch.Tensor]:
    """Attach random masks at initialization and rescale the kept weights; returns ``{name: mask}``.

    Per-layer densities come from :func:`~sparsenn.core.distributions.layer_densities`
    (``"erk"``: Evci et al. 2020; ``"er"``: Mocanu et al. 2018; ``"uniform"``); each
    layer keeps exactly ``round(density * units)`` units of ``pattern``, the top-k of
    uniform random scores drawn from a ``torch.Generator`` seeded by ``seed``.
    ``rescale``: ``True`` (= ``"kaiming_uniform"``), ``"kaiming_normal"`` or ``False``;
    the rescale (see the module docstring) continues the same generator, so ``seed``
    fixes masks and weights. Everything is checked before the model is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sparsity = _check_sparsity(sparsity)
    DISTRIBUTIONS.get(distribution)  # unknown names raise, listing the valid ones
    pat = parse_pattern(pattern)
    if rescale is True:
        mode = "kaiming_uniform"
    elif rescale is False:
        mode = None
    else:
        mode = _check_mode(rescale)
    names = select_parameters(model, include, exclude, pattern=pat)
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    check_layers(pat, shapes)

    generator = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(shapes[n], generator=generator) for n in names}
    densities = layer_densities(distribution, shapes, sparsity, overrides=overrides,
                                scores=scores if distribution.lower() == "global" else None)
    too_dense = {n: round(d, 6) for n, d in densities.items() if d > pat.max_density + 1e-12}
    if too_dense:
        raise ValueError(
            f"pattern {pat.name} keeps at most {pat.max_density:g} of a layer's weights, but distribution "
            f"{distribution!r} at sparsity {sparsity:g} asks for densities {too_dense}; "
            f"use a higher sparsity or distribution='uniform'"
        )
    masks = {n: pat.topk(scores[n], densities[n], n) for n in names}  # the model is untouched so far

    out = attach_masks(model, masks, pattern=pat.name)  # a tied parameter: beside every name of it
    for n in names:
        module = model.get_submodule(_split(n)[0])
        if mode is not None and _fan_in_scaled(module, params[n]):
            _rescale(params[n], out[n], mode, DEFAULT_GAIN, generator)
    return out


def _source_masks(source) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``({param name: mask}, {param name: pattern})`` from a model, a checkpoint path or a dict."""
    if isinstance(source, nn.Module):
        mps = masked_parameters(source)
        return {mp.name: mp.mask for mp in mps}, {mp.name: get_pattern(mp.module, mp.attr) for mp in mps}
    if isinstance(source, (str, os.PathLike)):
        state = checkpoint.read(source)["model"]
        masks = {k[: -len(MASK_SUFFIX)]: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
        bad = [f"model/{n}{MASK_SUFFIX}: dtype {m.dtype}" for n, m in masks.items() if m.dtype is not torch.bool]
        if bad:
            raise checkpoint.CheckpointError(f"{os.fspath(source)!r}: masks must be boolean: {'; '.join(bad)}")
        return masks, {}
    if isinstance(source, Mapping):
        return dict(source), {}
    raise TypeError(
        f"source must be an nn.Module, a checkpoint path or a dict of masks, got {type(source).__name__}"
    )


def transfer_masks(source, target: nn.Module, *, strict: bool = True) -> list[str]:
    """Copy masks from ``source`` onto ``target`` and zero the target's masked weights.

    ``source``: a model with masks, a checkpoint path written by :func:`sparsenn.save`,
    or ``{parameter name: mask}``. With ``strict``, every source mask must have a target
    parameter of the same name and shape, and every masked target parameter a source
    mask; otherwise the matching masks are copied and the rest skipped. Mismatches raise
    ``ValueError`` listing them, with ``target`` unchanged. Returns the names transferred.
    """
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
    masks, patterns = _source_masks(source)
    if not masks:
        what = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        raise ValueError(f"source {what} holds no masks")
    params = dict(target.named_parameters(remove_duplicate=False))  # any name of a tied parameter
    problems = []
    for name, mask in masks.items():
        if name not in params:
            problems.append(f"{name}: not a parameter of the target")
        elif tuple(mask.shape) != tuple(params[name].shape):
            problems.append(f"{name}: mask {tuple(mask.shape)} vs parameter {tuple(params[name].shape)}")
    if strict:
        problems += [f"{mp.name}: masked in the target, absent from the source"
                     for mp in masked_parameters(target) if mp.name not in masks]
        if problems:
            raise ValueError(f"masks do not fit {type(target).__name__} (strict=True): {'; '.join(problems)}")
    names = [n for n in masks if n in params and tuple(masks[n].shape) == tuple(params[n].shape)]
    for n in names:
        attach_mask_by_name(target, n, masks[n], pattern=patterns.get(n))
    return names
