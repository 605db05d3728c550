"""sparsenn: sparse neural networks on PyTorch.

Create sparsity (pruning scores, patterns, per-layer distributions, schedules, or the
objective: penalties, proximal optimizers, sparse variational dropout), train it
correctly (masked optimizers), and measure it (reports, FLOPs, bytes).
"""

import sys as _sys

from ._version import __version__  # noqa: F401
# Layer by layer, lowest first (docs/DESIGN.md, "Layers"); each import also registers
# what the module defines (methods, patterns, kernels) in the core registries.
from .core import masks, metrics, patterns
from .core.distributions import layer_densities, list_distributions
from .core.masks import apply_masks, get_masks, iter_masks, masked_parameters, remove_masks
from .core.methods import ConstantScoresError, Method, ScoreContext, list_methods, register_method
from .core.metrics import sparsity
from .core.patterns import NM, Block, Channel, Pattern, PatternError, Row, Unstructured, list_patterns, parse_pattern, topk_mask
from .core.schedules import (
    Constant,
    Exponential,
    Iterative,
    Linear,
    OneShot,
    Polynomial,
    Schedule,
    list_schedules,
    make_schedule,
)
from .core.targets import DenseOutputLayerWarning
from . import data, models, train
from .train.checkpoint import load, save
from .train.distributed import MaskMismatchError, RanksOutOfStepError, check_masks_consistent
from .train.masked_optim import clip_grad_norm_
from .train.pretrained import dense_state_dict, from_pretrained, save_pretrained
from .train.rewind import Snapshot, rewind_lr, rewind_weights, take_snapshot
from .train.sparsifier import Sparsifier
from .train.checkpoint_format import CheckpointError
from .create import criteria as _criteria  # noqa: F401  (registers the pruning criteria)
from .create import dst  # noqa: F401  (registers static, set, rigl)
from .create.oneshot import OneShotError, OneShotReport, QuantizeError, QuantizeReport, oneshot, oneshot_streaming, quantize
from .create.init import rescale_for_sparse_fan_in, sparse_init, transfer_masks
from .create.procedures import LotteryTicket, RoundInfo, RoundResult, attach_sparsifier, iterative_prune, one_shot_prune
from .create.regularize import variational
from .create.regularize.activations import ActivationKL, ActivationL1
from .create.regularize.penalties import L1, GroupLasso, HuberL1, LogSumExpL1, SlimmingPenalty
from .create.regularize.proximal import FISTA, ProximalAdam, ProximalSGD, group_soft_threshold, soft_threshold
from .create.regularize.variational import Conv2dSVDO, LinearSVDO
from .create.regularize.zeros import masks_from_zeros
from .train.distillation import DistillationLoss, distill, distillation_loss
from .train.feature_distillation import FeatureDistiller
from .train.recovery import RecoveryResult, causal_lm_distillation_loss, causal_lm_labels, recover
from .train.teacher_cache import TeacherCache, TeacherCacheError
from . import federated, robust  # layer 3 beside create: sn.federated.simulate, sn.robust.pgd, ...
from .robust import FGSM, PGD, AdversarialBatches, adversarial_loss, robustness_eval
from . import structured  # registers l1_filter, apoz, bn_gamma
from .structured import ShrinkError, block_influence, drop_layers, shrink
from .backend import formats, kernels, runtime, training  # training registers Sparsifier(backend="sparse")
from .backend.training import SparseTrainingLinear
from .backend.runtime import ConversionError, GenerationSpeed, convert, generation_speed
from .backend.runtime.errors import ArchiveError
from . import compress
from .compress import archive
from .compress.compressed_tensors import load_compressed_tensors, read_sparse_bitmask
from .compress.deep_compression import DeepCompressed, deep_compress
from .report.layer_report import Report, report
from .report.language import embedding_fidelity, perplexity

# Short public names for the sub-modules users reach for (``import sparsenn.runtime``,
# ``from sparsenn.metrics import macs``): the same module objects as their full paths.
for _name, _module in {"masks": masks, "metrics": metrics, "patterns": patterns, "formats": formats,
                       "kernels": kernels, "runtime": runtime, "variational": variational,
                       "archive": archive}.items():
    _sys.modules[f"{__name__}.{_name}"] = _module
del _name, _module

__all__ = [
    "DistillationLoss", "distill", "distillation_loss", "FeatureDistiller", "RecoveryResult",
    "causal_lm_distillation_loss", "causal_lm_labels", "recover", "TeacherCache", "TeacherCacheError",
    "SparseTrainingLinear", "FGSM", "PGD", "AdversarialBatches", "adversarial_loss", "robustness_eval",
    "LotteryTicket", "RoundInfo", "RoundResult", "Snapshot", "attach_sparsifier", "iterative_prune",
    "one_shot_prune", "oneshot", "oneshot_streaming", "OneShotError", "OneShotReport", "QuantizeError", "QuantizeReport",
    "quantize", "perplexity", "embedding_fidelity", "rewind_lr", "rewind_weights", "take_snapshot",
    "MaskMismatchError", "RanksOutOfStepError", "check_masks_consistent", "rescale_for_sparse_fan_in", "sparse_init",
    "transfer_masks",
    "Block", "Channel", "Constant", "ConstantScoresError", "DenseOutputLayerWarning", "Exponential", "Iterative",
    "Linear", "Method", "NM", "OneShot",
    "Pattern", "PatternError", "Polynomial", "Report", "Schedule", "ScoreContext", "Sparsifier",
    "Row", "Unstructured", "apply_masks", "clip_grad_norm_", "get_masks", "iter_masks", "layer_densities",
    "list_distributions", "list_methods", "list_patterns", "list_schedules", "load", "make_schedule",
    "masked_parameters", "parse_pattern", "register_method", "remove_masks", "report", "save",
    "sparsity", "topk_mask", "dense_state_dict", "from_pretrained", "save_pretrained",
    "ActivationKL", "ActivationL1", "Conv2dSVDO", "FISTA", "GroupLasso", "HuberL1", "L1", "LinearSVDO",
    "LogSumExpL1", "ProximalAdam", "ProximalSGD", "SlimmingPenalty", "group_soft_threshold", "masks_from_zeros",
    "soft_threshold", "variational",
    "ShrinkError", "block_influence", "drop_layers", "shrink",
    "CheckpointError", "ConversionError", "GenerationSpeed", "convert", "generation_speed",
    "ArchiveError", "DeepCompressed", "OnnxExportReport", "archive", "compress", "deep_compress", "export_onnx",
    "load_compressed_tensors", "read_sparse_bitmask",
    "data", "formats", "kernels", "masks", "metrics", "models", "patterns", "runtime", "structured", "train",
]


_ONNX = {"export_onnx", "OnnxExportReport"}  # need the optional onnx package: imported on first use


def __getattr__(name: str):
    if name in _ONNX:
        try:
            from .compress import onnx_export
        except ImportError as e:
            raise ImportError(f"sparsenn.{name} needs the onnx package: pip install 'sparsenn[onnx]' ({e})") from e
        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
