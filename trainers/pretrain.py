"""vicreg-train: pretrain a backbone with VICReg, then save, diagnose and export it.

    vicreg-train --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist \\
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
    # Everything that can be wrong with the setup fails here, before the workdir is
    # claimed (experiment.json written) and before any training.
    common.validate_config(config)
    common.check_backbone_name(config)
    common.check_data_exists(config)
    common.check_workdir(workdir, config, write=False)  # another experiment's checkpoints
    if config.training.deterministic:
        common.make_deterministic()  # before the first TensorFlow op
    strategy = common.make_strategy()
    common.make_views(config, seed=config.seed)  # an unknown views.preset fails here
    source = common.load_source(config, config.data.train_split)
    count = source.count
    batch_size = config.training.batch_size
    if count < batch_size:
        raise ValueError(
            f"the training split has {count} images, fewer than one batch of "
            f"config.training.batch_size={batch_size}"
        )
    steps = config.training.steps_per_epoch or count // batch_size

    keras.utils.set_random_seed(config.seed)
    if config.training.mixed_precision:
        keras.mixed_precision.set_global_policy(config.training.mixed_precision)

    backup_dir = workdir / "backup"
    start_epoch = training.read_backup_epoch(backup_dir)
    epochs = config.training.epochs
    views = common.make_views(config, seed=config.seed)
    on_device = common.views_on_device(config, strategy)
    dataset = None
    if start_epoch < epochs:
        # Streams: each worker reads, decodes and crops only its rows of each global batch.
        dataset = training.distribute_view_pairs(strategy, lambda row_start, row_count: training.view_pair_batches(
            source, views, batch_size, steps_per_epoch=steps, start_epoch=start_epoch, epochs=epochs,
            seed=config.seed, shuffle_buffer=config.data.shuffle_buffer, row_start=row_start,
            row_count=row_count, device_views=on_device,
        ), batch_size)

    with strategy.scope():
        model = common.make_model(config, total_steps=steps * config.training.epochs)  # config.model.method
        model.compile(optimizer=common.make_optimizer(config, steps), jit_compile=config.training.jit_compile)
    if on_device:  # the views' second stage (flip, color, blur, solarize) inside the train step
        if config.training.jit_compile:
            raise ValueError("config.views.on_device needs config.training.jit_compile=False "
                             "(the view ops have data-dependent shapes)")
        with strategy.scope():
            model.device_views = common.make_views(config, seed=config.seed)

    # The setup is good: claim the workdir (a backup without a record must fit this model).
    role = common.worker_role(strategy, workdir)
    common.check_backup_loads(model, workdir)
    common.check_workdir(workdir, config, write=role.is_chief)

    eval_batch = common.eval_batch_size(config)
    eval_batches = None
    callbacks = [training.UnreadableImagesReport()]
    if source.labelled:
        eval_source = common.load_source(config, config.data.eval_split)
        size = config.data.image_size
        train_batches = common.labelled_batches(source.images(size), eval_batch, limit=config.eval.knn_max_train)
        eval_batches = common.labelled_batches(eval_source.images(size), eval_batch)
        if config.eval.knn_every:
            # First in the list, so the logs it adds reach the CSV log and TensorBoard.
            callbacks.insert(0, evaluation.KNNMonitor(
                train_batches, eval_batches, every=config.eval.knn_every, k=config.eval.knn_k[0]
            ))
    callbacks += [
        vicreg_tf.StopOnNonFiniteLoss(),
        training.AtomicBackupAndRestore(backup_dir, write=role.is_chief),
        # Columns fixed up front: the kNN accuracy is only logged on the epochs it is measured.
        evaluation.CSVLogger(str(role.workdir / "log.csv"), append=True, columns=[
            "val_knn_top1"] if any(isinstance(c, evaluation.KNNMonitor) for c in callbacks) else []),
        evaluation.StepLogger(role.workdir / evaluation.StepLogger.FILENAME, every=max(1, steps // 50),
                              write=role.is_chief),
        keras.callbacks.TensorBoard(str(role.workdir / "tensorboard")),
    ]
    if dataset is not None:
        model.fit(dataset, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, shuffle=False,
                  verbose=common.resolve_verbose(config.training.get("verbose", "auto")))
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
    probe = eval_batches or common.labelled_batches(source.images(config.data.image_size), eval_batch)
    embeddings = np.concatenate([
        model.projector(model.backbone(x, training=False), training=False).numpy()
        for x, _ in probe.take(max(1, 4096 // eval_batch))
    ])
    spectrum = evaluation.singular_values(embeddings)
    evaluation.plot_spectrum(spectrum, workdir / "spectrum.png", title=f"{config.experiment} expander output")
    summary["effective_rank"] = float(evaluation.effective_rank(spectrum))
    summary["embedding_std"] = float(evaluation.embedding_std(embeddings))
    summary["embedding_dim"] = int(embeddings.shape[1])

    if config.export.enabled:
        model_dir = workdir / "export" / config.export.name
        # A rerun of a finished run must not hand TF Serving an identical new version to reload.
        version_dir = serving.latest_export_with_weights(model_dir, serving.weights_digest(model.backbone, None))
        if version_dir is not None:
            print(f"export: {version_dir} already holds these weights; no new version written", flush=True)
        else:
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
    except Exception as error:  # a diverging run: one line, not TensorFlow's traceback
        message = common.diverged_message(error, Path(_WORKDIR.value), _CONFIG.value)
        if message is None:
            raise
        sys.exit(common.fail(message))


def _define_flags() -> None:
    # Defined when run as a program, not on import, so that both trainers import into one process.
    global _CONFIG, _WORKDIR
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (path or shipped name)", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and exports")


def main(argv=None):
    _define_flags()
    common.run_app(_main, list(sys.argv if argv is None else argv), __doc__, ("config", "workdir"))


if __name__ == "__main__":
    main()
