"""A folder of images -> sharded, shuffled TFRecord files and their index (`vicreg-tfrecords`).

`folder_to_tfrecords(input, output)` lists the folder with `FolderSource` (class
sub-folders as labels; `eval_fraction` holds out the same files as training from
the folder does), writes each image's bytes unchanged as a `tf.train.Example`
("image/encoded", "image/class/label", "image/filename") in an order fixed by the
seed, into `train-00000-of-000NN.tfrecord` ... (and `eval-...`), and an index
(`records.INDEX_FILENAME`: per-file record counts and byte offsets, the class
names) that `RecordSource.from_tfrecords` reads instead of counting the records.
The set appears whole or not at all: it is written into a hidden directory beside
`output` and renamed at the end. `index_tfrecords(pattern)` writes the index of
TFRecord files written by something else (one pass over them), so that their
readers need not count them.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from vicreg_tf import arguments
from vicreg_tf.data.folders import FolderSource
from vicreg_tf.data.records import (
    INDEX_FILENAME,
    INDEX_FORMAT,
    SEGMENT_RECORDS,
    TFRECORD_FRAMING,
    offsets_of,
    scan_files,
)

SHARD_MB = 128  # the default file size (TF models' ImageNet files: ~140 MB; tfds': up to ~1 GB)
MIN_SHARDS = 16  # the default's least number of training files: each worker reads whole files
# Offsets of every OFFSET_STRIDE-th record go into the index: segments start there.
OFFSET_STRIDE = SEGMENT_RECORDS


def holds_a_set(output: str | os.PathLike) -> bool:
    """`output` holds an index or TFRecord files (a set a reader would take)."""
    path = Path(output)
    return path.is_dir() and ((path / INDEX_FILENAME).exists() or any(path.glob("*.tfrecord")))


def check_output(output: str | os.PathLike, overwrite: bool) -> None:
    """Raises, in one line, when `output` cannot take a new set: another set (without `overwrite`), other files."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output={output} exists and is not a directory")
    if holds_a_set(path):
        if not overwrite:
            raise ValueError(f"--output={output} already holds a TFRecord set; pass --overwrite to replace it")
        others = [p.name for p in path.iterdir() if p.name != INDEX_FILENAME and p.suffix != ".tfrecord"]
        if others:
            raise ValueError(f"--output={output} holds other files than a TFRecord set ({', '.join(sorted(others)[:3])}"
                             "); --overwrite replaces only a set: give another directory")
    elif path.is_dir() and any(path.iterdir()):
        raise ValueError(f"--output={output} is a directory that is not empty; give a new or empty one")


def shard_counts(train_count: int, train_bytes: int, eval_count: int, eval_bytes: int, *,
                 shards: int | None = None, shard_mb: float | None = None) -> tuple[int, int]:
    """(training files, evaluation files).

    `shards`: the training files; the evaluation files in proportion to their
    images (at least 1). `shard_mb`: files of about that size (the image files'
    sizes estimated from a sample of them). Neither: files of about SHARD_MB, at
    least MIN_SHARDS training files (fewer images: one file each).
    """
    if shards is not None and shard_mb is not None:
        raise ValueError("give --shards or --shard_mb, not both")
    if shards is not None:
        shards = arguments.positive_int("--shards", shards)
        if shards > train_count:
            raise ValueError(f"--shards={shards} is more than the {train_count} images of the training split: "
                             "some files would hold no record")
        evals = max(1, round(shards * eval_count / train_count)) if eval_count else 0
        return shards, min(evals, eval_count)
    size = arguments.require("--shard_mb", SHARD_MB if shard_mb is None else shard_mb,
                             lambda v: arguments.is_number(v) and v > 0, "a number > 0") * 2**20
    least = 1 if shard_mb is not None else MIN_SHARDS
    train = min(train_count, max(least, math.ceil(train_bytes / size)))
    evals = min(eval_count, max(1, math.ceil(eval_bytes / size))) if eval_count else 0
    return train, evals


def _estimated_bytes(names: list[str], sample: int = 1000) -> int:
    """The files' total size from the sizes of `sample` of them (a million-file folder is not stat'ed whole)."""
    picked = np.random.default_rng(0).choice(len(names), min(sample, len(names)), replace=False)
    return int(np.mean([os.path.getsize(names[i]) for i in picked]) * len(names))


def _example(encoded: bytes, label: int | None, filename: str) -> bytes:
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[filename.encode("utf-8")])),
    }
    if label is not None:  # a folder without class sub-folders: no label feature, an unlabelled source
        feature["image/class/label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    # deterministic: map entries in key order, so the same folder and seed give the same bytes in every process
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _relative(name: str, roots) -> str:
    """`name` relative to the folder (as given, or resolved), with '/'."""
    for root in roots:
        try:
            return Path(os.path.abspath(name)).relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            continue
    return Path(name).name


def _write_split(folder: Path, split: str, source: FolderSource, input, shards: int, seed: int,
                 progress: Callable[[str], None] | None) -> dict:
    """The split's files in `folder`, records in a permutation of (seed, split); their index entries."""
    order = np.random.default_rng([seed, 0 if split == "train" else 1]).permutation(source.count)
    names, roots = source.names, (input, source.root)
    labels = source.labels if source.labelled else [None] * source.count
    entries, start = {}, time.perf_counter()
    for k, part in enumerate(np.array_split(order, shards)):
        name = f"{split}-{k:05d}-of-{shards:05d}.tfrecord"
        lengths = []
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for i in part:
                record = _example(Path(names[i]).read_bytes(), labels[i], _relative(names[i], roots))
                writer.write(record)
                lengths.append(len(record))
        offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64) + TFRECORD_FRAMING)])
        entries[name] = {"records": len(lengths), "bytes": int(offsets[-1]),
                         "offsets": offsets[:-1][::OFFSET_STRIDE].tolist()}
        if progress:
            done = sum(e["records"] for e in entries.values())
            progress(f"{split}: {k + 1}/{shards} files, {done} images, "
                     f"{done / max(time.perf_counter() - start, 1e-9):.0f} images/s")
    return entries


