"""Glue shared by vicreg-train and vicreg-eval: config files, strategy, data, model, workdir."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # vicreg_tf.data's default (Debian's package)

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


OPTIMIZERS = ("lars", "adamw")
_POLICIES = ("auto", "", "float32", "float64", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")
# config.training.jit_compile is a string field (ml_collections keeps a field's type): "auto",
# "on" or "off"; "true" / "false" (any case, as a command line gives them) and bools are accepted.
_JIT_VALUES = {"auto": "auto", "on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
VERBOSE_CHOICES = ("auto", "0", "1", "2")


def validate_config(config) -> None:
    """Checks the values a user commonly sets, naming the field; raises ValueError. No TensorFlow.

    Called first thing by vicreg-train and vicreg-eval, before anything is read or written.
    """
    def field(dotted):
        value = config
        for key in dotted.split("."):
            value = value[key]
        return value

    def check(dotted, ok, expected):
        value = field(dotted)
        if not ok(value):
            raise ValueError(f"config.{dotted} must be {expected}, got {value!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    positive_int = (lambda v: is_int(v) and v > 0, "a positive int")
    count = (lambda v: is_int(v) and v >= 0, "an int >= 0")
    for dotted, (ok, expected) in {
        "seed": count,
        "training.batch_size": positive_int,
        "training.epochs": positive_int,
        "training.steps_per_epoch": (count[0], "an int >= 0 (0: one pass over the data)"),
        "data.image_size": positive_int,
        "data.limit": (count[0], "an int >= 0 (0: all images)"),
        "data.shuffle_buffer": positive_int,
        "optimizer.warmup_epochs": count,
        "eval.knn_every": (count[0], "an int >= 0 (0: off)"),
        "eval.knn_max_train": count,
        "eval.linear_epochs": positive_int,
        "eval.fine_tune_epochs": count,
    }.items():
        check(dotted, ok, expected)
    check("data.channels", lambda v: v in (1, 3, 4) and is_int(v), "1, 3 or 4")
    check("data.source", lambda v: v in SOURCES, f"one of {list(SOURCES)}")
    check("optimizer.name", lambda v: v in OPTIMIZERS, f"one of {list(OPTIMIZERS)}")
    check("optimizer.base_learning_rate", lambda v: is_number(v) and v > 0, "a positive number")
    check("optimizer.weight_decay", lambda v: is_number(v) and v >= 0, "a number >= 0")
    check("optimizer.final_fraction", lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
    if config.optimizer.name == "lars":
        check("optimizer.eta", lambda v: is_number(v) and v > 0, "a positive number")
    if config.optimizer.warmup_epochs > config.training.epochs:
        raise ValueError(
            f"config.optimizer.warmup_epochs must be at most config.training.epochs "
            f"({config.training.epochs}), got {config.optimizer.warmup_epochs}"
        )
    for name in ("invariance_weight", "variance_weight", "covariance_weight"):
        check(f"model.{name}", lambda v: is_number(v) and v >= 0, "a number >= 0")
    check("eval.knn_k", lambda v: len(v) > 0 and all(is_int(k) and k > 0 for k in v), "a list of positive ints")
    check("eval.label_fractions", lambda v: all(is_number(f) and 0 < f <= 1 for f in v), "fractions in (0, 1]")
    check("training.mixed_precision", lambda v: v in _POLICIES, f"one of {list(_POLICIES)}")
    check("training.jit_compile", lambda v: str(v).lower() in _JIT_VALUES,
          "'auto' (XLA on for one GPU, off on CPUs and under several replicas), 'on' or 'off'")
    if "verbose" in config.training:
        check("training.verbose", lambda v: str(v) in VERBOSE_CHOICES,
              "'auto' (a progress bar on a terminal, a line per epoch otherwise), 0, 1 or 2")
    check("export.name", lambda v: isinstance(v, str) and v and "/" not in v and not v.startswith(".")
          and not v.isdigit(), "a directory name (not all digits, no '/')")
    if config.data.source in ("folder", "tfrecords") and not config.data.path:
        raise ValueError(f"config.data.source={config.data.source!r} needs --config.data.path="
                         + ("/path/to/images" if config.data.source == "folder" else "'/path/to/train-*.tfrecord'"))


def check_data_exists(config) -> None:
    """A folder or tfds directory that does not exist fails before anything is written.

    (Missing Fashion-MNIST files are reported by the loader, which says where it looked.)
    """
    location = data_location(config)
    if config.data.source in ("folder", "tfds") and location and not Path(location).is_dir():
        raise ValueError(f"config.data.path={config.data.path!r} is not a directory ({location})")


def check_backbone_name(config) -> None:
    from vicreg_tf import backbones

    if config.model.backbone not in backbones.BACKBONES:
        raise ValueError(
            f"config.model.backbone must be one of {sorted(backbones.BACKBONES)}, got {config.model.backbone!r}"
        )


def check_backup_loads(model, workdir: Path) -> None:
    """A backup with no experiment.json next to it must load into `model`, or the workdir is refused."""
    from vicreg_tf import training

    backup_dir = os.path.join(workdir, "backup")
    if _exists(os.path.join(workdir, "experiment.json")) or not _exists(os.path.join(backup_dir, "backup.json")):
        return
    try:
        # Keras loads some mismatches with a warning only ("Skipping variable loading ...").
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training.load_backup(model, backup_dir)
        skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as error:  # Keras raises assorted types for a mismatched weights file
        reason = " ".join(str(error).split())[:200]
        raise ValueError(
            f"--workdir={workdir} holds another model's backup ({backup_dir}), which does not load "
            f"into this config's model ({type(error).__name__}: {reason}). Use a new --workdir."
        ) from None


def check_keras_file(path) -> Path:
    """A `.keras` file that exists and is a complete zip archive, or a one-line ValueError."""
    import zipfile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no backbone file at {path}")
    if path.is_file() and path.suffix == ".keras":
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError):
            bad = True
        if bad:
            raise ValueError(f"not a valid .keras file (truncated or not a zip): {path}")
    return path


def check_backbone_input(backbone, config, path) -> None:
    """The backbone takes images of the config's size and channels."""
    expected = (None, config.data.image_size, config.data.image_size, config.data.channels)
    got = tuple(backbone.input_shape)
    if got != expected:
        raise ValueError(
            f"backbone input {got} does not match the config's image size/channels "
            f"{expected[1:]} ({path}; set --config.data.image_size/--config.data.channels or use "
            "the config it was trained with)"
        )


