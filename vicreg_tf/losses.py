"""The VICReg loss (Bardes, Ponce, LeCun, ICLR 2022, Sec. 2-3) as pure functions.

Everything is computed in float32, whatever the input dtype, so the loss is
safe under mixed precision. The semantics are those of the official
`main_vicreg.py`: invariance is the MSE over all N x D entries; variance is the
per-dimension hinge on the standard deviation (variance with N - 1); covariance
is the sum of squared off-diagonal entries of the covariance matrix (N - 1)
divided by D.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from vicreg_tf.distribute import gather_replicas


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


def embedding_std(z) -> tf.Tensor:
    """Mean over dimensions of each dimension's standard deviation over the batch (N - 1); no gradient.

    0 means collapse; VICReg's variance term pushes it to gamma (1). The one
    definition: the training log, the summary and `vicreg_tf.evaluation` use it.
    """
    z = tf.stop_gradient(_as_float32(z))
    n = tf.cast(tf.shape(z)[0], tf.float32)
    centered = z - tf.reduce_mean(z, axis=0, keepdims=True)
    return tf.reduce_mean(tf.sqrt(tf.reduce_sum(tf.square(centered), axis=0) / (n - 1.0)))


# -- the VICReg family ---------------------------------------------------------------


def variance_covariance_regularizer(
    z,
    variance_weight: float = 1.0,
    covariance_weight: float = 0.01,
    *,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> dict[str, tf.Tensor]:
    """VICReg's variance and covariance terms of one batch, for use with other methods.

    VICReg Sec. 5 / Table 4 adds these terms (mu = 1, nu = 0.01 there, the
    defaults here) to the expander outputs of BYOL and SimSiam: with the
    variance term SimSiam without a predictor no longer collapses, BYOL gains
    0.9 point. The terms are exactly `variance_loss` and `covariance_loss`, so
    with two branches `0.5 * (r(z_a)["variance"] + r(z_b)["variance"])` and
    `r(z_a)["covariance"] + r(z_b)["covariance"]` are `vicreg_loss`'s terms.
    The weights follow VICReg's pair convention: `loss` is mu / 2 * variance +
    nu * covariance, one branch's share, so the losses of both branches add up
    to mu * (v_a + v_b) / 2 + nu * (c_a + c_b), as in SimSiam / BYOL here.

    Batch statistics: under a `tf.distribute` strategy pass the batch gathered
    from all replicas (`vicreg_tf.gather_replicas`), and divide the loss by the
    number of replicas before the gradient, as `VICReg.train_step` does. In a
    custom train_step:

        with tf.GradientTape() as tape:
            z = expander(backbone(x, training=True), training=True)
            terms = variance_covariance_regularizer(vicreg_tf.gather_replicas(z), 1.0, 0.01)
            loss = (method_loss + terms["loss"]) / vicreg_tf.num_replicas()
        grads = tape.gradient(loss, model.trainable_variables)

    Args:
        z: embeddings (N, D), N >= 2.
        variance_weight, covariance_weight: mu and nu.
        gamma: target standard deviation of each dimension.
        eps: added to the variance before the square root.

    Returns:
        A dict with `loss` (mu / 2 * variance + nu * covariance) and the
        unweighted `variance` and `covariance`, float32 scalars.

    Example:
    >>> z = tf.random.normal((16, 8))
    >>> terms = variance_covariance_regularizer(z, variance_weight=1.0, covariance_weight=0.01)
    >>> sorted(terms)
    ['covariance', 'loss', 'variance']
    """
    z = _as_float32(z)
    variance = variance_loss(z, gamma, eps)
    covariance = covariance_loss(z)
    # One branch's share of VICReg's pair convention (variance averaged over the two
    # branches, covariance summed): called on both views it adds what SimSiam's and
    # BYOL's variance_weight / covariance_weight add.
    loss = 0.5 * variance_weight * variance + covariance_weight * covariance
    return {"loss": loss, "variance": variance, "covariance": covariance}


def negative_cosine_similarity(p, z) -> tf.Tensor:
    """-cos(p_i, z_i) averaged over the batch, with no gradient into `z` (SimSiam Eq. 1-2).

    `z` is the target branch: `tf.stop_gradient` is applied here, so the
    function cannot be misused. BYOL's 2 - 2 cos is this, times 2, plus 2.
    """
    p = tf.math.l2_normalize(_as_float32(p), axis=-1, epsilon=1e-12)
    z = tf.math.l2_normalize(tf.stop_gradient(_as_float32(z)), axis=-1, epsilon=1e-12)
    return -tf.reduce_mean(tf.reduce_sum(p * z, axis=-1))


def logdet_entropy(z, beta: float = 1e-3) -> tf.Tensor:
    """LogDet entropy 1/2 log det(Cov(Z) + beta I) of a batch, in nats (float32 result).

    The estimator of Zhouyin and Liu (arXiv 2105.03705), used as VICReg's
    information-theoretic replacement for variance + covariance by
    Shwartz-Ziv et al. (arXiv 2303.00633, NeurIPS 2023). Neither paper ships
    code: this is written from the formula. Dropped: the additive constant
    D/2 log(2 pi e) of the Gaussian entropy (no gradient).

    Numerics: the Gram matrix (N - 1) in float32, the log det in float64 from
    the Cholesky factor. `beta` (an absolute jitter, in squared embedding units;
    1e-3 is 0.1% of the unit variance VICReg aims at) keeps Cov + beta I
    positive definite when the batch has fewer samples than dimensions
    (N <= D: rank <= N - 1) or a dimension collapses, and caps what a dead
    dimension can cost at 1/2 log beta. For N < D the N x N form of Sylvester's
    determinant identity is used: det(beta I_D + A^T A) = beta^(D-N) det(beta I_N + A A^T).

    Args:
        z: embeddings (N, D), N >= 2.
        beta: the jitter added to the covariance's diagonal, > 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (it keeps Cov + beta I positive definite), got {beta}")
    z = _as_float32(z)
    _check_embeddings(z, "embeddings")
    with tf.control_dependencies(_runtime_batch_check(z, "embeddings")):
        shape = tf.shape(z)
    n, d = shape[0], shape[1]
    a = (z - tf.reduce_mean(z, axis=0, keepdims=True)) / tf.sqrt(tf.cast(n - 1, tf.float32))

    def logdet(gram, size):
        # The Gram matrix in float32 (the costly product: N x D x min(N, D)); only the small
        # matrix goes to float64 for the Cholesky factor.
        matrix = tf.cast(gram, tf.float64) + beta * tf.eye(size, dtype=tf.float64)
        chol = tf.linalg.cholesky(matrix)
        return 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)))

    def by_samples():  # N x N, plus the D - N eigenvalues equal to beta
        extra = tf.cast(d - n, tf.float64) * tf.math.log(tf.constant(beta, tf.float64))
        return logdet(tf.matmul(a, a, transpose_b=True), n) + extra

    def by_features():  # D x D
        return logdet(tf.matmul(a, a, transpose_a=True), d)

    static_n, static_d = z.shape[0], z.shape[1]
    if static_n is not None and static_d is not None:
        value = by_samples() if static_n < static_d else by_features()
    else:
        value = tf.cond(n < d, by_samples, by_features)
    return tf.cast(0.5 * value, tf.float32)


