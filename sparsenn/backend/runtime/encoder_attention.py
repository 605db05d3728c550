"""The self-attention of BERT-family encoders over one stacked q/k/v product, without copying q, k and v.

``BertSelfAttention`` (and the RoBERTa, ELECTRA, ... copies of it in ``transformers``) computes
``query``, ``key`` and ``value``, views each as heads and calls the attention function. Once
:mod:`.siblings` has stacked the three into one product, each member returns a contiguous copy
of its columns (a module may call ``.view`` in ways a strided slice does not allow), and
scaled-dot-product attention then reads those copies. :class:`FusedSelfAttention` calls the
stacked product itself and views its columns as heads directly: at BERT-base's batch 16 x 128
tokens that is three 6.3 MB copies per block, and the whole model measured 1.01-1.02x faster
(``bench/encoder_batched.py``, docs/benchmarks.md).

Under the ``"sdpa"`` implementation (which returns no attention weights), in eval mode or without
dropout, not causal and with no other option set, the attention is the compiled
:func:`sparsenn.backend.kernels.self_attention.attend`, reading q, k and v in place from the
stacked product and writing the ``(B, S, H*D)`` output directly (boolean masks become additive
ones). Otherwise, and for a mask of another shape or a row whose every key is masked, the
attention function is the module's own (``ALL_ATTENTION_FUNCTIONS`` entry for the config's
implementation, the module's ``eager_attention_forward`` as default). A call with a KV cache (a
BERT used as a decoder) runs the original ``forward``, unchanged.

:func:`fuse_self_attentions` replaces a module only when it is shown to compute exactly that:
``query``, ``key`` and ``value`` are the three members of one stacked product of equal sizes,
it has ``attention_head_size``, ``scaling``, a config naming its attention implementation and
no hooks, and on a random input and a random additive mask its output equals the original's
(up to float32 rounding; both in eval mode). The same children under the same names: the state dict is unchanged.
:func:`sparsenn.backend.runtime.attention.fuse_attentions` applies it with the LLaMA-style fusion
(``convert`` and archives list both under ``attentions``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..kernels import self_attention
from .attention import _CACHE_NAMES, _registry, _same
from .replace import KeepsClass, adopt, has_forward_hooks, replace_checked
from .siblings import SiblingSlice

_COPIED = ("config", "num_attention_heads", "attention_head_size", "all_head_size", "scaling", "is_decoder",
           "is_causal", "layer_idx")


class FusedSelfAttention(KeepsClass):
    """A BERT-style self-attention whose q/k/v are strided views of one stacked product; an instance of the
    replaced module's class too (:class:`.replace.KeepsClass`: ``output_attentions`` still records it)."""

    def __init__(self, original: nn.Module):
        nn.Module.__init__(self)
        adopt(self, original, _COPIED)
        q, k, v = original.query, original.key, original.value
        self.__dict__["stacked"] = q.fused  # a child already: not registered twice
        self.parts = (q.index, k.index, v.index)
        self.__dict__["original_forward"] = type(original).forward  # for calls with a KV cache
        self.eager = getattr(sys.modules.get(type(original).__module__), "eager_attention_forward", None)
        self.training = original.training

    def extra_repr(self) -> str:
        return f"heads={self.num_attention_heads}, head_size={self.attention_head_size}, replaces {self.original}"

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if args or any(kwargs.get(n) is not None for n in _CACHE_NAMES):
            return self.original_forward(self, hidden_states, attention_mask, *args, **kwargs)
        for name in _CACHE_NAMES:
            kwargs.pop(name, None)
        y = self.stacked(hidden_states)
        if self._compiled_applies(y, kwargs):
            out = _compiled(self, y, attention_mask)
            if out is not None:
                return out, None
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        parts = y.split(self.stacked.sizes, dim=-1)
        q, k, v = (parts[i].view(shape).transpose(1, 2) for i in self.parts)
        interface = _registry().get_interface(self.config._attn_implementation, self.eager)
        out, weights = interface(self, q, k, v, attention_mask, dropout=self.dropout.p if self.training else 0.0,
                                 scaling=self.scaling, **kwargs)
        return out.reshape(*hidden_states.shape[:-1], -1).contiguous(), weights

    def _compiled_applies(self, y: torch.Tensor, kwargs: dict) -> bool:
        """Whether :func:`_compiled` computes what the attention function would: PyTorch's SDPA selected (it
        returns no weights), no dropout, not causal, no other option set, float32 without autograd."""
        return (self.config._attn_implementation == "sdpa" and not (self.training and self.dropout.p > 0)
                and not getattr(self, "is_causal", False) and all(v is None or v is False for v in kwargs.values())
                and y.dim() == 3 and y.dtype == torch.float32 and y.device.type == "cpu"
                and not (torch.is_grad_enabled() and y.requires_grad) and self_attention.supported(
                    self.attention_head_size))