def resolve_verbose(value) -> int:
    """config.training.verbose -> Keras' verbose: 'auto' is a progress bar on a terminal, else a line per epoch."""
    if str(value) == "auto":
        return 1 if sys.stdout.isatty() else 2
    return int(value)


def diverged_message(error: BaseException, workdir: Path, config) -> str | None:
    """One line (plus a hint) for a run stopped by a non-finite step; None for other errors."""
    import tensorflow as tf

    from vicreg_tf import model, training

    if isinstance(error, tf.errors.InvalidArgumentError):
        if model.NON_FINITE_STEP_MESSAGE.split(":")[0] not in str(error):
            return None
    elif not isinstance(error, FloatingPointError):
        return None
    epoch = training.read_backup_epoch(os.path.join(workdir, "backup"))
    last = (f"the last good backup is epoch {epoch} in {os.path.join(workdir, 'backup')}" if epoch
            else "no epoch finished, so there is no backup")
    return (
        f"training diverged in epoch {epoch + 1}: a step's loss or gradients were not finite (NaN or Inf); "
        f"the step was not applied and nothing was saved or exported; {last}.\n"
        f"hint: start a new --workdir with a lower --config.optimizer.base_learning_rate "
        f"(now {config.optimizer.base_learning_rate}), or check the images for NaN/Inf"
    )


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
    """MultiWorkerMirrored under TF_CONFIG or a multi-task Slurm step, Mirrored over all GPUs, else the default."""
    import tensorflow as tf

    from trainers import cluster

    if os.environ.get("TF_CONFIG"):
        return cluster.multi_worker_strategy()
    if cluster.in_slurm_job():  # srun with several tasks and no TF_CONFIG
        return cluster.multi_worker_strategy(cluster.slurm_cluster_resolver())
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


SOURCES = ("fashion_mnist", "tfds", "folder", "tfrecords")


def load_source(config, split: str):
    """The configured source of `split` (a `vicreg_tf.data` source): images stay encoded on disk.

    Folders: `data.train_split` / `data.eval_split` are "train" / "eval" (a stable
    held-out `data.eval_fraction` of the files, chosen by a hash of each name) or
    "all"; `data.eval_path` names a separate folder for evaluation instead.
    TFRecords: `data.path` (training) and `data.eval_path` are file patterns.
    """
    from vicreg_tf import data

    kind = config.data.source
    channels = config.data.channels
    is_eval = split == config.data.eval_split and split != config.data.train_split
    if kind == "fashion_mnist":
        images, labels, directory = data.fashion_mnist_arrays(split, data_dir=config.data.path or None)
        source = data.ArraySource(images, labels, name=f"fashion_mnist:{split}:{directory}")
    elif kind == "tfds":
        source = data.RecordSource.from_tfds(
            config.data.name, split, data_dir=config.data.path or None, channels=channels,
            cache_mb=config.data.cache_mb,
        )
    elif kind == "folder":
        if is_eval and config.data.eval_path:
            source = data.FolderSource(config.data.eval_path, channels)
        else:
            source = data.FolderSource(config.data.path, channels, split=split,
                                          eval_fraction=config.data.eval_fraction)
    elif kind == "tfrecords":
        pattern = config.data.eval_path if is_eval else config.data.path
        if not pattern:
            raise ValueError(f"config.data.source='tfrecords' needs --config.data.{'eval_path' if is_eval else 'path'}"
                             "=/path/to/files-*.tfrecord")
        source = data.RecordSource.from_tfrecords(pattern, channels=channels, cache_mb=config.data.cache_mb)
    else:
        raise ValueError(f"unknown data.source {kind!r}; expected one of {list(SOURCES)}")
    if config.data.limit and not is_eval:
        source = source.limited(config.data.limit)
    return source


