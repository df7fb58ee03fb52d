"""The VICReg Keras model: backbone + expander, trained with the VICReg loss in `train_step`."""
from __future__ import annotations

import functools
import math
import warnings

import keras
import tensorflow as tf

from vicreg_tf.distribute import gather_replicas, num_replicas
from vicreg_tf.losses import vicreg_loss
from vicreg_tf.projector import build_projector

_METRIC_NAMES = ("loss", "invariance", "variance", "covariance", "embedding_std")

# Keras warns on every `fit(dataset)` with its default shuffle=True that the flag is ignored
# for a tf.data.Dataset (it is shuffled in the pipeline, vicreg_tf.data.view_pairs does): noise.
warnings.filterwarnings(
    "ignore",
    message=r"`shuffle=True` was passed, but will be ignored since the data `x` was provided as a tf\.data\.Dataset",
    category=UserWarning,
)
_NON_FINITE_MESSAGE = (
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


def _feature_shape(backbone, input_spec=None) -> tuple | None:
    """The backbone's output shape (N, F) without data: from a functional model's output, else traced
    symbolically from its input shape (a Sequential with an Input) or from `input_spec` (a first batch)."""
    try:
        shape = tuple(backbone.output.shape)
    except (AttributeError, ValueError):
        shape = None
    if shape is None:
        spec = input_spec
        if spec is None:
            input_shape = _input_shape(backbone)
            spec = keras.KerasTensor(input_shape, dtype=_input_dtype(backbone)) if input_shape else None
        if spec is None:
            return None
        try:
            shape = tuple(backbone.compute_output_spec(spec).shape)
        except Exception:  # noqa: BLE001  a model that cannot trace symbolically: built on the first batch
            return None
    return shape if len(shape) == 2 and shape[-1] is not None else None


def synchronize_batchnorm(model: keras.layers.Layer) -> None:
    """Makes every BatchNormalization in `model` compute its batch statistics over all replicas.

    Keras reads `synchronized` at call time, so this converts a built model in
    place; inference (moving statistics) is unchanged.
    """
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def _fused_batchnorm_call(layer, inputs, training=None, mask=None):
    """`BatchNormalization.call` through TensorFlow's fused kernel where that gives the same result.

    Keras 3 normalises with separate element-wise ops (moments, then
    scale-and-shift, and as many again backward); TF's FusedBatchNormV3 does each
    direction in one pass. Taken in training mode for NHWC or 2-D inputs
    normalised over the last axis, on one replica (or with `synchronized=False`),
    without mask or renorm; synchronized over several replicas it takes
    `_packed_sync_batchnorm_call` (one all-reduce); anything else goes to Keras' own code. Same
    statistics as Keras: the batch variance used for the moving average is the
    biased one (TF's kernel returns the unbiased one; it is converted back).
    """
    rank = len(inputs.shape)
    eligible = (
        not isinstance(training, tf.Tensor) and bool(training) and layer.trainable
        and mask is None and not layer.renorm and rank in (2, 4)
        and layer.axis in (-1, rank - 1) and inputs.shape[-1] is not None
        and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16)
    )
    if not eligible:
        return type(layer).call(layer, inputs, training=training, mask=mask)
    if layer.synchronized and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        return _packed_sync_batchnorm_call(layer, inputs)
    channels = inputs.shape[-1]
    x = tf.cast(inputs, tf.float32)  # Keras also normalises half-precision inputs in float32
    if rank == 2:
        x = tf.reshape(x, [-1, 1, 1, channels])
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels], tf.float32)
    offset = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels], tf.float32)
    y, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
        x, scale, offset, epsilon=layer.epsilon, data_format="NHWC", is_training=True
    )
    count = tf.cast(tf.size(x) // channels, tf.float32)
    variance = unbiased_variance * tf.maximum(count - 1.0, 0.0) / count
    momentum = layer.momentum
    layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(
        tf.cast(layer.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum)
    )
    if rank == 2:
        y = tf.reshape(y, tf.shape(inputs))
    return tf.cast(y, layer.compute_dtype)


def _packed_sync_batchnorm_call(layer, inputs):
    """Synchronized BatchNorm in training with one all-reduce per call instead of Keras' three.

    Keras all-reduces the sum, the sum of squares and the count separately (three
    collectives forward, three more for their gradients); here they travel
    concatenated in one tensor. Same arithmetic as Keras' `_compute_moments_sync`:
    mean = sum / n, variance = max(E[x^2] - mean^2, 0), in float32.
    """
    channels = inputs.shape[-1]
    x = tf.cast(inputs, tf.float32)
    axes = list(range(len(x.shape) - 1))
    count = tf.cast(tf.size(x) // channels, tf.float32)
    packed = tf.concat([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count[None]], axis=0)
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, packed)
    total_sum, total_squares, total_count = total[:channels], total[channels:2 * channels], total[2 * channels]
    mean = tf.math.divide_no_nan(total_sum, total_count)
    variance = tf.maximum(tf.math.divide_no_nan(total_squares, total_count) - tf.square(mean), 0.0)
    momentum = layer.momentum
    layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(
        tf.cast(layer.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum)
    )
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else None
    offset = tf.cast(layer.beta, tf.float32) if layer.center else None
    y = tf.nn.batch_normalization(x, mean, variance, offset, scale, layer.epsilon)
    return tf.cast(y, layer.compute_dtype)


def use_fused_batchnorm(model: keras.layers.Layer, enabled: bool = True) -> None:
    """Routes every BatchNormalization in `model` through TF's fused kernel in training (or back).

    An instance-level switch, not a new layer class: the layers stay plain
    `keras.layers.BatchNormalization`, so saved backbones load without vicreg_tf.
    Measured in bench/throughput.py (2-core CPU, small CNN): see docs/BENCHMARKS.md.
    """
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            if enabled:
                layer.call = functools.partial(_fused_batchnorm_call, layer)
            elif "call" in layer.__dict__:
                del layer.__dict__["call"]


def _embedding_std(z: tf.Tensor) -> tf.Tensor:
    """Mean over dimensions of the per-dimension std: 0 means collapse."""
    return tf.reduce_mean(tf.math.reduce_std(tf.stop_gradient(z), axis=0))


@keras.saving.register_keras_serializable(package="vicreg_tf")
class VICReg(keras.Model):
    """VICReg: a backbone and an expander trained on pairs of views with the VICReg loss.

    `call(x)` returns the backbone's features, so `predict` and export give
    representations. `fit` takes a dataset of `(view_a, view_b)` batches
    (or `((view_a, view_b), labels)`, labels ignored). Under any
    `tf.distribute` strategy the embeddings are all-gathered across replicas
    before the loss, so variance and covariance see the global batch, and the
    loss is divided by the number of replicas before the gradient (Keras sums
    gradients across replicas); the reported metrics are the unscaled values.

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
        sync_batchnorm: make every BatchNormalization of the backbone(s)
            synchronized across replicas, like the official code's
            `convert_sync_batchnorm` (the expander's always is).
        fused_batchnorm: run BatchNormalization through TF's fused kernel while
            training where the result is the same (see `use_fused_batchnorm`).
        device_views: a `vicreg_tf.augment.TwoViews` (or its config) that makes
            the views inside the train step, on the accelerator, from batches of
            uint8 crops (`vicreg_tf.training.view_pair_batches(device_views=True)`):
            the CPU only decodes and crops. Same views as the CPU path for the
            same seeds. Its ops have data-dependent shapes: use `jit_compile=False`.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:
    >>> backbone = vicreg_tf.backbones.small_cnn((28, 28, 1))
    >>> model = VICReg(backbone, projector="512-512-512")
    >>> model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    >>> model.fit(vicreg_tf.data.view_pairs(source, views, batch_size=256), epochs=1)
    """

    def __init__(
        self,
        backbone: keras.Model,
        projector="8192-8192-8192",
        *,
        second_backbone: keras.Model | None = None,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        sync_batchnorm: bool = True,
        fused_batchnorm: bool = True,
        device_views=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise TypeError(f"backbone must be a Keras model or layer, got {type(backbone).__name__}")
        self.backbone = backbone
        self.projector_spec = projector if isinstance(projector, str) else None
        self.projector = self._make_projector(projector, name="expander")
        self.second_backbone = second_backbone
        self.second_projector = None
        if second_backbone is not None:
            self.second_projector = self._make_projector(projector, name="expander_b", clone=True)
        self.invariance_weight = float(invariance_weight)
        self.variance_weight = float(variance_weight)
        self.covariance_weight = float(covariance_weight)
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.sync_batchnorm = bool(sync_batchnorm)
        if self.sync_batchnorm:
            for encoder in (backbone, second_backbone):
                if encoder is not None:
                    synchronize_batchnorm(encoder)
        self.fused_batchnorm = bool(fused_batchnorm)
        self.device_views = _as_two_views(device_views)
        for part in (backbone, second_backbone, self.projector, self.second_projector):
            if part is not None:
                use_fused_batchnorm(part, self.fused_batchnorm)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.invariance_tracker = keras.metrics.Mean(name="invariance")
        self.variance_tracker = keras.metrics.Mean(name="variance")
        self.covariance_tracker = keras.metrics.Mean(name="covariance")
        self.embedding_std_tracker = keras.metrics.Mean(name="embedding_std")
        self._build_expanders_from_backbones()

    @staticmethod
    def _make_projector(projector, *, name: str, clone: bool = False) -> keras.layers.Layer:
        if isinstance(projector, str):
            return build_projector(projector, name=name)
        if isinstance(projector, keras.layers.Layer):
            return keras.models.clone_model(projector) if clone else projector
        raise TypeError(
            "projector must be a spec string like '8192-8192-8192' or a Keras model, "
            f"got {type(projector).__name__}"
        )

    def _build_expanders_from_backbones(self) -> None:
        # Building now (not on the first batch) lets Keras create every variable,
        # optimizer slots included, before tracing, and lets .keras files reload.
        pairs = [(self.backbone, self.projector)]
        if self.second_backbone is not None:
            pairs.append((self.second_backbone, self.second_projector))
        for backbone, projector in pairs:
            if not projector.built:
                shape = _feature_shape(backbone)
                if shape is not None:
                    projector.build(shape)
        # Keras reloads optimizer slots from a .keras file only into a built model.
        self.built = all(layer.built for backbone_projector in pairs for layer in backbone_projector)

    def _build_from_views(self, data) -> None:
        """Builds what __init__ could not (a backbone whose input shape is not declared) from a batch's shapes."""
        if all(layer.built for layer in self._flatten_layers(include_self=False)):
            return
        specs = _view_specs(data)
        if specs is None:
            return
        pairs = [(self.backbone, self.projector, specs[0])]
        pairs.append((self.second_backbone or self.backbone, self.second_projector or self.projector, specs[1]))
        for backbone, projector, spec in pairs:
            if not projector.built:  # tracing the backbone symbolically also builds it
                shape = _feature_shape(backbone, spec)
                if shape is None:
                    raise ValueError(
                        f"VICReg cannot tell the backbone's output shape for inputs {_shape_text(spec.shape)}; "
                        "give the backbone a keras.Input or build it first: backbone.build(input_shape)")
                projector.build(shape)
        self._build_extra(specs)
        self.built = True

    def _build_extra(self, specs) -> None:
        """Layers a subclass adds beyond the backbones and expanders (e.g. a predictor): built here."""

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(input_shape)
        if not self.projector.built:
            features = self.backbone.compute_output_spec(keras.KerasTensor(input_shape))
            self.projector.build(features.shape)
        self.built = True

    def call(self, inputs, training=False):
        self._check_images(inputs, "images")
        return self.backbone(inputs, training=training)

    def _check_images(self, images, name: str, encoder=None) -> None:
        """Static checks at an encoder's entry: float images (where it takes floats), with a batch axis."""
        encoder = encoder or self.backbone
        dtype = getattr(images, "dtype", None)
        expected_dtype = _input_dtype(encoder)
        if dtype is not None and not _is_float_dtype(dtype) and _is_float_dtype(expected_dtype):
            raise TypeError(
                f"VICReg takes float images in [0, 1], got {_dtype_name(dtype)} {name}; divide by 255 "
                "(vicreg_tf.data.from_arrays does)"
            )
        expected = _input_shape(encoder)
        shape = getattr(images, "shape", None)
        if expected is None or shape is None or getattr(shape, "rank", len(shape)) is None:
            return
        if len(shape) != len(expected):
            hint = ""
            if len(shape) == len(expected) - 1:
                shape_tail, expected_tail = tuple(shape[1:]), tuple(expected[1:-1])
                if expected[-1] == 1 and shape_tail == expected_tail:
                    hint = " (grayscale images without a channel axis? add one: x[..., None])"
                else:
                    hint = " (a single image? add a batch axis: x[None])"
            which = "backbone" if encoder is self.backbone else "second backbone"
            raise ValueError(
                f"VICReg's {which} expects {name} of shape {_shape_text(expected)}, got shape "
                f"{_shape_text(shape)}{hint}"
            )

    # XLA where it can compile this model's step (`xla_refusal`): "auto" resolves to off where it
    # cannot work; an explicit jit_compile=True there raises a one-line ValueError in compile().
    @property
    def jit_compile(self):
        return keras.Model.jit_compile.fget(self)

    @jit_compile.setter
    def jit_compile(self, value):
        refusal = xla_refusal(getattr(self, "device_views", None) is not None, tf.distribute.get_strategy())
        if value and refusal:
            raise ValueError(f"jit_compile=True cannot work here: {refusal}; use jit_compile=False")
        keras.Model.jit_compile.fset(self, value)

    def _resolve_auto_jit_compile(self):
        if xla_refusal(getattr(self, "device_views", None) is not None, tf.distribute.get_strategy()):
            return False
        return super()._resolve_auto_jit_compile()

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.invariance_tracker,
            self.variance_tracker,
            self.covariance_tracker,
            self.embedding_std_tracker,
        ]

    # -- the step ------------------------------------------------------------

    def _unpack_views(self, data):
        if isinstance(data, dict) and "crops_a" in data:  # stage 2 of the views, here on the device
            if self.device_views is None:
                raise ValueError(
                    "got batches of crops (view_pair_batches(device_views=True)) but this VICReg has no "
                    "device_views: pass VICReg(..., device_views=the TwoViews of the pipeline)"
                )
            data = self.device_views.color(
                data["crops_a"], data["crops_b"], data["seed"][0], (data["row"], data["total"][0])
            )
        if isinstance(data, (tuple, list)) and len(data) in (2, 3) and isinstance(data[0], (tuple, list)):
            # ((view_a, view_b), labels[, weights]) from a labelled dataset, or Keras'
            # (x, y, sample_weight) packing in train_on_batch: only the views are used.
            data = data[0]
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            received = type(data).__name__ + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
            raise ValueError(
                f"VICReg expects batches of two views (view_a, view_b), got a {received}; "
                "build the dataset with vicreg_tf.data.view_pairs or map images to two views"
            )
        view_a, view_b = data
        a_shape, b_shape = tuple(view_a.shape), tuple(view_b.shape)
        if a_shape[0] is not None and b_shape[0] is not None and a_shape[0] != b_shape[0]:
            raise ValueError(
                f"the two views must have the same batch size, got view_a {a_shape} and view_b {b_shape}"
            )
        if self.second_backbone is None and a_shape[1:] != b_shape[1:]:
            raise ValueError(
                "with one shared backbone both views must have the same shape, got "
                f"view_a {a_shape} and view_b {b_shape}"
            )
        self._check_images(view_a, "view_a")
        self._check_images(view_b, "view_b", self.second_backbone)
        if self.jit_compile:  # XLA compiles no in-graph assertions; the static checks above remain
            return view_a, view_b
        # Batch sizes known only when running (a dataset batched without drop_remainder):
        # checked here, so the error names the views rather than an op deep in the loss.
        rows_a, rows_b = tf.shape(view_a)[0], tf.shape(view_b)[0]
        checks = [
            tf.debugging.assert_equal(
                rows_a, rows_b, message="VICReg: the two views must have the same batch size "
                "(view_a's rows, then view_b's, follow)", summarize=2,
            ),
            tf.debugging.assert_greater(
                rows_a * num_replicas(), 1, message="VICReg got a batch of 1 view pair; its variance and "
                "covariance need at least 2 per batch: batch with drop_remainder=True "
                "(vicreg_tf.data.view_pairs does)",
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(view_a), tf.identity(view_b)

    def _embed(self, view_a, view_b, training: bool):
        second_backbone = self.second_backbone or self.backbone
        second_projector = self.second_projector or self.projector
        z_a = self.projector(self.backbone(view_a, training=training), training=training)
        z_b = second_projector(second_backbone(view_b, training=training), training=training)
        return z_a, z_b

    def compute_vicreg_terms(self, data, training: bool = False) -> dict[str, tf.Tensor]:
        """Loss terms of one batch of view pairs, on embeddings gathered from all replicas."""
        view_a, view_b = self._unpack_views(data)
        z_a, z_b = self._embed(view_a, view_b, training)
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
        terms["embedding_std"] = 0.5 * (_embedding_std(z_a) + _embedding_std(z_b))
        return terms

    def _update_metrics(self, terms) -> dict[str, tf.Tensor]:
        for tracker, name in zip(self.metrics, _METRIC_NAMES):
            tracker.update_state(terms[name])
        results = {m.name: m.result() for m in self.metrics}
        if _multi_worker(self.distribute_strategy):
            # Keras reduces a multi-worker step's outputs with reduce("MEAN", axis=0),
            # which needs an axis; every worker holds the same (global) values.
            results = {name: value[None] for name, value in results.items()}
        return results

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' fit builds an unbuilt model from the first batch, which it first
        # reduces with MEAN across replicas; under MultiWorkerMirroredStrategy that
        # eager reduce of a PerReplica batch fails (Keras 3.15). VICReg builds
        # its layers in __init__, so only the optimizer may be left to build.
        if all(layer.built for layer in self._flatten_layers()):
            if self.optimizer is not None and not self.optimizer.built:
                with self.distribute_strategy.scope():
                    self.optimizer.build(self.trainable_variables)
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_step(self, data):
        self._build_from_views(data)  # a backbone without a declared input: built from this batch's shapes
        replicas = num_replicas()
        # The forward pass updates BatchNorm moving statistics; keep a copy (a few
        # floats per channel) so a step that is not applied leaves them untouched too.
        state = _batchnorm_statistics(self)
        saved = [tf.identity(v.value) for v in state]
        with tf.GradientTape() as tape:
            terms = self.compute_vicreg_terms(data, training=True)
            loss = terms["loss"]
            if self.losses:  # e.g. kernel regularizers of the backbone
                loss = loss + tf.add_n([tf.cast(l, tf.float32) for l in self.losses])
            # Keras sums gradients over replicas; every replica holds the same global loss.
            scaled = loss / replicas
            scaled = self.optimizer.scale_loss(scaled)  # x the dynamic loss scale under mixed_float16
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        loss_scaling = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        if loss_scaling:
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32)
            gradients = [None if g is None else g / tf.cast(scale, g.dtype) for g in gradients]
        # Checked on the gradients, not only the loss: a NaN input can give a finite
        # loss (oneDNN's fused BatchNorm turns NaN activations into zeros) and NaN
        # gradients. Decided over all replicas, so every replica takes the same branch
        # (also for float16 loss scaling: Keras' LossScaleOptimizer would decide from
        # the first replica's gradients alone, and apply another replica's Inf).
        finite = _all_replicas_finite(loss, gradients)
        applied = self._apply_if_finite(finite, gradients, variables, state, saved)
        if loss_scaling:
            # Overflowing float16 gradients are expected now and then: the step is
            # skipped everywhere and the scale halved; only a non-finite loss is an error.
            finite = tf.math.is_finite(loss)
        if not self.jit_compile:  # XLA has no in-graph assertions: StopOnNonFiniteLoss ends fit
            with tf.control_dependencies([applied]):
                tf.debugging.Assert(finite, [NON_FINITE_STEP_MESSAGE, "loss:", loss])
        # A skipped step reports a NaN loss, so logs and StopOnNonFiniteLoss see it.
        terms["loss"] = tf.where(finite, terms["loss"], tf.constant(math.nan, tf.float32))
        return self._update_metrics(terms)

    def _apply_if_finite(self, finite, gradients, variables, state, saved) -> tf.Tensor:
        """Applies the gradients when `finite` (the same on every replica), else restores `state`.

        Under mixed_float16 (a `keras.optimizers.LossScaleOptimizer`, `gradients`
        already unscaled) the inner optimizer applies them and the dynamic loss
        scale follows the same decision: doubled after `dynamic_growth_steps` good
        steps, halved on a skipped one (Keras' rule, on the all-replica flag).
        """
        optimizer = self.optimizer
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

        # Under a strategy the optimizer's update holds a `merge_call` (its
        # `iterations` is an only-first-replica variable), which cannot sit in a cond
        # in a replica context, even where the strategy otherwise runs without
        # merge_call (XLA on GPUs): take the cond in the cross-replica context (as
        # Keras' LossScaleOptimizer does), where `finite` is one value for all replicas.
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

    def test_step(self, data):
        self._build_from_views(data)
        return self._update_metrics(self.compute_vicreg_terms(data, training=False))

    # -- serialization ---------------------------------------------------------

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": serialize(self.backbone),
            "projector": self.projector_spec or serialize(self.projector),
            "second_backbone": serialize(self.second_backbone) if self.second_backbone is not None else None,
            "invariance_weight": self.invariance_weight,
            "variance_weight": self.variance_weight,
            "covariance_weight": self.covariance_weight,
            "gamma": self.gamma,
            "eps": self.eps,
            "sync_batchnorm": self.sync_batchnorm,
            "fused_batchnorm": self.fused_batchnorm,
            "device_views": self.device_views.get_config() if self.device_views is not None else None,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        config["backbone"] = deserialize(config["backbone"])
        if not isinstance(config["projector"], str):
            config["projector"] = deserialize(config["projector"])
        if config.get("second_backbone") is not None:
            config["second_backbone"] = deserialize(config["second_backbone"])
        return cls(**config)


def xla_refusal(device_views: bool, strategy) -> str:
    """Why XLA cannot compile the train step in this setup, or "" where it can.

    Three cases, found by tests/test_gpu_paths.py on TensorFlow's GPU code paths
    (docs/DISTRIBUTED.md): the view ops made inside the step have data-dependent
    shapes; Keras compiles one step of *every* local replica as one XLA cluster,
    which runs on one device and cannot read another device's variables
    (TensorFlow's XLA known issue "tf.Variable on a different device"; a plain
    Keras model fails the same way); and across workers the all-gather of the
    embeddings (CollectiveGatherV2) has no XLA kernel. XLA works on one replica.
    """
    if device_views:
        return ("views made on the device (device_views) have data-dependent shapes, which XLA does not "
                "compile; make the views on the host (config.views.on_device=off) to use XLA")
    try:
        local = len(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):  # the default strategy: one device
        local = 1
    if local > 1:
        return (f"{type(strategy).__name__} has {local} replicas on this worker, and Keras compiles all of them "
                "as one XLA cluster, which cannot read the other devices' variables")
    if strategy.num_replicas_in_sync > 1:
        return (f"the embeddings are all-gathered across {strategy.num_replicas_in_sync} replicas, and XLA has no "
                "kernel for that collective (CollectiveGatherV2)")
    return ""


def _as_two_views(views):
    if views is None:
        return None
    from vicreg_tf.augment import TwoViews

    if isinstance(views, TwoViews):
        return views
    if isinstance(views, dict):
        return TwoViews(**{k: v for k, v in views.items() if k not in ("name", "dtype", "trainable")})
    raise TypeError(f"device_views must be a vicreg_tf.augment.TwoViews or its config, got {type(views).__name__}")


def _is_float_dtype(dtype) -> bool:
    try:
        return tf.as_dtype(dtype).is_floating
    except TypeError:
        return "float" in str(dtype)


def _dtype_name(dtype) -> str:
    try:
        return tf.as_dtype(dtype).name
    except TypeError:
        return str(dtype)


def _input_shape(backbone) -> tuple | None:
    """The backbone's input shape (None, H, W, C) when it is known without data."""
    try:
        shape = backbone.input_shape
    except (AttributeError, ValueError):
        return None
    return tuple(shape) if isinstance(shape, tuple) and shape and not isinstance(shape[0], tuple) else None


def _input_dtype(encoder) -> str:
    """The dtype an encoder's (first) input declares; float32 when it declares none."""
    try:
        return keras.backend.standardize_dtype(encoder.inputs[0].dtype)
    except (AttributeError, IndexError, TypeError, ValueError):
        return "float32"


def _view_specs(data):
    """KerasTensors of the two views of a batch (its structure as `_unpack_views` reads it), or None."""
    if isinstance(data, dict) and "crops_a" in data:
        a, b = data["crops_a"], data["crops_b"]
        return keras.KerasTensor(a.shape, "float32"), keras.KerasTensor(b.shape, "float32")
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and isinstance(data[0], (tuple, list)):
        data = data[0]
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return None
    return tuple(keras.KerasTensor(tuple(v.shape), keras.backend.standardize_dtype(v.dtype)) for v in data)


def _shape_text(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


_LARGEST_SQUARABLE = 1.8e19  # sqrt of the largest float32, 3.4e38


def _batchnorm_statistics(model) -> list:
    """The moving mean and variance of every BatchNormalization in `model` (not other non-trainables,
    e.g. a BYOL target network, which the forward pass does not change)."""
    return [
        variable
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
        for variable in (layer.moving_mean, layer.moving_variance)
    ]


def _restore(state, saved) -> tf.Tensor:
    for variable, value in zip(state, saved):
        variable.assign(value)
    return tf.constant(False)


def _assign_all(*pairs) -> tf.Tensor:
    for variable, value in pairs:
        variable.assign(tf.cast(value, variable.dtype))
    return tf.constant(True)


def _all_replicas_finite(loss: tf.Tensor, gradients) -> tf.Tensor:
    """True when `loss` and every gradient on every replica are finite (a scalar bool)."""
    # Gradients must also be small enough to square: Adam's second moment and LARS'
    # norms square them, and a finite gradient whose square overflows (|g| > 1.8e19,
    # a diverging run) would still put NaN in the weights. NaN compares false.
    ok = [tf.math.is_finite(tf.cast(loss, tf.float32))]
    for gradient in gradients:
        if gradient is None:
            continue
        if isinstance(gradient, tf.IndexedSlices):
            gradient = gradient.values
        ok.append(tf.reduce_all(tf.abs(tf.cast(gradient, tf.float32)) < _LARGEST_SQUARABLE))
    bad = tf.cast(tf.logical_not(tf.reduce_all(tf.stack(ok))), tf.float32)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        bad = context.all_reduce(tf.distribute.ReduceOp.SUM, bad)
    return bad < 0.5


def _multi_worker(strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Ends `fit` with a clear error as soon as a batch reports a NaN or Inf loss.

    `VICReg.train_step` never applies a step whose loss or gradients are not
    finite: the weights, the optimizer state and the BatchNorm moving statistics
    stay as they were before it, and the step reports a NaN loss. Without XLA the
    step then raises itself; with `jit_compile=True` (no in-graph assertions)
    this callback ends fit.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            terms = {k: float(v) for k, v in logs.items() if k in _METRIC_NAMES}
            raise FloatingPointError(f"{_NON_FINITE_MESSAGE} Batch {batch}: {terms}")
