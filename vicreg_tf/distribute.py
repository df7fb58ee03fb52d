"""Gathering embeddings across replicas, as the official code's FullGatherLayer does.

VICReg's variance and covariance are batch statistics: under data parallelism
they must see the global batch, not each replica's slice (Sec. 4.1 of the
paper; `FullGatherLayer` in facebookresearch/vicreg).
"""
from __future__ import annotations

import tensorflow as tf


def num_replicas() -> int:
    """Replicas in sync in the current strategy (1 outside any strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def gather_replicas(z: tf.Tensor) -> tf.Tensor:
    """Concatenates `z` from all replicas along the batch axis; identity for one replica.

    Differentiable: the gradient of `all_gather` all-reduces (sums) the incoming
    gradient and returns this replica's slice, like FullGatherLayer.backward.
    Must be called in a replica context (inside `train_step`).
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "gather_replicas must run in a replica context (e.g. inside train_step), "
            "not in a cross-replica context"
        )
    if context.num_replicas_in_sync == 1:
        return z
    gathered = context.all_gather(z, axis=0)
    # MirroredStrategy's gather loses the static shape; the width is needed at trace time
    # (e.g. the LogDet entropy's D), and it is the same as z's.
    gathered.set_shape(tf.TensorShape([None]).concatenate(z.shape[1:]))
    return gathered
