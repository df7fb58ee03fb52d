"""Everything that can be wrong with a setup, checked before the workdir is claimed: each error names the field."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from vicreg_tf.arguments import is_int, is_number, require

from .build import JIT_VALUES, OPTIMIZERS, SOURCES
from .workdirs import _exists, data_location

_POLICIES = ("auto", "", "float32", "float64", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")
VERBOSE_CHOICES = ("auto", "0", "1", "2")
# Keys the shipped configs leave out, with their defaults. The programs add them to every config
# that lacks them (so `--config.data.max_bad_fraction=0.2` works with any config file); for a
# config passed in directly, `setting` gives the default. Not part of the experiment's fingerprint.
PROGRAM_DEFAULTS = {
    "data.max_bad_fraction": 0.5,  # the share of sampled image files that may fail to decode
    "eval.knn_max_eval": 10000,  # evaluation images the kNN monitor classifies (a random sample)
}
# Image files decoded at start-up to tell a folder of images from one of something else.
SAMPLED_FILES = 64


def setting(config, dotted: str):
    """`config`'s value at `dotted`, or its PROGRAM_DEFAULTS value when the config lacks the key."""
    value = config
    for key in dotted.split("."):
        if key not in value:
            return PROGRAM_DEFAULTS[dotted]
        value = value[key]
    return value


def add_program_defaults(config) -> None:
    """Adds the PROGRAM_DEFAULTS keys `config` lacks (a locked config stays locked)."""
    if not hasattr(config, "unlocked"):  # ml_collections' stand-in for a config file that failed to load
        return
    with config.unlocked():
        for dotted, default in PROGRAM_DEFAULTS.items():
            *sections, key = dotted.split(".")
            section = config
            for name in sections:
                section = section[name]
            if key not in section:
                section[key] = default


def prepare_config(config) -> None:
    """What vicreg-train does to a config before anything else: the warm-up fitted to the epochs, then checked."""
    fit_warmup_to_epochs(config)
    validate_config(config)


def fit_warmup_to_epochs(config) -> None:
    """A warm-up longer than the run (image_folder's 5 epochs with --config.training.epochs=1) is shortened, warning."""
    warmup, epochs = config.optimizer.warmup_epochs, config.training.epochs
    if not (is_int(warmup) and is_int(epochs)) or epochs < 1 or warmup <= epochs:
        return  # validate_config names a bad value
    shorter = epochs - 1
    print(f"warning: config.optimizer.warmup_epochs={warmup} is longer than config.training.epochs={epochs}; "
          f"warming up for {shorter} epoch(s) instead (set --config.optimizer.warmup_epochs to choose)",
          file=sys.stderr, flush=True)
    config.optimizer.warmup_epochs = shorter


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
        require(f"config.{dotted}", field(dotted), ok, expected)

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
        "eval.knn_max_train": (count[0], "an int >= 0 (0: the whole training split)"),
        "eval.linear_epochs": positive_int,
        "eval.fine_tune_epochs": count,
    }.items():
        check(dotted, ok, expected)
    check("data.channels", lambda v: v in (1, 3, 4) and is_int(v), "1, 3 or 4")
    check("data.source", lambda v: v in SOURCES, f"one of {list(SOURCES)}")
    check("data.eval_crop_fraction", lambda v: is_number(v) and 0 < v <= 1,
          "a number in (0, 1] (the evaluation's center crop of the resized shorter side)")
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
    if "knn_max_eval" in config.eval:
        check("eval.knn_max_eval", count[0], "an int >= 0 (0: the whole evaluation split)")
    if "max_bad_fraction" in config.data:
        check("data.max_bad_fraction", lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
    check("training.mixed_precision", lambda v: v in _POLICIES, f"one of {list(_POLICIES)}")
    check("training.jit_compile", lambda v: str(v).lower() in JIT_VALUES,
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


def check_images_decode(source, config) -> None:
    """A folder whose files mostly do not decode fails in one line, before the workdir is claimed.

    Decodes SAMPLED_FILES files drawn at random (all of them in a smaller folder),
    not the whole folder. Fails when none decodes, or when more than
    config.data.max_bad_fraction of them do not (training would replace each by a
    gray image). Sources other than folders are not checked.
    """
    if not hasattr(source, "sample_unreadable"):
        return
    limit = setting(config, "data.max_bad_fraction")
    bad, checked = source.sample_unreadable(SAMPLED_FILES, seed=config.seed)
    what = (f"the {checked} image files" if checked == source.count
            else f"{checked} image files sampled from the {source.count}")
    where = f"under {str(source.root)!r} (config.data.path)"
    if bad == checked:
        raise ValueError(f"none of {what} {where} decodes as an image: are they images?")
    if bad > limit * checked:
        raise ValueError(f"{bad} of {what} {where} do not decode ({bad / checked:.0%}), more than "
                         f"config.data.max_bad_fraction={limit}: fix or remove them, or raise "
                         "--config.data.max_bad_fraction")


def check_keras_file(path) -> Path:
    """A `.keras` file that exists and is a complete zip archive, or a one-line error naming it. No TensorFlow.

    Keras reports a truncated file as "File not found"; this says what is wrong.
    """
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


def check_backbone_name(config) -> None:
    from vicreg_tf import backbones

    if config.model.backbone not in backbones.BACKBONES:
        raise ValueError(
            f"config.model.backbone must be one of {sorted(backbones.BACKBONES)}, got {config.model.backbone!r}"
        )


def check_backup_loads(model, workdir: Path) -> None:
    """A backup with no experiment.json next to it must load into `model`, or the workdir is refused."""
    from vicreg_tf import run_state

    backup_dir = os.path.join(workdir, "backup")
    if _exists(os.path.join(workdir, "experiment.json")) or not _exists(os.path.join(backup_dir, "backup.json")):
        return
    try:
        # Keras loads some mismatches with a warning only ("Skipping variable loading ...").
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_state.load_backup(model, backup_dir)
        skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as error:  # Keras raises assorted types for a mismatched weights file
        reason = _clipped(" ".join(str(error).split()), 200)
        raise ValueError(
            f"--workdir={workdir} holds another model's backup ({backup_dir}), which does not load "
            f"into this config's model ({type(error).__name__}: {reason}). Use a new --workdir."
        ) from None


def _clipped(text: str, limit: int) -> str:
    """`text`, or its words up to `limit` characters followed by "...": never a word cut in two."""
    if len(text) <= limit:
        return text
    end = text.rfind(" ", 0, limit + 1)
    return text[: end if end > 0 else limit].rstrip(" ,;:") + " ..."


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


def diverged_message(error: BaseException, workdir: Path, config) -> str | None:
    """One line (plus a hint) for a run stopped by a non-finite step; None for other errors."""
    import tensorflow as tf

    from vicreg_tf import guard, run_state

    if isinstance(error, tf.errors.InvalidArgumentError):
        if guard.NON_FINITE_STEP_MESSAGE.split(":")[0] not in str(error):
            return None
    elif not isinstance(error, FloatingPointError):
        return None
    epoch = run_state.read_backup_epoch(os.path.join(workdir, "backup"))
    last = (f"the last good backup is epoch {epoch} in {os.path.join(workdir, 'backup')}" if epoch
            else "no epoch finished, so there is no backup")
    return (
        f"training diverged in epoch {epoch + 1}: a step's loss or gradients were not finite (NaN or Inf); "
        f"the step was not applied and nothing was saved or exported; {last}.\n"
        f"hint: start a new --workdir with a lower --config.optimizer.base_learning_rate "
        f"(now {config.optimizer.base_learning_rate}), or check the images for NaN/Inf"
    )

