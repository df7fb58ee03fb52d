"""vicreg-train: pretrain a backbone with VICReg, then save, diagnose and export it.

    vicreg-train --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist \\
        [--config.training.epochs=3 ...]

Reads top to bottom: config -> strategy -> data -> model -> callbacks -> fit ->
save -> diagnostics -> export. Rerunning the same command after a crash or a
kill resumes from the last epoch backup in WORKDIR/backup; after a SIGTERM
(preemption) from the step it stopped at. WORKDIR may be any TensorFlow file
system path (gs://bucket/run); the TF Serving export then needs a local one.

WORKDIR afterwards holds: vicreg.keras (the whole model), backbone.keras (for
transfer learning, loads with no custom objects), export/NAME/<version>/ (TF
Serving), log.csv, tensorboard/, loss_terms.png, spectrum.png and
pretrain_summary.json.
"""
from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags

from . import build, checks, cli, cluster, workdirs

PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM, what schedulers expect of a process they terminated


def train(config, workdir: str | os.PathLike) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import vicreg_tf
    from vicreg_tf import compat, data, evaluation, run_state, serving
    from vicreg_tf.atomic_io import is_remote, save_keras_file

    workdir = os.fspath(workdir)  # a local path or any tf.io.gfile one (gs://...)
    # Everything that can be wrong with the setup fails here, before the workdir is
    # claimed (experiment.json written) and before any training.
    checks.prepare_config(config)  # a warm-up longer than the run is shortened, with a warning
    checks.check_backbone_name(config)
    checks.check_data_exists(config)
    workdirs.check_workdir(workdir, config, write=False)  # another experiment's checkpoints
    if is_remote(workdir) and config.export.enabled:
        raise ValueError(f"--workdir={workdir} is not a local path; the TF Serving export writes to a local "
                         "(or mounted) one: add --config.export.enabled=False and export backbone.keras later")
    if config.training.deterministic:
        build.make_deterministic()  # before the first TensorFlow op
    strategy = build.make_strategy()
    views = build.make_views(config, seed=config.seed)  # an unknown views.preset fails here
    source = build.load_source(config, config.data.train_split)
    source.check_workers(compat.input_pipelines(strategy))  # record files: at least one per worker
    checks.check_images_decode(source, config)  # a folder of non-images: a sample of the files, decoded
    count = source.count
    batch_size = config.training.batch_size
    if count < batch_size:
        raise ValueError(
            f"the training split has {count} images, fewer than one batch of "
            f"config.training.batch_size={batch_size}"
        )
    steps = config.training.steps_per_epoch or count // batch_size

    keras.utils.set_random_seed(config.seed)
    precision = build.resolve_mixed_precision(config, strategy)  # "auto": bfloat16 where it is native
    build.check_precision(precision, strategy)
    jit_compile = build.resolve_jit_compile(config, strategy)  # "auto": XLA on one GPU only
    on_device = build.views_on_device(config, strategy)
    if precision:
        keras.mixed_precision.set_global_policy(precision)
    print(build.describe_setup(config, strategy, precision, jit_compile, on_device), flush=True)

    backup_dir = os.path.join(workdir, "backup")
    # Epochs done, and steps done of the next one (a run stopped by SIGTERM backs up mid-epoch).
    start_epoch, start_step = run_state.read_backup_position(backup_dir)
    epochs = config.training.epochs

    def make_dataset(first_epoch, first_step=0):
        # Streams: each worker reads, decodes and crops only its rows of each global batch.
        return data.distribute_view_pairs(strategy, lambda row_start, row_count: data.view_pair_batches(
            source, views, batch_size, steps_per_epoch=steps, start_epoch=first_epoch, start_step=first_step,
            epochs=epochs, seed=config.seed, shuffle_buffer=config.data.shuffle_buffer, row_start=row_start,
            row_count=row_count, device_views=on_device,
        ), batch_size)

    with strategy.scope():
        model = build.make_model(config, total_steps=steps * config.training.epochs)  # config.model.method
        model.compile(optimizer=build.make_optimizer(config, steps), jit_compile=jit_compile)
    if on_device:  # the views' second stage (flip, color, blur, solarize) inside the train step
        with strategy.scope():
            model.device_views = build.make_views(config, seed=config.seed)

    # The setup is good: claim the workdir (a backup without a record must fit this model).
    role = cluster.worker_role(strategy, workdir)
    checks.check_backup_loads(model, workdir)
    workdirs.check_workdir(workdir, config, write=role.is_chief)

    join = os.path.join
    eval_batch = build.eval_batch_size(config)
    eval_batches = None
    callbacks = [data.UnreadableImagesReport()]
    if source.labelled:
        eval_source = build.load_source(config, config.data.eval_split)
        geometry = (config.data.image_size, config.data.eval_crop_fraction)
        # Random samples (fixed by the seed), never the first files of a class-sorted folder.
        train_batches = build.labelled_batches(
            source.sample(config.eval.knn_max_train, config.seed).images(*geometry), eval_batch)
        eval_batches = build.labelled_batches(
            eval_source.sample(checks.setting(config, "eval.knn_max_eval"), config.seed).images(*geometry), eval_batch)
        if config.eval.knn_every and role.is_chief:  # the chief reports for the cluster
            # First in the list, so the logs it adds reach the CSV log and TensorBoard.
            callbacks.insert(0, evaluation.KNNMonitor(
                train_batches, eval_batches, every=config.eval.knn_every, k=config.eval.knn_k[0]
            ))
    # Backs up every epoch, and at the step boundary after a SIGTERM (then raises run_state.Preempted);
    # in a cluster every worker stops at the same step (TensorFlow's PreemptionCheckpointHandler).
    backup = run_state.AtomicBackupAndRestore(backup_dir, write=role.is_chief, first_step=start_step,
                                              cluster_resolver=cluster.preemption_resolver(strategy))
    callbacks += [
        vicreg_tf.StopOnNonFiniteLoss(),
        # Columns fixed up front: the kNN accuracy is only logged on the epochs it is measured.
        evaluation.CSVLogger(join(role.workdir, "log.csv"), append=True, columns=[
            "val_knn_top1"] if any(isinstance(c, evaluation.KNNMonitor) for c in callbacks) else []),
        evaluation.StepLogger(join(role.workdir, evaluation.StepLogger.FILENAME), every=max(1, steps // 50),
                              write=role.is_chief),
        keras.callbacks.TensorBoard(join(role.workdir, "tensorboard")),
        backup,  # last: the step it stops at after a SIGTERM has been logged by the others
    ]
    verbose = build.resolve_verbose(config.training.get("verbose", "auto"))
    fit = dict(callbacks=callbacks, shuffle=False, verbose=verbose)
    if start_epoch < epochs and start_step:
        # Stopped mid-epoch: finish that epoch from its next step (the learning rate follows
        # optimizer.iterations, restored with the backup), then the remaining epochs.
        model.fit(make_dataset(start_epoch, start_step), initial_epoch=start_epoch, epochs=start_epoch + 1,
                  steps_per_epoch=steps - start_step, **fit)
        start_epoch, backup.first_step, backup.restore_on_begin = start_epoch + 1, 0, False
        model._initial_epoch = None  # set by the backup's restore; the next fit starts at start_epoch
    if start_epoch < epochs:
        model.fit(make_dataset(start_epoch), initial_epoch=start_epoch, epochs=epochs, steps_per_epoch=steps, **fit)
    else:  # trained to the end before: take the final backup and redo the outputs
        run_state.load_backup(model, backup_dir)

    summary = {"experiment": config.experiment, "epochs": epochs, "steps_per_epoch": steps}
    # Every worker saves (the multi-worker guide's rule: saving may run collectives);
    # the chief into WORKDIR, the others into their scratch directories.
    save_keras_file(model, join(role.workdir, "vicreg.keras"))
    save_keras_file(model.backbone, join(role.workdir, "backbone.keras"))
    if not role.is_chief:
        return summary
    summary["backbone"] = join(workdir, "backbone.keras")

    # Collapse diagnostics on the expander's output for held-out images (plotted locally,
    # then copied, for a workdir on another file system).
    plots = tempfile.mkdtemp(prefix="vicreg-plots-") if is_remote(workdir) else workdir
    for name in ("log.csv", evaluation.StepLogger.FILENAME):
        if plots != workdir and tf.io.gfile.exists(join(workdir, name)):
            tf.io.gfile.copy(join(workdir, name), join(plots, name), overwrite=True)
    if os.path.exists(join(plots, "log.csv")):
        evaluation.plot_loss_terms(join(plots, "log.csv"), join(plots, "loss_terms.png"))
    probe = eval_batches or build.labelled_batches(  # held-out images; unlabelled: a sample of the training ones
        source.sample(4096, config.seed).images(config.data.image_size, config.data.eval_crop_fraction), eval_batch)
    embeddings = np.concatenate([
        model.projector(model.backbone(x, training=False), training=False).numpy()
        for x, _ in probe.take(max(1, 4096 // eval_batch))
    ])
    spectrum = evaluation.singular_values(embeddings)
    evaluation.plot_spectrum(spectrum, join(plots, "spectrum.png"), title=f"{config.experiment} expander output")
    if plots != workdir:
        for name in ("loss_terms.png", "spectrum.png"):
            if os.path.exists(join(plots, name)):
                tf.io.gfile.copy(join(plots, name), join(workdir, name), overwrite=True)
    summary["effective_rank"] = float(evaluation.effective_rank(spectrum))
    summary["embedding_std"] = float(evaluation.embedding_std(embeddings))
    summary["embedding_dim"] = int(embeddings.shape[1])

    if config.export.enabled:
        model_dir = join(workdir, "export", config.export.name)
        # A rerun of a finished run must not hand TF Serving an identical new version to reload.
        version_dir = serving.latest_export_with_weights(model_dir, serving.weights_digest(model.backbone, None))
        if version_dir is not None:
            print(f"export: {version_dir} already holds these weights; no new version written", flush=True)
        else:
            version_dir = serving.export_for_serving(model.backbone, join(workdir, "export"), config.export.name)
        summary["export"] = str(version_dir)
    return workdirs.write_json_line(join(workdir, "pretrain_summary.json"), summary)


def _check(argv):
    """The arguments and the config, before TensorFlow loads."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None or _CONFIG.value is None:
        raise app.UsageError("--config and --workdir are required")
    checks.prepare_config(_CONFIG.value)


def _main(argv):
    from vicreg_tf import run_state

    if not cluster.is_chief_process():
        sys.stdout = open(os.devnull, "w")  # the chief reports for the cluster; errors still go to stderr

    try:
        train(_CONFIG.value, _WORKDIR.value)
    except run_state.Preempted as stop:
        print(f"preempted: {stop}; rerun the same command to continue", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_STATUS)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(cli.fail(str(error)))
    except Exception as error:  # a diverging run: one line, not TensorFlow's traceback
        message = checks.diverged_message(error, _WORKDIR.value, _CONFIG.value)
        if message is None:
            raise
        sys.exit(cli.fail(message))


def _define_flags() -> None:
    # Defined when run as a program, not on import, so that both trainers import into one process.
    global _CONFIG, _WORKDIR
    _CONFIG = cli.define_config_flag()
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and exports")


def main(argv=None):
    _define_flags()
    cli.run_app(_main, list(sys.argv if argv is None else argv), __doc__, ("config", "workdir"), check=_check)


if __name__ == "__main__":
    main()
