"""One optimizer step under MirroredStrategy over 2 logical CPUs equals one device."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import vicreg_tf
import vicreg_tf.base as base_module
import vicreg_tf.model as model_module
from vicreg_tf import VICReg, gather_replicas

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
    monkeypatch.setattr(base_module, "num_replicas", lambda: 1)
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


# --------------------------------------------------------------------------- precision (issue 17)


def test_mixed_bfloat16_mirrored_step_equals_single_device(initial_weights, two_cpu_strategy):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    single, _ = _one_step(initial_weights)
    mirrored, _ = _one_step(initial_weights, two_cpu_strategy)
    step = _max_diff(single, initial_weights)
    assert step > 1e-3
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2**-8 = 0.4%); the two runs differ
    # only in how the per-replica halves are summed before rounding.
    print(f"mixed_bfloat16 one step: max |single - mirrored| {_max_diff(single, mirrored):.2e}, max update {step:.2e}")
    assert _max_diff(single, mirrored) < 2e-2, (_max_diff(single, mirrored), step)


class _InfGradientOnReplica1(keras.layers.Layer):
    """Identity whose gradient is Inf on replica 1 only, while `poison` is set."""

    def __init__(self, poison, **kwargs):
        super().__init__(**kwargs)
        self.poison = poison

    def call(self, x):
        @tf.custom_gradient
        def identity(x):
            def grad(dy):
                context = tf.distribute.get_replica_context()
                replica = context.replica_id_in_sync_group if context is not None else 0
                bad = tf.logical_and(tf.equal(replica, 1), self.poison > 0)
                return dy * tf.cast(tf.where(bad, np.inf, 1.0), dy.dtype)
            return tf.identity(x), grad
        return identity(x)


def _per_replica(strategy, variables):
    return [[x.numpy().copy() for x in strategy.experimental_local_results(v.value)] for v in variables]


def test_mixed_float16_inf_on_one_replica_skips_the_step_on_every_replica(two_cpu_strategy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    poison = tf.Variable(1.0, trainable=False)
    with two_cpu_strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        x = keras.layers.Dense(12)(inputs)
        x = _InfGradientOnReplica1(poison)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        model = VICReg(keras.Model(inputs, x), projector="24-24-16")
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
        model.optimizer.build(model.trainable_variables)
    scaler = model.optimizer
    assert isinstance(scaler, keras.optimizers.LossScaleOptimizer)  # Keras wraps it under mixed_float16
    scale = float(scaler.dynamic_scale.numpy())
    before = _per_replica(two_cpu_strategy, model.weights)
    dataset = tf.data.Dataset.from_tensors(_views())
    model.fit(dataset, epochs=1, verbose=0)  # an overflow is not an error: skipped, scale halved

    after = _per_replica(two_cpu_strategy, model.weights)
    for replicas_before, replicas_after in zip(before, after):
        for a, b in zip(replicas_before, replicas_after):  # every replica, BN statistics included
            np.testing.assert_array_equal(a, b)
    assert int(scaler.iterations.numpy()) == 0
    scales = two_cpu_strategy.experimental_local_results(scaler.dynamic_scale.value)
    assert [float(s) for s in scales] == [scale / 2] * 2

    poison.assign(0.0)  # clean steps: once the scale is low enough for float16, applied on both replicas
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(
        (float(logs["loss"]), int(scaler.iterations.numpy()), float(scaler.dynamic_scale.numpy()))))
    model.fit(dataset.repeat(), epochs=1, steps_per_epoch=3, verbose=0, callbacks=[record])
    print(f"mixed_float16 after the Inf step, (loss, applied steps, scale) per clean step: {seen}")
    applied = int(scaler.iterations.numpy())
    assert applied >= 1 and int(scaler.step_counter.numpy()) == applied
    after = _per_replica(two_cpu_strategy, model.trainable_weights)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(before, after))
    for replicas in after:
        np.testing.assert_array_equal(replicas[0], replicas[1])
        assert np.all(np.isfinite(replicas[0]))


# --------------------------------------------------------------------------- synchronized BatchNorm


def _collective_ops(graph) -> int:
    """All-reduce ops in a traced function's graph and its function library (cond branches, gradients)."""
    kinds = ("CollectiveReduceV2", "CollectiveReduceV3", "CollectiveReduce", "NcclAllReduce")
    count, seen, stack = 0, set(), [graph]
    while stack:
        g = stack.pop()
        count += sum(op.type in kinds for op in g.get_operations())
        for name, function in g._functions.items():
            if name not in seen and hasattr(function, "graph"):
                seen.add(name)
                stack.append(function.graph)
    return count


