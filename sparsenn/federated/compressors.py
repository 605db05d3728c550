"""Update compressors for federated learning: dense, top-k, random-k, Sparse Ternary Compression.

Each compressor turns one tensor's update into a :class:`~sparsenn.federated.messages.Message`
(``compress``) and back into a float32 tensor (``decompress``). They choose among the entries
of a *universe*: the whole tensor, or the kept entries of a ``mask`` both sides know (a sparse
model whose mask the server fixes: nothing outside it is ever sent, and no index is needed for
the dense compressor). ``exclude`` removes entries from the choice (error feedback uses it to keep
its conservation exact, see :mod:`~sparsenn.federated.error_feedback`).

* ``dense`` (alias ``none``): every entry, float32.
* ``topk``: the ``k = round(fraction * universe)`` (at least 1) entries of largest magnitude, ties to
  the lower index (Aji & Heafield 2017; Lin et al. 2018, "Deep Gradient Compression").
* ``randomk``: ``k`` entries drawn uniformly without replacement; with ``unbiased=True`` they are
  scaled by ``universe / k`` so that the expectation is the update (Stich et al. 2018,
  "Sparsified SGD with Memory", use it unscaled with memory).
* ``stc``: top-k, then every kept entry becomes ``sign * mu`` with ``mu`` the mean kept
  magnitude; positions Golomb-coded (Sattler et al. 2019, "Robust and Communication-Efficient
  Federated Learning from Non-IID Data", Algorithm 1).

``biased`` says whether the compressor needs error feedback to converge (all but dense and
unbiased random-k). :data:`COMPRESSORS` is the name-keyed registry; :func:`make_compressor`
builds one by name and lists the valid names for an unknown one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.registry import Registry
from ..core.selection import top_k_stable
from .messages import Message, decode, encode, encode_ternary

__all__ = ["COMPRESSORS", "STC", "Compressor", "Dense", "RandomK", "TopK", "list_compressors", "make_compressor"]

COMPRESSORS: Registry = Registry("compressor")


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {value!r}")
    return float(value)


class Compressor:
    """Base class: a subclass implements :meth:`_compress` over the flat universe vector."""

    name = "compressor"
    biased = True

    def compress(self, update: torch.Tensor, *, mask: torch.Tensor | None = None,
                 exclude: torch.Tensor | None = None) -> Message:
        """Encode ``update``; ``mask``: the kept entries both sides know; ``exclude``: entries never to send."""
        if not isinstance(update, torch.Tensor) or not update.is_floating_point():
            raise TypeError(f"update must be a floating-point tensor, got {type(update).__name__}")
        update = update.detach().cpu()
        if not bool(torch.isfinite(update).all()):
            raise ValueError("update contains NaN or Inf; it cannot be compressed")
        flat = update.reshape(-1)
        where = None if mask is None else mask.reshape(-1).cpu()
        vector = flat if where is None else flat[where]
        allowed = None
        if exclude is not None:
            if tuple(exclude.shape) != tuple(update.shape) or exclude.dtype != torch.bool:
                raise ValueError(f"exclude must be a bool tensor of shape {tuple(update.shape)}")
            keep = ~exclude.reshape(-1).cpu()
            allowed = keep if where is None else keep[where]
        return self._compress(tuple(update.shape), vector, allowed, mask)

    def decompress(self, message: Message | bytes, *, mask: torch.Tensor | None = None,
                   shape=None) -> torch.Tensor:
        """The float32 tensor the message carries (checks the message: see :func:`~.messages.decode`)."""
        if shape is None and isinstance(message, Message):
            shape = message.shape
        return decode(message, shape=shape, mask=mask)

    def _compress(self, shape, vector: torch.Tensor, allowed: torch.Tensor | None,
                  mask: torch.Tensor | None) -> Message:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _candidates(vector: torch.Tensor, allowed: torch.Tensor | None) -> int:
    return vector.numel() if allowed is None else int(allowed.sum())


def _count(fraction: float, universe: int, available: int) -> int:
    return min(max(1, round(fraction * universe)), available) if universe else 0


def _top(vector: torch.Tensor, allowed: torch.Tensor | None, k: int) -> torch.Tensor:
    scores = vector.abs().double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return top_k_stable(scores, k).nonzero().squeeze(1)


@COMPRESSORS.register("dense")
class Dense(Compressor):
    """Every entry of the universe, float32: FedAvg's plain update (McMahan et al. 2017)."""

    name = "dense"
    biased = False

    def __init__(self, *, index: str = "auto"):
        self.index = index

    def _compress(self, shape, vector, allowed, mask):
        positions = torch.arange(vector.numel()) if allowed is None else allowed.nonzero().squeeze(1)
        return encode(shape, positions, vector[positions], mask=mask, index=self.index)


