"""The private Keras and TensorFlow APIs vicreg-tf relies on, in one place (TF 2.21, Keras 3.15).

Each has no public equivalent; when a release changes one, this module (and the
tests that exercise it) is where it breaks. Besides the functions below, three
private hooks are overridden, by design, where they act:

- `keras.Model._maybe_symbolic_build` and `keras.Model._resolve_auto_jit_compile`
  in `vicreg_tf.base.BaseMethod` (build before the first step under multi-worker
  strategies; XLA "auto" off where it cannot compile), and the public
  `jit_compile` property's getter and setter reached through
  `keras.Model.jit_compile.fget` / `.fset`;
- `MirroredExtended._use_merge_call`, `CollectiveAllReduceExtended._use_merge_call` and
  `MirroredExtended._make_collective_ops_with_fallbacks`, patched only inside
  `vicreg_tf.gpu_emulation.gpu_code_paths()` (tests and bench/gpu.py).
"""
from __future__ import annotations

import tensorflow as tf


def sublayers(layer, include_self: bool = False) -> list:
    """Every layer inside `layer`, nested ones included (Keras' `_flatten_layers`)."""
    return list(layer._flatten_layers(include_self=include_self))


def maybe_merge_call(fn, strategy, *args):
    """`fn(strategy, *args)` in the cross-replica context where the strategy merges, else in place."""
    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


def in_multi_worker_mode(strategy) -> bool:
    """Whether a MultiWorkerMirroredStrategy spans several workers (one worker behaves as Mirrored)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def input_pipelines(strategy) -> int:
    """How many workers read input under `strategy` (one per worker; 1 outside MultiWorkerMirrored)."""
    return int(getattr(strategy.extended, "_num_workers", 1))


def expand_tasks_per_node(value: str) -> list[int]:
    """Slurm's SLURM_STEP_TASKS_PER_NODE ("2(x3),1") as a list of counts, as TensorFlow's resolver reads it."""
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import expand_tasks_per_node as expand

    return expand(value)
