"""Inference layers that run a sparse kernel or the dense product, chosen per batch size.

:class:`SparseLinear` holds what its plan needs as buffers, so ``state_dict`` and
:func:`sparsenn.backend.runtime.save` carry it: per kernel used, that kernel's packed
arrays (``<kernel>_<array>``, e.g. ``csr_panel_ptr``); the dense ``weight`` if some
batch size runs dense; ``bias`` if the layer had one. The plan (``{rows: kernel}``,
rows = the product of the input's leading dims) and the kernels' integer metadata
travel as the module's extra state. State from elsewhere is checked before a kernel
reads it (:mod:`.validate`): ``set_extra_state`` checks the plan and metadata, and the
first product after any state change checks the packed arrays and the bias
(:class:`~.errors.ArchiveError`).

Dispatch: a call with ``rows`` rows runs the plan's entry for the measured row count
nearest to ``rows`` on a log scale (the larger one on a tie), memoized per row count
(per input shape for convolutions). The dense path is meant to cost what ``nn.Linear``
/ ``nn.Conv2d`` cost: one memo lookup, then ``F.linear`` / ``F.conv2d`` with no input
checks; when PyTorch rejects the input there, the error is re-raised as the same
TypeError / ValueError the sparse path gives (naming the layer, expected and given).
The sparse paths check dtype and shape before a kernel reads the input. Kernels:

- ``"dense"``: ``torch.nn.functional.linear`` on the dense weight (any device/dtype);
- a name from :mod:`sparsenn.backend.kernels` (CPU, float32);
- ``"semi_structured"``: ``torch.sparse.to_sparse_semi_structured`` 2:4 weight (CUDA).

:class:`SparseConv2d` runs the same products on the convolution's matrix view
``(out, in * kh * kw)``: a 1x1 convolution (stride s: every s-th pixel) directly over
channels, a ``kh x kw`` one on ``torch.nn.functional.unfold``'s patches (im2col); or,
with the ``conv`` kernel, as a direct sparse convolution on the NCHW input without
im2col (:mod:`sparsenn.backend.kernels.conv`). Its
output has the input's memory format (NCHW-contiguous, or channels_last for a
channels_last input), as ``F.conv2d``'s.
These layers are for inference: they compute no gradients. Under ``torch.compile`` each
sparse layer runs eagerly (dynamo graph-breaks around it; the rest of the model
compiles), so compiled and eager outputs are the same; ``fullgraph=True`` is not
possible with sparse layers in the model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels as K
from ..kernels import _activations
from . import recycled
from .errors import ArchiveError
from .validate import DENSE, SEMI_STRUCTURED, check_bias, check_packed, check_state

_SEP = "_"
DIRECT_CONV = "conv"  # the registered kernel that runs a convolution without im2col


@torch.compiler.disable
def _run_eagerly(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` outside ``torch.compile``'s tracing: a graph break, then the eager forward.

    Dynamo cannot trace the kernels (numba, on NumPy views of the buffers); tracing into
    them failed outright under ``torch.inference_mode`` (a guard on those arrays).
    """
    return layer.forward(x)


def _nearest(plan: dict[int, str], rows: int) -> str:
    keys = sorted(plan)
    if len(keys) == 1:
        return plan[keys[0]]
    lr = math.log(max(rows, 1))
    best = min(keys, key=lambda k: (abs(math.log(k) - lr), -k))
    return plan[best]


