"""View layers: the battery for every op (tests/view_checks.py), the recipe's per-image probabilities, what each
op does, seeds, presets, errors, and the KerasCV twin."""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from view_checks import run_view_layer_checks

from vicreg_tf import augment, kerascv_pipeline

N = 4000  # images per probability estimate: 4 sigma of a 0.2 rate is 0.025


@pytest.fixture(scope="module")
def paper():
    return augment.paper_views(8, seed=0)


@pytest.fixture(scope="module")
def gray():
    return augment.grayscale_views(8, seed=0)


def _in_tf_data(fn, images, seed=(1, 2)):
    """fn(images, seed) run inside a tf.data.map, as the training pipeline runs it."""
    dataset = tf.data.Dataset.from_tensors(images).map(lambda x: fn(x, seed=tf.constant(seed, tf.int64)))
    return next(iter(dataset))


def _assert_in_unit_range(x):
    x = np.asarray(x)
    assert x.dtype == np.float32 and np.isfinite(x).all()
    assert 0.0 <= x.min() and x.max() <= 1.0, (x.min(), x.max())


def _assert_rate(hits, probability, n=N):
    rate = float(np.mean(hits))
    if probability in (0.0, 1.0):
        assert rate == probability
    else:
        assert abs(rate - probability) <= 4 * math.sqrt(probability * (1 - probability) / n), (rate, probability)


def _rgb(n=N, size=8, seed=0):
    return tf.random.stateless_uniform((n, size, size, 3), (seed, 7))


# -- the battery, for every view op ---------------------------------------------------------------


VIEW_LAYERS = {  # name -> (factory, images (batch, height, width, channels), outputs in [0, 1])
    "crop": (lambda: augment.RandomResizedCrop((6, 5)), (16, 9, 9, 3), True),
    "flip": (lambda: augment.RandomHorizontalFlip(0.5), (16, 9, 9, 3), True),
    "color_jitter": (lambda: augment.RandomColorJitter(0.8), (16, 9, 9, 3), True),
    "color_jitter_one_channel": (lambda: augment.RandomColorJitter(1.0, brightness=0.9, contrast=0.9),
                                 (16, 9, 9, 1), True),
    "grayscale": (lambda: augment.RandomGrayscale(0.5), (16, 9, 9, 3), True),
    "blur": (lambda: augment.RandomGaussianBlur(0.5), (16, 9, 9, 3), True),
    "solarize": (lambda: augment.RandomSolarize(0.5), (16, 9, 9, 3), True),
    "view": (lambda: augment.ViewPipeline(6, blur_prob=0.5, solarize_prob=0.5), (16, 9, 9, 3), True),
    "paper_views": (lambda: augment.paper_views(8, seed=3, view_b={"solarize_prob": 0.3}), (16, 11, 10, 3), True),
    "grayscale_views": (lambda: augment.grayscale_views(8, seed=0), (16, 11, 10, 1), True),
    "grayscale_views_normalized": (lambda: augment.grayscale_views((6, 5), mean=0.5, std=0.25), (8, 9, 9, 1), False),
}


@pytest.mark.parametrize("name", sorted(VIEW_LAYERS))
def test_view_layer_battery(name):
    factory, shape, unit_range = VIEW_LAYERS[name]
    run_view_layer_checks(factory, image_shape=shape, unit_range=unit_range)


def test_every_view_op_and_preset_of_augment_gets_the_battery():
    ops = {getattr(augment, name) for name in augment.__all__
           if isinstance(getattr(augment, name), type) and issubclass(getattr(augment, name), keras.layers.Layer)}
    covered = {type(factory()) for factory, _, _ in VIEW_LAYERS.values()}
    assert len(ops) == 8 and ops <= covered, sorted(o.__name__ for o in ops - covered)
    assert {f"{preset}_views" for preset in augment.PRESETS} <= set(VIEW_LAYERS)


