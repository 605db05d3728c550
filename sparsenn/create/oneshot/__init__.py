"""One-shot (post-training) pruning of pretrained models, layer by layer from calibration data.

* :mod:`.masks`: which weights a row / N:M group / layer keeps from importance scores.
* :mod:`.solvers`: magnitude per row, Wanda (Sun et al. 2023) and SparseGPT (Frantar &
  Alistarh 2023) on one weight matrix and its input statistics; the exact least-squares refit.
* :mod:`.blocks`, :mod:`.stats`, :mod:`.pipeline`: ``oneshot``, block by block.
* :mod:`.allocation`: OWL per-block sparsities (Yin et al. 2024).
* :mod:`.permute`: the input-channel permutation for N:M masks (RIA, Zhang et al. 2024).
* :mod:`.streaming`: ``oneshot_streaming``, a model folder larger than memory, block by block
  from its safetensors files.
* :mod:`.registered`: ``method="wanda"`` and ``method="sparsegpt"`` for the Sparsifier.
* :mod:`.gptq`, :mod:`.quantization`: ``quantize``, int8 weights by GPTQ (Frantar et al. 2023) with
  the sparsity mask fixed, for ``sn.convert(weights="int8")``.
"""

from . import registered  # noqa: F401  (registers methods 'wanda' and 'sparsegpt' for the Sparsifier)
from .blocks import OneShotError, find_blocks
from .pipeline import ONESHOT_METHODS, LayerResult, OneShotReport, oneshot
from .streaming import oneshot_streaming
from .gptq import gptq_int8, rtn_int8
from .quantization import QUANTIZE_METHODS, QuantizedLayer, QuantizeError, QuantizeReport, quantize
from .solvers import HessianError, magnitude_prune, reconstruction_error, sparsegpt_prune, wanda_prune, wanda_scores

__all__ = ["ONESHOT_METHODS", "QUANTIZE_METHODS", "HessianError", "LayerResult", "OneShotError", "OneShotReport",
           "QuantizeError", "QuantizeReport", "QuantizedLayer", "find_blocks", "gptq_int8", "magnitude_prune", "oneshot",
           "oneshot_streaming", "quantize", "reconstruction_error", "rtn_int8", "sparsegpt_prune", "wanda_prune",
           "wanda_scores"]
