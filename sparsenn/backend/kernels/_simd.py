"""Numba building blocks for the kernels: stack arrays and 16-lane float32 vector operations.

Numba's loop vectorizer handles a loop over 64 batch columns well but fully unrolls
(and then fails to re-vectorize) loops of 16 or 32, and it cannot keep an accumulator
that lives in a NumPy array in registers. These intrinsics emit LLVM vector IR
directly: ``vfma(acc, a, w, x, b)`` is ``acc[a:a+16] += w * x[b:b+16]`` on
``<16 x float>`` values (one AVX-512 instruction, or two AVX2 ones). Accumulators live
in a fixed-size stack array (``carray(stack_alloc(N), (N,))``, an ``alloca`` at function
entry); with constant offsets LLVM's scalar replacement turns them into vector
registers, so the inner loops read the weights and the activations and write nothing.

Products use ``llvm.fmuladd`` (a fused multiply-add where the CPU has one: one
rounding instead of two); sums are never reassociated, so results do not depend on
the number of threads.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
_VEC = ir.VectorType(ir.FloatType(), LANES)


@intrinsic
def stack_alloc(typingctx, size):
    """A pointer to ``size`` (a compile-time integer) float32 slots on the stack."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = size.literal_value

    def codegen(context, builder, signature, args):
        ptr = cgutils.alloca_once(builder, ir.FloatType(), size=ir.Constant(ir.IntType(64), n), name="acc")
        ptr.align = 64  # one cache line per vector
        return ptr

    return types.CPointer(types.float32)(size), codegen


def _vec_ptr(context, builder, arytype, ary, offset):
    data = context.make_array(arytype)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [offset]), _VEC.as_pointer())


