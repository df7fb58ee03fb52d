"""Streaming image sources: images travel encoded (or as uint8 arrays) until a view is made.

A source knows how many images it holds and hands out, for each epoch, the
global batches of *items*: file names (folders: random access, so a shuffle
permutes names and costs kilobytes), encoded image bytes (tfds and TFRecords:
read in order, shuffled in windows of encoded records) or uint8 arrays
(in-memory sources such as Fashion-MNIST). Nothing is decoded until a worker
makes the views of its own rows (`vicreg_tf.training.view_pair_batches`).

    FolderSource(path)                 a folder of jpg/png/bmp/gif (class sub-folders = labels)
    RecordSource.from_tfds(name, ...)  a prepared tfds dataset, bytes undecoded (SkipDecoding)
    RecordSource.from_tfrecords(glob)  TFRecord files of tf.train.Example (image bytes + label)
    ArraySource(images, labels)        uint8 arrays in memory

Every source gives the same encoded element spec from `encoded()`:
`(bytes: tf.string, label: tf.int32)` (arrays: `(uint8 image, label)`), and
evaluation images from `images(image_size)`: decoded, resized so the shorter side
is image_size / 0.875 and center-cropped (the standard evaluation transform; an
image already of `image_size` is left as it is).

Unreadable images never stop an epoch and are never searched for up front: an
image that fails to decode is replaced by a mid-gray image (so every global batch
keeps its rows on every worker), counted, and reported once per epoch by
`UnreadableImagesReport`.
"""
from __future__ import annotations

import glob as _glob
import os
import threading
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
NO_LABEL = -1
EVAL_CROP_FRACTION = 0.875  # 224 / 256: the standard resize-then-center-crop
_GRAY = 128

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderSource",
    "RecordSource",
    "ArraySource",
    "unreadable_images",
    "decode_crop",
    "eval_transform",
]


# -- unreadable images -------------------------------------------------------------


