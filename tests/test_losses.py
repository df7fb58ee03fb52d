"""The VICReg loss against a float64 NumPy port of the official formula."""
import numpy as np
import pytest
import tensorflow as tf

from vicreg_tf import covariance_loss, invariance_loss, variance_loss, vicreg_loss


def official_vicreg_numpy(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """Verbatim port of VICReg.forward in facebookresearch/vicreg main_vicreg.py
    (commit b42aa2327afe19773b4fbd7d3bcb46a9af1e4367), one replica, float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    batch_size, num_features = x.shape
    repr_loss = np.mean((x - y) ** 2)  # F.mse_loss(x, y)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    std_x = np.sqrt(x.var(axis=0, ddof=1) + 0.0001)
    std_y = np.sqrt(y.var(axis=0, ddof=1) + 0.0001)
    std_loss = np.mean(np.maximum(1 - std_x, 0)) / 2 + np.mean(np.maximum(1 - std_y, 0)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)

    def off_diagonal(m):
        return m[~np.eye(m.shape[0], dtype=bool)]

    cov_loss = (off_diagonal(cov_x) ** 2).sum() / num_features + (
        off_diagonal(cov_y) ** 2
    ).sum() / num_features
    loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
    return {"loss": loss, "invariance": repr_loss, "variance": std_loss, "covariance": cov_loss}


def textbook_covariance(z):
    """Covariance term with the D x D matrix and an explicit off-diagonal mask."""
    z = tf.cast(z, tf.float32)
    n, d = z.shape
    z = z - tf.reduce_mean(z, axis=0)
    cov = tf.matmul(z, z, transpose_a=True) / (n - 1)
    off = cov * (1.0 - tf.eye(d))
    return tf.reduce_sum(tf.square(off)) / d


def _pair(rng, n, d, scale=1.0):
    z_a = rng.normal(size=(n, d)) * scale
    z_b = z_a + 0.3 * rng.normal(size=(n, d))
    return z_a.astype(np.float32), z_b.astype(np.float32)


@pytest.mark.parametrize("n,d", [(8, 32), (64, 16), (24, 24)], ids=["N<D", "N>D", "N=D"])
def test_matches_official_formula(rng, n, d):
    # scale < 1 so the variance hinge is active for most dimensions
    z_a, z_b = _pair(rng, n, d, scale=0.7)
    ours = {k: float(v) for k, v in vicreg_loss(z_a, z_b).items()}
    reference = official_vicreg_numpy(z_a, z_b)
    for key in reference:
        np.testing.assert_allclose(ours[key], reference[key], rtol=1e-5, err_msg=key)


def test_weights_are_applied(rng):
    z_a, z_b = _pair(rng, 16, 8)
    ours = vicreg_loss(z_a, z_b, invariance_weight=2.0, variance_weight=3.0, covariance_weight=5.0)
    reference = official_vicreg_numpy(z_a, z_b, 2.0, 3.0, 5.0)
    np.testing.assert_allclose(float(ours["loss"]), reference["loss"], rtol=1e-5)


def test_symmetric_in_the_two_views(rng):
    z_a, z_b = _pair(rng, 16, 32)
    ab, ba = vicreg_loss(z_a, z_b), vicreg_loss(z_b, z_a)
    for key in ab:
        np.testing.assert_allclose(float(ab[key]), float(ba[key]), rtol=1e-6, err_msg=key)


def test_identical_views_have_zero_invariance(rng):
    z, _ = _pair(rng, 16, 8)
    assert float(vicreg_loss(z, z)["invariance"]) == 0.0


def test_constant_embeddings_give_maximal_variance_term():
    z = np.full((10, 6), 3.0, np.float32)
    gamma, eps = 1.0, 1e-4
    expected = gamma - np.sqrt(eps)
    np.testing.assert_allclose(float(variance_loss(z, gamma, eps)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(vicreg_loss(z, z)["variance"]), expected, rtol=1e-6)
    assert float(covariance_loss(z)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n,d", [(8, 32), (40, 12)], ids=["N<D", "N>D"])
def test_covariance_value_and_gradient_equal_textbook_form(rng, n, d):
    z = tf.constant(rng.normal(size=(n, d)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        fast = covariance_loss(z)
        textbook = textbook_covariance(z)
    np.testing.assert_allclose(float(fast), float(textbook), rtol=1e-5)
    np.testing.assert_allclose(
        tape.gradient(fast, z).numpy(), tape.gradient(textbook, z).numpy(), rtol=1e-4, atol=1e-6
    )


def test_covariance_with_unknown_static_shape_matches(rng):
    z = rng.normal(size=(6, 20)).astype(np.float32)
    fn = tf.function(covariance_loss, input_signature=[tf.TensorSpec((None, None), tf.float32)])
    np.testing.assert_allclose(float(fn(z)), float(textbook_covariance(z)), rtol=1e-5)


def test_loss_is_float32_under_low_precision_inputs(rng):
    z_a, z_b = _pair(rng, 16, 8)
    terms = vicreg_loss(tf.cast(z_a, tf.bfloat16), tf.cast(z_b, tf.bfloat16))
    assert all(v.dtype == tf.float32 for v in terms.values())
    reference = official_vicreg_numpy(
        tf.cast(tf.cast(z_a, tf.bfloat16), tf.float32), tf.cast(tf.cast(z_b, tf.bfloat16), tf.float32)
    )
    np.testing.assert_allclose(float(terms["loss"]), reference["loss"], rtol=1e-5)


def test_batch_of_one_raises():
    z = np.ones((1, 8), np.float32)
    with pytest.raises(ValueError, match="batch of 1"):
        vicreg_loss(z, z)


def test_batch_of_one_raises_when_shape_is_dynamic():
    fn = tf.function(variance_loss, input_signature=[tf.TensorSpec((None, 4), tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least 2"):
        fn(np.ones((1, 4), np.float32))


def test_mismatched_shapes_raise(rng):
    with pytest.raises(ValueError, match=r"same shape.*\(8, 4\).*\(6, 4\)"):
        invariance_loss(np.ones((8, 4), np.float32), np.ones((6, 4), np.float32))


def test_non_matrix_embeddings_raise():
    with pytest.raises(ValueError, match="2-D"):
        vicreg_loss(np.ones((4, 2, 2), np.float32), np.ones((4, 2, 2), np.float32))
