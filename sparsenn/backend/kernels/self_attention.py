"""Self-attention of every query at once (encoders), straight from the stacked q/k/v product.

``softmax(Q K^T * scale + mask) V`` per (sequence, head) (Vaswani et al. 2017), where ``Q``,
``K`` and ``V`` are column ranges of one ``(B, S, W)`` product (:mod:`..runtime.siblings`): no
copies of q, k or v and no transposes in PyTorch. One parallel job per (sequence, head):

- the head's keys are transposed once into ``K^T (D, S')`` (``S'`` = ``S`` rounded up to 16;
  16 x 16 blocks in registers, :func:`._simd.vtranspose_store`);
- scores for ``R`` query rows at a time: for each of the ``D`` dimensions, ``R`` query values
  are broadcast and multiplied into ``R x 4`` vectors of 16 keys, so one key load feeds ``R``
  multiply-adds (PyTorch's CPU flash attention reached about 80 GMAC/s on two cores at
  BERT-base's shapes; a product that loads once per multiply-add is bound near that);
- each row: ``* scale + mask``, its maximum, ``exp(s - max)`` in 16-lane vectors (Cephes' ``exp``,
  :func:`._activations.vexp_shift`) and the sum;
- ``P V`` the same way round: each value row (``D`` floats, read in place from the product)
  feeds ``R`` rows' accumulators; each output row is scaled by ``1 / sum`` as it is stored.

Rounding differs from PyTorch's kernels (another order of the sums, another ``exp``): results
agree to float32 rounding (tested against ``F.scaled_dot_product_attention``). A row whose
every key is masked (``-inf``) has no defined softmax; :func:`attend` then reports it and writes
nothing for it, and the caller runs PyTorch's attention instead.
"""

from __future__ import annotations

import numpy as np
from numba import carray, prange, types
from numba.extending import intrinsic

from ._activations import _fn, vexp_shift
from ._jit import jit, sync_threads
from ._simd import LANES, _check_f32, _vec_ptr, splat, stack_alloc, vadd, vfma, vsum, vtranspose_store, vzero

CHUNK = 4  # key vectors per score block (64 keys)
_NEG_INF = np.float32(-np.inf)


