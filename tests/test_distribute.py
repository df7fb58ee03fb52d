"""One optimizer step under MirroredStrategy over 2 logical CPUs equals one device."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import vicreg_tf
import vicreg_tf.model as model_module
from vicreg_tf import gather_replicas, VICReg

GLOBAL_BATCH = 16


def _views(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(GLOBAL_BATCH, 6)).astype(np.float32)
    return x, (x + 0.5 * rng.normal(size=x.shape)).astype(np.float32)


def _model():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(12)(inputs)
    x = keras.layers.BatchNormalization()(x)  # made synchronized by VICReg
    x = keras.layers.ReLU()(x)
    return VICReg(keras.Model(inputs, x), projector="24-24-16")


def _one_step(initial_weights, strategy=None):
    """Weights (trainable and BN moving statistics) and metrics after one SGD step."""
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = _model()
        model.set_weights(initial_weights)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5))
    dataset = tf.data.Dataset.from_tensors(_views())
    history = model.fit(dataset, epochs=1, verbose=0)
    return model.get_weights(), {k: v[-1] for k, v in history.history.items()}


@pytest.fixture(scope="module")
def initial_weights():
    keras.utils.set_random_seed(0)
    return _model().get_weights()


def _max_diff(weights_a, weights_b):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(weights_a, weights_b))


def test_mirrored_step_equals_single_device(initial_weights, two_cpu_strategy):
    single, single_metrics = _one_step(initial_weights)
    mirrored, mirrored_metrics = _one_step(initial_weights, two_cpu_strategy)
    assert two_cpu_strategy.num_replicas_in_sync == 2
    assert _max_diff(single, initial_weights) > 1e-3  # the step did something
    assert _max_diff(single, mirrored) < 1e-5
    for key, value in single_metrics.items():
        np.testing.assert_allclose(mirrored_metrics[key], value, rtol=1e-5, err_msg=key)


def test_without_gather_the_comparison_fails(initial_weights, two_cpu_strategy, monkeypatch):
    """Test of the test: per-replica statistics must be caught."""
    single, _ = _one_step(initial_weights)
    monkeypatch.setattr(model_module, "gather_replicas", lambda z: z)
    mirrored, _ = _one_step(initial_weights, two_cpu_strategy)
    assert _max_diff(single, mirrored) > 1e-4


def test_without_replica_scaling_the_comparison_fails(initial_weights, two_cpu_strategy, monkeypatch):
    """Test of the test: a loss not divided by the number of replicas must be caught."""
    single, _ = _one_step(initial_weights)
    monkeypatch.setattr(model_module, "num_replicas", lambda: 1)
    mirrored, _ = _one_step(initial_weights, two_cpu_strategy)
    assert _max_diff(single, mirrored) > 1e-4


def test_gather_is_identity_outside_a_strategy():
    z = tf.random.normal((4, 3))
    np.testing.assert_array_equal(gather_replicas(z).numpy(), z.numpy())


def test_gather_concatenates_replicas_and_sums_gradients(two_cpu_strategy):
    def step(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            gathered = gather_replicas(z)
            loss = tf.reduce_sum(gathered * tf.range(4, dtype=tf.float32)[:, None])
        return gathered, tape.gradient(loss, z)

    values = two_cpu_strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.fill((2, 1), float(ctx.replica_id_in_sync_group))
    )
    gathered, grads = two_cpu_strategy.run(step, args=(values,))
    per_replica = two_cpu_strategy.experimental_local_results(gathered)
    np.testing.assert_array_equal(per_replica[0].numpy().ravel(), [0, 0, 1, 1])
    np.testing.assert_array_equal(per_replica[1].numpy().ravel(), [0, 0, 1, 1])
    # d loss / d z on replica r = the all-reduced weights of its slice (2 replicas sum).
    grad_slices = [g.numpy().ravel() for g in two_cpu_strategy.experimental_local_results(grads)]
    np.testing.assert_array_equal(grad_slices[0], [0, 2])
    np.testing.assert_array_equal(grad_slices[1], [4, 6])
