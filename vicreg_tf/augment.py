"""Paired views for VICReg: the paper's augmentation recipe as vectorised Keras layers.

The recipe (Bardes et al. 2022, appendix C; official `augmentations.py`), per view:
random resized crop, horizontal flip, color jitter with p=0.8, grayscale with
p=0.2, Gaussian blur (p=1.0 for view a, 0.1 for view b), solarization (p=0.0 for
view a, 0.2 for view b). `ViewPipeline` is one view, `TwoViews` the asymmetric
pair, `paper_views` / `grayscale_views` the two presets. `vicreg_tf.kerascv_pipeline`
builds the same recipe from KerasCV layers, for those who want them.

Images are float32 NHWC in [0, 1] (integer images are rescaled by 1/255), so
the solarization threshold is 0.5 and every layer returns [0, 1].

Why not the KerasCV 0.9 layers: RandomCropAndResize, RandomGaussianBlur and
RandomApply run per image inside `tf.map_fn`; every KerasCV layer draws from a
stateful `tf.random.Generator`, so a parallel `tf.data.map` is not reproducible
under a seed (and `seed=0` counts as unseeded in the vectorised base class);
RandomColorJitter has other semantics than torchvision's ColorJitter (additive
brightness, a 0.5-centred saturation factor, fixed order); Solarization's
threshold is on a 0-255 scale whatever `value_range` says. The layers here are
batched tf ops with stateless randomness: every probability is per image, the
same seed gives the same views, and the default pipeline is several times faster
(bench/pipeline.py, batch 256 on 2 shared CPU cores: 2.7-4.5x for paper_views on
32x32 RGB, 6-6.6x for grayscale_views on 28x28). `kerascv_views` (`KerasCVTwoViews`, a drop-in
for `TwoViews`) is there for users who want KerasCV's layers anyway; it ignores the
`seed` call argument.

Randomness: every layer takes an optional `seed` call argument, a (2,) integer
tensor for TensorFlow's stateless random ops. Without it the layer draws one from
its own `keras.random.SeedGenerator(seed)`. The input pipeline
(`vicreg_tf.data.pipeline`) passes a seed per batch made from (seed, epoch, step),
which keeps a parallel `map` deterministic.

Two phases, as Keras' image preprocessing layers: `get_random_transformation`
draws an op's random numbers for a batch (for rows of a global batch, bit for bit
what one process draws for them), `transform_images` applies them, on the host or
on the accelerator. `TwoViews` splits the views where images are decoded:
`crop_boxes` / `crop_images` (the crops, where the image is decoded) and
`transform_crops` (the rest, batched, here or inside the train step).
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from vicreg_tf import arguments

__all__ = [
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "RandomColorJitter",
    "RandomGrayscale",
    "RandomGaussianBlur",
    "RandomSolarize",
    "ViewPipeline",
    "TwoViews",
    "paper_views",
    "grayscale_views",
    "PRESETS",
]

_PACKAGE = "vicreg_tf"
_INT32_MAX = 2**31 - 1


# -- argument checks -----------------------------------------------------------


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _range(name: str, value, *, low: float = 0.0, high: float = math.inf,
           low_open: bool = False) -> tuple[float, float]:
    """(min, max) with low <= min <= max <= high (min > low when low_open)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    lo_ok = lo > low if low_open else lo >= low
    if not (lo_ok and lo <= hi <= high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be (min, max) with min <= max inside {bound}, got {value!r}")
    return lo, hi


def _strength(name: str, value, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
        raise ValueError(f"{name} must be a number in [0, {high}], got {value!r}")
    return float(value)


def _channel_stats(name: str, value) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a number or a sequence of per-channel numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _check_view_knobs(**knobs) -> dict:
    """Checks one view's arguments under their own names (so errors name `jitter_prob`, not `probability`)."""
    checked = {"image_size": arguments.image_size(knobs["image_size"])}
    for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        checked[name] = _probability(name, knobs[name])
    checked["crop_area"] = _range("crop_area", knobs["crop_area"], low=0.0, high=1.0, low_open=True)
    checked["crop_aspect"] = _range("crop_aspect", knobs["crop_aspect"], low=0.0, low_open=True)
    checked["blur_sigma"] = _range("blur_sigma", knobs["blur_sigma"], low=0.0, low_open=True)
    for name in ("brightness", "contrast", "saturation"):
        checked[name] = _strength(name, knobs[name])
    checked["hue"] = _strength("hue", knobs["hue"], high=0.5)
    checked["solarize_threshold"] = _strength("solarize_threshold", knobs["solarize_threshold"], high=1.0)
    return checked


# -- helpers ---------------------------------------------------------------------


def _as_float_images(images) -> tf.Tensor:
    images = tf.convert_to_tensor(images)
    if images.dtype.is_integer:
        return tf.image.convert_image_dtype(images, tf.float32)  # uint8 0..255 -> [0, 1]
    return tf.cast(images, tf.float32)


def _uniform(seed, shape, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, dtype=tf.float32)


def _row_uniform(seed, rows, batch, low: float, high: float, extra=(), then=None) -> tf.Tensor:
    """Per-image random numbers, shape (batch, *extra), optionally passed through `then`.

    With `rows=(row_ids, total)`, the images are rows `row_ids` of a global batch
    of `total`: the numbers are drawn for the whole global batch and the rows
    taken, so a worker that makes rows i..j gets exactly what one process
    making the whole batch gets for them. `then` (e.g. exp) runs before the rows
    are taken: vectorised transcendental functions round the last elements of a
    tensor differently from the others, so they must see the global shape.
    """
    if rows is None:
        values = _uniform(seed, [batch, *extra], low, high)
        return then(values) if then else values
    row_ids, total = rows
    values = _uniform(seed, [total, *extra], low, high)
    return tf.gather(then(values) if then else values, row_ids)


def _bernoulli(seed, batch, probability: float, rows=None) -> tf.Tensor:
    return _row_uniform(seed, rows, batch, 0.0, 1.0) < probability


def _where_images(mask, if_true, if_false):
    return tf.where(mask[:, None, None, None], if_true, if_false)


def _apply_to_subset(images, mask, fn):
    """fn on the images where mask is True only: rarely applied ops cost little."""
    indices = tf.where(mask)

    def apply():
        changed = fn(tf.gather_nd(images, indices), indices[:, 0])
        return tf.tensor_scatter_nd_update(images, indices, changed)

    # An empty subset skips fn: oneDNN's depthwise convolution rejects zero-sized inputs.
    return tf.cond(tf.shape(indices)[0] > 0, apply, lambda: tf.identity(images))


def _with_gate(numbers: dict, seed, batch, probability: float, rows) -> dict:
    """An op's `numbers` and, when it runs on only some images, which ones ("apply")."""
    if probability < 1.0:
        numbers["apply"] = _bernoulli(seed, batch, probability, rows)
    return numbers


def _apply_gated(images, transformation: dict, fn):
    """fn(images, rows) on the images the gate picked: all of them when there is no gate."""
    if "apply" not in transformation:
        return fn(images, tf.range(tf.cast(tf.shape(images)[0], tf.int64)))
    return _apply_to_subset(images, transformation["apply"], fn)


def _as_seed(seed) -> tf.Tensor:
    """Any integer seed pair -> the (2,) int32 tensor TensorFlow's stateless ops take."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype != tf.int32:
        seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), _INT32_MAX), tf.int32)
    return tf.ensure_shape(seed, [2])


def _grayscale(images):
    # tf.image.rgb_to_grayscale's luma weights (torchvision / PIL: 0.299, 0.587, 0.114), written
    # out element-wise: its matmul may round differently with the batch size, and workers making
    # parts of a global batch must agree bitwise.
    if images.shape[-1] != 3:
        return images
    return 0.2989 * images[..., 0:1] + 0.5870 * images[..., 1:2] + 0.1140 * images[..., 2:3]


def _shape(images) -> tuple:
    """(batch as a tensor, height, width, channels as Python ints or None): what phase 1 needs of a batch."""
    return (tf.shape(images)[0], *images.shape[1:4])


class _ImageAugmentation(keras.layers.Layer):
    """Base: float32 [0, 1] images, batched or not; stateless randomness from `seed`, in two phases.

    Phase 1, `get_random_transformation(shape, seed, rows)`, draws the op's random
    numbers for a batch of `shape` (batch, height, width, channels); phase 2,
    `transform_images(images, transformation)`, applies them to the images, wherever
    those are. `augment` is both; `call` both with a seed of the layer's own when
    none is given.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # views stay float32 under a mixed-precision policy
        super().__init__(**kwargs)
        self.seed = arguments.optional_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    def _draw_seed(self, seed):
        if seed is None:
            seed = self.seed_generator.next()
        return _as_seed(seed)

    def call(self, images, seed=None):
        images = _as_float_images(images)
        if images.shape.rank not in (3, 4):
            raise ValueError(
                f"{type(self).__name__} expects images (H, W, C) or (N, H, W, C), got shape {images.shape}"
            )
        unbatched = images.shape.rank == 3
        out = self.augment(images[None] if unbatched else images, self._draw_seed(seed))
        return tf.nest.map_structure(lambda x: x[0], out) if unbatched else out

    def augment(self, images, seed, rows=None):
        """Both phases on a batch; `rows=(row_ids, total)` draws as for rows of a global batch of `total`."""
        return self.transform_images(images, self.get_random_transformation(_shape(images), seed, rows))

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        """Phase 1: the numbers per image for a batch of `shape`; with `rows`, those rows' of the global batch.

        An op that changes nothing (probability 0) draws nothing: `{}`.
        """
        raise NotImplementedError

    def transform_images(self, images, transformation):
        """Phase 2: the images with the numbers `get_random_transformation` drew for them."""
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(seed=self.seed)
        return config


# -- the layers ------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RandomResizedCrop(_ImageAugmentation):
    """Crops a random area and aspect ratio of each image and resizes it (torchvision's RandomResizedCrop).

    As torchvision: ten tries per image to draw an area fraction uniformly from
    `area` and an aspect ratio (width / height) log-uniformly from `aspect` that
    fit in the image, else a center crop; the crop is then resized bilinearly
    (torchvision's VICReg recipe uses bicubic; `tf.image.crop_and_resize` offers
    bilinear or nearest). Vectorised: one `crop_and_resize` call per batch.

    Args:
        image_size: output size, int or (height, width).
        area: (min, max) fraction of the image area kept, in (0, 1].
        aspect: (min, max) aspect ratio of the crop, positive.
        seed: int seed of the layer's own generator (used when `call` gets no seed).

    Example:
    >>> crop = RandomResizedCrop(32, area=(0.08, 1.0), seed=0)
    >>> crop(tf.random.uniform((4, 40, 40, 3))).shape
    TensorShape([4, 32, 32, 3])
    """

    _ATTEMPTS = 10

    def __init__(self, image_size, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3), seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.image_size = arguments.image_size(image_size)
        self.area = _range("area", area, low=0.0, high=1.0, low_open=True)
        self.aspect = _range("aspect", aspect, low=0.0, low_open=True)

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        """Tries of area and ratio, top and left, per image: the window follows from them and the image's
        size (`window`), so they can be drawn before the image is decoded."""
        batch = shape[0]
        seeds = tf.random.experimental.stateless_split(seed, 4)
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        return {
            "area": _row_uniform(seeds[0], rows, batch, *self.area, extra=(self._ATTEMPTS,)),
            "ratio": _row_uniform(seeds[1], rows, batch, log_lo, log_hi, extra=(self._ATTEMPTS,), then=tf.exp),
            "top": _row_uniform(seeds[2], rows, batch, 0.0, 1.0),
            "left": _row_uniform(seeds[3], rows, batch, 0.0, 1.0),
        }

    def window(self, params: dict, height, width):
        """(top, left, crop_height, crop_width), float32, for images of `height` x `width`.

        `params` (from `get_random_transformation`) holds one image's numbers
        (scalars and (10,) tries) or a batch's, with `height`/`width` scalars or per
        image. As torchvision: the first of ten tries whose area and aspect fit, else
        the largest center crop within the aspect range.
        """
        height = tf.cast(height, tf.float32)
        width = tf.cast(width, tf.float32)
        h_, w_ = height[..., None], width[..., None]
        target_area = h_ * w_ * params["area"]
        ratio = params["ratio"]
        crop_w = tf.round(tf.sqrt(target_area * ratio))
        crop_h = tf.round(tf.sqrt(target_area / ratio))
        fits = (crop_w > 0) & (crop_w <= w_) & (crop_h > 0) & (crop_h <= h_)
        first = tf.argmax(tf.cast(fits, tf.int32), axis=-1, output_type=tf.int32)
        crop_w = tf.gather(crop_w, first, batch_dims=first.shape.rank)
        crop_h = tf.gather(crop_h, first, batch_dims=first.shape.rank)
        in_ratio = width / height
        fallback_w = tf.where(in_ratio > self.aspect[1], tf.round(height * self.aspect[1]), width)
        fallback_h = tf.where(in_ratio < self.aspect[0], tf.round(width / self.aspect[0]), height)
        any_fits = tf.reduce_any(fits, axis=-1)
        crop_w = tf.maximum(tf.where(any_fits, crop_w, fallback_w), 1.0)
        crop_h = tf.maximum(tf.where(any_fits, crop_h, fallback_h), 1.0)
        top = tf.where(any_fits, tf.floor(params["top"] * (height - crop_h + 1)), tf.floor((height - crop_h) / 2))
        left = tf.where(any_fits, tf.floor(params["left"] * (width - crop_w + 1)), tf.floor((width - crop_w) / 2))
        return top, left, crop_h, crop_w

    def transform_images(self, images, transformation) -> tf.Tensor:
        """Crops equal-sized float images with their numbers and resizes them: one vectorised call."""
        batch = tf.shape(images)[0]
        height = tf.cast(tf.shape(images)[1], tf.float32)
        width = tf.cast(tf.shape(images)[2], tf.float32)
        top, left, crop_h, crop_w = self.window(transformation, tf.fill([batch], height), tf.fill([batch], width))
        # crop_and_resize maps box coordinate 1.0 to the last pixel's centre.
        y_scale, x_scale = tf.maximum(height - 1, 1.0), tf.maximum(width - 1, 1.0)
        boxes = tf.stack(
            [top / y_scale, left / x_scale, (top + crop_h - 1) / y_scale, (left + crop_w - 1) / x_scale], axis=1
        )
        crops = tf.image.crop_and_resize(images, boxes, tf.range(batch), self.image_size, method="bilinear")
        return tf.clip_by_value(crops, 0.0, 1.0)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-3], *self.image_size, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(image_size=self.image_size, area=self.area, aspect=self.aspect)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RandomHorizontalFlip(_ImageAugmentation):
    """Mirrors each image left-right with probability `probability` (one gate, per image).

    Args:
        probability: chance that an image is flipped.
        seed: int seed of the layer's own generator.

    Example:
    >>> RandomHorizontalFlip(0.5, seed=0)(tf.zeros((2, 8, 8, 3))).shape
    TensorShape([2, 8, 8, 3])
    """

    def __init__(self, probability=0.5, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.probability = _probability("probability", probability)

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        if self.probability == 0.0:
            return {}
        return {"flip": _bernoulli(seed, shape[0], self.probability, rows)}

    def transform_images(self, images, transformation):
        if not transformation:
            return images
        return _where_images(transformation["flip"], tf.reverse(images, axis=[2]), images)

    def get_config(self):
        config = super().get_config()
        config.update(probability=self.probability)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RandomColorJitter(_ImageAugmentation):
    """torchvision's ColorJitter, applied to each image with probability `probability`.

    Same semantics as torchvision: brightness, contrast and saturation factors
    uniform in [max(0, 1 - s), 1 + s] (multiply; blend with the image's mean gray
    level; blend with the pixel's gray level), a hue shift uniform in [-h, h]
    turns of the HSV hue circle, the four in a random order per image, values
    clipped to [0, 1]. On one-channel images saturation and hue are identities
    and are skipped.

    Args:
        probability: chance that an image is jittered at all (paper: 0.8).
        brightness, contrast, saturation: strengths >= 0 (paper: 0.4, 0.4, 0.2).
        hue: strength in [0, 0.5] (paper: 0.1).
        seed: int seed of the layer's own generator.

    Example:
    >>> jitter = RandomColorJitter(0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    >>> jitter(tf.random.uniform((2, 8, 8, 3))).shape
    TensorShape([2, 8, 8, 3])
    """

    def __init__(self, probability=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.probability = _probability("probability", probability)
        self.brightness = _strength("brightness", brightness)
        self.contrast = _strength("contrast", contrast)
        self.saturation = _strength("saturation", saturation)
        self.hue = _strength("hue", hue, high=0.5)

    def _ops(self, channels: int):
        """(sampler range, op(images, factors)) for each active op."""

        def brightness(x, f):
            return x * f[:, None, None, None]

        def contrast(x, f):
            mean = tf.reduce_mean(_grayscale(x), axis=[1, 2, 3], keepdims=True)
            f = f[:, None, None, None]
            return f * x + (1.0 - f) * mean

        def saturation(x, f):
            f = f[:, None, None, None]
            return f * x + (1.0 - f) * _grayscale(x)

        def hue(x, delta):
            hsv = tf.image.rgb_to_hsv(x)
            h = tf.math.floormod(hsv[..., :1] + delta[:, None, None, None], 1.0)
            return tf.image.hsv_to_rgb(tf.concat([h, hsv[..., 1:]], axis=-1))

        ops = []
        for strength, op in ((self.brightness, brightness), (self.contrast, contrast)):
            if strength > 0:
                ops.append(((max(0.0, 1.0 - strength), 1.0 + strength), op))
        if channels != 1:
            if self.saturation > 0:
                ops.append(((max(0.0, 1.0 - self.saturation), 1.0 + self.saturation), saturation))
            if self.hue > 0:
                ops.append(((-self.hue, self.hue), hue))
        return ops

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        ops = self._ops(shape[3])
        if self.probability == 0.0 or not ops:
            return {}
        batch = shape[0]
        seeds = tf.random.experimental.stateless_split(seed, 2 + len(ops))
        numbers = {
            "factors": tf.stack([_row_uniform(seeds[2 + k], rows, batch, *bounds) for k, (bounds, _) in enumerate(ops)],
                                axis=1),
            # A random order per image, as torchvision's ColorJitter.
            "order": tf.argsort(_row_uniform(seeds[1], rows, batch, 0.0, 1.0, extra=(len(ops),)), axis=1),  # int32
        }
        return _with_gate(numbers, seeds[0], batch, self.probability, rows)

    def transform_images(self, images, transformation):
        if not transformation:
            return images
        ops = self._ops(images.shape[-1])
        factors, order = transformation["factors"], transformation["order"]

        def jitter(x, rows):
            count = tf.shape(x)[0]
            ids = tf.range(count)
            fs = tf.gather(factors, rows)
            chosen = tf.gather(order, rows)
            # Each slot partitions the images by the op they get there, so every op runs once per image.
            for slot in range(len(ops)):
                which = chosen[:, slot]
                parts = tf.dynamic_partition(x, which, len(ops))
                part_ids = tf.dynamic_partition(ids, which, len(ops))
                outs = [
                    tf.clip_by_value(op(parts[k], tf.gather(fs[:, k], part_ids[k])), 0.0, 1.0)
                    for k, (_, op) in enumerate(ops)
                ]
                x = tf.ensure_shape(tf.dynamic_stitch(part_ids, outs), x.shape)
            return x

        return _apply_gated(images, transformation, jitter)

    def get_config(self):
        config = super().get_config()
        config.update(
            probability=self.probability,
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RandomGrayscale(_ImageAugmentation):
    """Replaces each RGB image by its gray level (kept as 3 channels) with probability `probability`.

    One-channel images are returned unchanged.

    Args:
        probability: chance per image (paper: 0.2).
        seed: int seed of the layer's own generator.

    Example:
    >>> RandomGrayscale(0.2)(tf.random.uniform((2, 8, 8, 3))).shape
    TensorShape([2, 8, 8, 3])
    """

    def __init__(self, probability=0.2, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.probability = _probability("probability", probability)

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        if self.probability == 0.0 or shape[3] != 3:
            return {}
        return {"gray": _bernoulli(seed, shape[0], self.probability, rows)}

    def transform_images(self, images, transformation):
        if not transformation or images.shape[-1] != 3:
            return images
        return _where_images(transformation["gray"], tf.tile(_grayscale(images), [1, 1, 1, 3]), images)

    def get_config(self):
        config = super().get_config()
        config.update(probability=self.probability)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RandomGaussianBlur(_ImageAugmentation):
    """Blurs each image with probability `probability`, sigma uniform in `sigma` (pixels).

    A separable Gaussian kernel per image, radius ceil(3 * max sigma) (at most the
    image size), symmetric padding so borders do not darken. Computed as weighted
    sums of shifted images, so an image's result does not depend on the others in
    its batch; only the images drawn for blurring are computed.

    Args:
        probability: chance per image (paper: 1.0 for view a, 0.1 for view b).
        sigma: (min, max) standard deviation in pixels (paper: (0.1, 2.0)).
        seed: int seed of the layer's own generator.

    Example:
    >>> RandomGaussianBlur(1.0, sigma=(0.1, 2.0))(tf.random.uniform((2, 8, 8, 3))).shape
    TensorShape([2, 8, 8, 3])
    """

    def __init__(self, probability=1.0, sigma=(0.1, 2.0), seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.probability = _probability("probability", probability)
        self.sigma = _range("sigma", sigma, low=0.0, low_open=True)

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        """Each image's normalised kernel (radius ceil(3 * max sigma), at most the image size) and gate."""
        if self.probability == 0.0:
            return {}
        batch, height, width = shape[:3]
        seeds = tf.random.experimental.stateless_split(seed, 2)
        radius = math.ceil(3.0 * self.sigma[1])
        if height is not None and width is not None:
            radius = min(radius, height, width)  # symmetric padding reaches at most one image size
        taps = tf.range(-radius, radius + 1, dtype=tf.float32)

        def gaussian(sigmas):  # (n,) -> (n, 2r+1) normalised kernels
            kernel = tf.exp(-0.5 * tf.square(taps[None, :] / sigmas[:, None]))
            return kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)

        kernels = _row_uniform(seeds[1], rows, batch, *self.sigma, then=gaussian)
        return _with_gate({"kernels": kernels}, seeds[0], batch, self.probability, rows)

    def transform_images(self, images, transformation):
        if not transformation:
            return images
        kernels = transformation["kernels"]
        radius = kernels.shape[-1] // 2

        def blur(x, rows):
            kernel = tf.gather(kernels, rows)
            weights = [kernel[:, k, None, None, None] for k in range(2 * radius + 1)]
            h, w = tf.shape(x)[1], tf.shape(x)[2]
            padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
            # Separable, as weighted sums of shifted copies in a fixed order: each image's
            # pixels are the same whichever images share its batch (a convolution's kernel
            # choice can depend on the batch), so workers making parts of a batch agree bitwise.
            rows_blurred = weights[0] * padded[:, :, 0:w]
            for k in range(1, 2 * radius + 1):
                rows_blurred += weights[k] * padded[:, :, k:k + w]
            out = weights[0] * rows_blurred[:, 0:h]
            for k in range(1, 2 * radius + 1):
                out += weights[k] * rows_blurred[:, k:k + h]
            return tf.ensure_shape(out, x.shape)

        return _apply_gated(images, transformation, blur)

    def get_config(self):
        config = super().get_config()
        config.update(probability=self.probability, sigma=self.sigma)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RandomSolarize(_ImageAugmentation):
    """Inverts the pixels >= `threshold` (x -> 1 - x) of each image with probability `probability`.

    PIL's `ImageOps.solarize` (the official recipe) inverts pixels >= 128 of 255;
    on [0, 1] images that is the middle of the range, 0.5.

    Args:
        probability: chance per image (paper: 0.0 for view a, 0.2 for view b).
        threshold: in [0, 1].
        seed: int seed of the layer's own generator.

    Example:
    >>> RandomSolarize(1.0)(tf.constant([[[[0.25], [0.75]]]])).numpy().ravel()
    array([0.25, 0.25], dtype=float32)
    """

    def __init__(self, probability=0.2, threshold=0.5, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.probability = _probability("probability", probability)
        self.threshold = _strength("threshold", threshold, high=1.0)

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        if self.probability == 0.0:
            return {}
        return {"solarize": _bernoulli(seed, shape[0], self.probability, rows)}

    def transform_images(self, images, transformation):
        if not transformation:
            return images
        solarized = tf.where(images >= self.threshold, 1.0 - images, images)
        return _where_images(transformation["solarize"], solarized, images)

    def get_config(self):
        config = super().get_config()
        config.update(probability=self.probability, threshold=self.threshold)
        return config


# -- one view, two views -----------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ViewPipeline(_ImageAugmentation):
    """One view of the VICReg recipe: crop, flip, color jitter, grayscale, blur, solarize, normalize.

    Every probability is per image. The defaults are the paper's view a; see
    `paper_views` for the asymmetric pair. Output float32 in [0, 1], or
    (x - mean) / std when `mean` and `std` are given (off by default: the
    backbones normalize their own input).

    Args:
        image_size: output size, int or (height, width).
        crop_area: (min, max) area fraction of the random resized crop.
        crop_aspect: (min, max) aspect ratio of the crop.
        flip_prob: horizontal flip probability.
        jitter_prob: probability of color jitter.
        brightness, contrast, saturation, hue: color jitter strengths (torchvision semantics).
        grayscale_prob: probability of converting to gray.
        blur_prob: probability of Gaussian blur.
        blur_sigma: (min, max) blur sigma in pixels.
        solarize_prob: probability of solarization.
        solarize_threshold: pixels >= it are inverted.
        mean, std: optional per-channel normalization applied last.
        seed: int seed of the pipeline's own generator (used when `call` gets no seed).

    Example:
    >>> view = ViewPipeline(32, blur_prob=0.1, solarize_prob=0.2, seed=0)
    >>> view(tf.random.uniform((8, 32, 32, 3))).shape
    TensorShape([8, 32, 32, 3])
    """

    def __init__(
        self,
        image_size,
        crop_area=(0.08, 1.0),
        crop_aspect=(3 / 4, 4 / 3),
        flip_prob=0.5,
        jitter_prob=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        grayscale_prob=0.2,
        blur_prob=1.0,
        blur_sigma=(0.1, 2.0),
        solarize_prob=0.0,
        solarize_threshold=0.5,
        mean=None,
        std=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(seed=seed, **kwargs)
        _check_view_knobs(
            image_size=image_size, crop_area=crop_area, crop_aspect=crop_aspect, flip_prob=flip_prob,
            jitter_prob=jitter_prob, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
            grayscale_prob=grayscale_prob, blur_prob=blur_prob, blur_sigma=blur_sigma,
            solarize_prob=solarize_prob, solarize_threshold=solarize_threshold,
        )
        self.crop = RandomResizedCrop(image_size, crop_area, crop_aspect, name="crop")
        self.flip = RandomHorizontalFlip(flip_prob, name="flip")
        self.jitter = RandomColorJitter(jitter_prob, brightness, contrast, saturation, hue, name="color_jitter")
        self.grayscale = RandomGrayscale(grayscale_prob, name="grayscale")
        self.blur = RandomGaussianBlur(blur_prob, blur_sigma, name="blur")
        self.solarize = RandomSolarize(solarize_prob, solarize_threshold, name="solarize")
        self.mean = _channel_stats("mean", mean)
        self.std = _channel_stats("std", std)
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"give both mean and std or neither, got mean={mean!r}, std={std!r}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.image_size = self.crop.image_size

    # The ops in the recipe's order; the first, the crop, is made where the image is decoded.
    _STEPS = ("crop", "flip", "jitter", "grayscale", "blur", "solarize")

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        """Every op's numbers for a batch of `shape`, by op name; ops that change nothing are left out."""
        seeds = tf.random.experimental.stateless_split(_as_seed(seed), len(self._STEPS))
        crops_shape = (shape[0], *self.image_size, shape[3])
        numbers = {"crop": self.crop.get_random_transformation(shape, seeds[0], rows)}
        for k, name in enumerate(self._STEPS[1:], start=1):
            drawn = getattr(self, name).get_random_transformation(crops_shape, seeds[k], rows)
            if drawn:
                numbers[name] = drawn
        return numbers

    def transform_images(self, images, transformation):
        return self.transform_crops(self.crop_images(images, transformation), transformation)

    # Split where the image is decoded: the crop there, the rest batched (CPU or accelerator).

    def crop_window(self, transformation, height, width) -> tuple[tf.Tensor, ...]:
        """One image's crop window, int32 (top, left, height, width), for an image of `height` x `width`."""
        return tuple(tf.cast(v, tf.int32) for v in self.crop.window(transformation["crop"], height, width))

    def crop_images(self, images, transformation) -> tf.Tensor:
        """The crops of a batch of equal-sized decoded images (uint8 or [0, 1] floats): float [0, 1]."""
        return self.crop.transform_images(_as_float_images(images), transformation["crop"])

    def transform_crops(self, crops, transformation) -> tf.Tensor:
        """Flip, color jitter, grayscale, blur, solarize (and normalize) of crops already of `image_size`.

        `crops` are uint8 or [0, 1] floats; `transformation` is the one the crops were made with.
        """
        images = _as_float_images(crops)
        for name in self._STEPS[1:]:
            if name in transformation:
                images = getattr(self, name).transform_images(images, transformation[name])
        if self.mean is not None:
            images = (images - tf.constant(self.mean)) / tf.constant(self.std)
        return images

    def compute_output_shape(self, input_shape):
        return self.crop.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size,
            crop_area=self.crop.area,
            crop_aspect=self.crop.aspect,
            flip_prob=self.flip.probability,
            jitter_prob=self.jitter.probability,
            brightness=self.jitter.brightness,
            contrast=self.jitter.contrast,
            saturation=self.jitter.saturation,
            hue=self.jitter.hue,
            grayscale_prob=self.grayscale.probability,
            blur_prob=self.blur.probability,
            blur_sigma=self.blur.sigma,
            solarize_prob=self.solarize.probability,
            solarize_threshold=self.solarize.threshold,
            mean=self.mean,
            std=self.std,
        )
        return config


def _as_view(view, name: str) -> ViewPipeline:
    if isinstance(view, ViewPipeline):
        return view
    if isinstance(view, dict):
        config = {k: v for k, v in view.items() if k not in ("name", "dtype", "trainable")}
        return ViewPipeline(**config, name=name)
    raise TypeError(f"{name} must be a ViewPipeline or its config dict, got {type(view).__name__}")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TwoViews(_ImageAugmentation):
    """Two differently augmented views of each image: `call(images) -> (view_a, view_b)`.

    The views use different pipelines (the paper's asymmetric blur and
    solarization) and independent randomness. Both pipelines must produce the
    same image size. Where images are decoded one at a time, the views split in
    two: `crop_boxes` (or `crop_images`) there, `transform_crops` on the batch of
    crops (on the host, or inside the train step), with the numbers
    `get_random_transformation` drew once.

    Args:
        view_a, view_b: `ViewPipeline`s or their config dicts.
        seed: int seed of the layer's own generator, used when `call` gets no
            `seed`; the same seed gives the same views.

    Example:
    >>> views = paper_views(32, seed=0)
    >>> view_a, view_b = views(tf.random.uniform((8, 32, 32, 3)))
    >>> view_a.shape, view_b.shape
    (TensorShape([8, 32, 32, 3]), TensorShape([8, 32, 32, 3]))
    """

    def __init__(self, view_a, view_b, seed=None, **kwargs):
        view_a, view_b = _as_view(view_a, "view_a"), _as_view(view_b, "view_b")
        if view_a.image_size != view_b.image_size:
            raise ValueError(
                "both views must have the same image_size, got "
                f"{view_a.image_size} for view a and {view_b.image_size} for view b"
            )
        super().__init__(seed=seed, **kwargs)
        self.view_a, self.view_b = view_a, view_b
        self.image_size = view_a.image_size

    @staticmethod
    def _view_seeds(seed) -> tf.Tensor:
        return tf.random.experimental.stateless_split(_as_seed(seed), 2)

    def get_random_transformation(self, shape, seed, rows=None) -> dict:
        """Both views' numbers: {"view_a": ..., "view_b": ...} (see `ViewPipeline.get_random_transformation`)."""
        seeds = self._view_seeds(seed)
        return {"view_a": self.view_a.get_random_transformation(shape, seeds[0], rows),
                "view_b": self.view_b.get_random_transformation(shape, seeds[1], rows)}

    def transform_images(self, images, transformation):
        images = _as_float_images(images)
        return (self.view_a.transform_images(images, transformation["view_a"]),
                self.view_b.transform_images(images, transformation["view_b"]))

    def crop_boxes(self, transformation):
        """For one image's numbers: `box(height, width) -> int32 (top, left, h, w)` of view a and of view b."""
        return tuple(
            lambda height, width, view=view, numbers=transformation[name]: view.crop_window(numbers, height, width)
            for view, name in ((self.view_a, "view_a"), (self.view_b, "view_b"))
        )

    def crop_images(self, images, transformation):
        """Both views' crops of a batch of equal-sized decoded images: float [0, 1]."""
        return (self.view_a.crop_images(images, transformation["view_a"]),
                self.view_b.crop_images(images, transformation["view_b"]))

    def transform_crops(self, crops_a, crops_b, transformation):
        """Both views from their crops (uint8 or [0, 1] floats): the rest of the views, in one call."""
        return (self.view_a.transform_crops(crops_a, transformation["view_a"]),
                self.view_b.transform_crops(crops_b, transformation["view_b"]))

    def compute_output_shape(self, input_shape):
        shape = self.view_a.compute_output_shape(input_shape)
        return shape, shape

    def get_config(self):
        config = super().get_config()
        config.update(view_a=self.view_a.get_config(), view_b=self.view_b.get_config())
        return config


# -- presets: name -> builder ---------------------------------------------------------------


def _two_views(image_size, seed, overrides: dict, *, both: dict, view_a: dict, view_b: dict) -> TwoViews:
    """A preset's pair: its knobs for both views and for each, then `overrides` (and `view_a=`/`view_b=`)."""
    overrides = dict(overrides)
    only_a = dict(overrides.pop("view_a", None) or {})
    only_b = dict(overrides.pop("view_b", None) or {})
    return TwoViews(
        ViewPipeline(image_size, **{**both, **view_a, **overrides, **only_a}, name="view_a"),
        ViewPipeline(image_size, **{**both, **view_b, **overrides, **only_b}, name="view_b"),
        seed=seed,
    )


def paper_views(image_size, seed: int | None = None, **overrides) -> TwoViews:
    """The paper's pair of views: blur 1.0 / 0.1 and solarization 0.0 / 0.2 for views a / b.

    Args:
        image_size: output size, int or (height, width).
        seed: int seed; the same seed gives the same views.
        **overrides: `ViewPipeline` arguments for both views, and `view_a={...}` /
            `view_b={...}` for one of them.

    Example:
    >>> views = paper_views(32, seed=0)                      # CIFAR-10 sized
    >>> views = paper_views(32, view_b={"solarize_prob": 0.1})
    """
    return _two_views(
        image_size, seed, overrides,
        both=dict(crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3), flip_prob=0.5, jitter_prob=0.8, brightness=0.4,
                  contrast=0.4, saturation=0.2, hue=0.1, grayscale_prob=0.2, blur_sigma=(0.1, 2.0)),
        view_a=dict(blur_prob=1.0, solarize_prob=0.0),
        view_b=dict(blur_prob=0.1, solarize_prob=0.2),
    )


def grayscale_views(image_size, seed: int | None = None, **overrides) -> TwoViews:
    """Views for small one-channel images such as Fashion-MNIST (28x28).

    Brightness and contrast jitter (p=0.8, strengths 0.4 as in the paper; no
    saturation or hue on one channel): without it the two views can be matched by
    their intensity alone, and VICReg learns little (a 234-step probe: 82.9% ->
    86.2% linear with it, see configs/fashion_mnist.py); crops keep at least
    20% of the area, since 8% of a 28x28 image (an 8x8 patch) rarely shows the
    object's class; blur sigma at most 1 pixel (2 pixels would erase 28x28
    detail); the paper's asymmetry kept: blur 0.5 / 0.1, solarization 0.0 / 0.2.

    Args:
        image_size: output size, int or (height, width).
        seed: int seed; the same seed gives the same views.
        **overrides: `ViewPipeline` arguments for both views, and `view_a={...}` /
            `view_b={...}` for one of them.

    Example:
    >>> views = grayscale_views(28, seed=0)
    >>> view_a, view_b = views(tf.random.uniform((8, 28, 28, 1)))
    """
    return _two_views(
        image_size, seed, overrides,
        both=dict(crop_area=(0.2, 1.0), crop_aspect=(3 / 4, 4 / 3), flip_prob=0.5, jitter_prob=0.8, brightness=0.4,
                  contrast=0.4, saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_sigma=(0.1, 1.0)),
        view_a=dict(blur_prob=0.5, solarize_prob=0.0),
        view_b=dict(blur_prob=0.1, solarize_prob=0.2),
    )


# `config.views.preset` -> builder(image_size, seed=None, **overrides) -> TwoViews. A new preset is a
# function above and its entry here.
PRESETS = {"paper": paper_views, "grayscale": grayscale_views}
