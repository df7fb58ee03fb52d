"""vicreg-eval: the standard protocols on a frozen pretrained backbone.

    vicreg-eval --backbone=runs/fashion_mnist/backbone.keras --config=configs/fashion_mnist.py \\
        [--workdir=DIR] [--random_init]

Linear probe (top-1) and weighted kNN (cosine, k from config.eval.knn_k) on
features of the labelled train split, scored on config.data.eval_split; with
config.eval.fine_tune_epochs > 0 also end-to-end fine-tuning, and for each of
config.eval.label_fractions the semi-supervised protocol (a class-balanced
subset of the labels). Prints one JSON line and writes it to
WORKDIR/eval.json (WORKDIR defaults to the backbone's directory).
`--random_init` evaluates the same architecture with fresh random weights:
the baseline a pretrained backbone must beat.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags

from . import build, checks, cli, workdirs


def evaluate(config, backbone_path: str | None, workdir: str | None = None, random_init: bool = False) -> dict:
    import keras
    import numpy as np

    from vicreg_tf import evaluation, transfer

    checks.validate_config(config)
    keras.utils.set_random_seed(config.seed)
    if random_init:
        checks.check_backbone_name(config)
        backbone = build.make_backbone(config)
    else:
        backbone = transfer.load_backbone(checks.check_keras_file(backbone_path))
        checks.check_backbone_input(backbone, config, backbone_path)
    # Checked before out_dir exists: a failure leaves no empty directory behind.
    checks.check_data_exists(config)
    # Folders: the features are fit on the training files and scored on the held-out ones
    # (data.eval_split / data.eval_path), never on the images trained on; the record says which.
    train_source = build.load_source(config, config.data.train_split)
    test_source = build.load_source(config, config.data.eval_split)
    if not train_source.labelled:
        raise ValueError(f"{config.data.source} data has no labels: vicreg-eval needs a labelled split")
    for source in (train_source, test_source):
        checks.check_images_decode(source, config)
    out_dir = Path(workdir or Path(backbone_path).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_images = train_source.images(config.data.image_size, config.data.eval_crop_fraction)
    test_images = test_source.images(config.data.image_size, config.data.eval_crop_fraction)
    batch = build.eval_batch_size(config)

    start = time.time()
    train_x, train_y = evaluation.extract_features(backbone, build.labelled_batches(train_images, batch))
    test_x, test_y = evaluation.extract_features(backbone, build.labelled_batches(test_images, batch))
    record = {
        "backbone": "random_init" if random_init else str(backbone_path),
        "experiment": config.experiment,
        "train_images": int(len(train_y)),
        "test_images": int(len(test_y)),
        "train_data": train_source.describe(),
        "test_data": test_source.describe(),
        "feature_dim": int(train_x.shape[1]),
    }
    for k in config.eval.knn_k:
        record[f"knn{k}_top1"] = evaluation.knn_accuracy(train_x, train_y, test_x, test_y, k=k)
    record["linear_top1"] = evaluation.linear_probe(
        train_x, train_y, test_x, test_y, epochs=config.eval.linear_epochs, seed=config.seed
    )["top1"]
    for fraction in config.eval.label_fractions:
        subset = evaluation.label_subset(train_y, fraction, seed=config.seed)
        record[f"linear_{fraction:g}_labels_top1"] = evaluation.linear_probe(
            train_x[subset], train_y[subset], test_x, test_y, epochs=config.eval.linear_epochs, seed=config.seed
        )["top1"]
    if config.eval.fine_tune_epochs:
        num_classes = int(np.max(train_y)) + 1
        record["fine_tune_top1"] = evaluation.fine_tune(
            backbone, build.labelled_batches(train_images.shuffle(10000, seed=config.seed), 256),
            build.labelled_batches(test_images, batch), num_classes=num_classes,
            epochs=config.eval.fine_tune_epochs,
        )["top1"]
    record["seconds"] = round(time.time() - start, 1)
    name = "eval_random_init.json" if random_init else "eval.json"
    return workdirs.write_json_line(out_dir / name, record)


def _check(argv):
    """The arguments and the config, before TensorFlow loads."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or (_BACKBONE.value is None and not _RANDOM_INIT.value):
        raise app.UsageError("--config and --backbone (or --random_init) are required")
    checks.validate_config(_CONFIG.value)
    if not _RANDOM_INIT.value:
        checks.check_keras_file(_BACKBONE.value)


def _main(argv):
    try:
        evaluate(_CONFIG.value, _BACKBONE.value, _WORKDIR.value, _RANDOM_INIT.value)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(cli.fail(str(error)))


def _define_flags() -> None:
    # Defined when run as a program, not on import, so that both trainers import into one process.
    global _CONFIG, _BACKBONE, _WORKDIR, _RANDOM_INIT
    _CONFIG = cli.define_config_flag()
    _BACKBONE = flags.DEFINE_string("backbone", None, "a backbone .keras file written by vicreg-train")
    _WORKDIR = flags.DEFINE_string("workdir", None, "where eval.json goes (default: the backbone's directory)")
    _RANDOM_INIT = flags.DEFINE_bool("random_init", False, "evaluate the architecture with random weights")


def main(argv=None):
    _define_flags()
    cli.run_app(_main, list(sys.argv if argv is None else argv), __doc__,
                ("config", "backbone", "workdir", "random_init"), check=_check)


if __name__ == "__main__":
    main()
