"""Resumable training: an epoch-indexed input pipeline and crash-safe backups.

A run killed at any point and restarted with the same command must continue as
if it had never stopped. Two things make that exact:
- the data of epoch e is a pure function of (seed, e): the shuffle order and
  the augmentation seeds are derived from the epoch index, not from how many
  epochs this process has already iterated;
- the backup is written atomically at the end of each epoch (and at the step
  boundary after a SIGTERM): the weights go to a new file, then a small JSON
  record naming it replaces the old record in one rename, so a reader sees the
  previous complete backup or the new one, never half of one.

Paths go through `tf.io.gfile`, so a workdir may be on any TensorFlow file system
(gs://, s3:// with tensorflow-io, ram:// in tests). The rename is atomic on local
and POSIX file systems; on object stores (GCS) it is a copy then a delete, so the
record may briefly be missing (a restart then sees no backup: it starts over)
but is never half-written: objects appear whole.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
from typing import Callable

import keras
import tensorflow as tf

_RECORD = "backup.json"
# Tests: send this process SIGTERM after this global step (a deterministic preemption).
SIGTERM_AT_STEP_ENV = "VICREG_SIGTERM_AT_STEP"


def is_remote(path) -> bool:
    """A path of a TensorFlow file system other than the local one (gs://, ram://, hdfs://, ...)."""
    return "://" in os.fspath(path)


def write_text_atomically(path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory and one rename."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp")
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)  # the commit point (copy + delete on GCS)


def read_text(path) -> str:
    with tf.io.gfile.GFile(os.fspath(path), "r") as f:
        return f.read()


def save_keras_file(obj, path, *, weights_only: bool = False) -> None:
    """`model.save` / `save_weights` to any file system, atomically: a local file, then a copy and a rename."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tf.io.gfile.makedirs(directory)
    with tempfile.TemporaryDirectory() as local:
        staged = os.path.join(local, name)
        (obj.save_weights if weights_only else obj.save)(staged)
        tmp = os.path.join(directory, f".tmp-{name}")
        tf.io.gfile.copy(staged, tmp, overwrite=True)
        tf.io.gfile.rename(tmp, path, overwrite=True)


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

    def __init__(self, epoch: int, step: int, backup_dir: str):
        super().__init__(f"stopped by SIGTERM after epoch {epoch} + {step} steps; "
                         f"the backup in {backup_dir} resumes there")
        self.epoch, self.step, self.backup_dir = epoch, step, backup_dir


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that never leaves a half-written backup.

    Backs up at the end of every epoch; keeps the backup after training unless
    `delete_checkpoint=True`. The record `backup.json` is the commit point.
    A SIGTERM (preemption, `scancel`, Kubernetes eviction) while training makes it
    back up at the next step boundary (epoch, step within it, weights and
    optimizer state) and raise `Preempted`; the trainer resumes there
    (`read_backup_position`, `view_pair_batches(start_epoch=, start_step=)`).

    Args:
        backup_dir: where the backups live (one directory per run; any gfile path).
        delete_checkpoint: remove the backup when fit completes.
        write: whether this process writes backups (False on non-chief workers).
        first_step: steps of the first epoch done before this fit (a run resumed mid-epoch,
            whose first epoch is `steps_per_epoch - first_step` long).
    """

    def __init__(self, backup_dir, delete_checkpoint: bool = False, write: bool = True, first_step: int = 0):
        super().__init__(os.fspath(backup_dir), save_freq="epoch", delete_checkpoint=delete_checkpoint)
        self.write = write
        self.first_step = first_step
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

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._first_epoch = None
        if signal.getsignal(signal.SIGTERM) is not None:  # None: not installable from Python here
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread: no preemption handling
                self._previous_handler = None

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
        if not self._sigterm:
            return
        epoch = self._epoch
        step = batch + 1 + (self.first_step if epoch == self._first_epoch else 0)
        steps = (self.params or {}).get("steps")
        if steps and batch + 1 >= steps:  # the epoch's last step: a whole epoch is done
            epoch, step = epoch + 1, 0
        if self.write:
            save_backup(self.model, self.backup_dir, epoch, step)
        self._restore_handler()
        raise Preempted(epoch, step, self.backup_dir)

    def _restore_handler(self):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, logs=None):
        self._restore_handler()
        super().on_train_end(logs)


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


