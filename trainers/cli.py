"""Command-line handling shared by vicreg-train and vicreg-eval: config names, --help, one-line errors, quiet
start-up."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from vicreg_tf._startup import quiet_tensorflow_startup

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


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


HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")

# TensorFlow's start-up notices: printed once per native library that loads (twice in
# TF 2.21), before TF_CPP_MIN_LOG_LEVEL is read, and on every CPU-only machine.
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


def define_config_flag():
    """`--config`: a config file or shipped name, locked, with checks.PROGRAM_DEFAULTS added where it lacks them."""
    from absl import flags
    from ml_collections import config_flags

    from .checks import add_program_defaults

    holder = config_flags.DEFINE_config_file("config", None, "experiment config (path or shipped name)",
                                             lock_config=True)
    parser = flags.FLAGS["config"].parser
    load = parser.parse

    def parse(path):
        config = load(path)
        add_program_defaults(config)  # before the --config.KEY overrides are matched to keys
        return config

    parser.parse = parse
    return holder


def run_app(main_fn, argv: list[str], doc: str = "", flag_names: tuple = (), check=None) -> None:
    """absl's app.run, with config errors (an unknown key, a bad value) as one clear line.

    `--help` prints `doc` and the flags `flag_names` and exits 0. The flags and the
    config are parsed, and `check(argv)` (the program's own argument and config
    checks; a ValueError or FileNotFoundError is one error line) runs, before
    TensorFlow loads: a mistake on the command line is answered in a fraction of a
    second, not after TensorFlow's start-up. TensorFlow is then loaded with its
    start-up notices hidden; absl's Python INFO lines are off unless `--verbosity` is given.
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

    def checked_then_main(args):
        if check is not None:
            try:
                check(args)
            except (ValueError, FileNotFoundError) as error:
                sys.exit(fail(str(error)))
        with quiet_tensorflow_startup():
            import vicreg_tf  # noqa: F401  first: it decides TensorFlow's oneDNN default

            # isort: split
            import tensorflow as tf

            tf.config.list_physical_devices()  # where CUDA is probed (and complains on CPU-only machines)
        return main_fn(args)

    app.run(checked_then_main, argv=argv, flags_parser=parse)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
