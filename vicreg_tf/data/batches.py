"""Batches for `VICReg.fit` from any tf.data dataset of images (`view_pairs`), and for evaluation."""
from __future__ import annotations

import os
from typing import Callable

import tensorflow as tf

from vicreg_tf import arguments
from vicreg_tf.data import pipeline
from vicreg_tf.data.base import _Source
from vicreg_tf.data.images import NO_LABEL


class _Decoded(_Source):
    """A tf.data dataset of decoded images (labels dropped) as a record source: read in order, nothing to decode."""

    kind = "dataset"
    random_access = False
    is_encoded = False

    def __init__(self, dataset: tf.data.Dataset):
        if isinstance(dataset.element_spec, tuple):
            dataset = dataset.map(lambda image, *rest: image)
        shape = dataset.element_spec.shape
        super().__init__(max(int(dataset.cardinality()), 0), (shape[-1] if shape.rank else None) or 0, labelled=False)
        self.dataset = dataset

    def records(self) -> tf.data.Dataset:
        return self.dataset.map(lambda image: (image, tf.constant(NO_LABEL, tf.int32)))


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

    The input pipeline's first and last stages (`vicreg_tf.data.pipeline`) on
    images already decoded: each pass over the dataset is shuffled statelessly in
    windows of `shuffle_buffer` images with a seed of (seed, pass), the passes are
    batched one after another, and batch k is augmented after batching (the
    augmentation layers are vectorised, one call per batch) in a parallel,
    deterministic `map` with the seed of (seed, k): the same `seed` gives the same
    stream of views and the same order. Incomplete final batches are dropped
    (batch statistics need full batches). Labels, if any, are dropped.

    Under `tf.distribute`, `batch_size` is the global batch: pass the result to
    `strategy.experimental_distribute_dataset` (or straight to `fit`).

    To augment on the accelerator instead (when the CPU cannot keep up): build
    the batches without views, e.g. `view_pairs(images, lambda x, seed: (x, x),
    batch_size)` or `images.batch(batch_size, drop_remainder=True)`, and call the
    `TwoViews` layer on the device, in the model before `train_step`'s forward
    pass (`view_a, view_b = two_views(batch)` inside a `tf.function`). For a
    source (a folder, tfds, TFRecords, arrays), `pipeline.view_pair_batches` makes
    the crops where the images are decoded and can leave the rest to the model.

    Args:
        images_dataset: unbatched images, or (image, label) pairs.
        two_views: `call(images, seed=(2,) int tensor) -> (view_a, view_b)`, e.g.
            `augment.paper_views(32)`.
        batch_size: images per batch (global batch under a strategy).
        shuffle_buffer: images shuffled together; 0 or 1 turns shuffling off.
        seed: int seed of the shuffle and the views; None: different every run.
        repeat: loop over the data forever (use `steps_per_epoch` in fit).

    Example:
    >>> from vicreg_tf import augment
    >>> pairs = view_pairs(from_arrays(np.zeros((64, 28, 28), np.uint8)), augment.grayscale_views(28), 32, seed=0)
    >>> view_a, view_b = next(iter(pairs))
    >>> view_a.shape
    TensorShape([32, 28, 28, 1])
    """
    batch_size = arguments.positive_int("batch_size", batch_size)
    shuffle_buffer = arguments.non_negative_int("shuffle_buffer", shuffle_buffer)
    seed = arguments.optional_seed(seed)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")  # fresh randomness each run
    batches = pipeline.order(_Decoded(images_dataset), batch_size, epochs=None if repeat else 1, seed=seed,
                             shuffle_buffer=shuffle_buffer)
    # The views, whole, on decoded images: one call of `two_views` per batch (any such callable).
    dataset = batches.map(
        lambda epoch, step, images: tuple(two_views(images, seed=pipeline.batch_seed(seed, epoch, step))),
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
    batch_size = arguments.positive_int("batch_size", batch_size)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
