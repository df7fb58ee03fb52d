"""From a config to the run's parts: strategy, precision and XLA, sources and views, backbone, model, optimizer."""
from __future__ import annotations

import os
import sys

# config.training.jit_compile is a string field (ml_collections keeps a field's type): "auto",
# "on" or "off"; "true" / "false" (any case, as a command line gives them) and bools are accepted.
JIT_VALUES = {"auto": "auto", "on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def resolve_verbose(value) -> int:
    """config.training.verbose -> Keras' verbose: 'auto' is a progress bar on a terminal, else a line per epoch."""
    if str(value) == "auto":
        return 1 if sys.stdout.isatty() else 2
    return int(value)


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
    """MultiWorkerMirrored under TF_CONFIG or a multi-task Slurm step, Mirrored over two or more GPUs, else the default.

    One GPU gets the default strategy, not MirroredStrategy over it: the step then
    has no collectives (Mirrored adds an all-reduce of the gradients, an all-gather
    of the embeddings and one per synchronized BatchNorm, all of one replica), XLA
    compiles all of it, and it is the faster of the two (docs/DISTRIBUTED.md).
    """
    import tensorflow as tf

    from . import cluster

    if os.environ.get("TF_CONFIG"):
        return cluster.multi_worker_strategy()
    if cluster.in_slurm_job():  # srun with several tasks and no TF_CONFIG
        return cluster.multi_worker_strategy(cluster.slurm_cluster_resolver())
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


def _fashion_mnist_source(data_config, split: str, is_eval: bool):
    from vicreg_tf import data

    images, labels, directory = data.fashion_mnist_arrays(split, data_dir=data_config.path or None)
    return data.ArraySource(images, labels, name=f"fashion_mnist:{split}:{directory}")


def _tfds_source(data_config, split: str, is_eval: bool):
    from vicreg_tf import data

    return data.RecordSource.from_tfds(data_config.name, split, data_dir=data_config.path or None,
                                       channels=data_config.channels, cache_mb=data_config.cache_mb)


def _folder_source(data_config, split: str, is_eval: bool):
    from vicreg_tf import data

    if data_config.eval_path:  # evaluation reads its own folder: the training split is the whole folder
        if is_eval:
            return data.FolderSource(data_config.eval_path, data_config.channels)
        split = "all"
    return data.FolderSource(data_config.path, data_config.channels, split=split,
                             eval_fraction=data_config.eval_fraction)


def _tfrecords_source(data_config, split: str, is_eval: bool):
    from vicreg_tf import data

    pattern = data_config.eval_path if is_eval else data_config.path
    if not pattern:
        raise ValueError(f"config.data.source='tfrecords' needs --config.data.{'eval_path' if is_eval else 'path'}"
                         "=/path/to/files-*.tfrecord")
    return data.RecordSource.from_tfrecords(pattern, channels=data_config.channels, cache_mb=data_config.cache_mb)


# config.data.source -> builder(config.data, split, is_eval) -> a `vicreg_tf.data` source. A new kind of
# source is its module in vicreg_tf/data/, its builder and entry here, and a config; `checks.validate_config`
# names these when data.source is none of them.
SOURCES = {
    "fashion_mnist": _fashion_mnist_source,
    "tfds": _tfds_source,
    "folder": _folder_source,
    "tfrecords": _tfrecords_source,
}


def load_source(config, split: str):
    """The configured source of `split` (`SOURCES[config.data.source]`): images stay encoded on disk.

    Folders: `data.train_split` / `data.eval_split` are "train" / "eval" (a stable
    held-out `data.eval_fraction` of the files, chosen by a hash of each name) or
    "all"; `data.eval_path` names a separate folder for evaluation instead.
    TFRecords: `data.path` (training) and `data.eval_path` are file patterns.
    """
    is_eval = split == config.data.eval_split and split != config.data.train_split
    source = SOURCES[config.data.source](config.data, split, is_eval)
    if config.data.limit and not is_eval:
        source = source.limited(config.data.limit)
    return source


# mixed_bfloat16 for "auto" on CPUs with native bfloat16 (AVX512_BF16 / AMX): on. Decided at equal
# wall time, not equal epochs (configs/fashion_mnist.py, PRECISION): the step is 1.44x faster, and with
# 1.25x the steps of float32 it scored, over two seeds, linear 86.00% vs 85.88% and kNN-20 85.44% vs
# 84.90%. CPUs without native bfloat16 (AVX2 only, AVX-512 without BF16) stay float32.
BFLOAT16_ON_CPU = True


def training_device_kind(strategy) -> str:
    """"GPU", "TPU" or "CPU": what the strategy's replicas run on."""
    import tensorflow as tf

    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one device, TensorFlow's choice
        devices = [d.name for d in tf.config.list_logical_devices("GPU")[:1]]
    names = " ".join(devices).upper()
    return "TPU" if "TPU" in names else "GPU" if "GPU" in names else "CPU"


def _read_cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none (not Linux: no flags to tell)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (the avx512_bf16 or amx_bf16 flag in /proc/cpuinfo)."""
    flags = set((_read_cpuinfo() if cpuinfo is None else cpuinfo).split())
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
        capabilities = gpu_capabilities()
        return "mixed_bfloat16" if capabilities and min(capabilities) >= (8, 0) else ""
    return "mixed_bfloat16" if BFLOAT16_ON_CPU and cpu_has_native_bfloat16() else ""


def check_precision(precision: str, strategy) -> None:
    """A one-line error for a dtype policy this hardware cannot train in, naming what to use instead."""
    if precision == "mixed_bfloat16" and training_device_kind(strategy) == "GPU":
        oldest = min(gpu_capabilities(), default=(0, 0))
        if oldest < (8, 0):
            raise ValueError(
                f"config.training.mixed_precision=mixed_bfloat16 needs GPUs of compute capability 8.0 or newer "
                f"(Ampere), this one is {oldest[0]}.{oldest[1]}: use mixed_float16 (or auto)")


def gpu_capabilities() -> list[tuple[int, int]]:
    import tensorflow as tf

    return [tuple(tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)))
            for g in tf.config.list_physical_devices("GPU")]


def resolve_jit_compile(config, strategy) -> bool:
    """config.training.jit_compile with "auto" resolved: XLA on one GPU (or TPU), with the views on the host.

    Off on CPUs (measured: 0.71x the step without XLA for the small CNN) and under
    several replicas in a worker or across workers. An explicit "on" where XLA
    cannot compile the step (views made on the device; several replicas in one
    worker, `vicreg_tf.base.xla_refusal`) is a one-line error naming what works.
    """
    value = JIT_VALUES.get(str(config.training.jit_compile).lower())
    if value is None:
        raise ValueError("config.training.jit_compile must be 'auto', 'on' or 'off', "
                         f"got {config.training.jit_compile!r}")
    views = _views_value(config)
    if value is True:
        from vicreg_tf.base import xla_refusal

        refusal = xla_refusal(views == "on", strategy)
        if refusal:
            raise ValueError(f"config.training.jit_compile=on cannot work here: {refusal}; "
                             "use --config.training.jit_compile=auto")
        return True
    if value is False:
        return False
    return (strategy.num_replicas_in_sync == 1 and training_device_kind(strategy) in ("GPU", "TPU")
            and views != "on")


def _views_value(config) -> str:
    value = str(config.views.on_device)
    if value not in ("auto", "on", "off"):
        raise ValueError(f"config.views.on_device must be 'auto', 'on' or 'off', got {value!r}")
    return value


def views_on_device(config, strategy) -> bool:
    """config.views.on_device: "auto" is on when training on GPUs or TPUs without XLA (the CPU then only decodes
    and crops)."""
    value = _views_value(config)
    if value == "auto":
        if resolve_jit_compile(config, strategy):  # XLA cannot compile the view ops (data-dependent shapes)
            return False
        return training_device_kind(strategy) in ("GPU", "TPU")
    return value == "on"


def describe_devices(strategy) -> str:
    """What the replicas run on: "1 x NVIDIA A100-SXM4-40GB (compute capability 8.0)" or the CPU's model and flags."""
    import tensorflow as tf

    kind = training_device_kind(strategy)
    if kind == "GPU":
        names = []
        for gpu in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(gpu)
            capability = ".".join(str(v) for v in details.get("compute_capability", ()))
            names.append(f"{details.get('device_name', gpu.name)} (compute capability {capability or '?'})")
        counted = {name: names.count(name) for name in names}
        return ", ".join(f"{count} x {name}" for name, count in counted.items())
    if kind == "TPU":
        return f"{strategy.num_replicas_in_sync} x TPU"
    info = _read_cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "CPU")
    present = set(info.split())
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in present]
    return f"{os.cpu_count()} cores of {model}" + (f" ({', '.join(flags)})" if flags else "")


