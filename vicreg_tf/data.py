"""Image sources as unbatched tf.data pipelines, and the batching that feeds VICReg.

Every source yields `(image, label)`: image float32 (H, W, C) in [0, 1], label
an int32 scalar, -1 where the source has no labels. Sources:

    fashion_mnist(split)            the local Fashion-MNIST IDX files (read_idx reads one)
    from_tfds(name, split)          any prepared TensorFlow Datasets dataset
    from_folder(path, (h, w))       a folder of jpg/png/bmp/gif, class sub-folders as labels
    from_arrays(images, labels)     NumPy arrays, uint8 0-255 or float in [0, 1]

Then `view_pairs(images, two_views, batch_size)` gives the `(view_a, view_b)`
batches that `VICReg.fit` trains on, and `eval_batches` plain batches for
evaluation.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from vicreg_tf import sources

__all__ = [
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_DIR",
    "read_idx",
    "fashion_mnist",
    "from_tfds",
    "from_folder",
    "from_arrays",
    "view_pairs",
    "eval_batches",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
NO_LABEL = -1

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
# IDX type byte -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# -- argument checks ------------------------------------------------------------------


def _image_size(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) and not isinstance(image_size, bool) else image_size
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


def _channels(channels) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# -- IDX / Fashion-MNIST ----------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (gzipped or not) into a NumPy array shaped as its header says.

    The header is two zero bytes, a type byte (0x08 = uint8, ...), the number of
    dimensions, then one big-endian int32 per dimension. The payload must hold
    exactly the number of items the header announces.

    Args:
        path: a `.gz` or raw IDX file.

    Raises:
        ValueError: bad magic number, unknown type, or a payload whose size does
            not match the header.

    Example:
    >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    >>> labels.shape, labels.dtype
    ((10000,), dtype('uint8'))
    """
    path = Path(path)
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file, only {len(data)} bytes")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}; expected 0x0000TTNN with type TT in "
            f"{{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}} and NN >= 1 dimensions"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header, {len(data)} bytes for {ndim} dimensions")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header announces shape {shape} ({expected} bytes of {dtype.name}) "
            f"but the payload has {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


_SPLIT_SLICE = re.compile(r"^(train|test)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


def _split_rows(split: str, count: int) -> slice:
    """'train', 'test[:1000]', 'train[10%:]' (the tfds slicing subset used here) -> a row slice."""
    match = _SPLIT_SLICE.match(split.replace(" ", ""))
    if not match:
        raise ValueError(
            f"split must be 'train' or 'test', optionally sliced as 'train[:1000]' or 'train[:10%]', got {split!r}"
        )
    _, start, start_pct, stop, stop_pct = match.groups()

    def bound(text, pct):
        if not text:
            return None
        value = int(text)
        return round(value * count / 100) if pct else value

    return slice(bound(start, start_pct), bound(stop, stop_pct))


def fashion_mnist_arrays(split: str = "train", data_dir: str | os.PathLike | None = None):
    """Fashion-MNIST from local IDX files as NumPy arrays: (uint8 images (N, 28, 28, 1), labels, folder read).

    Looked up as `fashion_mnist` does; see there.
    """
    base = split.split("[", 1)[0].strip()
    if base not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test' (optionally sliced), got {split!r}")
    images_stem, labels_stem, expected = _FASHION_MNIST_FILES[base]
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif os.environ.get("VICREG_DATA_DIR"):
        candidates = [Path(os.environ["VICREG_DATA_DIR"]), Path(os.environ["VICREG_DATA_DIR"]) / "fashion-mnist"]
    else:
        candidates = [Path(FASHION_MNIST_DIR)]
    for directory in candidates:
        images_path, labels_path = _find_idx(directory, images_stem), _find_idx(directory, labels_stem)
        if images_path and labels_path:
            break
    else:
        searched = ", ".join(str(d / (images_stem + "[.gz]")) for d in candidates)
        raise FileNotFoundError(
            f"Fashion-MNIST {base} files not found; searched {searched} (and {labels_stem}[.gz]). "
            f"Install them with `sudo apt-get install dataset-fashion-mnist` (to {FASHION_MNIST_DIR}), "
            "or set VICREG_DATA_DIR / pass data_dir to a folder holding the four IDX files."
        )
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of 28x28, got {images.dtype} {images.shape}")
    if images.shape[0] != expected:
        log.warning("%s holds %d images; the official %s split has %d", images_path, images.shape[0], base, expected)
    if labels.shape != images.shape[:1] or labels.max(initial=0) > 9:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels in 0-9 (one per image in {images_path.name}), "
            f"got shape {labels.shape}, max {labels.max(initial=0)}"
        )
    rows = _split_rows(split, images.shape[0])
    return images[rows, :, :, None], labels[rows].astype(np.int32), images_path.parent.resolve()


def fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tf.data.Dataset:
    """Fashion-MNIST from local IDX files: (image (28, 28, 1) float32 in [0, 1], label int32 0-9).

    The files (`train-images-idx3-ubyte.gz` etc., gzipped or not) are looked up
    in `data_dir`, else `$VICREG_DATA_DIR`, else /usr/share/datasets/fashion-mnist
    (Debian's `dataset-fashion-mnist` package). Magic numbers and counts are
    checked against the headers (the official files: 60000 train / 10000 test
    images of 28x28; other counts are accepted with a logged warning).

    Args:
        split: "train" or "test", optionally sliced: "train[:1000]", "test[:10%]".
        data_dir: folder with the four IDX files.

    Raises:
        FileNotFoundError: no folder searched holds the files; names the paths.

    Example:
    >>> images = fashion_mnist("test")
    >>> image, label = next(iter(images))
    >>> image.shape, label.dtype
    (TensorShape([28, 28, 1]), tf.int32)
    """
    images, labels, _ = fashion_mnist_arrays(split, data_dir)
    return from_arrays(images, labels)


# -- arrays -------------------------------------------------------------------------------


def from_arrays(images, labels=None) -> tf.data.Dataset:
    """In-memory images as a source: uint8 0-255 or float in [0, 1], (N, H, W) or (N, H, W, C).

    Images stay in their dtype in memory (uint8 is 4x smaller than float32) and
    are converted per element.

    Args:
        images: array-like (N, H, W[, C]); uint8, or floats within [0, 1].
        labels: optional (N,) integer labels; -1 for every image when omitted.

    Example:
    >>> ds = from_arrays(np.zeros((4, 8, 8, 3), np.uint8), labels=[0, 1, 2, 3])
    >>> [int(label) for _, label in ds]
    [0, 1, 2, 3]
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W) or (N, H, W, C) array, got shape {images.shape}")
    if images.dtype == np.uint8:
        pass
    elif np.issubdtype(images.dtype, np.floating):
        low, high = float(images.min()), float(images.max())
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"float images must lie in [0, 1], got values in [{low}, {high}]; divide uint8 data by 255")
        images = images.astype(np.float32, copy=False)
    else:
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got dtype {images.dtype}")
    if labels is None:
        labels = np.full(images.shape[0], NO_LABEL, np.int32)
    else:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be {images.shape[0]} integers (one per image), got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    return dataset.map(lambda image, label: (tf.image.convert_image_dtype(image, tf.float32), label))


# -- TensorFlow Datasets -----------------------------------------------------------------------


def _to_channels(image: tf.Tensor, channels: int | None) -> tf.Tensor:
    """(H, W, c) -> (H, W, channels) for c in 1, 3, 4 (alpha dropped)."""
    have = image.shape[-1]
    if channels is None or have == channels:
        return image
    if have == 4:
        image = image[..., :3]
        have = 3
    if have == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    if have == 1 and channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return image


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

    Raises:
        ValueError: `name` is not a registered tfds dataset.

    Example:
    >>> train = from_tfds("cifar10", "train", image_size=(32, 32))  # doctest: +SKIP
    """
    import tensorflow_datasets as tfds

    size = None if image_size is None else _image_size(image_size)
    if channels is not None:
        channels = _channels(channels)
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"{name!r} is not a registered tfds dataset; see tfds.list_builders() for the names "
            f"(e.g. 'cifar10', 'fashion_mnist'). tfds said: {str(error).splitlines()[0]}"
        ) from None
    features = builder.info.features
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if image_key is None:
        if len(image_keys) != 1:
            raise ValueError(f"{name}: cannot tell the image feature among {image_keys}; pass image_key=")
        image_key = image_keys[0]
    elif image_key not in features:
        raise ValueError(f"image_key {image_key!r} is not a feature of {name}; features: {list(features)}")
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
        else:  # the standard evaluation transform: shorter side to size / 0.875, center crop
            image = sources.eval_transform(image, size)
        label = tf.cast(example[label_key], tf.int32) if has_label else tf.constant(NO_LABEL, tf.int32)
        return image, label

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# -- image folders ------------------------------------------------------------------------------


