"""Backbones: plain functional Keras models from float images in [0, 1] to a feature vector.

Every backbone starts with its own input normalization layer, so the exported
SavedModel, the kNN/linear evaluations and transfer learning all take the same
input: float32 images in [0, 1], NHWC. Only built-in Keras layers are used, so
a saved backbone loads with no custom objects.
"""
from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

# Per-channel statistics of the data sets we ship configs for.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalization(mean: Sequence[float], std: Sequence[float]) -> layers.Layer:
    return layers.Normalization(
        mean=list(mean), variance=[s * s for s in std], name="normalize"
    )


def _check_input_shape(input_shape, mean) -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 3 or any((d is None or int(d) <= 0) for d in shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) with positive sizes, got {input_shape!r}"
        )
    if len(mean) != shape[-1]:
        raise ValueError(
            f"mean/std have {len(mean)} channels but input_shape {shape} has {shape[-1]}"
        )
    return shape


def small_cnn(
    input_shape=(28, 28, 1),
    widths: Sequence[int] = (32, 64, 128),
    mean: Sequence[float] = FASHION_MNIST_MEAN,
    std: Sequence[float] = FASHION_MNIST_STD,
    name: str = "small_cnn",
) -> keras.Model:
    """A small VGG-style CNN for 28x28 / 32x32 images (the Fashion-MNIST config's backbone).

    Each stage is two 3x3 Conv-BN-ReLU blocks; stages after the first start with
    2x2 max-pooling; global average pooling gives `widths[-1]` features.

    Example:
    >>> backbone = small_cnn((28, 28, 1))
    >>> backbone.output.shape
    (None, 128)
    """
    shape = _check_input_shape(input_shape, mean)
    inputs = keras.Input(shape, name="images")
    x = _normalization(mean, std)(inputs)
    for stage, width in enumerate(widths):
        if stage > 0:
            x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
        for block in range(2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{stage}_{block}")(x)
            x = layers.BatchNormalization(name=f"bn{stage}_{block}")(x)
            x = layers.ReLU(name=f"relu{stage}_{block}")(x)
    outputs = layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, outputs, name=name)


def _basic_block(x, width: int, stride: int, name: str):
    shortcut = x
    y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != width:
        shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet18_cifar(
    input_shape=(32, 32, 3),
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    width: int = 64,
    name: str = "resnet18_cifar",
) -> keras.Model:
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), 512 features.

    This is the network solo-learn and lightly use for CIFAR-10 benchmarks.

    Example:
    >>> resnet18_cifar().output.shape
    (None, 512)
    """
    shape = _check_input_shape(input_shape, mean)
    inputs = keras.Input(shape, name="images")
    x = _normalization(mean, std)(inputs)
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, multiplier in enumerate((1, 2, 4, 8)):
        for block in range(2):
            stride = 2 if (stage > 0 and block == 0) else 1
            x = _basic_block(x, width * multiplier, stride, name=f"stage{stage}_block{block}")
    outputs = layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, outputs, name=name)


def resnet50(
    input_shape=(224, 224, 3),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    name: str = "resnet50",
) -> keras.Model:
    """Keras' ResNet-50 (random init, no top, average pooling), 2048 features: the paper's backbone.

    Example:
    >>> resnet50().output.shape
    (None, 2048)
    """
    shape = _check_input_shape(input_shape, mean)
    inputs = keras.Input(shape, name="images")
    x = _normalization(mean, std)(inputs)
    trunk = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=shape, pooling="avg"
    )
    outputs = trunk(x)
    return keras.Model(inputs, outputs, name=name)


BACKBONES = {"small_cnn": small_cnn, "resnet18_cifar": resnet18_cifar, "resnet50": resnet50}


def build_backbone(name: str, **kwargs) -> keras.Model:
    """Builds a backbone by name: one of `BACKBONES`."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)