def splat(builder, value):
    """``<16 x float>`` with every lane ``value`` (a float32 scalar)."""
    v = builder.insert_element(ir.Constant(_VEC, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_VEC, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


def _check_f32(*arrays):
    return all(isinstance(a, types.Array) and a.dtype == types.float32 for a in arrays)


@intrinsic
def vzero(typingctx, acc, offset):
    """``acc[offset:offset+16] = 0``."""
    if not _check_f32(acc):
        return None
    sig = types.void(acc, types.intp)

    def codegen(context, builder, sig, args):
        builder.store(ir.Constant(_VEC, [0.0] * LANES), _vec_ptr(context, builder, sig.args[0], args[0], args[1]),
                      align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vfma(typingctx, acc, aoff, w, x, xoff):
    """``acc[aoff:aoff+16] += w * x[xoff:xoff+16]`` (``w`` a float32 scalar, broadcast)."""
    if not _check_f32(acc, x):
        return None
    sig = types.void(acc, types.intp, types.float32, x, types.intp)

    def codegen(context, builder, sig, args):
        pa = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        px = _vec_ptr(context, builder, sig.args[3], args[3], args[4])
        out = builder.call(_fmuladd(builder), [splat(builder, args[2]), builder.load(px, align=4),
                                               builder.load(pa, align=4)])
        builder.store(out, pa, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vadd(typingctx, acc, aoff, src, soff):
    """``acc[aoff:aoff+16] += src[soff:soff+16]``."""
    if not _check_f32(acc, src):
        return None
    sig = types.void(acc, types.intp, src, types.intp)

    def codegen(context, builder, sig, args):
        pa = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        ps = _vec_ptr(context, builder, sig.args[2], args[2], args[3])
        builder.store(builder.fadd(builder.load(pa, align=4), builder.load(ps, align=4)), pa, align=4)
        return context.get_dummy_value()

    return sig, codegen


__all__ = ["LANES", "stack_alloc", "vadd", "vfma", "vzero"]


def _transpose_masks(k: int) -> tuple[list[int], list[int]]:
    """Shuffle masks of one butterfly stage: rows ``i`` and ``i + k`` swap their off-diagonal ``k``-blocks."""
    low = [j if not j & k else LANES + j - k for j in range(LANES)]
    high = [j + k if not j & k else LANES + j for j in range(LANES)]
    return low, high


@intrinsic
def vtranspose_store(typingctx, src, soff, sstride, dst, doff, dstride, bias, boff):
    """``dst[doff + t*dstride + r] = src[soff + r*sstride + t] + bias[boff + r]`` for ``r, t < 16``.

    A 16 x 16 block transposed in registers: 16 vector loads, 4 butterfly stages of 16
    shuffles each (stage ``k`` swaps the off-diagonal ``k x k`` blocks of row pairs
    ``(i, i + k)``; after ``k = 1, 2, 4, 8`` element ``(r, t)`` sits at ``(t, r)``), 16
    vector adds and 16 vector stores, instead of 256 scalar loads and stores.
    """
    if not _check_f32(src, dst, bias):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp, bias, types.intp)

    def codegen(context, builder, sig, args):
        s_ary, soff, sstride, d_ary, doff, dstride, b_ary, boff = args
        rows = []
        for r in range(LANES):
            off = builder.add(soff, builder.mul(sstride, ir.Constant(soff.type, r)))
            rows.append(builder.load(_vec_ptr(context, builder, sig.args[0], s_ary, off), align=4))
        i32 = ir.IntType(32)
        k = 1
        while k < LANES:
            low, high = _transpose_masks(k)
            mlow = ir.Constant(ir.VectorType(i32, LANES), low)
            mhigh = ir.Constant(ir.VectorType(i32, LANES), high)
            nxt = list(rows)
            for i in range(LANES):
                if not i & k:
                    a, b = rows[i], rows[i + k]
                    nxt[i] = builder.shuffle_vector(a, b, mlow)
                    nxt[i + k] = builder.shuffle_vector(a, b, mhigh)
            rows = nxt
            k *= 2
        bvec = builder.load(_vec_ptr(context, builder, sig.args[6], b_ary, boff), align=4)
        for t in range(LANES):
            off = builder.add(doff, builder.mul(dstride, ir.Constant(doff.type, t)))
            builder.store(builder.fadd(rows[t], bvec), _vec_ptr(context, builder, sig.args[3], d_ary, off), align=4)
        return context.get_dummy_value()

    return sig, codegen


__all__ += ["vtranspose_store"]


# ------------------------------------------------------------------ compressed values: expand, dequantize

_ELEMENT = {types.float32: (ir.FloatType(), "f32"), types.int8: (ir.IntType(8), "i8"),
            types.uint16: (ir.IntType(16), "i16")}  # uint16: bfloat16 bits


def _as_float(builder, w, dtype):
    """``<16 x elt>`` -> ``<16 x float>``: int8 sign-extended and converted; bfloat16 bits shifted into
    the top half of a float32 (exact); float32 unchanged."""
    i32v = ir.VectorType(ir.IntType(32), LANES)
    if dtype == types.int8:
        return builder.sitofp(builder.sext(w, i32v), _VEC)
    if dtype == types.uint16:
        return builder.bitcast(builder.shl(builder.zext(w, i32v), ir.Constant(i32v, [16] * LANES)), _VEC)
    return w


def _element_ptr(context, builder, arytype, ary, offset, elt):
    data = context.make_array(arytype)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [offset]), elt.as_pointer())


def _fmuladd(builder):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 3),
                                          f"llvm.fmuladd.v{LANES}f32")


def _expand_as_float(context, builder, valstype, vals, voff, mask):
    """``<16 x float>``: the next ``popcount(mask)`` values of ``vals[voff:]`` in the lanes whose bit of
    ``mask`` (low 16 bits) is set, zeros elsewhere (``llvm.masked.expandload``), converted to float32."""
    elt, code = _ELEMENT[valstype.dtype]
    i1v = ir.VectorType(ir.IntType(1), LANES)
    vt = ir.VectorType(elt, LANES)
    bits = builder.bitcast(builder.trunc(mask, ir.IntType(LANES)), i1v)
    load = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [elt.as_pointer(), i1v, vt]),
                                          f"llvm.masked.expandload.v{LANES}{code}")
    w = builder.call(load, [_element_ptr(context, builder, valstype, vals, voff, elt), bits, ir.Constant(vt, None)])
    return _as_float(builder, w, valstype.dtype)


def _accumulate(context, builder, acctype, acc, aoff, w, xtype, x, xoff):
    """``acc[aoff:aoff+16] += w * x[xoff:xoff+16]`` for a ``<16 x float>`` ``w``."""
    pa = _vec_ptr(context, builder, acctype, acc, aoff)
    px = _vec_ptr(context, builder, xtype, x, xoff)
    builder.store(builder.call(_fmuladd(builder), [w, builder.load(px, align=4), builder.load(pa, align=4)]), pa,
                  align=4)


