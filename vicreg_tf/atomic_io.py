"""Atomic writes on any file system: a hidden temporary sibling, then one rename (the commit point).

A reader sees the previous file or the new one, never half of one. Local paths use
`os.replace` and need no TensorFlow (the programs write with these before it loads);
other TensorFlow file systems (gs://, s3:// with tensorflow-io, ram:// in tests) are
written through `tf.io.gfile`: the file is made locally, copied next to its target,
then renamed. On object stores (GCS) the rename is a copy then a delete, so the file
may briefly be missing, but objects appear whole.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def is_remote(path) -> bool:
    """A path of a TensorFlow file system other than the local one (gs://, ram://, hdfs://, ...)."""
    return "://" in os.fspath(path)


def write_atomically(path, write: Callable[[str], None]) -> None:
    """`write(local_path)` makes the file; it replaces `path` in one rename.

    The temporary name ends with `path`'s own name, so writers that go by the
    suffix (Keras' `.keras` and `.weights.h5`, matplotlib) write the right format.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
    if not is_remote(path):
        os.makedirs(directory or ".", exist_ok=True)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    import tensorflow as tf

    tf.io.gfile.makedirs(directory)
    with tempfile.TemporaryDirectory() as local:
        staged = os.path.join(local, name)
        write(staged)
        tf.io.gfile.copy(staged, tmp, overwrite=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)  # the commit point (copy + delete on GCS)


def write_text_atomically(path, text: str) -> None:
    """`text` into `path`, atomically."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def read_text(path) -> str:
    if not is_remote(path):
        return Path(path).read_text()
    import tensorflow as tf

    with tf.io.gfile.GFile(os.fspath(path), "r") as f:
        return f.read()


def save_keras_file(obj, path, *, weights_only: bool = False) -> None:
    """`obj.save(path)` (or `save_weights`) to any file system, atomically."""
    write_atomically(path, obj.save_weights if weights_only else obj.save)
