"""vicreg-import: the official VICReg weights (PyTorch .pth) as backbone.keras and a TF Serving export.

    curl -LO https://dl.fbaipublicfiles.com/vicreg/resnet50.pth
    vicreg-import --checkpoint=resnet50.pth --arch=resnet50 --out=runs/vicreg_resnet50

writes runs/vicreg_resnet50/backbone.keras (for `vicreg_tf.load_backbone`,
`vicreg-eval --backbone=...`) and runs/vicreg_resnet50/export/<name>/<version>/
with the same signatures as vicreg-export, then prints the two paths. Needs
PyTorch (`pip install "vicreg-tf[torch]"`). Exit status: 0 written, 1 export
failed, 2 bad arguments or a checkpoint that does not fit --arch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Kept in step with vicreg_tf.torch_import.ARCHS (not imported here: that loads TensorFlow).
_ARCHS = ("resnet50", "resnet50x2", "resnet50x4", "resnet101", "resnet200x2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vicreg-import",
        description="Convert an official VICReg PyTorch checkpoint (.pth) into a Keras backbone and a TF Serving "
                    "export.",
    )
    parser.add_argument("--checkpoint", required=True, help="the .pth file (e.g. resnet50.pth from the VICReg repo)")
    parser.add_argument("--arch", default="resnet50", choices=_ARCHS,
                        help="the checkpoint's network (default: resnet50)")
    parser.add_argument("--out", required=True, help="output directory: backbone.keras and export/")
    parser.add_argument("--name", default=None, help="model name in the export (default: the arch)")
    parser.add_argument("--image_size", type=int, default=224, help="the model's input height and width (default: 224)")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write assets.extra/tf_serving_warmup_requests (default: on)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        print(f"vicreg-import: error: --checkpoint {checkpoint} is not a file", file=sys.stderr)
        return 2
    if args.image_size < 32:
        print(f"vicreg-import: error: --image_size must be >= 32, got {args.image_size}", file=sys.stderr)
        return 2
    out = Path(args.out)
    name = args.name or args.arch

    # TensorFlow and torch are imported only once the arguments are known to be good: they take seconds.
    from vicreg_tf._startup import quiet_tensorflow_startup

    with quiet_tensorflow_startup():
        import vicreg_tf  # noqa: F401  first: it decides TensorFlow's oneDNN default

        # isort: split
        import tensorflow  # noqa: F401
    from vicreg_tf.atomic_io import save_keras_file
    from vicreg_tf.serving import export_for_serving
    from vicreg_tf.transfer import from_torch_checkpoint

    try:
        backbone = from_torch_checkpoint(
            checkpoint, args.arch, input_shape=(args.image_size, args.image_size, 3), num_classes=0
        )
    except (ImportError, OSError, ValueError) as e:
        print(f"vicreg-import: error: {e}", file=sys.stderr)
        return 2

    try:
        keras_path = out / "backbone.keras"
        save_keras_file(backbone, keras_path)
        version_dir = export_for_serving(backbone, out / "export", name, warmup=args.warmup)
    except (FileExistsError, ValueError, OSError) as e:
        print(f"vicreg-import: error: {e}", file=sys.stderr)
        return 1
    print(keras_path)
    print(version_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
