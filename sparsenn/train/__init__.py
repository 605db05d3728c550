"""Training sparse networks correctly: the Sparsifier (prepare -> step -> finalize), masked
optimizers, distributed agreement on masks, rewinding, checkpoints, and a small loop.

``sparsenn.train.train`` / ``evaluate`` / ``cosine_schedule`` are the small built-in loop."""

from .loop import cosine_schedule, evaluate, train

__all__ = ["cosine_schedule", "evaluate", "train"]
