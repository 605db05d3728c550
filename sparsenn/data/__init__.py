"""Datasets: scikit-learn's bundled digits, the MNIST / Fashion-MNIST IDX files, calibration text."""

from .datasets import (
    IDX_DATASETS,
    DatasetError,
    flatten,
    load_digits_tensors,
    load_idx_dataset,
    make_loaders,
    read_idx,
)
from .text import TextError, calibration_batches, read_text, tokenize

__all__ = ['TextError', 'calibration_batches', 'read_text', 'tokenize', 'DatasetError', 'IDX_DATASETS', 'flatten', 'load_digits_tensors', 'load_idx_dataset', 'make_loaders', 'read_idx']
