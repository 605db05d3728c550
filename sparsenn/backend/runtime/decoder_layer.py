"""A LLaMA-style decoder block that decodes a token at batch 1 in nine calls.

Once its parts are fused (:class:`.norms.FusedRMSNorm`, :class:`.attention.FusedAttention` over
a stacked q/k/v product, :class:`.gated_mlp.GatedMLP` over a stacked gate/up product), a
``LlamaDecoderLayer`` (or Mistral's, Qwen2's, ...) still runs a token through about 25 module
calls and PyTorch operations of a few microseconds each besides its four products: on
SmolLM2-135M at 70% int8 that was about 5 ms of a 13 ms token (30 blocks). Decoding one token at
batch 1 without autograd, :class:`FusedDecoderLayer` runs the block as four one-row products
(:meth:`.layers.SparseLinear.one_row`, or ``torch.mv`` for a dense layer) and five compiled
calls (:mod:`sparsenn.backend.kernels.decoder_step`): RMSNorm; rotary embedding, KV cache
append (:func:`.kv_cache.reserve`) and attention; residual add and RMSNorm; SiLU times up;
residual add. Every other call (a prompt, a batch, a mask, an option, autograd, hooks on any
part, another cache or attention implementation) runs the replaced class's own ``forward``.

:func:`fuse_decoder_layers` replaces a layer only when it is shown to compute exactly that: its
children are exactly those four fused modules, it holds no tensors of its own and has no hooks,
its ``act_fn`` computes SiLU, attention is ``"sdpa"``, and after a 3-token prefill into a
``DynamicCache`` its output and cache for one more token through the nine calls equal the
original's (up to float32 rounding). The same children under the same names: the state dict is
unchanged.
"""

from __future__ import annotations

import threading
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from ..kernels import decoder_step
from ..kernels.norms import rms_norm_rows
from .attention import _CACHE_NAMES, FusedAttention, _cache_keyword, _RotaryTables, _same
from .gated_mlp import GatedMLP
from .kv_cache import reserve
from .layers import DENSE, SparseLinear
from .norms import FusedRMSNorm
from .replace import KeepsClass, adopt, has_forward_hooks, replace_checked

LAYERS_ATTR = "fused_decoder_layers"  #: on a converted model: the names of the layers replaced (save/load rebuild them)
_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_STEP_KWARGS = frozenset({"attention_mask", "position_embeddings", "position_ids", "use_cache", "cache_position",
                          *_CACHE_NAMES})
_LOCAL = threading.local()  # per Python thread: the step's scratch rows, by shape


def _dense_row(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> None:
    if bias is None:
        torch.mv(weight, x, out=y)
    else:
        torch.addmv(bias, weight, x, out=y)


def _matmul_row(linear: SparseLinear, x: torch.Tensor, y: torch.Tensor) -> None:
    y.copy_(linear.matmul_rows(x.view(1, -1)).view(-1))


def _dense(weight, bias):
    """:func:`_dense_row` bound to a float32 CPU ``(out, in)`` weight and bias; ``None`` for anything else."""
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.is_cpu and weight.dim() == 2 \
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == torch.float32 and bias.is_cpu)):
        return partial(_dense_row, weight, bias)
    return None


def _row(linear: nn.Module, n_in: int, n_out: int):
    """``f(x, y)``: ``y = linear(x)`` for one float32 row, written into ``y``; ``None`` where ``linear`` is
    not a float32 CPU layer of that shape with such a product."""
    if isinstance(linear, SparseLinear):
        if linear.in_features != n_in or linear.out_features != n_out:
            return None
        row = linear.one_row()
        if row is not None:
            return row
        if (linear.forced or linear.kernel_for(1)) == DENSE:
            return _dense(linear.weight, linear.bias)
        return partial(_matmul_row, linear)  # a kernel without a one-row path: its matmul on one row
    if type(linear) is nn.Linear and linear.in_features == n_in and linear.out_features == n_out:
        return _dense(linear.weight, linear.bias)
    return None


def _scratch(sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, np.ndarray]]:
    """This thread's scratch rows ``(tensor, its NumPy view)`` of ``sizes`` (float32)."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    rows = buffers.get(sizes)
    if rows is None:
        if len(buffers) >= 8:
            buffers.pop(next(iter(buffers)))
        rows = buffers[sizes] = [(t, t.numpy()) for t in (torch.zeros(n, dtype=torch.float32) for n in sizes)]
    return rows


def _flat_arrays(cos: torch.Tensor, sin: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """NumPy views of one token's rotary tables, for :func:`.decoder_step.rotate_append_attend`."""
    return cos.reshape(-1).numpy(), sin.reshape(-1).numpy()


def _implementation(config) -> str | None:
    """``config._attn_implementation``, read from the instance where it is stored (the property costs 1.5 us)."""
    value = config.__dict__.get("_attn_implementation_internal")
    return value if isinstance(value, str) else getattr(config, "_attn_implementation", None)