class _Unreadable:
    """Names of images that failed to decode since the last `take()` (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._names: list[str] = []
        self.total = 0

    def record(self, name) -> None:
        name = name.numpy().decode("utf-8", "replace") if hasattr(name, "numpy") else str(name)
        with self._lock:
            self._names.append(name)
            self.total += 1

    def take(self) -> list[str]:
        with self._lock:
            names, self._names = self._names, []
        return names


unreadable_images = _Unreadable()


def _record_unreadable(name: tf.Tensor) -> tf.Tensor:
    def record(n):
        unreadable_images.record(n)
        return np.int32(0)

    return tf.py_function(record, [name], tf.int32)


# -- decoding and cropping -----------------------------------------------------------


def _is_jpeg(contents: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")


def _decode_full(contents: tf.Tensor, channels: int) -> tf.Tensor:
    # decode_image takes channels 0 or 3 for every format (BMP and GIF refuse 1).
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    return tf.image.rgb_to_grayscale(image) if channels == 1 else image


def encoded_shape(contents: tf.Tensor, channels: int) -> tf.Tensor:
    """(height, width) of an encoded image: from the JPEG header alone, else by decoding."""
    return tf.cond(
        _is_jpeg(contents),
        lambda: tf.image.extract_jpeg_shape(contents)[:2],
        lambda: tf.shape(_decode_full(contents, channels))[:2],
    )


def _resize_uint8(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def decode_crop(contents: tf.Tensor, box_fn, size: tuple[int, int], channels: int) -> tf.Tensor:
    """Decodes only the window `box_fn(height, width) -> (top, left, h, w)` of an image and resizes it.

    JPEG: the window is read from the header's size and decoded alone
    (`tf.image.decode_and_crop_jpeg`); other formats are decoded, then sliced.
    Returns uint8 (size, channels).
    """

    def jpeg():
        shape = tf.image.extract_jpeg_shape(contents)
        top, left, h, w = box_fn(shape[0], shape[1])
        window = tf.stack([top, left, h, w])
        image = tf.image.decode_and_crop_jpeg(contents, window, channels=3)
        return tf.image.rgb_to_grayscale(image) if channels == 1 else image

    def other():
        image = _decode_full(contents, channels)
        shape = tf.shape(image)
        top, left, h, w = box_fn(shape[0], shape[1])
        return image[top:top + h, left:left + w]

    image = tf.cond(_is_jpeg(contents), jpeg, other)
    image = tf.ensure_shape(image, [None, None, channels])
    return tf.ensure_shape(_resize_uint8(image, size), [*size, channels])


def eval_transform(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """uint8 (H, W, C) -> float32 `size` in [0, 1]: shorter side to size / 0.875, then a center crop.

    An image already of `size` is only converted (Fashion-MNIST stays pixel for pixel).
    """
    height, width = size
    shape = tf.shape(image)

    def resize_and_crop():
        scale = tf.cast(tf.maximum(height, width), tf.float32) / EVAL_CROP_FRACTION / tf.cast(
            tf.minimum(shape[0], shape[1]), tf.float32
        )
        new_h = tf.maximum(height, tf.cast(tf.round(tf.cast(shape[0], tf.float32) * scale), tf.int32))
        new_w = tf.maximum(width, tf.cast(tf.round(tf.cast(shape[1], tf.float32) * scale), tf.int32))
        resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]), "bilinear", antialias=True)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return tf.clip_by_value(resized[top:top + height, left:left + width], 0.0, 255.0)

    same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
    out = tf.cond(same, lambda: tf.cast(image, tf.float32), resize_and_crop)
    return tf.ensure_shape(out / 255.0, [height, width, image.shape[-1]])


def gray_image(shape) -> tf.Tensor:
    return tf.fill(shape, tf.constant(_GRAY, tf.uint8))


def safe_map(dataset: tf.data.Dataset, fn, fallback, name_of) -> tf.data.Dataset:
    """`dataset.map(fn)` in order, where an element whose `fn` fails gives `fallback(*element)` instead.

    Each element is decoded inside its own one-element dataset, so a failure
    drops nothing: rows keep their place in the global batch on every worker.
    The failing element's `name_of(*element)` is recorded in `unreadable_images`.
    """

    def one(*element):
        def replace(_):
            with tf.control_dependencies([_record_unreadable(name_of(*element))]):
                return tf.nest.map_structure(tf.identity, fallback(*element))

        ok = tf.data.Dataset.from_tensors(0).map(lambda _: fn(*element)).ignore_errors()
        return ok.concatenate(tf.data.Dataset.from_tensors(0).map(replace)).take(1)

    return dataset.interleave(one, cycle_length=16, block_length=1,
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# -- sources -------------------------------------------------------------------------------


def _check_channels(channels) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 4:
        image, have = image[..., :3], 3
    if have == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    if have == 1 and channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return image


def epoch_permutation(count: int, seed: tf.Tensor) -> tf.Tensor:
    """A permutation of 0..count-1 from a (2,) stateless seed."""
    return tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed=seed)


class _Source:
    """Common interface; see the module docstring."""

    kind = "source"
    random_access = True  # items of a batch can be fetched by index (names or arrays)
    is_encoded = True  # items are encoded bytes (or names of files holding them)

    def __init__(self, count: int, channels: int, labelled: bool):
        self.count = int(count)
        self.channels = int(channels)
        self.labelled = bool(labelled)

    def describe(self) -> dict:
        return {"kind": self.kind, "count": self.count}

    # Random-access sources: the item and label tensors, indexable with tf.gather.
    def items(self) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def read(self, item: tf.Tensor) -> tf.Tensor:
        """An item -> encoded bytes (folders read the file; records are bytes already)."""
        return item

    def name_of(self, item: tf.Tensor) -> tf.Tensor:
        """What to call an item in a warning."""
        return tf.strings.format("a record of {} bytes", tf.strings.length(item))

    def images(self, image_size) -> tf.data.Dataset:
        """Evaluation images: (float32 (h, w, C) in [0, 1], int32 label), in order, unreadable ones skipped."""
        size = _size(image_size)
        channels = self.channels

        def load(item, label):
            image = _decode_full(self.read(item), channels)
            return eval_transform(image, size), label

        def skip_bad(item, label):
            ok = tf.data.Dataset.from_tensors((item, label)).map(load).ignore_errors()
            return ok

        return self.encoded_items().interleave(skip_bad, cycle_length=16, block_length=1,
                                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def limited(self, n: int) -> "_Source":
        """The first `n` images only (smoke runs); the source itself if it has at most `n`."""
        raise NotImplementedError

    def encoded_items(self) -> tf.data.Dataset:
        items, labels = self.items()
        return tf.data.Dataset.from_tensor_slices((items, labels))

    def encoded(self) -> tf.data.Dataset:
        """(encoded bytes, int32 label) in the source's order."""
        return self.encoded_items().map(lambda item, label: (self.read(item), label),
                                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _size(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool) else image_size
    try:
        height, width = size
        ok = all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in (height, width))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"image_size must be a positive int or a (height, width) pair of positive ints, got {image_size!r}"
        )
    return int(height), int(width)