def _list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _readable(paths: list[str], channels: int) -> np.ndarray:
    """Which files decode: one parallel pass of tf.io.decode_image, errors dropped, survivors' indices kept."""
    indices = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    indices = indices.map(
        lambda i, path: (i, tf.shape(sources._decode_full(tf.io.read_file(path), channels))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    ).ignore_errors()
    ok = np.zeros(len(paths), bool)
    for batch, _ in indices.batch(1024).as_numpy_iterator():
        ok[batch] = True
    return ok


def from_folder(
    path: str | os.PathLike,
    image_size: Sequence[int] | int,
    channels: int = 3,
    *,
    labels: str = "auto",
    validate: bool = False,
) -> tf.data.Dataset:
    """Images under a folder (recursive; jpg, jpeg, png, bmp, gif) as (image, label) pairs.

    Labels: with `labels="auto"`, when every image sits inside a first-level
    sub-folder (`root/<class>/.../x.jpg`), the sorted sub-folder names are
    classes 0..K-1; otherwise every label is -1. `labels="none"` always gives -1,
    `labels="folders"` demands class sub-folders.

    Unreadable files (truncated, not really images) never stop an epoch: they
    are dropped while iterating. Nothing is decoded up front unless
    `validate=True` (one parallel decoding pass that names the bad files in a
    single warning: hours for a million photos, so off by default). Images are
    resized so the shorter side is `image_size / 0.875` and center-cropped (the
    standard evaluation transform; the aspect ratio is kept), an image already
    of `image_size` is left as it is; GIFs give their first frame. For training,
    `vicreg_tf.sources.FolderSource` streams file names and crops each view from
    the original image instead.

    Args:
        path: root folder.
        image_size: (height, width) of the output images.
        channels: 1 (gray) or 3 (RGB).
        labels: "auto", "folders" or "none".
        validate: decode every file once up front, to leave the unreadable out and name them.

    Raises:
        FileNotFoundError: `path` is not a folder.
        ValueError: no image file under `path`, or none of them readable.

    Example:
    >>> ds = from_folder("photos/", (64, 64))  # doctest: +SKIP
    """
    size = _image_size(image_size)
    channels = _channels(channels)
    if labels not in ("auto", "folders", "none"):
        raise ValueError(f"labels must be 'auto', 'folders' or 'none', got {labels!r}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    files = _list_images(root)
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
        classes = sorted({r.parts[0] for r in relative})
        class_ids = {c: k for k, c in enumerate(classes)}
        targets = np.array([class_ids[r.parts[0]] for r in relative], np.int32)
    else:
        targets = np.full(len(files), NO_LABEL, np.int32)
    names = [str(f) for f in files]
    if validate:
        ok = _readable(names, channels)
        bad = [str(r) for r, good in zip(relative, ok) if not good]
        if bad:
            shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
            warnings.warn(
                f"from_folder({str(root)!r}): skipped {len(bad)} unreadable of {len(files)} image files: {shown}",
                stacklevel=2,
            )
        if not ok.any():
            raise ValueError(f"none of the {len(files)} image files under {str(root)!r} could be decoded")
        names = [n for n, good in zip(names, ok) if good]
        targets = targets[ok]

    def load(filename, label):
        image = sources._decode_full(tf.io.read_file(filename), channels)
        return tf.ensure_shape(sources.eval_transform(image, size), (*size, channels)), label

    dataset = tf.data.Dataset.from_tensor_slices((names, targets))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not validate:
        dataset = dataset.ignore_errors()
    return dataset


# -- batching for training and evaluation ----------------------------------------------------------------


def _images_only(dataset: tf.data.Dataset) -> tf.data.Dataset:
    if isinstance(dataset.element_spec, tuple):
        return dataset.map(lambda image, *rest: image)
    return dataset


def view_pairs(
    images_dataset: tf.data.Dataset,
    two_views: Callable,
    batch_size: int,
    *,
    shuffle_buffer: int = 10_000,
    seed: int | None = None,
    repeat: bool = True,
) -> tf.data.Dataset:
    """Batches of `(view_a, view_b)` for `VICReg.fit`: shuffle, batch, augment, prefetch.

    Views are made after batching (the augmentation layers are vectorised, one
    call per batch) in a parallel, deterministic `map`; batch k is augmented with
    the stateless seed `(seed, k)`, so the same `seed` gives the same stream of
    views (and the same shuffle order). Incomplete final batches are dropped
    (batch statistics need full batches). Labels, if any, are dropped.

    Under `tf.distribute`, `batch_size` is the global batch: pass the result to
    `strategy.experimental_distribute_dataset` (or straight to `fit`).

    To augment on the accelerator instead (when the CPU cannot keep up): build
    the batches without views, e.g. `view_pairs(images, lambda x, seed: (x, x),
    batch_size)` or `images.batch(batch_size, drop_remainder=True)`, and call the
    `TwoViews` layer on the device, in the model before `train_step`'s forward
    pass (`view_a, view_b = two_views(batch)` inside a `tf.function`).

    Args:
        images_dataset: unbatched images, or (image, label) pairs.
        two_views: `call(images, seed=(2,) int tensor) -> (view_a, view_b)`, e.g.
            `augment.paper_views(32)`.
        batch_size: images per batch (global batch under a strategy).
        shuffle_buffer: shuffle buffer size; 0 or 1 turns shuffling off.
        seed: int seed of the shuffle and the views; None: different every run.
        repeat: loop over the data forever (use `steps_per_epoch` in fit).

    Example:
    >>> from vicreg_tf import augment
    >>> pairs = view_pairs(from_arrays(np.zeros((64, 28, 28), np.uint8)), augment.grayscale_views(28), 32, seed=0)
    >>> view_a, view_b = next(iter(pairs))
    >>> view_a.shape
    TensorShape([32, 28, 28, 1])
    """
    batch_size = _positive("batch_size", batch_size)
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, (int, np.integer)) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    dataset = _images_only(images_dataset)
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if seed is None:
        seeds = tf.data.Dataset.random().batch(2)  # fresh randomness each run
    else:
        seeds = tf.data.Dataset.counter().map(lambda step: tf.stack([tf.constant(seed, tf.int64), step]))
    dataset = tf.data.Dataset.zip((dataset, seeds))
    dataset = dataset.map(
        lambda batch, batch_seed: tuple(two_views(batch, seed=batch_seed)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    options = tf.data.Options()
    # In-memory sources cannot be sharded by file; shard by data under MultiWorkerMirroredStrategy.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_batches(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Plain batches for evaluation: no augmentation, no shuffle, the last partial batch kept.

    Example:
    >>> batches = eval_batches(from_arrays(np.zeros((10, 8, 8), np.uint8)), 4)
    >>> [int(images.shape[0]) for images, _ in batches]
    [4, 4, 2]
    """
    batch_size = _positive("batch_size", batch_size)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
