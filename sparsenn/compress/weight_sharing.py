"""Trained weight sharing (Han, Mao & Dally 2016, "Deep Compression", Sec. 3).

Per layer, the kept weights (the mask's ``True`` positions; the non-zero ones for a layer
without a mask) are clustered by 1-D k-means (Lloyd's algorithm) with linear
initialisation (centroids evenly spaced between the smallest and largest weight, the
paper's best initialisation). The layer's weight then *is* ``codebook[cluster]`` at kept
positions and exactly 0 elsewhere: a ``torch.nn.utils.parametrize`` parametrization whose
only trainable tensor is the codebook, so any training loop fine-tunes the centroids, and
autograd through the gather sums the weights' gradients over each cluster (the paper's
Eq. 3). Cluster assignments are fixed and a pruned weight can never become non-zero.

    plans = share_weights(model, bits={"conv": 8, "fc": 5})   # the paper's widths (also the default)
    ...train model with your own loop (its parameters are the codebooks and the biases)...
    finalize_sharing(model)                                   # plain weights again, masks kept

or ``with weight_sharing(model): ...``, or :func:`fine_tune_shared` (the library's loop).

``2**bits`` clusters per layer, except that a layer whose sparse indices need padding
fillers (see :mod:`.relative_index`) gives one of its ``2**bits`` codes to the fillers'
zero, so ``2**bits - 1`` clusters: every stored entry then fits in ``bits`` bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.masks import MASK_SUFFIX
from .relative_index import count_entries

__all__ = ["DEFAULT_BITS", "DEFAULT_INDEX_BITS", "SharedWeight", "SharingPlan", "codebooks", "finalize_sharing",
           "fine_tune_shared", "kept_positions", "kmeans_1d", "linear_init", "share_weights", "shared_layers",
           "weight_sharing"]

DEFAULT_BITS = {"conv": 8, "fc": 5}  # Han et al. 2016, Sec. 3: 8 bits for conv layers, 5 for fully connected
DEFAULT_INDEX_BITS = {"conv": 8, "fc": 5}  # Sec. 2: relative indices of 8 bits for conv, 5 for fc
MAX_BITS = 12
LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


def linear_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` centroids evenly spaced over ``[min, max]`` of ``values`` (float64); the paper's linear initialisation."""
    x = values.detach().double().flatten()
    if x.numel() == 0:
        return torch.zeros(k, dtype=torch.float64)
    return torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)


