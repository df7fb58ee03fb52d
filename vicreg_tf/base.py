"""The base of the VICReg family: one train step for every method, each method only its loss terms.

`BaseMethod` owns what every joint-embedding method shares: backbone(s) and
expander(s), views made on the device, synchronized and fused BatchNorm, the
model's entry checks, and the step, which reads like Keras' own:

    views -> forward + terms (the method's `compute_terms`) -> loss / replicas ->
    scale -> gradients -> guarded apply (`vicreg_tf.guard`) -> momentum targets -> metrics

A method subclasses it, names its metrics (`metric_names`, the keys its terms
return) and overrides `compute_terms(view_a, view_b, training)`; a momentum method
also declares `momentum_pairs()` and `momentum_rate(step)` and the base updates the
pairs after every applied step. VICReg, SimSiam, BYOL and EntropyVICReg are
siblings on it (`vicreg_tf.model`, `vicreg_tf.methods`).
"""
from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from vicreg_tf import compat, guard
from vicreg_tf.batchnorm import batchnorm_statistics, synchronize_batchnorm, use_fused_batchnorm
from vicreg_tf.distribute import gather_replicas, num_replicas
from vicreg_tf.projector import build_projector

# Keras warns on every `fit(dataset)` with its default shuffle=True that the flag is ignored
# for a tf.data.Dataset (it is shuffled in the pipeline, vicreg_tf.data.view_pairs does): noise.
warnings.filterwarnings(
    "ignore",
    message=r"`shuffle=True` was passed, but will be ignored since the data `x` was provided as a tf\.data\.Dataset",
    category=UserWarning,
)


