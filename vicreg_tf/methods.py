"""The VICReg family beside VICReg, on the same step (`vicreg_tf.base.BaseMethod`): SimSiam, BYOL, entropy variants.

Each is a sibling of `VICReg`: it names its metrics and returns its loss terms from
`compute_terms`; the base owns the step (embeddings gathered across replicas, the
loss divided by the number of replicas, the non-finite-step guard, metrics).

- `SimSiam` (Chen and He, CVPR 2021) and `BYOL` (Grill et al., NeurIPS 2020):
  predictor, stop-gradient on the target branch, symmetric cosine losses; BYOL's
  target is a momentum (EMA) copy of backbone + expander, updated by the base.
  `variance_weight` / `covariance_weight` add VICReg's variance and covariance
  on the expander outputs of both views, as VICReg's Sec. 5 / Table 4 does.
- `EntropyVICReg`: invariance minus an entropy estimate of the embeddings,
  LogDet or pairwise-distance (Shwartz-Ziv et al., arXiv 2303.00633).

`METHODS` maps `config.model.method` to a builder: a new method is a class here
(or in its own module) and one entry.
"""
from __future__ import annotations

import math
import warnings

import keras
import tensorflow as tf

from vicreg_tf import compat
from vicreg_tf.base import BaseMethod, feature_shape
from vicreg_tf.batchnorm import use_fused_batchnorm
from vicreg_tf.losses import (
    ENTROPY_ESTIMATORS,
    covariance_loss,
    embedding_std,
    entropy_loss,
    negative_cosine_similarity,
    variance_loss,
)
from vicreg_tf.model import VICReg
from vicreg_tf.projector import build_projector, parse_projector_spec


