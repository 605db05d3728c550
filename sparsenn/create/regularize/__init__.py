"""Sparsity through the objective: penalties, proximal optimizers, sparse variational
dropout, activation sparsity, and exact zeros turned into masks."""
