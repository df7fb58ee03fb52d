"""The VICReg family on VICReg's train step: SimSiam, BYOL and the entropy variants.

Each model subclasses `VICReg` and replaces only the loss (`compute_vicreg_terms`)
and its metrics, so the step itself is VICReg's: embeddings gathered across
replicas, the loss divided by the number of replicas, the non-finite-step guard
(weights, optimizer state and BatchNorm statistics untouched by a bad step),
`call()` = backbone features, and `.backbone` for export.

- `SimSiam` (Chen and He, CVPR 2021) and `BYOL` (Grill et al., NeurIPS 2020):
  predictor, stop-gradient on the target branch, symmetric negative cosine
  similarity; BYOL's target is a momentum (EMA) copy of backbone + expander.
  `variance_weight` / `covariance_weight` add VICReg's variance and covariance
  on the expander outputs of both views, as VICReg's Sec. 5 / Table 4 does.
- `EntropyVICReg`: invariance minus an entropy estimate of the embeddings,
  LogDet or pairwise-distance (Shwartz-Ziv et al., arXiv 2303.00633).
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from vicreg_tf.distribute import gather_replicas
from vicreg_tf.losses import (
    ENTROPY_ESTIMATORS,
    covariance_loss,
    entropy_loss,
    negative_cosine_similarity,
    variance_covariance_regularizer,
    variance_loss,
)
from vicreg_tf.model import VICReg, _embedding_std, _feature_shape, _multi_worker, use_fused_batchnorm
from vicreg_tf.projector import build_projector, parse_projector_spec

METHODS = ("vicreg", "simsiam", "byol", "logdet", "pairwise")


def _expander_width(model: VICReg) -> int:
    if model.projector_spec:
        return parse_projector_spec(model.projector_spec)[-1]
    dense = [l for l in model.projector._flatten_layers() if isinstance(l, keras.layers.Dense)]
    if not dense:
        raise ValueError("cannot tell the expander's output width: give the projector as a spec string")
    return dense[-1].units


class _FamilyMember(VICReg):
    """VICReg's step with other loss terms: metrics are matched to terms by name."""

    def _family_metrics(self) -> list:
        raise NotImplementedError

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            *self._family_metrics(),
            self.variance_tracker,
            self.covariance_tracker,
            self.embedding_std_tracker,
        ]

    def _update_metrics(self, terms) -> dict[str, tf.Tensor]:
        for tracker in self.metrics:
            tracker.update_state(terms[tracker.name])
        results = {m.name: m.result() for m in self.metrics}
        if _multi_worker(self.distribute_strategy):  # as VICReg._update_metrics
            results = {name: value[None] for name, value in results.items()}
        return results

    def _base_config(self) -> dict:
        serialize = keras.saving.serialize_keras_object
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": serialize(self.backbone),
            "projector": self.projector_spec or serialize(self.projector),
            "gamma": self.gamma,
            "eps": self.eps,
            "sync_batchnorm": self.sync_batchnorm,
            "fused_batchnorm": self.fused_batchnorm,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        config["backbone"] = deserialize(config["backbone"])
        for key in ("projector", "predictor"):
            if key in config and config[key] is not None and not isinstance(config[key], str):
                config[key] = deserialize(config[key])
        return cls(**config)


