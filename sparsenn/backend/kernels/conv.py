"""Sparse 2-D convolutions without im2col: a CSR of kernel taps per output channel.

Layout (:func:`pack_conv`). A float32 ``(out, in, kh, kw)`` weight is stored as a CSR
over output channels whose entries are the channel's nonzero taps: ``ptr`` (int32,
``out + 1``), ``tap`` (int32: ``c * kh * kw + dy * kw + dx`` for input channel ``c``
and kernel position ``(dy, dx)``, strictly increasing within a channel) and ``val``
(float32). ``meta`` holds ``out``, ``in``, ``kh`` and ``kw``. :func:`check_conv` says
why arrays from elsewhere (a file) are unsafe; the kernels read without bounds checks.

Products (:func:`conv2d`) follow Elsen et al. 2020 ("Fast Sparse ConvNets"): the
activations stay dense and in NCHW, the weight is sparse, and every nonzero multiplies
a contiguous run of pixels with 16-lane fused multiply-adds. No im2col, no transpose.

- Input. A 1x1 stride-1 unpadded convolution reads ``x`` itself: per image the
  sparse weight times the dense ``(C, H*W)`` matrix. Otherwise the input is
  zero-padded once into a scratch buffer of ``Hq x Wq`` planes. With stride
  ``(sh, sw) != (1, 1)`` the padded plane is split into phase planes (space-to-depth:
  phase ``(py, px)`` holds ``xpad[py::sh, px::sw]``; only the phases some kernel row or
  column lands on are built, so a strided 1x1 convolution keeps one, the subsampled
  input). Tap ``(c, dy, dx)`` reads phase ``((dy*dh) % sh, (dx*dw) % sw)`` of channel
  ``c`` shifted by ``(qy, qx) = ((dy*dh) // sh, (dx*dw) // sw)``: output pixel
  ``(oy, ox)`` reads ``plane[oy + qy, ox + qx]``, and every tap of a strided
  convolution reads contiguous memory like a stride-1 one.
- Flat rows. Output rows are computed ``Wq`` wide, with the plane's row pitch: output
  position ``p = oy * Wq + ox`` reads plane position ``p + qy * Wq + qx``, so over the
  whole plane each tap is one contiguous run of ``Ho * Wq`` floats at a per-tap offset
  (``tbl[tap]``, int32, ``in * kh * kw`` entries, cached per geometry). The ``Wq - Wo``
  columns past the output width are computed and never stored (3% of the work on
  56-wide ResNet planes, 22% on 7-wide ones).
- Register tile. ``4`` or ``8`` vectors of 16 consecutive flat positions
  (:func:`tile_vectors`) for one output channel stay in vector registers, initialized
  with the bias, while the channel's nonzeros stream by: per nonzero one table lookup,
  one broadcast and 4 or 8 fused multiply-adds with the input read from cache. The tile
  is then written to ``y`` row segment by row segment with masked stores; the last tile
  of a plane masks its loads past the plane's ``Ho * Wq`` positions.
- Parallel (numba ``prange``) over (image, block of up to ``OUT_BLOCK`` output
  channels, tile): the input a tile reads (``C x kh`` row pieces) is brought into the
  core's L2 once and read by every channel of the block. Batches are filled and
  multiplied in groups of images whose padded input fits ``GROUP_BYTES`` (about one
  L2), so the product reads the buffer from cache.

Each nonzero's input vectors are loaded once and used once, and most of those loads
are not 64-byte aligned (the taps shift them by single floats), so the product is
bound by loads from L2, not by its multiply-adds; blocking input channels into L1-sized
panels measured at most 7-20% faster and was left out. On 2 Zen 4 cores it ran 2.1-3.1x
faster than ``F.conv2d`` (oneDNN) on ResNet-18's 3x3 layers at 90% unstructured
sparsity and 1.3-2x at 80%, at batch 1 and 16 (the 7x7 stem 3-4.7x, the strided 1x1
2.7-3.5x at 90%).
Depthwise and grouped convolutions are out of scope (``groups == 1`` only).
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import carray, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit, sync_threads
from ._layout import MAX_DIM, array_problem, meta_problem, names_problem, pointer_problem, sorted_problem
from ._simd import _VEC, LANES, _check_f32, _fmuladd, _vec_ptr, splat, stack_alloc, vfma
from ._tiles import aligned_empty

TILES = (4, 8)  # register tiles: vectors of 16 flat output positions (compiled variants)
OUT_BLOCK = 64  # output channels per parallel job (fewer where that leaves under 4 jobs per thread)
CHUNK = 1  # register tiles per parallel job
GROUP_BYTES = 1 << 20  # padded input of the images filled and multiplied together (about one L2)
_ZERO = np.zeros(1, dtype=np.int64)

# ------------------------------------------------------------------ vector helpers (masked loads and stores)

_I32V = ir.VectorType(ir.IntType(32), LANES)
_I1V = ir.VectorType(ir.IntType(1), LANES)


def _splat_i32(builder, v):
    i32 = ir.IntType(32)
    s = builder.insert_element(ir.Constant(_I32V, ir.Undefined), builder.trunc(v, i32), ir.Constant(i32, 0))
    return builder.shuffle_vector(s, ir.Constant(_I32V, ir.Undefined), ir.Constant(_I32V, [0] * LANES))


def _lanes_below(builder, n):
    """``<16 x i1>``: lane ``i`` set when ``i < n``."""
    return builder.icmp_signed("<", ir.Constant(_I32V, list(range(LANES))), _splat_i32(builder, n))


def _masked_load(builder, ptr, mask):
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(_VEC, [_VEC.as_pointer(), ir.IntType(32), _I1V, _VEC]),
                                        f"llvm.masked.load.v{LANES}f32.p0")
    return builder.call(fn, [ptr, ir.Constant(ir.IntType(32), 4), mask, ir.Constant(_VEC, None)])


def _masked_store(builder, value, ptr, mask):
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ir.VoidType(), [_VEC, _VEC.as_pointer(), ir.IntType(32), _I1V]),
                                        f"llvm.masked.store.v{LANES}f32.p0")
    builder.call(fn, [value, ptr, ir.Constant(ir.IntType(32), 4), mask])


@intrinsic
def vfill(typingctx, acc, aoff, value):
    """``acc[aoff:aoff+16] = value`` (a float32 scalar, broadcast)."""
    if not _check_f32(acc):
        return None
    sig = types.void(acc, types.intp, types.float32)

    def codegen(context, builder, sig, args):
        builder.store(splat(builder, args[2]), _vec_ptr(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vfma_n(typingctx, acc, aoff, w, x, xoff, n):
    """``acc[aoff:aoff+16] += w * x[xoff:xoff+16]`` reading only the first ``n`` lanes of ``x`` (others 0)."""
    if not _check_f32(acc, x):
        return None
    sig = types.void(acc, types.intp, types.float32, x, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        a, ao, w, xx, xo, n = args
        pa = _vec_ptr(context, builder, sig.args[0], a, ao)
        xv = _masked_load(builder, _vec_ptr(context, builder, sig.args[3], xx, xo), _lanes_below(builder, n))
        builder.store(builder.call(_fmuladd(builder), [splat(builder, w), xv, builder.load(pa, align=4)]), pa, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vcopy_n(typingctx, dst, doff, src, soff, n):
    """``dst[doff:doff+n] = src[soff:soff+n]`` for ``n <= 16`` (masked: nothing past ``n`` is read or written)."""
    if not _check_f32(dst, src):
        return None
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        d, do, s, so, n = args
        mask = _lanes_below(builder, n)
        v = _masked_load(builder, _vec_ptr(context, builder, sig.args[2], s, so), mask)
        _masked_store(builder, v, _vec_ptr(context, builder, sig.args[0], d, do), mask)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vcopy(typingctx, dst, doff, src, soff):
    """``dst[doff:doff+16] = src[soff:soff+16]``."""
    if not _check_f32(dst, src):
        return None
    sig = types.void(dst, types.intp, src, types.intp)

    def codegen(context, builder, sig, args):
        d, do, s, so = args
        v = builder.load(_vec_ptr(context, builder, sig.args[2], s, so), align=4)
        builder.store(v, _vec_ptr(context, builder, sig.args[0], d, do), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def veven_n(typingctx, dst, doff, src, soff, n):
    """``dst[doff + i] = src[soff + 2*i]`` for ``i < n <= 16`` (two masked loads and one shuffle)."""
    if not _check_f32(dst, src):
        return None
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        d, do, s, so, n = args
        used = builder.sub(builder.add(n, n), ir.Constant(n.type, 1))  # source floats read: 2n - 1
        lo = _masked_load(builder, _vec_ptr(context, builder, sig.args[2], s, so), _lanes_below(builder, used))
        hi_ptr = _vec_ptr(context, builder, sig.args[2], s, builder.add(so, ir.Constant(so.type, LANES)))
        hi = _masked_load(builder, hi_ptr, _lanes_below(builder, builder.sub(used, ir.Constant(n.type, LANES))))
        even = builder.shuffle_vector(lo, hi, ir.Constant(_I32V, list(range(0, 2 * LANES, 2))))
        _masked_store(builder, even, _vec_ptr(context, builder, sig.args[0], d, do), _lanes_below(builder, n))
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------ layout


def pack_conv(weight: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``(arrays, meta)`` of a float32 ``(out, in, kh, kw)`` weight: ``ptr`` (int32, ``out + 1``),
    ``tap`` (int32, ``c * kh * kw + dy * kw + dx``, increasing per channel), ``val`` (float32);
    ``meta``: ``out``, ``in``, ``kh``, ``kw``."""
    w = np.asarray(weight)
    if w.ndim != 4:
        raise ValueError(f"expected a 4-D (out, in, kh, kw) weight, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    out, cin, kh, kw = (int(s) for s in w.shape)
    if min(out, cin, kh, kw) < 1:
        raise ValueError(f"every dimension of the weight must be positive, got {w.shape}")
    if cin * kh * kw > MAX_DIM:
        raise ValueError(f"in * kh * kw = {cin * kh * kw} taps do not fit int32")
    m = np.ascontiguousarray(w, dtype=np.float32).reshape(out, cin * kh * kw)
    r, t = np.nonzero(m)  # row-major: taps increasing within a channel
    if len(r) > MAX_DIM:
        raise ValueError(f"{len(r)} nonzeros do not fit int32 pointers (at most 2**31 - 1)")
    ptr = np.zeros(out + 1, dtype=np.int32)
    np.cumsum(np.bincount(r, minlength=out), out=ptr[1:])
    arrays = {"ptr": ptr, "tap": t.astype(np.int32), "val": m[r, t]}
    return arrays, {"out": out, "in": cin, "kh": kh, "kw": kw}


def unpack_conv(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> np.ndarray:
    """The dense float32 ``(out, in, kh, kw)`` weight back (for tests and checks)."""
    out, cin, kh, kw = (int(meta[k]) for k in ("out", "in", "kh", "kw"))
    rows = np.repeat(np.arange(out), np.diff(arrays["ptr"].astype(np.int64)))
    w = np.zeros((out, cin * kh * kw), dtype=np.float32)
    w[rows, arrays["tap"].astype(np.int64)] = arrays["val"]
    return w.reshape(out, cin, kh, kw)


def check_conv(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> str | None:
    """Why ``(arrays, meta)`` is not a layout :func:`pack_conv` makes (``None`` if it is): int32
    pointers from 0 to the number of taps, non-decreasing; int32 taps in ``[0, in*kh*kw)``,
    strictly increasing within a channel; as many float32 values as taps; all C-contiguous."""
    why = names_problem(arrays, ("ptr", "tap", "val")) or meta_problem(meta, ("out", "in", "kh", "kw"))
    if why:
        return why
    out, cin, kh, kw = (int(meta[k]) for k in ("out", "in", "kh", "kw"))
    if min(out, cin, kh, kw) < 1:
        return f"out, in, kh and kw must be positive, got out={out}, in={cin}, kh={kh}, kw={kw}"
    taps = cin * kh * kw
    if taps > MAX_DIM:
        return f"in * kh * kw = {taps} taps do not fit int32"
    ptr, tap, val = arrays["ptr"], arrays["tap"], arrays["val"]
    why = (array_problem(ptr, "ptr", np.int32, (out + 1,))
           or array_problem(tap, "tap", np.int32, (-1,))
           or array_problem(val, "val", np.float32, (tap.size,))
           or pointer_problem(ptr, tap.size))
    if why:
        return why
    if tap.size and (int(tap.min()) < 0 or int(tap.max()) >= taps):
        bad = int(tap.min()) if int(tap.min()) < 0 else int(tap.max())
        return f"tap holds {bad}, outside [0, in*kh*kw = {taps})"
    return sorted_problem(tap, ptr, "tap")


# ------------------------------------------------------------------ input preparation


@jit
def _fill(x, buf, top, left, sh, sw, pys, pxs, hq, wq):
    """Zero-padded phase planes: ``buf[n, c, iy, ix, i, j] = xpad[n, c, pys[iy] + i*sh, pxs[ix] + j*sw]``."""
    n_img, cin, h, w = x.shape
    nyy, nxx = pys.shape[0], pxs.shape[0]
    plane = hq * wq
    xf = x.reshape(-1)
    for job in prange(n_img * cin):
        src0 = job * h * w
        for iy in range(nyy):
            for ix in range(nxx):
                base = ((job * nyy + iy) * nxx + ix) * plane
                px = np.intp(pxs[ix])
                # plane columns j whose source column px + j*sw - left lies in [0, w)
                jlo = min(wq, max(0, (left - px + sw - 1) // sw))
                jhi = max(jlo, min(wq, (w - 1 + left - px) // sw + 1)) if w - 1 + left - px >= 0 else jlo
                bb = buf[base:base + plane]  # slices: indices from range() skip the negative-index checks
                bb[:] = 0.0  # the padding (and rows no source row reaches)
                if jhi == jlo:
                    continue
                py = np.intp(pys[iy])
                ilo = max(0, (top - py + sh - 1) // sh)  # plane rows i whose source row py + i*sh - top is in [0, h)
                ihi = min(hq, (h - 1 + top - py) // sh + 1) if h - 1 + top - py >= 0 else 0
                for i in range(ilo, ihi):
                    d = base + i * wq + jlo
                    s0 = src0 + (py + i * sh - top) * w + px + jlo * sw - left
                    if sw == 1:
                        j = 0
                        while j < jhi - jlo:
                            vcopy_n(buf, d + j, xf, s0 + j, min(LANES, jhi - jlo - j))
                            j += LANES
                    elif sw == 2:
                        j = 0
                        while j < jhi - jlo:
                            veven_n(buf, d + j, xf, s0 + 2 * j, min(LANES, jhi - jlo - j))
                            j += LANES
                    else:
                        row = buf[d:d + jhi - jlo]
                        src = xf[s0:s0 + (jhi - jlo - 1) * sw + 1]
                        for j in range(jhi - jlo):
                            row[j] = src[j * sw]


@jit(parallel=False)
def _offsets(cin, kh, kw, sh, sw, dh, dw, pys, pxs, hq, wq, tbl):
    """``tbl[c*kh*kw + dy*kw + dx]``: where tap ``(c, dy, dx)`` starts reading in an image's buffer."""
    nyy, nxx = pys.shape[0], pxs.shape[0]
    plane = hq * wq
    for dy in range(kh):
        a = dy * dh
        iy = 0
        while pys[iy] != a % sh:
            iy += 1
        for dx in range(kw):
            b = dx * dw
            ix = 0
            while pxs[ix] != b % sw:
                ix += 1
            off = (iy * nxx + ix) * plane + (a // sh) * wq + b // sw
            for c in range(cin):
                tbl[(c * kh + dy) * kw + dx] = np.int32(c * nyy * nxx * plane + off)


# ------------------------------------------------------------------ kernel


def _make_conv(tile: int):
    """The convolution for register tiles of ``tile`` vectors (``16 * tile`` flat positions)."""
    width = tile * LANES

    @jit
    def conv(ptr, tap, val, tbl, bias, xf, istride, wq, ho, wo, out_block, chunk, y):
        n_img, out = y.shape[0], y.shape[1]
        yf = y.reshape(-1)
        length = ho * wq  # flat output positions per plane (columns >= wo not stored)
        ntiles = (length + width - 1) // width
        nchunks = (ntiles + chunk - 1) // chunk
        nblocks = (out + out_block - 1) // out_block
        oplane = ho * wo
        for job in prange(n_img * nblocks * nchunks):
            n = job // (nblocks * nchunks)
            rest = job % (nblocks * nchunks)
            blk = rest // nchunks
            t0 = (rest % nchunks) * chunk
            t1 = min(ntiles, t0 + chunk)
            o0 = blk * out_block
            o1 = min(out, o0 + out_block)
            xb = n * istride
            acc = carray(stack_alloc(width), (width,))
            outb = carray(stack_alloc(width), (width,))
            for t in range(t0, t1):
                p0 = t * width
                nl = min(width, length - p0)  # valid positions of this tile
                for o in range(o0, o1):
                    s = np.intp(ptr[o])
                    nnz = np.intp(ptr[o + 1]) - s
                    vs = val[s:s + nnz]
                    ts = tap[s:s + nnz]
                    b = bias[o]
                    for q in range(tile):
                        vfill(acc, q * LANES, b)
                    if nl == width:
                        for k in range(nnz):
                            j = xb + np.intp(tbl[ts[k]]) + p0
                            w = vs[k]
                            for q in range(tile):
                                vfma(acc, q * LANES, w, xf, j + q * LANES)
                    else:  # the plane's last tile: no reads past its last position
                        for k in range(nnz):
                            j = xb + np.intp(tbl[ts[k]]) + p0
                            w = vs[k]
                            for q in range(tile):
                                vfma_n(acc, q * LANES, w, xf, j + q * LANES, nl - q * LANES)
                    yb = (n * out + o) * oplane
                    if wq == wo and nl == width:
                        for q in range(tile):
                            vcopy(yf, yb + p0 + q * LANES, acc, q * LANES)
                        continue
                    for q in range(tile):
                        vcopy(outb, q * LANES, acc, q * LANES)
                    r = p0 // wq
                    while r * wq < p0 + nl:  # row segments [lo, hi) of the tile
                        lo = max(r * wq, p0)
                        hi = min(r * wq + wo, p0 + nl)
                        d = yb + r * wo - r * wq
                        while lo < hi:
                            vcopy_n(yf, d + lo, outb, lo - p0, min(LANES, hi - lo))
                            lo += LANES
                        r += 1

    return conv


_CONV = {t: _make_conv(t) for t in TILES}


def tile_vectors(length: int) -> int:
    """Vectors per register tile for planes of ``length`` flat positions: 8 (9% fewer cache lines
    read per multiply-add, measured 7-12% faster on 14x14 and 28x28 planes) unless rounding up
    to whole tiles of 8 wastes more than that (7x7 planes: 4 vectors hold 63 positions)."""
    nv = -(-length // LANES)
    return 8 if -(-nv // 8) * 8 * 0.9 <= -(-nv // 4) * 4 else 4


# ------------------------------------------------------------------ entry point


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t


def _padding4(v) -> tuple[int, int, int, int]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 4
    t = tuple(int(a) for a in v)
    if len(t) == 2:  # (vertical, horizontal), as nn.Conv2d takes it
        return t[0], t[0], t[1], t[1]
    if len(t) != 4:
        raise ValueError(f"padding must be an int, (ph, pw) or (top, bottom, left, right), got {v!r}")
    return t


def output_size(h: int, w: int, kh: int, kw: int, stride=(1, 1), padding=(0, 0, 0, 0),
                dilation=(1, 1)) -> tuple[int, int]:
    """``(Ho, Wo)`` of a convolution (same conventions as :func:`conv2d`)."""
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, bottom, left, right = _padding4(padding)
    return (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1


@functools.lru_cache(maxsize=256)
def _geometry(cin: int, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int, hq: int, wq: int):
    """``(pys, pxs, tbl)``: the phases some tap reads and each tap's offset in an image's buffer (cached)."""
    pys = np.array(sorted({dy * dh % sh for dy in range(kh)}), dtype=np.int64)
    pxs = np.array(sorted({dx * dw % sw for dx in range(kw)}), dtype=np.int64)
    tbl = np.empty(cin * kh * kw, dtype=np.int32)
    _offsets(cin, kh, kw, sh, sw, dh, dw, pys, pxs, hq, wq, tbl)
    for a in (pys, pxs, tbl):
        a.flags.writeable = False
    return pys, pxs, tbl


def conv2d(arrays: dict[str, np.ndarray], meta: dict[str, int], x: np.ndarray, bias: np.ndarray | None = None,
           stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), out: np.ndarray | None = None) -> np.ndarray:
    """``y = conv2d(x, W) + bias`` as ``torch.nn.functional.conv2d`` computes it (zero padding, ``groups=1``).

    ``x``: float32 ``(N, in, H, W)``; ``bias``: float32 ``(out,)`` or ``None``; ``stride`` and
    ``dilation``: an int or ``(vertical, horizontal)``; ``padding``: an int, ``(ph, pw)`` or
    ``(top, bottom, left, right)``. Returns a new C-contiguous float32 ``(N, out, Ho, Wo)``, or writes it into
    ``out`` (such an array, e.g. memory written before: :mod:`sparsenn.backend.runtime.recycled`) and returns that.
    ``arrays`` must be what :func:`pack_conv` makes (see :func:`check_conv`).
    """
    out_array = out
    out, cin, kh, kw = meta["out"], meta["in"], meta["kh"], meta["kw"]
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, bottom, left, right = _padding4(padding)
    if min(sh, sw, dh, dw) < 1 or min(top, bottom, left, right) < 0:
        raise ValueError(f"stride and dilation must be positive and padding non-negative, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or x.shape[1] != cin:
        x = np.asarray(x)
        raise ValueError(f"expected float32 input of shape (N, {cin}, H, W), got {x.dtype} {x.shape}")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    n_img, _, h, w = x.shape
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"input {h}x{w} is too small for a {kh}x{kw} kernel (output {ho}x{wo})")
    if bias is None:
        bias = np.zeros(out, dtype=np.float32)
    else:
        bias = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
        if bias.shape[0] != out:
            raise ValueError(f"bias must have {out} entries, got {bias.shape[0]}")
    if out_array is None:
        y = np.empty((n_img, out, ho, wo), dtype=np.float32)
    elif not (isinstance(out_array, np.ndarray) and out_array.dtype == np.float32 and out_array.flags.c_contiguous
              and out_array.shape == (n_img, out, ho, wo)):
        got = f"{out_array.dtype} {out_array.shape}" if isinstance(out_array, np.ndarray) else type(out_array).__name__
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(n_img, out, ho, wo)}, got {got}")
    else:
        y = out_array
    if n_img == 0:
        return y
    ptr, val, tap = arrays["ptr"], arrays["val"], arrays["tap"]
    if ptr.dtype != np.int32 or tap.dtype != np.int32 or val.dtype != np.float32 or ptr.shape != (out + 1,):
        raise ValueError("arrays are not a packed convolution weight (see pack_conv and check_conv)")
    tap = tap.view(np.uint32)  # non-negative (check_conv): no negative-index checks on tbl[tap]
    direct = kh == kw == 1 and sh == sw == 1 and top == bottom == left == right == 0
    if direct:  # x itself: each image is the dense (C, H*W) matrix
        hq, wq = h, w
    else:
        hq, wq = -(-(h + top + bottom) // sh), -(-(w + left + right) // sw)
    pys, pxs, tbl = _geometry(cin, kh, kw, sh, sw, dh, dw, hq, wq)
    istride = cin * len(pys) * len(pxs) * hq * wq  # floats per image in the buffer
    if istride + LANES * (kw * dw + 1) > MAX_DIM:
        raise ValueError(f"an image's padded input ({istride} floats) does not fit int32 offsets")
    # images in groups whose padded input stays in cache between the fill and the product
    group = n_img if direct else max(1, min(n_img, GROUP_BYTES // (4 * istride)))
    tile = tile_vectors(ho * wq)
    kernel = _CONV[tile]
    ntiles = -(-(ho * wq) // (tile * LANES))
    threads = sync_threads()
    block = min(OUT_BLOCK, out)
    while block > 8 and group * -(-out // block) * -(-ntiles // CHUNK) < 4 * threads:
        block //= 2
    if direct:
        kernel(ptr, tap, val, tbl, bias, x.reshape(-1), istride, wq, ho, wo, block, CHUNK, y)
        return y
    slack = (kw - 1) * dw // sw + LANES  # read (never stored) past the last plane by its last row
    buf = aligned_empty((group * istride + slack,))
    buf[group * istride:] = 0.0
    for n0 in range(0, n_img, group):
        n1 = min(n_img, n0 + group)
        _fill(x[n0:n1], buf, top, left, sh, sw, pys, pxs, hq, wq)
        kernel(ptr, tap, val, tbl, bias, buf, istride, wq, ho, wo, block, CHUNK, y[n0:n1])
    return y


# ------------------------------------------------------------------ as a registered kernel (matrix view)
#
# Registered as kernel ``"conv"`` in :mod:`sparsenn.backend.kernels`: the same arrays, with
# the metadata of the convolution's ``(out, in * kh * kw)`` matrix view (``in`` there is
# the view's column count; ``channels`` the input channels), so that the runtime's
# checks, archives and byte counts treat it like any packed weight. A tap *is* that
# view's column index, so the CSR is also a plain CSR of the matrix view.


def pack_matrix(w2d: np.ndarray, kh: int, kw: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """:func:`pack_conv` of an ``(out, in * kh * kw)`` matrix view; ``meta``: ``out``, ``in`` (columns),
    ``channels``, ``kh``, ``kw``."""
    out, cols = w2d.shape
    kh, kw = int(kh), int(kw)
    if kh < 1 or kw < 1 or cols % (kh * kw):
        raise ValueError(f"a {out}x{cols} matrix is not the view of a convolution with a {kh}x{kw} kernel")
    arrays, meta = pack_conv(np.asarray(w2d).reshape(out, cols // (kh * kw), kh, kw))
    return arrays, {"out": out, "in": cols, "channels": meta["in"], "kh": kh, "kw": kw}


def conv_meta(meta: dict[str, int]) -> dict[str, int]:
    """:func:`pack_conv`'s metadata from :func:`pack_matrix`'s."""
    return {"out": meta["out"], "in": meta["channels"], "kh": meta["kh"], "kw": meta["kw"]}


def check_matrix(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> str | None:
    """:func:`check_conv` for :func:`pack_matrix`'s arrays, plus ``channels * kh * kw == in``."""
    why = meta_problem(meta, ("out", "in", "channels", "kh", "kw"))
    if why:
        return why
    if int(meta["channels"]) * int(meta["kh"]) * int(meta["kw"]) != int(meta["in"]):
        return (f"channels * kh * kw = {meta['channels']} * {meta['kh']} * {meta['kw']} is not "
                f"the {meta['in']} columns")
    return check_conv(arrays, conv_meta(meta))


def unpack_matrix(arrays: dict[str, np.ndarray], meta: dict[str, int]) -> np.ndarray:
    return unpack_conv(arrays, conv_meta(meta)).reshape(meta["out"], meta["in"])


@jit
def _rows_product(ptr, tap, val, x, bias, y):  # y[r, o] = bias[o] + sum_k val[k] * x[r, tap[k]]
    for r in prange(x.shape[0]):
        for o in range(ptr.shape[0] - 1):
            acc = bias[o]
            for k in range(ptr[o], ptr[o + 1]):
                acc += val[k] * x[r, tap[k]]
            y[r, o] = acc


def matmul_matrix(arrays: dict[str, np.ndarray], meta: dict[str, int], x: np.ndarray, bias: np.ndarray,
                  y: np.ndarray) -> None:
    """``y = x @ W.T + bias`` on the matrix view (rows of patches). Correct but plain: convolutions
    run :func:`conv2d`; this exists so the packed weight is an ordinary kernel everywhere else."""
    sync_threads()
    _rows_product(arrays["ptr"], arrays["tap"], arrays["val"], x, bias, y)


def describe_matrix(meta: dict[str, int]) -> str:
    return f"direct sparse {meta['kh']}x{meta['kw']} convolution, CSR of int32 taps (no im2col)"


__all__ = ["check_conv", "check_matrix", "conv2d", "conv_meta", "matmul_matrix", "output_size", "pack_conv",
           "pack_matrix", "unpack_conv", "unpack_matrix"]
