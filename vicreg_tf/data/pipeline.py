"""The input pipeline: this worker's rows of global batch t of epoch e, as pairs of views, in three stages.

    order            which items form global batch t of epoch e: a pure function of (seed, e), so a
                     run resumed at (epoch, step) gets the batches it would have had
    decode_and_crop  this worker's rows only: the views' random numbers are drawn for the whole
                     global batch and the rows taken; each view's crop is sampled on the original
                     image and, for JPEG, only that window is decoded (uint8 crops)
    views_from_crops the rest of the views (flip, color jitter, grayscale, blur, solarize), batched,
                     on the host or inside the train step: one call on the `TwoViews`

`view_pair_batches` chains the three for a source; `distribute_view_pairs` gives every replica
its rows; `vicreg_tf.data.view_pairs` runs the order and the views on any tf.data dataset of
decoded images. Rows of W workers equal one process's batch bit for bit (docs/DATA.md).
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from vicreg_tf.data.images import decode_crop, gray_image, safe_map


def mix_seeds(x, y) -> tf.Tensor:
    """One int64 seed from two, x * 1_000_003 + y: the per-epoch seed from (seed, epoch), and the like."""
    return tf.cast(x, tf.int64) * 1_000_003 + tf.cast(y, tf.int64)


def batch_seed(seed, epoch, step) -> tf.Tensor:
    """The (2,) seed of the views of global batch `step` of `epoch`: the same whichever epoch a run started from."""
    return tf.stack([mix_seeds(seed, epoch), tf.cast(step, tf.int64)])


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# -- stage 1: order ----------------------------------------------------------------------------


def epoch_permutation(count: int, seed: tf.Tensor) -> tf.Tensor:
    """A permutation of 0..count-1 from a (2,) stateless seed."""
    return tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed=seed)


def windowed_permutation(dataset: tf.data.Dataset, window: int, seed: tf.Tensor, *,
                         moving: bool = False) -> tf.data.Dataset:
    """Permutes each window of `window` consecutive (item, label) elements with the seed (seed, window index).

    `moving=True`: the first window is shorter by a random offset drawn from the
    seed, so every boundary moves with the seed (a record's window-mates change
    from epoch to epoch).
    """
    if window <= 1:
        return dataset

    def permute(index, batch):
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(batch[1])[0]),
                                                         seed=tf.stack([seed[0], mix_seeds(seed[1], index)]))
        return tuple(tf.gather(part, order) for part in batch)

    if not moving:
        return dataset.batch(window).enumerate().map(permute).unbatch()
    window = tf.constant(window, tf.int64)
    offset = tf.random.stateless_uniform([], tf.stack([seed[0], mix_seeds(seed[1], -2)]), 0, window, tf.int64)
    windows = dataset.enumerate().group_by_window(
        key_func=lambda i, element: (i + offset) // window,
        reduce_func=lambda key, elements: elements.map(lambda i, element: element).batch(window).map(
            lambda *batch: (key, batch)),
        window_size_func=lambda key: tf.where(tf.equal(key, 0), window - offset, window))
    return windows.map(permute).unbatch()


def record_workers(batch_size: int, rows: tuple[int, int]) -> tuple[int, int]:
    """(worker, W) of equal contiguous rows `rows` of a batch of `batch_size`: how record sources are sharded."""
    start, stop = rows
    count = stop - start
    if batch_size % count or start % count:
        raise ValueError(f"rows {start}..{stop} of a batch of {batch_size} are not one of equal shares: record sources "
                         "give each worker whole files, so the workers' rows must split the batch evenly")
    return start // count, batch_size // count


def order(source, batch_size: int, *, epochs: int | None, steps_per_epoch: int | None = None, start_epoch: int = 0,
          start_step: int = 0, seed: int = 0, shuffle_buffer: int = 10_000,
          rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    """Stage 1: `(epoch, step, items)` per global batch, `items` this worker's `rows` (start, stop) of it.

    The items of epoch e are in an order fixed by (seed, e) alone: a permutation of
    all of them (random-access sources: file names, arrays), whose rows `rows` are
    this worker's; or, for record sources, this worker's files of the epoch's file
    order (`source.epoch_records`: worker w of W, from equal `rows`, reads files
    w, w + W, ...) permuted in windows of `shuffle_buffer` records whose boundaries
    move each epoch, and batched by `stop - start`: global batches then depend on W
    (docs/DATA.md). An
    epoch is `steps_per_epoch` full batches (its order repeated if it must), from
    `start_step` in `start_epoch`. Without `steps_per_epoch` (record sources only)
    the epochs are whole passes one after another, batched across their ends, and
    `step` counts batches from the first: a stream, as `view_pairs` takes it.
    `epochs=None`: without end.
    """
    start, stop = rows or (0, batch_size)
    if epochs is None:
        epoch_numbers = tf.data.Dataset.counter(start_epoch)
    else:
        epoch_numbers = tf.data.Dataset.range(start_epoch, epochs)

    def order_seed(epoch):
        return tf.stack([mix_seeds(seed, epoch), tf.constant(-1, tf.int64)])

    def first_step(epoch):  # a resumed run starts its first epoch at start_step
        return tf.where(tf.equal(epoch, start_epoch), tf.constant(start_step, tf.int64), tf.constant(0, tf.int64))

    def numbered(epoch, batches):
        return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(epoch).repeat(),
                                    tf.data.Dataset.range(first_step(epoch), steps_per_epoch), batches))

    if source.random_access:
        items, _ = source.items()
        need = steps_per_epoch * batch_size

        def one_epoch(epoch):
            keys = tf.tile(epoch_permutation(source.count, order_seed(epoch)), [ceil_div(need, source.count)])[:need]
            mine = tf.reshape(keys, [steps_per_epoch, batch_size])[first_step(epoch):, start:stop]
            return numbered(epoch, tf.data.Dataset.from_tensor_slices(mine).map(lambda keys: tf.gather(items, keys)))

        return epoch_numbers.flat_map(one_epoch)

    sharded = hasattr(source, "epoch_records")
    if sharded:
        worker, workers = record_workers(batch_size, (start, stop))
        epoch_records = source.epoch_records(worker, workers)  # once: a cached source's cache is built here
    else:  # a tf.data dataset (`view_pairs`): one process reads it all, in fixed windows
        records = source.records()

        def epoch_records(seed):
            return records
    local_batch = stop - start

    def shuffled(epoch):
        seed = order_seed(epoch)
        return windowed_permutation(epoch_records(seed), shuffle_buffer, seed, moving=sharded)

    def items_only(items, labels):
        return items

    if steps_per_epoch is None:
        batches = epoch_numbers.flat_map(shuffled).batch(local_batch, drop_remainder=True).skip(start_step)
        return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(tf.constant(start_epoch, tf.int64)).repeat(),
                                    tf.data.Dataset.counter(start_step), batches.map(items_only)))

    def one_epoch(epoch):
        batches = shuffled(epoch).repeat().batch(local_batch, drop_remainder=True).take(steps_per_epoch)
        return numbered(epoch, batches.skip(first_step(epoch)).map(items_only))

    return epoch_numbers.flat_map(one_epoch)


# -- stage 2: decode and crop ------------------------------------------------------------------


def decode_and_crop(batches: tf.data.Dataset, source, two_views, *, batch_size: int, seed: int,
                    rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    """Stage 2: `{"crops_a", "crops_b", "transformation"}` of each batch of `order`: uint8 crops of the view size.

    The views' numbers (`two_views.get_random_transformation`) are drawn for the
    global batch of `batch_size` with the seed of (seed, epoch, step) and this
    worker's rows taken. Encoded images are read and decoded one by one, each
    view's window alone (`decode_crop`); one that fails gives gray images and is
    named in `unreadable_images`, so every row keeps its place. Images in memory
    (uint8 arrays) are cropped batched.
    """
    start, stop = rows or (0, batch_size)
    count = stop - start
    row_ids = (tf.range(start, stop, dtype=tf.int32), batch_size)
    size, channels = two_views.image_size, source.channels

    def numbers(epoch, step):
        shape = (count, None, None, channels)
        return two_views.get_random_transformation(shape, batch_seed(seed, epoch, step), row_ids)

    if not source.is_encoded:
        def crop(epoch, step, images):
            transformation = numbers(epoch, step)
            crops = [tf.cast(tf.round(c * 255.0), tf.uint8) for c in two_views.crop_images(images, transformation)]
            return {"crops_a": crops[0], "crops_b": crops[1], "transformation": transformation}

        return batches.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def per_row(epoch, step, items):
        return tf.data.Dataset.from_tensor_slices((items, numbers(epoch, step)))

    def decode_two(item, transformation):
        contents = source.read(item)
        box_a, box_b = two_views.crop_boxes(transformation)
        return (decode_crop(contents, box_a, size, channels), decode_crop(contents, box_b, size, channels),
                transformation)

    def gray(item, transformation):
        return gray_image([*size, channels]), gray_image([*size, channels]), transformation

    crops = safe_map(batches.flat_map(per_row), decode_two, gray, name_of=lambda item, _: source.name_of(item))
    return crops.batch(count, drop_remainder=True).map(
        lambda crops_a, crops_b, transformation: {"crops_a": crops_a, "crops_b": crops_b,
                                                  "transformation": transformation})


# -- stage 3: the views ------------------------------------------------------------------------


def views_from_crops(two_views, batch: dict):
    """Stage 3: `(view_a, view_b)` of a `decode_and_crop` batch, on the host or inside the train step.

    Per replica too: the numbers were drawn per row, so any rows of a batch give their own views.
    """
    return two_views.transform_crops(batch["crops_a"], batch["crops_b"], batch["transformation"])


# -- the pipeline --------------------------------------------------------------------------------


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

    The three stages of the module docstring: for each (epoch, step) the global
    batch of items is fixed by (seed, epoch) alone (`order`); this worker takes
    rows `row_start .. row_start + row_count` of it and decodes only those, each
    view's crop sampled on the original image (`decode_and_crop`); then the rest of
    the views, batched (`views_from_crops`). The random numbers are drawn for the
    whole global batch and this worker's rows taken, so the rows equal those one
    process makes for them, bit for bit. Resuming at (epoch, step) reproduces the
    rest of that epoch.

    With `device_views=True` the third stage is left to the accelerator: the
    elements are the dicts of `decode_and_crop` (uint8 crops and their numbers),
    which `VICReg(device_views=...)` turns into views inside its train step.

    Args:
        source: a `vicreg_tf.data` source (FolderSource, RecordSource, ArraySource).
        two_views: a `vicreg_tf.augment.TwoViews`.
        batch_size: the global batch size.
        steps_per_epoch, start_epoch, epochs: the epochs to produce.
        start_step: the first step of `start_epoch` (a run resumed mid-epoch).
        seed: int seed of the order and the views.
        shuffle_buffer: encoded records permuted together (record sources only).
        row_start, row_count: this worker's rows of each global batch (default: all).
        device_views: leave the third stage to the model (see above).
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if start_epoch >= epochs:
        raise ValueError(f"nothing left to train: start_epoch={start_epoch} >= epochs={epochs}")
    if not 0 <= start_step < steps_per_epoch:
        raise ValueError(f"start_step must be in [0, {steps_per_epoch}), got {start_step}")
    row_count = batch_size if row_count is None else row_count
    if not (0 <= row_start and row_count > 0 and row_start + row_count <= batch_size):
        raise ValueError(f"rows {row_start}..{row_start + row_count} are not inside a batch of {batch_size}")
    rows = (row_start, row_start + row_count)
    batches = order(source, batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch, start_epoch=start_epoch,
                    start_step=start_step, seed=seed, shuffle_buffer=shuffle_buffer, rows=rows)
    dataset = decode_and_crop(batches, source, two_views, batch_size=batch_size, seed=seed, rows=rows)
    if not device_views:
        dataset = dataset.map(lambda batch: views_from_crops(two_views, batch),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


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
