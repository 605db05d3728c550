"""The attention of LLaMA-family decoders over one stacked q/k/v product, with the rotary embedding in three operations.

A ``transformers`` LLaMA-style attention module (``LlamaAttention``, ``MistralAttention``,
``Qwen2Attention``, ...) computes its query, key and value projections, applies the rotary
position embedding (Su et al. 2021, "RoFormer") to the query and the key, updates the KV
cache and calls the attention function. Decoding one token, the products are tens of
microseconds and the rest is about 40 tensor operations of a few microseconds each, per
block: the three projections' views and transposes, and the rotary embedding's
``q * cos + rotate_half(q) * sin`` for both q and k (two slices, a negation and a
concatenation each).

Once :mod:`.siblings` has stacked ``q_proj``, ``k_proj`` and ``v_proj`` into one product,
:class:`FusedAttention` calls it directly, views its output as heads, and applies the
rotary embedding to the query and key heads together: ``rotate_half(x) * sin`` is
``swap_halves(x) * sin'`` with the sign folded into ``sin'`` (computed once per forward and
shared by every block), so it is ``addcmul(x * cos, x.flip(halves), sin')``. The KV cache
update and the attention function are the module's own (the same ``cache.update`` call and
``ALL_ATTENTION_FUNCTIONS`` entry, so masks, caches and attention implementations behave
as before).

:func:`fuse_attentions` replaces a module only when it is shown to compute exactly that: its
``q_proj``, ``k_proj`` and ``v_proj`` are the members of one stacked product, it has an
``o_proj``, no hooks, and on a random input, random rotary tables, a random additive mask and
a recording KV cache its output and its cache calls equal the original's. Any other formula
under the same names (partial rotary, per-head norms of q and k, another cache protocol)
fails the check and the module stays. The new module keeps the same children under the same
names, so the state dict is unchanged.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn

from ..kernels.attention import decode_attention
from .kv_cache import append as append_kv
from .replace import KeepsClass, adopt, has_forward_hooks, replace_checked
from .siblings import SiblingSlice, _version

ATTENTIONS_ATTR = "fused_attentions"  #: on a converted model: the names of the modules replaced (save/load rebuild them)
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")
_DECODE_KWARGS = {"position_ids", "use_cache", "cache_position"}  # what a decoding step passes along (no option)
_COPIED = ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout", "is_causal")


_REGISTRY: list = []


def _registry():
    """``transformers``' table of attention functions (imported once, when a fused attention first runs)."""
    if not _REGISTRY:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _REGISTRY.append(ALL_ATTENTION_FUNCTIONS)
    return _REGISTRY[0]


