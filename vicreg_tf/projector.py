"""The expander (the paper calls the projector an "expander", Sec. 2): Dense-BN-ReLU blocks."""
from __future__ import annotations

import keras
from keras import layers


def parse_projector_spec(spec: str) -> list[int]:
    """Parses "8192-8192-8192" into [8192, 8192, 8192]."""
    if not isinstance(spec, str):
        raise TypeError(f"projector spec must be a string like '8192-8192-8192', got {spec!r}")
    parts = spec.strip().split("-")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(
            f"projector spec {spec!r} does not parse: expected positive integers separated "
            "by '-', e.g. '8192-8192-8192'"
        )
    return sizes


def build_projector(spec: str, *, name: str = "expander", output_batchnorm: bool = False,
                    last_bias: bool = False) -> keras.Sequential:
    """Builds the expander from a spec string, as `Projector()` in the official code.

    Every layer but the last is Dense -> BatchNormalization -> ReLU; the last is a
    linear Dense without bias. BatchNorm is synchronized across replicas, so its
    statistics are those of the global batch (required for exactness under
    MirroredStrategy), with PyTorch's momentum 0.1 / epsilon 1e-5.

    Args:
        spec: layer widths separated by '-', e.g. "8192-8192-8192".
        name: the Keras name of the returned model.
        output_batchnorm: end with a BatchNorm without scale and offset (SimSiam's
            projector: BatchNorm1d(affine=False) after its last layer).
        last_bias: a bias on the last Dense (SimSiam's predictor).

    Example:
    >>> expander = build_projector("64-64-32")
    >>> expander(keras.ops.ones((4, 16))).shape
    (4, 32)
    """
    sizes = parse_projector_spec(spec)
    blocks = []
    for i, width in enumerate(sizes[:-1]):
        blocks += [
            layers.Dense(width, name=f"dense{i}"),
            layers.BatchNormalization(
                momentum=0.9, epsilon=1e-5, synchronized=True, name=f"bn{i}"
            ),
            layers.ReLU(name=f"relu{i}"),
        ]
    blocks.append(layers.Dense(sizes[-1], use_bias=last_bias, name=f"dense{len(sizes) - 1}"))
    if output_batchnorm:
        blocks.append(layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True, center=False,
                                                scale=False, name=f"bn{len(sizes) - 1}"))
    return keras.Sequential(blocks, name=name)
