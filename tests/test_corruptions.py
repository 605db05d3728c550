"""Common corruptions: shape and range kept, distortion growing with severity, determinism given a
generator, the filters against scipy, the closed forms, and clear errors."""

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from sparsenn.core.registry import UnknownNameError
from sparsenn.robust import SEVERITIES, corrupt, list_corruptions

NAMES = list_corruptions()
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"}


def _rectangles(n=48, size=28, seed=0):
    """Piecewise-constant images in [0, 1] (garment-like silhouettes: a few overlapping rectangles)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(3):
            r0, r1 = sorted(torch.randint(0, size, (2,), generator=g).tolist())
            c0, c1 = sorted(torch.randint(0, size, (2,), generator=g).tolist())
            x[i, :, r0:r1 + 1, c0:c1 + 1] = torch.rand(1, generator=g)
    return x


def test_the_registry_holds_the_documented_corruptions():
    assert NAMES == sorted(["brightness", "contrast", "defocus_blur", "gaussian_blur", "gaussian_noise",
                            "impulse_noise", "pixelate", "shot_noise", "speckle_noise"])


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_range_are_kept(name):
    x = _rectangles(6)
    x[0] = 1.0  # extremes: noise and brightness push outside [0, 1] before clipping
    x[1] = 0.0
    rgb = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s in SEVERITIES:
        for img in (x, rgb):
            out = corrupt(img, name, s, generator=torch.Generator().manual_seed(s))
            assert out.shape == img.shape and out.dtype == img.dtype
            assert out.min() >= 0.0 and out.max() <= 1.0 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_severity_increases_the_distortion_monotonically(name):
    x = _rectangles()
    dist = [float((corrupt(x, name, s, generator=torch.Generator().manual_seed(0)) - x).pow(2).mean().sqrt())
            for s in SEVERITIES]
    assert all(a < b for a, b in itertools.pairwise(dist)), dist
    assert dist[0] > 0


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_corruptions_are_deterministic_given_a_generator(name):
    x = _rectangles(4)
    a = corrupt(x, name, 3, generator=torch.Generator().manual_seed(5))
    b = corrupt(x, name, 3, generator=torch.Generator().manual_seed(5))
    c = corrupt(x, name, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("severity,sigma", [(1, 0.4), (5, 1.0)])
def test_gaussian_blur_equals_scipys_filter(severity, sigma):
    x = torch.rand(2, 3, 17, 21, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = np.stack([[ndimage.gaussian_filter(c, sigma, mode="nearest", truncate=4.0) for c in img] for img in x.numpy()])
    assert np.allclose(corrupt(x, "gaussian_blur", severity).numpy(), ref, atol=1e-12)


def test_defocus_blur_is_a_normalized_disk_filter():
    x = torch.rand(1, 1, 15, 15, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = torch.full((2, 3, 9, 9), 0.37, dtype=torch.float64)
    for s in SEVERITIES:  # weights sum to 1: a constant image is unchanged
        assert torch.allclose(corrupt(flat, "defocus_blur", s), flat)
    # severity 5: radius 1.5 covers the 3x3 neighbourhood; alias blur 0.1 leaves it a 3x3 mean
    ref = ndimage.uniform_filter(x[0, 0].numpy(), size=3, mode="nearest")
    assert np.allclose(corrupt(x, "defocus_blur", 5)[0, 0].numpy(), ref, atol=1e-6)


def test_contrast_and_brightness_closed_forms():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(corrupt(x, "contrast", 5), (x - m) * 0.15 + m)
    assert torch.allclose(corrupt(x, "brightness", 5), (x + 0.3).clamp(max=1.0))  # grey: V = x
    rgb = torch.tensor([0.2, 0.4, 0.0]).view(1, 3, 1, 1)  # HSV: V = 0.4, hue and saturation kept
    assert torch.allclose(corrupt(rgb, "brightness", 2), rgb * (0.5 / 0.4))
    assert torch.equal(corrupt(torch.zeros(1, 3, 2, 2), "brightness", 1), torch.full((1, 3, 2, 2), 0.05))


def test_impulse_noise_replaces_about_the_stated_fraction_with_zeros_and_ones():
    x = torch.full((4, 1, 64, 64), 0.5)
    out = corrupt(x, "impulse_noise", 5, generator=torch.Generator().manual_seed(0))
    hit = out != 0.5
    assert set(out[hit].unique().tolist()) == {0.0, 1.0}
    assert abs(hit.float().mean().item() - 0.07) < 0.01


def test_pixelate_keeps_constant_images_and_averages_blocks():
    flat = torch.full((1, 1, 28, 28), 0.25)
    assert torch.allclose(corrupt(flat, "pixelate", 5), flat)
    x = _rectangles(2)
    assert abs(corrupt(x, "pixelate", 3).mean().item() - x.mean().item()) < 0.01


def test_errors_name_the_bad_value_and_the_valid_choices():
    x = _rectangles(1)
    with pytest.raises(UnknownNameError, match="unknown corruption 'fog'; valid corruptions: brightness, contrast"):
        corrupt(x, "fog")
    for bad in (0, 6, True, 2.0):
        with pytest.raises(ValueError, match="severity must be one of 1, 2, 3, 4, 5"):
            corrupt(x, "contrast", bad)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corrupt(x[0], "contrast", 1)
    with pytest.raises(ValueError, match=r"images in \[0, 1\]"):
        corrupt(x * 255, "contrast", 1)
