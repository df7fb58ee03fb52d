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


class RecordSource(_Source):
    """Encoded images read in order from record files (tfds shards or TFRecords); no random access.

    Every epoch reads the records in order, keeps `shuffle_buffer` encoded records
    at a time and permutes them with a stateless seed of (seed, epoch): the
    shuffle holds bytes, not decoded images (about 110 kB per ImageNet JPEG). When
    the source's size on disk is at most `cache_mb`, the encoded records are kept
    in memory after the first epoch.
    """

    kind = "records"
    random_access = False

    def __init__(self, make_records, count: int, channels: int, labelled: bool, *, description: dict,
                 bytes_on_disk: int = 0, cache_mb: float = 1024):
        super().__init__(count, channels, labelled)
        self._make_records = make_records
        self._description = description
        self.bytes_on_disk = int(bytes_on_disk)
        self.cache = bool(bytes_on_disk) and bytes_on_disk <= cache_mb * 2**20

    def describe(self) -> dict:
        return {**self._description, "count": self.count}

    def records(self) -> tf.data.Dataset:
        """(encoded bytes, int32 label) in the stored order."""
        records = self._make_records()
        if self._limit:
            records = records.take(self._limit)
        return records.cache() if self.cache else records

    _limit = 0

    def limited(self, n: int) -> "RecordSource":
        if n >= self.count:
            return self
        clone = object.__new__(RecordSource)
        clone.__dict__.update(self.__dict__)
        clone._limit, clone.count = n, n
        return clone

    def encoded_items(self):
        return self.records()

    def encoded(self):
        return self.records()

    # -- constructors --

    @classmethod
    def from_tfds(cls, name: str, split: str = "train", data_dir=None, *, channels: int = 3,
                  image_key: str | None = None, label_key: str | None = "label", cache_mb: float = 1024,
                  read_config=None) -> "RecordSource":
        """A prepared tfds dataset, its images left encoded (`tfds.decode.SkipDecoding`).

        Raises:
            ValueError: an unknown name, or a dataset not prepared in `data_dir`
                (the message gives the command that prepares it).
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
        has_label = label_key is not None and label_key in features
        count = int(builder.info.splits[split].num_examples)
        try:
            size = int(builder.info.splits[split].num_bytes)
        except Exception:  # older metadata
            size = 0
        stored_channels = features[image_key].shape[-1]
        read_config = read_config or tfds.ReadConfig(interleave_cycle_length=16, interleave_block_length=1)

        def make():
            dataset = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                                         decoders={image_key: tfds.decode.SkipDecoding()})

            def convert(example):
                label = tf.cast(example[label_key], tf.int32) if has_label else tf.constant(NO_LABEL, tf.int32)
                return example[image_key], label

            return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        source = cls(make, count, channels, has_label,
                     description={"kind": "tfds", "name": name, "split": split, "data_dir": str(builder.data_dir)},
                     bytes_on_disk=size, cache_mb=cache_mb)
        source.stored_channels = stored_channels
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
        first = next(iter(tf.data.TFRecordDataset(files[0]).take(1)), None)
        if first is None:
            raise ValueError(f"{files[0]} holds no records")
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

        def make():
            names = tf.data.Dataset.from_tensor_slices(files)
            records = names.interleave(tf.data.TFRecordDataset, cycle_length=min(16, len(files)), block_length=1,
                                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        if not count:
            count = int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))
        size = sum(os.path.getsize(f) for f in files)
        return cls(make, count, channels, label_key is not None,
                   description={"kind": "tfrecords", "files": [os.path.abspath(f) for f in files][:1000]},
                   bytes_on_disk=size, cache_mb=cache_mb)
