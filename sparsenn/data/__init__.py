"""Datasets: scikit-learn's bundled digits and the MNIST / Fashion-MNIST IDX files."""

from .datasets import (
    IDX_DATASETS,
    DatasetError,
    flatten,
    load_digits_tensors,
    load_idx_dataset,
    make_loaders,
    read_idx,
)

__all__ = ['DatasetError', 'IDX_DATASETS', 'flatten', 'load_digits_tensors', 'load_idx_dataset', 'make_loaders', 'read_idx']
