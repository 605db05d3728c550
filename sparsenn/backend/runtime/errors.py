"""The one error a converted model's file (or a sparse layer's state) raises when it cannot be trusted."""

from __future__ import annotations


class ArchiveError(ValueError):
    """A converted-model file, or a sparse layer's packed state, is malformed, inconsistent or too large.

    Raised before any layer is swapped in and before any kernel reads the data; the
    message names the layer or tensor and what is wrong with it.
    """