def _held_out(relative: str, fraction: float) -> bool:
    """A stable split by file name: the same files are held out on every run and machine."""
    return (zlib.crc32(relative.encode("utf-8")) % 10_000) < fraction * 10_000


class FolderSource(_Source):
    """Images under a folder (recursive; jpg, jpeg, png, bmp, gif), listed once, never decoded up front.

    Labels: with `labels="auto"`, when every image sits inside a first-level
    sub-folder (`root/<class>/.../x.jpg`), the sorted sub-folder names are
    classes 0..K-1; otherwise every label is -1. `labels="none"` always gives -1,
    `labels="folders"` demands class sub-folders.

    Splits: `split="all"` (default) takes every file; `"train"` and `"eval"`
    divide them by a hash of each file's path relative to the folder, with
    `eval_fraction` of them held out for evaluation (stable across runs,
    machines and added files).

    Args:
        path: root folder.
        channels: 1 (gray) or 3 (RGB).
        labels: "auto", "folders" or "none".
        split: "all", "train" or "eval".
        eval_fraction: share of files in the "eval" split.

    Raises:
        FileNotFoundError: `path` is not a folder.
        ValueError: no image file under `path` (or in the split).

    Example:
    >>> source = FolderSource("photos/")  # doctest: +SKIP
    >>> source.count, source.labelled      # doctest: +SKIP
    """

    kind = "folder"

    def __init__(self, path, channels: int = 3, *, labels: str = "auto", split: str = "all",
                 eval_fraction: float = 0.1):
        channels = _check_channels(channels)
        if labels not in ("auto", "folders", "none"):
            raise ValueError(f"labels must be 'auto', 'folders' or 'none', got {labels!r}")
        if split not in ("all", "train", "eval"):
            raise ValueError(f"split must be 'all', 'train' or 'eval' for a folder, got {split!r}")
        if not (isinstance(eval_fraction, (int, float)) and 0.0 < eval_fraction < 1.0):
            raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(
                f"no image files under {str(root)!r} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        relative = [f.relative_to(root) for f in files]
        in_subfolders = all(len(r.parts) >= 2 for r in relative)
        if labels == "folders" and not in_subfolders:
            loose = [str(r) for r in relative if len(r.parts) < 2][:3]
            raise ValueError(f"labels='folders' needs every image inside a class sub-folder of {root}; found {loose}")
        if labels != "none" and in_subfolders:
            self.classes = sorted({r.parts[0] for r in relative})
            ids = {c: k for k, c in enumerate(self.classes)}
            targets = np.array([ids[r.parts[0]] for r in relative], np.int32)
        else:
            self.classes = []
            targets = np.full(len(files), NO_LABEL, np.int32)
        if split != "all":
            held = np.array([_held_out(r.as_posix(), eval_fraction) for r in relative], bool)
            keep = held if split == "eval" else ~held
            files = [f for f, k in zip(files, keep) if k]
            targets = targets[keep]
            if not files:
                raise ValueError(
                    f"the {split!r} split of {str(root)!r} is empty ({len(relative)} files, "
                    f"eval_fraction={eval_fraction}); use split='all' or another eval_fraction"
                )
        super().__init__(len(files), channels, labelled=bool(self.classes))
        self.root = root.resolve()
        self.split = split
        self.names = [str(f) for f in files]
        self.labels = targets
        self.bytes_on_disk = sum(f.stat().st_size for f in files)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.root), "split": self.split, "count": self.count}

    def limited(self, n: int) -> "FolderSource":
        if n >= self.count:
            return self
        clone = object.__new__(FolderSource)
        clone.__dict__.update(self.__dict__)
        clone.names, clone.labels, clone.count = self.names[:n], self.labels[:n], n
        return clone

    def items(self):
        return tf.constant(self.names), tf.constant(self.labels)

    def read(self, item):
        return tf.io.read_file(item)

    def name_of(self, item):
        return item