@keras.saving.register_keras_serializable(package="vicreg_tf")
class SimSiam(_FamilyMember):
    """SimSiam: expander, predictor, stop-gradient, symmetric negative cosine similarity.

    loss = 1/2 D(p_a, sg(z_b)) + 1/2 D(p_b, sg(z_a))
           + variance_weight * (v(z_a) + v(z_b)) / 2 + covariance_weight * (c(z_a) + c(z_b)),
    with D = -cosine, p the predictor's output, z the expander's, sg stop-gradient
    and v, c VICReg's variance and covariance terms on the expander outputs
    gathered from all replicas (VICReg Sec. 5: mu = 1, nu = 0.01 there; 0 here
    gives plain SimSiam). Metrics: loss, negative_cosine, variance, covariance,
    embedding_std (variance and covariance reported even with weight 0).

    Args:
        backbone: a Keras model from inputs to features (N, F).
        projector: the expander spec (Dense-BN-ReLU blocks, last linear) or a model.
        predictor: the predictor's hidden widths as a spec ("512": Dense 512 -
            BN - ReLU - Dense D, D the expander's width), a Keras model from
            (N, D) to (N, D), or None for no predictor (p = z; VICReg Table 4's
            "SimSiam without predictor", which collapses without the variance term).
        variance_weight, covariance_weight: mu and nu of the regularizer.
        gamma, eps, sync_batchnorm, fused_batchnorm, **kwargs: as in `VICReg`.

    Example:
    >>> backbone = vicreg_tf.backbones.small_cnn((28, 28, 1))
    >>> model = SimSiam(backbone, projector="512-512", predictor="128", variance_weight=1.0)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    >>> model.fit(vicreg_tf.data.view_pairs(source, views, batch_size=256), epochs=1)
    """

    def __init__(
        self,
        backbone: keras.Model,
        projector="2048-2048-2048",
        predictor="512",
        *,
        variance_weight: float = 0.0,
        covariance_weight: float = 0.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        sync_batchnorm: bool = True,
        fused_batchnorm: bool = True,
        **kwargs,
    ):
        super().__init__(
            backbone, projector, invariance_weight=0.0, variance_weight=variance_weight,
            covariance_weight=covariance_weight, gamma=gamma, eps=eps, sync_batchnorm=sync_batchnorm,
            fused_batchnorm=fused_batchnorm, **kwargs,
        )
        width = _expander_width(self)
        self.predictor_spec = predictor if isinstance(predictor, str) and predictor else None
        if predictor is None or predictor == "":
            self.predictor = None
        elif isinstance(predictor, str):
            self.predictor = build_projector(f"{predictor}-{width}", name="predictor")
        elif isinstance(predictor, keras.layers.Layer):
            self.predictor = predictor
        else:
            raise TypeError(
                "predictor must be a spec of hidden widths like '512', a Keras model or None, "
                f"got {type(predictor).__name__}"
            )
        if self.predictor is not None:
            use_fused_batchnorm(self.predictor, self.fused_batchnorm)
            if not self.predictor.built:
                self.predictor.build((None, width))
        self.negative_cosine_tracker = keras.metrics.Mean(name="negative_cosine")

    def _family_metrics(self) -> list:
        return [self.negative_cosine_tracker]

    def _predict(self, z, training: bool):
        return z if self.predictor is None else self.predictor(z, training=training)

    def _targets(self, view_a, view_b, z_a, z_b, training: bool):
        """The target branch's embeddings of both views (gradient stopped in the loss)."""
        return z_a, z_b

    def compute_vicreg_terms(self, data, training: bool = False) -> dict[str, tf.Tensor]:
        view_a, view_b = self._unpack_views(data)
        z_a, z_b = self._embed(view_a, view_b, training)
        p_a, p_b = self._predict(z_a, training), self._predict(z_b, training)
        t_a, t_b = self._targets(view_a, view_b, z_a, z_b, training)
        gather = lambda x: gather_replicas(tf.cast(x, tf.float32))
        z_a, z_b, p_a, p_b, t_a, t_b = map(gather, (z_a, z_b, p_a, p_b, t_a, t_b))
        similarity = 0.5 * (negative_cosine_similarity(p_a, t_b) + negative_cosine_similarity(p_b, t_a))
        reg_a = variance_covariance_regularizer(z_a, gamma=self.gamma, eps=self.eps)
        reg_b = variance_covariance_regularizer(z_b, gamma=self.gamma, eps=self.eps)
        # As in vicreg_loss: variance averaged over the two branches, covariance summed.
        variance = 0.5 * (reg_a["variance"] + reg_b["variance"])
        covariance = reg_a["covariance"] + reg_b["covariance"]
        loss = similarity + self.variance_weight * variance + self.covariance_weight * covariance
        return {
            "loss": loss,
            "negative_cosine": similarity,
            "variance": variance,
            "covariance": covariance,
            "embedding_std": 0.5 * (_embedding_std(z_a) + _embedding_std(z_b)),
        }

    def get_config(self):
        predictor = self.predictor_spec
        if predictor is None and self.predictor is not None:
            predictor = keras.saving.serialize_keras_object(self.predictor)
        return {
            **self._base_config(),
            "predictor": predictor,
            "variance_weight": self.variance_weight,
            "covariance_weight": self.covariance_weight,
        }


