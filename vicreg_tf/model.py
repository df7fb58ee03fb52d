"""The VICReg Keras model: backbone + expander, trained with the VICReg loss (`vicreg_tf.losses.vicreg_loss`)."""
from __future__ import annotations

import keras
import tensorflow as tf

from vicreg_tf.base import BaseMethod
from vicreg_tf.distribute import gather_replicas
from vicreg_tf.losses import embedding_std, vicreg_loss


@keras.saving.register_keras_serializable(package="vicreg_tf")
class VICReg(BaseMethod):
    """VICReg: a backbone and an expander trained on pairs of views with the VICReg loss.

    `call(x)` returns the backbone's features, so `predict` and export give
    representations. `fit` takes a dataset of `(view_a, view_b)` batches
    (or `((view_a, view_b), labels)`, labels ignored). Under any
    `tf.distribute` strategy the embeddings are all-gathered across replicas
    before the loss, so variance and covariance see the global batch, and the
    loss is divided by the number of replicas before the gradient (Keras sums
    gradients across replicas); the reported metrics are the unscaled values.
    The step is `BaseMethod`'s; this class gives the loss.

    Args:
        backbone: a Keras model from inputs to a feature vector (N, F).
        projector: an expander spec such as "8192-8192-8192" (Dense-BN-ReLU
            blocks, last layer linear) or a Keras model from (N, F) to (N, D).
        second_backbone: optional encoder for view b (heterogeneous pairs, e.g.
            two modalities); VICReg does not need shared weights. It gets its
            own expander, built from the same spec (or cloned from `projector`).
        invariance_weight, variance_weight, covariance_weight: the loss
            coefficients lambda, mu, nu (paper: 25, 25, 1).
        gamma: target std per embedding dimension.
        eps: numerical stabiliser inside the square root of the variance term.
        sync_batchnorm, fused_batchnorm, device_views, **kwargs: as in
            `vicreg_tf.base.BaseMethod` (device views: the views' second stage
            inside the step, from uint8 crops; XLA then stays off).

    Example:
    >>> backbone = vicreg_tf.backbones.small_cnn((28, 28, 1))
    >>> model = VICReg(backbone, projector="512-512-512")
    >>> model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    >>> model.fit(vicreg_tf.data.view_pairs(source, views, batch_size=256), epochs=1)
    """

    metric_names = ("loss", "invariance", "variance", "covariance", "embedding_std")

    def __init__(
        self,
        backbone: keras.Model,
        projector="8192-8192-8192",
        *,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        **kwargs,
    ):
        super().__init__(backbone, projector, **kwargs)
        self.invariance_weight = float(invariance_weight)
        self.variance_weight = float(variance_weight)
        self.covariance_weight = float(covariance_weight)
        self.gamma = float(gamma)
        self.eps = float(eps)

    def compute_terms(self, view_a, view_b, training: bool = False) -> dict[str, tf.Tensor]:
        """Loss terms of one batch of view pairs, on embeddings gathered from all replicas."""
        z_a, z_b = self.embed(view_a, view_b, training)
        z_a = gather_replicas(tf.cast(z_a, tf.float32))
        z_b = gather_replicas(tf.cast(z_b, tf.float32))
        terms = vicreg_loss(
            z_a,
            z_b,
            invariance_weight=self.invariance_weight,
            variance_weight=self.variance_weight,
            covariance_weight=self.covariance_weight,
            gamma=self.gamma,
            eps=self.eps,
        )
        terms["embedding_std"] = 0.5 * (embedding_std(z_a) + embedding_std(z_b))
        return terms

    def get_config(self):
        return {
            **super().get_config(),
            "invariance_weight": self.invariance_weight,
            "variance_weight": self.variance_weight,
            "covariance_weight": self.covariance_weight,
            "gamma": self.gamma,
            "eps": self.eps,
        }
