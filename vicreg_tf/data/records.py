"""Encoded records read in order: tfds datasets (bytes undecoded) and TFRecord files."""
from __future__ import annotations

import glob as _glob
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from vicreg_tf import arguments
from vicreg_tf.data.base import _Source
from vicreg_tf.data.images import EVAL_CROP_FRACTION, NO_LABEL, _to_channels, eval_transform
from vicreg_tf.data.pipeline import mix_seeds

# Records per segment: each file is read from ceil(n / SEGMENT_RECORDS) places at once
# (RecordSource, "Segments"; the choice measured in bench/records.py).
SEGMENT_RECORDS = 8
# Readers open at once per worker (the interleave's cycle length). Each holds its read
# buffer (at most READER_BUFFER bytes: the segment's size when known) and the records
# the parallel interleave has read ahead (a few per reader).
CYCLE_LENGTH = 64
READER_BUFFER = 256 * 1024  # TFRecordDataset's default buffer
# The sidecar index beside the files (`vicreg_tf.data.convert` writes it): per-file record
# counts and byte offsets, so a source needs no counting pass.
INDEX_FILENAME = "index.json"
INDEX_FORMAT = "vicreg-tfrecords-index"
TFRECORD_FRAMING = 16  # bytes around each record: length (8), its CRC (4), the data's CRC (4)
# Reads that start at a byte offset (TensorFlow 2.21 has the op; without it, segments skip their first records).
_BYTE_OFFSETS = hasattr(tf.raw_ops, "TFRecordDatasetV2")


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


def read_file(filename: tf.Tensor, byte_offset=0, buffer_size=READER_BUFFER) -> tf.data.Dataset:
    """The serialized records of one TFRecord file from `byte_offset` (a record's start) on.

    A hook: tests wrap it to count what is read. `buffer_size` is the reader's read buffer.
    """
    if not _BYTE_OFFSETS:  # then every offset given is 0 (`RecordSource` skips records instead)
        return tf.data.TFRecordDataset(filename, buffer_size=buffer_size)
    variant = tf.raw_ops.TFRecordDatasetV2(
        filenames=tf.reshape(filename, [1]), compression_type="", buffer_size=tf.cast(buffer_size, tf.int64),
        byte_offsets=tf.reshape(tf.cast(byte_offset, tf.int64), [1]))
    return tf.data.experimental.from_variant(variant, tf.TensorSpec([], tf.string))


def scan_files(files: Sequence[str]) -> list[np.ndarray]:
    """Each file's record lengths in bytes (int64), read once through `read_file`, files in parallel."""
    names = tf.constant([str(f) for f in files])

    def lengths(i, filename):
        return read_file(filename).map(tf.strings.length).batch(1 << 16).map(lambda n: (i, tf.cast(n, tf.int64)))

    chunks = [[] for _ in files]
    scan = tf.data.Dataset.from_tensor_slices((tf.range(len(files)), names)).interleave(
        lengths, cycle_length=min(len(files), 16), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for i, n in scan.as_numpy_iterator():
        chunks[i].append(n)
    return [np.concatenate(c) if c else np.zeros(0, np.int64) for c in chunks]


def offsets_of(lengths: np.ndarray, stride: int = 1) -> np.ndarray:
    """Byte offsets of records 0, stride, 2 * stride, ... of a file whose records have `lengths`."""
    starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64) + TFRECORD_FRAMING)])[:len(lengths)]
    return starts[::stride].astype(np.int64)


