"""Batches for `VICReg.fit` from any tf.data dataset of images (`view_pairs`), and for evaluation."""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from vicreg_tf.data.images import _positive


def _images_only(dataset: tf.data.Dataset) -> tf.data.Dataset:
    if isinstance(dataset.element_spec, tuple):
        return dataset.map(lambda image, *rest: image)
    return dataset


def view_pairs(
    images_dataset: tf.data.Dataset,
    two_views: Callable,
    batch_size: int,
    *,
    shuffle_buffer: int = 10_000,
    seed: int | None = None,
    repeat: bool = True,
) -> tf.data.Dataset:
    """Batches of `(view_a, view_b)` for `VICReg.fit`: shuffle, batch, augment, prefetch.

    Views are made after batching (the augmentation layers are vectorised, one
    call per batch) in a parallel, deterministic `map`; batch k is augmented with
    the stateless seed `(seed, k)`, so the same `seed` gives the same stream of
    views (and the same shuffle order). Incomplete final batches are dropped
    (batch statistics need full batches). Labels, if any, are dropped.

    Under `tf.distribute`, `batch_size` is the global batch: pass the result to
    `strategy.experimental_distribute_dataset` (or straight to `fit`).

    To augment on the accelerator instead (when the CPU cannot keep up): build
    the batches without views, e.g. `view_pairs(images, lambda x, seed: (x, x),
    batch_size)` or `images.batch(batch_size, drop_remainder=True)`, and call the
    `TwoViews` layer on the device, in the model before `train_step`'s forward
    pass (`view_a, view_b = two_views(batch)` inside a `tf.function`).

    Args:
        images_dataset: unbatched images, or (image, label) pairs.
        two_views: `call(images, seed=(2,) int tensor) -> (view_a, view_b)`, e.g.
            `augment.paper_views(32)`.
        batch_size: images per batch (global batch under a strategy).
        shuffle_buffer: shuffle buffer size; 0 or 1 turns shuffling off.
        seed: int seed of the shuffle and the views; None: different every run.
        repeat: loop over the data forever (use `steps_per_epoch` in fit).

    Example:
    >>> from vicreg_tf import augment
    >>> pairs = view_pairs(from_arrays(np.zeros((64, 28, 28), np.uint8)), augment.grayscale_views(28), 32, seed=0)
    >>> view_a, view_b = next(iter(pairs))
    >>> view_a.shape
    TensorShape([32, 28, 28, 1])
    """
    batch_size = _positive("batch_size", batch_size)
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, (int, np.integer)) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    dataset = _images_only(images_dataset)
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if seed is None:
        seeds = tf.data.Dataset.random().batch(2)  # fresh randomness each run
    else:
        seeds = tf.data.Dataset.counter().map(lambda step: tf.stack([tf.constant(seed, tf.int64), step]))
    dataset = tf.data.Dataset.zip((dataset, seeds))
    dataset = dataset.map(
        lambda batch, batch_seed: tuple(two_views(batch, seed=batch_seed)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    options = tf.data.Options()
    # In-memory sources cannot be sharded by file; shard by data under MultiWorkerMirroredStrategy.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_batches(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Plain batches for evaluation: no augmentation, no shuffle, the last partial batch kept.

    Example:
    >>> batches = eval_batches(from_arrays(np.zeros((10, 8, 8), np.uint8)), 4)
    >>> [int(images.shape[0]) for images, _ in batches]
    [4, 4, 2]
    """
    batch_size = _positive("batch_size", batch_size)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
