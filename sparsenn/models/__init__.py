"""Reference models (LeNet-300-100, LeNet-5, SmallVGG, a sparse autoencoder, ResNet-18) and their registry."""

from .zoo import (
    MODELS,
    LeNet5,
    LeNet300100,
    SmallVGG,
    SparseAutoencoder,
    list_models,
    make_model,
)
from .resnet import BasicBlock, ResNet18

__all__ = ['BasicBlock', 'LeNet300100', 'LeNet5', 'MODELS', 'ResNet18', 'SmallVGG', 'SparseAutoencoder', 'list_models',
           'make_model']