def read_index(files: Sequence[str]) -> dict:
    """{file: {"records", "bytes", "offsets", "offset_stride"}} of the files an index beside them describes.

    An entry counts only when the file still has the size the index recorded; an
    unreadable index is ignored with a warning (the files are then counted).
    """
    entries = {}
    for directory in sorted({os.path.dirname(os.path.abspath(f)) for f in files}):
        path = os.path.join(directory, INDEX_FILENAME)
        if not os.path.isfile(path):
            continue
        try:
            index = json.loads(Path(path).read_text())
            if index.get("format") != INDEX_FORMAT:
                continue
            stride, described = int(index["offset_stride"]), index["files"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            warnings.warn(f"ignoring the index {path}: {error}", stacklevel=3)
            continue
        for f in files:
            entry = described.get(os.path.basename(f)) if os.path.dirname(os.path.abspath(f)) == directory else None
            if not entry or int(entry.get("bytes", -1)) != os.path.getsize(f):
                continue
            records, offsets = int(entry["records"]), np.asarray(entry["offsets"], np.int64)
            if len(offsets) == -(-records // stride):
                entries[f] = {"records": records, "offsets": offsets, "offset_stride": stride}
    return entries


def segment_table(records: Sequence[int], segment_records: int | None, *, skip_take=None, offsets=None,
                  file_bytes=None) -> np.ndarray:
    """Rows (file, first record, records, byte offset or -1, read buffer) that cover every file.

    `records`: each file's record count (-1: unknown, one segment reads the whole file
    or its `skip_take` slice). With `segment_records`, a file is split into segments
    of that many records. `offsets`: per file None or (byte offsets of records 0, s,
    2s, ..., s): its segments are rounded up to a multiple of s records, each starts
    at its byte offset and its reader's buffer is the segment's size (at most
    READER_BUFFER, `file_bytes` giving the last one's end); other segments skip their
    first records.
    """
    rows = []
    for f, n in enumerate(records):
        skip, take = (0, -1) if skip_take is None else (int(skip_take[f][0]), int(skip_take[f][1]))
        if n < 0 or not segment_records:
            rows.append((f, skip, take, -1, READER_BUFFER))
            continue
        starts, stride = (None, 1) if offsets is None or offsets[f] is None or not _BYTE_OFFSETS else offsets[f]
        size = -(-segment_records // stride) * stride
        stop = n if take < 0 else min(n, skip + take)
        for first in range(skip, stop, size):
            count = min(size, stop - first)
            if starts is not None and first % stride == 0:
                end = starts[(first + count) // stride] if first + count < n else file_bytes[f]
                start = starts[first // stride]
                rows.append((f, first, count, start, max(1, min(READER_BUFFER, end - start))))
            else:
                rows.append((f, first, count, -1, READER_BUFFER))
    return np.array(rows, np.int64).reshape(-1, 5)


class RecordSource(_Source):
    """Encoded images read in order from record files (tfds shards or TFRecords); no random access.

    Each epoch of W workers (docs/DATA.md, "What each worker reads"): the files are
    permuted with a stateless seed of (seed, epoch), file i of that order goes to
    worker i % W (`tf.data.Dataset.shard`'s convention), so each worker reads about
    1/W of the bytes. Its records are then permuted in windows of `shuffle_buffer`
    whose boundaries move by a random offset each epoch
    (`pipeline.windowed_permutation`). The shuffle holds bytes, not decoded images
    (about 110 kB per ImageNet JPEG). When the source's size on disk is at most
    `cache_mb`, each worker keeps the encoded records of its files in memory, read
    once for the whole run: its files are then files worker, worker + W, ... of the
    stored order (tfds' `input_context` convention), read in that order every epoch
    (the windows still move and reshuffle).

    Segments. A window of `shuffle_buffer` records only holds records near the
    positions being read, and a class-sorted file has one or two classes there. So
    when each file's record count is known, a file is read from several places at
    once: it is split into segments of `segment_records` records (K = ceil(n /
    segment_records) per file), a worker's segments are permuted with the epoch's seed
    (a cached source: with a fixed one) and read CYCLE_LENGTH at a time, one record of
    each in turn. A window then holds records from about max(CYCLE_LENGTH,
    shuffle_buffer / segment_records) places instead of one per file open. With byte
    offsets (the index beside the files, or the counting pass of `from_tfrecords`) a
    segment starts with a seek and reads its own bytes only; without them (tfds) it
    skips its first records, which reads them.

    SEGMENT_RECORDS = 8, from bench/records.py (distinct classes per batch on
    class-sorted files, as a share of a uniform shuffle's): 10 classes in 8 files,
    window 256, batch 32: 0.89 whole files, 0.98 in segments of 8; 200 classes in 64
    files, window 2,000, batch 256: 0.50 -> 0.82 (segments of 4: 0.93); ImageNet in
    1,024 files, window 10,000, batch 256 (a NumPy model of this order, which matches
    the measured sets): 0.30 -> 0.93 (4: 0.97). Records and bytes read do not change
    (19.4 MB per epoch of the 200-class set whatever the segments); what grows is the
    readers opened, one per segment (a seek each, and a request each on remote
    storage): segments of 8 ImageNet JPEGs are ~0.9 MB reads, of 4 ~0.45 MB.
    Memory: CYCLE_LENGTH readers per worker, each with a read buffer of at most
    READER_BUFFER (256 KiB, TFRecordDataset's default; the segment's size when
    smaller) plus the records the parallel interleave reads ahead for the readers open
    and the next ones: measured with 110 kB records, ~150 MB of resident memory for
    64 readers over segments (~2.3 MB per reader), ~75 MB reading whole files 64 at a
    time (`python -m bench.records --memory`), next to the shuffle window's
    shuffle_buffer x 110 kB (1.1 GB at 10,000).

    Args:
        files: the record files, in their stored order.
        parse: a serialized record -> (encoded image bytes, int32 label).
        count, channels, labelled: as every source.
        description: what `describe()` reports; "pattern" names the files in errors.
        bytes_on_disk: the files' size (0: unknown, never cached).
        cache_mb: keep the encoded records in memory when `bytes_on_disk` is at most this.
        skip_take: per file, (records to skip, records to take or -1): a tfds split slice.
        segments: rows (file, first record, records, byte offset or -1, read buffer)
            from `segment_table`; None: one per file (its `skip_take` slice).
    """

    kind = "records"
    random_access = False
    _limit = 0
    _sample_seed: int | None = None

    def __init__(self, files: Sequence[str], parse, count: int, channels: int, labelled: bool, *,
                 description: dict, bytes_on_disk: int = 0, cache_mb: float = 1024,
                 skip_take: Sequence[tuple[int, int]] | None = None, segments: np.ndarray | None = None):
        super().__init__(count, channels, labelled)
        self.files = [str(f) for f in files]
        self._parse = parse
        self._skip_take = np.array(skip_take if skip_take is not None else [(0, -1)] * len(self.files), np.int64)
        if segments is None:
            segments = segment_table([-1] * len(self.files), None, skip_take=self._skip_take)
        self.segments = np.asarray(segments, np.int64).reshape(-1, 5)
        self._description = description
        self.bytes_on_disk = int(bytes_on_disk)
        self.cache = bool(bytes_on_disk) and bytes_on_disk <= cache_mb * 2**20
        self.classes: list[str] = []
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
        records = records.interleave(one_file, cycle_length=max(1, min(cycle_length, CYCLE_LENGTH)), block_length=1,
                                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return records.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _read_segments(self, rows: tf.Tensor, cycle_length: int) -> tf.data.Dataset:
        files = tf.constant(self.files)

        def one_segment(row):
            offset = row[3]
            records = read_file(files[row[0]], tf.maximum(offset, 0), row[4])
            return records.skip(tf.where(offset < 0, row[1], 0)).take(row[2])

        records = tf.data.Dataset.from_tensor_slices(rows).interleave(
            one_segment, cycle_length=max(1, min(cycle_length, CYCLE_LENGTH)), block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return records.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    @property
    def segmented(self) -> bool:
        """Some file is read from more than one place."""
        return len(self.segments) > len(self.files)

    def records(self) -> tf.data.Dataset:
        """(encoded bytes, int32 label) of every file, in the stored order (a `sample`: its records)."""
        if self._sample_seed is not None:
            # Segments in a seeded order, at most `per` records from each, and only the first ones whose
            # records reach `_limit` (a segment shorter than `per` counts as its length; a whole file of
            # unknown count as `per`): the interleave reads ahead in every segment it opens, so none
            # is opened that the sample does not read. Reads `_limit` records (at most `per` - 1 more).
            per = -(-self._limit // len(self.segments))
            rows = self.segments.copy()
            rows[:, 2] = np.where(rows[:, 2] < 0, per, np.minimum(rows[:, 2], per))
            order = tf.random.experimental.stateless_shuffle(
                tf.range(len(rows), dtype=tf.int64), seed=tf.constant([self._sample_seed, -4], tf.int64))
            rows = rows[order.numpy()]
            needed = min(len(rows), int(np.searchsorted(np.cumsum(rows[:, 2]), self._limit)) + 1)
            return self._read_segments(tf.constant(rows[:needed]), needed).take(self._limit)
        records = self._read(tf.constant(self.files), tf.constant(self._skip_take), len(self.files))
        return records.take(self._limit) if self._limit else records

    def sample(self, n: int, seed: int = 0) -> "RecordSource":
        """At most `n` records from all over the set (`n` = 0: all): up to ceil(n / segments) records from
        each of the first segments (files, when none is split) of an order drawn by `seed`, read
        CYCLE_LENGTH at a time, so a class-sorted set's sample is not its first classes. Reads `n`
        records (fewer than ceil(n / segments) more), the same ones every time."""
        if not n or n >= self.count:
            return self
        clone = self.limited(n)
        clone._sample_seed = int(seed)
        return clone

    def epoch_records(self, worker: int = 0, workers: int = 1):
        """A function (2,) epoch seed -> this worker's records of that epoch, before the windows' shuffle.

        The file order is a stateless permutation by the seed; this worker reads
        files `worker, worker + W, ...` of it: their segments in an order permuted by
        the seed as well, or, when no file is split, the files in that order. A
        cached source reads its files once (see the class docstring). A limited
        source (smoke runs) reads its first records on every worker and keeps record
        i when i % W == worker.
        """
        if self._limit:
            mine = self.records().shard(workers, worker)
            return lambda seed: mine
        self.check_workers(workers)
        if self.segmented:
            return self._epoch_segments(worker, workers)
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

    def _epoch_segments(self, worker: int, workers: int):
        table = tf.constant(self.segments)
        count = len(self.files)
        cycle_length = -(-len(self.segments) // workers)

        def mine(file_order, seed):
            position = tf.math.invert_permutation(file_order)  # file -> its place in the epoch's order
            owned = tf.where(tf.equal(tf.gather(position, table[:, 0]) % workers, worker))[:, 0]
            # The segments' order: its own stream of the epoch's seed (-3; the windows take -2 and indices >= 0).
            order = tf.random.experimental.stateless_shuffle(owned, seed=tf.stack([seed[0], mix_seeds(seed[1], -3)]))
            return self._read_segments(tf.gather(table, order), cycle_length)

        if not self.cache:
            return lambda seed: mine(tf.random.experimental.stateless_shuffle(tf.range(count), seed=seed), seed)
        if (worker, workers) not in self._cached:  # built once, segments in a fixed order
            self._cached[worker, workers] = mine(tf.range(count), tf.constant([0, -1], tf.int64)).cache()
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
                  cache_mb: float = 1024, segment_records: int | None | str = "auto") -> "RecordSource":
        """A prepared tfds dataset, its images left encoded (`tfds.decode.SkipDecoding`).

        The split's files are read as TFRecords and parsed by the dataset's own
        features, so they are sharded per worker and per epoch as TFRecord files are
        (tfds' `ReadConfig(input_context=...)` would fix each worker's files for the
        whole run and reshuffle them per process, not per (seed, epoch)).

        `segment_records` (see the class docstring, "Segments"): the shard lengths come
        from the metadata, but tfds stores no byte offsets, so a segment skips (reads)
        the records before it in its shard. "auto": whole shards, unless the dataset
        was written unshuffled (`info.disable_shuffling`): tfds shuffles the examples
        across its shards when it prepares a dataset, so its shards are not class-sorted.

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
        if segment_records == "auto":
            segment_records = SEGMENT_RECORDS if getattr(builder.info, "disable_shuffling", False) else None
        segments = segment_table([int(i.examples_in_shard) for i in instructions],
                                 _segment_records(segment_records), skip_take=skip_take)
        decoders = {image_key: tfds.decode.SkipDecoding()}

        def parse(serialized):
            example = features.deserialize_example(serialized, decoders=decoders)
            label = tf.cast(example[label_key], tf.int32) if has_label else tf.constant(NO_LABEL, tf.int32)
            return example[image_key], label

        source = cls(files, parse, count, channels, has_label,
                     description={"kind": "tfds", "name": name, "split": split, "data_dir": str(builder.data_dir),
                                  "pattern": f"tfds {name} {split}"},
                     bytes_on_disk=size, cache_mb=cache_mb, skip_take=skip_take, segments=segments)
        source.stored_channels = features[image_key].shape[-1]
        return source

    @classmethod
    def from_tfrecords(cls, pattern: str | Sequence[str], *, channels: int = 3, image_key: str | None = None,
                       label_key: str | None = None, count: int = 0, cache_mb: float = 1024,
                       segment_records: int | None = SEGMENT_RECORDS) -> "RecordSource":
        """TFRecord files of `tf.train.Example`s holding encoded images.

        The image feature is `image_key`, else the first of "image/encoded" (the
        TF models / ImageNet convention) and "image" (tfds) present; the label is
        `label_key`, else "image/class/label" or "label" when present.

        Each file's record count and byte offsets come from the index beside the files
        (INDEX_FILENAME, written by `vicreg-tfrecords`) when it describes them at their
        current size; else `count=0` counts them by reading the files once (no
        decoding), and a known `count` skips that pass (each file is then read from its
        start only). `segment_records`: records per segment (class docstring,
        "Segments"); None reads each file from its start only.
        """
        files = sorted(_glob.glob(pattern)) if isinstance(pattern, str) else [str(p) for p in pattern]
        if not files:
            raise ValueError(f"no TFRecord files match {pattern!r}")
        channels = arguments.channels(channels)
        segment_records = _segment_records(segment_records)
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

        sizes = [os.path.getsize(f) for f in files]
        index = read_index(files)
        unindexed = [f for f in files if f not in index]
        if unindexed and not count:  # the counting pass: each record's length, so offsets come with the counts
            for f, lengths in zip(unindexed, scan_files(unindexed)):
                index[f] = {"records": len(lengths), "offsets": offsets_of(lengths), "offset_stride": 1}
        known = [index.get(f) for f in files]
        records = [e["records"] if e else -1 for e in known]
        if not count:
            count = sum(records)
        segments = segment_table(records, segment_records, file_bytes=sizes,
                                 offsets=[(e["offsets"], e["offset_stride"]) if e else None for e in known])
        shown = pattern if isinstance(pattern, str) else f"{files[0]} and {len(files) - 1} more"
        source = cls(files, parse, count, channels, label_key is not None,
                     description={"kind": "tfrecords", "pattern": shown,
                                  "files": [os.path.abspath(f) for f in files][:1000]},
                     bytes_on_disk=sum(sizes), cache_mb=cache_mb, segments=segments)
        source.classes = _index_classes(files)
        return source


def _segment_records(value) -> int | None:
    if value is None or value == 0:
        return None
    return arguments.positive_int("segment_records", value)


def _index_classes(files: Sequence[str]) -> list[str]:
    """The class names an index beside the files records (empty without one)."""
    path = os.path.join(os.path.dirname(os.path.abspath(files[0])), INDEX_FILENAME)
    try:
        index = json.loads(Path(path).read_text())
        return [str(c) for c in index.get("classes", [])] if index.get("format") == INDEX_FORMAT else []
    except (OSError, ValueError, AttributeError):
        return []
