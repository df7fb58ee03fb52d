"""The workdir: which experiment it holds (the fingerprint of the config and the data read), its small files."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vicreg_tf.atomic_io import read_text, write_text_atomically

# Fields that define an experiment: a workdir holding checkpoints of another
# setting of these must not be resumed from.
EXPERIMENT_FIELDS = ("experiment", "seed", "data", "views", "model", "optimizer", "training.batch_size")
# Keys inside those fields that do not change what is learned (a start-up check's threshold, the
# evaluation's crop).
NOT_EXPERIMENT = ("data.max_bad_fraction", "data.eval_crop_fraction")
_MAX_LISTED = 6  # differing keys named in a refusal


def config_to_dict(config) -> dict:
    return json.loads(config.to_json())


def _select(d: dict, dotted: str):
    for key in dotted.split("."):
        d = d[key]
    return d


def data_location(config) -> str:
    """The absolute path of the data a run reads (not `data.path` as typed): part of the fingerprint.

    Fashion-MNIST's folder is the one `vicreg_tf.data.fashion_mnist` reads (`data.path`, else
    $VICREG_DATA_DIR or its fashion-mnist/ subfolder, else Debian's folder); finding it loads
    TensorFlow, which the programs have loaded by then.
    """
    path = config.data.path
    if config.data.source != "fashion_mnist":
        return os.path.abspath(path) if path else ""
    from vicreg_tf.data.fashion_mnist import fashion_mnist_dirs

    candidates = fashion_mnist_dirs(path or None)
    found = [d for d in candidates if any(d.glob("train-images-idx3-ubyte*"))]
    return str((found or candidates)[0].resolve())


def experiment_fingerprint(config) -> dict:
    as_dict = config_to_dict(config)
    for dotted in NOT_EXPERIMENT:
        *sections, key = dotted.split(".")
        _select(as_dict, ".".join(sections)).pop(key, None)
    fingerprint = {field: _select(as_dict, field) for field in EXPERIMENT_FIELDS}
    fingerprint["data_dir"] = data_location(config)
    return fingerprint


def _flat(value, key: str, out: dict) -> dict:
    """{"model": {"projector": "32-32"}} -> {"model.projector": "32-32"} (an empty dict stays a value)."""
    if isinstance(value, dict) and value:
        for name, item in value.items():
            _flat(item, f"{key}.{name}", out)
    else:
        out[key] = value
    return out


def fingerprint_differences(theirs: dict, mine: dict) -> list[str]:
    """The dotted keys whose values differ, as "key: workdir has OLD, config has NEW".

    Only fields both records hold are compared (a record may predate a field); inside
    them a key one side lacks differs.
    """
    absent = object()

    def shown(value):
        return "no such key" if value is absent else repr(value)

    differences = []
    for field in sorted(set(mine) & set(theirs)):
        old, new = _flat(theirs[field], field, {}), _flat(mine[field], field, {})
        for key in sorted(set(old) | set(new)):
            before, after = old.get(key, absent), new.get(key, absent)
            if before != after:
                differences.append(f"{key}: workdir has {shown(before)}, config has {shown(after)}")
    return differences


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
        theirs = json.loads(read_text(record))
        diff = fingerprint_differences(theirs, mine)
        if diff:
            details = "; ".join(diff[:_MAX_LISTED])
            if len(diff) > _MAX_LISTED:
                details += f"; ... ({len(diff)} keys in all)"
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
        write_text_atomically(record, json.dumps(mine, indent=2, sort_keys=True))


def rounded(value, digits: int = 6):
    """`value` with every float (in dicts and lists too) rounded to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write_json_line(path, record: dict) -> dict:
    """Prints `record` as one JSON line (floats to 6 significant digits), writes it to `path`; returns it as written."""
    record = rounded(record)
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    write_text_atomically(path, line + "\n")
    return record