@intrinsic
def vmax_into(typingctx, acc, aoff, src, soff):
    """``acc[aoff:aoff+16] = max(acc[aoff:aoff+16], src[soff:soff+16])`` lane by lane."""
    if not _check_f32(acc, src):
        return None
    sig = types.void(acc, types.intp, src, types.intp)

    def codegen(context, builder, sig, args):
        pa = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        ps = _vec_ptr(context, builder, sig.args[2], args[2], args[3])
        builder.store(builder.call(_fn(builder, "llvm.maxnum.v16f32", 2), [builder.load(pa, align=4), builder.load(ps, align=4)]), pa,
                      align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vstore_scaled(typingctx, dst, doff, src, soff, s):
    """``dst[doff:doff+16] = src[soff:soff+16] * s``."""
    if not _check_f32(dst, src):
        return None
    sig = types.void(dst, types.intp, src, types.intp, types.float32)

    def codegen(context, builder, sig, args):
        pd = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        ps = _vec_ptr(context, builder, sig.args[2], args[2], args[3])
        builder.store(builder.fmul(builder.load(ps, align=4), splat(builder, args[4])), pd, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _make(c: int):
    """The kernel for heads of ``D = 16 c`` dimensions."""
    D = c * LANES
    R = 4 if c <= 4 else 2  # query rows per block: R x max(CHUNK, c) accumulators (at most 16 vectors)
    ACC = R * max(CHUNK, c) * LANES

    @jit
    def attend(qkv, qo, ko, vo, heads, scale, mask, has_mask, out, zeros):
        nb, s, w = qkv.shape
        sp = (s + LANES - 1) // LANES * LANES
        mb, mh, mi, _ = mask.shape
        xf = qkv.reshape(-1)
        mf = mask.reshape(-1)
        of = out.reshape(-1)
        ow = out.shape[2]
        masked = 0
        for job in prange(nb * heads):
            b, h = job // heads, job % heads
            kt = np.empty(D * sp, dtype=np.float32)
            p = np.empty(R * sp, dtype=np.float32)
            acc = carray(stack_alloc(ACC), (ACC,))
            top = carray(stack_alloc(LANES), (LANES,))
            inv = carray(stack_alloc(LANES), (LANES,))
            row0 = b * s
            # K^T: kt[d * sp + k] = key k, dimension d; padded keys are 0
            k0 = 0
            while k0 + LANES <= s:
                for d0 in range(0, D, LANES):
                    vtranspose_store(xf, (row0 + k0) * w + ko + h * D + d0, w, kt, d0 * sp + k0, sp, zeros, 0)
                k0 += LANES
            for d in range(D):
                for k in range(k0, sp):
                    kt[d * sp + k] = xf[(row0 + k) * w + ko + h * D + d] if k < s else np.float32(0.0)
            for i0 in range(0, s, R):
                # scores of rows i0 .. i0+R-1, times scale (rows past s repeat row s-1 and are never written)
                kb = 0
                while kb + CHUNK * LANES <= sp:
                    for q in range(R * CHUNK):
                        vzero(acc, q * LANES)
                    for d in range(D):
                        for r in range(R):
                            qv = xf[(row0 + min(i0 + r, s - 1)) * w + qo + h * D + d]
                            for cc in range(CHUNK):
                                vfma(acc, (r * CHUNK + cc) * LANES, qv, kt, d * sp + kb + cc * LANES)
                    for r in range(R):
                        for cc in range(CHUNK):
                            vstore_scaled(p, r * sp + kb + cc * LANES, acc, (r * CHUNK + cc) * LANES, scale)
                    kb += CHUNK * LANES
                while kb < sp:
                    for r in range(R):
                        vzero(acc, r * LANES)
                    for d in range(D):
                        for r in range(R):
                            qv = xf[(row0 + min(i0 + r, s - 1)) * w + qo + h * D + d]
                            vfma(acc, r * LANES, qv, kt, d * sp + kb)
                    for r in range(R):
                        vstore_scaled(p, r * sp + kb, acc, r * LANES, scale)
                    kb += LANES
                # softmax of each valid row, left un-normalized: 1 / sum is applied as the output is stored
                for r in range(R):
                    inv[r] = np.float32(0.0)
                for r in range(min(R, s - i0)):
                    i = i0 + r
                    mo = (((b if mb > 1 else 0) * mh + (h if mh > 1 else 0)) * mi + (i if mi > 1 else 0)) * s
                    pr = r * sp
                    if has_mask:
                        k = 0
                        while k + LANES <= s:
                            vadd(p, pr + k, mf, mo + k)
                            k += LANES
                        for k in range(k, s):
                            p[pr + k] += mf[mo + k]
                    for k in range(s, sp):
                        p[pr + k] = _NEG_INF
                    for t in range(LANES):
                        top[t] = p[pr + t]
                    for k in range(LANES, sp, LANES):
                        vmax_into(top, 0, p, pr + k)
                    m = top[0]
                    for t in range(1, LANES):
                        m = max(m, top[t])
                    if m == _NEG_INF:
                        masked += 1
                        continue
                    vzero(top, 0)
                    for k in range(0, sp, LANES):
                        vexp_shift(p, pr + k, m)
                        vadd(top, 0, p, pr + k)
                    inv[r] = np.float32(1.0) / vsum(top, 0)
                # output rows: (P V) / sum; each value row read in place once for the R rows
                for q in range(R * c):
                    vzero(acc, q * LANES)
                for k in range(s):
                    vrow = (row0 + k) * w + vo + h * D
                    for r in range(R):
                        pv = p[r * sp + k]
                        for cc in range(c):
                            vfma(acc, (r * c + cc) * LANES, pv, xf, vrow + cc * LANES)
                for r in range(min(R, s - i0)):
                    if inv[r] != 0.0:
                        base = (row0 + i0 + r) * ow + h * D
                        for cc in range(c):
                            vstore_scaled(of, base + cc * LANES, acc, (r * c + cc) * LANES, inv[r])
        return masked

    return attend


_KERNELS: dict[int, object] = {}
_ZEROS = np.zeros(LANES, dtype=np.float32)


def supported(head_size: int) -> bool:
    """Whether :func:`attend` takes heads of ``head_size`` dimensions (a multiple of 16, at most 128)."""
    return 0 < head_size <= 128 and head_size % LANES == 0


def attend(qkv: np.ndarray, offsets: tuple[int, int, int], heads: int, head_size: int, scale: float,
           mask: np.ndarray | None, out: np.ndarray) -> int:
    """``out[b, i, h*D:(h+1)*D] = softmax(q_bhi K_bh^T * scale + mask[b, h, i]) V_bh`` for float32 C-contiguous
    ``qkv (B, S, W)``; ``q``, ``k`` and ``v`` of head ``h`` are the ``D = head_size`` columns from
    ``offsets[0|1|2] + h * D``. ``mask``: ``None`` or float32 C-contiguous ``(B|1, H|1, S|1, S)``, added to the
    scaled scores (``-inf`` masks a key). ``out``: float32 C-contiguous ``(B, S, >= H*D)``.

    Returns the number of rows whose every key is masked; those rows of ``out`` are left unwritten.
    """
    nb, s, w = qkv.shape
    if not supported(head_size):
        raise ValueError(f"head_size must be a positive multiple of {LANES} up to 128, got {head_size}")
    if not (qkv.dtype == np.float32 and qkv.flags.c_contiguous and out.dtype == np.float32
            and out.flags.c_contiguous and out.shape[:2] == (nb, s) and out.shape[2] >= heads * head_size):
        raise ValueError("qkv and out must be float32 C-contiguous, out of shape (B, S, >= heads * head_size)")
    if any(o < 0 or o + heads * head_size > w for o in offsets):
        raise ValueError(f"q/k/v columns {offsets} + {heads} x {head_size} do not fit a product of width {w}")
    has_mask = mask is not None
    if mask is None:
        mask = np.zeros((1, 1, 1, s), dtype=np.float32)
    elif not (mask.dtype == np.float32 and mask.flags.c_contiguous and mask.ndim == 4 and mask.shape[3] == s
              and all(m in (1, full) for m, full in zip(mask.shape[:3], (nb, heads, s)))):
        raise ValueError(f"mask must be float32 C-contiguous of shape (B|1, H|1, S|1, S), got {mask.shape}")
    if s == 0 or nb == 0:
        return 0
    c = head_size // LANES
    if c not in _KERNELS:
        _KERNELS[c] = _make(c)
    sync_threads()
    q, k, v = offsets
    return int(_KERNELS[c](qkv, q, k, v, heads, np.float32(scale), mask, has_mask, out, _ZEROS))


__all__ = ["attend", "supported"]