def _hooked(modules) -> bool:
    """Whether a forward (pre-)hook would run on any of ``modules`` (a global one, or one of their own)."""
    if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        return True
    for m in modules:  # (hooks with kwargs are also in _forward_hooks / _forward_pre_hooks)
        d = m.__dict__
        if d.get("_forward_hooks") or d.get("_forward_pre_hooks"):
            return True
    return False


def _is_row(t, n: int) -> bool:
    return type(t) is torch.Tensor and t.dtype == torch.float32 and t.is_cpu and t.numel() == n and t.is_contiguous()


class FusedDecoderLayer(KeepsClass):
    """A LLaMA-style decoder layer decoding one token at batch 1 in nine calls (see the module docstring);
    anything else runs the replaced class's ``forward``. An instance of that class too (:class:`.replace.KeepsClass`)."""

    _tables = _RotaryTables(_flat_arrays)  # shared by every block (and model): keyed by the tables' identity

    def __init__(self, original: nn.Module):
        nn.Module.__init__(self)
        fresh = set(self.__dict__)
        for k, v in original.__dict__.items():  # the plain attributes the replaced forward reads (hidden_size, ...)
            if k not in fresh:
                self.__dict__[k] = v
        adopt(self, original)
        self.act_type = type(original.mlp.act_fn)  # the SiLU module class the check saw
        self.training = original.training

    def extra_repr(self) -> str:
        return f"replaces {self.original}"

    def forward(self, hidden_states, *args, **kwargs):
        if not args and not torch.is_grad_enabled():
            out = self.step(hidden_states, kwargs)
            if out is not None:
                return out
        return super().forward(hidden_states, *args, **kwargs)  # the replaced class's

    def step(self, x, kwargs: dict) -> torch.Tensor | None:
        """The block's output for one token at batch 1 (``x`` of shape ``(1, 1, hidden)``), or ``None``
        (nothing changed) where the nine calls do not apply."""
        if self.training or not kwargs.keys() <= _STEP_KWARGS or kwargs.get("attention_mask") is not None \
                or torch.compiler.is_compiling():
            return None
        parts = self._modules
        attn, mlp = parts.get("self_attn"), parts.get("mlp")
        n1, n2 = parts.get("input_layernorm"), parts.get("post_attention_layernorm")
        if not (isinstance(attn, FusedAttention) and isinstance(mlp, GatedMLP) and isinstance(n1, FusedRMSNorm)
                and isinstance(n2, FusedRMSNorm)) or type(mlp.act_fn) is not self.act_type \
                or attn.training or _implementation(attn.config) != "sdpa":
            return None
        hidden = n1.shape[0]
        if not (_is_row(x, hidden) and x.dim() == 3 and x.shape[2] == hidden) or n2.shape[0] != hidden:
            return None
        pe = kwargs.get("position_embeddings")
        d = int(attn.head_dim)
        if not (isinstance(pe, tuple) and len(pe) == 2 and _is_row(pe[0], d) and _is_row(pe[1], d)):
            return None
        cache = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        qkv, gu = attn.stacked, mlp.stacked
        qkv_lin, gu_lin = qkv._modules["linear"], gu._modules["linear"]
        o_lin, down_lin = attn._modules.get("o_proj"), mlp._modules.get("down_proj")
        if cache is None or _hooked((attn, mlp, n1, n2, qkv, gu, qkv_lin, gu_lin, o_lin, down_lin, mlp._modules.get("act_fn", attn))):
            return None
        heads, kv_heads = attn.heads[0], attn.heads[1]
        inner = gu.sizes[mlp.gate]
        rows = (_row(qkv_lin, hidden, qkv.offsets[-1]), _row(o_lin, heads * d, hidden),
                _row(gu_lin, hidden, gu.offsets[-1]), _row(down_lin, inner, hidden))
        w1, w2 = n1._weight_array(n1._parameters["weight"]), n2._weight_array(n2._parameters["weight"])
        if any(r is None for r in rows) or w1 is None or w2 is None:
            return None
        room = reserve(cache, attn.layer_idx, (1, kv_heads, 1, d), torch.float32, x.device)
        if room is None:
            return None
        # from here on nothing can fail: the cache has a row for this token, written below
        length, keys, values = room[2], room[3], room[4]
        cos, sin = self._tables.get(pe[0], pe[1])
        (h, hn), (y, yn), (_, qn), (att, attn_n), (a, an), (_, rn), (h2, h2n), (g, gn), (m, mn), (dd, dn) = _scratch(
            (hidden, qkv.offsets[-1], heads * d, heads * d, hidden, hidden, hidden, gu.offsets[-1], inner, hidden))
        xn = x.numpy()
        qi, ki, vi = attn.parts
        rms_norm_rows(xn, w1, n1.eps, hn)
        rows[0](h, y)
        decoder_step.rotate_append_attend(yn, qkv.offsets[qi], qkv.offsets[ki], qkv.offsets[vi], cos, sin, keys, values,
                                          length, attn.scaling, qn.reshape(heads, d), attn_n.reshape(heads, d))
        rows[1](att, a)
        decoder_step.residual_rms_norm(xn, an, w2, n2.eps, rn, h2n)
        rows[2](h2, g)
        decoder_step.silu_mul(gn, gu.offsets[mlp.gate], gu.offsets[mlp.up], mn)
        rows[3](m, dd)
        out = torch.empty(1, 1, hidden, dtype=torch.float32)
        decoder_step.add(rn, dn, out.numpy())
        return out


