"""The paper's view recipe built from KerasCV layers: a drop-in for `vicreg_tf.augment.TwoViews`.

For users who want KerasCV's layers; the default pipeline (`vicreg_tf.augment`) is
several times faster and reproducible under a seed in a parallel `tf.data.map`
(why, and the numbers: `vicreg_tf.augment`'s docstring, docs/BENCHMARKS.md). The
knobs, their checks and the presets are `augment`'s.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from vicreg_tf import arguments
from vicreg_tf.augment import _PACKAGE, PRESETS, _as_float_images, _channel_stats, _check_view_knobs

__all__ = ["KerasCVViewPipeline", "KerasCVTwoViews", "kerascv_views"]

@keras.saving.register_keras_serializable(package=_PACKAGE)
class KerasCVViewPipeline(keras.layers.Layer):
    """One view of the VICReg recipe built from `keras_cv.layers`, with `ViewPipeline`'s arguments.

    RandomCropAndResize, RandomFlip, then RandomApply of RandomColorJitter,
    Grayscale, RandomGaussianBlur and Solarization, each with the recipe's
    per-image probability (a probability of 1 applies the layer directly, 0
    leaves it out). Images float32 in [0, 1]; `value_range=(0, 1)` is passed
    to every layer that takes one.

    Where KerasCV's parameters mean something else, the knobs are translated to
    the nearest equivalent: brightness is additive in KerasCV (a shift of
    +-brightness/2 of the range, torchvision's multiplicative change at
    mid-gray); saturation `s` becomes KerasCV's factor range
    [(1-s)/(2-s), (1+s)/(2+s)] (a saturation multiplier in [1-s, 1+s]); hue `h`
    becomes factor 2h (a shift of at most h turns); the solarization threshold,
    which KerasCV applies on a 0-255 scale whatever `value_range` says, is
    passed as 255 * threshold. Remaining differences: the jitter order is fixed
    (brightness, contrast, saturation, hue), saturation scales HSV saturation,
    the crop's aspect ratio is uniform (not log-uniform) with no retries, blur
    pads with zeros.

    Randomness is KerasCV's: each layer draws from its own stateful generator
    (seeded from `seed`), so the `seed` call argument is accepted for
    compatibility with `TwoViews` but ignored, and a parallel `tf.data.map` is
    not reproducible. Use `ViewPipeline` for reproducible, faster views.

    Args:
        image_size, crop_area, ..., std: as `ViewPipeline`, with `brightness` in
            [0, 2] and `contrast` in [0, 1] (KerasCV's limits).
        seed: int seed of the KerasCV layers' generators.

    Example:
    >>> view = KerasCVViewPipeline(32, blur_prob=0.1, solarize_prob=0.2, seed=0)
    >>> view(tf.random.uniform((8, 40, 40, 3))).shape
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
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        import keras_cv  # heavy import, only for users of these layers

        knobs = _check_view_knobs(
            image_size=image_size, crop_area=crop_area, crop_aspect=crop_aspect, flip_prob=flip_prob,
            jitter_prob=jitter_prob, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
            grayscale_prob=grayscale_prob, blur_prob=blur_prob, blur_sigma=blur_sigma,
            solarize_prob=solarize_prob, solarize_threshold=solarize_threshold,
        )
        if knobs["brightness"] > 2.0:
            raise ValueError(f"brightness must be in [0, 2] for KerasCV's RandomBrightness, got {brightness!r}")
        if knobs["contrast"] > 1.0:
            raise ValueError(f"contrast must be in [0, 1] for KerasCV's RandomContrast, got {contrast!r}")
        self.seed = arguments.optional_seed(seed)
        self.knobs = knobs
        self.image_size = knobs["image_size"]
        self.mean = _channel_stats("mean", mean)
        self.std = _channel_stats("std", std)
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"give both mean and std or neither, got mean={mean!r}, std={std!r}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        layers = keras_cv.layers

        def layer_seed(k):
            # Distinct seed per layer; KerasCV's vectorised base treats seed 0 as unseeded.
            return None if seed is None else seed * 16 + k + 1

        def maybe(layer, probability, k):
            if probability == 0.0:
                return None
            if probability == 1.0:
                return layer
            return layers.RandomApply(layer, rate=probability, seed=layer_seed(k))

        sat = knobs["saturation"]
        low = max(0.0, 1.0 - sat)
        radius = math.ceil(3.0 * knobs["blur_sigma"][1])
        kernel = 2 * min(radius, (min(self.image_size) - 1) // 2) + 1
        self.crop = layers.RandomCropAndResize(
            self.image_size, crop_area_factor=knobs["crop_area"], aspect_ratio_factor=knobs["crop_aspect"],
            seed=layer_seed(0),
        )
        self.flip = layers.RandomFlip("horizontal", rate=knobs["flip_prob"], seed=layer_seed(1))
        self.jitter = maybe(
            layers.RandomColorJitter(
                value_range=(0, 1),
                brightness_factor=knobs["brightness"] / 2,
                contrast_factor=knobs["contrast"],
                saturation_factor=(low / (1.0 + low), (1.0 + sat) / (2.0 + sat)),
                hue_factor=2.0 * knobs["hue"],
                seed=layer_seed(2),
            ),
            knobs["jitter_prob"], 3,
        )
        self.grayscale = maybe(layers.Grayscale(output_channels=3), knobs["grayscale_prob"], 4)
        self.blur = maybe(
            layers.RandomGaussianBlur(kernel_size=kernel, factor=knobs["blur_sigma"], seed=layer_seed(5)),
            knobs["blur_prob"], 6,
        )
        threshold = 255.0 * knobs["solarize_threshold"]
        self.solarize = maybe(
            layers.Solarization(value_range=(0, 1), threshold_factor=(threshold, threshold), seed=layer_seed(7)),
            knobs["solarize_prob"], 8,
        )
        self.built = True

    def call(self, images, seed=None):
        del seed  # KerasCV layers draw from their own stateful generators
        images = _as_float_images(images)
        color = images.shape[-1] == 3
        for layer in (self.crop, self.flip, self.jitter if color else None, self.grayscale if color else None,
                      self.blur, self.solarize):
            if layer is not None:
                images = layer(images)
        images = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0)
        if self.mean is not None:
            images = (images - tf.constant(self.mean)) / tf.constant(self.std)
        return images

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-3], *self.image_size, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(self.knobs, mean=self.mean, std=self.std, seed=self.seed)
        return config