def load_images(config, split: str):
    """Evaluation images of `split`: unbatched (image in [0, 1], label) pairs (resize + center crop), and their count."""
    source = load_source(config, split)
    return source.images(config.data.image_size), source.count


# mixed_bfloat16 for "auto" on CPUs with native bfloat16 (AVX512_BF16 / AMX)? Off: faster (1.4-1.9x
# the small-CNN step, 1.24x wall end to end on shared cores) but the Fashion-MNIST recipe lost 0.51
# points linear against float32 with the same seed (configs/fashion_mnist.py, PRECISION).
BFLOAT16_ON_CPU = False


def training_device_kind(strategy) -> str:
    """"GPU", "TPU" or "CPU": what the strategy's replicas run on."""
    import tensorflow as tf

    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one device, TensorFlow's choice
        devices = [d.name for d in tf.config.list_logical_devices("GPU")[:1]]
    names = " ".join(devices).upper()
    return "TPU" if "TPU" in names else "GPU" if "GPU" in names else "CPU"


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (the avx512_bf16 or amx_bf16 flag in /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: no way to tell, so no
            return False
    flags = set(cpuinfo.split())
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_mixed_precision(config, strategy) -> str:
    """config.training.mixed_precision with "auto" resolved: mixed_bfloat16 where the hardware has bfloat16.

    GPUs of compute capability >= 8.0 (all of them), TPUs, and (if BFLOAT16_ON_CPU)
    CPUs with AVX512_BF16 or AMX; float32 ("") otherwise. Decided on the machine
    that runs, at run time. An explicit policy is returned as it is.
    """
    value = config.training.mixed_precision
    if value != "auto":
        return value
    kind = training_device_kind(strategy)
    if kind == "TPU":
        return "mixed_bfloat16"
    if kind == "GPU":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        capabilities = [tuple(tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)))
                        for g in gpus]
        return "mixed_bfloat16" if capabilities and min(capabilities) >= (8, 0) else ""
    return "mixed_bfloat16" if BFLOAT16_ON_CPU and cpu_has_native_bfloat16() else ""


def resolve_jit_compile(config, strategy) -> bool:
    """config.training.jit_compile with "auto" resolved: XLA on one GPU (or TPU) only.

    Off on CPUs (measured: 0.71x the step without XLA for the small CNN) and under
    several replicas (Keras leaves XLA off under tf.distribute, the all-gather has
    no XLA GPU kernel: keras issue 18110; LossScaleOptimizer + XLA + Mirrored fails:
    keras issue 21366).
    """
    value = _JIT_VALUES.get(str(config.training.jit_compile).lower())
    if value is None:
        raise ValueError(f"config.training.jit_compile must be 'auto', 'on' or 'off', got {config.training.jit_compile!r}")
    if value != "auto":
        return value
    return strategy.num_replicas_in_sync == 1 and training_device_kind(strategy) in ("GPU", "TPU")


def views_on_device(config, strategy) -> bool:
    """config.views.on_device: "auto" is on when training on GPUs or TPUs without XLA (the CPU then only decodes and crops)."""
    value = str(config.views.on_device)
    if value not in ("auto", "on", "off"):
        raise ValueError(f"config.views.on_device must be 'auto', 'on' or 'off', got {value!r}")
    if value == "auto":
        if resolve_jit_compile(config, strategy):  # XLA cannot compile the view ops (data-dependent shapes)
            return False
        return training_device_kind(strategy) in ("GPU", "TPU")
    return value == "on"


