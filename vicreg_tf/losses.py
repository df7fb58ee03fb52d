"""The VICReg loss (Bardes, Ponce, LeCun, ICLR 2022, Sec. 2-3) as pure functions.

Everything is computed in float32, whatever the input dtype, so the loss is
safe under mixed precision. The semantics are those of the official
`main_vicreg.py`: invariance is the MSE over all N x D entries; variance is the
per-dimension hinge on the standard deviation (variance with N - 1); covariance
is the sum of squared off-diagonal entries of the covariance matrix (N - 1)
divided by D.
"""
from __future__ import annotations

import tensorflow as tf


def _as_float32(z) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(z), tf.float32)


def _check_embeddings(z: tf.Tensor, name: str) -> None:
    if z.shape.rank is not None and z.shape.rank != 2:
        raise ValueError(
            f"{name} must be a 2-D batch of embeddings (N, D), got shape {z.shape}"
        )
    n = z.shape[0]
    if n is not None and n < 2:
        raise ValueError(
            f"{name} has a batch of {n} embedding(s); VICReg's variance and covariance "
            "need at least 2 per batch (use a larger batch and drop_remainder=True)"
        )


def _runtime_batch_check(z: tf.Tensor, name: str):
    """Graph-time batch-size check for batches whose size is only known when running."""
    if z.shape[0] is not None:
        return []
    return [
        tf.debugging.assert_greater_equal(
            tf.shape(z)[0],
            2,
            message=f"{name}: VICReg needs at least 2 embeddings per batch",
        )
    ]


def invariance_loss(z_a, z_b) -> tf.Tensor:
    """Mean squared error over all N x D entries (the paper's s(Z, Z'), Eq. 5, / N D)."""
    z_a, z_b = _as_float32(z_a), _as_float32(z_b)
    if z_a.shape.is_fully_defined() and z_b.shape.is_fully_defined() and z_a.shape != z_b.shape:
        raise ValueError(
            f"the two embedding batches must have the same shape, got {z_a.shape} and {z_b.shape}"
        )
    return tf.reduce_mean(tf.square(z_a - z_b))


def variance_loss(z, gamma: float = 1.0, eps: float = 1e-4) -> tf.Tensor:
    """Mean over dimensions of relu(gamma - sqrt(Var(z_j) + eps)), Var with N - 1 (Eq. 1)."""
    z = _as_float32(z)
    _check_embeddings(z, "embeddings")
    with tf.control_dependencies(_runtime_batch_check(z, "embeddings")):
        n = tf.cast(tf.shape(z)[0], tf.float32)
    centred = z - tf.reduce_mean(z, axis=0, keepdims=True)
    var = tf.reduce_sum(tf.square(centred), axis=0) / (n - 1.0)
    std = tf.sqrt(var + eps)
    return tf.reduce_mean(tf.nn.relu(gamma - std))


def _sum_squared_gram(z: tf.Tensor) -> tf.Tensor:
    """||Z^T Z||_F^2 computed through the smaller of the two Gram matrices.

    ||Z^T Z||_F^2 = trace((Z^T Z)^2) = trace((Z Z^T)^2) = ||Z Z^T||_F^2, so for
    N < D the N x N Gram matrix gives the same value in O(N^2 D) instead of
    O(N D^2), and no D x D matrix (or mask) is ever built.
    """
    n, d = z.shape[0], z.shape[1]

    def by_samples():  # N x N
        return tf.reduce_sum(tf.square(tf.matmul(z, z, transpose_b=True)))

    def by_features():  # D x D
        return tf.reduce_sum(tf.square(tf.matmul(z, z, transpose_a=True)))

    if n is not None and d is not None:
        return by_samples() if n < d else by_features()
    shape = tf.shape(z)
    return tf.cond(shape[0] < shape[1], by_samples, by_features)


def covariance_loss(z) -> tf.Tensor:
    """Sum of squared off-diagonal covariance entries (N - 1), divided by D (Eq. 3-4)."""
    z = _as_float32(z)
    _check_embeddings(z, "embeddings")
    with tf.control_dependencies(_runtime_batch_check(z, "embeddings")):
        shape = tf.shape(z)
    n, d = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    centred = z - tf.reduce_mean(z, axis=0, keepdims=True)
    # sum_{i != j} C_ij^2 = ||C||_F^2 - sum_j C_jj^2, with C = Z^T Z / (N - 1).
    diagonal = tf.reduce_sum(tf.square(centred), axis=0)
    off_diagonal = _sum_squared_gram(centred) - tf.reduce_sum(tf.square(diagonal))
    return off_diagonal / tf.square(n - 1.0) / d


def vicreg_loss(
    z_a,
    z_b,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> dict[str, tf.Tensor]:
    """The VICReg objective on two embedding batches (Eq. 6).

    Args:
        z_a, z_b: embeddings of the two views, shape (N, D), N >= 2.
        invariance_weight, variance_weight, covariance_weight: lambda, mu, nu of the paper.
        gamma: target standard deviation of each embedding dimension.
        eps: added to the variance before the square root, for numerical stability.

    Returns:
        A dict with `loss` (the weighted sum) and the unweighted terms
        `invariance`, `variance` (the two branches averaged) and `covariance`
        (the two branches summed), all float32 scalars.

    Example:
    >>> z = tf.random.normal((8, 4))
    >>> float(vicreg_loss(z, z)["invariance"])
    0.0
    """
    z_a, z_b = _as_float32(z_a), _as_float32(z_b)
    _check_embeddings(z_a, "z_a")
    _check_embeddings(z_b, "z_b")
    invariance = invariance_loss(z_a, z_b)
    variance = 0.5 * (variance_loss(z_a, gamma, eps) + variance_loss(z_b, gamma, eps))
    covariance = covariance_loss(z_a) + covariance_loss(z_b)
    loss = (
        invariance_weight * invariance
        + variance_weight * variance
        + covariance_weight * covariance
    )
    return {
        "loss": loss,
        "invariance": invariance,
        "variance": variance,
        "covariance": covariance,
    }
