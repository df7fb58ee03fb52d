"""The VICReg Keras model: training, metrics, serialization, XLA, mixed precision, bad input."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from vicreg_tf import LARS, StopOnNonFiniteLoss, VICReg
from vicreg_tf.backbones import small_cnn

METRICS = {"loss", "invariance", "variance", "covariance", "embedding_std"}


def _mlp(input_dim=16, width=32, name=None):
    inputs = keras.Input((input_dim,))
    x = keras.layers.Dense(width)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, x, name=name)


def _cluster_views(n=256, dim=16, clusters=8, noise=0.3, seed=0):
    """Points around a few cluster centres; the two views are independent noisy copies."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 2.0
    base = centres[rng.integers(clusters, size=n)]
    def view():
        return (base + noise * rng.normal(size=base.shape)).astype(np.float32)

    return view(), view()


def _dataset(views, batch_size=32):
    return tf.data.Dataset.from_tensor_slices(views).batch(batch_size, drop_remainder=True)


def test_call_returns_backbone_features():
    backbone = _mlp()
    model = VICReg(backbone, projector="64-64-48")
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(), backbone(x, training=False).numpy())
    assert model.predict(x, verbose=0).shape == (5, 32)


def test_projector_is_built_from_the_spec():
    model = VICReg(_mlp(), projector="64-64-48")
    assert model.projector.built
    dense = [layer for layer in model.projector.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [64, 64, 48]
    assert not dense[-1].use_bias  # last layer linear, no bias, as in the paper


def test_short_fit_lowers_loss_and_keeps_std_away_from_zero():
    keras.utils.set_random_seed(0)
    model = VICReg(_mlp(), projector="64-64-64")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(_dataset(_cluster_views()), epochs=15, verbose=0).history
    assert set(history) == METRICS
    assert history["loss"][-1] < 0.85 * history["loss"][0]
    assert history["embedding_std"][-1] > 0.3
    assert all(math.isfinite(v) for v in history["loss"])


def test_test_step_reports_metrics_without_updating_weights():
    model = VICReg(_mlp(), projector="32-32")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [w.copy() for w in model.get_weights()]
    results = model.evaluate(_dataset(_cluster_views(64)), verbose=0, return_dict=True)
    assert set(results) == METRICS and all(math.isfinite(v) for v in results.values())
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_get_config_records_the_values_passed():
    model = VICReg(
        _mlp(), projector="40-20", invariance_weight=10.0, variance_weight=5.0,
        covariance_weight=2.0, gamma=0.5, eps=1e-3, sync_batchnorm=False,
    )
    config = model.get_config()
    assert config["projector"] == "40-20"
    assert (config["invariance_weight"], config["variance_weight"], config["covariance_weight"]) == (10.0, 5.0, 2.0)
    assert (config["gamma"], config["eps"], config["sync_batchnorm"]) == (0.5, 1e-3, False)
    clone = VICReg.from_config(config)
    assert clone.projector_spec == "40-20" and clone.gamma == 0.5


def test_keras_round_trip_gives_identical_embeddings_and_resumes(tmp_path):
    keras.utils.set_random_seed(1)
    model = VICReg(small_cnn((12, 12, 1), widths=(4, 8)), projector="32-32-16", variance_weight=20.0)
    model.compile(optimizer=LARS(learning_rate=0.05, weight_decay=1e-4))
    images = np.random.default_rng(2).uniform(size=(32, 12, 12, 1)).astype(np.float32)
    dataset = _dataset((images, images[:, :, ::-1]), batch_size=16)
    model.fit(dataset, epochs=1, verbose=0)
    path = tmp_path / "vicreg.keras"
    model.save(path)

    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, VICReg) and loaded.variance_weight == 20.0
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())
    np.testing.assert_array_equal(
        loaded.projector(loaded(images)).numpy(), model.projector(model(images)).numpy()
    )
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
    # The optimizer state came back too: one more step is the same on both.
    model.fit(dataset.take(1), epochs=1, verbose=0)
    loaded.fit(dataset.take(1), epochs=1, verbose=0)
    assert int(loaded.optimizer.iterations) == 3
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_backbone_batchnorm_is_synchronized():
    model = VICReg(_mlp(), projector="16-16")
    bns = [layer for layer in model.backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(bn.synchronized for bn in bns)


def _batchnorm_op_types(model, input_shape, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    fn = tf.function(lambda x: strategy.run(lambda y: model(y, training=True), args=(x,)))
    graph = fn.get_concrete_function(tf.TensorSpec(input_shape, tf.float32)).graph
    return {op.type for op in graph.get_operations() if "BatchNorm" in op.type}


def test_fused_batchnorm_trains_like_keras_batchnorm():
    # Two SGD steps: float rounding differs between the kernels (1e-5 here) and later steps amplify it.
    images = tf.random.stateless_uniform((32, 12, 12, 1), (1, 2))
    views = (images, tf.image.flip_left_right(images))
    keras.utils.set_random_seed(5)
    initial = VICReg(small_cnn((12, 12, 1), widths=(4, 8)), projector="16-16").get_weights()
    results = []
    for fused in (False, True):
        model = VICReg(small_cnn((12, 12, 1), widths=(4, 8)), projector="16-16", fused_batchnorm=fused)
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        model.fit(_dataset(views, 16), epochs=1, verbose=0)
        assert ("FusedBatchNormV3" in _batchnorm_op_types(model.backbone, (16, 12, 12, 1))) == fused
        results.append(model.get_weights())  # moving means and variances included
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert VICReg.from_config(model.get_config()).fused_batchnorm


def test_fused_batchnorm_keeps_synchronized_statistics_across_replicas():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = VICReg(_mlp(), projector="16-16")
    ops = _batchnorm_op_types(model.backbone, (8, 16), strategy)
    assert "FusedBatchNormV3" not in ops  # two replicas: Keras' all-reduced moments, not the fused kernel


def test_jit_compile_step_matches_eager_graph_step():
    views = _cluster_views(64)
    keras.utils.set_random_seed(3)
    initial = VICReg(_mlp(), projector="32-32").get_weights()
    results = []
    for jit in (False, True):
        model = VICReg(_mlp(), projector="32-32")
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
        model.fit(_dataset(views), epochs=1, verbose=0)
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_mixed_bfloat16_trains_with_float32_loss():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = VICReg(_mlp(), projector="32-32")
    assert model.projector.layers[0].compute_dtype == "bfloat16"
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(_dataset(_cluster_views(64)), epochs=2, verbose=0).history
    assert all(math.isfinite(v) for v in history["loss"])
    views = [tf.constant(v[:8]) for v in _cluster_views(8)]
    terms = model.compute_vicreg_terms(tuple(views))
    assert terms["loss"].dtype == tf.float32
    assert model.trainable_variables[0].dtype == "float32"


def test_heterogeneous_pair_with_a_second_backbone(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(64, 16)).astype(np.float32)
    b = np.concatenate([a, a], axis=1)[:, :24] + 0.1 * rng.normal(size=(64, 24)).astype(np.float32)
    model = VICReg(_mlp(16), projector="32-16", second_backbone=_mlp(24, width=20))
    assert model.second_projector is not model.projector
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(_dataset((a, b)), epochs=2, verbose=0).history
    assert all(math.isfinite(v) for v in history["loss"])
    model.save(tmp_path / "hetero.keras")
    loaded = keras.saving.load_model(tmp_path / "hetero.keras")
    np.testing.assert_array_equal(loaded.second_backbone(b[:4]).numpy(), model.second_backbone(b[:4]).numpy())


def test_labels_after_the_views_are_ignored():
    views = _cluster_views(64)
    labels = np.zeros(64, np.int32)
    model = VICReg(_mlp(), projector="32-32")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    dataset = tf.data.Dataset.from_tensor_slices((views, labels)).batch(32)
    history = model.fit(dataset, epochs=1, verbose=0).history
    assert set(history) == METRICS


def test_train_on_batch_and_test_on_batch_take_a_pair_of_views():
    view_a, view_b = _cluster_views(32)
    model = VICReg(_mlp(), projector="32-32")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    before = [w.copy() for w in model.backbone.get_weights()]
    logs = model.train_on_batch((view_a, view_b), return_dict=True)
    assert set(logs) == METRICS and math.isfinite(logs["loss"])
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.backbone.get_weights()))
    evaluated = model.test_on_batch((view_a, view_b), return_dict=True)
    assert set(evaluated) == METRICS