class ArraySource(_Source):
    """uint8 images in memory, (N, H, W) or (N, H, W, C): items are the arrays themselves.

    Decoded images are kept only here, where they are in memory anyway (Fashion-MNIST:
    60,000 x 28 x 28 bytes = 47 MB).
    """

    kind = "arrays"
    is_encoded = False

    def __init__(self, images, labels=None, *, name: str = "arrays"):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty (N, H, W) or (N, H, W, C) array, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"ArraySource takes uint8 images (0-255), got dtype {images.dtype}")
        if labels is None:
            labels = np.full(images.shape[0], NO_LABEL, np.int32)
        labels = np.asarray(labels).astype(np.int32)
        super().__init__(images.shape[0], images.shape[-1], labelled=bool((labels >= 0).any()))
        self.array = images
        self.labels = labels
        self.name = name

    def describe(self) -> dict:
        digest = zlib.crc32(self.array[:: max(1, self.count // 64)].tobytes())
        return {"kind": self.kind, "name": self.name, "count": self.count, "shape": list(self.array.shape[1:]),
                "sample_crc32": digest}

    def items(self):
        return tf.constant(self.array), tf.constant(self.labels)

    def limited(self, n: int) -> "ArraySource":
        return self if n >= self.count else ArraySource(self.array[:n], self.labels[:n], name=self.name)

    def images(self, image_size) -> tf.data.Dataset:
        size = _size(image_size)
        dataset = tf.data.Dataset.from_tensor_slices((self.array, self.labels))
        return dataset.map(lambda image, label: (eval_transform(image, size), label),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def encoded(self):
        return tf.data.Dataset.from_tensor_slices((self.array, self.labels))


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

        channels = _check_channels(channels)
        try:
            builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
        except tfds.core.registered.DatasetNotFoundError as error:
            raise ValueError(
                f"{name!r} is not a registered tfds dataset; see tfds.list_builders() for the names "
                f"(e.g. 'cifar10', 'imagenet2012'). tfds said: {str(error).splitlines()[0]}"
            ) from None
        if not builder.is_prepared():
            where = builder.data_dir
            raise ValueError(
                f"tfds dataset {name!r} is not prepared in {where}. Prepare it once with "
                f"`tfds build {name} --data_dir={Path(where).parents[1] if len(Path(where).parents) > 1 else where}` "
                f"(ImageNet needs its tar files in <data_dir>/downloads/manual first), or pass data_dir= "
                "to the folder that holds it."
            )
        features = builder.info.features
        image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        if image_key is None:
            if len(image_keys) != 1:
                raise ValueError(f"{name}: cannot tell the image feature among {image_keys}; pass image_key=")
            image_key = image_keys[0]
        elif image_key not in features:
            raise ValueError(f"image_key {image_key!r} is not a feature of {name}; features: {list(features)}")
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
        channels = _check_channels(channels)
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


def windowed_permutation(dataset: tf.data.Dataset, window: int, seed: tf.Tensor) -> tf.data.Dataset:
    """Permutes each window of `window` consecutive elements with the stateless seed (seed, window index)."""
    if window <= 1:
        return dataset

    def permute(index, batch):
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(batch[1])[0]), seed=tf.stack([seed[0], seed[1] * 1_000_003 + index]))
        return tuple(tf.gather(part, order) for part in batch)

    return dataset.batch(window).enumerate().map(permute).unbatch()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
