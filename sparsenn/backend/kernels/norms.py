"""RMSNorm of a few rows in one compiled call (decoding: one row per token).

``F.rms_norm`` on a CPU float32 row of a few hundred values runs as six tensor operations
(square, mean, add, rsqrt, two multiplies): about 10 us of dispatch for well under 1 us of
arithmetic, and a LLaMA-style decoder normalizes twice per block and token (Zhang &
Sennrich 2019, "Root Mean Square Layer Normalization"). :func:`rms_norm_rows` does it in
one serial loop per row, the sum of squares accumulated in float64.
"""

from __future__ import annotations

import numpy as np

from ._jit import jit


@jit(parallel=False)
def rms_norm_rows(x, weight, eps, out):  # pragma: no cover  (compiled)
    """``out[..., :] = x[..., :] / sqrt(mean(x[..., :]^2) + eps) * weight`` for each row of the C-contiguous
    ``x`` (any number of dimensions, the last one ``weight``'s length); ``out`` has ``x``'s shape."""
    d = weight.shape[0]
    flat, res = x.reshape(-1), out.reshape(-1)
    for i in range(flat.shape[0] // d):
        s = 0.0
        for j in range(i * d, i * d + d):
            v = np.float64(flat[j])
            s += v * v
        r = np.float32(1.0 / np.sqrt(s / d + eps))
        for j in range(d):
            res[i * d + j] = flat[i * d + j] * r * weight[j]


__all__ = ["rms_norm_rows"]