def _signed_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and the signed ``sin`` (``rotate_half``'s sign folded in), broadcast over heads."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(-2), signed.unsqueeze(-2)  # (B, L, 1, D): over the heads of a (B, L, H, D) view


class _RotaryTables:
    """``build(cos, sin)`` of the last position embeddings seen (default: :func:`_signed_tables`); one forward
    passes the same pair to every block, so it is computed once, not once per block. Keyed by the tensors'
    identity and version counters. One tuple, read and replaced whole, so threads decoding different models
    never mix their tables."""

    def __init__(self, build=_signed_tables):
        self.build = build
        self.entry: tuple = ()

    def get(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        versions = (_version(cos), _version(sin))
        e = self.entry
        if e and e[0] is cos and e[1] is sin and e[2] == versions:
            return e[3]
        tables = self.build(cos, sin)
        self.entry = (cos, sin, versions, tables)
        return tables


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` of shape ``(..., D)``."""
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


class FusedAttention(KeepsClass):
    """A LLaMA-style attention whose q/k/v come from one stacked product, rotary-embedded in three operations;
    an instance of the replaced module's class too (:class:`.replace.KeepsClass`)."""

    _tables = _RotaryTables()  # shared by every block (and model): keyed by the tables' identity

    def __init__(self, original: nn.Module):
        nn.Module.__init__(self)
        adopt(self, original, _COPIED)
        q, k, v = original.q_proj, original.k_proj, original.v_proj
        self.__dict__["stacked"] = q.fused  # a child already: not registered twice
        self.parts = (q.index, k.index, v.index)
        d = int(self.head_dim)
        self.heads = tuple(q.fused.sizes[i] // d for i in self.parts)
        self.qk_adjacent = k.index == q.index + 1
        # the implementation the original falls back to when config._attn_implementation is "eager"
        self.eager = getattr(sys.modules.get(type(original).__module__), "eager_attention_forward", None)
        self.training = original.training

    def extra_repr(self) -> str:
        return f"heads={self.heads[0]}, kv_heads={self.heads[1]}, head_dim={self.head_dim}, replaces {self.original}"

    def _qkv(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
        """Query, key and value as ``(B, heads, L, D)`` views, q and k rotary-embedded."""
        shape = (*hidden_states.shape[:-1], -1, int(self.head_dim))
        y = self.stacked.linear(hidden_states)
        cos, sin = self._tables.get(*position_embeddings)
        qi, ki, vi = self.parts
        o = self.stacked.offsets
        if self.qk_adjacent:  # q and k side by side in the stacked output: one rotation for both
            qk = _rotate(y[..., o[qi]:o[ki + 1]].view(shape), cos, sin)
            q, k = qk.split((self.heads[0], self.heads[1]), dim=-2)
        else:
            q = _rotate(y[..., o[qi]:o[qi + 1]].view(shape), cos, sin)
            k = _rotate(y[..., o[ki]:o[ki + 1]].view(shape), cos, sin)
        v = y[..., o[vi]:o[vi + 1]].view(shape)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = None
        for name in _CACHE_NAMES:
            if name in kwargs:
                cache = kwargs.pop(name) if cache is None else cache
        q, k, v = self._qkv(hidden_states, position_embeddings)
        buffers = None
        if cache is not None:
            appended = append_kv(cache, self.layer_idx, k, v)
            if appended is None:
                k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
            else:
                k, v, *buffers = appended
        if buffers is not None and self._decodes(hidden_states, q, attention_mask, kwargs):
            out = torch.empty(q.shape[1], q.shape[3])
            decode_attention(q[0, :, 0].numpy(), buffers[0][0].numpy(), buffers[1][0].numpy(), k.shape[2],
                             self.scaling, out.numpy())
            return self.o_proj(out.view(1, 1, -1)), None
        interface = _registry().get_interface(self.config._attn_implementation, self.eager)
        out, weights = interface(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training
                                 else 0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(out), weights

    def _decodes(self, hidden_states: torch.Tensor, q: torch.Tensor, mask, kwargs: dict) -> bool:
        """Whether this call is one token of batch-1 decoding that :func:`decode_attention` computes exactly
        as transformers' SDPA attention would: no mask (nothing to hide from a single query), no
        dropout, no other attention option, float32 on the CPU without autograd."""
        return hidden_states.shape[0] == 1 and hidden_states.shape[1] == 1 and mask is None and not self.training \
            and self.config._attn_implementation == "sdpa" and kwargs.keys() <= _DECODE_KWARGS \
            and q.dtype == torch.float32 and q.device.type == "cpu" and not q.requires_grad


class _RecordingCache:
    """A KV cache for the check: prepends fixed past keys/values and records how it was called."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past = (past_k, past_v)
        self.calls: list[tuple] = []

    def update(self, k, v, *args, **kwargs):
        self.calls.append((k.clone(), v.clone(), args, sorted(kwargs)))
        return torch.cat((self.past[0], k), dim=-2), torch.cat((self.past[1], v), dim=-2)


def _shape_ok(m: nn.Module) -> bool:
    q, k, v = (getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj"))
    if not all(isinstance(s, SiblingSlice) for s in (q, k, v)) or not (q.fused is k.fused is v.fused):
        return False
    if len(q.fused.sizes) != 3 or len({q.index, k.index, v.index}) != 3:
        return False
    d, config = getattr(m, "head_dim", None), getattr(m, "config", None)
    if not isinstance(d, int) or d < 2 or d % 2 or any(q.fused.sizes[i] % d for i in range(3)):
        return False
    if not isinstance(getattr(config, "_attn_implementation", None), str) or not isinstance(getattr(m, "layer_idx",
                                                                                                      None), int):
        return False
    if not isinstance(getattr(m, "o_proj", None), nn.Module) or not isinstance(getattr(m, "scaling", None), float):
        return False
    return not has_forward_hooks(m)


def _cache_keyword(m: nn.Module) -> str | None:
    params = inspect.signature(m.forward).parameters
    return next((n for n in _CACHE_NAMES if n in params), None)


def _same(a: Any, b: Any) -> bool:
    """Equal up to float32 rounding, relative to the largest value (a trained model's projections are
    large on a random input, and the two formulas round differently in the last bits: on SmolLM2-135M
    the largest difference was 1.2e-6 of the largest value)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape):
        return False
    if a.numel() == 0:
        return True
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= 1e-5 * float(a.abs().max()) + 1e-6


@torch.no_grad()
def fusable(m: nn.Module) -> bool:
    """Whether ``m`` is a LLaMA-style attention over a stacked q/k/v product that :class:`FusedAttention`
    reproduces (output and KV cache calls, on random inputs; see the module docstring)."""
    if isinstance(m, FusedAttention) or not _shape_ok(m):
        return False
    cache_name = _cache_keyword(m)
    if cache_name is None:
        return False
    g = torch.Generator().manual_seed(0)
    q = m.q_proj
    d, kv = m.head_dim, q.fused.sizes[m.k_proj.index] // m.head_dim
    b, n, past = 2, 3, 4
    x = torch.randn(b, n, q.in_features, generator=g)
    cos, sin = torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)
    mask = torch.randn(b, 1, n, n + past, generator=g)
    pk, pv = torch.randn(b, kv, past, d, generator=g), torch.randn(b, kv, past, d, generator=g)
    results = []
    try:
        for module in (m, FusedAttention(m)):
            cache = _RecordingCache(pk, pv)
            out = module(x, position_embeddings=(cos, sin), attention_mask=mask, **{cache_name: cache})
            results.append((out, cache.calls))
    except Exception:  # noqa: BLE001  (a module that cannot run on that input is not replaced)
        return False
    (want, want_calls), (got, got_calls) = results
    if not (isinstance(want, tuple) and isinstance(got, tuple) and len(want) == len(got) >= 1
            and _same(want[0], got[0]) and len(want_calls) == len(got_calls) == 1):
        return False
    (wk, wv, wa, wkw), (gk, gv, ga, gkw) = want_calls[0], got_calls[0]
    return _same(wk, gk) and _same(wv, gv) and wa == ga and wkw == gkw


def fuse_attentions(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace the attention modules of ``model`` over a stacked q/k/v product (in place): LLaMA-style ones by
    :class:`FusedAttention`, BERT-style self-attentions by :class:`.encoder_attention.FusedSelfAttention`; the
    names replaced. ``names``: only these (each must pass :func:`fusable` or the encoder's check, else
    ``ValueError`` naming it, and nothing changes); ``None``: every module that passes."""
    from .encoder_attention import FusedSelfAttention  # noqa: PLC0415  (that module imports this one)
    from .encoder_attention import fusable as fusable_self

    return replace_checked(model, names, lambda m: fusable(m) or fusable_self(m),
                           lambda m: FusedAttention(m) if _shape_ok(m) else FusedSelfAttention(m),
                           "attention modules over a stacked q/k/v product")


__all__ = ["ATTENTIONS_ATTR", "FusedAttention", "fusable", "fuse_attentions"]