def byol_target_decay(step, total_steps: int, tau_base: float = 0.996) -> tf.Tensor:
    """BYOL's EMA decay at step k: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (Sec. 3.2).

    tau_base at k = 0, rising to 1 at k = K; constant tau_base when K <= 0.
    """
    if total_steps <= 0:
        return tf.constant(tau_base, tf.float32)
    progress = tf.minimum(tf.cast(step, tf.float32), float(total_steps)) / float(total_steps)
    return 1.0 - (1.0 - tau_base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


@keras.saving.register_keras_serializable(package="vicreg_tf")
class BYOL(SimSiam):
    """BYOL: SimSiam's loss against a momentum (EMA) target encoder.

    The target branch is a copy of backbone + expander (`target_backbone`,
    `target_projector`) that receives no gradient: its variables are not
    trainable (BatchNorm in it still normalises with batch statistics while
    training, as in BYOL) and are saved with the model. After every step that
    the optimizer applied (not after a step the non-finite guard skipped), each
    target weight moves to tau * target + (1 - tau) * online, with tau from
    `byol_target_decay` at k = the step's index (0 for the first step). Under a
    tf.distribute strategy the update runs once per device in the
    cross-replica context (mirrored variables stay identical).

    The loss is the symmetric negative cosine similarity of `SimSiam` (BYOL's
    2 - 2 cos is twice it plus 2), plus the optional variance / covariance
    regularizer on the online expander outputs (VICReg Table 4: BYOL 69.3% ->
    70.2% with variance).

    Args:
        backbone, projector, predictor, variance_weight, covariance_weight:
            as in `SimSiam` (BYOL's predictor: hidden width 4096 on ImageNet).
        tau_base: the EMA decay at step 0 (BYOL: 0.996).
        total_steps: K of the cosine schedule, the number of training steps;
            0 keeps tau = tau_base.
        gamma, eps, sync_batchnorm, fused_batchnorm, **kwargs: as in `VICReg`.

    Example:
    >>> model = BYOL(vicreg_tf.backbones.small_cnn((28, 28, 1)), projector="512-256",
    ...              predictor="512", total_steps=epochs * steps_per_epoch)
    """

    def __init__(
        self,
        backbone: keras.Model,
        projector="4096-256",
        predictor="4096",
        *,
        tau_base: float = 0.996,
        total_steps: int = 0,
        variance_weight: float = 0.0,
        covariance_weight: float = 0.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        sync_batchnorm: bool = True,
        fused_batchnorm: bool = True,
        **kwargs,
    ):
        super().__init__(
            backbone, projector, predictor, variance_weight=variance_weight,
            covariance_weight=covariance_weight, gamma=gamma, eps=eps, sync_batchnorm=sync_batchnorm,
            fused_batchnorm=fused_batchnorm, **kwargs,
        )
        if not 0.0 <= tau_base <= 1.0:
            raise ValueError(f"tau_base must be in [0, 1], got {tau_base}")
        self.tau_base = float(tau_base)
        self.total_steps = int(total_steps)
        try:
            self.target_backbone = keras.models.clone_model(self.backbone)
        except ValueError as error:
            raise ValueError(
                f"BYOL clones the backbone for its target: it must be a functional or Sequential "
                f"Keras model ({error})"
            ) from error
        self.target_projector = keras.models.clone_model(self.projector)
        for target in (self.target_backbone, self.target_projector):
            use_fused_batchnorm(target, self.fused_batchnorm)
        shape = _feature_shape(self.target_backbone)
        if shape is not None and not self.target_projector.built:
            self.target_projector.build(shape)
        self._init_target()

    def _init_target(self) -> None:
        online = self.backbone.weights + self.projector.weights
        target = self.target_backbone.weights + self.target_projector.weights
        if len(online) != len(target) or any(o.shape != t.shape for o, t in zip(online, target)):
            raise ValueError("the target encoder does not mirror the online backbone + expander")
        for t, o in zip(target, online):
            t.assign(o)
            t.trainable = False  # excluded from trainable_variables; the layers still train BatchNorm
        self._ema_pairs = [(t, o) for t, o in zip(target, online) if o.trainable]

    def _targets(self, view_a, view_b, z_a, z_b, training: bool):
        embed = lambda x: self.target_projector(self.target_backbone(x, training=training), training=training)
        return tf.stop_gradient(embed(view_a)), tf.stop_gradient(embed(view_b))

    def train_step(self, data):
        step = tf.convert_to_tensor(self.optimizer.iterations)  # read before the step
        logs = super().train_step(data)
        # The guard applies a step or leaves everything as it was; iterations tells which.
        applied = self.optimizer.iterations > step
        tau = byol_target_decay(step, self.total_steps, self.tau_base)
        self._update_target(tf.where(applied, 1.0 - tau, 0.0))
        return logs

    def _update_target(self, rate: tf.Tensor) -> None:
        """target += rate * (online - target), once per device, in the cross-replica context."""

        def update(distribution, rate):
            for target, online in self._ema_pairs:
                distribution.extended.update(
                    target.value,
                    lambda t, o, r: t.assign_add(tf.cast(r, t.dtype) * (o - t)),
                    args=(online.value, rate),
                    group=False,
                )

        tf.__internal__.distribute.interim.maybe_merge_call(update, self.distribute_strategy, rate)

    def get_config(self):
        return {**super().get_config(), "tau_base": self.tau_base, "total_steps": self.total_steps}


@keras.saving.register_keras_serializable(package="vicreg_tf")
class EntropyVICReg(_FamilyMember):
    """VICReg with variance + covariance replaced by an entropy estimate (arXiv 2303.00633).

    loss = invariance_weight * MSE(z_a, z_b) - entropy_weight * (H(z_a) + H(z_b)) / 2
    on expander outputs gathered from all replicas, with H the LogDet entropy
    (`entropy="logdet"`, `vicreg_tf.losses.logdet_entropy`) or the
    Kolchinsky-Tracey pairwise-distance estimate (`"pairwise"`,
    `vicreg_tf.losses.pairwise_entropy`). Shwartz-Ziv et al. publish no code;
    both are written from the formulas. Metrics: loss, invariance, entropy,
    and VICReg's variance and covariance terms as diagnostics (not in the loss),
    embedding_std.

    Args:
        backbone, projector: as in `VICReg`.
        entropy: "logdet" or "pairwise".
        invariance_weight: lambda (VICReg's 25).
        entropy_weight: None: 25 / D for logdet, 25 for pairwise (see
            `vicreg_tf.losses.entropy_loss`).
        beta: LogDet's jitter on the covariance's diagonal (float64 Cholesky).
        kernel_width: the pairwise estimator's kernel width; None: sqrt(D).
        gamma, eps: of the variance diagnostic.
        sync_batchnorm, fused_batchnorm, **kwargs: as in `VICReg`.

    Example:
    >>> model = EntropyVICReg(vicreg_tf.backbones.small_cnn((28, 28, 1)), "1024-1024-1024", entropy="logdet")
    >>> model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    """

    def __init__(
        self,
        backbone: keras.Model,
        projector="8192-8192-8192",
        *,
        entropy: str = "logdet",
        invariance_weight: float = 25.0,
        entropy_weight: float | None = None,
        beta: float = 1e-3,
        kernel_width: float | None = None,
        gamma: float = 1.0,
        eps: float = 1e-4,
        sync_batchnorm: bool = True,
        fused_batchnorm: bool = True,
        **kwargs,
    ):
        if entropy not in ENTROPY_ESTIMATORS:
            raise ValueError(f"entropy must be one of {ENTROPY_ESTIMATORS}, got {entropy!r}")
        if beta <= 0 or (kernel_width is not None and kernel_width <= 0):
            raise ValueError(f"beta and kernel_width must be > 0, got beta={beta}, kernel_width={kernel_width}")
        super().__init__(
            backbone, projector, invariance_weight=invariance_weight, variance_weight=0.0,
            covariance_weight=0.0, gamma=gamma, eps=eps, sync_batchnorm=sync_batchnorm,
            fused_batchnorm=fused_batchnorm, **kwargs,
        )
        self.entropy = entropy
        self.entropy_weight = None if entropy_weight is None else float(entropy_weight)
        self.beta = float(beta)
        self.kernel_width = None if kernel_width is None else float(kernel_width)
        self.entropy_tracker = keras.metrics.Mean(name="entropy")

    def _family_metrics(self) -> list:
        return [self.invariance_tracker, self.entropy_tracker]

    def compute_vicreg_terms(self, data, training: bool = False) -> dict[str, tf.Tensor]:
        view_a, view_b = self._unpack_views(data)
        z_a, z_b = self._embed(view_a, view_b, training)
        z_a = gather_replicas(tf.cast(z_a, tf.float32))
        z_b = gather_replicas(tf.cast(z_b, tf.float32))
        terms = entropy_loss(
            z_a, z_b, entropy=self.entropy, invariance_weight=self.invariance_weight,
            entropy_weight=self.entropy_weight, beta=self.beta, kernel_width=self.kernel_width,
        )
        diagnostics_a, diagnostics_b = tf.stop_gradient(z_a), tf.stop_gradient(z_b)
        terms["variance"] = 0.5 * (
            variance_loss(diagnostics_a, self.gamma, self.eps) + variance_loss(diagnostics_b, self.gamma, self.eps)
        )
        terms["covariance"] = covariance_loss(diagnostics_a) + covariance_loss(diagnostics_b)
        terms["embedding_std"] = 0.5 * (_embedding_std(z_a) + _embedding_std(z_b))
        return terms

    def get_config(self):
        return {
            **self._base_config(),
            "entropy": self.entropy,
            "invariance_weight": self.invariance_weight,
            "entropy_weight": self.entropy_weight,
            "beta": self.beta,
            "kernel_width": self.kernel_width,
        }
