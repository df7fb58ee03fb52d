"""TensorFlow's GPU code paths taken on a CPU, and the matrix of short runs that proves them.

No GPU that can run TensorFlow is available where vicreg-tf is developed, and a
GPU changes which lines of TensorFlow run, not only how fast:

- inside XLA, MirroredStrategy and MultiWorkerMirroredStrategy run the step
  *without* `merge_call` when every device is a GPU (`_use_merge_call()` is
  `not in XLA or not all GPUs`); on CPUs they always merge. A `merge_call`
  that remains (an only-first-replica variable such as the optimizer's
  `iterations`) then cannot sit inside a `tf.cond`;
- MirroredStrategy over physical GPUs uses NCCL collectives, over CPUs (or
  logical GPUs made from one) ring collectives, which XLA does not compile.

`gpu_code_paths()` makes TensorFlow decide both as it does on GPUs, on the CPU
devices it has. What still cannot run here is XLA's compilation of a collective
for a CPU device: `is_xla_cpu_collective_error` recognises that error, which
comes after the step has traced.

`run_cell` runs one cell of the matrix {strategy} x {XLA} x {precision} x
{method} x {where the views are made}: two steps (the step traces; loss and
weights finite), then a batch with a NaN, which must be skipped with every
weight bitwise unchanged. `tests/test_gpu_paths.py` runs the matrix;
`bench/gpu.py` runs some of it where no GPU is present.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.distribute import (
    collective_all_reduce_strategy,
    collective_util,
    cross_device_ops,
    cross_device_utils,
    mirrored_strategy,
)
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

STRATEGIES = ("default", "mirrored1", "mirrored2", "multiworker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
METHODS = ("vicreg", "simsiam", "byol", "logdet")
VIEWS = ("host", "device")

# What XLA answers, on a CPU, when asked to compile a collective: with the NCCL hint
# (physical GPUs) and with the ring hint (CPUs, logical GPUs). The step has traced by then.
_XLA_CPU_COLLECTIVE_ERRORS = (
    "Collectives are not yet implemented for CPU devices when compiling with XLA",
    "Only compiling NCCL/auto collective is supported",
)


def _gpu_use_merge_call(self) -> bool:
    # TensorFlow's rule with "every device is a GPU" taken as true.
    return not control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def _gpu_collective_ops(self):
    # MirroredExtended._make_collective_ops_with_fallbacks for physical GPUs: NCCL collectives.
    self._collective_keys = cross_device_utils.CollectiveKeys(group_key_start=1 + self._collective_key_base)
    self._communication_options = collective_util.Options(
        implementation=collective_util.CommunicationImplementation.NCCL)
    return cross_device_ops.CollectiveAllReduce(
        devices=self._devices, group_size=len(self._devices),
        options=self._communication_options, collective_keys=self._collective_keys)


@contextlib.contextmanager
def gpu_code_paths():
    """While active, MirroredStrategy and MultiWorkerMirroredStrategy take their GPU code paths.

    Strategies must be made (for the collectives) and steps traced (for
    merge_call) inside the context. Patches TensorFlow's private classes and
    restores them on exit.
    """
    patches = [
        (mirrored_strategy.MirroredExtended, "_use_merge_call", _gpu_use_merge_call),
        (collective_all_reduce_strategy.CollectiveAllReduceExtended, "_use_merge_call", _gpu_use_merge_call),
        (mirrored_strategy.MirroredExtended, "_make_collective_ops_with_fallbacks", _gpu_collective_ops),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


_KEY_BASE_STEP = 100_000


def mirrored_strategy_over(devices) -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy whose collective keys do not clash with the process's other MirroredStrategies.

    TensorFlow numbers every MirroredStrategy's collective groups from the same
    base, so a second strategy over other devices in one process reuses a group
    key with another group size and fails ("Collective instance N expected type ...").
    """
    base = getattr(mirrored_strategy_over, "_next_base", _KEY_BASE_STEP)
    mirrored_strategy_over._next_base = base + _KEY_BASE_STEP
    previous = tf.distribute.MirroredStrategy._collective_key_base
    tf.distribute.MirroredStrategy._collective_key_base = base
    try:
        return tf.distribute.MirroredStrategy(list(devices))
    finally:
        tf.distribute.MirroredStrategy._collective_key_base = previous


def is_xla_cpu_collective_error(error: BaseException) -> bool:
    """Whether `error` is XLA refusing to compile a collective for a CPU device (expected here)."""
    return isinstance(error, tf.errors.OpError) and any(text in str(error) for text in _XLA_CPU_COLLECTIVE_ERRORS)