def pairwise_entropy(z, kernel_width: float) -> tf.Tensor:
    """Kolchinsky-Tracey pairwise-distance entropy estimate of a batch (KL upper bound), in nats.

    Treats the batch as a mixture of N equal-weight Gaussians N(z_i, s^2 I)
    (Kolchinsky and Tracey, Entropy 2017; used for VICReg by Shwartz-Ziv et al.,
    arXiv 2303.00633, which ships no code: written from the formula). With the
    KL divergence between components, ||z_i - z_j||^2 / (2 s^2), the bound is

        H <= D/2 (1 + log(2 pi s^2)) - 1/N sum_i log(1/N sum_j exp(-||z_i - z_j||^2 / (2 s^2))).

    Returned: the second part only; the constant D/2 (1 + log 2 pi s^2) has no
    gradient and is dropped, so the value lies in [0, log N] (0: every point
    equal; log N: points far apart relative to s). (The Bhattacharyya lower
    bound would use exp(-||z_i - z_j||^2 / (8 s^2)).) The Gram matrix in float32,
    the squared distances and the inner sum (logsumexp) in float64.

    Args:
        z: embeddings (N, D), N >= 2.
        kernel_width: s, in embedding units; about sqrt(D) for unit-variance
            dimensions keeps the kernel away from saturation.
    """
    if kernel_width <= 0:
        raise ValueError(f"kernel_width must be > 0, got {kernel_width}")
    z = _as_float32(z)
    _check_embeddings(z, "embeddings")
    with tf.control_dependencies(_runtime_batch_check(z, "embeddings")):
        n = tf.cast(tf.shape(z)[0], tf.float64)
    # Distances from the float32 Gram matrix (the costly product); the N x N rest in float64.
    z = z - tf.reduce_mean(z, axis=0, keepdims=True)  # distances do not change; the products lose less
    gram = tf.cast(tf.matmul(z, z, transpose_b=True), tf.float64)
    squared_norms = tf.linalg.diag_part(gram)  # from the same product: each point's distance to itself is 0
    distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    distances = tf.maximum(distances, 0.0)  # rounding can make ||z_i||^2 + ||z_i||^2 - 2 z_i.z_i < 0
    log_kernel = -distances / (2.0 * float(kernel_width) ** 2)
    value = -tf.reduce_mean(tf.reduce_logsumexp(log_kernel, axis=1) - tf.math.log(n))
    return tf.cast(value, tf.float32)


