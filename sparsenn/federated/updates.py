"""A whole model's update as messages: the client's encoder and the server's checked decoder.

:class:`UpdateEncoder` compresses one message per shared tensor (with error feedback when the
compressor is biased, by default); its residuals persist across rounds, so one encoder belongs
to one client (or to the server, for a compressed download). :func:`decode_update` is the
receiving side: a sender is hostile until checked, so the names, the shapes, the masks and every
message are checked (:func:`~sparsenn.federated.messages.parse`) before anything is decoded, and
the first failure raises :class:`~sparsenn.federated.messages.MessageError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .compressors import Compressor, make_compressor
from .error_feedback import ErrorFeedback
from .messages import Message, MessageError, decode, encode_mask, parse

__all__ = ["UpdateEncoder", "decode_update", "encode_masks", "update_bytes"]


class UpdateEncoder:
    """Encodes a model update (``{name: tensor}``) as ``{name: Message}``.

    ``error_feedback``: keep what was not sent for the next update (default: when the compressor is
    biased, e.g. top-k or STC; not for dense or unbiased random-k).
    """

    def __init__(self, compressor: str | dict | Compressor = "dense", *, error_feedback: bool | None = None):
        self.compressor = make_compressor(compressor)
        if error_feedback is None:
            error_feedback = self.compressor.biased
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be True, False or None, got {error_feedback!r}")
        self.feedback = ErrorFeedback(self.compressor) if error_feedback else None

    def encode(self, update: Mapping[str, torch.Tensor],
               masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, Message]:
        masks = masks or {}
        out = {}
        for name, u in update.items():
            if self.feedback is not None:
                out[name] = self.feedback.compress(name, u, mask=masks.get(name))
            else:
                out[name] = self.compressor.compress(u, mask=masks.get(name))
        return out


def decode_update(messages: Mapping[str, Message | bytes], shapes: Mapping[str, tuple[int, ...]],
                  masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Check, then decode, one message per name of ``shapes``: float32 tensors by name."""
    masks = masks or {}
    if sorted(messages) != sorted(shapes):
        missing, extra = sorted(set(shapes) - set(messages)), sorted(set(messages) - set(shapes))
        raise MessageError(f"update does not match the model: missing {missing}, unexpected {extra}")
    for name in shapes:  # every header and length before any allocation of an output tensor
        try:
            parse(messages[name], shape=shapes[name], mask=masks.get(name))
        except MessageError as e:
            raise MessageError(f"{name}: {e}") from None
    out = {}
    for name in shapes:
        try:
            out[name] = decode(messages[name], shape=shapes[name], mask=masks.get(name))
        except MessageError as e:
            raise MessageError(f"{name}: {e}") from None
    return out


def encode_masks(masks: Mapping[str, torch.Tensor]) -> dict[str, Message]:
    """The server's masks as messages (a client receives them once, and again when they change)."""
    return {name: encode_mask(m) for name, m in masks.items()}


def update_bytes(messages: Mapping[str, Message]) -> int:
    """Total bytes of a set of messages (each ``len(message.data)``)."""
    return sum(m.nbytes for m in messages.values())
