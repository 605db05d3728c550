"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017, "Variational Dropout
Sparsifies Deep Neural Networks", arXiv:1701.05369).

Every weight gets its own Gaussian dropout rate: ``w_ij ~ N(theta_ij, alpha_ij theta_ij^2)``,
parametrized additively by ``theta`` (:attr:`weight`) and ``log sigma^2``
(:attr:`log_sigma2`), so ``log alpha = log sigma^2 - log theta^2`` (clipped to
``[-10, 10]``). Training minimizes ``data loss + KL / N`` (N = training set size) with the
KL to the log-uniform prior approximated as in the paper (eq. 14):

    KL(alpha) ~= k1 - k1 * sigmoid(k2 + k3 log alpha) + 0.5 log(1 + 1/alpha),
    k1 = 0.63576, k2 = 1.87320, k3 = 1.48695

(the paper's ``-KL ~= k1 sigmoid(...) - 0.5 log1p(1/alpha) + C`` with ``C = -k1``, so the
KL is >= 0 and tends to 0 as alpha grows). In train mode a layer samples its
pre-activations by the local reparametrization trick (Kingma et al. 2015): mean
``x theta^T + b``, variance ``x^2 (alpha theta^2)^T``. In eval mode it is deterministic: the
weights with ``log alpha > threshold`` (default 3, i.e. alpha > ~20) are dropped.

Workflow: :func:`convert` swaps a model's ``nn.Linear``/``nn.Conv2d`` layers for
:class:`LinearSVDO`/:class:`Conv2dSVDO` (copying the weights), train with
``loss + kl_divergence(model) / N``, then :func:`prune` swaps them back for plain layers
whose dropped weights are exact zeros under masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ...core import checks as _checks
from ...core.masks import attach_mask, has_mask
from ...core.targets import Selector, select_parameters

Tensor = torch.Tensor

__all__ = ["Conv2dSVDO", "LinearSVDO", "convert", "kl_approximation", "kl_divergence", "prune",
           "svdo_layers", "svdo_sparsity"]

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -10.0, 10.0


def kl_approximation(log_alpha: Tensor) -> Tensor:
    """Element-wise ``KL(q(w | theta, alpha) || log-uniform prior)`` by Molchanov et al. 2017, eq. 14."""
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


def _check_threshold(threshold: object) -> float:
    return _checks.real("threshold", threshold, low=LOG_ALPHA_MIN, high=LOG_ALPHA_MAX)


class _SVDO(nn.Module):
    """Shared parts: log alpha, the KL, the local reparametrization; subclasses define :meth:`_op`."""

    weight: nn.Parameter  # theta
    log_sigma2: nn.Parameter

    def _init_variational(self, threshold: float, log_sigma2_init: float) -> None:
        self.threshold = _check_threshold(threshold)
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, _checks.real("log_sigma2_init", log_sigma2_init)))

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    @property
    def log_alpha(self) -> Tensor:
        """``log sigma^2 - log theta^2``, clipped to ``[-10, 10]``."""
        log_alpha = self.log_sigma2 - torch.log(self.weight * self.weight + 1e-8)
        return log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def keep_mask(self, threshold: float | None = None) -> Tensor:
        """``log alpha <= threshold`` (the layer's own threshold by default)."""
        return self.log_alpha.detach() <= (self.threshold if threshold is None else _check_threshold(threshold))

    def kl(self) -> Tensor:
        """The layer's KL term (a differentiable scalar)."""
        return kl_approximation(self.log_alpha).sum()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self._op(x, self.weight * self.keep_mask(), self.bias)
        mean = self._op(x, self.weight, self.bias)
        var = self._op(x * x, self.log_alpha.exp() * self.weight * self.weight, None)
        return mean + (var + 1e-8).sqrt() * torch.randn_like(mean)

    def _geometry(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self._geometry()}, threshold={self.threshold:g}"


