"""Elementwise activations applied by a kernel to the outputs it has just written (a fused epilogue).

``Linear -> GELU`` (BERT's feed-forward) otherwise reads and writes the product's whole output
once more: 25 MB per layer for BERT-base at batch 16 x 128 tokens. A kernel that applies the
activation to each block of outputs right after writing it touches them while they are still
in cache (:func:`activate_span`, called by :func:`._tiles.write_block`).

GELU (Hendrycks & Gimpel 2016) is ``x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2)))``. Whole vectors
of 16 lanes use :func:`vgelu`: ``erf`` from Abramowitz & Stegun 7.1.26 (``1 - t (a1 + t (a2 + ...))
exp(-z^2)``, ``t = 1 / (1 + p z)``; absolute error at most 1.5e-7) and ``exp`` from Cody-Waite range
reduction and Cephes' degree-6 polynomial (Moshier 1989), both in LLVM vector IR so that the
16 lanes run as vector instructions (numba's ``math.erf`` is a scalar call per element). The
last lanes of a row that fill no vector use ``math.erf``. Against ``torch.nn.functional.gelu``
the result differs by at most about ``1e-6 * max(1, |x|)`` (tested); NaN stays NaN.
:func:`vsilu_mul` is SwiGLU's ``silu(g) * u`` (Shazeer 2020) with the same vector ``exp`` (of ``-|g|``,
so always in its range), for the decoder step of :mod:`.decoder_step`.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit
from ._simd import LANES, _check_f32, _vec_ptr, splat

#: activation name -> the code the kernels take (0: none)
ACTIVATIONS = {"gelu": 1}
#: activation name -> the PyTorch function it equals (up to the epilogue's rounding)
TORCH_FUNCTIONS = {"gelu": F.gelu}

_F = ir.FloatType()
_VEC = ir.VectorType(_F, LANES)
_VI = ir.VectorType(ir.IntType(32), LANES)


def _c(value: float) -> ir.Constant:
    return ir.Constant(_VEC, [float(value)] * LANES)


def _fn(builder, name: str, nargs: int):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * nargs), name)


def _poly(builder, x, coefficients):
    """Horner: ``((c0 x + c1) x + c2) ...`` with fused multiply-adds."""
    fma = _fn(builder, "llvm.fmuladd.v16f32", 3)
    acc = _c(coefficients[0])
    for c in coefficients[1:]:
        acc = builder.call(fma, [acc, x, _c(c)])
    return acc


def _exp(builder, x):
    """``exp(x)`` for ``x <= 0`` (Cephes ``expf``): ``2^n * p(r)``, ``n = round(x / ln 2)``; below -87.3 it is 0."""
    lo = _c(-87.33654475)
    under = builder.fcmp_ordered("<", x, lo)  # NaN compares false: stays NaN
    x = builder.select(under, lo, x)
    fma = _fn(builder, "llvm.fmuladd.v16f32", 3)
    n = builder.call(_fn(builder, "llvm.floor.v16f32", 1), [builder.call(fma, [x, _c(1.44269504088896341), _c(0.5)])])
    r = builder.call(fma, [n, _c(-0.693359375), x])
    r = builder.call(fma, [n, _c(2.12194440e-4), r])
    p = _poly(builder, r, [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                           1.6666665459e-1, 5.0000001201e-1])
    p = builder.call(fma, [p, builder.fmul(r, r), builder.fadd(r, _c(1.0))])
    bits = builder.shl(builder.add(builder.fptosi(n, _VI), ir.Constant(_VI, [127] * LANES)),
                       ir.Constant(_VI, [23] * LANES))
    return builder.select(under, _c(0.0), builder.fmul(p, builder.bitcast(bits, _VEC)))


def _gelu(builder, x):
    """``x / 2 * (1 + erf(x / sqrt 2))`` on ``<16 x float>``."""
    fabs = _fn(builder, "llvm.fabs.v16f32", 1)
    z = builder.fmul(builder.call(fabs, [x]), _c(0.7071067811865476))
    t = builder.fdiv(_c(1.0), builder.call(_fn(builder, "llvm.fmuladd.v16f32", 3), [z, _c(0.3275911), _c(1.0)]))
    p = builder.fmul(t, _poly(builder, t, [1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592]))
    tail = builder.fmul(p, _exp(builder, builder.fneg(builder.fmul(z, z))))  # 1 - erf(|x| / sqrt 2)
    phi2 = builder.select(builder.fcmp_ordered(">=", x, _c(0.0)), builder.fsub(_c(2.0), tail), tail)  # 2 Phi(x)
    return builder.fmul(builder.fmul(x, _c(0.5)), phi2)


@intrinsic
def vgelu(typingctx, y, off):
    """``y[off:off+16] = gelu(y[off:off+16])`` in place."""
    if not _check_f32(y):
        return None
    sig = types.void(y, types.intp)

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(_gelu(builder, builder.load(p, align=4)), p, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _silu(builder, x):
    """``x * sigmoid(x)`` on ``<16 x float>``, the sigmoid from ``e = exp(-|x|)`` (an argument <= 0, the range
    :func:`_exp` covers): ``1 / (1 + e)`` for ``x >= 0``, ``e / (1 + e)`` otherwise."""
    e = _exp(builder, builder.fneg(builder.call(_fn(builder, "llvm.fabs.v16f32", 1), [x])))
    inv = builder.fdiv(_c(1.0), builder.fadd(_c(1.0), e))
    sig = builder.select(builder.fcmp_ordered(">=", x, _c(0.0)), inv, builder.fmul(e, inv))
    return builder.fmul(x, sig)


@intrinsic
def vsilu_mul(typingctx, out, ooff, src, goff, uoff):
    """``out[ooff:ooff+16] = silu(src[goff:goff+16]) * src[uoff:uoff+16]`` (SwiGLU's gate times up)."""
    if not _check_f32(out, src):
        return None
    sig = types.void(out, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        pg = _vec_ptr(context, builder, sig.args[2], args[2], args[3])
        pu = _vec_ptr(context, builder, sig.args[2], args[2], args[4])
        po = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        g = builder.load(pg, align=4)
        builder.store(builder.fmul(_silu(builder, g), builder.load(pu, align=4)), po, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vexp_shift(typingctx, y, off, m):
    """``y[off:off+16] = exp(y[off:off+16] - m)`` in place, for ``m`` at least every lane (a softmax's row
    maximum: the arguments are then <= 0, the range :func:`_exp` covers; ``-inf`` lanes give 0)."""
    if not _check_f32(y):
        return None
    sig = types.void(y, types.intp, types.float32)

    def codegen(context, builder, sig, args):
        p = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(_exp(builder, builder.fsub(builder.load(p, align=4), splat(builder, args[2]))), p, align=4)
        return context.get_dummy_value()

    return sig, codegen


@jit(parallel=False)
def activate_span(yf, start, n, act):
    """Apply activation ``act`` (a code of :data:`ACTIVATIONS`; 0 does nothing) to ``yf[start:start+n]``."""
    if act == 1:
        k = 0
        while k + LANES <= n:
            vgelu(yf, start + k)
            k += LANES
        for i in range(start + k, start + n):
            v = yf[i]
            yf[i] = 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))


@jit(parallel=False)
def activate_rows(y, act):
    """:func:`activate_span` over every row of a C-contiguous ``y (rows, out)``."""
    rows, out = y.shape
    yf = y.reshape(-1)
    for b in range(rows):
        activate_span(yf, b * out, out, act)


def code(activation: str | None) -> int:
    """The kernels' code for ``activation`` (``None``: 0); ValueError naming the choices otherwise."""
    if activation is None:
        return 0
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)} or None")
    return ACTIVATIONS[activation]