def eval_batch_size(config) -> int:
    """Images per evaluation batch: the training batch, at most 512, and at most 4 M pixels (83 at 224x224)."""
    pixels = config.data.image_size ** 2
    return max(8, min(512, config.training.batch_size, 2**22 // pixels))


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
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer.name {opt.name!r}; expected one of {list(OPTIMIZERS)}")
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


def write_json_line(path, record: dict) -> None:
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    _write_text_atomically(path, line + "\n")


HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")

# TensorFlow's start-up notices: printed once per native library that loads (twice in
# TF 2.21), before TF_CPP_MIN_LOG_LEVEL is read, and on every CPU-only machine.
_STARTUP_NOISE = (
    "All log messages before absl::InitializeLog",
    "oneDNN custom operations are on",
    "Could not find cuda drivers",
    "cpu_feature_guard.cc",
    "To enable the following instructions",
    "failed call to cuInit",
)


def print_help(doc: str, flag_names: list[str], out=None) -> None:
    """The script's docstring and its flags, one line each; absl's --help lists none of them."""
    from absl import flags

    out = out or sys.stdout
    print(doc.strip() + "\n\nflags:", file=out)
    for name in flag_names:
        flag = flags.FLAGS[name]
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        print(f"  --{name}: {flag.help}{default}", file=out)
    if "config" in flag_names:
        print("  --config.KEY=VALUE: override any config field, e.g. --config.training.epochs=3 "
              "--config.data.path=/data (an unknown KEY is an error)", file=out)
    print("  --verbosity=N: Python log level (default: warnings only)", file=out)


@contextlib.contextmanager
def quiet_tensorflow_startup():
    """Hides TensorFlow's start-up notices on stderr (see _STARTUP_NOISE) and passes on everything else.

    Only when the user has not set TF_CPP_MIN_LOG_LEVEL; then it is set to 2
    (no C++ INFO or WARNING lines, such as PredictCost() or cache notices).
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") and os.environ.get("_VICREG_LOG_LEVEL_SET") != "1":
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    os.environ["_VICREG_LOG_LEVEL_SET"] = "1"  # ours, not the user's: child processes filter too
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            skip_next = False
            for line in lines:
                if skip_next or any(noise in line for noise in _STARTUP_NOISE):
                    # cpu_feature_guard's notice continues on a second line
                    skip_next = "cpu_feature_guard.cc" in line
                    continue
                sys.stderr.write(line)
            sys.stderr.flush()


def run_app(main_fn, argv: list[str], doc: str = "", flag_names: tuple = ()) -> None:
    """absl's app.run, with config errors (an unknown key, a bad value) as one clear line.

    `--help` prints `doc` and the flags `flag_names` and exits 0. TensorFlow is loaded
    here, with its start-up notices hidden, and absl's Python INFO lines are off
    unless `--verbosity` is given.
    """
    from absl import app, flags
    from absl import logging as absl_logging

    if any(arg in HELP_ARGS for arg in argv[1:]):
        print_help(doc, list(flag_names))
        sys.exit(0)
    try:
        argv = preprocess_argv(argv)
    except FileNotFoundError as error:
        sys.exit(fail(str(error)))
    with quiet_tensorflow_startup():
        import tensorflow as tf

        tf.config.list_physical_devices()  # where CUDA is probed (and complains on CPU-only machines)
    if not any(arg.startswith(("--verbosity", "-v=", "--v=")) for arg in argv[1:]):
        argv = [argv[0], "--verbosity=-1", *argv[1:]]  # absl INFO lines (e.g. from the export) off
        absl_logging.set_verbosity(absl_logging.WARNING)

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


def worker_role(strategy, workdir) -> WorkerRole:
    from trainers import cluster

    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not (os.environ.get("TF_CONFIG") or cluster.in_slurm_job()):
        tf_makedirs(workdir)
        return WorkerRole(True, workdir)

    return cluster.worker_role(resolver, workdir)


def make_model(config, total_steps: int = 0):
    """The configured member of the VICReg family (`config.model.method`) on the configured backbone.

    Call inside `strategy.scope()`. `total_steps` (epochs x steps per epoch) sets
    BYOL's EMA schedule; the other methods ignore it.
    """
    import vicreg_tf
    from vicreg_tf.methods import METHODS

    model = config.model
    method = model.get("method", "vicreg")
    if method not in METHODS:
        raise ValueError(f"unknown model.method {method!r}; expected one of {', '.join(METHODS)}")
    backbone = make_backbone(config)
    if method == "vicreg":
        return vicreg_tf.VICReg(
            backbone,
            projector=model.projector,
            invariance_weight=model.invariance_weight,
            variance_weight=model.variance_weight,
            covariance_weight=model.covariance_weight,
        )
    if method in ("simsiam", "byol"):
        kwargs = dict(
            predictor=model.predictor or None,
            variance_weight=model.regularizer_variance_weight,
            covariance_weight=model.regularizer_covariance_weight,
        )
        if method == "simsiam":
            return vicreg_tf.SimSiam(backbone, model.projector, **kwargs)
        return vicreg_tf.BYOL(backbone, model.projector, tau_base=model.tau_base, total_steps=total_steps, **kwargs)
    return vicreg_tf.EntropyVICReg(
        backbone,
        model.projector,
        entropy=method,
        invariance_weight=model.invariance_weight,
        entropy_weight=model.entropy_weight,
        beta=model.entropy_beta,
        kernel_width=model.kernel_width,
    )
