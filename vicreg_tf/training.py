"""Resumable training: an epoch-indexed input pipeline and crash-safe backups.

A run killed at any point and restarted with the same command must continue as
if it had never stopped. Two things make that exact:
- the data of epoch e is a pure function of (seed, e): the shuffle order and
  the augmentation seeds are derived from the epoch index, not from how many
  epochs this process has already iterated;
- the backup is written atomically at the end of each epoch: the weights go to
  a new file, then a small JSON record naming it replaces the old record in one
  `os.replace`, so a reader sees the previous complete backup or the new one,
  never half of one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf

_RECORD = "backup.json"


def read_backup_epoch(backup_dir: str | os.PathLike) -> int:
    """The number of completed epochs recorded in `backup_dir` (0 when there is none)."""
    record = Path(backup_dir) / _RECORD
    if not record.exists():
        return 0
    return int(json.loads(record.read_text())["epoch"])


def load_backup(model: keras.Model, backup_dir: str | os.PathLike) -> int:
    """Loads the last complete backup into `model`; returns its epoch (0: no backup)."""
    record = Path(backup_dir) / _RECORD
    if not record.exists():
        return 0
    meta = json.loads(record.read_text())
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(Path(backup_dir) / meta["weights"])
    return int(meta["epoch"])


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that never leaves a half-written backup.

    Backs up at the end of every epoch (Keras restarts an interrupted epoch from
    its beginning anyway); keeps the backup after training unless
    `delete_checkpoint=True`. The record `backup.json` is the commit point.

    Args:
        backup_dir: where the backups live (one directory per run).
        delete_checkpoint: remove the backup when fit completes.
        write: whether this process writes backups (False on non-chief workers).
    """

    def __init__(self, backup_dir, delete_checkpoint: bool = False, write: bool = True):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=delete_checkpoint)
        self.write = write

    def _load_model(self):
        epoch = load_backup(self.model, self.backup_dir)
        if epoch:
            self.model._initial_epoch = epoch
            print(f"Resuming after epoch {epoch} from the backup in {self.backup_dir}", flush=True)

    def _save_model(self):
        if not self.write:
            return
        backup_dir = Path(self.backup_dir)
        backup_dir.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{self._current_epoch:06d}.weights.h5"
        self.model.save_weights(backup_dir / name, overwrite=True)
        tmp = backup_dir / f".{_RECORD}.tmp"
        tmp.write_text(json.dumps({"epoch": self._current_epoch, "weights": name}))
        os.replace(tmp, backup_dir / _RECORD)  # the commit point
        for old in backup_dir.glob("epoch-*.weights.h5"):
            if old.name != name:
                old.unlink()


def epoch_seed(seed: int, epoch) -> tf.Tensor:
    """A per-epoch int64 seed: the same for epoch e whichever epoch a run started from."""
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def resumable_view_pairs(
    images: tf.data.Dataset,
    two_views: Callable,
    batch_size: int,
    *,
    steps_per_epoch: int,
    start_epoch: int = 0,
    epochs: int,
    seed: int = 0,
    shuffle_buffer: int = 10_000,
) -> tf.data.Dataset:
    """Batches of `(view_a, view_b)` for epochs `start_epoch..epochs-1`, one epoch after another.

    `images` yields unbatched images (or `(image, label)` pairs; labels dropped).
    Each epoch is `steps_per_epoch` full batches of a reshuffled pass over the
    images, augmented by `two_views(batch, seed=[seed_hi, seed_lo])`
    with a seed that depends only on (seed, epoch, step), so restarting at
    epoch e reproduces epoch e exactly. Use with `fit(steps_per_epoch=...)`.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if start_epoch >= epochs:
        raise ValueError(f"nothing left to train: start_epoch={start_epoch} >= epochs={epochs}")
    element = images.element_spec
    if isinstance(element, tuple):
        images = images.map(lambda image, *rest: image)

    def one_epoch(epoch):
        # tf.data's shuffle cannot take a tensor seed, so shuffle statelessly: each
        # window of `shuffle_buffer` consecutive images is permuted with a seed of
        # (seed, epoch, window). With shuffle_buffer >= the data set size (the
        # configs' choice for in-memory data) that is a full permutation per epoch.
        def permute(window_index, window):
            window_seed = tf.stack([epoch_seed(seed, epoch), window_index])
            return tf.random.experimental.stateless_shuffle(window, seed=window_seed)

        batches = (
            images.batch(shuffle_buffer)
            .enumerate()
            .map(permute)
            .unbatch()
            .repeat()
            .batch(batch_size, drop_remainder=True)
            .take(steps_per_epoch)
        )
        steps = tf.data.Dataset.range(steps_per_epoch)
        return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(epoch).repeat(), steps, batches))

    def augment(epoch, step, batch):
        batch_seed = tf.stack([epoch_seed(seed, epoch), step])
        return two_views(batch, seed=batch_seed)

    dataset = tf.data.Dataset.range(start_epoch, epochs).flat_map(one_epoch)
    dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def distribute_view_pairs(strategy: tf.distribute.Strategy, make_dataset: Callable[[], tf.data.Dataset],
                          global_batch_size: int):
    """Feeds every replica its rows of the same global batches a single device would see.

    `make_dataset()` returns global batches of `(view_a, view_b)` (e.g.
    `resumable_view_pairs`). Each worker builds that pipeline, keeps its
    contiguous share of each global batch and splits the share between its
    local replicas, so global step t trains on exactly global batch t, with
    the same augmentations, whatever the number of workers and devices. (tf.data's
    auto-sharding would instead move the split into the pipeline and change
    which images share an augmentation seed.) Each worker augments the whole
    global batch; the views are cheap next to the train step (bench/pipeline.py).
    Returns `make_dataset()` itself for a single replica.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return make_dataset()
    if global_batch_size % replicas:
        raise ValueError(
            f"the global batch {global_batch_size} does not split evenly over {replicas} replicas"
        )

    def worker_dataset(context: tf.distribute.InputContext) -> tf.data.Dataset:
        share = global_batch_size // context.num_input_pipelines
        start = context.input_pipeline_id * share
        per_replica = context.get_per_replica_batch_size(global_batch_size)
        dataset = make_dataset().map(lambda a, b: (a[start:start + share], b[start:start + share]))
        # Consecutive elements go to the worker's replicas in turn.
        return dataset.unbatch().batch(per_replica, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(worker_dataset, options)
