"""Glue shared by vicreg-train and vicreg-eval: config files, strategy, data, model, workdir."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

# Fields that define an experiment: a workdir holding checkpoints of another
# setting of these must not be resumed from.
EXPERIMENT_FIELDS = ("experiment", "seed", "data", "views", "model", "optimizer", "training.batch_size")


def resolve_config_path(value: str) -> str:
    """`--config` takes a path or the name of a shipped config ("fashion_mnist")."""
    path, _, rest = value.partition(":")
    if os.path.exists(path):
        return value
    candidate = CONFIGS_DIR / (path if path.endswith(".py") else f"{path}.py")
    if candidate.exists():
        return str(candidate) + (f":{rest}" if rest else "")
    shipped = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if p.stem != "__init__")
    raise FileNotFoundError(f"config {value!r} not found; give a path or one of {shipped}")


def preprocess_argv(argv: list[str]) -> list[str]:
    """Maps `--config=NAME` to the shipped file before absl parses the flags."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg.split("=", 1)[1])
        out.append(arg)
    return out


def config_to_dict(config) -> dict:
    return json.loads(config.to_json())


def _select(d: dict, dotted: str):
    for key in dotted.split("."):
        d = d[key]
    return d


def experiment_fingerprint(config) -> dict:
    as_dict = config_to_dict(config)
    return {field: _select(as_dict, field) for field in EXPERIMENT_FIELDS}


def check_workdir(workdir: Path, config, *, write: bool = True) -> None:
    """Refuses a workdir that belongs to a different experiment; records this one otherwise."""
    record = workdir / "experiment.json"
    mine = experiment_fingerprint(config)
    if record.exists():
        theirs = json.loads(record.read_text())
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            details = "; ".join(f"{k}: workdir has {theirs.get(k)!r}, config has {mine.get(k)!r}" for k in diff)
            raise ValueError(
                f"--workdir={workdir} holds checkpoints of a different experiment ({details}). "
                "Use a new --workdir, or the config that wrote this one."
            )
        return
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / ".experiment.json.tmp"
        tmp.write_text(json.dumps(mine, indent=2, sort_keys=True))
        os.replace(tmp, record)


def make_deterministic() -> None:
    """Bitwise-reproducible training on this process: op determinism and one inter-op thread.

    `enable_op_determinism` alone is not enough on CPU: with several inter-op
    threads, two runs of the same steps on the same batches drift apart by a
    float32 rounding step within a few steps (measured: the expander BN beta differs
    by 2e-9 after step 2, conv kernels by 4e-4 after 4 epochs of the tiny config).
    Independent ops then run one at a time; each op still uses all intra-op threads.
    Must run before TensorFlow's runtime starts (the first op); later it warns.
    """
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        if tf.config.threading.get_inter_op_parallelism_threads() != 1:
            print("warning: training.deterministic=True but TensorFlow was already initialised, so the "
                  "inter-op thread pool could not be limited to 1 thread; results may differ in the last "
                  "bits between runs", file=sys.stderr, flush=True)


def make_strategy():
    """MultiWorkerMirrored under TF_CONFIG, Mirrored over all GPUs, else the default strategy."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        from trainers import cluster

        return cluster.multi_worker_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


def load_images(config, split: str):
    """The configured source for `split`: unbatched (image in [0, 1], label) pairs, and its size."""
    from vicreg_tf import data

    source = config.data.source
    size = (config.data.image_size, config.data.image_size)
    if source == "fashion_mnist":
        dataset = data.fashion_mnist(split, data_dir=config.data.path or None)
    elif source == "tfds":
        dataset = data.from_tfds(
            config.data.name, split, data_dir=config.data.path or None, image_size=size
        )
    elif source == "folder":
        if not config.data.path:
            raise ValueError("data.source='folder' needs --config.data.path=/path/to/images")
        dataset = data.from_folder(config.data.path, size, channels=config.data.channels)
    else:
        raise ValueError(
            f"unknown data.source {source!r}; expected 'fashion_mnist', 'tfds' or 'folder'"
        )
    if config.data.limit and split == config.data.train_split:
        dataset = dataset.take(config.data.limit)
    count = int(dataset.cardinality())
    if count < 0:  # unknown cardinality (e.g. filtered folders): count once
        count = sum(1 for _ in dataset)
    return dataset, count


def make_views(config, seed: int | None = None):
    from vicreg_tf import augment

    size = config.data.image_size
    presets = {"paper": augment.paper_views, "grayscale": augment.grayscale_views}
    if config.views.preset not in presets:
        raise ValueError(f"unknown views.preset {config.views.preset!r}; expected one of {sorted(presets)}")
    return presets[config.views.preset](size, seed=seed)


def make_backbone(config):
    from vicreg_tf import backbones

    size = config.data.image_size
    kwargs = dict(config.model.backbone_kwargs)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return backbones.build_backbone(
        config.model.backbone, input_shape=(size, size, config.data.channels), **kwargs
    )


def make_optimizer(config, steps_per_epoch: int):
    import keras

    from vicreg_tf import LARS, scaled_learning_rate, warmup_cosine

    opt = config.optimizer
    peak = scaled_learning_rate(opt.base_learning_rate, config.training.batch_size)
    total = steps_per_epoch * config.training.epochs
    warmup = min(steps_per_epoch * opt.warmup_epochs, total - 1)
    schedule = warmup_cosine(peak, total_steps=total, warmup_steps=warmup, final_fraction=opt.final_fraction)
    if opt.name == "lars":
        return LARS(learning_rate=schedule, weight_decay=opt.weight_decay, eta=opt.eta)
    if opt.name == "adamw":
        return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=opt.weight_decay)
    raise ValueError(f"unknown optimizer.name {opt.name!r}; expected 'lars' or 'adamw'")


def labelled_batches(dataset, batch_size: int, limit: int = 0):
    """(images, labels) batches for evaluation, no augmentation."""
    import tensorflow as tf

    if limit:
        dataset = dataset.take(limit)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def has_labels(dataset) -> bool:
    for _, label in dataset.take(1):
        return int(label) >= 0
    return False


def write_json_line(path: Path, record: dict) -> None:
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(line + "\n")
    os.replace(tmp, path)


def run_app(main_fn, argv: list[str]) -> None:
    """absl's app.run, with config errors (an unknown key, a bad value) as one clear line."""
    from absl import app, flags

    try:
        argv = preprocess_argv(argv)
    except FileNotFoundError as error:
        sys.exit(fail(str(error)))

    def parse(args):
        try:
            return flags.FLAGS(args)
        except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as error:
            overrides = [a.split("=", 1)[0] for a in args if a.startswith("--config.")]
            detail = " ".join(str(error.args[0] if error.args else error).split())
            for _ in range(2):  # ml_collections nests repr() of KeyError messages
                detail = detail.replace("\\n", " ").replace("\\'", "'")
                if len(detail) > 1 and detail[0] == detail[-1] and detail[0] in "'\"":
                    detail = detail[1:-1]
            sys.exit(fail(f"bad command line {overrides or ''}: {detail}".replace(" : ", ": ")))

    app.run(main_fn, argv=argv, flags_parser=parse)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class WorkerRole:
    """Who writes what: the chief writes to the workdir, other workers to a scratch copy."""

    def __init__(self, is_chief: bool, workdir: Path):
        self.is_chief = is_chief
        self.workdir = workdir


def worker_role(strategy, workdir: Path) -> WorkerRole:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not os.environ.get("TF_CONFIG"):
        workdir.mkdir(parents=True, exist_ok=True)
        return WorkerRole(True, workdir)
    from trainers import cluster

    return cluster.worker_role(resolver, workdir)
