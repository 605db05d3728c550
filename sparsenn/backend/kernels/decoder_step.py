"""The elementwise steps of one LLaMA-style decoder block at batch 1, one token, each one compiled call.

Decoding a token, a block's products are tens of microseconds and everything between them
(RMSNorm, the rotary embedding of q and k, the KV cache append, attention, the residual
adds, SiLU and the gate multiply) is about 30 PyTorch operations and module calls of a few
microseconds each. :class:`sparsenn.backend.runtime.decoder_layer.FusedDecoderLayer` runs the
block as nine calls: four products and these five kernels (with :func:`.norms.rms_norm_rows`).

- :func:`rotate_append_attend`: the rotary embedding (Su et al. 2021, "RoFormer") of the new
  token's query and key heads, the key and value written into the cache buffers at row
  ``length``, then :func:`.attention.decode_attention` over the ``length + 1`` cached rows.
- :func:`residual_rms_norm`: ``r = x + a`` and ``h = RMSNorm(r)`` (Zhang & Sennrich 2019) by
  :func:`.norms.rms_norm_rows`.
- :func:`silu_mul`: ``silu(g) * u`` of a stacked gate/up output (Shazeer 2020, "GLU Variants").
- :func:`add`: the last residual add.

All are serial (a row of a few hundred values does not pay for a parallel region) and
take C-contiguous float32 arrays; results match the PyTorch operations to float32 rounding.
"""

from __future__ import annotations

import numpy as np

from ._activations import vsilu_mul
from ._jit import jit
from ._simd import LANES
from .attention import decode_attention
from .norms import rms_norm_rows


@jit(parallel=False)
def rotate_append_attend(qkv, q_off, k_off, v_off, cos, sin, keys, values, length, scale, q,
                         out):  # pragma: no cover  (compiled)
    """Rotate the query heads ``qkv[q_off:q_off + H*D]`` into ``q (H, D)`` and the key heads
    ``qkv[k_off:k_off + G*D]`` into ``keys[0, g, length]``, copy the value heads
    ``qkv[v_off:v_off + G*D]`` into ``values[0, g, length]``, then ``out (H, D)`` = attention of ``q``
    over rows ``0..length`` of ``keys``/``values`` (``(1, G, capacity, D)``, ``length < capacity``).

    The rotation is transformers' ``x * cos + rotate_half(x) * sin`` with ``cos``, ``sin`` of width
    ``D``: ``rotate_half(x) = (-x[D/2:], x[:D/2])``."""
    heads, d = q.shape
    groups = keys.shape[1]
    half = d // 2
    for h in range(heads + groups):
        s = q_off + h * d if h < heads else k_off + (h - heads) * d
        for t in range(half):
            a = qkv[s + t]
            b = qkv[s + half + t]
            lo = a * cos[t] - b * sin[t]
            hi = b * cos[half + t] + a * sin[half + t]
            if h < heads:
                q[h, t] = lo
                q[h, half + t] = hi
            else:
                keys[0, h - heads, length, t] = lo
                keys[0, h - heads, length, half + t] = hi
    for g in range(groups):
        for t in range(d):
            values[0, g, length, t] = qkv[v_off + g * d + t]
    decode_attention(q, keys[0], values[0], length + 1, scale, out)


@jit(parallel=False)
def residual_rms_norm(x, a, weight, eps, r, h):  # pragma: no cover  (compiled)
    """``r = x + a``; ``h = r / sqrt(mean(r^2) + eps) * weight`` (one row of ``weight``'s length; ``x``
    C-contiguous of any shape)."""
    x = x.reshape(-1)
    for j in range(weight.shape[0]):
        r[j] = x[j] + a[j]
    rms_norm_rows(r, weight, eps, h)


@jit(parallel=False)
def silu_mul(gu, g_off, u_off, out):  # pragma: no cover  (compiled)
    """``out[j] = silu(gu[g_off + j]) * gu[u_off + j]``, ``silu(g) = g * sigmoid(g)``: whole vectors of 16 with
    :func:`._activations.vsilu_mul` (a vector ``exp``), the rest as ``g / (1 + exp(-g))``."""
    n = out.shape[0]
    full = n - n % LANES
    for j in range(0, full, LANES):
        vsilu_mul(out, j, gu, g_off + j, u_off + j)
    one = np.float32(1.0)
    for j in range(full, n):
        g = gu[g_off + j]
        out[j] = g / (one + np.exp(-g)) * gu[u_off + j]


@jit(parallel=False)
def add(a, b, out):  # pragma: no cover  (compiled)
    """``out = a + b`` (one row; ``out`` C-contiguous of any shape, ``a.size`` elements)."""
    o = out.reshape(-1)
    for j in range(o.shape[0]):
        o[j] = a[j] + b[j]


__all__ = ["add", "residual_rms_norm", "rotate_append_attend", "silu_mul"]