def test_the_device_half_of_the_views_is_one_call_on_numbers_drawn_once():
    # Keras' two phases: the numbers are drawn once (on the host) and the rest applied anywhere.
    views = augment.paper_views(8, seed=0)
    images = _rgb(8, size=11)
    numbers = views.get_random_transformation((8, 11, 11, 3), tf.constant([5, 6]))
    crops_a, crops_b = views.crop_images(images, numbers)
    whole = views.augment(images, tf.constant([5, 6]))
    for x, y in zip(views.transform_crops(crops_a, crops_b, numbers), whole, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    # Inside a graph (as in the train step) the kernels may round differently: as test_sources's device check.
    for x, y in zip(tf.function(views.transform_crops)(crops_a, crops_b, numbers), whole, strict=True):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-5)


def test_unknown_spatial_size_in_tf_data(gray):
    spec = tf.TensorSpec((None, None, None, 1), tf.float32)
    dataset = tf.data.Dataset.from_generator(lambda: iter([np.random.rand(4, 20, 30, 1).astype("float32")]),
                                             output_signature=spec)
    view_a, view_b = next(iter(dataset.map(lambda x: gray(x, seed=[1, 2]))))
    assert tuple(view_a.shape) == tuple(view_b.shape) == (4, 8, 8, 1)


def test_uint8_images_are_rescaled():
    out = augment.RandomSolarize(0.0)(tf.fill((1, 2, 2, 1), tf.constant(255, tf.uint8)))
    assert out.dtype == tf.float32 and float(tf.reduce_min(out)) == 1.0


# -- the recipe's probabilities, per image -------------------------------------------------------


def _flip_probe():
    images = np.zeros((N, 4, 4, 1), np.float32)
    images[:, :, 2:] = 1.0  # right half white: a flip puts white at column 0
    return tf.constant(images), lambda out: out[:, 0, 0, 0] == 1.0


def _solarize_probe():
    return tf.fill((N, 2, 2, 1), 0.75), lambda out: np.isclose(out[:, 0, 0, 0], 0.25)


def _grayscale_probe():
    images = tf.concat([tf.ones((N, 2, 2, 1)), tf.zeros((N, 2, 2, 2))], axis=-1)  # pure red
    return images, lambda out: out[:, 0, 0, 0] == out[:, 0, 0, 1]


def _changed_probe():
    images = _rgb(N, size=6)
    return images, lambda out: np.abs(out - images.numpy()).max(axis=(1, 2, 3)) > 1e-3


def _blur_detectable(layer):
    # sigma 0.1 leaves an image unchanged to float precision: probe the gate with sigma >= 1.
    return augment.RandomGaussianBlur.from_config({**layer.get_config(), "sigma": (1.0, 2.0)})


@pytest.mark.parametrize(
    "view, step, probe, expected",
    [
        ("view_a", "flip", _flip_probe, 0.5),
        ("view_b", "flip", _flip_probe, 0.5),
        ("view_a", "jitter", _changed_probe, 0.8),
        ("view_a", "grayscale", _grayscale_probe, 0.2),
        ("view_b", "grayscale", _grayscale_probe, 0.2),
        ("view_a", "blur", _changed_probe, 1.0),
        ("view_b", "blur", _changed_probe, 0.1),
        ("view_a", "solarize", _solarize_probe, 0.0),
        ("view_b", "solarize", _solarize_probe, 0.2),
    ],
)
def test_paper_views_per_image_probabilities(paper, view, step, probe, expected):
    layer = getattr(getattr(paper, view), step)
    if step == "blur":
        layer = _blur_detectable(layer)
    images, detect = probe()
    out = layer(images, seed=[11, 13]).numpy()
    _assert_rate(detect(out), expected)


