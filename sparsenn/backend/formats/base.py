"""The common interface of the exact storage formats, and the index dtype rule.

A format holds one weight as numpy arrays. Like :mod:`sparsenn.core.patterns` it views the
weight as a matrix: rows are ``shape[0]`` (output units, filters), columns everything
else flattened in PyTorch order, so a conv weight ``(out, in, kh, kw)`` is the
``(out, in*kh*kw)`` matrix of the unfolded (im2col) product; :meth:`to_dense` restores
the original shape. Tensors with fewer than 2 dimensions are refused.

Exactness: ``to_dense()`` has the weight's shape, dtype and values (``torch.equal``;
nonzero values bit for bit). An entry is *zero* when it compares equal to 0, so the
sparse formats keep no sign of zero: a ``-0.0`` comes back as ``+0.0``. NaN is nonzero.

Bytes: ``nbytes`` is the exact sum of ``a.nbytes`` over :meth:`arrays`, the arrays the
format stores. Shape, dtype and format parameters (block, n, m) are not counted (a
header of a few bytes, the same for every weight of a model).
"""

from __future__ import annotations

import math

import numpy as np
import torch

_INDEX_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)


class FormatError(ValueError):
    """A weight or an option a format cannot take (bad shape, block, n:m, not N:M)."""


class UnrepresentableError(FormatError):
    """A valid weight the format cannot hold as it is (not N:M, columns not a multiple of m)."""


def index_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype holding every value in ``[0, max_value]``.

    ``uint8`` up to 255, ``uint16`` up to 65535, ``uint32`` up to 2**32 - 1, else ``uint64``.
    """
    for dt in _INDEX_DTYPES:
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise FormatError(f"index value {max_value} does not fit in uint64")


def as_index(values: np.ndarray, max_value: int) -> np.ndarray:
    """``values`` as the index dtype for ``max_value`` (the largest value the array may hold)."""
    return np.ascontiguousarray(values, dtype=index_dtype(max_value))


def check_weight(weight: object) -> torch.Tensor:
    """A detached CPU tensor with at least 2 dimensions, else a TypeError/FormatError naming it."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise FormatError(
            f"weight must have at least 2 dimensions (a matrix, or a conv weight (out, in, *kernel)), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.is_sparse or weight.layout != torch.strided:
        raise FormatError(f"weight must be a dense (strided) tensor, got layout {weight.layout}")
    return weight.detach().cpu()


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(shape[0], prod(shape[1:]))``: the matrix view."""
    return shape[0], math.prod(shape[1:])


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous numpy copy of ``t``; ``bfloat16`` (unknown to numpy) as its raw ``uint16`` bits."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).copy()
    return t.numpy().copy()


def to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_numpy`."""
    a = np.ascontiguousarray(a)
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def matrix_and_mask(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The matrix view of a checked weight as numpy, and its nonzero mask (``w != 0``)."""
    rows, cols = matrix_shape(tuple(weight.shape))
    w = weight.reshape(rows, cols)
    return to_numpy(w), (w != 0).numpy()


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise FormatError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class SparseFormat:
    """Base class: one weight stored as numpy arrays (see the module doc).

    Subclasses set :attr:`name`, implement :meth:`from_dense`, :meth:`arrays` and
    :meth:`_matrix` (the dense matrix view as numpy).
    """

    #: registry name
    name: str = ""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, nnz: int):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        #: nonzero entries of the weight (explicit zeros a format stores are not counted)
        self.nnz = int(nnz)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, **options) -> SparseFormat:
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        """``{name: array}`` of everything stored; ``nbytes`` is the sum of their ``nbytes``."""
        raise NotImplementedError

    def _matrix(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """The format's name with its parameters (``"csr"``, ``"bsr4x4"``, ``"2:4"``)."""
        return self.name

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays().values()))

    @property
    def stored_values(self) -> int:
        """Values stored, explicit zeros included (BSR blocks, N:M slots)."""
        return int(self.arrays()["values"].size)

    def to_dense(self) -> torch.Tensor:
        """The weight: original shape and dtype, values equal to the input's (zeros as ``+0.0``)."""
        return to_torch(self._matrix(), self.dtype).reshape(self.shape)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={a.dtype}[{'x'.join(map(str, a.shape))}]" for k, a in self.arrays().items())
        spec = "" if self.spec == self.name else f"{self.spec}, "
        return (f"{type(self).__name__}({spec}shape={self.shape}, dtype={self.dtype}, nnz={self.nnz}, "
                f"nbytes={self.nbytes}; {parts})")


class Dense(SparseFormat):
    """The dense tensor itself: ``nbytes = numel * itemsize``; keeps ``-0.0`` too."""

    name = "dense"

    def __init__(self, values: np.ndarray, shape, dtype, nnz):
        super().__init__(shape, dtype, nnz)
        self.values = values

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> Dense:
        w = check_weight(weight)
        return cls(to_numpy(w.reshape(matrix_shape(tuple(w.shape)))), w.shape, w.dtype, int(torch.count_nonzero(w)))

    def arrays(self):
        return {"values": self.values}

    def _matrix(self):
        return self.values
