"""One battery for every method of the VICReg family, in keras-hub's style (`run_backbone_test`).

`run_method_checks(make_model)` runs, on a tiny model the factory builds from a
backbone: fit (finite loss, the weights move, the method's metrics), the `.keras`
round trip (same features, same config), one SGD step on two replicas equal to
one device, the NaN guard (a NaN pixel: every weight and optimizer variable
bitwise unchanged), XLA (the same step as without it) and mixed_bfloat16 (finite,
float32 loss). A new method gets every check by one call in tests/test_methods.py.
"""
from __future__ import annotations

import json
import math

import keras
import numpy as np
import tensorflow as tf

from vicreg_tf.backbones import small_cnn

SHAPE = (12, 12, 1)
BATCH = 8


def _backbone():
    return small_cnn(SHAPE, widths=(4, 8))


def _views(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(BATCH, *SHAPE)).astype(np.float32)
    return x, np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1).astype(np.float32)


def _data(seed=0):
    return tf.data.Dataset.from_tensors(_views(seed))


def _step(make_model, initial, *, strategy=None, jit_compile=False):
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = make_model(_backbone())
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=jit_compile)
    model.fit(_data(), epochs=1, verbose=0)
    return model


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def check_fit(make_model):
    keras.utils.set_random_seed(0)
    model = make_model(_backbone())
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    before = model.get_weights()
    history = model.fit(_data().repeat(), steps_per_epoch=3, epochs=1, verbose=0).history
    assert set(history) == set(model.metric_names), (sorted(history), model.metric_names)
    assert all(math.isfinite(v[-1]) for v in history.values()), history
    assert _max_diff(before, model.get_weights()) > 1e-5


def check_round_trip(make_model, tmp_path):
    keras.utils.set_random_seed(0)
    model = make_model(_backbone())
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))  # state worth restoring
    model.fit(_data(), epochs=1, verbose=0)
    path = tmp_path / f"{type(model).__name__}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert type(reloaded) is type(model)
    def normal(config):  # tuples come back as lists
        return json.loads(json.dumps(config, default=str))

    assert normal(reloaded.get_config()) == normal(model.get_config())
    x = _views()[0]
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    for a, b in zip(reloaded.get_weights(), model.get_weights()):  # targets and predictors included
        np.testing.assert_array_equal(a, b)
    model.fit(_data(1), epochs=1, verbose=0)  # the optimizer's state came back too: the next step agrees
    reloaded.fit(_data(1), epochs=1, verbose=0)
    for a, b in zip(reloaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def check_two_replicas_equal_one_device(make_model, strategy):
    keras.utils.set_random_seed(0)
    initial = make_model(_backbone()).get_weights()
    one = _step(make_model, initial).get_weights()
    two = _step(make_model, initial, strategy=strategy).get_weights()
    assert _max_diff(one, initial) > 1e-5  # the step did something
    # float32 sums in another order; the entropy estimators' Cholesky amplifies it (1.1e-5 seen)
    assert _max_diff(one, two) < 2e-5, _max_diff(one, two)


def check_nan_guard(make_model):
    keras.utils.set_random_seed(0)
    model = make_model(_backbone())
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    model.fit(_data(), epochs=1, verbose=0)
    before = [w.numpy().copy() for w in model.weights]
    before += [np.asarray(v.numpy()).copy() for v in model.optimizer.variables]
    view_a, view_b = _views(1)
    view_a[0, 2, 2, 0] = np.nan
    try:
        model.fit(tf.data.Dataset.from_tensors((view_a, view_b)), epochs=1, verbose=0)
        raise AssertionError("a NaN batch was trained on without an error")
    except tf.errors.InvalidArgumentError as error:
        assert "not applied" in str(error)
    after = [w.numpy() for w in model.weights] + [np.asarray(v.numpy()) for v in model.optimizer.variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def check_xla_equals_graph(make_model):
    keras.utils.set_random_seed(0)
    initial = make_model(_backbone()).get_weights()
    graph = _step(make_model, initial).get_weights()
    xla = _step(make_model, initial, jit_compile=True).get_weights()
    assert _max_diff(graph, xla) < 1e-4, _max_diff(graph, xla)


def check_mixed_bfloat16(make_model):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = make_model(_backbone())
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        terms = model.compute_vicreg_terms(_views(), training=True)
        assert terms["loss"].dtype == tf.float32
        history = model.fit(_data(), epochs=1, verbose=0).history
        assert math.isfinite(history["loss"][0]), history
    finally:
        keras.mixed_precision.set_global_policy("float32")


CHECKS = {
    "fit": check_fit,
    "round_trip": check_round_trip,
    "two_replicas": check_two_replicas_equal_one_device,
    "nan_guard": check_nan_guard,
    "xla": check_xla_equals_graph,
    "mixed_bfloat16": check_mixed_bfloat16,
}


def run_method_checks(make_model, check: str, *, tmp_path=None, strategy=None):
    """Runs one named check of the battery (all of `CHECKS` for a new method, via parametrize)."""
    function = CHECKS[check]
    if check == "round_trip":
        return function(make_model, tmp_path)
    if check == "two_replicas":
        return function(make_model, strategy)
    return function(make_model)