@pytest.mark.parametrize(
    "view, step, probe, expected",
    [
        ("view_a", "blur", _changed_probe, 0.5),
        ("view_b", "blur", _changed_probe, 0.1),
        ("view_a", "solarize", _solarize_probe, 0.0),
        ("view_b", "solarize", _solarize_probe, 0.2),
        ("view_a", "jitter", _changed_probe, 0.8),  # brightness / contrast only
        ("view_b", "jitter", _changed_probe, 0.8),
    ],
)
def test_grayscale_views_per_image_probabilities(gray, view, step, probe, expected):
    layer = getattr(getattr(gray, view), step)
    if step == "blur":
        layer = _blur_detectable(layer)
    images, detect = probe()
    _assert_rate(detect(layer(images, seed=[5, 6]).numpy()), expected)


def test_probability_gates_differ_between_seeds():
    images, detect = _solarize_probe()
    layer = augment.RandomSolarize(0.5)
    first, second = (detect(layer(images, seed=s).numpy()) for s in ([1, 1], [1, 2]))
    assert 0.4 < np.mean(first != second) < 0.6  # independent per-image draws


# -- what each op does -------------------------------------------------------------------------------


def test_solarize_threshold_is_half_on_unit_range():
    images = tf.constant([0.2, 0.49, 0.5, 0.8])[None, None, :, None]
    out = augment.RandomSolarize(1.0)(images, seed=[1, 2]).numpy().ravel()
    np.testing.assert_allclose(out, [0.2, 0.49, 0.5, 0.2], atol=1e-6)


def test_full_area_square_crop_is_identity():
    images = _rgb(4, size=8)
    out = augment.RandomResizedCrop(8, area=(1.0, 1.0), aspect=(1.0, 1.0))(images, seed=[1, 2])
    np.testing.assert_allclose(out.numpy(), images.numpy(), atol=1e-6)


