"""Attention of one query token over a KV cache, in one compiled call (decoding at batch 1).

Decoding, each block's attention is ``softmax(q K^T * scale) V`` for one query row per
head over the ``L`` cached keys (Vaswani et al. 2017), grouped-query heads sharing a key/value
head (Ainslie et al. 2023, "GQA"). :func:`decode_attention` is one serial call: per key/value
head, each cached key row is read once for all of its query heads, then each value row once.
Alone it takes about what ``F.scaled_dot_product_attention`` takes (11-23 us at 64-192 cached
tokens, 9 heads over 3 of width 64); in a decoding step, where it replaces transformers' SDPA
wrapper, PyTorch's dispatch and a parallel region, SmolLM2-135M decoded about 1.2 ms per token
faster (``bench/decode_ops.py``). Sums may be reassociated (vectorized) and ``exp`` is computed in
16-lane vectors (:func:`._activations.vexp_shift`, about 15% faster than the scalar one at 64-192 cached
tokens), so results match PyTorch to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np

from ._activations import vexp_shift
from ._simd import LANES

_FLAGS = {"reassoc", "contract"}  # vectorized sums; no assumptions about NaN or infinity


def _decode_attention_body(q, keys, values, length, scale, out):  # pragma: no cover  (compiled)
    """``out[h] = softmax(q[h] . keys[g, :length]^T * scale) @ values[g, :length]`` with ``g = h // (H / G)``.

    ``q``, ``out``: ``(H, D)``; ``keys``, ``values``: ``(G, capacity, D)`` with ``1 <= length <= capacity``
    (rows past ``length`` are never read); ``H`` a multiple of ``G``."""
    heads, d = q.shape
    groups = keys.shape[0]
    per = heads // groups
    sc = np.float32(scale)
    width = (length + LANES - 1) // LANES * LANES  # each row of scores padded to whole vectors
    scores = np.empty(per * width, dtype=np.float32)
    acc = np.empty((per, d), dtype=np.float32)
    for g in range(groups):
        h0 = g * per
        for j in range(length):
            for r in range(per):
                s = np.float32(0.0)
                for t in range(d):
                    s += q[h0 + r, t] * keys[g, j, t]
                scores[r * width + j] = s * sc
        for r in range(per):
            o = r * width
            top = scores[o]
            for j in range(1, length):
                top = max(top, scores[o + j])
            for j in range(length, width):
                scores[o + j] = -np.inf
            for c in range(0, width, LANES):
                vexp_shift(scores, o + c, top)
            total = np.float32(0.0)
            for j in range(length):
                total += scores[o + j]
            inv = np.float32(1.0) / total
            for j in range(length):
                scores[o + j] *= inv
        acc[:] = 0.0
        for j in range(length):
            for r in range(per):
                p = scores[r * width + j]
                for t in range(d):
                    acc[r, t] += p * values[g, j, t]
        for r in range(per):
            for t in range(d):
                out[h0 + r, t] = acc[r, t]


decode_attention = numba.njit(fastmath=_FLAGS, cache=True, nogil=True)(_decode_attention_body)

__all__ = ["decode_attention"]
