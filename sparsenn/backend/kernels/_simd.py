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


def _tree_sum(builder, v, n: int, add):
    """The sum of the ``n`` lanes of vector ``v`` by a fixed pairwise tree (lanes ``[0, n/2) + [n/2, n)``,
    halving): ``add`` is ``builder.fadd`` or ``builder.add``. The same order for any thread count."""
    i32 = ir.IntType(32)
    while n > 1:
        half = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half, n))))
        v = add(lo, hi)
        n = half
    return builder.extract_element(v, ir.Constant(i32, 0))


@intrinsic
def vsum(typingctx, acc, aoff):
    """The sum of the 16 floats ``acc[aoff:aoff+16]`` (a fixed pairwise tree: the same for any thread count)."""
    if not _check_f32(acc):
        return None
    sig = types.float32(acc, types.intp)

    def codegen(context, builder, sig, args):
        v = builder.load(_vec_ptr(context, builder, sig.args[0], args[0], args[1]), align=4)
        return _tree_sum(builder, v, LANES, builder.fadd)

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


# ------------------------------------------------------------------ int8 weights: integer dot products

def _target_features() -> frozenset[str]:
    """The CPU features numba compiles for (``NUMBA_CPU_FEATURES`` if set, else the host's); empty off x86-64."""
    import platform

    from numba.core import codegen, config

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    flat = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return frozenset(f[1:] for f in (flat or "").split(",") if f.startswith("+"))


#: Whether the int8 kernels multiply in integers (:func:`vexpand_dot`, :func:`vload_dot`): x86-64 with
#: AVX-512 BW, VBMI2 (``vpexpandb``) and VNNI (``vpdpbusd``): Ice Lake, Sapphire Rapids, Zen 4 and later.
#: Elsewhere the int8 values are converted to float32 in registers (:func:`vexpand_fma`, :func:`vload_fma`).
INT8_DOT = {"avx512bw", "avx512vbmi2", "avx512vnni"} <= _target_features()

#: Bytes per quantized activation: ``X_j = round(x_j * 2^e)`` as a ``8 * PLANES``-bit integer, stored as
#: ``PLANES`` byte planes (lowest first; the top one signed).
PLANES = 3
X_PLANES = PLANES * 64  # bytes of quantized activations per 64-column mask word
DOT_ACC = (PLANES + 1) * LANES  # float32 slots per row of an integer accumulator (see vexpand_dot)
DOT_BLOCK = 32  # mask words between two vdot_fold calls at most (int32 lanes stay below 2^31)

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_B64 = ir.VectorType(_I8, 64)  # a word's 64 int8 values
_M64 = ir.VectorType(ir.IntType(1), 64)
_V16I = ir.VectorType(_I32, LANES)
_V8Q = ir.VectorType(_I64, 8)


def _intrinsic_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _byte_ptr(context, builder, arytype, ary, offset):
    return builder.bitcast(_element_ptr(context, builder, arytype, ary, offset, _I8), _B64.as_pointer())


def _low_lanes(builder, n):
    """``<64 x i1>``: lanes ``[0, n)`` set (``0 <= n <= 64``)."""
    ones = builder.lshr(ir.Constant(_I64, -1), builder.sub(ir.Constant(_I64, 64), n))
    return builder.bitcast(builder.select(builder.icmp_unsigned("==", n, ir.Constant(_I64, 0)),
                                          ir.Constant(_I64, 0), ones), _M64)


def _expand_word(context, builder, valstype, vals, voff, word):
    """``<64 x i8>``: the next ``popcount(word)`` values of ``vals[voff:]`` in the lanes of ``word``'s set bits,
    zeros elsewhere. With VBMI2: one 64-byte load and one register ``vpexpandb`` (Zen 4 runs the memory
    form of the expand several times slower; the load sits in its own block so that instruction
    selection cannot fold it in). The load is a masked one where a whole 64 bytes would read past the end
    of ``vals``. Elsewhere ``llvm.masked.expandload``."""
    mask = builder.bitcast(word, _M64)
    ptr = _byte_ptr(context, builder, valstype, vals, voff)
    if not INT8_DOT:
        fn = _intrinsic_fn(builder, "llvm.masked.expandload.v64i8", _B64, [_I8.as_pointer(), _M64, _B64])
        return builder.call(fn, [builder.bitcast(ptr, _I8.as_pointer()), mask, ir.Constant(_B64, None)])
    nvals = context.make_array(valstype)(context, builder, vals).nitems
    inside = builder.icmp_signed("<=", builder.add(voff, ir.Constant(_I64, 64)), nvals)
    with builder.if_else(inside, likely=True) as (whole, tail):
        with whole:
            plain = builder.load(ptr, align=1)
            b_whole = builder.block
        with tail:
            n = builder.call(_intrinsic_fn(builder, "llvm.ctpop.i64", _I64, [_I64]), [word])
            load = _intrinsic_fn(builder, "llvm.masked.load.v64i8.p0", _B64, [_B64.as_pointer(), _I32, _M64, _B64])
            masked = builder.call(load, [ptr, ir.Constant(_I32, 1), _low_lanes(builder, n), ir.Constant(_B64, None)])
            b_tail = builder.block
    raw = builder.phi(_B64)
    raw.add_incoming(plain, b_whole)
    raw.add_incoming(masked, b_tail)
    expand = _intrinsic_fn(builder, "llvm.x86.avx512.mask.expand.v64i8", _B64, [_B64, _B64, _M64])
    return builder.call(expand, [raw, ir.Constant(_B64, None), mask])


