"""vicreg-train: pretrain a backbone with VICReg, then save, diagnose and export it.

    vicreg-train --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist \
        [--config.training.epochs=3 ...]

Reads top to bottom: config -> strategy -> data -> model -> callbacks -> fit ->
save -> diagnostics -> export. Rerunning the same command after a crash or a
kill resumes from the last epoch backup in WORKDIR/backup.

WORKDIR afterwards holds: vicreg.keras (the whole model), backbone.keras (for
transfer learning, loads with no custom objects), export/NAME/<version>/ (TF
Serving), log.csv, tensorboard/, loss_terms.png, spectrum.png and
pretrain_summary.json.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from trainers import common



def save_keras_atomically(model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    model.save(tmp)
    os.replace(tmp, path)


def train(config, workdir: str | os.PathLike) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import vicreg_tf
    from vicreg_tf import evaluation, serving, training

    workdir = Path(workdir)
    if config.training.deterministic:
        common.make_deterministic()  # before the first TensorFlow op
    # Everything that can be wrong with the inputs fails here, before any training.
    strategy = common.make_strategy()
    role = common.worker_role(strategy, workdir)
    common.check_workdir(workdir, config, write=role.is_chief)
    images, count = common.load_images(config, config.data.train_split)
    batch_size = config.training.batch_size
    if count < batch_size:
        raise ValueError(f"the training split has {count} images, fewer than one batch of {batch_size}")
    steps = config.training.steps_per_epoch or count // batch_size

    keras.utils.set_random_seed(config.seed)
    if config.training.mixed_precision:
        keras.mixed_precision.set_global_policy(config.training.mixed_precision)

    backup_dir = workdir / "backup"
    start_epoch = training.read_backup_epoch(backup_dir)
    epochs = config.training.epochs
    dataset = None
    if start_epoch < epochs:
        images = images.cache()
        views = common.make_views(config, seed=config.seed)
        dataset = training.distribute_view_pairs(strategy, lambda: training.resumable_view_pairs(
            images, views, batch_size, steps_per_epoch=steps, start_epoch=start_epoch, epochs=epochs,
            seed=config.seed, shuffle_buffer=config.data.shuffle_buffer,
        ), batch_size)

    with strategy.scope():
        model = vicreg_tf.VICReg(
            common.make_backbone(config),
            projector=config.model.projector,
            invariance_weight=config.model.invariance_weight,
            variance_weight=config.model.variance_weight,
            covariance_weight=config.model.covariance_weight,
        )
        model.compile(optimizer=common.make_optimizer(config, steps), jit_compile=config.training.jit_compile)

    labelled = common.has_labels(images)
    eval_batches = None
    callbacks = []
    if labelled:
        eval_images, _ = common.load_images(config, config.data.eval_split)
        train_batches = common.labelled_batches(images, 512, limit=config.eval.knn_max_train)
        eval_batches = common.labelled_batches(eval_images, 512)
        if config.eval.knn_every:
            # First in the list, so the logs it adds reach the CSV log and TensorBoard.
            callbacks.append(evaluation.KNNMonitor(
                train_batches, eval_batches, every=config.eval.knn_every, k=config.eval.knn_k[0]
            ))
    callbacks += [
        vicreg_tf.StopOnNonFiniteLoss(),
        training.AtomicBackupAndRestore(backup_dir, write=role.is_chief),
        keras.callbacks.CSVLogger(str(role.workdir / "log.csv"), append=True),
        keras.callbacks.TensorBoard(str(role.workdir / "tensorboard")),
    ]
    if dataset is not None:
        model.fit(dataset, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, shuffle=False, verbose=2)
    else:  # trained to the end before: take the final backup and redo the outputs
        training.load_backup(model, backup_dir)

    summary = {"experiment": config.experiment, "epochs": epochs, "steps_per_epoch": steps}
    # Every worker saves (the multi-worker guide's rule: saving may run collectives);
    # the chief into WORKDIR, the others into their scratch directories.
    save_keras_atomically(model, role.workdir / "vicreg.keras")
    save_keras_atomically(model.backbone, role.workdir / "backbone.keras")
    if not role.is_chief:
        return summary
    summary["backbone"] = str(workdir / "backbone.keras")

    # Collapse diagnostics on the expander's output for held-out images.
    log_csv = workdir / "log.csv"
    if log_csv.exists():
        evaluation.plot_loss_terms(log_csv, workdir / "loss_terms.png")
    probe = eval_batches or common.labelled_batches(images, 512, limit=2048)
    embeddings = np.concatenate([
        model.projector(model.backbone(x, training=False), training=False).numpy()
        for x, _ in probe.take(8)
    ])
    spectrum = evaluation.singular_values(embeddings)
    evaluation.plot_spectrum(spectrum, workdir / "spectrum.png", title=f"{config.experiment} expander output")
    summary["effective_rank"] = float(evaluation.effective_rank(spectrum))
    summary["embedding_std"] = float(evaluation.embedding_std(embeddings))
    summary["embedding_dim"] = int(embeddings.shape[1])

    if config.export.enabled:
        version_dir = serving.export_for_serving(model.backbone, workdir / "export", config.export.name)
        summary["export"] = str(version_dir)
    common.write_json_line(workdir / "pretrain_summary.json", summary)
    return summary


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None or _CONFIG.value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(common.fail(str(error)))


def _define_flags() -> None:
    # Defined when run as a program, not on import, so that both trainers import into one process.
    global _CONFIG, _WORKDIR
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (path or shipped name)", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and exports")


def main(argv=None):
    _define_flags()
    common.run_app(_main, list(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
