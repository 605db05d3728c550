"""Structured (channel) pruning: channel criteria (l1_filter, apoz, bn_gamma),
BatchNorm coupling, Network Slimming's penalty and the MACs channel removal saves."""

from .channels import (
    APoZ,
    BNGamma,
    L1Filter,
    SlimmingPenalty,
    couple_batchnorm,
    find_following_batchnorm,
    structured_macs,
)

__all__ = ['APoZ', 'BNGamma', 'L1Filter', 'SlimmingPenalty', 'couple_batchnorm', 'find_following_batchnorm', 'structured_macs']