def test_crop_keeps_areas_within_range():
    # A one-hot column per x position: the columns that survive the crop measure its width.
    images = tf.tile(tf.range(64, dtype=tf.float32)[None, None, :, None] / 63.0, [N // 4, 64, 1, 1])
    out = augment.RandomResizedCrop(64, area=(0.25, 0.5), aspect=(1.0, 1.0))(images, seed=[3, 4]).numpy()
    width = (out[:, 0, -1, 0] - out[:, 0, 0, 0]) * 63.0 + 1.0
    assert width.min() >= 32 - 1 and width.max() <= math.sqrt(0.5) * 64 + 1


def test_blur_keeps_constant_image_constant():
    out = augment.RandomGaussianBlur(1.0, sigma=(2.0, 2.0))(tf.fill((2, 8, 8, 3), 0.7), seed=[1, 2])
    np.testing.assert_allclose(out.numpy(), 0.7, atol=1e-6)  # symmetric padding: borders do not darken


@pytest.mark.parametrize("layer", [
    augment.RandomGaussianBlur(1e-9), augment.RandomSolarize(1e-9), augment.RandomColorJitter(1e-9),
])
def test_rare_op_that_picks_no_image_returns_the_batch_unchanged(layer):
    # An empty subset once crashed oneDNN's depthwise convolution inside tf.data (blur, p=0.1).
    images = _rgb(4)
    for fn in (layer, tf.function(layer)):
        np.testing.assert_array_equal(fn(images, seed=[1, 2]).numpy(), images.numpy())


def test_grayscale_uses_luma_weights():
    out = augment.RandomGrayscale(1.0)(tf.constant([[[[1.0, 0.0, 0.0]]]]), seed=[1, 2]).numpy().ravel()
    np.testing.assert_allclose(out, [0.2989] * 3, atol=1e-3)


# -- seeds and the pair ------------------------------------------------------------------------------


def test_two_views_of_an_image_differ(paper):
    view_a, view_b = paper(_rgb(32), seed=[1, 2])
    per_image = tf.reduce_mean(tf.abs(view_a - view_b), axis=[1, 2, 3]).numpy()
    assert (per_image > 1e-3).all()


def test_same_seed_gives_same_views_different_seed_differs(paper):
    images = _rgb(8)
    first, again, other = (paper(images, seed=s) for s in ([1, 2], [1, 2], [1, 3]))
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())


def test_layer_seed_makes_unseeded_calls_reproducible():
    images = _rgb(4)
    first = augment.paper_views(8, seed=7)(images)
    again = augment.paper_views(8, seed=7)(images)
    np.testing.assert_array_equal(first[1].numpy(), again[1].numpy())
    views = augment.paper_views(8, seed=7)
    assert not np.array_equal(views(images)[0].numpy(), views(images)[0].numpy())  # the generator advances


def test_int64_seeds_beyond_int32_work(paper):
    view_a, _ = paper(_rgb(2), seed=tf.constant([2**40 + 3, 2**33], tf.int64))
    _assert_in_unit_range(view_a)


def test_presets_are_builders_by_name():
    assert augment.PRESETS == {"paper": augment.paper_views, "grayscale": augment.grayscale_views}
    views = augment.PRESETS["grayscale"](28, seed=1, view_b={"blur_prob": 0.3})
    same = augment.grayscale_views(28, seed=1, view_b={"blur_prob": 0.3})
    assert isinstance(views, augment.TwoViews) and views.seed == same.seed == 1
    for name in ("view_a", "view_b"):
        assert getattr(views, name).get_config() == getattr(same, name).get_config()
    assert views.view_a.blur.probability == 0.5 and views.view_b.blur.probability == 0.3


def test_mismatched_view_sizes_raise():
    with pytest.raises(ValueError, match=r"same image_size, got \(8, 8\) for view a and \(6, 6\)"):
        augment.TwoViews(augment.ViewPipeline(8), augment.ViewPipeline(6))


# -- bad arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: augment.RandomResizedCrop(0), "image_size must be a positive int .* got 0"),
        (lambda: augment.RandomResizedCrop((8, -1)), r"image_size must be a positive int .* got \(8, -1\)"),
        (lambda: augment.ViewPipeline(-3), "image_size must be .* got -3"),
        (lambda: augment.paper_views(0), "image_size must be .* got 0"),
        (lambda: augment.grayscale_views((0, 28)), r"image_size must be .* got \(0, 28\)"),
        (lambda: kerascv_pipeline.kerascv_views(-1), "image_size must be .* got -1"),
        (lambda: augment.RandomHorizontalFlip(1.5), r"probability must be a probability in \[0, 1\], got 1.5"),
        (lambda: augment.RandomSolarize(-0.1), r"probability must be a probability in \[0, 1\], got -0.1"),
        (lambda: augment.RandomGaussianBlur(2), r"probability must be a probability in \[0, 1\], got 2"),
        (lambda: augment.ViewPipeline(8, jitter_prob=1.01), r"jitter_prob must be a probability in \[0, 1\], got 1.01"),
        (lambda: augment.paper_views(8, grayscale_prob=-1), r"grayscale_prob must be .* \[0, 1\], got -1"),
        (lambda: augment.paper_views(8, view_b={"solarize_prob": 3}), r"solarize_prob must be .* \[0, 1\], got 3"),
        (lambda: kerascv_pipeline.kerascv_views(8, blur_prob=1.5), r"blur_prob must be .* \[0, 1\], got 1.5"),
        (lambda: augment.ViewPipeline(8, crop_area=(0.5, 0.1)), r"crop_area must be \(min, max\) .* got \(0.5, 0.1\)"),
        (lambda: augment.ViewPipeline(8, blur_sigma=(0.0, 1.0)), r"blur_sigma must be .* got \(0.0, 1.0\)"),
        (lambda: augment.ViewPipeline(8, hue=0.7), r"hue must be a number in \[0, 0.5\], got 0.7"),
        (lambda: augment.paper_views(8, seed=1.5), "seed must be an int or None, got 1.5"),
    ],
)
def test_bad_arguments_raise_naming_argument_value_and_expectation(build, expected):
    with pytest.raises(ValueError, match=expected):
        build()