def view_pair_batches(
    source,
    two_views,
    batch_size: int,
    *,
    steps_per_epoch: int,
    start_epoch: int = 0,
    start_step: int = 0,
    epochs: int,
    seed: int = 0,
    shuffle_buffer: int = 10_000,
    row_start: int = 0,
    row_count: int | None = None,
    device_views: bool = False,
) -> tf.data.Dataset:
    """This worker's rows of the global `(view_a, view_b)` batches for epochs `start_epoch..epochs-1`.

    The streaming pipeline (docs/DATA.md): for each (epoch, step) the global batch
    of *items* is fixed by (seed, epoch) alone: a permutation of file names or
    array indices (random-access sources), or windows of `shuffle_buffer` encoded
    records permuted in order (record sources). This worker takes rows
    `row_start .. row_start + row_count` of it and decodes only those: each view's
    random resized crop is sampled on the original image's size and, for JPEG,
    only that window is decoded, then resized to the view size (uint8). Then the
    rest of the views (flip, color jitter, grayscale, blur, solarize) are made
    batched, with random numbers drawn for the whole global batch and this
    worker's rows taken, so the rows equal those one process makes for them,
    bit for bit. The seed of global batch t is (seed, epoch, step): resuming at
    epoch e reproduces epoch e.

    With `device_views=True` the second stage is left to the accelerator: the
    elements are dicts `{"crops_a", "crops_b"}` (uint8), `"seed"` and `"row"`,
    `"total"` (per image), which `VICReg(device_views=...)` turns into views
    inside its train step.

    Args:
        source: a `vicreg_tf.data` source (FolderSource, RecordSource, ArraySource).
        two_views: a `vicreg_tf.augment.TwoViews`.
        batch_size: the global batch size.
        steps_per_epoch, start_epoch, epochs: the epochs to produce.
        start_step: the first step of `start_epoch` (a run resumed mid-epoch).
        seed: int seed of the order and the views.
        shuffle_buffer: encoded records permuted together (record sources only).
        row_start, row_count: this worker's rows of each global batch (default: all).
        device_views: leave stage 2 to the model (see above).
    """
    from vicreg_tf import data

    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if start_epoch >= epochs:
        raise ValueError(f"nothing left to train: start_epoch={start_epoch} >= epochs={epochs}")
    if not 0 <= start_step < steps_per_epoch:
        raise ValueError(f"start_step must be in [0, {steps_per_epoch}), got {start_step}")
    row_count = batch_size if row_count is None else row_count
    if not (0 <= row_start and row_count > 0 and row_start + row_count <= batch_size):
        raise ValueError(f"rows {row_start}..{row_start + row_count} are not inside a batch of {batch_size}")
    size, channels = two_views.image_size, source.channels
    row_ids = tf.range(row_start, row_start + row_count, dtype=tf.int32)
    rows = (row_ids, batch_size)
    end = row_start + row_count

    def batch_seed(epoch, step):
        return tf.stack([epoch_seed(seed, epoch), tf.cast(step, tf.int64)])

    # Stage 0: this worker's items of each global batch (names, bytes or array indices).
    def first_step(epoch):  # a resumed run starts its first epoch at start_step
        return tf.where(tf.equal(epoch, start_epoch), tf.constant(start_step, tf.int64), tf.constant(0, tf.int64))

    all_items = None
    if source.random_access:
        all_items, _ = source.items()
        need = steps_per_epoch * batch_size

        def one_epoch(epoch):
            order = data.epoch_permutation(source.count, tf.stack([epoch_seed(seed, epoch), tf.constant(-1, tf.int64)]))
            order = tf.tile(order, [data.ceil_div(need, source.count)])[:need]
            mine = tf.reshape(order, [steps_per_epoch, batch_size])[first_step(epoch):, row_start:end]
            return tf.data.Dataset.zip((
                tf.data.Dataset.from_tensors(epoch).repeat(),
                tf.data.Dataset.range(first_step(epoch), steps_per_epoch),
                tf.data.Dataset.from_tensor_slices(mine),
            ))
    else:
        def one_epoch(epoch):
            records = data.windowed_permutation(
                source.records(), shuffle_buffer, tf.stack([epoch_seed(seed, epoch), tf.constant(-1, tf.int64)])
            )
            mine = records.repeat().batch(batch_size, drop_remainder=True).take(steps_per_epoch)
            mine = mine.skip(first_step(epoch)).map(lambda items, labels: items[row_start:end])
            return tf.data.Dataset.zip((
                tf.data.Dataset.from_tensors(epoch).repeat(),
                tf.data.Dataset.range(first_step(epoch), steps_per_epoch), mine,
            ))

    dataset = tf.data.Dataset.range(start_epoch, epochs).flat_map(one_epoch)

    # Stage 1: decode and crop, this worker's rows only.
    if not source.is_encoded:  # uint8 arrays in memory: gather and crop the rows, batched
        array = all_items

        def crop(epoch, step, indices):
            images = tf.gather(array, indices)
            params_a, params_b = two_views.crop_params(batch_seed(epoch, step), row_count, rows)
            crops = [two_views.view_a.crop_images(images, params_a), two_views.view_b.crop_images(images, params_b)]
            crops = [tf.cast(tf.round(c * 255.0), tf.uint8) for c in crops]
            return epoch, step, crops[0], crops[1]

        dataset = dataset.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        def per_row(epoch, step, keys):
            items = tf.gather(all_items, keys) if source.random_access else keys
            params_a, params_b = two_views.crop_params(batch_seed(epoch, step), row_count, rows)
            n = tf.shape(items)[0]
            return tf.data.Dataset.from_tensor_slices((
                tf.fill([n], epoch), tf.fill([n], step), items, params_a, params_b,
            ))

        def decode_two(epoch, step, item, params_a, params_b):
            contents = source.read(item)
            crop_a = data.decode_crop(contents, _window(two_views.view_a, params_a), size, channels)
            crop_b = data.decode_crop(contents, _window(two_views.view_b, params_b), size, channels)
            return epoch, step, crop_a, crop_b

        def gray(epoch, step, *_):
            return epoch, step, data.gray_image([*size, channels]), data.gray_image([*size, channels])

        rows_ds = dataset.flat_map(per_row)
        dataset = data.safe_map(rows_ds, decode_two, gray, name_of=lambda epoch, step, item, a, b: source.name_of(item))
        dataset = dataset.batch(row_count, drop_remainder=True).map(
            lambda epochs, steps, crops_a, crops_b: (epochs[0], steps[0], crops_a, crops_b)
        )

    # Stage 2: the rest of the views, batched (here, or on the accelerator).
    def finish(epoch, step, crops_a, crops_b):
        if device_views:
            n = tf.shape(crops_a)[0]
            return {"crops_a": crops_a, "crops_b": crops_b, "seed": tf.tile(batch_seed(epoch, step)[None], [n, 1]),
                    "row": row_ids, "total": tf.fill([n], batch_size)}
        return two_views.color(crops_a, crops_b, batch_seed(epoch, step), rows)

    dataset = dataset.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _window(view, params):
    """A box function for `data.decode_crop` from one image's crop numbers."""

    def box(height, width):
        top, left, h, w = view.crop.window(params, height, width)
        return tuple(tf.cast(v, tf.int32) for v in (top, left, h, w))

    return box


