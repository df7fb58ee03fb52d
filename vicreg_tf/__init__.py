"""vicreg-tf: VICReg for TensorFlow / Keras 3, exportable to TF Serving.

Public API:
    VICReg                 the Keras model (backbone + expander, VICReg train_step)
    vicreg_loss            the loss, and its terms invariance_loss, variance_loss, covariance_loss
    build_projector        "8192-8192-8192" -> expander
    LARS, warmup_cosine    the paper's optimizer and learning-rate schedule
    gather_replicas        all-gather across replicas (identity for one)
    StopOnNonFiniteLoss    callback that ends fit on a NaN/Inf loss
Submodules: backbones, augment, data, evaluation, serving, transfer.
"""
from vicreg_tf.distribute import gather_replicas, num_replicas
from vicreg_tf.losses import covariance_loss, invariance_loss, variance_loss, vicreg_loss
from vicreg_tf.model import VICReg, StopOnNonFiniteLoss
from vicreg_tf.optimizers import LARS, scaled_learning_rate, warmup_cosine
from vicreg_tf.projector import build_projector, parse_projector_spec
from vicreg_tf import backbones

__version__ = "0.1.0"

__all__ = [
    "VICReg",
    "StopOnNonFiniteLoss",
    "vicreg_loss",
    "invariance_loss",
    "variance_loss",
    "covariance_loss",
    "build_projector",
    "parse_projector_spec",
    "LARS",
    "warmup_cosine",
    "scaled_learning_rate",
    "gather_replicas",
    "num_replicas",
    "backbones",
]
