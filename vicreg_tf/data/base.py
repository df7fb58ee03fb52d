"""What every source is: a count, its channels, its items (or records), its evaluation images."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from vicreg_tf import arguments
from vicreg_tf.data.images import EVAL_CROP_FRACTION, _decode_full, eval_transform


class _Source:
    """Common interface; see the module docstring."""

    kind = "source"
    random_access = True  # items of a batch can be fetched by index (names or arrays)
    is_encoded = True  # items are encoded bytes (or names of files holding them)

    def __init__(self, count: int, channels: int, labelled: bool):
        self.count = int(count)
        self.channels = int(channels)
        self.labelled = bool(labelled)

    def describe(self) -> dict:
        return {"kind": self.kind, "count": self.count}

    # Random-access sources: the item and label tensors, indexable with tf.gather.
    def items(self) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def read(self, item: tf.Tensor) -> tf.Tensor:
        """An item -> encoded bytes (folders read the file; records are bytes already)."""
        return item

    def name_of(self, item: tf.Tensor) -> tf.Tensor:
        """What to call an item in a warning."""
        return tf.strings.format("a record of {} bytes", tf.strings.length(item))

    def images(self, image_size, crop_fraction: float = EVAL_CROP_FRACTION) -> tf.data.Dataset:
        """Evaluation images: (float32 (h, w, C) in [0, 1], int32 label), in order, unreadable ones skipped.

        Each is resized and center-cropped by `eval_transform` with `crop_fraction`.
        """
        size = arguments.image_size(image_size)
        crop_fraction = arguments.crop_fraction(crop_fraction)
        channels = self.channels

        def load(item, label):
            image = _decode_full(self.read(item), channels)
            return eval_transform(image, size, crop_fraction), label

        def skip_bad(item, label):
            ok = tf.data.Dataset.from_tensors((item, label)).map(load).ignore_errors()
            return ok

        return self.encoded_items().interleave(skip_bad, cycle_length=16, block_length=1,
                                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def check_workers(self, workers: int) -> None:
        """Raises, in one line, when this source cannot feed `workers` input pipelines (record sources
        read whole files per worker); any worker count works for random-access sources."""

    def limited(self, n: int) -> "_Source":
        """The first `n` images only (smoke runs); the source itself if it has at most `n`."""
        raise NotImplementedError

    def subset(self, indices) -> "_Source":
        """The items at `indices` (random-access sources)."""
        raise NotImplementedError

    def sample(self, n: int, seed: int = 0) -> "_Source":
        """At most `n` items drawn by `seed` without replacement, kept in stored order; `n` = 0: all of them.

        What evaluation probes take (the kNN monitor's bank and queries, the end-of-run
        spectrum): a class-sorted folder's first `n` files would hold a few classes.
        Record sources (no random access) override it: the first `n` records of their
        segments in an order drawn by `seed`.
        """
        if not n or n >= self.count:
            return self
        if not self.random_access:
            return self.limited(n)
        return self.subset(np.sort(np.random.default_rng(seed).choice(self.count, n, replace=False)))

    def encoded_items(self) -> tf.data.Dataset:
        items, labels = self.items()
        return tf.data.Dataset.from_tensor_slices((items, labels))

    def encoded(self) -> tf.data.Dataset:
        """(encoded bytes, int32 label) in the source's order."""
        return self.encoded_items().map(lambda item, label: (self.read(item), label),
                                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