# -- bad input ---------------------------------------------------------------------------


def _compiled(**kwargs):
    model = VICReg(_mlp(), projector="32-32")
    model.compile(optimizer=keras.optimizers.SGD(0.01), **kwargs)
    return model


def test_batch_of_one_pair_raises():
    views = _cluster_views(1)
    with pytest.raises(ValueError, match="batch of 1"):
        _compiled().fit(_dataset(views, batch_size=1), verbose=0)


def test_views_of_different_batch_sizes_raise():
    a, b = _cluster_views(32)
    dataset = tf.data.Dataset.from_tensors((a, b[:16]))
    with pytest.raises(ValueError, match=r"same batch size.*\(32, 16\).*\(16, 16\)"):
        _compiled().fit(dataset, verbose=0)


def test_views_of_different_shapes_raise():
    model = VICReg(small_cnn((8, 8, 1), widths=(4,)), projector="16-16")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    dataset = tf.data.Dataset.from_tensors((np.zeros((4, 8, 8, 1), np.float32), np.zeros((4, 9, 9, 1), np.float32)))
    with pytest.raises(ValueError, match=r"same shape.*\(4, 8, 8, 1\).*\(4, 9, 9, 1\)"):
        model.fit(dataset, verbose=0)


def test_a_single_tensor_instead_of_two_views_raises():
    dataset = tf.data.Dataset.from_tensors(np.zeros((3, 4, 16), np.float32))
    with pytest.raises(ValueError, match="two views"):
        _compiled().fit(dataset, verbose=0)