def _train_step_collectives(strategy, fused: bool) -> int:
    from vicreg_tf.backbones import small_cnn

    with strategy.scope():
        model = VICReg(small_cnn((12, 12, 1), widths=(4, 8)), projector="16-16", fused_batchnorm=fused)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.optimizer.build(model.trainable_variables)
    spec = tf.TensorSpec((4, 12, 12, 1), tf.float32)
    step = tf.function(lambda a, b: strategy.run(model.train_step, args=((a, b),)))
    return _collective_ops(step.get_concrete_function(spec, spec).graph)


def test_packed_synchronized_batchnorm_takes_fewer_collectives(two_cpu_strategy):
    keras_bn = _train_step_collectives(two_cpu_strategy, fused=False)
    packed = _train_step_collectives(two_cpu_strategy, fused=True)
    print(f"collective all-reduce ops in the traced train step: Keras sync BN {keras_bn}, packed {packed}")
    # Each synchronized BatchNorm call (3 layers, both views) drops from 3 all-reduces to 1,
    # and so does its gradient; the gather and the gradient all-reduces stay.
    assert packed < keras_bn
    assert keras_bn - packed >= 4 * 3 * 2


def test_packed_synchronized_batchnorm_matches_keras(two_cpu_strategy):
    rng = np.random.default_rng(3)
    images = rng.normal(size=(8, 5, 5, 3)).astype(np.float32) * 2.0 + 1.0
    upstream = rng.normal(size=images.shape).astype(np.float32)
    results = []
    for fused in (False, True):
        with two_cpu_strategy.scope():
            layer = keras.layers.BatchNormalization(synchronized=True, momentum=0.9)
            layer.build((None, 5, 5, 3))
            layer.gamma.assign([1.5, 0.5, 2.0])
            layer.beta.assign([0.1, -0.2, 0.3])
        if fused:
            vicreg_tf.batchnorm.use_fused_batchnorm(layer)

        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            return (y, *tape.gradient(loss, [x, layer.gamma.value, layer.beta.value]))

        x = two_cpu_strategy.experimental_distribute_values_from_function(
            lambda ctx: images[4 * ctx.replica_id_in_sync_group: 4 * ctx.replica_id_in_sync_group + 4])
        dy = two_cpu_strategy.experimental_distribute_values_from_function(
            lambda ctx: upstream[4 * ctx.replica_id_in_sync_group: 4 * ctx.replica_id_in_sync_group + 4])
        outputs = tf.function(lambda x, dy: two_cpu_strategy.run(step, args=(x, dy)))(x, dy)
        values = [np.concatenate([t.numpy() for t in two_cpu_strategy.experimental_local_results(o)])
                  for o in outputs]
        values += [v.numpy() for v in (layer.moving_mean, layer.moving_variance)]
        results.append(values)
    names = ["outputs", "input gradients", "gamma gradients", "beta gradients", "moving mean", "moving variance"]
    for name, keras_value, packed_value in zip(names, *results):
        np.testing.assert_allclose(packed_value, keras_value, atol=1e-5, err_msg=name)


def test_mixed_float16_on_one_device_skips_overflows_then_trains():
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
    model.optimizer.build(model.trainable_variables)
    scale = float(model.optimizer.dynamic_scale.numpy())
    history = model.fit(tf.data.Dataset.from_tensors(_views()).repeat(), epochs=1, steps_per_epoch=4, verbose=0)
    applied = int(model.optimizer.iterations.numpy())
    assert 1 <= applied < 4  # the first steps overflow float16 at scale 2**15 and are skipped
    assert float(model.optimizer.dynamic_scale.numpy()) == scale / 2 ** (4 - applied)
    assert int(model.optimizer.step_counter.numpy()) == applied
    assert np.isfinite(history.history["loss"][-1])
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