def kmeans_1d(values: torch.Tensor, k: int, *, max_iter: int = 300,
              init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars: ``(centroids float64 (k,), labels int64)``.

    Starts from ``init`` (default :func:`linear_init`), assigns every value to its nearest centroid
    (a tie to the lower centroid), moves each centroid to the mean of its values (an empty cluster
    keeps its centroid) and stops when no assignment changes or after ``max_iter`` updates.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    x = values.detach().double().flatten()
    centroids = linear_init(x, k) if init is None else init.detach().double().clone()
    if centroids.shape != (k,):
        raise ValueError(f"init must hold k={k} centroids, got shape {tuple(centroids.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("k-means needs finite values; the weights hold NaN or Inf")
    labels = _nearest(x, centroids)
    for _ in range(max_iter):
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new = _nearest(x, centroids)
        if torch.equal(new, labels):
            break
        labels = new
    return centroids, labels


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value (ties to the lower centroid value)."""
    order = torch.argsort(centroids, stable=True)
    ordered = centroids[order]
    midpoints = (ordered[1:] + ordered[:-1]) / 2
    return order[torch.searchsorted(midpoints, x, side="left")]


class SharedWeight(nn.Module):
    """Parametrization ``weight = codebook[cluster]`` at kept positions, exactly 0 elsewhere.

    Its one original tensor is the codebook (``module.parametrizations.weight.original0``);
    ``cluster`` (int64) and ``kept`` (bool) are buffers shaped like the weight. Assigning a
    weight (``module.weight = w``) sets each centroid to the mean of ``w`` over its cluster.
    """

    def __init__(self, centroids: torch.Tensor, cluster: torch.Tensor, kept: torch.Tensor, *, bits: int,
                 index_bits: int):
        super().__init__()
        self.register_buffer("cluster", cluster)
        self.register_buffer("kept", kept)
        self.register_buffer("fallback", centroids.detach().double().clone())  # for clusters with no weight
        self.bits, self.index_bits = bits, index_bits

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return torch.where(self.kept, codebook[self.cluster], codebook.new_zeros(()))

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        k = self.fallback.numel()
        labels, values = self.cluster[self.kept], weight[self.kept].double()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, values)
        counts = torch.bincount(labels, minlength=k)
        return (torch.where(counts > 0, sums / counts.clamp(min=1), self.fallback).to(weight.dtype),)


@dataclass(frozen=True)
class SharingPlan:
    """One shared layer: its weight's name, widths, cluster count and entries (kept weights + fillers)."""

    name: str
    bits: int
    index_bits: int
    clusters: int
    kept: int
    entries: int

    @property
    def fillers(self) -> int:
        return self.entries - self.kept


def kept_positions(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The kept positions of ``module.weight`` (bool): its mask if it has one, else its non-zero bit patterns."""
    mask = module._buffers.get("weight" + MASK_SUFFIX)
    if isinstance(mask, torch.Tensor):
        return mask.to(torch.bool)
    w = (module.weight if weight is None else weight).detach()
    return w.contiguous().view(torch.int32) != 0


def _kind(module: nn.Module) -> str:
    return "fc" if isinstance(module, nn.Linear) else "conv"


def _per_layer(value, what: str, modules: Mapping[str, nn.Module], defaults: Mapping[str, int],
               low: int, high: int) -> dict[str, int]:
    """``{module name: width}`` from an int, ``None`` (the per-type defaults) or ``{name or "conv"/"fc": int}``."""
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ValueError(f"{what}{where} must be an int in [{low}, {high}], got {v!r}")
        return v

    if value is None or isinstance(value, int):
        base = {kind: check(value, "") for kind in defaults} if value is not None else dict(defaults)
        return {name: base[_kind(m)] for name, m in modules.items()}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be an int, None or a dict {{layer name or 'conv'/'fc': int}}, "
                        f"got {type(value).__name__}")
    unknown = [key for key in value if key not in modules and key not in defaults]
    if unknown:
        raise ValueError(f"{what} names {unknown[0]!r}, which is no shared layer; valid: 'conv', 'fc', "
                         + ", ".join(map(repr, modules)))
    out = {}
    for name, m in modules.items():
        key = name if name in value else _kind(m)
        out[name] = check(value[key], f"[{key!r}]") if key in value else defaults[_kind(m)]
    return out


def _select(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    candidates = {name: m for name, m in model.named_modules()
                  if isinstance(m, LAYER_TYPES) and (isinstance(m._parameters.get("weight"), nn.Parameter)
                                                     or parametrize.is_parametrized(m, "weight"))}
    if layers is None:
        chosen = candidates
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in names if n not in candidates]
        if unknown:
            raise ValueError(f"layers names {unknown[0]!r}, which is no Linear/Conv layer with a weight; valid: "
                             + ", ".join(map(repr, candidates)))
        chosen = {n: candidates[n] for n in names}
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to share weights in")
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.endswith(".weight") and name[: -len(".weight")] in chosen:
            if id(p) in seen:
                raise ValueError(f"{seen[id(p)]!r} and {name!r} are one tied weight; weight sharing needs untied "
                                 "weights (exclude one of them with layers=[...])")
            seen[id(p)] = name
    shared = [n for n, m in chosen.items() if parametrize.is_parametrized(m, "weight")]
    if shared:
        raise ValueError(f"layer {shared[0]!r} is already parametrized; finalize_sharing(model) first")
    for name, m in chosen.items():
        if m.weight.dtype != torch.float32:
            raise ValueError(f"layer {name!r} has {m.weight.dtype} weights; weight sharing stores float32 "
                             "codebooks and needs float32 weights")
    return chosen


def share_weights(model: nn.Module, *, bits=None, index_bits=None, layers: Iterable[str] | None = None,
                  max_iter: int = 300) -> dict[str, SharingPlan]:
    """Cluster each layer's kept weights and make its weight ``codebook[cluster]`` (in place).

    ``bits`` / ``index_bits``: an int for every layer, ``None`` for the paper's widths (8 for
    convolutions, 5 for Linear layers) or ``{layer name or "conv"/"fc": int}``. ``layers``: module
    names (default: every ``nn.Linear`` and convolution). Returns ``{weight name: SharingPlan}``.
    Everything is checked before the first layer changes.
    """
    chosen = _select(model, layers)
    widths = _per_layer(bits, "bits", chosen, DEFAULT_BITS, 1, MAX_BITS)
    index_widths = _per_layer(index_bits, "index_bits", chosen, DEFAULT_INDEX_BITS, 1, 16)
    plans, parametrizations = {}, {}
    for name, module in chosen.items():
        kept = kept_positions(module)
        positions = torch.nonzero(kept.flatten()).flatten().numpy()
        entries = count_entries(positions, index_widths[name])
        k = (1 << widths[name]) - (entries > positions.size)  # a code for the fillers' zero if there are any
        if k < 1:
            raise ValueError(f"layer {name!r} needs a code for its padding fillers, so bits=1 leaves no cluster; "
                             "use bits >= 2 or a larger index_bits")
        centroids, labels = kmeans_1d(module.weight.detach()[kept], k, max_iter=max_iter)
        cluster = torch.zeros(kept.shape, dtype=torch.int64)
        cluster[kept] = labels
        parametrizations[name] = SharedWeight(centroids, cluster, kept.clone(), bits=widths[name],
                                              index_bits=index_widths[name])
        plans[f"{name}.weight" if name else "weight"] = SharingPlan(
            f"{name}.weight" if name else "weight", widths[name], index_widths[name], k, int(positions.size), entries)
    for name, module in chosen.items():
        parametrize.register_parametrization(module, "weight", parametrizations[name])
    return plans


def shared_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, SharedWeight]]:
    """``(module name, module, its SharedWeight)`` for every layer whose weight is shared."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, SharedWeight):
                    yield name, module, p


def codebooks(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{weight name: codebook parameter}`` of every shared layer (to give an optimizer only these)."""
    return {f"{name}.weight" if name else "weight": module.parametrizations.weight.original0
            for name, module, _ in shared_layers(model)}


def finalize_sharing(model: nn.Module) -> list[str]:
    """Write every shared layer's weight back as a plain parameter (``codebook[cluster]``, exact zeros
    elsewhere) and remove the parametrizations; mask buffers stay. Returns the module names."""
    done = []
    for name, module, _ in list(shared_layers(model)):
        with torch.no_grad():
            weight = module.weight.detach().clone()
        _remove(module)
        module.weight = nn.Parameter(weight)
        done.append(name)
    return done


def _remove(module: nn.Module) -> None:
    """Drop the weight's parametrization (the weight itself is set again by the caller)."""
    with torch.no_grad():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if "weight" in module._parameters:
        del module._parameters["weight"]
    elif "weight" in module.__dict__:
        del module.__dict__["weight"]


@contextlib.contextmanager
def weight_sharing(model: nn.Module, **kwargs) -> Iterator[dict[str, SharingPlan]]:
    """``with weight_sharing(model, bits=...) as plans:`` fine-tune inside; plain shared weights after
    (also when the block raises). ``kwargs`` go to :func:`share_weights`."""
    plans = share_weights(model, **kwargs)
    try:
        yield plans
    finally:
        finalize_sharing(model)


def fine_tune_shared(model: nn.Module, loader: Iterable, *, epochs: int = 1, lr: float = 1e-3,
                     momentum: float = 0.9, weight_decay: float = 0.0, loss_fn: Callable | None = None,
                     progress: bool | str = False) -> list[float]:
    """Fine-tune a model with shared weights by SGD with :func:`sparsenn.train.loop.train`.

    Trains the codebooks and every other parameter (biases, ...); returns the mean loss per epoch.
    """
    from ..train.loop import train

    if not any(True for _ in shared_layers(model)):
        raise ValueError(f"{type(model).__name__} has no shared weights; call share_weights(model) first")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return train(model, loader, opt, epochs=epochs, loss_fn=loss_fn, progress=progress)