class _SparseProduct(nn.Module):
    """The shared part: packed buffers, the plan, dispatch and input checks for ``(rows, in)`` products."""

    def __init__(self, out_features: int, in_features: int, plan: dict[int, str],
                 packed: dict[str, K.Packed] | None = None, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, label: str = ""):
        super().__init__()
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.plan = {int(k): str(v) for k, v in plan.items()}
        if not self.plan:
            raise ValueError("a plan needs at least one (rows, kernel) entry")
        self.label = label
        self.kernel_meta: dict[str, dict[str, int]] = {}  # key -> the packed weight's metadata
        self.kernel_of: dict[str, str] = {}  # key ("csr", "bsr4x1", ...) -> registered kernel name
        self.kernel_arrays: dict[str, list[str]] = {}  # key -> names of its arrays (buffers "<key>_<name>")
        packed = packed or {}
        for key in sorted(set(self.plan.values()) | set(packed)):
            if key in (DENSE, SEMI_STRUCTURED):
                if weight is None:
                    raise ValueError(f"plan uses {key!r} but no dense weight was given")
                continue
            if key not in packed:
                raise ValueError(f"plan uses kernel {key!r} but no packed weight was given for it")
            p = packed[key]
            self.kernel_meta[key] = dict(p.meta)
            self.kernel_of[key] = p.kernel
            self.kernel_arrays[key] = list(p.arrays)
            for name, array in p.arrays.items():
                self.register_buffer(key + _SEP + name, torch.from_numpy(np.ascontiguousarray(array)))
        needs_dense = any(k in (DENSE, SEMI_STRUCTURED) for k in self.plan.values())
        self.register_buffer("weight", weight.detach().reshape(out_features, -1).clone() if needs_dense else None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.forced: str | None = None  # a kernel to run whatever the plan says (used while measuring)
        self._reset()

    def _reset(self) -> None:
        """Drop what is derived from the buffers and the plan (rebuilt lazily on the next call)."""
        self._fast: dict[str, Any] = {}  # key -> (matmul, numpy views of the buffers, meta); or the 2:4 tensor
        self._row: dict[str, Any] = {}  # key -> a bound one-row product f(x, y) (kernels that have one)
        self._route: dict[Any, str] = {}  # rows (convolutions: input shape) -> kernel, memo of the plan
        self._zeros: np.ndarray | None = None
        w = self._buffers.get("weight")
        self._dtype = w.dtype if w is not None and not self.kernel_meta else torch.float32  # expected input

    def set_plan(self, rows: int, kernel: str) -> None:
        """Run ``kernel`` (``"dense"`` needs the dense ``weight``) for calls nearest to ``rows`` rows."""
        if kernel in (DENSE, SEMI_STRUCTURED) and self.weight is None:
            raise ValueError(f"{self._name()} has no dense weight for kernel {kernel!r}")
        if kernel not in (DENSE, SEMI_STRUCTURED) and kernel not in self.kernel_meta:
            raise ValueError(f"{self._name()} holds no packed weight for kernel {kernel!r}; "
                             f"it holds: {', '.join(self.kernel_meta) or 'none'}")
        self.plan[int(rows)] = kernel
        self._reset()

    def drop_unused(self) -> None:
        """Free the packed arrays of kernels the plan no longer runs (and the dense weight if nothing runs dense)."""
        used = set(self.plan.values())
        for key in [k for k in self.kernel_meta if k not in used]:
            for name in self.kernel_arrays.pop(key):
                del self._buffers[key + _SEP + name]
            del self.kernel_meta[key], self.kernel_of[key]
        if not used & {DENSE, SEMI_STRUCTURED}:
            self.weight = None
        self._reset()

    # -- state: plan and metadata travel with state_dict (extra state) and pickling
    def get_extra_state(self) -> dict[str, Any]:
        return {"plan": {str(r): k for r, k in self.plan.items()},
                "kernel_meta": {k: dict(v) for k, v in self.kernel_meta.items()},
                "kernel_of": dict(self.kernel_of), "kernel_arrays": {k: list(v) for k, v in self.kernel_arrays.items()},
                "label": self.label}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        s = check_state(self._name(), state)  # ArchiveError, the layer unchanged, if malformed
        absent = [f"{k}{_SEP}{a}" for k, names in s["kernel_arrays"].items() for a in names
                  if f"{k}{_SEP}{a}" not in self._buffers]
        dense = [k for k in s["plan"].values() if k in (DENSE, SEMI_STRUCTURED)]
        if absent or (dense and self._buffers.get("weight") is None):
            raise ArchiveError(f"{self._name()}: the state needs buffers this layer does not hold: "
                               f"{absent or ['weight']}")
        self.plan, self.kernel_meta = s["plan"], s["kernel_meta"]
        self.kernel_of, self.kernel_arrays = s["kernel_of"], s["kernel_arrays"]
        self.label = state.get("label", self.label)
        self._reset()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dict__.get("_buffers", ()):  # a buffer replaced (layer.bias = ...): views of the old
            self._reset()  # one are stale; the next product re-checks and re-reads the buffers

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._reset()  # buffers may have been replaced (.to(), .half(), .share_memory_())
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_fast={}, _route={}, _zeros=None, _row={})
        return state

    def kernel_for(self, rows: int) -> str:
        """The kernel a call with ``rows`` rows runs (``forced``, when set, overrides the plan)."""
        return self.forced or self._route.get(rows) or self._memo(rows, rows)

    def _memo(self, key: Any, rows: int) -> str:
        """The plan's kernel for ``rows``, remembered under ``key`` (at most 1024 keys are kept)."""
        if len(self._route) >= 1024:
            self._route.clear()
        kernel = self._route[key] = _nearest(self.plan, rows)
        return kernel

    def packed(self, key: str) -> K.Packed:
        """The packed weight stored under ``key`` (numpy views of the buffers)."""
        arrays = {a: self._buffers[key + _SEP + a].numpy() for a in self.kernel_arrays[key]}
        return K.Packed(self.kernel_of[key], arrays, self.kernel_meta[key])

    def checked(self, key: str) -> K.Packed:
        """:meth:`packed`, after checking the arrays and the bias a kernel will read (ArchiveError if unsafe)."""
        p = self.packed(key)
        check_packed(self._name(), key, p, self.out_features, self.in_features)
        check_bias(self._name(), self.bias, self.out_features, torch.float32)
        return p

    def _bias_np(self) -> np.ndarray:
        if self.bias is not None:
            return self.bias.numpy()
        if self._zeros is None or self._zeros.shape[0] != self.out_features:
            self._zeros = np.zeros(self.out_features, dtype=np.float32)
        return self._zeros

    def _name(self) -> str:
        return f"{type(self).__name__}{f' {self.label!r}' if self.label else ''}"

    def _check_dtype(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._name()} expects a tensor, got {type(x).__name__}")
        if x.dtype != self._dtype:
            raise TypeError(f"{self._name()} expects {str(self._dtype).removeprefix('torch.')} input, "
                            f"got {str(x.dtype).removeprefix('torch.')}")

    def _check_input(self, x: torch.Tensor) -> None:  # overridden: dtype, then the layer's shape
        self._check_dtype(x)

    def _prepare(self, kernel: str) -> tuple:
        """The first product with ``kernel`` since the state changed: check what it will read, bind it."""
        p = self.checked(kernel)
        spec = K.KERNELS.get(p.kernel)
        fast = self._fast[kernel] = (spec.matmul, p.arrays, p.meta, self._bias_np())
        if spec.row is not None:
            self._row[kernel] = spec.row(p.arrays, p.meta, fast[3])
        return fast

    def matmul_rows(self, x2: torch.Tensor, kernel: str | None = None, act: int = 0) -> torch.Tensor:
        """``x2 (rows, in) @ W^T + b`` with the planned kernel (or ``kernel``); ``act``: an activation code
        the kernel applies in its epilogue (only for kernels registered with ``activations=True``)."""
        rows = x2.shape[0]
        kernel = kernel or self.kernel_for(rows)
        if kernel == DENSE:
            return F.linear(x2, self.weight, self.bias)
        if kernel == SEMI_STRUCTURED:
            if kernel not in self._fast:
                self._fast[kernel] = torch.sparse.to_sparse_semi_structured(self.weight)
            return F.linear(x2, self._fast[kernel], self.bias)
        fast = self._fast.get(kernel) or self._prepare(kernel)
        if x2.device.type != "cpu":
            raise ValueError(f"{self._name()} runs kernel {kernel!r} on the CPU; got an input on {x2.device}")
        if x2.requires_grad:
            x2 = x2.detach()
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        if act:
            fast[0](fast[1], fast[2], x2.contiguous().numpy(), fast[3], y.numpy(), act)
        else:
            fast[0](fast[1], fast[2], x2.contiguous().numpy(), fast[3], y.numpy())
        return y


