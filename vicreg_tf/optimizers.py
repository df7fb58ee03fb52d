"""LARS (Keras has none) and the paper's warmup + cosine learning-rate schedule."""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vicreg_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling, exactly as in the official VICReg code.

    For each variable: the weight decay is added to the gradient, the result is
    scaled by the trust ratio eta * ||w|| / ||g + wd w|| (1 where a norm is 0),
    accumulated with momentum, and applied with the learning rate. Variables of
    rank 1 (biases, BatchNorm scale and offset) get neither weight decay nor
    the trust ratio, like `exclude_bias_and_norm` in the official code.

    Args:
        learning_rate: a float or a `keras.optimizers.schedules.LearningRateSchedule`.
        momentum: momentum of the update accumulator.
        weight_decay: L2 coefficient added to the gradient before the trust ratio.
        eta: trust coefficient.
        exclude_1d: exclude rank-1 variables from weight decay and the trust ratio.
        name, **kwargs: passed to `keras.optimizers.Optimizer` (e.g. `clipnorm`).

    Example:
    >>> optimizer = LARS(learning_rate=warmup_cosine(0.2, total_steps=1000, warmup_steps=100))
    """

    def __init__(
        self,
        learning_rate=0.2,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
        exclude_1d: bool = True,
        name: str = "lars",
        **kwargs,
    ):
        kwargs.pop("weight_decay", None)
        # Keras' own `weight_decay` is decoupled (applied after the update); LARS
        # needs it inside the gradient, so the base class gets None.
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
        if momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS needs momentum >= 0, weight_decay >= 0 and eta > 0, got "
                f"momentum={momentum}, weight_decay={weight_decay}, eta={eta}"
            )
        self.momentum = momentum
        self.lars_weight_decay = weight_decay
        self.eta = eta
        self.exclude_1d = exclude_1d

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._momentums = [
            self.add_variable_from_reference(v, name="momentum") for v in variables
        ]

    def _adapts(self, variable) -> bool:
        return not (self.exclude_1d and len(variable.shape) <= 1)

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        update = ops.cast(gradient, variable.dtype)
        if self._adapts(variable):
            update = update + self.lars_weight_decay * variable
            param_norm = ops.sqrt(ops.sum(ops.square(variable)))
            update_norm = ops.sqrt(ops.sum(ops.square(update)))
            trust = ops.where(
                param_norm > 0.0,
                ops.where(update_norm > 0.0, self.eta * param_norm / update_norm, 1.0),
                1.0,
            )
            update = update * trust
        momentum = self._momentums[self._get_variable_index(variable)]
        self.assign(momentum, self.momentum * momentum + update)
        self.assign_sub(variable, lr * momentum)

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            weight_decay=self.lars_weight_decay,
            eta=self.eta,
            exclude_1d=self.exclude_1d,
        )
        return config


def warmup_cosine(
    peak_learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    final_fraction: float = 0.001,
) -> keras.optimizers.schedules.CosineDecay:
    """Linear warmup from 0 to the peak, then cosine decay to `final_fraction` x peak.

    The official schedule (`adjust_learning_rate` in main_vicreg.py), built on
    Keras' own `CosineDecay` with warmup.
    """
    if total_steps <= 0 or warmup_steps < 0 or warmup_steps >= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=total_steps - warmup_steps,
        alpha=final_fraction,
        warmup_target=peak_learning_rate,
        warmup_steps=warmup_steps,
    )


def scaled_learning_rate(base_learning_rate: float, global_batch_size: int) -> float:
    """The paper's linear scaling rule: base_lr x global batch / 256."""
    return base_learning_rate * global_batch_size / 256.0