def _silu(act) -> bool:
    """Whether ``act`` is a module without parameters or children that computes ``F.silu``."""
    if not isinstance(act, nn.Module) or any(True for _ in act.parameters()) or any(True for _ in act.children()):
        return False
    x = torch.cat((torch.randn(64, generator=torch.Generator().manual_seed(1)) * 6, torch.tensor([-90.0, 90.0])))
    try:
        got = act(x)
    except Exception:  # noqa: BLE001  (an activation that cannot run on a vector is not SiLU)
        return False
    return isinstance(got, torch.Tensor) and torch.allclose(got, F.silu(x), rtol=1e-6, atol=1e-7)


def _shape_ok(m: nn.Module) -> bool:
    children = dict(m.named_children())
    if set(children) != set(_PARTS) or any(p is not None for p in m._parameters.values()) or m._buffers:
        return False
    attn, mlp = children["self_attn"], children["mlp"]
    if not (isinstance(attn, FusedAttention) and isinstance(mlp, GatedMLP)
            and isinstance(children["input_layernorm"], FusedRMSNorm)
            and isinstance(children["post_attention_layernorm"], FusedRMSNorm)):
        return False
    if getattr(attn.config, "_attn_implementation", None) != "sdpa" or not _silu(mlp.act_fn):
        return False
    return not any(has_forward_hooks(c) for c in (m, *children.values()))


def _decode_once(module: nn.Module, step: bool, cache_name: str, hidden: int, d: int) -> tuple | None:
    """Prefill 3 random tokens, then decode one (through :meth:`FusedDecoderLayer.step` when ``step``):
    ``(prefill output, token output, the layer's cached keys, values)``; ``None`` if the step declined."""
    from transformers.cache_utils import DynamicCache

    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(1, 3, hidden, generator=g), torch.randn(1, 1, hidden, generator=g)
    t0, t1 = torch.randn(2, 1, 3, d, generator=g), torch.randn(2, 1, 1, d, generator=g)
    cache = DynamicCache()
    out0 = module(x0, attention_mask=None, position_embeddings=(t0[0], t0[1]), use_cache=True, **{cache_name: cache})
    kwargs = {"attention_mask": None, "position_embeddings": (t1[0], t1[1]), "use_cache": True, cache_name: cache}
    out1 = module.step(x1, kwargs) if step else module(x1, **kwargs)
    if out1 is None:
        return None
    layer = cache.layers[module.self_attn.layer_idx]
    return out0, out1, layer.keys.clone(), layer.values.clone()


@torch.no_grad()
def fusable(m: nn.Module) -> bool:
    """Whether ``m`` is a LLaMA-style decoder layer over fused parts whose one-token step
    :class:`FusedDecoderLayer` reproduces (output and KV cache, on random inputs; see the module docstring)."""
    if isinstance(m, FusedDecoderLayer) or not _shape_ok(m):
        return False
    cache_name = _cache_keyword(m)
    if cache_name is None:
        return False
    hidden, d = m.input_layernorm.shape[0], int(m.self_attn.head_dim)
    try:
        want = _decode_once(m, False, cache_name, hidden, d)
        got = _decode_once(FusedDecoderLayer(m), True, cache_name, hidden, d)
    except Exception:  # noqa: BLE001  (a layer that cannot run on that input is not replaced)
        return False
    return want is not None and got is not None and isinstance(want[1], torch.Tensor) \
        and all(_same(w, g) for w, g in zip(want, got))


def fuse_decoder_layers(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace the LLaMA-style decoder layers of ``model`` whose parts are fused (in place) by
    :class:`FusedDecoderLayer`; the names replaced. ``names``: only these (each must pass :func:`fusable`,
    else ``ValueError`` naming it, and nothing changes); ``None``: every module that passes."""
    return replace_checked(model, names, fusable, FusedDecoderLayer,
                           "decoder layers over fused norms, attention and gated MLP")


__all__ = ["LAYERS_ATTR", "FusedDecoderLayer", "fusable", "fuse_decoder_layers"]
