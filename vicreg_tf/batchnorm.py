"""BatchNormalization for VICReg's step: synchronized across replicas, TF's fused kernel, one packed all-reduce.

Instance-level switches on plain `keras.layers.BatchNormalization` layers (saved
backbones load without vicreg_tf), and the moving statistics the non-finite
guard snapshots and restores.
"""
from __future__ import annotations

import functools

import keras
import tensorflow as tf

from vicreg_tf import compat


def synchronize_batchnorm(model: keras.layers.Layer) -> None:
    """Makes every BatchNormalization in `model` compute its batch statistics over all replicas.

    Keras reads `synchronized` at call time, so this converts a built model in
    place; inference (moving statistics) is unchanged.
    """
    for layer in compat.sublayers(model, include_self=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def _fused_batchnorm_call(layer, inputs, training=None, mask=None):
    """`BatchNormalization.call` through TensorFlow's fused kernel where that gives the same result.

    Keras 3 normalises with separate element-wise ops (moments, then
    scale-and-shift, and as many again backward); TF's FusedBatchNormV3 does each
    direction in one pass. Taken in training mode for NHWC or 2-D inputs
    normalised over the last axis, on one replica (or with `synchronized=False`),
    without mask or renorm; synchronized over several replicas it takes
    `_packed_sync_batchnorm_call` (one all-reduce); anything else goes to Keras' own code. Same
    statistics as Keras: the batch variance used for the moving average is the
    biased one (TF's kernel returns the unbiased one; it is converted back).
    """
    rank = len(inputs.shape)
    eligible = (
        not isinstance(training, tf.Tensor) and bool(training) and layer.trainable
        and mask is None and not layer.renorm and rank in (2, 4)
        and layer.axis in (-1, rank - 1) and inputs.shape[-1] is not None
        and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16)
    )
    if not eligible:
        return type(layer).call(layer, inputs, training=training, mask=mask)
    if layer.synchronized and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        return _packed_sync_batchnorm_call(layer, inputs)
    channels = inputs.shape[-1]
    x = tf.cast(inputs, tf.float32)  # Keras also normalises half-precision inputs in float32
    if rank == 2:
        x = tf.reshape(x, [-1, 1, 1, channels])
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels], tf.float32)
    offset = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels], tf.float32)
    y, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
        x, scale, offset, epsilon=layer.epsilon, data_format="NHWC", is_training=True
    )
    count = tf.cast(tf.size(x) // channels, tf.float32)
    variance = unbiased_variance * tf.maximum(count - 1.0, 0.0) / count
    momentum = layer.momentum
    layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(
        tf.cast(layer.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum)
    )
    if rank == 2:
        y = tf.reshape(y, tf.shape(inputs))
    return tf.cast(y, layer.compute_dtype)


def _packed_sync_batchnorm_call(layer, inputs):
    """Synchronized BatchNorm in training with one all-reduce per call instead of Keras' three.

    Keras all-reduces the sum, the sum of squares and the count separately (three
    collectives forward, three more for their gradients); here they travel
    concatenated in one tensor. Same arithmetic as Keras' `_compute_moments_sync`:
    mean = sum / n, variance = max(E[x^2] - mean^2, 0), in float32.
    """
    channels = inputs.shape[-1]
    x = tf.cast(inputs, tf.float32)
    axes = list(range(len(x.shape) - 1))
    count = tf.cast(tf.size(x) // channels, tf.float32)
    packed = tf.concat([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count[None]], axis=0)
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, packed)
    total_sum, total_squares, total_count = total[:channels], total[channels:2 * channels], total[2 * channels]
    mean = tf.math.divide_no_nan(total_sum, total_count)
    variance = tf.maximum(tf.math.divide_no_nan(total_squares, total_count) - tf.square(mean), 0.0)
    momentum = layer.momentum
    layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(
        tf.cast(layer.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum)
    )
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else None
    offset = tf.cast(layer.beta, tf.float32) if layer.center else None
    y = tf.nn.batch_normalization(x, mean, variance, offset, scale, layer.epsilon)
    return tf.cast(y, layer.compute_dtype)


def use_fused_batchnorm(model: keras.layers.Layer, enabled: bool = True) -> None:
    """Routes every BatchNormalization in `model` through TF's fused kernel in training (or back).

    An instance-level switch, not a new layer class: the layers stay plain
    `keras.layers.BatchNormalization`, so saved backbones load without vicreg_tf.
    Measured in bench/throughput.py (2-core CPU, small CNN): see docs/BENCHMARKS.md.
    """
    for layer in compat.sublayers(model, include_self=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            if enabled:
                layer.call = functools.partial(_fused_batchnorm_call, layer)
            elif "call" in layer.__dict__:
                del layer.__dict__["call"]


def batchnorm_statistics(model) -> list:
    """The moving mean and variance of every BatchNormalization in `model` (not other non-trainables,
    e.g. a BYOL target network, which the forward pass does not change)."""
    return [
        variable
        for layer in compat.sublayers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
        for variable in (layer.moving_mean, layer.moving_variance)
    ]