@pytest.mark.parametrize("spec", ["8192-x-8192", "", "64--64", "-5", "0-8"])
def test_projector_spec_that_does_not_parse_raises(spec):
    with pytest.raises(ValueError, match=f"projector spec {spec!r} does not parse"):
        VICReg(_mlp(), projector=spec)


def test_projector_of_wrong_type_raises():
    with pytest.raises(TypeError, match="spec string"):
        VICReg(_mlp(), projector=[8192, 8192])


def _nan_views():
    a, b = _cluster_views(64)
    a[5, 3] = np.nan
    return a, b


def _nan_image_batch(size=16):
    images = np.random.default_rng(0).uniform(size=(size, 28, 28, 1)).astype(np.float32)
    bad = images.copy()
    bad[3, 10, 10, 0] = np.nan
    return tf.data.Dataset.from_tensors((bad, images)).repeat()


def _weights_and_state(model):
    values = [v.numpy().copy() for v in model.weights]
    if model.optimizer is not None and model.optimizer.built:
        values += [v.numpy().copy() for v in model.optimizer.variables]
    return values


def _assert_bitwise_equal(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused_bn", "keras_bn"])
def test_nan_input_pixel_stops_on_the_first_step_and_leaves_every_weight_unchanged(jit_compile, fused):
    # Issue 18's reproduction: with oneDNN's fused BatchNorm the loss stays finite
    # (24.75, full collapse) while the gradients are NaN.
    keras.utils.set_random_seed(0)
    model = VICReg(small_cnn((28, 28, 1), widths=(4, 8)), projector="32-32", fused_batchnorm=fused)
    model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=jit_compile)
    model.optimizer.build(model.trainable_variables)
    before = _weights_and_state(model)
    error = FloatingPointError if jit_compile else tf.errors.InvalidArgumentError
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(batch))
    with pytest.raises(error, match="not finite"):
        model.fit(_nan_image_batch(), epochs=2, steps_per_epoch=2, verbose=0,
                  callbacks=[record, StopOnNonFiniteLoss()])
    assert seen in ([], [0])  # stopped on the first step
    _assert_bitwise_equal(before, _weights_and_state(model))
    assert int(model.optimizer.iterations.numpy()) == 0


def test_nan_on_one_replica_skips_the_step_on_every_replica(two_cpu_strategy):
    with two_cpu_strategy.scope():
        keras.utils.set_random_seed(0)
        model = VICReg(small_cnn((28, 28, 1), widths=(4, 8)), projector="32-32")
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        model.optimizer.build(model.trainable_variables)
    before = _weights_and_state(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not finite"):
        model.fit(_nan_image_batch(), epochs=1, steps_per_epoch=2, verbose=0)
    _assert_bitwise_equal(before, _weights_and_state(model))


def test_a_diverging_learning_rate_stops_before_weights_become_non_finite():
    keras.utils.set_random_seed(0)
    model = VICReg(small_cnn((28, 28, 1), widths=(4, 8)), projector="32-32")
    model.compile(optimizer=keras.optimizers.Adam(1e3))
    images = np.random.default_rng(1).uniform(size=(16, 28, 28, 1)).astype(np.float32)
    data = tf.data.Dataset.from_tensors((images, images[::-1].copy())).repeat()
    with pytest.raises(tf.errors.InvalidArgumentError, match="not finite"):
        model.fit(data, epochs=1, steps_per_epoch=200, verbose=0)
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


def test_finite_steps_still_train_under_the_guard():
    model = _compiled()
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(_dataset(_cluster_views(64)), epochs=1, verbose=0).history
    assert math.isfinite(history["loss"][0])
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, model.trainable_weights))


def _small_model(**compile_kwargs):
    keras.utils.set_random_seed(0)
    model = VICReg(small_cnn((28, 28, 1), widths=(4, 8)), projector="32-32")
    model.compile(optimizer=keras.optimizers.SGD(0.01), **compile_kwargs)
    return model


def _images(n):
    return np.random.default_rng(0).uniform(size=(n, 28, 28, 1)).astype(np.float32)


