"""Small reference models (LeNet-300-100, LeNet-5, SmallVGG, a sparse autoencoder) and their registry."""

from .zoo import (
    MODELS,
    LeNet5,
    LeNet300100,
    SmallVGG,
    SparseAutoencoder,
    list_models,
    make_model,
)

__all__ = ['LeNet300100', 'LeNet5', 'MODELS', 'SmallVGG', 'SparseAutoencoder', 'list_models', 'make_model']