@intrinsic
def vexpand_fma(typingctx, acc, aoff, vals, voff, mask, x, xoff):
    """``acc[aoff:aoff+16] += expand(vals[voff:], mask) * x[xoff:xoff+16]``.

    ``expand`` puts the next ``popcount(mask)`` values of ``vals`` (float32, int8 or
    bfloat16 bits as uint16) in the lanes whose bit of ``mask`` (the low 16 bits) is set,
    zeros elsewhere, and converts them to float32 in registers: LLVM's
    ``masked.expandload`` (``vexpandps`` / ``vpexpandb`` / ``vpexpandw`` with AVX-512;
    a scalar sequence elsewhere). Only ``popcount(mask)`` values are read.
    """
    if not (_check_f32(acc, x) and isinstance(vals, types.Array) and vals.dtype in _ELEMENT):
        return None
    sig = types.void(acc, types.intp, vals, types.intp, types.intp, x, types.intp)

    def codegen(context, builder, sig, args):
        a, ao, v, vo, m, xx, xo = args
        w = _expand_as_float(context, builder, sig.args[2], v, vo, m)
        _accumulate(context, builder, sig.args[0], a, ao, w, sig.args[5], xx, xo)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vload_fma(typingctx, acc, aoff, vals, voff, x, xoff):
    """``acc[aoff:aoff+16] += float(vals[voff:voff+16]) * x[xoff:xoff+16]`` (vals float32, int8 or bf16 bits)."""
    if not (_check_f32(acc, x) and isinstance(vals, types.Array) and vals.dtype in _ELEMENT):
        return None
    sig = types.void(acc, types.intp, vals, types.intp, x, types.intp)
    elt, _ = _ELEMENT[vals.dtype]

    def codegen(context, builder, sig, args):
        a, ao, v, vo, xx, xo = args
        vt = ir.VectorType(elt, LANES)
        w = builder.load(builder.bitcast(_element_ptr(context, builder, sig.args[2], v, vo, elt), vt.as_pointer()),
                         align=1)
        _accumulate(context, builder, sig.args[0], a, ao, _as_float(builder, w, sig.args[2].dtype), sig.args[4], xx,
                    xo)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vexpand_store(typingctx, dst, doff, vals, voff, mask):
    """``dst[doff:doff+16] = expand(vals[voff:], mask)`` as float32 (see :func:`vexpand_fma`)."""
    if not (_check_f32(dst) and isinstance(vals, types.Array) and vals.dtype in _ELEMENT):
        return None
    sig = types.void(dst, types.intp, vals, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        d, do, v, vo, m = args
        w = _expand_as_float(context, builder, sig.args[2], v, vo, m)
        builder.store(w, _vec_ptr(context, builder, sig.args[0], d, do), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vsum(typingctx, acc, aoff):
    """The sum of the 16 floats ``acc[aoff:aoff+16]`` (a fixed pairwise tree: the same for any thread count)."""
    if not _check_f32(acc):
        return None
    sig = types.float32(acc, types.intp)

    def codegen(context, builder, sig, args):
        v = builder.load(_vec_ptr(context, builder, sig.args[0], args[0], args[1]), align=4)
        i32 = ir.IntType(32)
        n = LANES
        while n > 1:  # halve: lanes [0, n/2) + [n/2, n)
            half = n // 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half, n))))
            v = builder.fadd(lo, hi)
            n = half
        return builder.extract_element(v, ir.Constant(i32, 0))

    return sig, codegen


@intrinsic
def popcount(typingctx, v):
    """The number of set bits of a 64-bit integer (one ``popcnt`` instruction)."""
    if not isinstance(v, types.Integer):
        return None
    sig = types.intp(v)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        x = args[0] if args[0].type == i64 else builder.zext(args[0], i64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
        return builder.call(fn, [x])

    return sig, codegen


__all__ += ["popcount", "vexpand_fma", "vexpand_store", "vload_fma", "vsum"]


@intrinsic
def f32_pointer(typingctx, address):
    """A ``float32*`` from an integer address (``tensor.data_ptr()``), for ``carray(ptr, shape)``.

    Lets a kernel take a PyTorch tensor's memory without making a NumPy view of it (3-4 us
    of Python per call: detach, reshape, ``.numpy()``), which is most of a one-row product
    of a small layer. The caller guarantees a live, contiguous float32 buffer of the size used.
    """
    if not isinstance(address, types.Integer):
        return None
    sig = types.CPointer(types.float32)(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.FloatType().as_pointer())

    return sig, codegen


__all__ += ["f32_pointer"]