def _expander_width(model: BaseMethod) -> int:
    if model.projector_spec:
        return parse_projector_spec(model.projector_spec)[-1]
    dense = [layer for layer in compat.sublayers(model.projector) if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError("cannot tell the expander's output width: give the projector as a spec string")
    return dense[-1].units


def _make_predictor(predictor, width: int, *, bias: bool):
    """The predictor from its hidden widths ("512": Dense-BN-ReLU 512, then Dense to `width`), a model, or None."""
    if predictor is None or predictor == "":
        return None
    if isinstance(predictor, str):
        return build_projector(f"{predictor}-{width}", name="predictor", last_bias=bias)
    if isinstance(predictor, keras.layers.Layer):
        return predictor
    raise TypeError(
        "predictor must be a spec of hidden widths like '512', a Keras model or None, "
        f"got {type(predictor).__name__}"
    )


def _regularizer_terms(z_a, z_b, gamma: float, eps: float) -> tuple[tf.Tensor, tf.Tensor]:
    """VICReg's variance (averaged over the two branches) and covariance (summed), as `vicreg_loss` has them."""
    variance = 0.5 * (variance_loss(z_a, gamma, eps) + variance_loss(z_b, gamma, eps))
    return variance, covariance_loss(z_a) + covariance_loss(z_b)


class _Predicting(BaseMethod):
    """What SimSiam and BYOL share: an expander with SimSiam's output BatchNorm, a predictor, the regularizer."""

    metric_names = ("loss", "negative_cosine", "variance", "covariance", "embedding_std")

    def __init__(self, backbone, projector, predictor, *, variance_weight, covariance_weight, gamma, eps,
                 output_batchnorm, predictor_bias, **kwargs):
        # Files saved before the output BatchNorm and the predictor's bias existed have
        # neither key; they load as they were built (from_config below).
        self.output_batchnorm = bool(output_batchnorm)
        self.predictor_bias = bool(predictor_bias)
        super().__init__(backbone, projector, **kwargs)
        self.variance_weight = float(variance_weight)
        self.covariance_weight = float(covariance_weight)
        self.gamma = float(gamma)
        self.eps = float(eps)
        width = _expander_width(self)
        self.predictor_spec = predictor if isinstance(predictor, str) and predictor else None
        self.predictor = _make_predictor(predictor, width, bias=self.predictor_bias)
        if self.predictor is not None:
            use_fused_batchnorm(self.predictor, self.fused_batchnorm)
            if not self.predictor.built:
                self.predictor.build((None, width))

    def _make_projector(self, projector, *, name: str, clone: bool = False):
        if isinstance(projector, str):
            return build_projector(projector, name=name, output_batchnorm=self.output_batchnorm)
        return super()._make_projector(projector, name=name, clone=clone)

    def predict_embedding(self, z, training: bool):
        return z if self.predictor is None else self.predictor(z, training=training)

    def targets(self, view_a, view_b, z_a, z_b, training: bool):
        """The target branch's embeddings of both views (gradient stopped in the loss)."""
        return z_a, z_b

    def _predicted_terms(self, view_a, view_b, training: bool) -> dict[str, tf.Tensor]:
        z_a, z_b = self.embed(view_a, view_b, training)
        p_a, p_b = self.predict_embedding(z_a, training), self.predict_embedding(z_b, training)
        t_a, t_b = self.targets(view_a, view_b, z_a, z_b, training)
        z_a, z_b, p_a, p_b, t_a, t_b = self.gather(z_a, z_b, p_a, p_b, t_a, t_b)
        variance, covariance = _regularizer_terms(z_a, z_b, self.gamma, self.eps)
        return {
            "negative_cosine": 0.5 * (negative_cosine_similarity(p_a, t_b) + negative_cosine_similarity(p_b, t_a)),
            "variance": variance,
            "covariance": covariance,
            "regularizer": self.variance_weight * variance + self.covariance_weight * covariance,
            "embedding_std": 0.5 * (embedding_std(z_a) + embedding_std(z_b)),
        }

    def get_config(self):
        predictor = self.predictor_spec
        if predictor is None and self.predictor is not None:
            predictor = keras.saving.serialize_keras_object(self.predictor)
        return {
            **super().get_config(),
            "predictor": predictor,
            "variance_weight": self.variance_weight,
            "covariance_weight": self.covariance_weight,
            "gamma": self.gamma,
            "eps": self.eps,
            "output_batchnorm": self.output_batchnorm,
            "predictor_bias": self.predictor_bias,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.setdefault("output_batchnorm", False)  # saved before 2026-12-02: built without them
        config.setdefault("predictor_bias", False)
        return super().from_config(config)


@keras.saving.register_keras_serializable(package="vicreg_tf")
class SimSiam(_Predicting):
    """SimSiam: expander, predictor, stop-gradient, symmetric negative cosine similarity.

    loss = 1/2 D(p_a, sg(z_b)) + 1/2 D(p_b, sg(z_a))
           + variance_weight * (v(z_a) + v(z_b)) / 2 + covariance_weight * (c(z_a) + c(z_b)),
    with D = -cosine, p the predictor's output, z the expander's, sg stop-gradient
    and v, c VICReg's variance and covariance terms on the expander outputs
    gathered from all replicas (VICReg Sec. 5: mu = 1, nu = 0.01 there; 0 here
    gives plain SimSiam). As the official builder: the expander ends in a
    BatchNorm without scale and offset, the predictor's last layer has a bias.
    Metrics: loss, negative_cosine, variance, covariance, embedding_std.

    Args:
        backbone: a Keras model from inputs to features (N, F).
        projector: the expander spec (Dense-BN-ReLU blocks, last linear) or a model.
        predictor: the predictor's hidden widths as a spec ("512": Dense 512 -
            BN - ReLU - Dense D, D the expander's width), a Keras model from
            (N, D) to (N, D), or None for no predictor (p = z; VICReg Table 4's
            "SimSiam without predictor", which collapses without the variance term).
        variance_weight, covariance_weight: mu and nu of the regularizer.
        output_batchnorm: the expander's final BatchNorm (affine=False), as SimSiam.
        predictor_bias: a bias on the predictor's output layer, as SimSiam.
        gamma, eps, **kwargs: as in `VICReg` (second_backbone, device_views, ...).

    Example:
    >>> backbone = vicreg_tf.backbones.small_cnn((28, 28, 1))
    >>> model = SimSiam(backbone, projector="512-512", predictor="128", variance_weight=1.0)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    >>> model.fit(vicreg_tf.data.view_pairs(source, views, batch_size=256), epochs=1)
    """

    def __init__(self, backbone: keras.Model, projector="2048-2048-2048", predictor="512", *,
                 variance_weight: float = 0.0, covariance_weight: float = 0.0, gamma: float = 1.0,
                 eps: float = 1e-4, output_batchnorm: bool = True, predictor_bias: bool = True, **kwargs):
        super().__init__(backbone, projector, predictor, variance_weight=variance_weight,
                         covariance_weight=covariance_weight, gamma=gamma, eps=eps,
                         output_batchnorm=output_batchnorm, predictor_bias=predictor_bias, **kwargs)

    def compute_terms(self, view_a, view_b, training: bool = False) -> dict[str, tf.Tensor]:
        terms = self._predicted_terms(view_a, view_b, training)
        terms["loss"] = terms["negative_cosine"] + terms.pop("regularizer")
        return terms


def byol_target_decay(step, total_steps: int, tau_base: float = 0.996) -> tf.Tensor:
    """BYOL's EMA decay at step k: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (Sec. 3.2).

    tau_base at k = 0, rising to 1 at k = K; constant tau_base when K <= 0.
    """
    if total_steps <= 0:
        return tf.constant(tau_base, tf.float32)
    progress = tf.minimum(tf.cast(step, tf.float32), float(total_steps)) / float(total_steps)
    return 1.0 - (1.0 - tau_base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


@keras.saving.register_keras_serializable(package="vicreg_tf")
class BYOL(_Predicting):
    """BYOL: a predictor against a momentum (EMA) target encoder, with BYOL's loss.

    loss = mean(2 - 2 cos(p_a, sg(t_b))) + mean(2 - 2 cos(p_b, sg(t_a)))
           + variance_weight * (v(z_a) + v(z_b)) / 2 + covariance_weight * (c(z_a) + c(z_b)),
    BYOL's own scale (Eq. 2 and its symmetrised sum): 4 + 4 x the reported
    `negative_cosine`, so its gradients are 4x SimSiam's and the paper's
    learning rate and weight decay carry over. The target branch is a copy of
    backbone + expander (`target_backbone`, `target_projector`) that receives no
    gradient (BatchNorm in it still normalises with batch statistics while
    training, as in BYOL); after every step the optimizer applied (not one the
    non-finite guard skipped) each target weight moves to
    tau * target + (1 - tau) * online, with tau from `byol_target_decay` at the
    step's index (the base's momentum update, once per device).

    Args:
        backbone, projector, predictor, variance_weight, covariance_weight:
            as in `SimSiam` (BYOL's predictor: hidden width 4096 on ImageNet).
        tau_base: the EMA decay at step 0 (BYOL: 0.996).
        total_steps: K of the cosine schedule, the number of training steps;
            0 keeps tau = tau_base (fit warns).
        gamma, eps, **kwargs: as in `VICReg` (device_views, ...; no second_backbone).

    Example:
    >>> model = BYOL(vicreg_tf.backbones.small_cnn((28, 28, 1)), projector="512-256",
    ...              predictor="512", total_steps=epochs * steps_per_epoch)
    """

    def __init__(self, backbone: keras.Model, projector="4096-256", predictor="4096", *, tau_base: float = 0.996,
                 total_steps: int = 0, variance_weight: float = 0.0, covariance_weight: float = 0.0,
                 gamma: float = 1.0, eps: float = 1e-4, predictor_bias: bool = True, **kwargs):
        if kwargs.get("second_backbone") is not None:
            raise ValueError("BYOL's target is a momentum copy of one backbone: second_backbone is not supported")
        kwargs.pop("output_batchnorm", None)  # BYOL's expander has no output BatchNorm
        super().__init__(backbone, projector, predictor, variance_weight=variance_weight,
                         covariance_weight=covariance_weight, gamma=gamma, eps=eps, output_batchnorm=False,
                         predictor_bias=predictor_bias, **kwargs)
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
        shape = feature_shape(self.target_backbone)
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

    def momentum_pairs(self) -> list:
        return self._ema_pairs

    def momentum_rate(self, step) -> tf.Tensor:
        return 1.0 - byol_target_decay(step, self.total_steps, self.tau_base)

    def targets(self, view_a, view_b, z_a, z_b, training: bool):
        def embed(x):
            return self.target_projector(self.target_backbone(x, training=training), training=training)

        return tf.stop_gradient(embed(view_a)), tf.stop_gradient(embed(view_b))

    def compute_terms(self, view_a, view_b, training: bool = False) -> dict[str, tf.Tensor]:
        terms = self._predicted_terms(view_a, view_b, training)
        # sum over both directions of mean(2 - 2 cos) = 4 + 2 (D_ab + D_ba) = 4 + 4 x negative_cosine
        terms["loss"] = 4.0 + 4.0 * terms["negative_cosine"] + terms.pop("regularizer")
        return terms

    def make_train_function(self, force=False):
        if self.total_steps <= 0 and not getattr(self, "_warned_total_steps", False):
            self._warned_total_steps = True
            warnings.warn(
                f"BYOL(total_steps=0): the target's EMA decay stays at tau_base={self.tau_base} for the whole "
                "run; pass total_steps=epochs * steps_per_epoch for BYOL's cosine schedule to 1",
                stacklevel=2,
            )
        return super().make_train_function(force=force)

    def get_config(self):
        config = {**super().get_config(), "tau_base": self.tau_base, "total_steps": self.total_steps}
        config.pop("output_batchnorm")
        return config


@keras.saving.register_keras_serializable(package="vicreg_tf")
class EntropyVICReg(BaseMethod):
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
        **kwargs: as in `VICReg` (second_backbone, device_views, ...).

    Example:
    >>> model = EntropyVICReg(vicreg_tf.backbones.small_cnn((28, 28, 1)), "1024-1024-1024", entropy="logdet")
    >>> model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    """

    metric_names = ("loss", "invariance", "entropy", "variance", "covariance", "embedding_std")

    def __init__(self, backbone: keras.Model, projector="8192-8192-8192", *, entropy: str = "logdet",
                 invariance_weight: float = 25.0, entropy_weight: float | None = None, beta: float = 1e-3,
                 kernel_width: float | None = None, gamma: float = 1.0, eps: float = 1e-4, **kwargs):
        if entropy not in ENTROPY_ESTIMATORS:
            raise ValueError(f"entropy must be one of {ENTROPY_ESTIMATORS}, got {entropy!r}")
        if beta <= 0 or (kernel_width is not None and kernel_width <= 0):
            raise ValueError(f"beta and kernel_width must be > 0, got beta={beta}, kernel_width={kernel_width}")
        super().__init__(backbone, projector, **kwargs)
        self.entropy = entropy
        self.invariance_weight = float(invariance_weight)
        self.entropy_weight = None if entropy_weight is None else float(entropy_weight)
        self.beta = float(beta)
        self.kernel_width = None if kernel_width is None else float(kernel_width)
        self.gamma = float(gamma)
        self.eps = float(eps)

    def compute_terms(self, view_a, view_b, training: bool = False) -> dict[str, tf.Tensor]:
        z_a, z_b = self.gather(*self.embed(view_a, view_b, training))
        terms = entropy_loss(
            z_a, z_b, entropy=self.entropy, invariance_weight=self.invariance_weight,
            entropy_weight=self.entropy_weight, beta=self.beta, kernel_width=self.kernel_width,
        )
        terms["variance"], terms["covariance"] = _regularizer_terms(
            tf.stop_gradient(z_a), tf.stop_gradient(z_b), self.gamma, self.eps)
        terms["embedding_std"] = 0.5 * (embedding_std(z_a) + embedding_std(z_b))
        return terms

    def get_config(self):
        return {
            **super().get_config(),
            "entropy": self.entropy,
            "invariance_weight": self.invariance_weight,
            "entropy_weight": self.entropy_weight,
            "beta": self.beta,
            "kernel_width": self.kernel_width,
            "gamma": self.gamma,
            "eps": self.eps,
        }


# config.model.method -> builder(backbone, config.model, total_steps). A new method: its class and one line here.
def _vicreg(backbone, model, total_steps):
    return VICReg(backbone, model.projector, invariance_weight=model.invariance_weight,
                  variance_weight=model.variance_weight, covariance_weight=model.covariance_weight)


def _simsiam(backbone, model, total_steps):
    return SimSiam(backbone, model.projector, predictor=model.predictor or None,
                   variance_weight=model.regularizer_variance_weight,
                   covariance_weight=model.regularizer_covariance_weight)


def _byol(backbone, model, total_steps):
    return BYOL(backbone, model.projector, predictor=model.predictor or None, tau_base=model.tau_base,
                total_steps=total_steps, variance_weight=model.regularizer_variance_weight,
                covariance_weight=model.regularizer_covariance_weight)


def _entropy(kind):
    def build(backbone, model, total_steps):
        return EntropyVICReg(backbone, model.projector, entropy=kind, invariance_weight=model.invariance_weight,
                             entropy_weight=model.entropy_weight, beta=model.entropy_beta,
                             kernel_width=model.kernel_width)
    return build


METHODS = {
    "vicreg": _vicreg,
    "simsiam": _simsiam,
    "byol": _byol,
    "logdet": _entropy("logdet"),
    "pairwise": _entropy("pairwise"),
}
