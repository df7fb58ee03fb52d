"""What every source is: a count, its channels, its items, and the epoch orders (stateless)."""
from __future__ import annotations

import tensorflow as tf

from vicreg_tf.data.images import _decode_full, _image_size, eval_transform


def epoch_permutation(count: int, seed: tf.Tensor) -> tf.Tensor:
    """A permutation of 0..count-1 from a (2,) stateless seed."""
    return tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed=seed)


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

    def images(self, image_size) -> tf.data.Dataset:
        """Evaluation images: (float32 (h, w, C) in [0, 1], int32 label), in order, unreadable ones skipped."""
        size = _image_size(image_size)
        channels = self.channels

        def load(item, label):
            image = _decode_full(self.read(item), channels)
            return eval_transform(image, size), label

        def skip_bad(item, label):
            ok = tf.data.Dataset.from_tensors((item, label)).map(load).ignore_errors()
            return ok

        return self.encoded_items().interleave(skip_bad, cycle_length=16, block_length=1,
                                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def limited(self, n: int) -> "_Source":
        """The first `n` images only (smoke runs); the source itself if it has at most `n`."""
        raise NotImplementedError

    def encoded_items(self) -> tf.data.Dataset:
        items, labels = self.items()
        return tf.data.Dataset.from_tensor_slices((items, labels))

    def encoded(self) -> tf.data.Dataset:
        """(encoded bytes, int32 label) in the source's order."""
        return self.encoded_items().map(lambda item, label: (self.read(item), label),
                                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def windowed_permutation(dataset: tf.data.Dataset, window: int, seed: tf.Tensor) -> tf.data.Dataset:
    """Permutes each window of `window` consecutive elements with the stateless seed (seed, window index)."""
    if window <= 1:
        return dataset

    def permute(index, batch):
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(batch[1])[0]), seed=tf.stack([seed[0], seed[1] * 1_000_003 + index]))
        return tuple(tf.gather(part, order) for part in batch)

    return dataset.batch(window).enumerate().map(permute).unbatch()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
