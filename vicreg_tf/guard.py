"""The non-finite step guard: a step whose loss or gradients are not finite is applied on no replica.

`apply_if_finite` decides once for all replicas (one all-reduced flag), applies the
gradients or restores the BatchNorm statistics the forward pass changed, and runs
float16 loss scaling on the same decision. Checked on the gradients, not only the
loss: a NaN input can give a finite loss (oneDNN's fused BatchNorm turns NaN
activations into zeros) and NaN gradients.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

NON_FINITE_LOSS_MESSAGE = (
    "VICReg loss is not finite (NaN or Inf); stopping instead of training on it. "
    "Usual causes: a learning rate too high for the batch size, inputs with NaN, "
    "or float16 without loss scaling."
)
NON_FINITE_STEP_MESSAGE = (
    "VICReg step not applied: the loss or the gradients are not finite (NaN or Inf); "
    "the weights and BatchNorm statistics were left as they were before this step. "
    "Usual causes: inputs with NaN or Inf, a learning rate too high for the batch size, "
    "or float16 without loss scaling."
)
# Gradients must also be small enough to square: Adam's second moment and LARS' norms
# square them, and a finite gradient whose square overflows (|g| > 1.8e19, a diverging
# run) would still put NaN in the weights.
_LARGEST_SQUARABLE = 1.8e19  # sqrt of the largest float32, 3.4e38


def all_replicas_finite(loss: tf.Tensor, gradients) -> tf.Tensor:
    """True when `loss` and every gradient on every replica are finite and squarable (a scalar bool)."""
    ok = [tf.math.is_finite(tf.cast(loss, tf.float32))]
    for gradient in gradients:
        if gradient is None:
            continue
        if isinstance(gradient, tf.IndexedSlices):
            gradient = gradient.values
        ok.append(tf.reduce_all(tf.abs(tf.cast(gradient, tf.float32)) < _LARGEST_SQUARABLE))  # NaN compares false
    bad = tf.cast(tf.logical_not(tf.reduce_all(tf.stack(ok))), tf.float32)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        bad = context.all_reduce(tf.distribute.ReduceOp.SUM, bad)  # ReduceOp has no MIN
    return bad < 0.5


def unscale(optimizer, gradients) -> list:
    """The gradients of a loss scaled by `optimizer.scale_loss`, back at the loss' own scale."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return gradients
    scale = tf.cast(optimizer.dynamic_scale, tf.float32)
    return [None if g is None else g / tf.cast(scale, g.dtype) for g in gradients]


def guarded_apply(optimizer, loss, gradients, variables, state, saved, *, assert_finite: bool):
    """Applies `gradients` where loss and gradients are finite on every replica.

    Returns `(applied, loss_ok)`: whether the step was applied, and whether its
    loss is one to report (under float16 loss scaling a skipped overflow step
    still reports its finite loss).

    `state` / `saved`: the variables the forward pass changed (BatchNorm moving
    statistics) and their values before it, restored on a skipped step.
    `assert_finite`: raise (`NON_FINITE_STEP_MESSAGE`) on a skipped step; XLA
    compiles no assertion, so `StopOnNonFiniteLoss` ends fit there. Under float16
    loss scaling an overflow is expected now and then: the step is skipped
    everywhere and the scale halved; only a non-finite loss raises.
    """
    finite = all_replicas_finite(loss, gradients)
    applied = _apply_if_finite(optimizer, finite, gradients, variables, state, saved)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        finite = tf.math.is_finite(loss)
    if assert_finite:
        with tf.control_dependencies([applied]):
            tf.debugging.Assert(finite, [NON_FINITE_STEP_MESSAGE, "loss:", loss])
    return applied, finite


def nan_unless(loss_ok: tf.Tensor, loss: tf.Tensor) -> tf.Tensor:
    """The loss where `loss_ok`, else NaN (so logs and StopOnNonFiniteLoss see a skipped step)."""
    return tf.where(loss_ok, loss, tf.constant(math.nan, loss.dtype))


def _apply_if_finite(optimizer, finite, gradients, variables, state, saved) -> tf.Tensor:
    """Applies the gradients when `finite` (the same on every replica), else restores `state`.

    Under mixed_float16 (a `keras.optimizers.LossScaleOptimizer`, `gradients`
    already unscaled) the inner optimizer applies them and the dynamic loss
    scale follows the same decision: doubled after `dynamic_growth_steps` good
    steps, halved on a skipped one (Keras' rule, on the all-replica flag).
    """
    scaler = optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else None
    inner = scaler.inner_optimizer if scaler is not None else optimizer

    def apply(grads):
        inner.apply_gradients(zip(grads, variables))
        return tf.constant(True)

    def grow_scale():
        if scaler is not None:
            tf.cond(
                tf.equal(scaler.step_counter, scaler.dynamic_growth_steps - 1),
                lambda: _assign_all((scaler.step_counter, 0), (scaler.dynamic_scale, scaler.dynamic_scale * 2.0)),
                lambda: _assign_all((scaler.step_counter, scaler.step_counter + 1)),
            )
        return tf.constant(True)

    def shrink_scale():
        if scaler is not None:
            _assign_all((scaler.step_counter, 0), (scaler.dynamic_scale, scaler.dynamic_scale * 0.5))
        return tf.constant(False)

    if not tf.distribute.has_strategy():
        def apply_here():
            with tf.control_dependencies([apply(gradients)]):
                return grow_scale()

        def skip_here():
            with tf.control_dependencies([_restore(state, saved)]):
                return shrink_scale()

        return tf.cond(finite, apply_here, skip_here)

    # Under a strategy the optimizer's update holds a `merge_call` (its `iterations`
    # is an only-first-replica variable), which cannot sit in a cond in a replica
    # context, even where the strategy otherwise runs without merge_call (XLA on
    # GPUs): take the cond in the cross-replica context (as Keras'
    # LossScaleOptimizer does), where `finite` is one value for all replicas.
    def cross_replica(distribution, finite, gradients, saved):
        call = distribution.extended.call_for_each_replica

        def apply_all():
            call(apply, args=(gradients,))
            return grow_scale()

        def restore_all():
            call(lambda values: _restore(state, values), args=(saved,))
            return shrink_scale()

        return tf.cond(distribution.experimental_local_results(finite)[0], apply_all, restore_all)

    return tf.distribute.get_replica_context().merge_call(cross_replica, args=(finite, gradients, saved))


def _restore(state, saved) -> tf.Tensor:
    for variable, value in zip(state, saved):
        variable.assign(value)
    return tf.constant(False)


def _assign_all(*pairs) -> tf.Tensor:
    for variable, value in pairs:
        variable.assign(tf.cast(value, variable.dtype))
    return tf.constant(True)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Ends `fit` with a clear error as soon as a batch reports a NaN or Inf loss.

    The train step never applies a step whose loss or gradients are not finite:
    the weights, the optimizer state and the BatchNorm moving statistics stay as
    they were before it, and the step reports a NaN loss. Without XLA the step
    then raises itself; with `jit_compile=True` (no in-graph assertions) this
    callback ends fit.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            terms = {k: float(v) for k, v in logs.items() if not k.startswith("val_")}
            raise FloatingPointError(f"{NON_FINITE_LOSS_MESSAGE} Batch {batch}: {terms}")