def test_views_of_different_batch_sizes_known_only_when_running_raise_naming_both():
    a = _images(32)
    dataset = tf.data.Dataset.from_tensor_slices((a, a)).batch(16).map(lambda x, y: (x, y[:12]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)same batch size.*16.*12"):
        _small_model().fit(dataset, verbose=0)


def test_a_last_batch_of_one_inside_the_compiled_step_says_drop_remainder():
    a = _images(17)
    dataset = tf.data.Dataset.from_tensor_slices((a, a)).batch(16)  # the last batch holds 1 pair
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch of 1.*drop_remainder=True"):
        _small_model().fit(dataset, verbose=0)


def test_runtime_view_checks_compile_under_xla():
    a = _images(32)
    dataset = tf.data.Dataset.from_tensor_slices((a, a)).batch(16)
    history = _small_model(jit_compile=True).fit(dataset, verbose=0).history
    assert math.isfinite(history["loss"][0])


@pytest.mark.parametrize("entry", ["call", "predict", "fit"])
def test_uint8_images_raise_saying_divide_by_255(entry):
    model = _small_model()
    images = (_images(16) * 255).astype(np.uint8)
    run = {
        "call": lambda: model(images),
        "predict": lambda: model.predict(images, verbose=0),
        "fit": lambda: model.fit(tf.data.Dataset.from_tensors((images, images)), verbose=0),
    }[entry]
    with pytest.raises(TypeError, match=r"float images in \[0, 1\], got uint8.*divide by 255"):
        run()


def test_a_single_image_without_batch_axis_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(None, 28, 28, 1\), got shape \(28, 28, 1\)"):
        _small_model()(_images(1)[0])


# --------------------------------------------------------------------------- backbone kinds (issue 24)


@keras.saving.register_keras_serializable(package="vicreg_tf_tests")
class SubclassedEncoder(keras.Model):
    def __init__(self, width=16, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.dense = keras.layers.Dense(width)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x, training=False):
        return keras.ops.relu(self.norm(self.dense(x), training=training))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def _token_encoder():
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(50, 8)(tokens)
    return keras.Model(tokens, keras.layers.Dense(16)(keras.layers.GlobalAveragePooling1D()(x)))


def _vector_views(n=32, dim=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x, (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)


def _backbone_kinds():
    images = np.random.default_rng(1).uniform(size=(16, 32, 32, 3)).astype(np.float32)
    tokens = np.random.default_rng(2).integers(0, 50, (16, 6)).astype(np.int32)
    vectors = _vector_views()
    return {
        "functional": (lambda: _mlp(20, 16), {}, vectors),
        "sequential": (lambda: keras.Sequential([keras.Input((20,)), keras.layers.Dense(16)]), {}, vectors),
        "sequential_without_input": (lambda: keras.Sequential([keras.layers.Dense(16)]), {}, vectors),
        "subclassed": (lambda: SubclassedEncoder(16), {}, vectors),
        "keras_applications": (
            lambda: keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), include_top=False, weights=None,
                                                        pooling="avg", include_preprocessing=False, minimalistic=True),
            {}, (images, images[::-1].copy())),
        "second_modality_vectors": (
            lambda: small_cnn((32, 32, 3), widths=(4, 8)), {"second_backbone": lambda: _mlp(20, 16)},
            (images, vectors[0][:16])),
        "second_modality_token_ids": (
            lambda: small_cnn((32, 32, 3), widths=(4, 8)), {"second_backbone": _token_encoder}, (images, tokens)),
    }


@pytest.mark.parametrize("kind", list(_backbone_kinds()))
def test_every_kind_of_backbone_fits_saves_and_reloads(kind, tmp_path):
    make_backbone, extra, views = _backbone_kinds()[kind]
    keras.utils.set_random_seed(0)
    model = VICReg(make_backbone(), projector="32-32", **{k: v() for k, v in extra.items()})
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    dataset = tf.data.Dataset.from_tensors(views).repeat()
    history = model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0).history
    assert math.isfinite(history["loss"][-1]), history
    assert int(model.optimizer.iterations.numpy()) == 2  # applied, not skipped
    features = model.predict(views[0][:4], verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(views[0][:4], verbose=0), features, rtol=1e-5, atol=1e-6)
    if "second_backbone" in extra:
        assert reloaded.second_backbone is not None
    reloaded.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert math.isfinite(reloaded.fit(dataset, steps_per_epoch=1, verbose=0).history["loss"][0])


def test_grayscale_batch_without_channel_axis_is_told_to_add_one():
    model = VICReg(small_cnn((28, 28, 1), widths=(4, 8)), projector="16-16")
    with pytest.raises(ValueError, match=r"add one: x\[\.\.\., None\]"):
        model(np.zeros((4, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"add a batch axis: x\[None\]"):
        VICReg(small_cnn((28, 28, 3), widths=(4, 8)), projector="16-16")(np.zeros((28, 28, 3), np.float32))