def _dot4(builder, acc, u8, s8):
    """``acc`` (``<16 x i32>``) plus, in each lane, the sum of its 4 products of an unsigned byte of ``u8``
    by a signed byte of ``s8``: ``vpdpbusd``, or the same in generic vector IR."""
    if INT8_DOT:
        fn = _intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I, [_V16I] * 3)
        return builder.call(fn, [acc, builder.bitcast(u8, _V16I), builder.bitcast(s8, _V16I)])
    wide = ir.VectorType(_I32, 64)
    p = builder.mul(builder.zext(u8, wide), builder.sext(s8, wide))
    part = [builder.shuffle_vector(p, p, ir.Constant(_V16I, [4 * lane + t for lane in range(LANES)]))
            for t in range(4)]
    return builder.add(acc, builder.add(builder.add(part[0], part[1]), builder.add(part[2], part[3])))


def _slot(context, builder, acctype, acc, slot, vtype):
    ptr = _vec_ptr(context, builder, acctype, acc, ir.Constant(_I64, slot * LANES))
    return builder.bitcast(ptr, vtype.as_pointer())


def _dot_planes(context, builder, acctype, acc, row, w, planes):
    """Row ``row``'s plane accumulators += products of its expanded values ``w`` with the activation planes."""
    for c in range(PLANES):
        if c < PLANES - 1:  # unsigned plane bytes on vpdpbusd's unsigned side, the signed values on the other
            u8, s8 = planes[c], w
        else:  # the top plane is signed: it takes the signed side against w + 128 (corrected in vdot_totals)
            u8, s8 = builder.xor(w, ir.Constant(_B64, [0x80] * 64)), planes[c]
        pa = _slot(context, builder, acctype, acc, row * (PLANES + 1) + c, _V16I)
        builder.store(_dot4(builder, builder.load(pa, align=64), u8, s8), pa, align=64)


def _load_planes(context, builder, xqtype, xq, xoff):
    return [builder.load(_byte_ptr(context, builder, xqtype, xq, builder.add(xoff, ir.Constant(_I64, 64 * c))),
                         align=64) for c in range(PLANES)]


def _dot_args(acc, vals, xq, *tuples):
    return (_check_f32(acc) and isinstance(vals, types.Array) and vals.dtype == types.int8
            and isinstance(xq, types.Array) and xq.dtype == types.uint8
            and all(isinstance(t, types.UniTuple) and len(t) == len(tuples[0]) for t in tuples))


