"""LARS and the warmup + cosine schedule against NumPy re-derivations of the official code."""
import math

import keras
import numpy as np
import pytest

from vicreg_tf import LARS, scaled_learning_rate, warmup_cosine


def lars_numpy(w, grads, lr, momentum=0.9, weight_decay=1e-6, eta=0.001, exclude_1d=True):
    """LARS.step of facebookresearch/vicreg main_vicreg.py, for one parameter, several steps."""
    w = w.astype(np.float64).copy()
    mu = np.zeros_like(w)
    for g in grads:
        dp = g.astype(np.float64)
        if not (exclude_1d and w.ndim == 1):
            dp = dp + weight_decay * w
            param_norm, update_norm = np.linalg.norm(w), np.linalg.norm(dp)
            q = eta * param_norm / update_norm if (param_norm > 0 and update_norm > 0) else 1.0
            dp = dp * q
        mu = momentum * mu + dp
        w = w - lr * mu
    return w


@pytest.mark.parametrize("shape", [(5, 3), (4,)], ids=["2-D kernel", "1-D bias"])
def test_lars_matches_numpy(rng, shape):
    w0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    variable = keras.Variable(w0)
    optimizer = LARS(learning_rate=0.3, momentum=0.9, weight_decay=0.05, eta=0.02)
    for g in grads:
        optimizer.apply_gradients([(g, variable)])
    expected = lars_numpy(w0, grads, lr=0.3, weight_decay=0.05, eta=0.02)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_one_d_variables_skip_weight_decay_and_trust_ratio(rng):
    w0 = rng.normal(size=(6,)).astype(np.float32)
    g = rng.normal(size=(6,)).astype(np.float32)
    variable = keras.Variable(w0)
    LARS(learning_rate=0.1, momentum=0.0, weight_decay=0.5, eta=0.001).apply_gradients([(g, variable)])
    np.testing.assert_allclose(variable.numpy(), w0 - 0.1 * g, rtol=1e-6)


def test_zero_weights_use_a_trust_ratio_of_one():
    variable = keras.Variable(np.zeros((2, 2), np.float32))
    g = np.ones((2, 2), np.float32)
    LARS(learning_rate=0.1, momentum=0.0).apply_gradients([(g, variable)])
    np.testing.assert_allclose(variable.numpy(), -0.1 * g, rtol=1e-6)


def test_lars_config_round_trip():
    optimizer = LARS(learning_rate=0.4, momentum=0.8, weight_decay=1e-4, eta=0.01, exclude_1d=False)
    clone = LARS.from_config(optimizer.get_config())
    assert (clone.momentum, clone.lars_weight_decay, clone.eta, clone.exclude_1d) == (0.8, 1e-4, 0.01, False)
    assert clone.weight_decay is None  # Keras' decoupled decay stays off
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, LARS) and restored.eta == 0.01


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="eta=0"):
        LARS(eta=0.0)


def official_learning_rate(step, total_steps, warmup_steps, base_lr):
    """adjust_learning_rate of main_vicreg.py, in steps."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    step -= warmup_steps
    max_steps = total_steps - warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    end_lr = base_lr * 0.001
    return base_lr * q + end_lr * (1 - q)


def test_warmup_cosine_matches_official_schedule():
    schedule = warmup_cosine(0.4, total_steps=1000, warmup_steps=100)
    for step in [0, 1, 50, 99, 100, 101, 400, 999, 1000]:
        np.testing.assert_allclose(
            float(schedule(step)), official_learning_rate(step, 1000, 100, 0.4), rtol=1e-5, atol=1e-9
        )


def test_warmup_cosine_rejects_bad_steps():
    with pytest.raises(ValueError, match="warmup_steps=10, total_steps=10"):
        warmup_cosine(0.1, total_steps=10, warmup_steps=10)


def test_learning_rate_scales_with_batch():
    assert scaled_learning_rate(0.2, 2048) == pytest.approx(1.6)
