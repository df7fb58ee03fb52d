"""vicreg-export: write a backbone in TF Serving's layout.

    vicreg-export --backbone=runs/fmnist/backbone.keras --base=/srv/models --name=fmnist

writes /srv/models/fmnist/<next version>/ (saved_model.pb, variables/,
assets.extra/tf_serving_warmup_requests) and /srv/models/models.config, and
prints the version directory. Serve it with

    docker run -p 8500:8500 -p 8501:8501 -v /srv/models:/models tensorflow/serving \\
        --model_config_file=/models/models.config --enable_model_warmup=true

after exporting with --config_base_path=/models (the path the container sees).
When the newest version under --base/--name already holds the same weights (the
digest each export records), nothing is written and that version is printed.
See docs/SERVING.md. Exit status: 0 written, 1 export failed (e.g. the version
exists), 2 bad arguments (e.g. no backbone file).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vicreg-export",
        description="Export a VICReg backbone (.keras) as a TF Serving SavedModel.",
    )
    parser.add_argument("--backbone", required=True, help="the backbone .keras file (or a whole VICReg .keras)")
    parser.add_argument("--base", required=True, help="TF Serving's model base directory")
    parser.add_argument("--name", required=True, help="model name: the directory under --base")
    parser.add_argument("--version", type=int, default=None, help="version number (default: the next free one)")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write assets.extra/tf_serving_warmup_requests (default: on)",
    )
    parser.add_argument(
        "--projection",
        action="store_true",
        help="add the serve_projection signature (needs a whole VICReg .keras with its expander)",
    )
    parser.add_argument(
        "--config_base_path",
        default=None,
        help="--base as the server sees it, for models.config (default: its absolute path here; "
        "/models for the tensorflow/serving container)",
    )
    parser.add_argument(
        "--no_config", action="store_true", help="do not write/update BASE/models.config"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    backbone_path = Path(args.backbone)
    if not backbone_path.is_file():
        print(f"vicreg-export: error: --backbone {backbone_path} is not a file", file=sys.stderr)
        return 2
    if args.version is not None and args.version < 0:
        print(f"vicreg-export: error: --version must be >= 0, got {args.version}", file=sys.stderr)
        return 2
    if args.version is not None:
        # Checked again (atomically) by export_for_serving; this answers before the slow imports.
        existing = Path(args.base) / args.name / str(args.version)
        if existing.exists():
            print(
                f"vicreg-export: error: {existing} already exists; versions are never overwritten. "
                "Omit --version to use the next free one.",
                file=sys.stderr,
            )
            return 1

    from vicreg_tf._startup import quiet_tensorflow_startup
    from vicreg_tf.trainers.checks import check_keras_file

    try:
        check_keras_file(backbone_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"vicreg-export: error: {e}", file=sys.stderr)
        return 2
    # TensorFlow is imported only once the arguments are known to be good: it takes seconds.
    with quiet_tensorflow_startup():
        import vicreg_tf  # noqa: F401  first: it decides TensorFlow's oneDNN default

        # isort: split
        import keras
        import tensorflow as tf

        tf.config.list_physical_devices()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # the SavedModel writer's INFO lines

    from vicreg_tf.serving import export_for_serving, latest_export_with_weights, weights_digest
    from vicreg_tf.transfer import load_backbone

    try:
        backbone = load_backbone(backbone_path, trainable=False)
        projector = None
        if args.projection:
            model = keras.saving.load_model(backbone_path, compile=False)
            projector = getattr(model, "projector", None)
            if projector is None:
                raise ValueError(
                    f"--projection needs a whole VICReg model with an expander; {backbone_path} "
                    "holds only a backbone"
                )
    except (OSError, ValueError, TypeError) as e:
        print(f"vicreg-export: error: {e}", file=sys.stderr)
        return 2

    if args.version is None:
        # An identical new version would only make a TF Serving watching --base reload for nothing.
        newest = latest_export_with_weights(Path(args.base) / args.name, weights_digest(backbone, projector))
        if newest is not None:
            print(f"vicreg-export: {newest} already holds these weights; no new version written", file=sys.stderr)
            print(newest)
            return 0
    try:
        version_dir = export_for_serving(
            backbone,
            args.base,
            args.name,
            version=args.version,
            projector=projector,
            warmup=args.warmup,
            write_config=not args.no_config,
            config_base_path=args.config_base_path,
        )
    except (FileExistsError, ValueError, OSError) as e:
        print(f"vicreg-export: error: {e}", file=sys.stderr)
        return 1
    print(version_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
