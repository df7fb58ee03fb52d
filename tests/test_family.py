"""The VICReg family: the variance-covariance regularizer, SimSiam, BYOL, the entropy variants."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_model import _cluster_views, _dataset, _mlp  # the toy data and encoder VICReg's tests use

from vicreg_tf import (
    BYOL,
    EntropyVICReg,
    SimSiam,
    VarianceCovarianceRegularizer,
    logdet_entropy,
    negative_cosine_similarity,
    pairwise_entropy,
    variance_covariance_regularizer,
    vicreg_loss,
)
from vicreg_tf.losses import entropy_loss
from vicreg_tf.methods import METHODS, byol_target_decay

# -- NumPy float64 references ---------------------------------------------------------


def logdet_entropy_numpy(z, beta):
    z = np.asarray(z, np.float64)
    cov = np.cov(z, rowvar=False, ddof=1)
    return 0.5 * np.linalg.slogdet(cov + beta * np.eye(z.shape[1]))[1]


def pairwise_entropy_numpy(z, width):
    z = np.asarray(z, np.float64)
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * width**2))
    return -np.mean(np.log(k.mean(axis=1)))


# -- the regularizer --------------------------------------------------------------------


def test_regularizer_equals_vicreg_loss_variance_and_covariance_terms(rng):
    z_a = (0.7 * rng.normal(size=(16, 24))).astype(np.float32)
    z_b = (z_a + 0.3 * rng.normal(size=(16, 24))).astype(np.float32)
    reference = vicreg_loss(z_a, z_b)
    a, b = variance_covariance_regularizer(z_a, 2.0, 0.5), variance_covariance_regularizer(z_b, 2.0, 0.5)
    np.testing.assert_allclose(0.5 * (a["variance"] + b["variance"]), reference["variance"], rtol=1e-6)
    np.testing.assert_allclose(a["covariance"] + b["covariance"], reference["covariance"], rtol=1e-6)
    # VICReg's pair convention: one branch's share, mu / 2 * variance + nu * covariance.
    np.testing.assert_allclose(a["loss"], 0.5 * 2.0 * a["variance"] + 0.5 * a["covariance"], rtol=1e-6)


def test_regularizer_layer_passes_through_and_adds_its_loss_only_in_training(rng):
    z = rng.normal(size=(8, 6)).astype(np.float32)
    layer = VarianceCovarianceRegularizer(variance_weight=3.0, covariance_weight=0.1)
    np.testing.assert_array_equal(layer(z).numpy(), z)
    assert layer.losses == []
    layer(z, training=True)
    expected = variance_covariance_regularizer(z, 3.0, 0.1)["loss"]
    np.testing.assert_allclose(float(layer.losses[0]), float(expected), rtol=1e-6)
    clone = VarianceCovarianceRegularizer.from_config(layer.get_config())
    assert (clone.variance_weight, clone.covariance_weight) == (3.0, 0.1)


def _regularized_dense_step(strategy, x, initial):
    with strategy.scope():
        inputs = keras.Input((16,))
        z = VarianceCovarianceRegularizer(variance_weight=1.0, covariance_weight=0.5)(keras.layers.Dense(8)(inputs))
        model = keras.Model(inputs, z)
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.5))  # the regularizer is the only loss
    model.fit(tf.data.Dataset.from_tensors(x), epochs=1, verbose=0)
    return model.get_weights()


def test_regularizer_layer_step_on_two_replicas_equals_one_device(two_cpu_strategy, rng):
    x = (0.3 * rng.normal(size=(16, 16))).astype(np.float32)  # std < 1: the variance hinge is active
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(8)
    dense.build((None, 16))
    initial = dense.get_weights()
    one = _regularized_dense_step(tf.distribute.get_strategy(), x, initial)
    two = _regularized_dense_step(two_cpu_strategy, x, initial)
    assert np.abs(one[0] - initial[0]).max() > 1e-3  # the step did something
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_negative_cosine_similarity_stops_the_gradient_into_the_target(rng):
    p = tf.constant(rng.normal(size=(4, 5)), tf.float32)
    z = tf.constant(rng.normal(size=(4, 5)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([p, z])
        value = negative_cosine_similarity(p, z)
    assert tape.gradient(value, z) is None and tape.gradient(value, p) is not None
    np.testing.assert_allclose(float(negative_cosine_similarity(z, z)), -1.0, rtol=1e-6)


# -- the entropy estimators ----------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(32, 8), (6, 16), (12, 12)], ids=["N>D", "N<D", "N=D"])
def test_logdet_entropy_equals_numpy_float64_reference(rng, n, d):
    z = rng.normal(size=(n, d)).astype(np.float32)
    np.testing.assert_allclose(float(logdet_entropy(z, beta=1e-3)), logdet_entropy_numpy(z, 1e-3), rtol=1e-5)


def test_logdet_gradient_is_finite_and_correct_for_a_rank_deficient_batch(rng):
    n, d, beta = 5, 12, 1e-2  # rank of the covariance: 4 of 12
    z = rng.normal(size=(n, d))
    variable = tf.Variable(z.astype(np.float32))
    with tf.GradientTape() as tape:
        value = logdet_entropy(variable, beta=beta)
    gradient = tape.gradient(value, variable).numpy()
    centred = z - z.mean(0)
    covariance = centred.T @ centred / (n - 1)
    expected = centred @ np.linalg.inv(covariance + beta * np.eye(d)) / (n - 1)  # d/dZ 1/2 log det
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)


def test_pairwise_entropy_equals_numpy_reference(rng):
    z = rng.normal(size=(10, 6)).astype(np.float32)
    for width in (0.7, 2.0, 5.0):
        np.testing.assert_allclose(float(pairwise_entropy(z, width)), pairwise_entropy_numpy(z, width), rtol=1e-5)


def test_pairwise_entropy_lies_between_zero_and_log_n(rng):
    assert abs(float(pairwise_entropy(np.ones((8, 4), np.float32), 1.0))) < 1e-6
    far = 100.0 * rng.normal(size=(8, 4)).astype(np.float32)
    np.testing.assert_allclose(float(pairwise_entropy(far, 1.0)), math.log(8), rtol=1e-6)


@pytest.mark.parametrize("entropy", ["logdet", "pairwise"])
def test_entropy_loss_is_invariance_minus_weighted_mean_entropy_and_symmetric(rng, entropy):
    z_a = rng.normal(size=(16, 8)).astype(np.float32)
    z_b = (z_a + 0.2 * rng.normal(size=(16, 8))).astype(np.float32)
    terms = entropy_loss(z_a, z_b, entropy=entropy, invariance_weight=3.0, entropy_weight=0.5)
    swapped = entropy_loss(z_b, z_a, entropy=entropy, invariance_weight=3.0, entropy_weight=0.5)
    if entropy == "logdet":
        h = [logdet_entropy_numpy(z, 1e-3) for z in (z_a, z_b)]
    else:
        h = [pairwise_entropy_numpy(z, math.sqrt(8)) for z in (z_a, z_b)]
    mse = np.mean((z_a.astype(np.float64) - z_b) ** 2)
    np.testing.assert_allclose(float(terms["loss"]), 3.0 * mse - 0.5 * np.mean(h), rtol=1e-5)
    for key in terms:
        np.testing.assert_allclose(float(terms[key]), float(swapped[key]), rtol=1e-6)


# -- SimSiam and BYOL --------------------------------------------------------------------------


def _family(method, **kwargs):
    if method == "simsiam":
        return SimSiam(_mlp(), projector="32-32", predictor="16", **kwargs)
    if method == "byol":
        return BYOL(_mlp(), projector="32-32", predictor="16", **kwargs)
    return EntropyVICReg(_mlp(), projector="32-32", entropy=method, **kwargs)


@pytest.mark.parametrize("method,term", [
    ("simsiam", "negative_cosine"), ("byol", "negative_cosine"), ("logdet", "entropy"), ("pairwise", "entropy"),
])
def test_a_few_steps_lower_the_loss_on_cluster_data(method, term):
    keras.utils.set_random_seed(0)
    kwargs = {"total_steps": 40} if method == "byol" else {}
    model = _family(method, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(_dataset(_cluster_views()), epochs=5, verbose=0).history
    assert set(history) >= {"loss", term, "variance", "covariance", "embedding_std"}
    assert all(math.isfinite(v) for v in history["loss"])
    assert history["loss"][-1] < history["loss"][0]
    assert history["embedding_std"][-1] > 0.05


@pytest.mark.parametrize("method", ["simsiam", "byol", "logdet", "pairwise"])
def test_loss_terms_are_symmetric_in_the_two_views(method):
    keras.utils.set_random_seed(5)
    regularized = {"variance_weight": 1.0, "covariance_weight": 0.01}
    model = _family(method, **(regularized if method in ("simsiam", "byol") else {}))
    a, b = (tf.constant(v[:16]) for v in _cluster_views(16))
    ab, ba = model.compute_vicreg_terms((a, b)), model.compute_vicreg_terms((b, a))
    for key in ab:
        np.testing.assert_allclose(float(ab[key]), float(ba[key]), rtol=1e-5, atol=1e-6, err_msg=key)


def test_simsiam_target_branch_receives_no_gradient():
    keras.utils.set_random_seed(1)
    model = SimSiam(_mlp(), projector="32-32", predictor="16", fused_batchnorm=False)
    views = tuple(tf.constant(v[:16]) for v in _cluster_views(16))
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = model.compute_vicreg_terms(views, training=True)["loss"]
    gradients = tape.gradient(loss, variables)
    # The same loss with the targets as constants: equal gradients mean none flowed through them.
    z_a, z_b = [tf.constant(z.numpy()) for z in model.embed(*views, training=True)]
    with tf.GradientTape() as tape:
        online_a, online_b = model.embed(*views, training=True)
        p_a, p_b = model.predictor(online_a, training=True), model.predictor(online_b, training=True)
        constant = 0.5 * (negative_cosine_similarity(p_a, z_b) + negative_cosine_similarity(p_b, z_a))
    for g, h in zip(gradients, tape.gradient(constant, variables)):
        np.testing.assert_allclose(g.numpy(), h.numpy(), atol=1e-6)


def test_byol_target_is_not_trainable_and_gets_no_gradient():
    model = BYOL(_mlp(), projector="32-32", predictor="16")
    target = model.target_backbone.weights + model.target_projector.weights
    trainable = {id(v) for v in model.trainable_variables}
    assert target and not any(id(v) in trainable for v in target)
    views = tuple(tf.constant(v[:16]) for v in _cluster_views(16))
    with tf.GradientTape() as tape:
        tape.watch([v.value for v in target])
        loss = model.compute_vicreg_terms(views, training=True)["loss"]
    assert all(g is None for g in tape.gradient(loss, [v.value for v in target]))


def _target_and_online(model):
    return ([t.numpy().copy() for t, _ in model._ema_pairs], [o.numpy().copy() for _, o in model._ema_pairs])


def test_byol_ema_moves_toward_the_online_weights_by_tau_at_step_k():
    keras.utils.set_random_seed(2)
    total, tau_base = 4, 0.9
    model = BYOL(_mlp(), projector="32-32", predictor="16", tau_base=tau_base, total_steps=total)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    views = tuple(v[:32] for v in _cluster_views(32))
    for k in range(3):
        target_before, _ = _target_and_online(model)
        model.train_on_batch(views)
        target_after, online_after = _target_and_online(model)
        tau = 1 - (1 - tau_base) * (math.cos(math.pi * k / total) + 1) / 2
        np.testing.assert_allclose(float(byol_target_decay(k, total, tau_base)), tau, rtol=1e-6)
        moved = [np.abs(a - b).max() for a, b in zip(target_before, target_after)]
        assert max(moved) > 1e-4
        for before, after, online in zip(target_before, target_after, online_after):
            np.testing.assert_allclose(after, tau * before + (1 - tau) * online, atol=1e-6)


def test_byol_skipped_step_leaves_the_target_unchanged():
    model = BYOL(_mlp(), projector="32-32", predictor="16", total_steps=10)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    a, b = _cluster_views(32)
    a[3, 2] = np.nan
    before, _ = _target_and_online(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not finite"):
        model.fit(_dataset((a, b)), epochs=1, verbose=0)
    for x, y in zip(before, _target_and_online(model)[0]):
        np.testing.assert_array_equal(x, y)
    assert int(model.optimizer.iterations) == 0


def _byol_one_step(strategy, initial, views):
    with strategy.scope():
        model = BYOL(_mlp(), projector="32-16", predictor="8", total_steps=10, variance_weight=1.0,
                     covariance_weight=0.01, fused_batchnorm=False)
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(tf.data.Dataset.from_tensors(views), epochs=1, verbose=0)
    return model.get_weights()  # online, predictor, target, BatchNorm statistics


def test_byol_with_regularizer_step_on_two_replicas_equals_one_device(two_cpu_strategy):
    views = tuple(v[:16] for v in _cluster_views(16))
    keras.utils.set_random_seed(3)
    initial = BYOL(_mlp(), projector="32-16", predictor="8").get_weights()
    one = _byol_one_step(tf.distribute.get_strategy(), initial, views)
    two = _byol_one_step(two_cpu_strategy, initial, views)
    assert max(np.abs(a - b).max() for a, b in zip(one, initial)) > 1e-3
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_simsiam_without_predictor():
    model = SimSiam(_mlp(), projector="32-32", predictor=None, variance_weight=1.0)
    assert model.predictor is None and SimSiam.from_config(model.get_config()).predictor is None
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    history = model.fit(_dataset(_cluster_views(64)), epochs=1, verbose=0).history
    assert math.isfinite(history["loss"][0])


# -- the trainer ------------------------------------------------------------------------------------


def _tiny_config(method):
    from configs import tiny

    config = tiny.get_config()
    config.model.method = method
    config.data.image_size = 12
    return config


@pytest.mark.parametrize("method", METHODS)
def test_trainer_builds_each_method_from_config(method):
    from trainers import build

    expected = {"vicreg": "VICReg", "simsiam": "SimSiam", "byol": "BYOL", "logdet": "EntropyVICReg",
                "pairwise": "EntropyVICReg"}[method]
    model = build.make_model(_tiny_config(method), total_steps=12)
    assert type(model).__name__ == expected
    if method == "byol":
        assert model.total_steps == 12 and model.tau_base == 0.996
    if method in ("logdet", "pairwise"):
        assert model.entropy == method and model.entropy_weight is None


def test_trainer_rejects_an_unknown_method_listing_the_valid_ones():
    from trainers import build

    with pytest.raises(ValueError, match="unknown model.method 'barlow'.*vicreg, simsiam, byol, logdet, pairwise"):
        build.make_model(_tiny_config("barlow"))


@pytest.mark.parametrize("name,method", [
    ("fashion_mnist_simsiam", "simsiam"), ("fashion_mnist_byol", "byol"), ("fashion_mnist_logdet", "logdet"),
])
def test_family_configs_select_their_method(name, method):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.model.method == method and config.experiment == name


def test_vicreg_train_runs_simsiam_from_the_command_line(tmp_path):
    from conftest import run_python

    result = run_python(
        ["-m", "trainers.pretrain", "--config=tiny", "--config.model.method=simsiam",
         "--config.export.enabled=False", "--config.eval.knn_max_eval=256", f"--workdir={tmp_path}"],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert "negative_cosine" in log[0] and len(log) == 3  # header + 2 epochs
    assert (tmp_path / "backbone.keras").exists()


# -- issue 23: one convention, the papers' scales, the official builders ------------------------


def test_regularizer_layer_on_both_views_adds_what_simsiam_adds_for_the_same_weights(rng):
    from vicreg_tf.methods import _regularizer_terms

    z_a = (0.5 * rng.normal(size=(16, 8))).astype(np.float32)
    z_b = (0.5 * rng.normal(size=(16, 8))).astype(np.float32)
    layer = VarianceCovarianceRegularizer(variance_weight=2.0, covariance_weight=0.3)
    added = []
    for z in (z_a, z_b):  # Keras keeps the losses of the last call only
        layer(z, training=True)
        added.append(float(layer.losses[0]))
    variance, covariance = _regularizer_terms(tf.constant(z_a), tf.constant(z_b), 1.0, 1e-4)
    np.testing.assert_allclose(sum(added), 2.0 * float(variance) + 0.3 * float(covariance), rtol=1e-6)


def test_byol_loss_is_the_papers_sum_of_two_minus_two_cos_over_both_directions():
    keras.utils.set_random_seed(0)
    model = BYOL(_mlp(), projector="16-8", predictor="8", total_steps=10)
    a, b = _cluster_views(16)
    terms = model.compute_vicreg_terms((a, b), training=False)
    p_a = model.predictor(model.projector(model.backbone(a)))
    p_b = model.predictor(model.projector(model.backbone(b)))
    t_a = model.target_projector(model.target_backbone(a))
    t_b = model.target_projector(model.target_backbone(b))

    def two_minus_two_cos(p, t):
        p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
        cos = (p * t).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(t, axis=1)
        return np.mean(2.0 - 2.0 * cos)

    expected = two_minus_two_cos(p_a, t_b) + two_minus_two_cos(p_b, t_a)
    np.testing.assert_allclose(float(terms["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss"]), 4.0 + 4.0 * float(terms["negative_cosine"]), rtol=1e-5)


def test_simsiam_has_the_official_output_batchnorm_and_predictor_bias():
    model = SimSiam(_mlp(), projector="16-8", predictor="4")
    last = model.projector.layers[-1]
    assert isinstance(last, keras.layers.BatchNormalization) and not last.center and not last.scale
    assert not model.projector.layers[-2].use_bias  # Dense without bias before the affine-free BN
    assert model.predictor.layers[-1].use_bias
    config = model.get_config()
    assert config["output_batchnorm"] and config["predictor_bias"]
    z = model.projector(np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32), training=True)
    np.testing.assert_allclose(np.mean(z.numpy(), axis=0), 0.0, atol=1e-5)  # normalised output


def test_byol_without_total_steps_warns_in_fit():
    model = BYOL(_mlp(), projector="16-8", predictor="8")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    with pytest.warns(UserWarning, match="total_steps=0"):
        model.fit(_dataset(_cluster_views(32)), epochs=1, verbose=0)


@pytest.mark.parametrize("method", ["simsiam", "logdet"])
def test_family_configs_keep_device_views_and_second_backbone(method, tmp_path):
    from vicreg_tf import augment
    from vicreg_tf.backbones import small_cnn

    views = augment.grayscale_views(16, seed=3)
    kwargs = dict(device_views=views, second_backbone=small_cnn((16, 16, 1), widths=(4, 8)))
    if method == "simsiam":
        model = SimSiam(small_cnn((16, 16, 1), widths=(4, 8)), projector="16-8", predictor="4", **kwargs)
    else:
        model = EntropyVICReg(small_cnn((16, 16, 1), widths=(4, 8)), projector="16-8", **kwargs)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert reloaded.device_views is not None and reloaded.device_views.get_config()["seed"] == 3
    assert reloaded.second_backbone is not None


def _logdet_float64(z, beta):  # the computation before 2026-12-02: everything in float64
    z = tf.cast(z, tf.float64)
    n, d = z.shape
    a = (z - tf.reduce_mean(z, 0, keepdims=True)) / math.sqrt(n - 1)
    gram = tf.matmul(a, a, transpose_b=True) if n < d else tf.matmul(a, a, transpose_a=True)
    chol = tf.linalg.cholesky(gram + beta * tf.eye(min(n, d), dtype=tf.float64))
    extra = (d - n) * math.log(beta) if n < d else 0.0
    return 0.5 * (2.0 * float(tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)))) + extra)


@pytest.mark.parametrize("n,d", [(64, 16), (16, 64)])
def test_entropy_estimators_from_a_float32_gram_match_float64_within_1e_5(rng, n, d):
    z = (1.0 + rng.normal(size=(n, d))).astype(np.float32)  # an offset: centring must come before the product
    np.testing.assert_allclose(float(logdet_entropy(z, 1e-3)), _logdet_float64(z, 1e-3), rtol=1e-5, atol=1e-5)
    width = math.sqrt(d)
    np.testing.assert_allclose(float(pairwise_entropy(z, width)), pairwise_entropy_numpy(z, width),
                               rtol=1e-5, atol=1e-5)


def test_methods_registry_builds_every_method_by_name():
    import importlib

    from trainers import build

    config = importlib.import_module("configs.tiny").get_config()
    names = {"vicreg": "VICReg", "simsiam": "SimSiam", "byol": "BYOL"}
    for name in METHODS:
        config.model.method = name
        model = build.make_model(config, total_steps=4)
        assert model.metric_names[0] == "loss" and "embedding_std" in model.metric_names, name
        assert type(model).__name__ == names.get(name, "EntropyVICReg"), name
