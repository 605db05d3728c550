"""The one error a converted model's file (or a sparse layer's state) raises when it cannot be trusted."""

from __future__ import annotations


class ArchiveError(ValueError):
    """A converted-model file, or a sparse layer's packed state, is malformed, inconsistent or too large.

    Raised before any layer is swapped in and before any kernel reads the data; the
    message names the layer or tensor and what is wrong with it.
    """


class ConversionError(ValueError):
    """A conversion that would change the model's outputs beyond the tolerance asked for.

    Raised by :func:`sparsenn.convert` (``weights="bf16"`` / ``"int8"``) naming the layer
    whose rounded or quantized weight moves its output too far; nothing is returned.
    """
