"""Common corruptions of images at five severities, on ``(N, C, H, W)`` tensors in [0, 1].

After Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (arXiv:1903.12261), with the parameters of their CIFAR-10-C code (32x32 images; MNIST
and Fashion-MNIST are 28x28), written with torch operations instead of scikit-image / OpenCV / PIL:

* noise: ``gaussian_noise``, ``shot_noise`` (Poisson), ``impulse_noise`` (salt and pepper),
  ``speckle_noise`` (multiplicative);
* blur: ``gaussian_blur``, ``defocus_blur`` (an aliased disk);
* digital: ``contrast``, ``brightness`` (HSV value + c), ``pixelate`` (box down, box up).

Left out: those that need image assets or an external library (frost, fog, snow, motion and zoom blur,
elastic, JPEG) and colour-only ones (saturate). Random corruptions draw from ``generator`` only, so the
same generator state gives the same images. Every output has the input's shape and lies in [0, 1].
Look corruptions up by name with :func:`corrupt`; an unknown name lists the valid ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.registry import Registry

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "list_corruptions"]

SEVERITIES = (1, 2, 3, 4, 5)

Corruption = Callable[[torch.Tensor, int, "torch.Generator | None"], torch.Tensor]
CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def corrupt(x: torch.Tensor, name: str, severity: int = 1, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (``(N, C, H, W)`` in [0, 1]) under corruption ``name`` at ``severity`` 1 (mild) to 5 (strong)."""
    fn = CORRUPTIONS.get(name)
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(map(str, SEVERITIES))}; got {severity!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        what = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"corruptions take a floating-point batch of images (N, C, H, W), got {what}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(f"corruptions take images in [0, 1], got values in [{float(x.min()):g}, {float(x.max()):g}]")
    return fn(x.detach(), severity, generator).clamp(0.0, 1.0).to(x.dtype)


def list_corruptions() -> list[str]:
    return CORRUPTIONS.names()


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)


# ----------------------------------------------------------------------------- noise


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x, severity, generator=None):
    """``x + N(0, c^2)``, ``c`` in 0.04 .. 0.10."""
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return x + c * _randn(x, generator)


@CORRUPTIONS.register("shot_noise")
def shot_noise(x, severity, generator=None):
    """Photon noise: ``Poisson(c x) / c``, ``c`` from 500 down to 50 photons at full intensity."""
    c = (500, 250, 100, 75, 50)[severity - 1]
    return torch.poisson((x * c).cpu().double(), generator=generator).to(x.device, x.dtype) / c


@CORRUPTIONS.register("impulse_noise")
def impulse_noise(x, severity, generator=None):
    """Salt and pepper: a fraction ``c`` (0.01 .. 0.07) of the values set to 0 or 1, half each."""
    c = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    hit, salt = _rand(x, generator) < c, _rand(x, generator) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


@CORRUPTIONS.register("speckle_noise")
def speckle_noise(x, severity, generator=None):
    """Multiplicative noise: ``x + x N(0, c^2)``, ``c`` in 0.06 .. 0.20."""
    c = (0.06, 0.10, 0.12, 0.16, 0.20)[severity - 1]
    return x + x * c * _randn(x, generator)


# ----------------------------------------------------------------------------- blur


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with the odd ``(k, k)`` ``kernel``, borders replicated."""
    k = kernel.shape[-1]
    c = x.shape[1]
    weight = kernel.to(x.dtype).to(x.device).expand(c, 1, k, k)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="replicate"), weight, groups=c)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """The normalized 2-D Gaussian, radius ``int(truncate * sigma + 0.5)`` (scipy's and scikit-image's)."""
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-t**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


@CORRUPTIONS.register("gaussian_blur")
def gaussian_blur(x, severity, generator=None):
    """A Gaussian filter of standard deviation 0.4 .. 1.0 pixels."""
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    return _filter(x, _gaussian_kernel(sigma))


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """Hendrycks & Dietterich's defocus kernel: the disk ``X^2 + Y^2 <= radius^2`` (normalized), smoothed by a
    3x3 Gaussian of standard deviation ``alias_blur`` (anti-aliasing), cropped to its support."""
    r = max(1, math.ceil(radius)) + 1
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) ** 2 / (2 * alias_blur**2))
    g = (g / g.sum())
    smoothed = F.conv2d(disk[None, None], (g[:, None] * g[None, :])[None, None], padding=1)[0, 0]
    return smoothed / smoothed.sum()


@CORRUPTIONS.register("defocus_blur")
def defocus_blur(x, severity, generator=None):
    """An aliased disk of radius 0.3 .. 1.5 pixels."""
    radius, alias_blur = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[severity - 1]
    return _filter(x, _disk(radius, alias_blur))


# ----------------------------------------------------------------------------- digital


@CORRUPTIONS.register("contrast")
def contrast(x, severity, generator=None):
    """Each image pulled toward its mean: ``(x - m) c + m``, ``c`` from 0.75 down to 0.15."""
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


@CORRUPTIONS.register("brightness")
def brightness(x, severity, generator=None):
    """HSV value raised by ``c`` (0.05 .. 0.30), hue and saturation kept: every channel scaled by
    ``min(V + c, 1) / V`` with ``V`` the largest channel (a grey image: ``min(x + c, 1)``)."""
    c = (0.05, 0.10, 0.15, 0.20, 0.30)[severity - 1]
    value = x.amax(dim=1, keepdim=True)
    new = (value + c).clamp(max=1.0)
    scaled = x * (new / value.clamp_min(1e-12))
    return torch.where(value > 0, scaled, new.expand_as(x))  # black: no hue, no saturation: grey of value c


@CORRUPTIONS.register("pixelate")
def pixelate(x, severity, generator=None):
    """Shrunk to ``c`` (0.95 .. 0.65) of the size and enlarged back, both by averaging over pixel bins
    (torch's ``area`` mode, adaptive average pooling). Hendrycks & Dietterich use PIL's ``BOX`` filter both
    ways (nearest neighbour on the way up), whose distance to the original is not monotone in the severity
    on Fashion-MNIST; with bins it is, on natural and piecewise-constant images (not on every image: white
    noise and some smooth textures alias differently at each non-integer factor)."""
    c = (0.95, 0.90, 0.85, 0.75, 0.65)[severity - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="area")