class BaseMethod(keras.Model):
    """A backbone and an expander trained on pairs of views; subclasses give the loss.

    `call(x)` returns the backbone's features, so `predict` and export give
    representations. `fit` takes a dataset of `(view_a, view_b)` batches (or
    `((view_a, view_b), labels)`, labels ignored), or the crops of
    `vicreg_tf.data.view_pair_batches(device_views=True)`. Under any
    `tf.distribute` strategy the embeddings are all-gathered across replicas
    before the loss (`gather`), the loss is divided by the number of replicas
    before the gradient (Keras sums gradients across replicas), and a step whose
    loss or gradients are not finite on any replica is applied on none.

    Args:
        backbone: a Keras model from inputs to a feature vector (N, F).
        projector: an expander spec such as "8192-8192-8192" or a Keras model.
        second_backbone: optional encoder for view b (two modalities); it gets
            its own expander from the same spec (or a clone of `projector`).
        sync_batchnorm: make every BatchNormalization of the backbone(s)
            synchronized across replicas (the expander's always is).
        fused_batchnorm: run BatchNormalization through TF's fused kernel while
            training where the result is the same.
        device_views: a `vicreg_tf.augment.TwoViews` (or its config) that makes
            the views' second stage inside the train step, from uint8 crops.
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    metric_names: tuple[str, ...] = ("loss", "embedding_std")

    def __init__(
        self,
        backbone: keras.Model,
        projector="8192-8192-8192",
        *,
        second_backbone: keras.Model | None = None,
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
        for name in self.metric_names:  # attribute names as saved .keras files have them
            setattr(self, f"{name}_tracker", keras.metrics.Mean(name=name))
        self._build_expanders_from_backbones()

    # -- what a method gives --------------------------------------------------------------

    def compute_terms(self, view_a, view_b, training: bool = False) -> dict[str, tf.Tensor]:
        """The method's loss terms for one batch of views: "loss" and every name in `metric_names`."""
        raise NotImplementedError(f"{type(self).__name__} must override compute_terms")

    def momentum_pairs(self) -> list:
        """(target, online) variables a momentum method moves after every applied step; none here."""
        return []

    def momentum_rate(self, step) -> tf.Tensor:
        """How far each target moves toward its online variable at `step` (0-based)."""
        raise NotImplementedError(f"{type(self).__name__} declares momentum_pairs but no momentum_rate")

    # -- helpers for methods ----------------------------------------------------------------

    def embed(self, view_a, view_b, training: bool):
        """Expander outputs of both views (each through its own backbone when there are two)."""
        second_backbone = self.second_backbone or self.backbone
        second_projector = self.second_projector or self.projector
        z_a = self.projector(self.backbone(view_a, training=training), training=training)
        z_b = second_projector(second_backbone(view_b, training=training), training=training)
        return z_a, z_b

    @staticmethod
    def gather(*tensors):
        """float32 copies gathered from all replicas along the batch axis (the global batch)."""
        gathered = tuple(gather_replicas(tf.cast(t, tf.float32)) for t in tensors)
        return gathered if len(gathered) > 1 else gathered[0]

    def compute_vicreg_terms(self, data, training: bool = False) -> dict[str, tf.Tensor]:
        """The terms of one batch as `fit` gives it (any of the layouts `unpack_views` takes)."""
        view_a, view_b = self.unpack_views(data)
        self._build_from_views(view_a, view_b)
        return self.compute_terms(view_a, view_b, training=training)

    # -- the step ---------------------------------------------------------------------------

    def train_step(self, data):
        view_a, view_b = self.unpack_views(data)
        self._build_from_views(view_a, view_b)  # a backbone without a declared input: from these shapes
        # The forward pass updates BatchNorm moving statistics; keep a copy (a few floats
        # per channel) so a step that is not applied leaves them untouched too.
        state = batchnorm_statistics(self)
        saved = [tf.identity(v.value) for v in state]
        with tf.GradientTape() as tape:
            terms = self.compute_terms(view_a, view_b, training=True)
            loss = terms["loss"]
            if self.losses:  # e.g. kernel regularizers of the backbone
                loss = loss + tf.add_n([tf.cast(extra, tf.float32) for extra in self.losses])
            # Keras sums gradients over replicas; every replica holds the same global loss.
            scaled = self.optimizer.scale_loss(loss / num_replicas())
        variables = self.trainable_variables
        gradients = guard.unscale(self.optimizer, tape.gradient(scaled, variables))
        step = tf.convert_to_tensor(self.optimizer.iterations)  # the step's index, before it is applied
        applied, loss_ok = guard.guarded_apply(self.optimizer, loss, gradients, variables, state, saved,
                                               assert_finite=not self.jit_compile)
        if self.momentum_pairs():
            self._update_momentum(tf.where(applied, self.momentum_rate(step), 0.0))
        terms["loss"] = guard.nan_unless(loss_ok, terms["loss"])
        return self._update_metrics(terms)

    def test_step(self, data):
        return self._update_metrics(self.compute_vicreg_terms(data, training=False))

    def _update_momentum(self, rate: tf.Tensor) -> None:
        """target += rate * (online - target), once per device, in the cross-replica context."""

        def update(distribution, rate):
            for target, online in self.momentum_pairs():
                distribution.extended.update(
                    target.value,
                    lambda t, o, r: t.assign_add(tf.cast(r, t.dtype) * (o - t)),
                    args=(online.value, rate),
                    group=False,
                )

        compat.maybe_merge_call(update, self.distribute_strategy, rate)

    def _update_metrics(self, terms) -> dict[str, tf.Tensor]:
        for tracker in self.metrics:
            tracker.update_state(terms[tracker.name])
        results = {m.name: m.result() for m in self.metrics}
        if compat.in_multi_worker_mode(self.distribute_strategy):
            # Keras reduces a multi-worker step's outputs with reduce("MEAN", axis=0),
            # which needs an axis; every worker holds the same (global) values.
            results = {name: value[None] for name, value in results.items()}
        return results

    @property
    def metrics(self):
        return [getattr(self, f"{name}_tracker") for name in self.metric_names]

    def unpack_views(self, data):
        """`(view_a, view_b)` of a batch: two views, `((view_a, view_b), labels[, weights])`, or device crops."""
        if isinstance(data, dict) and "crops_a" in data:  # stage 2 of the views, here on the device
            if self.device_views is None:
                raise ValueError(
                    "got batches of crops (view_pair_batches(device_views=True)) but this model has no "
                    "device_views: pass device_views=the TwoViews of the pipeline"
                )
            from vicreg_tf.data.pipeline import views_from_crops as device_view_pairs

            data = device_view_pairs(self.device_views, data)
        sequence = isinstance(data, (tuple, list))
        x, y, _ = keras.utils.unpack_x_y_sample_weight(tuple(data)) if sequence and len(data) in (2, 3) else (None,) * 3
        if isinstance(x, (tuple, list)) and len(x) == 2:
            view_a, view_b = x  # ((view_a, view_b), labels[, weights]): only the views are used
        elif sequence and len(data) == 2:
            view_a, view_b = x, y
        else:
            received = type(data).__name__ + (f" of length {len(data)}" if sequence else "")
            raise ValueError(
                f"VICReg expects batches of two views (view_a, view_b), got a {received}; "
                "build the dataset with vicreg_tf.data.view_pairs or map images to two views"
            )
        return self._check_views(view_a, view_b)

    def _check_views(self, view_a, view_b):
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

    # -- building -------------------------------------------------------------------------

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

    def _encoder_pairs(self):
        pairs = [(self.backbone, self.projector)]
        if self.second_backbone is not None:
            pairs.append((self.second_backbone, self.second_projector))
        return pairs

    def _build_expanders_from_backbones(self) -> None:
        # Building now (not on the first batch) lets Keras create every variable,
        # optimizer slots included, before tracing, and lets .keras files reload.
        for backbone, projector in self._encoder_pairs():
            if not projector.built:
                shape = feature_shape(backbone)
                if shape is not None:
                    projector.build(shape)
        # Keras reloads optimizer slots from a .keras file only into a built model.
        self.built = all(layer.built for pair in self._encoder_pairs() for layer in pair)

    def _build_from_views(self, view_a, view_b) -> None:
        """Builds what __init__ could not (a backbone whose input shape is not declared) from the views' shapes."""
        if all(layer.built for layer in compat.sublayers(self)):
            return
        specs = [keras.KerasTensor(tuple(v.shape), keras.backend.standardize_dtype(v.dtype)) for v in (view_a, view_b)]
        pairs = [(self.backbone, self.projector, specs[0]),
                 (self.second_backbone or self.backbone, self.second_projector or self.projector, specs[1])]
        for backbone, projector, spec in pairs:
            if not projector.built:  # tracing the backbone symbolically also builds it
                shape = feature_shape(backbone, spec)
                if shape is None:
                    raise ValueError(
                        f"cannot tell the backbone's output shape for inputs {_shape_text(spec.shape)}; "
                        "give the backbone a keras.Input or build it first: backbone.build(input_shape)")
                projector.build(shape)
        self.built = True

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(input_shape)
        if not self.projector.built:
            features = self.backbone.compute_output_spec(keras.KerasTensor(input_shape))
            self.projector.build(features.shape)
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' fit builds an unbuilt model from the first batch, which it first
        # reduces with MEAN across replicas; under MultiWorkerMirroredStrategy that
        # eager reduce of a PerReplica batch fails (Keras 3.15). The layers are built
        # in __init__ where the backbone declares its input; only the optimizer is
        # left to build here. Otherwise they are built from the first batch's shapes
        # when the step is traced, as Keras does without a strategy.
        if all(layer.built for layer in compat.sublayers(self)):
            if self.optimizer is not None and not self.optimizer.built:
                with self.distribute_strategy.scope():
                    self.optimizer.build(self.trainable_variables)
        elif tf.distribute.has_strategy():
            strategy = type(tf.distribute.get_strategy()).__name__
            raise ValueError(
                f"{type(self).__name__} cannot build its expander before training under {strategy}: the backbone "
                "declares no input shape; give it a keras.Input or call backbone.build(input_shape) first")

    # -- entry checks and XLA ----------------------------------------------------------------

    def call(self, inputs, training=False):
        self._check_images(inputs, "images")
        return self.backbone(inputs, training=training)

    def _check_images(self, images, name: str, encoder=None) -> None:
        """Static checks at an encoder's entry: float images (where it takes floats), with a batch axis."""
        encoder = encoder or self.backbone
        dtype = getattr(images, "dtype", None)
        if dtype is not None and not _is_float_dtype(dtype) and _is_float_dtype(_input_dtype(encoder)):
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
                if expected[-1] == 1 and tuple(shape[1:]) == tuple(expected[1:-1]):
                    hint = " (grayscale images without a channel axis? add one: x[..., None])"
                else:
                    hint = " (a single image? add a batch axis: x[None])"
            which = "backbone" if encoder is self.backbone else "second backbone"
            raise ValueError(
                f"VICReg's {which} expects {name} of shape {_shape_text(expected)}, got shape "
                f"{_shape_text(shape)}{hint}"
            )

    # XLA where it can compile the step (`xla_refusal`): "auto" resolves to off where it
    # cannot work; an explicit jit_compile=True there raises a one-line ValueError in compile().
    @property
    def jit_compile(self):
        return keras.Model.jit_compile.fget(self)

    def _xla_refusal(self) -> str:
        return xla_refusal(getattr(self, "device_views", None) is not None, tf.distribute.get_strategy())

    @jit_compile.setter
    def jit_compile(self, value):
        refusal = self._xla_refusal()
        if value and refusal:
            raise ValueError(f"jit_compile=True cannot work here: {refusal}; use jit_compile=False")
        keras.Model.jit_compile.fset(self, value)

    def _resolve_auto_jit_compile(self):
        if self._xla_refusal():
            return False
        return super()._resolve_auto_jit_compile()

    # -- serialization ---------------------------------------------------------------------

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "backbone": serialize(self.backbone),
            "projector": self.projector_spec or serialize(self.projector),
            "second_backbone": serialize(self.second_backbone) if self.second_backbone is not None else None,
            "sync_batchnorm": self.sync_batchnorm,
            "fused_batchnorm": self.fused_batchnorm,
            "device_views": self.device_views.get_config() if self.device_views is not None else None,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        config["backbone"] = deserialize(config["backbone"])
        for key in ("projector", "predictor"):
            if config.get(key) is not None and not isinstance(config[key], str):
                config[key] = deserialize(config[key])
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


def feature_shape(backbone, input_spec=None) -> tuple | None:
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


def _shape_text(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"
