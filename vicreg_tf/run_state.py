"""A run's state: crash-safe backups, where a run stopped, and SIGTERM (preemption).

A run killed at any point and restarted with the same command must continue as
if it had never stopped. Two things make that exact:
- the data of epoch e is a pure function of (seed, e) (`vicreg_tf.data.pipeline`),
  so a run resumed at (epoch, step) gets the batches it would have had;
- the backup is written atomically at the end of each epoch (and at the step
  boundary after a SIGTERM): the weights go to a new file, then a small JSON
  record naming it replaces the old record in one rename (`vicreg_tf.atomic_io`),
  so a reader sees the previous complete backup or the new one, never half of one.

A workdir may be on any TensorFlow file system (gs://, s3:// with tensorflow-io,
ram:// in tests). On object stores the record may briefly be missing (a restart
then sees no backup: it starts over) but is never half-written.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile

import keras
import tensorflow as tf

from vicreg_tf.atomic_io import is_remote, read_text, save_keras_file, write_text_atomically

_RECORD = "backup.json"
# Tests: send this process SIGTERM after this global step (a deterministic preemption).
SIGTERM_AT_STEP_ENV = "VICREG_SIGTERM_AT_STEP"


def _load_weights(model: keras.Model, path: str) -> None:
    if not is_remote(path):
        model.load_weights(path)
        return
    with tempfile.TemporaryDirectory() as local:
        staged = os.path.join(local, os.path.basename(path))
        tf.io.gfile.copy(path, staged)
        model.load_weights(staged)


def read_backup_position(backup_dir) -> tuple[int, int]:
    """(completed epochs, completed steps of the next epoch) recorded in `backup_dir`; (0, 0) when none."""
    record = os.path.join(os.fspath(backup_dir), _RECORD)
    if not tf.io.gfile.exists(record):
        return 0, 0
    meta = json.loads(read_text(record))
    return int(meta["epoch"]), int(meta.get("step", 0))


def read_backup_epoch(backup_dir) -> int:
    """The number of completed epochs recorded in `backup_dir` (0 when there is none)."""
    return read_backup_position(backup_dir)[0]


def load_backup(model: keras.Model, backup_dir) -> int:
    """Loads the last complete backup into `model`; returns its epoch (0: no backup)."""
    backup_dir = os.fspath(backup_dir)
    record = os.path.join(backup_dir, _RECORD)
    if not tf.io.gfile.exists(record):
        return 0
    meta = json.loads(read_text(record))
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    _load_weights(model, os.path.join(backup_dir, meta["weights"]))
    return int(meta["epoch"])


def save_backup(model: keras.Model, backup_dir, epoch: int, step: int = 0) -> None:
    """Weights and optimizer state after `epoch` epochs and `step` more steps, committed by the record."""
    backup_dir = os.fspath(backup_dir)
    name = f"epoch-{epoch:06d}-step-{step:07d}.weights.h5" if step else f"epoch-{epoch:06d}.weights.h5"
    save_keras_file(model, os.path.join(backup_dir, name), weights_only=True)
    record = {"epoch": epoch, "weights": name}
    if step:
        record["step"] = step
    write_text_atomically(os.path.join(backup_dir, _RECORD), json.dumps(record))  # the commit point
    for old in tf.io.gfile.glob(os.path.join(backup_dir, "epoch-*.weights.h5")):
        if os.path.basename(old) != name:
            tf.io.gfile.remove(old)


class Preempted(Exception):
    """Raised out of `fit` after a SIGTERM, once the backup at the step boundary is written."""

    def __init__(self, epoch: int, step: int, backup_dir: str, cause: str = "SIGTERM"):
        super().__init__(f"stopped by {cause} after epoch {epoch} + {step} steps; "
                         f"the backup in {backup_dir} resumes there")
        self.epoch, self.step, self.backup_dir = epoch, step, backup_dir


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that never leaves a half-written backup.

    Backs up at the end of every epoch; keeps the backup after training unless
    `delete_checkpoint=True`. The record `backup.json` is the commit point.
    A SIGTERM (preemption, `scancel`, Kubernetes eviction) while training makes it
    back up at the next step boundary (epoch, step within it, weights and
    optimizer state) and raise `Preempted`; the trainer resumes there
    (`read_backup_position`, `vicreg_tf.data.view_pair_batches(start_epoch=, start_step=)`).

    In a cluster (`cluster_resolver` with jobs, i.e. MultiWorkerMirroredStrategy) the
    SIGTERM of any one worker is TensorFlow's to spread:
    `tf.distribute.experimental.PreemptionCheckpointHandler` records it in the
    coordination service, every worker learns the step to stop after (the next but
    one, acknowledged by all before the signalled worker trains on), and each backs
    up there (the chief writes) and raises `Preempted` at the same step.

    Args:
        backup_dir: where the backups live (one directory per run; any gfile path).
        delete_checkpoint: remove the backup when fit completes.
        write: whether this process writes backups (False on non-chief workers).
        first_step: steps of the first epoch done before this fit (a run resumed mid-epoch,
            whose first epoch is `steps_per_epoch - first_step` long).
        cluster_resolver: the multi-worker strategy's resolver; with jobs in its cluster spec,
            preemption goes through TensorFlow's PreemptionCheckpointHandler (all workers stop
            at one step) instead of this process's own SIGTERM handler.
    """

    def __init__(self, backup_dir, delete_checkpoint: bool = False, write: bool = True, first_step: int = 0,
                 cluster_resolver=None):
        super().__init__(os.fspath(backup_dir), save_freq="epoch", delete_checkpoint=delete_checkpoint)
        self.write = write
        self.first_step = first_step
        self.cluster_resolver = cluster_resolver
        self._handler = None  # TensorFlow's PreemptionCheckpointHandler, made once per process
        self._handler_sigterm = None  # the SIGTERM handler it installed (reinstalled for each fit)
        self._position = (0, 0)  # (epoch, step) after the last finished step
        self.restore_on_begin = True  # False: a second fit of the same run, the model is current
        self._sigterm = False
        self._previous_handler = None
        self._first_epoch = None
        self._epoch = 0

    def _load_model(self):
        if not self.restore_on_begin:
            return
        epoch = load_backup(self.model, self.backup_dir)
        step = read_backup_position(self.backup_dir)[1]
        if epoch or step:
            self.model._initial_epoch = epoch
            where = f"epoch {epoch}, step {step} of the next" if step else f"epoch {epoch}"
            print(f"Resuming after {where} from the backup in {self.backup_dir}", flush=True)

    def _save_model(self):
        if self.write:
            save_backup(self.model, self.backup_dir, self._current_epoch)

    def _in_cluster(self) -> bool:
        return self.cluster_resolver is not None and bool(self.cluster_resolver.cluster_spec().jobs)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._first_epoch = None
        if signal.getsignal(signal.SIGTERM) is None:  # not installable from Python here
            return
        try:
            if not self._in_cluster():
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            elif self._handler is None:  # once: its coordination-service keys are set once per cluster
                self._previous_handler = signal.getsignal(signal.SIGTERM)
                self._handler = self._make_preemption_handler()
                self._handler_sigterm = signal.getsignal(signal.SIGTERM)
            else:  # a second fit of the same run (resumed mid-epoch): watch again
                self._previous_handler = signal.signal(signal.SIGTERM, self._handler_sigterm)
        except ValueError:  # not the main thread: no preemption handling
            self._previous_handler = None

    def _make_preemption_handler(self):
        # The handler restores nothing here (an empty TensorFlow checkpoint in a directory with
        # none) and saves through save_fn: the backup stays ours (weights file + record).
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(), self.backup_dir, max_to_keep=1)
        config = tf.distribute.experimental.TerminationConfig(
            exit_fn=self._stop_preempted, grace_period=0, save_fn=self._save_position)
        return tf.distribute.experimental.PreemptionCheckpointHandler(
            self.cluster_resolver, manager, termination_config=config)

    def _save_position(self):
        if self.write:
            save_backup(self.model, self.backup_dir, *self._position)

    def _stop_preempted(self):
        self._restore_handler()
        raise Preempted(*self._position, self.backup_dir, cause="SIGTERM to a worker of the cluster")

    def _on_sigterm(self, signum, frame):
        self._sigterm = True  # acted on at the next step boundary, where the state is whole

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch  # the epochs completed before this one
        if self._first_epoch is None:
            self._first_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        at = os.environ.get(SIGTERM_AT_STEP_ENV)
        if at and int(self.model.optimizer.iterations.numpy()) == int(at):
            os.kill(os.getpid(), signal.SIGTERM)
        epoch = self._epoch
        step = batch + 1 + (self.first_step if epoch == self._first_epoch else 0)
        steps = (self.params or {}).get("steps")
        if steps and batch + 1 >= steps:  # the epoch's last step: a whole epoch is done
            epoch, step = epoch + 1, 0
        self._position = (epoch, step)
        if self._handler is not None:
            # Every worker calls this once per step; at the step the cluster agreed on it
            # calls _save_position, then _stop_preempted (which raises Preempted).
            self._handler.save_checkpoint_if_preempted()
            return
        if not self._sigterm:
            return
        self._save_position()
        self._restore_handler()
        raise Preempted(epoch, step, self.backup_dir)

    def _restore_handler(self):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, logs=None):
        self._restore_handler()
        super().on_train_end(logs)
