"""Transfer learning: the pretrained backbone as a plain Keras model, in one line.

    from vicreg_tf.transfer import load_backbone
    backbone = load_backbone("runs/fmnist/backbone.keras")       # frozen
    outputs = keras.layers.Dense(10)(backbone.output)
    classifier = keras.Model(backbone.input, outputs)
    ...                                                          # train the head, then
    set_trainable(backbone, True)    # unfreeze all but BatchNorm; recompile and fine-tune

The backbone takes float32 images in [0, 1] (it normalises them itself) and
returns (N, F) features. An exported SavedModel version directory loads into
Keras too, for inference only: `keras.layers.TFSMLayer(path, call_endpoint="serving_default")`.
"""
from __future__ import annotations

import os
from pathlib import Path

import keras

from vicreg_tf import compat
from vicreg_tf.serving import backbone_io_shape


def set_trainable(backbone: keras.Model, trainable: bool, *, freeze_batchnorm: bool = True) -> keras.Model:
    """Freezes or unfreezes a backbone for transfer learning; returns it. Recompile afterwards.

    With `freeze_batchnorm` (the default), unfreezing leaves every
    BatchNormalization frozen: Keras 3 runs a non-trainable BatchNormalization
    on its moving statistics even under `fit`, so fine-tuning starts from the
    pretrained features and small fine-tuning batches cannot overwrite the
    statistics. Calling the backbone with `training=False` inside a functional
    classifier does not do this in Keras 3: the outer model's `training=True`
    during `fit` replaces it.

    Args:
        backbone: the model to change in place.
        trainable: whether its weights train.
        freeze_batchnorm: keep BatchNormalization layers frozen when `trainable`.

    Example:
    >>> backbone = set_trainable(load_backbone("backbone.keras"), True)  # doctest: +SKIP
    """
    layers = compat.sublayers(backbone, include_self=True)
    # Every layer explicitly: Keras does not pass `trainable = True` down to the
    # sublayers of a model that is already trainable.
    for layer in layers:
        layer.trainable = bool(trainable)
    if trainable and freeze_batchnorm:
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return backbone


def load_backbone(path: str | os.PathLike, trainable: bool = False) -> keras.Model:
    """Loads a backbone from a `.keras` file, frozen unless `trainable=True`.

    A backbone file (`backbone.save("x.keras")`, as vicreg-train writes) loads with
    no custom objects. A whole VICReg model saved as `.keras` is accepted too; its
    `.backbone` is returned (that needs `vicreg_tf.model`, imported on demand).

    With `trainable=False` every layer is frozen, and Keras 3 runs a frozen
    BatchNormalization on its moving statistics even under `fit`, so the features
    stay those of pretraining. With `trainable=True` every weight trains except
    BatchNormalization's, which stays frozen on the pretrained statistics (see
    `set_trainable`); fine-tune with a small learning rate.

    Args:
        path: a `.keras` file.
        trainable: whether the backbone's weights (BatchNorm excepted) train in a new model.

    Returns:
        A functional keras.Model (None, H, W, C) float32 in [0, 1] -> (None, F).

    Example:
    >>> backbone = load_backbone("backbone.keras")  # doctest: +SKIP
    >>> model = keras.Sequential([backbone, keras.layers.Dense(10)])  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no backbone file at {path}")
    if path.is_dir():
        hint = (
            " It looks like a SavedModel export: load it with "
            f"keras.layers.TFSMLayer({str(path)!r}, call_endpoint='serving_default') (inference only)."
            if (path / "saved_model.pb").exists()
            else ""
        )
        raise ValueError(f"expected a .keras file, got the directory {path}.{hint}")
    if path.suffix != ".keras":
        raise ValueError(
            f"expected a .keras file (written by model.save('name.keras')), got {path.name!r}"
        )
    model = _load(path)
    # A whole VICReg model: take its backbone.
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model):
        model = backbone
    try:
        backbone_io_shape(model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} does not hold a backbone: {e}") from e
    return set_trainable(model, trainable)


def _load(path: Path) -> keras.Model:
    try:
        return keras.saving.load_model(path, compile=False)
    except (TypeError, ValueError) as first_error:
        # A whole VICReg model needs its class registered; plain backbones never get here.
        try:
            import vicreg_tf.model  # noqa: F401  (registers VICReg with Keras)
        except ImportError:
            raise ValueError(f"{path} is not a loadable Keras model: {first_error}") from first_error
        try:
            return keras.saving.load_model(path, compile=False)
        except Exception:
            raise ValueError(
                f"{path} is not a loadable Keras model: {first_error}"
            ) from first_error
    except Exception as e:  # a truncated or foreign zip file raises assorted errors
        raise ValueError(f"{path} is not a loadable .keras file: {e}") from e


# The official VICReg checkpoints (PyTorch .pth) as Keras backbones; needs torch only when called.
from vicreg_tf.torch_import import from_torch_checkpoint  # noqa: E402,F401  (re-exported)