def device_view_pairs(two_views, batch: dict):
    """Stage 2 of `view_pair_batches(device_views=True)` on a (per-replica) batch: the two views."""
    rows = (batch["row"], batch["total"][0])
    return two_views.color(batch["crops_a"], batch["crops_b"], batch["seed"][0], rows)


class UnreadableImagesReport(keras.callbacks.Callback):
    """One warning line per epoch naming the images that could not be decoded (replaced by gray)."""

    def __init__(self, shown: int = 5):
        super().__init__()
        self.shown = shown

    def on_epoch_end(self, epoch, logs=None):
        from vicreg_tf.data import unreadable_images

        names = unreadable_images.take()
        if names:
            listed = ", ".join(names[: self.shown]) + (", ..." if len(names) > self.shown else "")
            print(f"warning: epoch {epoch + 1}: {len(names)} image(s) could not be decoded and were replaced "
                  f"by gray images: {listed}", flush=True)


def distribute_view_pairs(strategy: tf.distribute.Strategy, make_dataset: Callable[[int, int], tf.data.Dataset],
                          global_batch_size: int):
    """Feeds every replica its rows of the same global batches a single device would see.

    `make_dataset(row_start, row_count)` returns the batches of rows
    `row_start .. row_start + row_count` of each global batch (e.g.
    `view_pair_batches(..., row_start=, row_count=)`): each worker reads, decodes
    and augments only its own contiguous share, then splits it between its local
    replicas, so global step t trains on exactly global batch t, with the same
    augmentations, whatever the number of workers and devices. (tf.data's
    auto-sharding would instead change which images share a batch.)
    Returns `make_dataset(0, global_batch_size)` for a single replica.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return make_dataset(0, global_batch_size)
    if global_batch_size % replicas:
        raise ValueError(
            f"the global batch {global_batch_size} does not split evenly over {replicas} replicas"
        )

    def worker_dataset(context: tf.distribute.InputContext) -> tf.data.Dataset:
        share = global_batch_size // context.num_input_pipelines
        per_replica = context.get_per_replica_batch_size(global_batch_size)
        dataset = make_dataset(context.input_pipeline_id * share, share)
        # Consecutive elements go to the worker's replicas in turn.
        return dataset.unbatch().batch(per_replica, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(worker_dataset, options)
