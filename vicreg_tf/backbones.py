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
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str = "small_cnn",
) -> keras.Model:
    """A small VGG-style CNN for 28x28 / 32x32 images (the Fashion-MNIST config's backbone).

    Each stage is two 3x3 Conv-BN-ReLU blocks; stages after the first start with
    2x2 max-pooling; global average pooling gives `widths[-1]` features.
    `mean`/`std` default to Fashion-MNIST's for one channel, ImageNet's for three.

    Example:
    >>> backbone = small_cnn((28, 28, 1))
    >>> backbone.output.shape
    (None, 128)
    """
    if mean is None or std is None:
        gray = len(tuple(input_shape)) == 3 and input_shape[-1] == 1
        mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if gray else (IMAGENET_MEAN, IMAGENET_STD)
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


# torchvision's Bottleneck ResNets: blocks per stage (layer1..layer4).
TORCHVISION_RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}

# PyTorch's BatchNorm2d defaults; PyTorch's momentum 0.1 weights the new batch, Keras' the old average.
_TORCH_BN = dict(epsilon=1e-5, momentum=0.9)


def _torch_conv(filters: int, kernel: int, stride: int, name: str) -> layers.Conv2D:
    # torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
    return layers.Conv2D(
        filters, kernel, strides=stride, padding="valid", use_bias=False, name=name,
        kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
    )


def _torch_conv3x3(x, filters: int, stride: int, name: str):
    # PyTorch pads 1 on every side. Keras' "same" pads (0, 1) for stride 2 on even
    # sizes, which shifts the sampling grid, so pad explicitly and use "valid".
    x = layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    return _torch_conv(filters, 3, stride, name)(x)


def _torch_bottleneck(x, planes: int, stride: int, downsample: bool, name: str):
    out = _torch_conv(planes, 1, 1, f"{name}_conv1")(x)
    out = layers.BatchNormalization(name=f"{name}_bn1", **_TORCH_BN)(out)
    out = layers.ReLU(name=f"{name}_relu1")(out)
    out = _torch_conv3x3(out, planes, stride, f"{name}_conv2")
    out = layers.BatchNormalization(name=f"{name}_bn2", **_TORCH_BN)(out)
    out = layers.ReLU(name=f"{name}_relu2")(out)
    out = _torch_conv(planes * 4, 1, 1, f"{name}_conv3")(out)
    out = layers.BatchNormalization(name=f"{name}_bn3", **_TORCH_BN)(out)
    identity = x
    if downsample:
        identity = _torch_conv(planes * 4, 1, stride, f"{name}_downsample_0")(x)
        identity = layers.BatchNormalization(name=f"{name}_downsample_1", **_TORCH_BN)(identity)
    out = layers.Add(name=f"{name}_add")([out, identity])
    return layers.ReLU(name=f"{name}_relu3")(out)


def torchvision_resnet(
    input_shape=(224, 224, 3),
    depth: int = 50,
    widen: int = 1,
    num_classes: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    name: str | None = None,
) -> keras.Model:
    """torchvision's Bottleneck ResNet (v1.5), layer for layer, as the official VICReg code builds it.

    Every layer with weights is named after its PyTorch module with "." -> "_"
    (`conv1`, `bn1`, `layer1_0_conv1`, `layer1_0_downsample_0`, `fc`), so a
    torchvision-style state dict maps onto it one to one
    (`vicreg_tf.transfer.from_torch_checkpoint`). As in PyTorch: the stride on the
    bottleneck's 3x3 conv, BatchNorm epsilon 1e-5 and momentum 0.1 (0.9 in Keras'
    convention), zero padding on all sides (explicit `ZeroPadding2D` + "valid"; the
    max-pool's zero padding equals PyTorch's -inf padding because its input is
    post-ReLU, >= 0). `widen` multiplies every width, the stem's included, as
    facebookresearch/vicreg's `resnet50x2` does (`widen=2`: 4096 features).

    Args:
        input_shape: (height, width, 3); float32 images in [0, 1].
        depth: 50, 101, 152 or 200.
        widen: width multiplier.
        num_classes: a `fc` Dense head of this many logits on the pooled
            features; 0 (the default) returns the 2048 * widen features.
        mean, std: the normalization inside the model (ImageNet's by default).
        name: the model's name (default `resnet{depth}` or `resnet{depth}x{widen}`).

    Example:
    >>> torchvision_resnet((64, 64, 3), depth=50, widen=2).output.shape
    (None, 4096)
    """
    if depth not in TORCHVISION_RESNET_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(TORCHVISION_RESNET_DEPTHS)}, got {depth!r}")
    if int(widen) != widen or widen < 1:
        raise ValueError(f"widen must be a positive integer, got {widen!r}")
    if int(num_classes) != num_classes or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    shape = _check_input_shape(input_shape, mean)
    width = 64 * int(widen)
    inputs = keras.Input(shape, name="images")
    x = _normalization(mean, std)(inputs)
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = _torch_conv(width, 7, 2, "conv1")(x)
    x = layers.BatchNormalization(name="bn1", **_TORCH_BN)(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    in_channels = width
    for stage, blocks in enumerate(TORCHVISION_RESNET_DEPTHS[depth]):
        planes = width * 2**stage
        for block in range(blocks):
            stride = 2 if (stage > 0 and block == 0) else 1
            downsample = block == 0 and (stride != 1 or in_channels != planes * 4)
            x = _torch_bottleneck(x, planes, stride, downsample, name=f"layer{stage + 1}_{block}")
            in_channels = planes * 4
    outputs = layers.GlobalAveragePooling2D(name="avgpool")(x)
    if num_classes:
        outputs = layers.Dense(int(num_classes), name="fc")(outputs)
    if name is None:
        name = f"resnet{depth}" + (f"x{int(widen)}" if widen != 1 else "")
    return keras.Model(inputs, outputs, name=name)


def resnet50_torchvision(input_shape=(224, 224, 3), name: str = "resnet50", **kwargs) -> keras.Model:
    """torchvision's ResNet-50 (`torchvision_resnet(depth=50)`), 2048 features: the official VICReg backbone."""
    return torchvision_resnet(input_shape, depth=50, widen=1, name=name, **kwargs)


def resnet50x2(input_shape=(224, 224, 3), name: str = "resnet50x2", **kwargs) -> keras.Model:
    """The official VICReg ResNet-50 x2 (every width doubled), 4096 features."""
    return torchvision_resnet(input_shape, depth=50, widen=2, name=name, **kwargs)


def resnet200x2(input_shape=(224, 224, 3), name: str = "resnet200x2", **kwargs) -> keras.Model:
    """The official VICReg ResNet-200 x2 (stages of 3, 24, 36, 3 blocks, widths doubled), 4096 features."""
    return torchvision_resnet(input_shape, depth=200, widen=2, name=name, **kwargs)


BACKBONES = {
    "small_cnn": small_cnn,
    "resnet18_cifar": resnet18_cifar,
    "resnet50": resnet50,
    "resnet50_torchvision": resnet50_torchvision,
    "resnet50x2": resnet50x2,
    "resnet200x2": resnet200x2,
}


def build_backbone(name: str, **kwargs) -> keras.Model:
    """Builds a backbone by name: one of `BACKBONES`."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)
