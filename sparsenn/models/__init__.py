"""Reference models (LeNet-300-100, LeNet-5, SmallVGG, a sparse autoencoder, ResNet-18, EfficientNet-Lite0) and their registry."""

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
from .efficientnet import EfficientNetLite0, load_efficientnet_lite0

__all__ = ['BasicBlock', 'EfficientNetLite0', 'LeNet300100', 'LeNet5', 'MODELS', 'ResNet18', 'SmallVGG',
           'SparseAutoencoder', 'list_models', 'load_efficientnet_lite0', 'make_model']
