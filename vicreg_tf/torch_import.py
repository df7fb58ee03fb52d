"""The official VICReg checkpoints (PyTorch `.pth`) as Keras backbones.

facebookresearch/vicreg publishes torchvision-style ResNet state dicts:

    curl -LO https://dl.fbaipublicfiles.com/vicreg/resnet50.pth      # 73.2% linear top-1
    # resnet50x2.pth (75.5%), resnet200x2.pth (77.3%)

`from_torch_checkpoint("resnet50.pth")` rebuilds the network with
`vicreg_tf.backbones.torchvision_resnet` (same layers, same padding, BatchNorm
eps 1e-5) and copies every tensor in; the result is a plain functional Keras model
from float32 images in [0, 1] to the pooled features, like every backbone here.
Needs PyTorch (`pip install "vicreg-tf[torch]"`), imported only when called.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import keras
import numpy as np

from vicreg_tf import backbones

# arch -> (depth, widen), as named in facebookresearch/vicreg's resnet.py.
ARCHS = {
    "resnet50": (50, 1),
    "resnet50x2": (50, 2),
    "resnet50x4": (50, 4),
    "resnet101": (101, 1),
    "resnet200x2": (200, 2),
}

# A full training checkpoint holds the backbone under one of these; the rest (the
# expander, the optimizer) is not part of the backbone.
_BACKBONE_PREFIXES = ("module.backbone.", "backbone.")
_NESTED_ENTRIES = ("model", "state_dict")
_MAX_LISTED = 5


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading PyTorch checkpoints needs PyTorch: pip install \"vicreg-tf[torch]\" "
            "(or pip install torch)"
        ) from e
    return torch


def _listed(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else f" ({len(keys)})"
    return shown + more


def _load_failure(error: Exception) -> str:
    """torch.load's reason, without its advice to retry with weights_only=False (which runs the file's code)."""
    text = " ".join(str(error).split())
    if "weights_only" in text:
        # "... WeightsUnpickler error: Unsupported operand 237 Check the documentation ..."
        _, _, reason = text.partition("WeightsUnpickler error:")
        reason = reason.split(" Check the documentation")[0].strip()
        return f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.pth` file into {torchvision key: float32 array}, unwrapped and unprefixed.

    Accepts a bare state dict (the official files), a dict holding it under
    "model" or "state_dict" (a training checkpoint), and keys prefixed
    `module.backbone.`, `backbone.` (only those keys are kept: the rest is the
    expander) or `module.` (DataParallel). `num_batches_tracked` is dropped.
    """
    torch = _import_torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    expected = "a PyTorch state dict saved with torch.save (e.g. the official resnet50.pth)"
    try:
        # weights_only: never run pickled code from a downloaded file.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a checkpoint"
        raise ValueError(f"{path} is not a PyTorch checkpoint: expected {expected}; torch.load could not read it "
                         f"as weights ({_load_failure(e)})") from None
    for entry in _NESTED_ENTRIES:
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(entry), Mapping):
            checkpoint = checkpoint[entry]
            break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict: expected {expected}")
    tensors = {str(k): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors: expected {expected}")
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    else:
        if all(k.startswith("module.") for k in tensors):
            tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return {
        k: v.detach().to(device="cpu", dtype=torch.float32).numpy()
        for k, v in tensors.items()
        if not k.endswith("num_batches_tracked")
    }


def _torch_weights(layer: keras.layers.Layer) -> list[tuple[str, str]]:
    """[(torch key, how to convert)] for the Keras layer's weights, in Keras' order."""
    prefix = layer.name.replace("_", ".")  # layer1_0_downsample_0 -> layer1.0.downsample.0
    if isinstance(layer, keras.layers.Conv2D):
        return [(f"{prefix}.weight", "conv")]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [(f"{prefix}.{n}", "copy") for n in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, keras.layers.Dense):
        return [(f"{prefix}.weight", "dense"), (f"{prefix}.bias", "copy")]
    return []


def _to_keras(array: np.ndarray, how: str) -> np.ndarray:
    if how == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    if how == "dense":  # (out, in) -> (in, out)
        return array.T if array.ndim == 2 else array
    return array


def _torch_shape(keras_shape, how: str) -> tuple:
    shape = tuple(int(d) for d in keras_shape)
    if how == "conv" and len(shape) == 4:
        return tuple(shape[i] for i in (3, 2, 0, 1))
    if how == "dense" and len(shape) == 2:
        return shape[::-1]
    return shape


def from_torch_checkpoint(
    path: str | os.PathLike,
    arch: str = "resnet50",
    *,
    input_shape=(224, 224, 3),
    num_classes: int | None = None,
    name: str | None = None,
) -> keras.Model:
    """Converts a torchvision-style ResNet `.pth` (the official VICReg weights) into a Keras backbone.

    Args:
        path: the `.pth` file (see `load_state_dict` for the layouts accepted).
        arch: one of `ARCHS`: "resnet50", "resnet50x2", "resnet200x2", ...
        input_shape: the model's (height, width, 3); the weights fit any size.
        num_classes: None (the default) adds the `fc` head when the checkpoint
            has `fc.weight` (the official backbones have none); 0 leaves a
            checkpoint's fc out; N demands an fc of N classes.
        name: the Keras model's name (default: `arch`).

    Returns:
        A functional keras.Model, float32 images in [0, 1] -> (None, 2048 * widen)
        features (or `num_classes` logits), BatchNorm on the checkpoint's running statistics.

    Raises:
        ImportError: PyTorch is not installed.
        FileNotFoundError: no file at `path`.
        ValueError: not a checkpoint, an unknown arch, missing or unexpected keys,
            or a tensor whose shape does not fit `arch` (each named).

    Example:
    >>> backbone = from_torch_checkpoint("resnet50.pth")  # doctest: +SKIP
    >>> backbone.output.shape  # doctest: +SKIP
    (None, 2048)
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    state = load_state_dict(path)
    has_fc = "fc.weight" in state
    if num_classes is None:
        num_classes = int(state["fc.weight"].shape[0]) if has_fc and state["fc.weight"].ndim == 2 else 0
    elif num_classes == 0 and has_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    depth, widen = ARCHS[arch]
    model = backbones.torchvision_resnet(
        input_shape, depth=depth, widen=widen, num_classes=num_classes, name=name or arch
    )

    plan = [(layer, _torch_weights(layer)) for layer in model.layers]
    plan = [(layer, keys) for layer, keys in plan if keys]
    wanted = {key for _, keys in plan for key, _ in keys}
    missing, unexpected = wanted - state.keys(), state.keys() - wanted
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listed(unexpected)}")
        raise ValueError(
            f"{path} does not match arch {arch!r} ({'; '.join(problems)}). Is it a torchvision-style "
            f"ResNet state dict of that arch? Known archs: {sorted(ARCHS)}"
        )

    mismatched = []
    for layer, keys in plan:
        values = []
        for (key, how), variable in zip(keys, layer.weights):
            value = _to_keras(state[key], how)
            if tuple(value.shape) != tuple(variable.shape):
                mismatched.append(
                    f"{key} has shape {tuple(state[key].shape)}, {arch} expects {_torch_shape(variable.shape, how)}"
                )
            values.append(value)
        if not mismatched:
            layer.set_weights(values)
    if mismatched:
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ValueError(f"{path} does not fit arch {arch!r}: {mismatched[0]}{more}")
    return model