ENTROPY_ESTIMATORS = ("logdet", "pairwise")


def entropy_loss(
    z_a,
    z_b,
    *,
    entropy: str = "logdet",
    invariance_weight: float = 25.0,
    entropy_weight: float | None = None,
    beta: float = 1e-3,
    kernel_width: float | None = None,
) -> dict[str, tf.Tensor]:
    """Invariance minus an entropy estimate: VICReg's information-theoretic variants.

    loss = invariance_weight * MSE(z_a, z_b) - entropy_weight * (H(z_a) + H(z_b)) / 2,
    with H the LogDet (`logdet_entropy`) or pairwise-distance
    (`pairwise_entropy`) estimator (Shwartz-Ziv et al., arXiv 2303.00633,
    Sec. 6: variance + covariance approximate maximising log det Cov(Z)).

    Args:
        z_a, z_b: embeddings of the two views (N, D), gathered across replicas.
        entropy: "logdet" or "pairwise".
        invariance_weight: lambda, as in VICReg.
        entropy_weight: None gives 25 / D for "logdet" (then each dimension's
            1/2 log variance is pushed as hard as VICReg's variance hinge,
            weight 25 averaged over D, pushes its std at std 1) and 25 for
            "pairwise" (with the default kernel width).
        beta: LogDet jitter (`logdet_entropy`).
        kernel_width: pairwise kernel width s; None gives sqrt(D).

    Returns:
        `loss`, `invariance` and `entropy` ((H_a + H_b) / 2, nats, constants dropped).
    """
    if entropy not in ENTROPY_ESTIMATORS:
        raise ValueError(f"entropy must be one of {ENTROPY_ESTIMATORS}, got {entropy!r}")
    z_a, z_b = _as_float32(z_a), _as_float32(z_b)
    _check_embeddings(z_a, "z_a")
    _check_embeddings(z_b, "z_b")
    d = z_a.shape[-1]
    if d is None:
        raise ValueError("entropy_loss needs a known embedding width D")
    width = kernel_width if kernel_width is not None else d ** 0.5

    def estimate(z):
        return logdet_entropy(z, beta) if entropy == "logdet" else pairwise_entropy(z, width)

    default_weight = 25.0 / d if entropy == "logdet" else 25.0
    weight = default_weight if entropy_weight is None else entropy_weight
    invariance = invariance_loss(z_a, z_b)
    value = 0.5 * (estimate(z_a) + estimate(z_b))
    return {
        "loss": invariance_weight * invariance - weight * value,
        "invariance": invariance,
        "entropy": value,
    }


@keras.saving.register_keras_serializable(package="vicreg_tf")
class VarianceCovarianceRegularizer(keras.layers.Layer):
    """Passes embeddings through and adds VICReg's variance + covariance terms as a model loss.

    The Keras form of `variance_covariance_regularizer`: put it after an
    expander in any model trained with `fit` (or with a custom train_step that
    adds `model.losses`). In training only (`training=True`), it gathers the
    batch from all replicas (`gather_replicas`, identity for one replica or in
    a cross-replica context) and calls `add_loss(mu * variance + nu *
    covariance)` on the global batch. Keras' own `compute_loss` divides
    `add_loss` losses by the number of replicas (TensorFlow backend), which is
    exactly the scaling a gathered statistic needs, so one step on R replicas
    equals one step on one device with the whole batch (tests/test_family.py).
    A custom train_step that sums `model.losses` itself must divide by
    `num_replicas()` as `VICReg.train_step` does.

    Args:
        variance_weight, covariance_weight: mu and nu (VICReg Table 4: 1, 0.01).
        gamma: target standard deviation of each dimension.
        eps: added to the variance before the square root.

    Example:
    >>> inputs = keras.Input((16,))
    >>> z = keras.layers.Dense(8)(inputs)
    >>> z = VarianceCovarianceRegularizer(variance_weight=1.0, covariance_weight=0.01)(z)
    >>> model = keras.Model(inputs, z)
    """

    def __init__(
        self,
        variance_weight: float = 1.0,
        covariance_weight: float = 0.01,
        gamma: float = 1.0,
        eps: float = 1e-4,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.variance_weight = float(variance_weight)
        self.covariance_weight = float(covariance_weight)
        self.gamma = float(gamma)
        self.eps = float(eps)

    def call(self, z, training=None):
        if training:
            context = tf.distribute.get_replica_context()
            gathered = z if context is None else gather_replicas(z)
            terms = variance_covariance_regularizer(
                gathered, self.variance_weight, self.covariance_weight, gamma=self.gamma, eps=self.eps
            )
            self.add_loss(terms["loss"])
        return z

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "variance_weight": self.variance_weight,
            "covariance_weight": self.covariance_weight,
            "gamma": self.gamma,
            "eps": self.eps,
        }