def folder_to_tfrecords(input: str | os.PathLike, output: str | os.PathLike, *, shards: int | None = None,
                        shard_mb: float | None = None, eval_fraction: float = 0.1, seed: int = 0,
                        labels: str = "auto", overwrite: bool = False,
                        progress: Callable[[str], None] | None = None) -> dict:
    """Writes the images under `input` into sharded, shuffled TFRecord files in `output`; returns the index.

    Args:
        input: the image folder (recursive; class sub-folders become labels, as `FolderSource`).
        output: the directory to create (or an empty one); it holds the set only once it is whole.
        shards, shard_mb: the number of training files, or their size (see `shard_counts`).
        eval_fraction: the share of files held out as `eval-*` (the files `FolderSource(split="eval")`
            holds out); 0 writes every image into `train-*`.
        seed: fixes the records' order (a uniform permutation per split, cut into the files).
        labels: "auto", "folders" or "none", as `FolderSource`.
        overwrite: replace a set already in `output`.
        progress: called with one line after each file.

    Raises:
        ValueError: a bad argument, no images, `output` holding a set (without `overwrite`) or other files.
        FileNotFoundError: `input` is not a folder.

    Example:
    >>> index = folder_to_tfrecords("photos/", "photos-tfrecords", eval_fraction=0.1)  # doctest: +SKIP
    >>> source = RecordSource.from_tfrecords("photos-tfrecords/train-*.tfrecord")  # doctest: +SKIP
    """
    eval_fraction = arguments.require("--eval_fraction", eval_fraction,
                                      lambda v: arguments.is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    seed = arguments.non_negative_int("--seed", seed)
    output = Path(output)
    check_output(output, overwrite)
    if eval_fraction:
        train = FolderSource(input, labels=labels, split="train", eval_fraction=eval_fraction)
        held = FolderSource(input, labels=labels, split="eval", eval_fraction=eval_fraction)
    else:
        train, held = FolderSource(input, labels=labels), None
    counts = shard_counts(train.count, _estimated_bytes(train.names), held.count if held else 0,
                          _estimated_bytes(held.names) if held else 0, shards=shards, shard_mb=shard_mb)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        files, splits = {}, {}
        for split, source, count in (("train", train, counts[0]), ("eval", held, counts[1])):
            if source is None:
                continue
            entries = _write_split(staging, split, source, input, count, seed, progress)
            files.update(entries)
            splits[split] = {"records": source.count, "pattern": f"{split}-*-of-{count:05d}.tfrecord",
                             "files": list(entries)}
        index = {"format": INDEX_FORMAT, "version": 1, "written_by": "vicreg-tfrecords", "input": str(train.root),
                 "seed": seed, "eval_fraction": eval_fraction, "classes": list(train.classes),
                 "offset_stride": OFFSET_STRIDE, "splits": splits, "files": files}
        (staging / INDEX_FILENAME).write_text(json.dumps(index))
        _commit(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index


def _commit(staging: Path, output: Path) -> None:
    """`staging` becomes `output` in one rename; a set already there (with --overwrite) is moved aside first."""
    old = None
    if output.exists():
        if any(output.iterdir()):
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.rename(output, old)
        else:
            output.rmdir()
    os.rename(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def index_tfrecords(pattern: str) -> dict:
    """Writes the index of the TFRecord files `pattern` matches beside them (one pass over their records).

    Entries for other files of an index already there are kept; the index is replaced
    in one rename. Returns it.

    Raises:
        ValueError: no file matches, or the files are in several directories.
    """
    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(f"no TFRecord files match {pattern!r}")
    directories = sorted({os.path.dirname(os.path.abspath(f)) for f in files})
    if len(directories) > 1:
        raise ValueError(f"{pattern!r} matches files in {len(directories)} directories; index one at a time")
    path = Path(directories[0]) / INDEX_FILENAME
    index = {"format": INDEX_FORMAT, "version": 1, "written_by": "vicreg-tfrecords --index", "classes": [],
             "offset_stride": OFFSET_STRIDE, "splits": {}, "files": {}}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except ValueError:
            existing = {}
        if existing.get("format") == INDEX_FORMAT and existing.get("offset_stride") == OFFSET_STRIDE:
            index = existing
    for f, lengths in zip(files, scan_files(files)):
        index["files"][os.path.basename(f)] = {"records": len(lengths), "bytes": os.path.getsize(f),
                                               "offsets": offsets_of(lengths, OFFSET_STRIDE).tolist()}
    staged = path.with_name(f".{INDEX_FILENAME}.tmp-{os.getpid()}")
    try:
        staged.write_text(json.dumps(index))
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return index