@intrinsic
def vexpand_dot(typingctx, acc, vals, voffs, words, xq, xoff):
    """For rows ``r < len(voffs)``: expand mask word ``words[r]``'s int8 values (the next ones of
    ``vals[voffs[r]:]``) into its 64 columns and add their products with the columns' quantized
    activations ``xq[xoff:xoff + X_PLANES]`` (:data:`PLANES` planes of 64 bytes, 64-byte aligned) to the
    row's accumulators: ``acc[r * DOT_ACC:]`` holds one ``<16 x i32>`` per plane (lane ``l`` sums the
    products of columns ``4l..4l+3`` of every word) and an ``<8 x i64>`` for :func:`vdot_fold`.

    One ``vpdpbusd`` per plane (64 byte-by-byte products summed in fours into 16 int32 lanes): exact
    integer arithmetic. The planes are loaded once for all the rows.
    """
    if not _dot_args(acc, vals, xq, voffs, words):
        return None
    rows = len(voffs)
    tup = types.UniTuple(types.intp, rows)
    sig = types.void(acc, vals, tup, tup, xq, types.intp)

    def codegen(context, builder, sig, args):
        a, v, vo, wd, q, qo = args
        planes = _load_planes(context, builder, sig.args[4], q, qo)
        for r in range(rows):
            w = _expand_word(context, builder, sig.args[1], v, builder.extract_value(vo, r),
                             builder.extract_value(wd, r))
            _dot_planes(context, builder, sig.args[0], a, r, w, planes)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vload_dot(typingctx, acc, vals, voffs, xq, xoff):
    """:func:`vexpand_dot` for dense rows: the 64 int8 values at ``vals[voffs[r]:]``."""
    if not _dot_args(acc, vals, xq, voffs):
        return None
    rows = len(voffs)
    sig = types.void(acc, vals, types.UniTuple(types.intp, rows), xq, types.intp)

    def codegen(context, builder, sig, args):
        a, v, vo, q, qo = args
        planes = _load_planes(context, builder, sig.args[3], q, qo)
        for r in range(rows):
            w = builder.load(_byte_ptr(context, builder, sig.args[1], v, builder.extract_value(vo, r)), align=1)
            _dot_planes(context, builder, sig.args[0], a, r, w, planes)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vdot_fold(typingctx, acc, rows):
    """For each of ``rows`` (a literal) rows: its ``<8 x i64>`` ``+= sum_c 2^(8c) S_c`` (``S_c`` the plane
    accumulators; lanes ``l`` and ``l + 8`` go to lane ``l``), then the ``S_c`` set to 0. Exact while every
    ``S_c`` lane is below ``2^22`` in magnitude: at most :data:`DOT_BLOCK` words since the last fold (a
    word adds less than ``4 * 255 * 128 < 2^17`` to a lane)."""
    if not (_check_f32(acc) and isinstance(rows, types.IntegerLiteral)):
        return None
    n = rows.literal_value
    sig = types.void(acc, rows)

    def codegen(context, builder, sig, args):
        a = args[0]
        wide = ir.VectorType(_I64, LANES)
        sh8 = ir.Constant(_V16I, [8] * LANES)
        for r in range(n):
            base = r * (PLANES + 1)
            s = [builder.load(_slot(context, builder, sig.args[0], a, base + c, _V16I), align=64)
                 for c in range(PLANES)]
            total = None
            for c in range(0, PLANES, 2):  # S_c + 2^8 S_{c+1} stays below 2^31: pairs in int32, then int64
                pair = s[c] if c + 1 == PLANES else builder.add(s[c], builder.shl(s[c + 1], sh8))
                part = builder.sext(pair, wide)
                if c:
                    part = builder.shl(part, ir.Constant(wide, [8 * c] * LANES))
                total = part if total is None else builder.add(total, part)
            half = [builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(_I32, 8), list(range(h, h + 8))))
                    for h in (0, 8)]
            pp = _slot(context, builder, sig.args[0], a, base + PLANES, _V8Q)
            builder.store(builder.add(builder.load(pp, align=64), builder.add(half[0], half[1])), pp, align=64)
            for c in range(PLANES):
                builder.store(ir.Constant(_V16I, None), _slot(context, builder, sig.args[0], a, base + c, _V16I),
                              align=64)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vdot_totals(typingctx, acc, rows):
    """The ``rows`` (a literal) rows' sums of their ``<8 x i64>`` (after :func:`vdot_fold`), as a tuple."""
    if not (_check_f32(acc) and isinstance(rows, types.IntegerLiteral)):
        return None
    n = rows.literal_value
    sig = types.UniTuple(types.int64, n)(acc, rows)

    def codegen(context, builder, sig, args):
        outs = []
        for r in range(n):
            t = builder.load(_slot(context, builder, sig.args[0], args[0], r * (PLANES + 1) + PLANES, _V8Q), align=64)
            outs.append(_tree_sum(builder, t, 8, builder.add))
        return context.make_tuple(builder, sig.return_type, outs)

    return sig, codegen


@intrinsic
def address(typingctx, ary):
    """The address of an array's first element, as an integer."""
    if not isinstance(ary, types.Array):
        return None
    sig = types.intp(ary)

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(context.make_array(sig.args[0])(context, builder, args[0]).data, _I64)

    return sig, codegen


__all__ += ["DOT_ACC", "DOT_BLOCK", "INT8_DOT", "PLANES", "X_PLANES", "address", "vdot_fold", "vdot_totals",
            "vexpand_dot", "vload_dot"]
