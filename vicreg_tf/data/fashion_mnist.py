"""Fashion-MNIST from its IDX files (the offline default data set; Debian's dataset-fashion-mnist)."""
from __future__ import annotations

import gzip
import logging
import os
import re
import struct
from pathlib import Path

import numpy as np
import tensorflow as tf

from vicreg_tf.data.arrays import from_arrays

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
# IDX type byte -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}



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


def fashion_mnist_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for the IDX files, in order: `data_dir`, else $VICREG_DATA_DIR (and its
    fashion-mnist/ subfolder), else FASHION_MNIST_DIR."""
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get("VICREG_DATA_DIR"):
        return [Path(os.environ["VICREG_DATA_DIR"]), Path(os.environ["VICREG_DATA_DIR"]) / "fashion-mnist"]
    return [Path(FASHION_MNIST_DIR)]


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
    candidates = fashion_mnist_dirs(data_dir)
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
    (Debian's `dataset-fashion-mnist` package): `fashion_mnist_dirs`. Magic numbers and counts are
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