# -- KerasCV-built views -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kerascv_paper():
    return kerascv_pipeline.kerascv_views(8, seed=0)


def test_kerascv_views_in_tf_data_shapes_dtypes_ranges(kerascv_paper):
    mapped = _in_tf_data(kerascv_paper, _rgb(8, size=10))
    for view in mapped:
        assert tuple(view.shape) == (8, 8, 8, 3) and view.dtype == tf.float32
        _assert_in_unit_range(view)
    assert float(tf.reduce_mean(tf.abs(mapped[0] - mapped[1]))) > 1e-3


@pytest.mark.large  # KerasCV retraces its vectorized_map on every eager call: ~10 s here
def test_kerascv_views_eager_shapes_dtypes_ranges(kerascv_paper):
    for view in kerascv_paper(_rgb(8, size=10), seed=[1, 2]):
        assert tuple(view.shape) == (8, 8, 8, 3) and view.dtype == tf.float32
        _assert_in_unit_range(view)


@pytest.mark.large
def test_kerascv_grayscale_preset_on_one_channel():
    view_a, view_b = kerascv_pipeline.kerascv_views(8, preset="grayscale", seed=1)(_rgb(4, size=10)[..., :1])
    assert tuple(view_a.shape) == (4, 8, 8, 1)
    _assert_in_unit_range(view_b)


def test_kerascv_views_use_the_recipe(kerascv_paper):
    import keras_cv

    a, b = kerascv_paper.view_a, kerascv_paper.view_b
    assert a.solarize is None and b.solarize._rate == pytest.approx(0.2)
    assert isinstance(a.blur, keras_cv.layers.RandomGaussianBlur) and b.blur._rate == pytest.approx(0.1)
    assert a.grayscale._rate == b.grayscale._rate == pytest.approx(0.2)
    assert a.jitter._rate == pytest.approx(0.8) and a.flip.rate == 0.5


def test_kerascv_solarize_threshold_is_half_on_unit_range():
    view = kerascv_pipeline.KerasCVViewPipeline(8, solarize_prob=1.0)
    images = tf.constant([0.2, 0.49, 0.51, 0.8])[None, None, :, None]
    np.testing.assert_allclose(view.solarize(images).numpy().ravel(), [0.2, 0.49, 0.49, 0.2], atol=1e-5)


def test_kerascv_per_image_probability():
    view = kerascv_pipeline.KerasCVViewPipeline(8, solarize_prob=0.2, seed=3)
    n = 2000
    out = _in_tf_data(lambda x, seed: view.solarize(x), tf.fill((n, 2, 2, 1), 0.75))
    _assert_rate(np.isclose(out.numpy()[:, 0, 0, 0], 0.25, atol=1e-4), 0.2, n=n)


def test_kerascv_get_config_round_trip(kerascv_paper):
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(kerascv_paper))
    assert isinstance(clone, kerascv_pipeline.KerasCVTwoViews) and clone.get_config() == kerascv_paper.get_config()
    assert clone.view_b.knobs["solarize_prob"] == 0.2


def test_kerascv_views_take_the_presets_knobs():
    twin = kerascv_pipeline.kerascv_views(8, preset="grayscale", view_b={"blur_prob": 0.3})
    for name in ("view_a", "view_b"):
        ours = getattr(augment.grayscale_views(8, view_b={"blur_prob": 0.3}), name).get_config()
        assert getattr(twin, name).knobs == {k: ours[k] for k in getattr(twin, name).knobs}
    with pytest.raises(ValueError, match=r"preset must be one of \['grayscale', 'paper'\], got 'fancy'"):
        kerascv_pipeline.kerascv_views(8, preset="fancy")


def test_kerascv_out_of_range_knob_raises():
    with pytest.raises(ValueError, match=r"contrast must be in \[0, 1\] for KerasCV's RandomContrast, got 1.5"):
        kerascv_pipeline.kerascv_views(8, contrast=1.5)
