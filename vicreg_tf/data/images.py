"""Decoding, the crop window, the evaluation transform, unreadable images and their report.

Shared by every source: `decode_crop` decodes only a view's window of an encoded
image (JPEG: `tf.image.decode_and_crop_jpeg`), `eval_transform` is the standard
resize-then-center-crop, `safe_map` replaces an image that fails to decode by a
gray one and records its name in `unreadable_images`, which `UnreadableImagesReport`
prints once per epoch.
"""
from __future__ import annotations

import threading

import keras
import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
NO_LABEL = -1
EVAL_CROP_FRACTION = 0.875  # 224 / 256: the standard resize-then-center-crop
_GRAY = 128


# -- unreadable images -------------------------------------------------------------


class _Unreadable:
    """Names of images that failed to decode since the last `take()` (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._names: list[str] = []
        self.total = 0

    def record(self, name) -> None:
        name = name.numpy().decode("utf-8", "replace") if hasattr(name, "numpy") else str(name)
        with self._lock:
            self._names.append(name)
            self.total += 1

    def take(self) -> list[str]:
        with self._lock:
            names, self._names = self._names, []
        return names


unreadable_images = _Unreadable()


class UnreadableImagesReport(keras.callbacks.Callback):
    """One warning line per epoch naming the images that could not be decoded (replaced by gray)."""

    def __init__(self, shown: int = 5):
        super().__init__()
        self.shown = shown

    def on_epoch_end(self, epoch, logs=None):
        names = unreadable_images.take()
        if names:
            listed = ", ".join(names[: self.shown]) + (", ..." if len(names) > self.shown else "")
            print(f"warning: epoch {epoch + 1}: {len(names)} image(s) could not be decoded and were replaced "
                  f"by gray images: {listed}", flush=True)


def _record_unreadable(name: tf.Tensor) -> tf.Tensor:
    def record(n):
        unreadable_images.record(n)
        return np.int32(0)

    return tf.py_function(record, [name], tf.int32)


# -- decoding and cropping -----------------------------------------------------------


def _is_jpeg(contents: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")


def _decode_full(contents: tf.Tensor, channels: int) -> tf.Tensor:
    # decode_image takes channels 0 or 3 for every format (BMP and GIF refuse 1).
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    return tf.image.rgb_to_grayscale(image) if channels == 1 else image


def _resize_uint8(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def decode_crop(contents: tf.Tensor, box_fn, size: tuple[int, int], channels: int) -> tf.Tensor:
    """Decodes only the window `box_fn(height, width) -> (top, left, h, w)` of an image and resizes it.

    JPEG: the window is read from the header's size and decoded alone
    (`tf.image.decode_and_crop_jpeg`); other formats are decoded, then sliced.
    Returns uint8 (size, channels).
    """

    def jpeg():
        shape = tf.image.extract_jpeg_shape(contents)
        top, left, h, w = box_fn(shape[0], shape[1])
        window = tf.stack([top, left, h, w])
        image = tf.image.decode_and_crop_jpeg(contents, window, channels=3)
        return tf.image.rgb_to_grayscale(image) if channels == 1 else image

    def other():
        image = _decode_full(contents, channels)
        shape = tf.shape(image)
        top, left, h, w = box_fn(shape[0], shape[1])
        return image[top:top + h, left:left + w]

    image = tf.cond(_is_jpeg(contents), jpeg, other)
    image = tf.ensure_shape(image, [None, None, channels])
    return tf.ensure_shape(_resize_uint8(image, size), [*size, channels])


def eval_transform(image: tf.Tensor, size: tuple[int, int], crop_fraction: float = EVAL_CROP_FRACTION) -> tf.Tensor:
    """uint8 (H, W, C) -> float32 `size` in [0, 1]: shorter side to max(size) / crop_fraction, then a center crop.

    One geometry for every image size: with `crop_fraction` 0.875 (224 of 256, for
    photos) a 28x28 image and a 30x30 one both keep their central 87.5%; with 1.0 an
    image already of a square `size` is kept pixel for pixel (the resize to its own
    size is the identity).
    """
    height, width = size
    shape = tf.shape(image)
    scale = tf.cast(tf.maximum(height, width), tf.float32) / crop_fraction / tf.cast(
        tf.minimum(shape[0], shape[1]), tf.float32
    )
    new_h = tf.maximum(height, tf.cast(tf.round(tf.cast(shape[0], tf.float32) * scale), tf.int32))
    new_w = tf.maximum(width, tf.cast(tf.round(tf.cast(shape[1], tf.float32) * scale), tf.int32))
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]), "bilinear", antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = tf.clip_by_value(resized[top:top + height, left:left + width], 0.0, 255.0)
    return tf.ensure_shape(out / 255.0, [height, width, image.shape[-1]])


def gray_image(shape) -> tf.Tensor:
    return tf.fill(shape, tf.constant(_GRAY, tf.uint8))


def safe_map(dataset: tf.data.Dataset, fn, fallback, name_of) -> tf.data.Dataset:
    """`dataset.map(fn)` in order, where an element whose `fn` fails gives `fallback(*element)` instead.

    Each element is decoded inside its own one-element dataset, so a failure
    drops nothing: rows keep their place in the global batch on every worker.
    The failing element's `name_of(*element)` is recorded in `unreadable_images`.
    """

    def one(*element):
        def replace(_):
            with tf.control_dependencies([_record_unreadable(name_of(*element))]):
                return tf.nest.map_structure(tf.identity, fallback(*element))

        ok = tf.data.Dataset.from_tensors(0).map(lambda _: fn(*element)).ignore_errors()
        return ok.concatenate(tf.data.Dataset.from_tensors(0).map(replace)).take(1)

    return dataset.interleave(one, cycle_length=16, block_length=1,
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _to_channels(image: tf.Tensor, channels: int | None) -> tf.Tensor:
    """(H, W, c) -> (H, W, channels) for c in 1, 3, 4 (alpha dropped)."""
    have = image.shape[-1]
    if channels is None or have == channels:
        return image
    if have == 4:
        image = image[..., :3]
        have = 3
    if have == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    if have == 1 and channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return image
