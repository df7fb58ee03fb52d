"""One battery for every view op of `vicreg_tf.augment`, in keras-hub's style (`run_layer_test`).

`run_view_layer_checks(layer_factory)` runs, on the layer the factory builds:
eager equals inside `tf.data.map` (big_vision: "you'd be surprised how much these
two differ"); per-row determinism (row i of a batch, bit for bit, is the same image
made alone as row i of that batch, which is what lets W workers each make their
rows of a global batch); dtype and shape (float32 out for uint8 or float in, the
shape `compute_output_shape` gives, an unbatched image as the batched one, float32
under a mixed-precision policy); the config round trip (same class, same config,
same output). A new op gets every check by one call in tests/test_augment.py.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

SEED = (1, 2)


def _flat(out):
    return [t.numpy() if hasattr(t, "numpy") else np.asarray(t) for t in tf.nest.flatten(out)]


def _assert_same(a, b):
    for x, y in zip(_flat(a), _flat(b), strict=True):
        np.testing.assert_array_equal(x, y)


def check_eager_equals_tf_data(layer, images, unit_range: bool = True):
    seed = tf.constant(SEED, tf.int64)
    eager = layer(images, seed=seed)
    mapped = next(iter(tf.data.Dataset.from_tensors(images).map(lambda x: layer(x, seed=seed))))
    expected = layer.compute_output_shape(tuple(images.shape))
    expected = [tuple(s) for s in expected] if isinstance(expected[0], tuple) else [tuple(expected)]
    for e, m, shape in zip(tf.nest.flatten(eager), tf.nest.flatten(mapped), expected, strict=True):
        assert e.dtype == m.dtype == tf.float32
        assert tuple(e.shape) == tuple(m.shape) == shape, (e.shape, m.shape, shape)
        assert np.isfinite(e.numpy()).all()
        if unit_range:
            assert 0.0 <= float(tf.reduce_min(e)) and float(tf.reduce_max(e)) <= 1.0
        np.testing.assert_allclose(e.numpy(), m.numpy(), atol=1e-6)


def check_rows_are_made_alone(layer, images, rows=(0, 3, -1)):
    """Row i of a batch equals image i made alone with the same seed as row i of that batch."""
    seed = tf.constant(SEED, tf.int32)
    batch = int(images.shape[0])
    whole = layer.augment(images, seed)
    for i in (r % batch for r in rows):
        alone = layer.augment(images[i:i + 1], seed, rows=(tf.constant([i], tf.int32), batch))
        for w, a in zip(_flat(whole), _flat(alone), strict=True):
            np.testing.assert_array_equal(a[0], w[i])


def check_dtypes_and_unbatched(layer, images):
    seed = tf.constant(SEED, tf.int64)
    as_uint8 = tf.cast(tf.round(images * 255.0), tf.uint8)
    _assert_same(layer(as_uint8, seed=seed), layer(tf.image.convert_image_dtype(as_uint8, tf.float32), seed=seed))
    one = layer(images[0], seed=seed)  # (H, W, C): no batch axis in, none out
    for single, batched in zip(_flat(one), _flat(layer(images[:1], seed=seed)), strict=True):
        np.testing.assert_array_equal(single, batched[0])


def check_float32_under_mixed_precision(layer_factory, images):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        out = layer_factory()(images, seed=tf.constant(SEED, tf.int64))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert all(t.dtype == tf.float32 for t in tf.nest.flatten(out))


def check_config_round_trip(layer, images):
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
    seed = tf.constant((4, 5), tf.int64)
    _assert_same(layer(images, seed=seed), clone(images, seed=seed))


def run_view_layer_checks(layer_factory, *, image_shape=(6, 9, 9, 3), unit_range: bool = True,
                          rows=(0, 3, -1)) -> None:
    """Every check above on `layer_factory()` and images of `image_shape` (batch, height, width, channels)."""
    images = tf.random.stateless_uniform(image_shape, (0, 7))
    layer = layer_factory()
    check_eager_equals_tf_data(layer, images, unit_range)
    check_rows_are_made_alone(layer, images, rows)
    check_dtypes_and_unbatched(layer, images)
    check_float32_under_mixed_precision(layer_factory, images)
    check_config_round_trip(layer, images)