class LinearSVDO(_SVDO):
    """``nn.Linear`` with sparse variational dropout; :attr:`weight` is theta, ``(out, in)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 3.0,
                 log_sigma2_init: float = -10.0, device=None, dtype=None):
        super().__init__()
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = ref.weight, ref.bias
        self._init_variational(threshold, log_sigma2_init)

    @classmethod
    def from_dense(cls, layer: nn.Linear, **kwargs) -> "LinearSVDO":
        """A copy of ``layer``'s weight and bias as theta; ``kwargs`` as the constructor's."""
        new = cls(layer.in_features, layer.out_features, layer.bias is not None,
                  device=layer.weight.device, dtype=layer.weight.dtype, **kwargs)
        _copy_weights(layer, new)
        return new

    def to_dense(self, threshold: float | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dropped weights zeroed and masked."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        return _finish_dense(self, dense, threshold)

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _geometry(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Conv2dSVDO(_SVDO):
    """``nn.Conv2d`` (zero padding) with sparse variational dropout; :attr:`weight` is theta."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, threshold: float = 3.0, log_sigma2_init: float = -10.0,
                 device=None, dtype=None):
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                        device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = ref.kernel_size, ref.stride, ref.dilation
        self.padding = ref.padding if isinstance(ref.padding, str) else _pair(ref.padding)
        self.weight, self.bias = ref.weight, ref.bias
        self._init_variational(threshold, log_sigma2_init)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, **kwargs) -> "Conv2dSVDO":
        """A copy of ``layer``'s weight, bias and geometry; ``kwargs`` as the constructor's."""
        if layer.padding_mode != "zeros":
            raise ValueError(f"Conv2dSVDO supports padding_mode='zeros' only, got {layer.padding_mode!r}")
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, device=layer.weight.device,
                  dtype=layer.weight.dtype, **kwargs)
        _copy_weights(layer, new)
        return new

    def to_dense(self, threshold: float | None = None) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the dropped weights zeroed and masked."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        return _finish_dense(self, dense, threshold)

    def _op(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _geometry(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")


@torch.no_grad()
def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    dst.weight.copy_(src.weight)
    if src.bias is not None:
        dst.bias.copy_(src.bias)


@torch.no_grad()
def _finish_dense(svdo: _SVDO, dense: nn.Module, threshold: float | None) -> nn.Module:
    keep = svdo.keep_mask(threshold)
    _copy_weights(svdo, dense)
    attach_mask(dense, "weight", keep)  # writes the exact zeros
    return dense.train(svdo.training)


_DENSE_TO_SVDO = {nn.Linear: LinearSVDO, nn.Conv2d: Conv2dSVDO}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def convert(model: nn.Module, include: Selector = None, exclude: Selector = None, *, threshold: float = 3.0,
            log_sigma2_init: float = -10.0) -> nn.Module:
    """Replace the selected ``nn.Linear``/``nn.Conv2d`` layers of ``model`` (in place) by SVDO
    layers with the same weights; returns ``model``.

    ``include``/``exclude`` as in :func:`sparsenn.core.targets.select_parameters` (default: every
    Linear and Conv2d). Everything is checked first: a selected layer of another type, or
    one that carries a mask, is an error that leaves the model unchanged.
    """
    _check_threshold(threshold)
    _checks.real("log_sigma2_init", log_sigma2_init)
    names = select_parameters(model, (nn.Linear, nn.Conv2d) if include is None else include, exclude)
    layers = {}
    for pname in names:
        module_name, _, attr = pname.rpartition(".")
        module = model.get_submodule(module_name)
        if attr != "weight" or type(module) not in _DENSE_TO_SVDO:
            raise ValueError(f"sparse variational dropout replaces nn.Linear and nn.Conv2d weights; {pname!r} "
                             f"belongs to {type(module).__name__} (exclude it)")
        if has_mask(module, "weight"):
            raise ValueError(f"{module_name!r} has a mask; sparse variational dropout learns its own sparsity "
                             "(remove the masks first: sn.remove_masks)")
        layers[module_name] = module
    for module_name, module in layers.items():
        new = _DENSE_TO_SVDO[type(module)].from_dense(module, threshold=threshold, log_sigma2_init=log_sigma2_init)
        _replace(model, module_name, new.train(module.training))
    return model


def svdo_layers(model: nn.Module) -> list[tuple[str, _SVDO]]:
    """``(name, layer)`` of every sparse variational dropout layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _SVDO)]


def _layers_or_error(model: nn.Module) -> list[tuple[str, _SVDO]]:
    layers = svdo_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no sparse variational dropout layer; "
                         "call sparsenn.create.regularize.variational.convert(model) first")
    return layers


def kl_divergence(model: nn.Module) -> Tensor:
    """The sum of the KL terms of every SVDO layer (divide by the training set size in the loss)."""
    return sum(layer.kl() for _, layer in _layers_or_error(model))


@torch.no_grad()
def svdo_sparsity(model: nn.Module, threshold: float | None = None) -> float:
    """The fraction of SVDO weights that :func:`prune` would drop at ``threshold``."""
    layers = _layers_or_error(model)
    dropped = sum(int((~layer.keep_mask(threshold)).sum()) for _, layer in layers)
    return dropped / sum(layer.weight.numel() for _, layer in layers)


def prune(model: nn.Module, threshold: float | None = None) -> nn.Module:
    """Replace every SVDO layer by a plain layer (in place) whose weights with
    ``log alpha > threshold`` are exact zeros under a mask; returns ``model``.

    ``threshold`` in ``[-10, 10]`` (the clipping range of log alpha); ``None`` uses each
    layer's own (3 by default, the paper's choice).
    """
    if threshold is not None:
        _check_threshold(threshold)
    for name, layer in _layers_or_error(model):
        _replace(model, name, layer.to_dense(threshold))
    return model
