"""sparsenn: sparse neural networks on PyTorch.

Create sparsity (pruning scores, patterns, per-layer distributions, schedules, or the
objective: penalties, proximal optimizers, sparse variational dropout), train it
correctly (masked optimizers), and measure it (reports, FLOPs, bytes).
"""

from . import scores as _scores  # noqa: F401  (registers the pruning criteria)
from . import dst  # noqa: F401  (registers static, set, rigl)
from . import structured  # noqa: F401  (registers l1_filter, apoz, bn_gamma)
from . import variational  # noqa: F401  (convert, kl_divergence, prune: sn.variational.*)
from . import formats  # noqa: F401  (exact storage formats, bytes_table, advise: sn.formats.*)
from .activations import ActivationKL, ActivationL1
from .checkpoint import load, save
from .distribution import layer_densities, list_distributions
from .distributed import MaskMismatchError, check_masks_consistent
from .init import rescale_for_sparse_fan_in, sparse_init, transfer_masks
from .masks import apply_masks, get_masks, iter_masks, masked_parameters, remove_masks
from .methods import Method, ScoreContext, list_methods, register_method
from .metrics import sparsity
from .optim import FISTA, ProximalAdam, ProximalSGD, clip_grad_norm_, group_soft_threshold, soft_threshold
from .penalties import L1, GroupLasso, HuberL1, LogSumExpL1
from .procedures import LotteryTicket, RoundInfo, RoundResult, attach_sparsifier, iterative_prune, one_shot_prune
from .rewind import Snapshot, rewind_lr, rewind_weights, take_snapshot
from .runtime import convert
from .patterns import NM, Block, Channel, Pattern, PatternError, Unstructured, list_patterns, parse_pattern, topk_mask
from .report import Report, report
from .schedules import (
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
from .sparsifier import Sparsifier
from .structured import SlimmingPenalty
from .variational import Conv2dSVDO, LinearSVDO
from .zeros import masks_from_zeros

__version__ = "0.1.0"

__all__ = [
    "LotteryTicket", "RoundInfo", "RoundResult", "Snapshot", "attach_sparsifier", "iterative_prune",
    "one_shot_prune", "rewind_lr", "rewind_weights", "take_snapshot",
    "MaskMismatchError", "check_masks_consistent", "rescale_for_sparse_fan_in", "sparse_init", "transfer_masks",
    "Block", "Channel", "Constant", "Exponential", "Iterative", "Linear", "Method", "NM", "OneShot",
    "Pattern", "PatternError", "Polynomial", "Report", "Schedule", "ScoreContext", "Sparsifier",
    "Unstructured", "apply_masks", "clip_grad_norm_", "get_masks", "iter_masks", "layer_densities",
    "list_distributions", "list_methods", "list_patterns", "list_schedules", "load", "make_schedule",
    "masked_parameters", "parse_pattern", "register_method", "remove_masks", "report", "save",
    "sparsity", "topk_mask",
    "ActivationKL", "ActivationL1", "Conv2dSVDO", "FISTA", "GroupLasso", "HuberL1", "L1", "LinearSVDO",
    "LogSumExpL1", "ProximalAdam", "ProximalSGD", "SlimmingPenalty", "group_soft_threshold", "masks_from_zeros",
    "soft_threshold", "variational",
    "convert",
]