class SparseLinear(_SparseProduct):
    """``y = x W^T + b`` (like ``nn.Linear``) with the kernel planned for the batch size.

    Build it with :func:`sparsenn.convert` or :meth:`from_linear`; the input must be
    float32 (for the CPU kernels) with ``in_features`` in its last dimension.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, plan: dict[int, str], packed: dict[str, K.Packed] | None = None,
                    label: str = "", weight: torch.Tensor | None = None) -> SparseLinear:
        w = linear.weight if weight is None else weight
        return cls(linear.out_features, linear.in_features, plan, packed, w, linear.bias, label)

    def extra_repr(self) -> str:
        plan = ", ".join(f"{r}: {k}" for r, k in sorted(self.plan.items()))
        return f"in_features={self.in_features}, out_features={self.out_features}, plan={{{plan}}}"

    def one_row(self):
        """The bound one-row product ``f(x, y)`` (``y = W x + b`` into ``y``, both contiguous float32 CPU tensors
        of ``in``/``out`` elements) of the kernel planned for one row; ``None`` where that kernel has none
        (``"dense"``, 2:4, kernels without a one-row path). Bound again after any change of state."""
        kernel = self.forced or self._route.get(1) or self._memo(1, 1)
        row = self._row.get(kernel)
        if row is None and kernel not in (DENSE, SEMI_STRUCTURED) and kernel not in self._fast:
            self._prepare(kernel)
            row = self._row.get(kernel)
        return row

    def _check_input(self, x: torch.Tensor) -> None:
        self._check_dtype(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self._name()} expects input of shape (*, {self.in_features}), "
                             f"got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # under torch.compile this layer runs eagerly (a graph break)
            return _run_eagerly(self, x)
        # the dense path is kept as short as nn.Linear's: a memo lookup, then F.linear
        try:
            rows = x.shape[0] if x.dim() == 2 else math.prod(x.shape[:-1])
            kernel = self.forced or self._route.get(rows)
        except (AttributeError, TypeError):  # not a tensor
            self._check_input(x)
            raise
        if kernel is None:
            self._check_input(x)
            kernel = self._memo(rows, rows)
        if kernel == DENSE:
            buffers = self._buffers
            try:
                return F.linear(x, buffers["weight"], buffers["bias"])
            except RuntimeError:
                self._check_input(x)  # a clear TypeError / ValueError where the input is wrong
                raise
        row = self._row.get(kernel) if rows == 1 else None
        if row is not None and x.dtype == torch.float32 and x.shape[-1] == self.in_features \
                and x.device.type == "cpu" and x.is_contiguous():  # one row (decoding): the shortest path
            y = torch.empty(*x.shape[:-1], self.out_features)
            row(x, y)
            return y
        self._check_input(x)
        if x.dim() == 2:
            return self.matmul_rows(x, kernel)
        lead = x.shape[:-1]
        return self.matmul_rows(x.reshape(-1, self.in_features), kernel).reshape(*lead, self.out_features)

    def activated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """``activation(self(x))`` (``"gelu"``: exact GELU), applied by the planned kernel as it writes its
        outputs where it has such an epilogue (:mod:`sparsenn.backend.kernels._activations`; the result
        then differs from ``F.gelu``'s by the epilogue's rounding, about ``1e-6`` relative), else by
        ``F.gelu`` after the product (the dense path and kernels without an epilogue)."""
        act = _activations.code(activation)
        rows = math.prod(x.shape[:-1]) if isinstance(x, torch.Tensor) and x.dim() else 0
        kernel = None if torch.compiler.is_compiling() else self.kernel_for(rows)
        spec = K.KERNELS.get(self.kernel_of[kernel]) if kernel in self.kernel_of else None
        if spec is None or not spec.activations:
            return _activations.TORCH_FUNCTIONS[activation](self(x))
        self._check_input(x)
        return self.matmul_rows(x.reshape(-1, self.in_features), kernel, act).reshape(*x.shape[:-1],
                                                                                     self.out_features)


class SparseConv2d(_SparseProduct):
    """A 2-D convolution (``groups=1``) as a product with its ``(out, in*kh*kw)`` matrix view.

    Rows of the product are the output pixels of every image: ``N * H_out * W_out``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int, int, int], dilation: tuple[int, int],
                 padding_mode: str, plan: dict[int, str], packed: dict[str, K.Packed] | None = None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, label: str = ""):
        kh, kw = kernel_size
        super().__init__(out_channels, in_channels * kh * kw, plan, packed, weight, bias, label)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (int(kh), int(kw))
        self.stride = tuple(int(s) for s in stride)
        self.padding = tuple(int(p) for p in padding)  # (left, right, top, bottom), as F.pad takes it
        self.dilation = tuple(int(d) for d in dilation)
        self.padding_mode = padding_mode

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, plan: dict[int, str], packed: dict[str, K.Packed] | None = None,
                  label: str = "", weight: torch.Tensor | None = None) -> SparseConv2d:
        w = conv.weight if weight is None else weight
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   tuple(conv._reversed_padding_repeated_twice), conv.dilation, conv.padding_mode,
                   plan, packed, w, conv.bias, label)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "padding_mode": self.padding_mode}

    def extra_repr(self) -> str:
        plan = ", ".join(f"{r}: {k}" for r, k in sorted(self.plan.items()))
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"plan={{{plan}}}")

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self.padding
        return ((h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1)

    def rows(self, x_shape: tuple[int, ...]) -> int:
        """Rows of the product for an input of shape ``x_shape`` (``(N, C, H, W)`` or ``(C, H, W)``)."""
        n = x_shape[0] if len(x_shape) == 4 else 1
        ho, wo = self.output_size(x_shape[-2], x_shape[-1])
        return n * ho * wo

    def patches(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``(rows, in*kh*kw)`` patches of a 4-D input and the output size."""
        n, _, h, w = x.shape
        ho, wo = self.output_size(h, w)
        if any(self.padding):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.padding, mode=mode)
        if self.kernel_size == (1, 1):
            if self.stride != (1, 1):
                x = x[:, :, ::self.stride[0], ::self.stride[1]]
            return x.permute(0, 2, 3, 1).reshape(n * ho * wo, self.in_channels), ho, wo
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(n * ho * wo, self.in_features), ho, wo

    def _check_input(self, x: torch.Tensor) -> None:
        self._check_dtype(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"{self._name()} expects input of shape (N, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # under torch.compile this layer runs eagerly (a graph break)
            return _run_eagerly(self, x)
        # the dense path is kept as short as nn.Conv2d's: a memo lookup (by input shape), then F.conv2d
        try:
            shape = x.shape
        except AttributeError:  # not a tensor
            self._check_input(x)
            raise
        kernel = self.forced or self._route.get(shape)
        if kernel is None:
            self._check_input(x)
            kernel = self._memo(shape, self.rows(tuple(shape)))
        if kernel == DENSE:
            try:
                return self._dense_conv(x)
            except RuntimeError:
                self._check_input(x)
                raise
        self._check_input(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self.kernel_of.get(kernel) == DIRECT_CONV:
            y = self._direct_conv(x, kernel)
            return y[0] if unbatched else y
        n = x.shape[0]
        x2, ho, wo = self.patches(x)
        y = self.matmul_rows(x2, kernel).view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        # The product is pixel-major, i.e. channels_last. Hand it on in the input's layout, as F.conv2d
        # does: the next layers ran up to 3.5x slower on a channels_last view in an NCHW model (BN, add
        # and a 3x3 conv at 512x7x7: 14 ms vs 4 ms), for want of a 0.05 ms copy.
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y[0] if unbatched else y

    def _direct_conv(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """The ``conv`` kernel (:mod:`sparsenn.backend.kernels.conv`): no im2col, NCHW in and out."""
        fast = self._fast.get(kernel)
        if fast is None:  # first product since the state changed: check what the kernel will read
            p = self.checked(kernel)
            if (p.meta["channels"], p.meta["kh"], p.meta["kw"]) != (self.in_channels, *self.kernel_size):
                raise ArchiveError(f"{self._name()}: packed weight {kernel!r} is a {p.meta['kh']}x{p.meta['kw']} "
                                   f"convolution of {p.meta['channels']} channels, the layer a "
                                   f"{self.kernel_size[0]}x{self.kernel_size[1]} one of {self.in_channels}")
            fast = self._fast[kernel] = (p.arrays, K.conv.conv_meta(p.meta), self._bias_np())
        if x.device.type != "cpu":
            raise ValueError(f"{self._name()} runs kernel {kernel!r} on the CPU; got an input on {x.device}")
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        left, right, top, bottom = self.padding
        if self.padding_mode != "zeros" and any(self.padding):
            x = F.pad(x, self.padding, mode=self.padding_mode)
            left = right = top = bottom = 0
        ho, wo = K.conv.output_size(x.shape[2], x.shape[3], *self.kernel_size, self.stride, (top, bottom, left, right),
                                    self.dilation)
        y = recycled.empty((x.shape[0], self.out_channels, max(ho, 0), max(wo, 0)))  # big outputs: warm memory
        K.conv.conv2d(fast[0], fast[1], x.detach().contiguous().numpy(), fast[2], self.stride,
                      (top, bottom, left, right), self.dilation, out=y.numpy())
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    def _dense_conv(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        w = buffers["weight"]
        args = self._fast.get(DENSE)
        if args is None or args[0] is not w:  # the 4-D view of the weight and F.conv2d's arguments, once
            left, right, top, bottom = self.padding
            pad = self.padding_mode != "zeros" or left != right or top != bottom
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            args = self._fast[DENSE] = (w, w.view(self.out_channels, self.in_channels, *self.kernel_size),
                                        self.stride, (0, 0) if pad else (top, left), self.dilation,
                                        mode if pad else None)
        _, w4, stride, padding, dilation, mode = args
        if mode is not None:
            x = F.pad(x, self.padding, mode=mode)
        return F.conv2d(x, w4, buffers["bias"], stride, padding, dilation)