def _kernel_mask(mask: torch.Tensor | None, b: int, heads: int, s: int):
    """``mask`` as the compiled kernel's additive float32 ``(B|1, H|1, S|1, S)`` array (``None`` stays ``None``;
    a boolean mask keeps the ``True`` keys); ``False`` for a mask it does not take."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[3] != s or any(m not in (1, full) for m, full in zip(mask.shape[:3], (b, heads, s))):
        return False
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    elif not mask.is_floating_point():
        return False
    return mask.detach().to(torch.float32).contiguous().numpy()


def _compiled(m: FusedSelfAttention, y: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention through :func:`sparsenn.backend.kernels.self_attention.attend` (``None``: a mask it does not take,
    or a row with every key masked, which the attention function handles)."""
    b, s, _ = y.shape
    heads = m.stacked.sizes[m.parts[0]] // m.attention_head_size
    mask = _kernel_mask(attention_mask, b, heads, s)
    if mask is False:
        return None
    out = torch.empty(b, s, heads * m.attention_head_size)
    offsets = tuple(m.stacked.offsets[i] for i in m.parts)
    yc = y.detach().contiguous()
    if self_attention.attend(yc.numpy(), offsets, heads, m.attention_head_size, m.scaling, mask, out.numpy()):
        return None
    return out


def _shape_ok(m: nn.Module) -> bool:
    q, k, v = (getattr(m, n, None) for n in ("query", "key", "value"))
    if not all(isinstance(s, SiblingSlice) for s in (q, k, v)) or not (q.fused is k.fused is v.fused):
        return False
    sizes = q.fused.sizes
    if len(sizes) != 3 or len({q.index, k.index, v.index}) != 3 or len(set(sizes)) != 1:
        return False
    d, config = getattr(m, "attention_head_size", None), getattr(m, "config", None)
    if not isinstance(d, int) or d < 1 or sizes[0] % d or not isinstance(getattr(m, "scaling", None), float):
        return False
    if not isinstance(getattr(config, "_attn_implementation", None), str):
        return False
    if not isinstance(getattr(m, "dropout", None), nn.Dropout):
        return False
    return not has_forward_hooks(m)


@torch.no_grad()
def fusable(m: nn.Module) -> bool:
    """Whether ``m`` is a BERT-style self-attention over a stacked q/k/v product that
    :class:`FusedSelfAttention` reproduces (its output on a random input and a random additive mask)."""
    if isinstance(m, FusedSelfAttention) or not _shape_ok(m):
        return False
    g = torch.Generator().manual_seed(0)
    b, n = 2, 5
    x = torch.randn(b, n, m.query.in_features, generator=g)
    mask = torch.randn(b, 1, n, n, generator=g)
    training = m.training
    m.eval()  # checked as it will run (a skeleton given to load may still be in training mode: dropout)
    try:
        want = m(x, attention_mask=mask)
        got = FusedSelfAttention(m)(x, attention_mask=mask)
    except Exception:  # noqa: BLE001  (a module that cannot run on that input is not replaced)
        return False
    finally:
        m.train(training)
    if not (isinstance(want, tuple) and isinstance(got, tuple) and len(want) == len(got) >= 1):
        return False
    return all((w is None and o is None) or _same(w, o) for w, o in zip(want, got))


def fuse_self_attentions(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace the BERT-style self-attentions of ``model`` (in place) by :class:`FusedSelfAttention`; the names
    replaced. ``names``: only these (each must pass :func:`fusable`, else ``ValueError`` naming it, and nothing
    changes); ``None``: every module that passes. (:func:`sparsenn.backend.runtime.attention.fuse_attentions`,
    which ``convert`` and archives use, replaces these and the LLaMA-style ones.)"""
    return replace_checked(model, names, fusable, FusedSelfAttention,
                           "self-attention modules over a stacked query/key/value product")


__all__ = ["FusedSelfAttention", "fusable", "fuse_self_attentions"]