def describe_setup(config, strategy, precision: str, jit_compile: bool, on_device: bool) -> str:
    """vicreg-train's first line: devices, precision, XLA, replicas, where the views run, the batch."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    batch = config.training.batch_size
    kind = "default strategy" if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy() \
        else type(strategy).__name__
    return (f"devices: {describe_devices(strategy)} | precision: {precision or 'float32'} | "
            f"XLA: {'on' if jit_compile else 'off'} | replicas: {replicas} ({kind}) | "
            f"views: {'on the device' if on_device else 'on the host'} | "
            f"batch: {batch} global, {batch // max(1, replicas)} per replica")


def eval_batch_size(config) -> int:
    """Images per evaluation batch: the training batch, at most 512, and at most 4 M pixels (83 at 224x224)."""
    pixels = config.data.image_size ** 2
    return max(8, min(512, config.training.batch_size, 2**22 // pixels))


def make_views(config, seed: int | None = None):
    """The views of `config.views.preset` (`vicreg_tf.augment.PRESETS`) at `config.data.image_size`."""
    from vicreg_tf.augment import PRESETS

    if config.views.preset not in PRESETS:
        raise ValueError(f"unknown views.preset {config.views.preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[config.views.preset](config.data.image_size, seed=seed)


def make_backbone(config):
    """The configured backbone. `config.model.backbone_kwargs` it does not take are left out, with a warning:
    they belong to the config's own backbone when `--config.model.backbone=` picked another one (a
    command line cannot remove a key)."""
    import inspect

    from vicreg_tf import backbones

    size = config.data.image_size
    kwargs = dict(config.model.backbone_kwargs)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    name = config.model.backbone
    builder = backbones.BACKBONES.get(name)
    if builder is not None:
        parameters = inspect.signature(builder).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            foreign = sorted(set(kwargs) - set(parameters))
            if foreign:
                takes = ", ".join(k for k in parameters if k not in ("input_shape", "name"))
                print(f"warning: config.model.backbone_kwargs {', '.join(foreign)} left out: {name} does not take "
                      f"them (it takes {takes})", file=sys.stderr, flush=True)
                kwargs = {k: v for k, v in kwargs.items() if k not in foreign}
    return backbones.build_backbone(name, input_shape=(size, size, config.data.channels), **kwargs)


def _lars(schedule, opt):
    from vicreg_tf import LARS

    return LARS(learning_rate=schedule, weight_decay=opt.weight_decay, eta=opt.eta)


def _adamw(schedule, opt):
    import keras

    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=opt.weight_decay)


# config.optimizer.name -> builder(learning-rate schedule, config.optimizer); the name is checked by
# `checks.validate_config`, before anything is built.
OPTIMIZERS = {"lars": _lars, "adamw": _adamw}


def make_optimizer(config, steps_per_epoch: int):
    """`OPTIMIZERS[config.optimizer.name]` on the warm-up + cosine schedule of the run."""
    from vicreg_tf import scaled_learning_rate, warmup_cosine

    opt = config.optimizer
    peak = scaled_learning_rate(opt.base_learning_rate, config.training.batch_size)
    total = steps_per_epoch * config.training.epochs
    warmup = min(steps_per_epoch * opt.warmup_epochs, total - 1)
    schedule = warmup_cosine(peak, total_steps=total, warmup_steps=warmup, final_fraction=opt.final_fraction)
    return OPTIMIZERS[opt.name](schedule, opt)


def labelled_batches(dataset, batch_size: int, limit: int = 0):
    """(images, labels) batches for evaluation, no augmentation."""
    import tensorflow as tf

    if limit:
        dataset = dataset.take(limit)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_model(config, total_steps: int = 0):
    """The configured member of the VICReg family (`config.model.method`) on the configured backbone.

    Call inside `strategy.scope()`. `total_steps` (epochs x steps per epoch) sets
    BYOL's EMA schedule; the other methods ignore it.
    """
    from vicreg_tf.methods import METHODS

    method = config.model.method
    if method not in METHODS:
        raise ValueError(f"unknown model.method {method!r}; expected one of {', '.join(METHODS)}")
    return METHODS[method](make_backbone(config), config.model, total_steps)
