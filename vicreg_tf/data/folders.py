"""Folders of image files: listed once, never decoded up front (`FolderSource`), and `from_folder`."""
from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from vicreg_tf import arguments
from vicreg_tf.data.base import _Source
from vicreg_tf.data.images import EVAL_CROP_FRACTION, IMAGE_EXTENSIONS, NO_LABEL, _decode_full, eval_transform


def _list_images(root: str) -> list[str]:
    """The image files under `root` (recursive), as '/'-separated paths relative to it, in `Path` order.

    One `os.scandir` per directory and no `stat` per file (the directory entry's
    type says file or folder): at a million files the listing costs one pass over
    the directories and about 100 bytes per name (docs/DATA.md, "Folders at scale").
    Symbolic links to folders are followed once each. Sorted as `pathlib` sorts
    (part by part: "a/x" before "a-b/x"), so indices match earlier versions.
    """
    names: list[str] = []
    seen: set[str] = set()
    pending = [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(os.path.join(root, prefix) if prefix else root) as entries:
            for entry in entries:
                relative = prefix + entry.name
                if entry.is_dir():
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if target in seen:
                            continue
                        seen.add(target)
                    pending.append(relative + "/")
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    names.append(relative)
    names.sort(key=lambda name: name.replace("/", "\0"))
    return names


def _readable(paths: list[str], channels: int) -> np.ndarray:
    """Which files decode: one parallel pass of tf.io.decode_image, errors dropped, survivors' indices kept."""
    indices = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    indices = indices.map(
        lambda i, path: (i, tf.shape(_decode_full(tf.io.read_file(path), channels))),
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
    crop_fraction: float = EVAL_CROP_FRACTION,
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
    resized so the shorter side is `image_size / crop_fraction` and center-cropped
    (the standard evaluation transform, `eval_transform`; the aspect ratio is kept),
    whatever their size; GIFs give their first frame. For training,
    `FolderSource` streams file names and crops each view from
    the original image instead.

    Args:
        path: root folder.
        image_size: (height, width) of the output images.
        channels: 1 (gray) or 3 (RGB).
        labels: "auto", "folders" or "none".
        validate: decode every file once up front, to leave the unreadable out and name them.
        crop_fraction: the center crop's share of the resized shorter side (0.875: 224 of 256;
            1.0: the whole shorter side).

    Raises:
        FileNotFoundError: `path` is not a folder.
        ValueError: no image file under `path`, or none of them readable.

    Example:
    >>> ds = from_folder("photos/", (64, 64))  # doctest: +SKIP
    """
    size = arguments.image_size(image_size)
    crop_fraction = arguments.crop_fraction(crop_fraction)
    source = FolderSource(path, channels, labels=labels)  # lists the files and their labels
    channels = source.channels
    names, targets = source.names, source.labels
    if validate:
        ok = _readable(names, channels)
        bad = [os.path.relpath(n, path) for n, good in zip(names, ok) if not good]
        if bad:
            shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
            warnings.warn(
                f"from_folder({str(path)!r}): skipped {len(bad)} unreadable of {len(names)} image files: {shown}",
                stacklevel=2,
            )
        if not ok.any():
            raise ValueError(f"none of the {len(names)} image files under {str(path)!r} could be decoded")
        names = [n for n, good in zip(names, ok) if good]
        targets = targets[ok]

    def load(filename, label):
        image = _decode_full(tf.io.read_file(filename), channels)
        return tf.ensure_shape(eval_transform(image, size, crop_fraction), (*size, channels)), label

    dataset = tf.data.Dataset.from_tensor_slices((names, targets))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not validate:
        dataset = dataset.ignore_errors()
    return dataset


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
        channels = arguments.channels(channels)
        if labels not in ("auto", "folders", "none"):
            raise ValueError(f"labels must be 'auto', 'folders' or 'none', got {labels!r}")
        if split not in ("all", "train", "eval"):
            raise ValueError(f"split must be 'all', 'train' or 'eval' for a folder, got {split!r}")
        if not (isinstance(eval_fraction, (int, float)) and 0.0 < eval_fraction < 1.0):
            raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
        relative = _list_images(str(root))
        if not relative:
            raise ValueError(
                f"no image files under {str(root)!r} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        first_parts = [r.partition("/") for r in relative]
        in_subfolders = all(slash for _, slash, _ in first_parts)
        if labels == "folders" and not in_subfolders:
            loose = [r for r, (_, slash, _) in zip(relative, first_parts) if not slash][:3]
            raise ValueError(f"labels='folders' needs every image inside a class sub-folder of {root}; found {loose}")
        if labels != "none" and in_subfolders:
            self.classes = sorted({folder for folder, _, _ in first_parts})
            ids = {c: k for k, c in enumerate(self.classes)}
            targets = np.fromiter((ids[folder] for folder, _, _ in first_parts), np.int32, len(relative))
        else:
            self.classes = []
            targets = np.full(len(relative), NO_LABEL, np.int32)
        del first_parts
        if split != "all":
            held = np.fromiter((_held_out(r, eval_fraction) for r in relative), bool, len(relative))
            keep = held if split == "eval" else ~held
            total = len(relative)
            relative = [r for r, k in zip(relative, keep) if k]
            targets = targets[keep]
            if not relative:
                raise ValueError(
                    f"the {split!r} split of {str(root)!r} is empty ({total} files, "
                    f"eval_fraction={eval_fraction}); use split='all' or another eval_fraction"
                )
        super().__init__(len(relative), channels, labelled=bool(self.classes))
        self.root = root.resolve()
        self.split = split
        prefix = os.path.join(str(root), "")
        self.names = [prefix + r for r in relative]
        self.labels = targets

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.root), "split": self.split, "count": self.count}

    def sample_unreadable(self, size: int = 64, seed: int = 0) -> tuple[int, int]:
        """Decodes `size` files drawn at random (every file of a smaller folder): (how many failed, how many tried).

        A bounded check for start-up: a million-file folder costs the same as a small one.
        """
        picked = np.random.default_rng(seed).choice(self.count, min(size, self.count), replace=False)
        ok = _readable([self.names[i] for i in np.sort(picked)], self.channels)
        return int(np.count_nonzero(~ok)), len(picked)

    def subset(self, indices) -> "FolderSource":
        indices = np.asarray(indices, np.int64)
        clone = object.__new__(FolderSource)
        clone.__dict__.update(self.__dict__)
        clone.names, clone.labels, clone.count = [self.names[i] for i in indices], self.labels[indices], len(indices)
        return clone

    def limited(self, n: int) -> "FolderSource":
        return self if n >= self.count else self.subset(np.arange(n))

    def items(self):
        return tf.constant(self.names), tf.constant(self.labels)

    def read(self, item):
        return tf.io.read_file(item)

    def name_of(self, item):
        return item