@dataclasses.dataclass(frozen=True)
class Cell:
    strategy: str
    xla: bool
    precision: str
    method: str
    views: str

    @property
    def id(self) -> str:
        return f"{self.strategy}-{'xla' if self.xla else 'graph'}-{self.precision}-{self.method}-{self.views}"


def all_cells() -> list[Cell]:
    return [Cell(*values) for values in itertools.product(STRATEGIES, (False, True), PRECISIONS, METHODS, VIEWS)]


def covering_cells(strategies=STRATEGIES) -> list[Cell]:
    """A few cells in which every pair of values of any two factors appears at least once (greedy)."""
    cells = [c for c in all_cells() if c.strategy in strategies]
    fields = [f.name for f in dataclasses.fields(Cell)]

    def pairs(cell):
        return {(a, getattr(cell, a), b, getattr(cell, b)) for a, b in itertools.combinations(fields, 2)}

    missing = set().union(*(pairs(c) for c in cells))
    chosen = []
    while missing:
        best = max(cells, key=lambda c: (len(pairs(c) & missing), -cells.index(c)))
        chosen.append(best)
        missing -= pairs(best)
    return chosen


# --------------------------------------------------------------------------- one cell

IMAGE_SIZE = 16
GLOBAL_BATCH = 8


class _Poison(keras.layers.Layer):
    """x * scale, with a non-trainable scale that a test sets to NaN to poison one step."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", trainable=False, name="scale")

    def call(self, x):
        return x * keras.ops.cast(self.scale, x.dtype)


def _backbone():
    from vicreg_tf.backbones import small_cnn

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    return keras.Model(inputs, small_cnn((IMAGE_SIZE, IMAGE_SIZE, 3), widths=(4, 8))(_Poison(name="poison")(inputs)))


def build_cell_model(method: str, device_views=None):
    import vicreg_tf

    backbone = _backbone()
    if method == "vicreg":
        return vicreg_tf.VICReg(backbone, projector="16-16", device_views=device_views)
    if method == "simsiam":
        return vicreg_tf.SimSiam(backbone, projector="16-16", predictor="8", device_views=device_views)
    if method == "byol":
        return vicreg_tf.BYOL(backbone, projector="16-16", predictor="8", total_steps=10, device_views=device_views)
    if method == "logdet":
        return vicreg_tf.EntropyVICReg(backbone, projector="16-16", entropy="logdet", device_views=device_views)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def _batches(views, device: bool, steps: int, seed: int):
    from vicreg_tf import data

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (4 * GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    source = data.ArraySource(images, np.zeros(len(images), np.int64))
    return data.view_pair_batches(source, views, GLOBAL_BATCH, steps_per_epoch=steps, epochs=1, seed=seed,
                                  device_views=device)


def _with_a_nan_pixel(view_a, view_b):
    return tf.tensor_scatter_nd_update(view_a, [[0, 1, 1, 0]], tf.constant([math.nan], view_a.dtype)), view_b


def _state(model) -> list[np.ndarray]:
    """Every model weight and optimizer variable but the loss scale's, which a skipped step halves."""
    values = [w.numpy() for w in model.weights if "poison" not in w.path]
    for v in model.optimizer.variables:
        if not any(name in v.path for name in ("dynamic_scale", "step_counter")):
            values.append(np.asarray(v.numpy()))
    return values


