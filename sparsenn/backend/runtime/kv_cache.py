"""Appending to ``transformers``' dynamic KV cache in place, in a buffer with room to grow.

``DynamicLayer.update`` (the default cache of ``generate``) appends a token's keys and values
with ``torch.cat``: every decoded token copies the whole cache of every block once more, so
the copying grows with the context (SmolLM2-135M at 2,048 tokens: 94 MB per token, more than
its int8 weights). :func:`append` keeps a layer's keys and values in buffers with spare rows
(``1.5x`` the length, at least 64 more) and writes new tokens into them; the layer's
``keys`` and ``values`` become views of the filled rows, the same values ``cat`` would have
made, so everything reading the cache (masks, ``get_seq_length``, ``crop``, reordering)
sees what it saw before.

It applies only to an exact ``DynamicCache`` holding exact ``DynamicLayer`` objects, not
offloaded, already filled (the prefill goes through ``update``), without autograd, when the
new states match the cached ones in batch, heads, width, dtype and device. A layer whose
``keys`` or ``values`` are no longer the views this module set (cropped, reordered, reset,
replaced by the user) is copied into new buffers first, so a view handed out earlier is
never written to. Anything else returns ``None`` and the caller uses ``cache.update``.
"""

from __future__ import annotations

import torch

_STATE = "_sparsenn_kv_buffers"  #: on a DynamicLayer: (key buffer, value buffer, keys view, values view)
_TYPES: list = []


def _cache_types() -> tuple[type, type]:
    if not _TYPES:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        _TYPES.extend((DynamicCache, DynamicLayer))
    return _TYPES[0], _TYPES[1]


def _fits(new: torch.Tensor, cached: torch.Tensor) -> bool:
    return new.dim() == 4 and cached.dim() == 4 and new.shape[:2] == cached.shape[:2] \
        and new.shape[3] == cached.shape[3] and new.dtype == cached.dtype and new.device == cached.device


def append(cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
    """Append ``keys``/``values`` (``(B, heads, n, D)``) to layer ``layer_idx`` of ``cache`` in place.

    Returns ``(all keys, all values, key buffer, value buffer)`` (the first two views of the
    buffers' first rows), or ``None`` where this does not apply (see the module docstring)."""
    dynamic_cache, dynamic_layer = _cache_types()
    if type(cache) is not dynamic_cache or getattr(cache, "offloading", True):
        return None
    layers = cache.layers
    if not 0 <= layer_idx < len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer) is not dynamic_layer or not layer.is_initialized:
        return None
    old_k, old_v = layer.keys, layer.values
    if not (isinstance(old_k, torch.Tensor) and isinstance(old_v, torch.Tensor) and _fits(keys, old_k)
            and _fits(values, old_v) and old_k.shape[2] == old_v.shape[2]):
        return None
    if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad or old_k.requires_grad
                                    or old_v.requires_grad):
        return None
    length, n = old_k.shape[2], keys.shape[2]
    state = layer.__dict__.get(_STATE)
    inference = torch.is_inference_mode_enabled()
    if state is None or state[2] is not old_k or state[3] is not old_v or length + n > state[0].shape[2] \
            or state[0].is_inference() != inference:
        capacity = length + n + max(64, (length + n) // 2)
        kb = old_k.new_empty(old_k.shape[0], old_k.shape[1], capacity, old_k.shape[3])
        vb = old_v.new_empty(old_v.shape[0], old_v.shape[1], capacity, old_v.shape[3])
        kb[:, :, :length].copy_(old_k)
        vb[:, :, :length].copy_(old_v)
    else:
        kb, vb = state[0], state[1]
    kb[:, :, length:length + n].copy_(keys)
    vb[:, :, length:length + n].copy_(values)
    layer.keys, layer.values = kb[:, :, :length + n], vb[:, :, :length + n]
    layer.__dict__[_STATE] = (kb, vb, layer.keys, layer.values)
    return layer.keys, layer.values, kb, vb


__all__ = ["append"]