def _as_kerascv_view(view, name: str) -> KerasCVViewPipeline:
    if isinstance(view, KerasCVViewPipeline):
        return view
    if isinstance(view, dict):
        config = {k: v for k, v in view.items() if k not in ("name", "dtype", "trainable")}
        return KerasCVViewPipeline(**config, name=name)
    raise TypeError(f"{name} must be a KerasCVViewPipeline or its config dict, got {type(view).__name__}")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class KerasCVTwoViews(keras.layers.Layer):
    """`TwoViews` built from KerasCV layers: `call(images, seed=None) -> (view_a, view_b)`.

    A drop-in for `TwoViews` (same call signature, same recipe); the `seed`
    call argument is ignored (KerasCV's randomness is stateful, see
    `KerasCVViewPipeline`). Build it with `kerascv_views`.

    Args:
        view_a, view_b: `KerasCVViewPipeline`s or their config dicts.

    Example:
    >>> views = kerascv_views(32, seed=0)
    >>> view_a, view_b = views(tf.random.uniform((4, 32, 32, 3)))
    """

    def __init__(self, view_a, view_b, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.view_a = _as_kerascv_view(view_a, "view_a")
        self.view_b = _as_kerascv_view(view_b, "view_b")
        if self.view_a.image_size != self.view_b.image_size:
            raise ValueError(
                "both views must have the same image_size, got "
                f"{self.view_a.image_size} for view a and {self.view_b.image_size} for view b"
            )
        self.image_size = self.view_a.image_size
        self.built = True

    def call(self, images, seed=None):
        return self.view_a(images), self.view_b(images)

    def compute_output_shape(self, input_shape):
        shape = self.view_a.compute_output_shape(input_shape)
        return shape, shape

    def get_config(self):
        config = super().get_config()
        config.update(view_a=self.view_a.get_config(), view_b=self.view_b.get_config())
        return config


def kerascv_views(image_size, seed: int | None = None, preset: str = "paper", **overrides) -> KerasCVTwoViews:
    """The recipe of `paper_views` (or `grayscale_views`, `preset="grayscale"`) from KerasCV layers.

    For users who want `keras_cv.layers` to make the paired views. Same
    probabilities and knobs as the default layers; slower, and not
    reproducible in a parallel `tf.data.map` (see `KerasCVViewPipeline`).

    Args:
        image_size: output size, int or (height, width).
        seed: int seed of the KerasCV layers' generators.
        preset: "paper" or "grayscale".
        **overrides: `ViewPipeline` arguments for both views, and `view_a={...}` /
            `view_b={...}` for one of them.

    Example:
    >>> views = kerascv_views(32, seed=0)
    >>> view_a, view_b = views(tf.random.uniform((4, 32, 32, 3)))
    >>> view_a.shape
    TensorShape([4, 32, 32, 3])
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    seed = arguments.optional_seed(seed)
    views = PRESETS[preset](image_size, **overrides)  # the preset's knobs with the overrides, each one checked
    seed_a, seed_b = (None, None) if seed is None else (2 * seed, 2 * seed + 1)

    def knobs(view):
        return {k: v for k, v in view.get_config().items() if k not in ("name", "trainable", "dtype", "seed")}

    return KerasCVTwoViews(
        KerasCVViewPipeline(**knobs(views.view_a), seed=seed_a, name="view_a"),
        KerasCVViewPipeline(**knobs(views.view_b), seed=seed_b, name="view_b"),
    )
