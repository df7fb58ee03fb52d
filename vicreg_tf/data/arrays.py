"""Images in memory: NumPy arrays as a tf.data source (`from_arrays`) or a streaming source (`ArraySource`)."""
from __future__ import annotations

import zlib

import numpy as np
import tensorflow as tf

from vicreg_tf import arguments
from vicreg_tf.data.base import _Source
from vicreg_tf.data.images import EVAL_CROP_FRACTION, NO_LABEL, eval_transform


def from_arrays(images, labels=None) -> tf.data.Dataset:
    """In-memory images as a source: uint8 0-255 or float in [0, 1], (N, H, W) or (N, H, W, C).

    Images stay in their dtype in memory (uint8 is 4x smaller than float32) and
    are converted per element.

    Args:
        images: array-like (N, H, W[, C]); uint8, or floats within [0, 1].
        labels: optional (N,) integer labels; -1 for every image when omitted.

    Example:
    >>> ds = from_arrays(np.zeros((4, 8, 8, 3), np.uint8), labels=[0, 1, 2, 3])
    >>> [int(label) for _, label in ds]
    [0, 1, 2, 3]
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W) or (N, H, W, C) array, got shape {images.shape}")
    if images.dtype == np.uint8:
        pass
    elif np.issubdtype(images.dtype, np.floating):
        low, high = float(images.min()), float(images.max())
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"float images must lie in [0, 1], got values in [{low}, {high}]; "
                             "divide uint8 data by 255")
        images = images.astype(np.float32, copy=False)
    else:
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got dtype {images.dtype}")
    if labels is None:
        labels = np.full(images.shape[0], NO_LABEL, np.int32)
    else:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be {images.shape[0]} integers (one per image), got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    return dataset.map(lambda image, label: (tf.image.convert_image_dtype(image, tf.float32), label))


class ArraySource(_Source):
    """uint8 images in memory, (N, H, W) or (N, H, W, C): items are the arrays themselves.

    Decoded images are kept only here, where they are in memory anyway (Fashion-MNIST:
    60,000 x 28 x 28 bytes = 47 MB).
    """

    kind = "arrays"
    is_encoded = False

    def __init__(self, images, labels=None, *, name: str = "arrays"):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty (N, H, W) or (N, H, W, C) array, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"ArraySource takes uint8 images (0-255), got dtype {images.dtype}")
        if labels is None:
            labels = np.full(images.shape[0], NO_LABEL, np.int32)
        labels = np.asarray(labels).astype(np.int32)
        super().__init__(images.shape[0], images.shape[-1], labelled=bool((labels >= 0).any()))
        self.array = images
        self.labels = labels
        self.name = name

    def describe(self) -> dict:
        digest = zlib.crc32(self.array[:: max(1, self.count // 64)].tobytes())
        return {"kind": self.kind, "name": self.name, "count": self.count, "shape": list(self.array.shape[1:]),
                "sample_crc32": digest}

    def items(self):
        return tf.constant(self.array), tf.constant(self.labels)

    def subset(self, indices) -> "ArraySource":
        indices = np.asarray(indices, np.int64)
        return ArraySource(self.array[indices], self.labels[indices], name=self.name)

    def limited(self, n: int) -> "ArraySource":
        return self if n >= self.count else ArraySource(self.array[:n], self.labels[:n], name=self.name)

    def images(self, image_size, crop_fraction: float = EVAL_CROP_FRACTION) -> tf.data.Dataset:
        size = arguments.image_size(image_size)
        crop_fraction = arguments.crop_fraction(crop_fraction)
        dataset = tf.data.Dataset.from_tensor_slices((self.array, self.labels))
        return dataset.map(lambda image, label: (eval_transform(image, size, crop_fraction), label),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def encoded(self):
        return tf.data.Dataset.from_tensor_slices((self.array, self.labels))