COMPRESSORS.register("none", Dense)


@COMPRESSORS.register("topk")
class TopK(Compressor):
    """The ``round(fraction * universe)`` entries of largest magnitude (at least one), float32."""

    name = "topk"

    def __init__(self, fraction: float = 0.01, *, index: str = "auto"):
        self.fraction, self.index = _fraction(fraction), index

    def _compress(self, shape, vector, allowed, mask):
        k = _count(self.fraction, vector.numel(), _candidates(vector, allowed))
        positions = _top(vector, allowed, k)
        return encode(shape, positions, vector[positions], mask=mask, index=self.index)

    def to_dict(self):
        return {"name": self.name, "fraction": self.fraction, "index": self.index}


@COMPRESSORS.register("randomk")
class RandomK(Compressor):
    """``round(fraction * universe)`` entries drawn uniformly without replacement from a seeded generator;
    ``unbiased=True`` scales them by ``candidates / k`` (then ``E[decompress(compress(x))] == x``)."""

    name = "randomk"

    def __init__(self, fraction: float = 0.01, *, unbiased: bool = False, seed: int = 0, index: str = "auto"):
        if not isinstance(unbiased, bool):
            raise TypeError(f"unbiased must be True or False, got {unbiased!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.fraction, self.unbiased, self.seed, self.index = _fraction(fraction), unbiased, seed, index
        self.biased = not unbiased
        self.generator = torch.Generator().manual_seed(seed)

    def _compress(self, shape, vector, allowed, mask):
        pool = torch.arange(vector.numel()) if allowed is None else allowed.nonzero().squeeze(1)
        k = _count(self.fraction, vector.numel(), pool.numel())
        positions = pool[torch.randperm(pool.numel(), generator=self.generator)[:k]].sort().values
        values = vector[positions].double()
        if self.unbiased and k:
            values = values * (pool.numel() / k)
        return encode(shape, positions, values, mask=mask, index=self.index)

    def to_dict(self):
        return {"name": self.name, "fraction": self.fraction, "unbiased": self.unbiased, "seed": self.seed,
                "index": self.index}


@COMPRESSORS.register("stc")
class STC(Compressor):
    """Sparse Ternary Compression (Sattler et al. 2019, Algorithm 1): top-k, then ``sign * mean |kept|``;
    positions Golomb-coded by default (``index="golomb"``, as in the paper's bit count)."""

    name = "stc"

    def __init__(self, fraction: float = 0.01, *, index: str = "golomb"):
        self.fraction, self.index = _fraction(fraction), index

    def _compress(self, shape, vector, allowed, mask):
        k = _count(self.fraction, vector.numel(), _candidates(vector, allowed))
        positions = _top(vector, allowed, k)
        kept = vector[positions].double()
        mu = float(kept.abs().mean()) if k else 0.0  # over the top k, as in the paper
        nonzero = kept != 0  # sign(0) = 0: a zero among the top k stays 0 and is not sent
        return encode_ternary(shape, positions[nonzero], kept[nonzero] < 0, mu, mask=mask, index=self.index)

    def to_dict(self):
        return {"name": self.name, "fraction": self.fraction, "index": self.index}


def list_compressors() -> list[str]:
    return COMPRESSORS.names()


def make_compressor(spec: str | dict | Compressor, **kwargs: Any) -> Compressor:
    """A compressor from a name (``"topk"``), a dict (``{"name": "topk", "fraction": 0.1}``) or an instance."""
    if isinstance(spec, Compressor):
        if kwargs:
            raise ValueError("keyword arguments are only for a compressor given by name")
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name is None:
            raise ValueError(f"a compressor dict needs a 'name'; valid names: {', '.join(list_compressors())}")
        return COMPRESSORS.get(name)(**spec, **kwargs)
    return COMPRESSORS.get(spec)(**kwargs)
