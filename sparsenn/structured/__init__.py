"""Structured (channel) pruning: channel criteria (l1_filter, apoz, bn_gamma),
BatchNorm and bias coupling, Network Slimming's penalty and the MACs channel removal saves;
the channel dependency graph (graph.py, its data in groups.py, norms in norms.py), surgery
(surgery.py), ``shrink`` (shrink.py, attention heads in attention.py, ``transformers`` configs in
config.py) and depth pruning (depth.py: ``drop_layers``)."""

from .channels import (
    APoZ,
    BNGamma,
    L1Filter,
    SlimmingPenalty,
    couple_batchnorm,
    couple_bias,
    find_following_batchnorm,
    structured_macs,
)
from .depth import block_influence, drop_layers
from .graph import DependencyGraph, Group, build_graph
from .importance import IMPORTANCE, group_importance
from .shrink import ShrinkError, shrink

__all__ = ['IMPORTANCE', 'APoZ', 'BNGamma', 'DependencyGraph', 'Group', 'L1Filter', 'ShrinkError', 'SlimmingPenalty', 'block_influence', 'build_graph', 'couple_batchnorm', 'couple_bias', 'drop_layers', 'find_following_batchnorm', 'group_importance', 'shrink', 'structured_macs']
