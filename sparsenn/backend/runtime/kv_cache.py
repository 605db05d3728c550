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

_STATE = "_sparsenn_kv_buffers"  #: on a DynamicLayer: (key buffer, value buffer, keys view, values view, their NumPy
#: views, (batch, heads, width, dtype, device, inference mode)), the views as set last
_TYPES: list = []


def _cache_types() -> tuple[type, type]:
    if not _TYPES:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        _TYPES.extend((DynamicCache, DynamicLayer))
    return _TYPES[0], _TYPES[1]


def _fits(shape: tuple, dtype: torch.dtype, device: torch.device, cached: torch.Tensor) -> bool:
    return len(shape) == 4 and cached.dim() == 4 and tuple(shape[:2]) == tuple(cached.shape[:2]) \
        and shape[3] == cached.shape[3] and dtype == cached.dtype and device == cached.device


def reserve(cache, layer_idx: int, shape: tuple, dtype: torch.dtype, device: torch.device, grad: bool = False):
    """Make room for ``shape[2]`` new rows of keys and values (``shape``: ``(B, heads, n, D)``) in layer
    ``layer_idx`` of ``cache``: its ``keys`` and ``values`` become views that include them (their
    contents for the caller to write). ``grad``: whether the new states need gradients (then this
    does not apply).

    Returns ``(key buffer, value buffer, rows before, key buffer as NumPy, value buffer as NumPy)``,
    or ``None`` where this does not apply (see the module docstring); nothing changes then."""
    dynamic_cache, dynamic_layer = _TYPES or _cache_types()
    if type(cache) is not dynamic_cache or getattr(cache, "offloading", True):
        return None
    layers = cache.layers
    if not 0 <= layer_idx < len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer) is not dynamic_layer:
        return None
    inference = torch.is_inference_mode_enabled()
    state = layer.__dict__.get(_STATE)
    if state is not None and state[2] is layer.__dict__.get("keys") and state[3] is layer.__dict__.get("values") \
            and state[6] == (shape[0], shape[1], shape[3], dtype, device, inference) and len(shape) == 4 \
            and not (grad and torch.is_grad_enabled()):  # the views set last time: their layout is known
        length = state[2].shape[2]
        if length + shape[2] <= state[0].shape[2]:
            return _extend(layer, state, length, length + shape[2])
    if not layer.is_initialized:
        return None
    old_k, old_v = layer.keys, layer.values
    if not (isinstance(old_k, torch.Tensor) and isinstance(old_v, torch.Tensor) and _fits(shape, dtype, device, old_k)
            and _fits(shape, dtype, device, old_v) and old_k.shape[2] == old_v.shape[2]):
        return None
    if torch.is_grad_enabled() and (grad or old_k.requires_grad or old_v.requires_grad):
        return None
    length, n = old_k.shape[2], shape[2]
    capacity = length + n + max(64, (length + n) // 2)
    kb = old_k.new_empty(old_k.shape[0], old_k.shape[1], capacity, old_k.shape[3])
    vb = old_v.new_empty(old_v.shape[0], old_v.shape[1], capacity, old_v.shape[3])
    kb[:, :, :length].copy_(old_k)
    vb[:, :, :length].copy_(old_v)
    arrays = (kb.numpy(), vb.numpy()) if device.type == "cpu" else (None, None)
    state = (kb, vb, None, None, *arrays, (shape[0], shape[1], shape[3], dtype, device, inference))
    return _extend(layer, state, length, length + n)


def _extend(layer, state: tuple, length: int, total: int) -> tuple:
    """Set the layer's ``keys``/``values`` to the first ``total`` rows of the state's buffers; what :func:`reserve` returns."""
    kb, vb = state[0], state[1]
    keys, values = kb.narrow(2, 0, total), vb.narrow(2, 0, total)
    layer.keys, layer.values = keys, values
    layer.__dict__[_STATE] = (kb, vb, keys, values, *state[4:])
    return kb, vb, length, state[4], state[5]


def append(cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
    """Append ``keys``/``values`` (``(B, heads, n, D)``) to layer ``layer_idx`` of ``cache`` in place.

    Returns ``(all keys, all values, key buffer, value buffer)`` (the first two views of the
    buffers' first rows), or ``None`` where this does not apply (see the module docstring)."""
    if keys.dim() != 4 or values.shape != keys.shape:
        return None
    room = reserve(cache, layer_idx, tuple(keys.shape), keys.dtype, keys.device,
                   keys.requires_grad or values.requires_grad)
    if room is None or values.dtype != keys.dtype or values.device != keys.device:
        return None
    kb, vb, length = room[:3]
    n = keys.shape[2]
    kb[:, :, length:length + n].copy_(keys)
    vb[:, :, length:length + n].copy_(values)
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values, kb, vb  # the views reserve set, which the cache holds


__all__ = ["append", "reserve"]
