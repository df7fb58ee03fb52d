"""The workdir: which experiment it holds (the fingerprint of the config and the data read), atomic small files."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # vicreg_tf.data's default (Debian's package)

# Fields that define an experiment: a workdir holding checkpoints of another
# setting of these must not be resumed from.
EXPERIMENT_FIELDS = ("experiment", "seed", "data", "views", "model", "optimizer", "training.batch_size")


def config_to_dict(config) -> dict:
    return json.loads(config.to_json())


def _select(d: dict, dotted: str):
    for key in dotted.split("."):
        d = d[key]
    return d


def data_location(config) -> str:
    """The absolute path of the data a run reads (not `data.path` as typed): part of the fingerprint.

    Fashion-MNIST is looked up as `vicreg_tf.data.fashion_mnist` does it: `data.path`,
    else $VICREG_DATA_DIR (or its fashion-mnist/ subfolder), else Debian's folder.
    """
    path = config.data.path
    if config.data.source != "fashion_mnist":
        return os.path.abspath(path) if path else ""
    if path:
        candidates = [Path(path)]
    elif os.environ.get("VICREG_DATA_DIR"):
        candidates = [Path(os.environ["VICREG_DATA_DIR"]), Path(os.environ["VICREG_DATA_DIR"]) / "fashion-mnist"]
    else:
        candidates = [Path(FASHION_MNIST_DIR)]
    found = [d for d in candidates if any(d.glob("train-images-idx3-ubyte*"))]
    return str((found or candidates)[0].resolve())


def experiment_fingerprint(config) -> dict:
    as_dict = config_to_dict(config)
    fingerprint = {field: _select(as_dict, field) for field in EXPERIMENT_FIELDS}
    fingerprint["data_dir"] = data_location(config)
    return fingerprint


def _exists(path) -> bool:
    """`os.path.exists` for any TensorFlow file system (workdirs may be gs://...); no TensorFlow for local paths."""
    path = os.fspath(path)
    if "://" not in path:
        return os.path.exists(path)
    import tensorflow as tf

    return tf.io.gfile.exists(path)


def tf_makedirs(path) -> None:
    path = os.fspath(path)
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
        return
    import tensorflow as tf

    tf.io.gfile.makedirs(path)


def holds_checkpoints(workdir) -> bool:
    """Whether `workdir` holds a backup or a trained model (an experiment.json alone does not count)."""
    return _exists(os.path.join(workdir, "backup", "backup.json")) or _exists(os.path.join(workdir, "vicreg.keras"))


def check_workdir(workdir: Path, config, *, write: bool = True) -> None:
    """Refuses a workdir whose checkpoints belong to a different experiment; records this one otherwise.

    A record with no checkpoints next to it (a run that failed before training) is
    replaced. Fields the record predates (written by an older version) are not
    compared: a warning says so.
    """
    record = os.path.join(workdir, "experiment.json")
    mine = experiment_fingerprint(config)
    if _exists(record) and holds_checkpoints(workdir):
        theirs = json.loads(_read_text(record))
        diff = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        if diff:
            details = "; ".join(f"{k}: workdir has {theirs[k]!r}, config has {mine[k]!r}" for k in diff)
            raise ValueError(
                f"--workdir={workdir} holds checkpoints of a different experiment ({details}). "
                "Use a new --workdir, or the config that wrote this one."
            )
        unknown = sorted(set(mine) - set(theirs))
        if unknown and write:
            print(f"warning: {record} predates the field(s) {', '.join(unknown)}; resuming without "
                  f"checking them (this run reads {mine.get('data_dir', '?')})", file=sys.stderr, flush=True)
        return
    if write:
        tf_makedirs(workdir)
        _write_text_atomically(record, json.dumps(mine, indent=2, sort_keys=True))


def _read_text(path) -> str:
    if "://" not in os.fspath(path):
        return Path(path).read_text()
    from vicreg_tf import training

    return training.read_text(path)


def _write_text_atomically(path, text: str) -> None:
    """A temporary file, then one rename (the commit point; a copy + delete on object stores)."""
    path = os.fspath(path)
    if "://" not in path:
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        Path(tmp).write_text(text)
        os.replace(tmp, path)
        return
    from vicreg_tf import training

    training.write_text_atomically(path, text)


def write_json_line(path, record: dict) -> None:
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    _write_text_atomically(path, line + "\n")