def _cell_strategy_scope(strategy):
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def run_cell(cell: Cell, strategy=None) -> dict:
    """Runs one cell under `strategy` (None: the default strategy) inside `gpu_code_paths()`.

    Returns {"status": "ran" | "traced" | "refused", ...}: "ran" after two
    finite steps and a skipped NaN step that left every weight bitwise as it was;
    "traced" where only XLA's compilation of a collective for a CPU device
    stopped the step (it cannot run here); "refused" where the model refuses the
    combination with a one-line error (returned as "error"). Raises AssertionError
    when a check fails and re-raises any other error.
    """
    from vicreg_tf import augment

    keras.mixed_precision.set_global_policy(cell.precision)
    try:
        with gpu_code_paths():
            return _run_cell(cell, strategy, augment)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _run_cell(cell, strategy, augment):
    device = cell.views == "device"
    views = augment.paper_views(IMAGE_SIZE, seed=0)
    keras.utils.set_random_seed(0)
    with _cell_strategy_scope(strategy):
        model = build_cell_model(cell.method, device_views=views if device else None)
        try:
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=cell.xla)
        except ValueError as error:
            if "\n" in str(error).strip():
                raise AssertionError(f"{cell.id}: the refusal is not one line: {error}") from error
            return {"status": "refused", "error": str(error)}
    # One pipeline: two steps, then its third batch made non-finite (a NaN pixel on the host; on the
    # device, the poison scale). Its batches have the training batches' spec: the NaN step runs the
    # step function the two finite steps traced, as it would in a run.
    batches = _batches(views, device, 3, seed=1)
    try:
        history = model.fit(batches.take(2), epochs=1, steps_per_epoch=2, verbose=0).history
    except Exception as error:  # noqa: BLE001  anything but XLA's CPU collective error fails the cell
        if cell.xla and is_xla_cpu_collective_error(error):
            line = next(text for text in str(error).splitlines() if any(t in text for t in _XLA_CPU_COLLECTIVE_ERRORS))
            return {"status": "traced", "error": line.strip()[:200]}
        raise
    losses = history["loss"]
    if not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"{cell.id}: loss not finite after two steps: {losses}")
    before = _state(model)
    if not all(np.all(np.isfinite(v)) for v in before if np.issubdtype(v.dtype, np.floating)):
        raise AssertionError(f"{cell.id}: weights not finite after two steps")
    if device:
        model.backbone.get_layer("poison").scale.assign(math.nan)
    nan_batches = batches.skip(2) if device else batches.skip(2).map(_with_a_nan_pixel)
    if strategy is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        nan_batches = nan_batches.with_options(options)
    try:
        nan_history = model.fit(nan_batches, epochs=1, steps_per_epoch=1, verbose=0).history
        skipped_loss = nan_history["loss"][0]
    except (tf.errors.InvalidArgumentError, FloatingPointError) as error:
        if "not finite" not in str(error) and "not applied" not in str(error):
            raise
        skipped_loss = math.nan
    if math.isfinite(skipped_loss):
        raise AssertionError(f"{cell.id}: the NaN batch reported a finite loss {skipped_loss}")
    after = _state(model)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not np.array_equal(a, b, equal_nan=True)]
    if changed:
        raise AssertionError(f"{cell.id}: the NaN step changed {len(changed)} of {len(before)} weights")
    return {"status": "ran", "loss": losses[-1]}


# --------------------------------------------------------------------------- cells in a child process

def make_strategy(name: str):
    """The strategy of a cell, made on TensorFlow's GPU code paths (None for the default strategy).

    "mirrored2" needs two logical CPUs (configured before TensorFlow starts);
    "multiworker" needs TF_CONFIG.
    """
    if name == "default":
        return None
    with gpu_code_paths():
        if name == "mirrored1":
            return mirrored_strategy_over(["/cpu:0"])
        if name == "mirrored2":
            return mirrored_strategy_over(["/cpu:0", "/cpu:1"])
        if name == "multiworker":
            return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")


def cell_from_id(text: str) -> Cell:
    strategy, xla, precision, method, views = text.split("-")
    if xla not in ("xla", "graph"):
        raise ValueError(f"not a cell id: {text!r} (e.g. {all_cells()[0].id!r})")
    return Cell(strategy, xla == "xla", precision, method, views)


def run_cells_and_exit(cell_ids: list[str]) -> None:
    """Runs cells of one strategy, printing one JSON line per cell, then ends the process at once.

    `os._exit`: after XLA has refused to compile a collective for a CPU device,
    TensorFlow's teardown at interpreter exit can abort ("double free"), which
    would turn a passed run into a crash.
    """
    import json
    import os
    import sys

    cells = [cell_from_id(text) for text in cell_ids]
    names = {cell.strategy for cell in cells}
    if len(names) != 1:
        raise ValueError(f"cells of one strategy per process, got {sorted(names)}")
    (name,) = names
    if name == "mirrored2":
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = make_strategy(name)
    for cell in cells:
        try:
            result = run_cell(cell, strategy)
        except Exception as error:  # noqa: BLE001  reported to the parent, which fails the cell
            lines = [line for line in str(error).splitlines() if line.strip()]
            result = {"status": "failed", "error": f"{type(error).__name__}: {' | '.join(lines[:6])[:1500]}"}
        keras.backend.clear_session()
        print(json.dumps({"cell": cell.id, **result}), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    import sys

    run_cells_and_exit(sys.argv[1:])
