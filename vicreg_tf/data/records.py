"""Encoded records read in order: tfds datasets (bytes undecoded) and TFRecord files."""
from __future__ import annotations

import glob as _glob
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from vicreg_tf import arguments
from vicreg_tf.data.base import _Source
from vicreg_tf.data.images import EVAL_CROP_FRACTION, NO_LABEL, _to_channels, eval_transform


def _tfds_builder(name: str, data_dir, image_key: str | None):
    """(builder, its features, the image feature's key), or a ValueError naming what is wrong."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"{name!r} is not a registered tfds dataset; see tfds.list_builders() for the names "
            f"(e.g. 'cifar10', 'imagenet2012'). tfds said: {str(error).splitlines()[0]}"
        ) from None
    features = builder.info.features
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if image_key is None:
        if len(image_keys) != 1:
            raise ValueError(f"{name}: cannot tell the image feature among {image_keys}; pass image_key=")
        image_key = image_keys[0]
    elif image_key not in features:
        raise ValueError(f"image_key {image_key!r} is not a feature of {name}; features: {list(features)}")
    return builder, features, image_key


def from_tfds(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: Sequence[int] | int | None = None,
    *,
    channels: int | None = None,
    download: bool = True,
    image_key: str | None = None,
    label_key: str | None = "label",
    crop_fraction: float = EVAL_CROP_FRACTION,
) -> tf.data.Dataset:
    """A TensorFlow Datasets dataset as (image float32 in [0, 1], label int32) pairs.

    Args:
        name: a registered tfds name, e.g. "cifar10" or "cifar10:3.0.2".
        split: any tfds split string: "train", "test", "train[:10%]".
        data_dir: tfds data folder (default: tfds's, ~/tensorflow_datasets).
        image_size: (height, width) to resize to; None keeps the stored size
            (which must then be fixed).
        channels: 1 or 3 to convert to; None keeps the stored channels.
        download: let tfds download and prepare a dataset that is not yet in
            `data_dir` (needs internet for most datasets).
        image_key: the image feature (default: the only Image feature).
        label_key: the label feature; its absence gives label -1.
        crop_fraction: with `image_size`, the evaluation transform's center crop share
            (`eval_transform`).

    Raises:
        ValueError: `name` is not a registered tfds dataset.

    Example:
    >>> train = from_tfds("cifar10", "train", image_size=(32, 32))  # doctest: +SKIP
    """

    size = None if image_size is None else arguments.image_size(image_size)
    crop_fraction = arguments.crop_fraction(crop_fraction)
    if channels is not None:
        channels = arguments.channels(channels)
    builder, features, image_key = _tfds_builder(name, data_dir, image_key)
    if size is None and None in tuple(features[image_key].shape[:2]):
        raise ValueError(f"{name} images have no fixed size {features[image_key].shape}; pass image_size=(h, w)")
    has_label = label_key is not None and label_key in features
    if download:
        builder.download_and_prepare()
    dataset = builder.as_dataset(split=split, shuffle_files=False)

    def convert(example):
        image = _to_channels(example[image_key], channels)
        if size is None:
            image = tf.image.convert_image_dtype(image, tf.float32)
        else:  # the standard evaluation transform: shorter side to size / crop_fraction, center crop
            image = eval_transform(image, size, crop_fraction)
        label = tf.cast(example[label_key], tf.int32) if has_label else tf.constant(NO_LABEL, tf.int32)
        return image, label

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def read_file(filename: tf.Tensor) -> tf.data.Dataset:
    """The serialized records of one TFRecord file (a hook: tests wrap it to count what is read)."""
    return tf.data.TFRecordDataset(filename)


class RecordSource(_Source):
    """Encoded images read in order from record files (tfds shards or TFRecords); no random access.

    Each epoch of W workers (docs/DATA.md, "What each worker reads"): the files are
    permuted with a stateless seed of (seed, epoch), file i of that order goes to
    worker i % W (`tf.data.Dataset.shard`'s convention), and each worker reads its
    files interleaved, so it reads about 1/W of the bytes. Its records are then
    permuted in windows of `shuffle_buffer` whose boundaries move by a random offset
    each epoch (`pipeline.windowed_permutation`). The shuffle holds bytes, not
    decoded images (about 110 kB per ImageNet JPEG). When the source's size on disk
    is at most `cache_mb`, each worker keeps the encoded records of its files in
    memory, read once for the whole run: its files are then files worker, worker + W,
    ... of the stored order (tfds' `input_context` convention), read in that order
    every epoch (the windows still move and reshuffle).

    Args:
        files: the record files, in their stored order.
        parse: a serialized record -> (encoded image bytes, int32 label).
        count, channels, labelled: as every source.
        description: what `describe()` reports; "pattern" names the files in errors.
        bytes_on_disk: the files' size (0: unknown, never cached).
        cache_mb: keep the encoded records in memory when `bytes_on_disk` is at most this.
        skip_take: per file, (records to skip, records to take or -1): a tfds split slice.
    """

    kind = "records"
    random_access = False
    _limit = 0

    def __init__(self, files: Sequence[str], parse, count: int, channels: int, labelled: bool, *,
                 description: dict, bytes_on_disk: int = 0, cache_mb: float = 1024,
                 skip_take: Sequence[tuple[int, int]] | None = None):
        super().__init__(count, channels, labelled)
        self.files = [str(f) for f in files]
        self._parse = parse
        self._skip_take = np.array(skip_take if skip_take is not None else [(0, -1)] * len(self.files), np.int64)
        self._description = description
        self.bytes_on_disk = int(bytes_on_disk)
        self.cache = bool(bytes_on_disk) and bytes_on_disk <= cache_mb * 2**20
        self._cached = {}

    def describe(self) -> dict:
        return {**self._description, "count": self.count}

    def check_workers(self, workers: int) -> None:
        """Raises, in one line, when there are fewer files than `workers` (each worker reads whole files)."""
        if not self._limit and len(self.files) < workers:
            raise ValueError(
                f"{self._description.get('pattern', self.files[0])}: {len(self.files)} record file(s) for {workers} "
                f"workers; each worker reads whole files, so write the records into at least {workers} files"
            )

    def _read(self, files: tf.Tensor, skip_take: tf.Tensor, cycle_length: int) -> tf.data.Dataset:
        def one_file(filename, skip, take):
            return read_file(filename).skip(skip).take(take)

        records = tf.data.Dataset.from_tensor_slices((files, skip_take[:, 0], skip_take[:, 1]))
        records = records.interleave(one_file, cycle_length=max(1, min(cycle_length, 64)), block_length=1,
                                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return records.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def records(self) -> tf.data.Dataset:
        """(encoded bytes, int32 label) of every file, in the stored order."""
        records = self._read(tf.constant(self.files), tf.constant(self._skip_take), len(self.files))
        return records.take(self._limit) if self._limit else records

    def epoch_records(self, worker: int = 0, workers: int = 1):
        """A function (2,) epoch seed -> this worker's records of that epoch, before the windows' shuffle.

        The file order is a stateless permutation by the seed; this worker reads
        files `worker, worker + W, ...` of it. A cached source reads its files once
        (see the class docstring). A limited source (smoke runs) reads its first
        records on every worker and keeps record i when i % W == worker.
        """
        if self._limit:
            mine = self.records().shard(workers, worker)
            return lambda seed: mine
        self.check_workers(workers)
        files, skip_take = tf.constant(self.files), tf.constant(self._skip_take)
        cycle_length = -(-len(self.files) // workers)

        def shard(order):
            return tf.gather(files, order[worker::workers]), tf.gather(skip_take, order[worker::workers])

        if not self.cache:
            return lambda seed: self._read(*shard(tf.random.experimental.stateless_shuffle(
                tf.range(len(self.files)), seed=seed)), cycle_length)
        if (worker, workers) not in self._cached:  # built once: a cache made per epoch would start empty
            self._cached[worker, workers] = self._read(*shard(tf.range(len(self.files))), cycle_length).cache()
        cached = self._cached[worker, workers]
        return lambda seed: cached

    def limited(self, n: int) -> "RecordSource":
        if n >= self.count:
            return self
        clone = object.__new__(RecordSource)
        clone.__dict__.update(self.__dict__)
        clone._limit, clone.count, clone._cached = n, n, {}
        return clone

    def encoded_items(self):
        return self.records()

    def encoded(self):
        return self.records()

    # -- constructors --

    @classmethod
    def from_tfds(cls, name: str, split: str = "train", data_dir=None, *, channels: int = 3,
                  image_key: str | None = None, label_key: str | None = "label",
                  cache_mb: float = 1024) -> "RecordSource":
        """A prepared tfds dataset, its images left encoded (`tfds.decode.SkipDecoding`).

        The split's files are read as TFRecords and parsed by the dataset's own
        features, so they are sharded per worker and per epoch as TFRecord files are
        (tfds' `ReadConfig(input_context=...)` would fix each worker's files for the
        whole run and reshuffle them per process, not per (seed, epoch)).

        Raises:
            ValueError: an unknown name, or a dataset not prepared in `data_dir`
                (the message gives the command that prepares it), or not stored as TFRecords.
        """
        import tensorflow_datasets as tfds

        channels = arguments.channels(channels)
        builder, features, image_key = _tfds_builder(name, data_dir, image_key)
        if not builder.is_prepared():
            where = builder.data_dir
            raise ValueError(
                f"tfds dataset {name!r} is not prepared in {where}. Prepare it once with "
                f"`tfds build {name} --data_dir={Path(where).parents[1] if len(Path(where).parents) > 1 else where}` "
                f"(ImageNet needs its tar files in <data_dir>/downloads/manual first), or pass data_dir= "
                "to the folder that holds it."
            )
        file_format = str(getattr(builder.info, "file_format", "tfrecord") or "tfrecord")
        if "tfrecord" not in file_format.lower():
            raise ValueError(f"tfds dataset {name!r} is stored as {file_format}; only TFRecord-stored datasets stream "
                             f"(prepare it with `tfds build {name} --file_format=tfrecord`)")
        has_label = label_key is not None and label_key in features
        split_info = builder.info.splits[split]
        count = int(split_info.num_examples)
        try:
            size = int(split_info.num_bytes)
        except Exception:  # older metadata
            size = 0
        instructions = split_info.file_instructions
        files = [os.fspath(i.filename) for i in instructions]
        files = [f if os.path.isabs(f) else os.path.join(builder.data_dir, f) for f in files]
        skip_take = [(int(i.skip), -1 if i.takes_all else int(i.take)) for i in instructions]
        decoders = {image_key: tfds.decode.SkipDecoding()}

        def parse(serialized):
            example = features.deserialize_example(serialized, decoders=decoders)
            label = tf.cast(example[label_key], tf.int32) if has_label else tf.constant(NO_LABEL, tf.int32)
            return example[image_key], label

        source = cls(files, parse, count, channels, has_label,
                     description={"kind": "tfds", "name": name, "split": split, "data_dir": str(builder.data_dir),
                                  "pattern": f"tfds {name} {split}"},
                     bytes_on_disk=size, cache_mb=cache_mb, skip_take=skip_take)
        source.stored_channels = features[image_key].shape[-1]
        return source

    @classmethod
    def from_tfrecords(cls, pattern: str | Sequence[str], *, channels: int = 3, image_key: str | None = None,
                       label_key: str | None = None, count: int = 0, cache_mb: float = 1024) -> "RecordSource":
        """TFRecord files of `tf.train.Example`s holding encoded images.

        The image feature is `image_key`, else the first of "image/encoded" (the
        TF models / ImageNet convention) and "image" (tfds) present; the label is
        `label_key`, else "image/class/label" or "label" when present. `count`:
        the number of records if known; 0 counts them once by reading the files
        (no decoding).
        """
        files = sorted(_glob.glob(pattern)) if isinstance(pattern, str) else [str(p) for p in pattern]
        if not files:
            raise ValueError(f"no TFRecord files match {pattern!r}")
        channels = arguments.channels(channels)
        first = next(iter(tf.data.TFRecordDataset(files).take(1)), None)
        if first is None:
            raise ValueError(f"{pattern!r}: the {len(files)} file(s) it matches hold no records")
        try:
            example = tf.train.Example.FromString(first.numpy())
        except Exception:
            raise ValueError(f"{files[0]}: records are not tf.train.Example protos") from None
        keys = dict(example.features.feature)
        if image_key is None:
            image_key = next((k for k in ("image/encoded", "image") if k in keys), None)
        if image_key not in keys or keys[image_key].WhichOneof("kind") != "bytes_list":
            raise ValueError(
                f"{files[0]}: no encoded-image feature {image_key or 'image/encoded or image'!r} (bytes); "
                f"the records have features {sorted(keys)}; pass image_key="
            )
        if label_key is None:
            label_key = next((k for k in ("image/class/label", "label") if k in keys), None)
        elif label_key not in keys:
            raise ValueError(f"{files[0]}: no label feature {label_key!r}; the records have {sorted(keys)}")
        spec = {image_key: tf.io.FixedLenFeature([], tf.string)}
        if label_key is not None:
            spec[label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=NO_LABEL)

        def parse(record):
            parsed = tf.io.parse_single_example(record, spec)
            label = tf.cast(parsed[label_key], tf.int32) if label_key else tf.constant(NO_LABEL, tf.int32)
            return parsed[image_key], label

        if not count:
            count = int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))
        size = sum(os.path.getsize(f) for f in files)
        shown = pattern if isinstance(pattern, str) else f"{files[0]} and {len(files) - 1} more"
        return cls(files, parse, count, channels, label_key is not None,
                   description={"kind": "tfrecords", "pattern": shown,
                                "files": [os.path.abspath(f) for f in files][:1000]},
                   bytes_on_disk=size, cache_mb=cache_mb)
