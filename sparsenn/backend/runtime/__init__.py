"""The inference runtime: convert a pruned model into one that runs sparse kernels where they pay.

``sparsenn.convert(model, example_input, batch_sizes=(1, 64))`` returns an inference
copy of the model (``nn.Module``) whose ``nn.Linear`` and ``nn.Conv2d`` layers run a
sparse kernel (:mod:`sparsenn.backend.kernels`) at the batch sizes where it was measured faster
on this machine and the dense PyTorch layer elsewhere; ``converted.conversion_summary``
says, per layer, which format and kernel run at each batch size and the measured dense
and sparse times. :func:`save` / :func:`load` keep a converted model without measuring
again; :func:`load` checks the whole file first and raises :class:`ArchiveError` (a
ValueError) on anything malformed, leaving the model unchanged.
"""

from .conversion import convert
from .errors import ArchiveError, ConversionError
from .generation import GenerationSpeed, generation_speed
from .io import load, save
from .layers import SparseConv2d, SparseLinear
from .summary import ConversionSummary, LayerSummary

__all__ = ["ArchiveError", "ConversionError", "ConversionSummary", "GenerationSpeed", "LayerSummary", "SparseConv2d",
           "SparseLinear", "convert", "generation_speed", "load", "save"]
