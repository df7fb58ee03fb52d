"""The main job: configs, vicreg-train and vicreg-eval, end to end on the tiny config."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO, run_python

import vicreg_tf  # noqa: F401  (registers VICReg for keras.saving.load_model)
from trainers import build, checks, cli, workdirs

SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")

# Fast, deterministic settings for runs whose weights are compared.
FAST = [
    "--config.export.enabled=False",
    "--config.eval.knn_every=0",
    "--config.eval.knn_max_eval=256",  # the summary's spectrum from 256 held-out images, not 4096
    "--config.training.deterministic=True",
]
# The killed and the SIGTERM runs: 3 epochs of 16 steps (two passes over tiny's 512 images each).
RESUMABLE = ["--config.training.epochs=3", "--config.training.steps_per_epoch=16"]


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config()


def _weights(path):
    return keras.saving.load_model(path, compile=False).get_weights()


def test_every_shipped_config_loads_locked_and_documents_its_command():
    assert {"fashion_mnist", "cifar10_resnet18", "imagenet_resnet50", "image_folder", "tiny"} <= set(SHIPPED)
    for name in SHIPPED:
        module = importlib.import_module(f"configs.{name}")
        assert "vicreg-train" in module.__doc__, name
        config = module.get_config()
        with pytest.raises(AttributeError):
            config.training.epoch = 3  # a typo of an existing key


def test_imagenet_config_is_the_papers_recipe():
    config = _config("imagenet_resnet50")
    assert config.model.backbone == "resnet50_torchvision"  # v1.5, as the official weights (issue 21)
    assert config.model.projector == "8192-8192-8192"
    assert (config.optimizer.name, config.optimizer.base_learning_rate) == ("lars", 0.2)
    assert config.optimizer.weight_decay == 1e-6
    assert (config.training.batch_size, config.training.epochs) == (2048, 1000)
    assert (config.optimizer.warmup_epochs, config.optimizer.final_fraction) == (10, 0.001)
    assert (config.model.invariance_weight, config.model.variance_weight, config.model.covariance_weight) == (25, 25, 1)


def test_config_by_name_and_unknown_name():
    assert cli.resolve_config_path("tiny").endswith("configs/tiny.py")
    with pytest.raises(FileNotFoundError, match="fashion_mnist"):
        cli.resolve_config_path("no_such_experiment")


def test_unknown_override_key_is_an_error_naming_it(tmp_path):
    result = run_python(
        ["-m", "trainers.pretrain", "--config=tiny", f"--workdir={tmp_path}", "--config.training.epoch=3"],
        timeout=120,
    )
    assert result.returncode != 0
    assert "epoch" in result.stderr and "training" in result.stderr
    assert not (tmp_path / "backup").exists()


def test_workdir_of_another_experiment_is_refused(tmp_path):
    config = _config("tiny")
    workdirs.check_workdir(tmp_path, config)
    workdirs.check_workdir(tmp_path, config)  # the same experiment resumes
    _fake_checkpoint(tmp_path)  # refused only once the workdir holds checkpoints
    other = _config("tiny")
    other.unlock()
    other.training.batch_size = 32
    with pytest.raises(ValueError, match="training.batch_size: workdir has 64, config has 32"):
        workdirs.check_workdir(tmp_path, other)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    config = _config("tiny")
    config.data.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build.load_source(config, "train")


def test_tiny_run_trains_evaluates_and_exports(tmp_path):
    from trainers import linear_eval, pretrain

    config = _config("tiny")
    summary = pretrain.train(config, tmp_path)
    for name in ("vicreg.keras", "backbone.keras", "log.csv", "loss_terms.png", "spectrum.png",
                 "pretrain_summary.json", "export/vicreg/1/saved_model.pb", "backup/backup.json"):
        assert (tmp_path / name).exists(), name
    assert summary["epochs"] == 2 and summary["steps_per_epoch"] == 512 // 64
    assert 1.0 <= summary["effective_rank"] <= 32
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert len(log) == 3 and "val_knn_top1" in log[0] and "variance" in log[0]

    record = linear_eval.evaluate(_config("tiny"), str(tmp_path / "backbone.keras"))
    assert record == json.loads((tmp_path / "eval.json").read_text())
    assert record["test_images"] == 10000 and record["train_images"] == 512
    for key in ("knn5_top1", "linear_top1"):
        assert 0.1 < record[key] <= 1.0, (key, record)

    steps = (tmp_path / "steps.csv").read_text().splitlines()
    assert steps[0].startswith("step,epoch,") and len(steps) == 1 + 16  # every step of 2 x 8

    # Rerunning a finished run redoes the outputs from the final backup, without training,
    # and exports no identical new version (TF Serving would reload it).
    again = pretrain.train(_config("tiny"), tmp_path)
    assert again["effective_rank"] == pytest.approx(summary["effective_rank"], rel=1e-4)
    assert again["export"] == summary["export"]
    assert sorted(p.name for p in (tmp_path / "export/vicreg").iterdir()) == ["1"]


def _train_cmd(workdir, *extra):
    return [sys.executable, "-m", "trainers.pretrain", "--config=tiny", f"--workdir={workdir}", *FAST, *extra]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")


def _backup_epoch(workdir):
    record = Path(workdir) / "backup" / "backup.json"
    try:
        return json.loads(record.read_text())["epoch"]
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted RESUMABLE run, which the killed and the SIGTERM runs must end equal to."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_train_cmd(workdir, *RESUMABLE), env=_env(), cwd=REPO, check=True, timeout=300,
                   capture_output=True)
    return workdir


@pytest.mark.large
def test_killed_run_resumes_to_the_same_weights(tmp_path, straight_run):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, *RESUMABLE), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _backup_epoch(killed) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stopped_at = _backup_epoch(killed)
    assert 1 <= stopped_at < 3 and not (killed / "backbone.keras").exists(), "the kill came too late"

    resumed = subprocess.run(_train_cmd(killed, *RESUMABLE), env=_env(), cwd=REPO, timeout=300,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming after epoch {stopped_at}" in resumed.stdout
    for a, b in zip(_weights(straight_run / "vicreg.keras"), _weights(killed / "vicreg.keras")):
        np.testing.assert_allclose(a, b, atol=1e-6)
    epochs_logged = [int(row.split(",")[0]) for row in (killed / "log.csv").read_text().splitlines()[1:]]
    assert epochs_logged[-(3 - stopped_at):] == list(range(stopped_at, 3)), epochs_logged
    # The steps done after the backup, before the kill, are written once, by the rerun.
    steps = [int(row.split(",")[0]) for row in (killed / "steps.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 3 * 16 + 1)), steps


def test_sigterm_backs_up_at_the_next_step_and_the_rerun_ends_with_the_same_weights(tmp_path, straight_run):
    from vicreg_tf import run_state

    stopped = tmp_path / "stopped"
    # The hook sends this process SIGTERM after global step 13 (epoch 0, 13 of 16 steps done).
    env = dict(_env(), **{run_state.SIGTERM_AT_STEP_ENV: "13"})
    first = subprocess.run(_train_cmd(stopped, *RESUMABLE), env=env, cwd=REPO, timeout=300, capture_output=True,
                           text=True)
    assert first.returncode == 143, first.stderr[-3000:]
    assert "preempted: stopped by SIGTERM after epoch 0 + 13 steps" in first.stderr
    assert json.loads((stopped / "backup" / "backup.json").read_text())["step"] == 13
    assert not (stopped / "vicreg.keras").exists()

    resumed = subprocess.run(_train_cmd(stopped, *RESUMABLE), env=_env(), cwd=REPO, timeout=300,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming after epoch 0, step 13 of the next" in resumed.stdout
    model = keras.saving.load_model(stopped / "vicreg.keras", compile=True)
    assert int(model.optimizer.iterations.numpy()) == 48  # 3 more steps of epoch 0, then 2 x 16
    for a, b in zip(_weights(straight_run / "vicreg.keras"), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    steps = [int(row.split(",")[0]) for row in (stopped / "steps.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 49)), steps  # no step done twice, none skipped


def test_a_workdir_on_another_tensorflow_file_system_goes_through_gfile():
    import tensorflow as tf

    from trainers import pretrain

    workdir = "ram://vicreg-test/run"
    config = _config("tiny")
    config.export.enabled = False
    config.eval.knn_every = 0
    summary = pretrain.train(config, workdir)
    for name in ("experiment.json", "backup/backup.json", "pretrain_summary.json", "vicreg.keras",
                 "backbone.keras", "log.csv", "steps.csv", "loss_terms.png", "spectrum.png"):
        assert tf.io.gfile.exists(f"{workdir}/{name}"), name
    assert not Path("ram:").exists()  # nothing went to a local path named after the URL
    record = json.loads(tf.io.gfile.GFile(f"{workdir}/backup/backup.json").read())
    assert record["epoch"] == 2 and tf.io.gfile.exists(f"{workdir}/backup/{record['weights']}")
    # A rerun reads the backup back through gfile and redoes the outputs without training.
    again = pretrain.train(config, workdir)
    assert again["effective_rank"] == pytest.approx(summary["effective_rank"], rel=1e-4)
    config.export.enabled = True
    with pytest.raises(ValueError, match="not a local path"):
        pretrain.train(config, workdir)


# --------------------------------------------------------------------------- bad input and faults (issue 18)


def _quiet_env():
    # TF_CPP_MIN_LOG_LEVEL unset, as for a user: the scripts' own start-up filtering is on.
    return {"TF_CPP_MIN_LOG_LEVEL": ""}


def test_batch_size_zero_names_the_field_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    result = run_python(["-m", "trainers.pretrain", "--config=tiny", f"--workdir={workdir}",
                         "--config.training.batch_size=0"], timeout=120, env=_quiet_env())
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == "error: config.training.batch_size must be a positive int, got 0"
    assert result.stdout == ""
    assert not workdir.exists()


@pytest.mark.parametrize("override, message", [
    ({"training.batch_size": -4}, "config.training.batch_size must be a positive int, got -4"),
    ({"training.epochs": 0}, "config.training.epochs must be a positive int, got 0"),
    ({"training.steps_per_epoch": -1}, "config.training.steps_per_epoch must be an int >= 0"),
    ({"data.image_size": 0}, "config.data.image_size must be a positive int, got 0"),
    ({"data.channels": 2}, "config.data.channels must be 1, 3 or 4, got 2"),
    ({"data.limit": -1}, "config.data.limit must be an int >= 0"),
    ({"optimizer.base_learning_rate": 0.0}, "config.optimizer.base_learning_rate must be a positive number"),
    ({"optimizer.weight_decay": -1e-4}, "config.optimizer.weight_decay must be a number >= 0"),
    ({"optimizer.warmup_epochs": 3},
     r"config.optimizer.warmup_epochs must be at most config.training.epochs \(2\), got 3"),
    ({"optimizer.name": "sgd"}, r"config.optimizer.name must be one of \['lars', 'adamw'\], got 'sgd'"),
    ({"eval.knn_every": -1}, "config.eval.knn_every must be an int >= 0"),
    ({"training.verbose": "loud"}, "config.training.verbose must be 'auto'"),
])
def test_validate_config_names_the_field_and_the_value(override, message):
    config = _config("tiny")
    for dotted, value in override.items():
        section, key = dotted.split(".")
        config[section][key] = value
    with pytest.raises(ValueError, match=message):
        checks.validate_config(config)


def test_every_shipped_config_passes_validation():
    for name in SHIPPED:
        config = _config(name)
        if config.data.source == "folder":
            config.data.path = "/data/photos"  # the one field its command line sets
        checks.validate_config(config)


# --------------------------------------------------------------------------- precision and XLA (issue 17)


def test_jit_compile_takes_auto_on_off_and_names_the_field_otherwise():
    config = _config("tiny")
    for value in ("auto", "on", "off", "True", "false"):
        config.training.jit_compile = value
        checks.validate_config(config)
    config.training.jit_compile = "maybe"
    with pytest.raises(ValueError, match="config.training.jit_compile must be 'auto'.*got 'maybe'"):
        checks.validate_config(config)


def test_bfloat16_is_native_only_with_the_cpu_flags():
    assert build.cpu_has_native_bfloat16("flags : fpu avx2 avx512f avx512_bf16 avx512_vnni")
    assert build.cpu_has_native_bfloat16("flags : fpu avx2 amx_bf16 amx_tile")
    assert not build.cpu_has_native_bfloat16("flags : fpu avx2 avx512f avx512_vnni")


def test_auto_precision_and_xla_resolve_by_hardware(two_cpu_strategy, monkeypatch):
    import tensorflow as tf

    config = _config("fashion_mnist")
    assert config.training.mixed_precision == "auto" and config.training.jit_compile == "auto"
    one_cpu = tf.distribute.get_strategy()
    for native, expected in ((True, "mixed_bfloat16" if build.BFLOAT16_ON_CPU else ""), (False, "")):
        monkeypatch.setattr(build, "cpu_has_native_bfloat16", lambda native=native: native)
        assert build.resolve_mixed_precision(config, one_cpu) == expected
    assert build.resolve_jit_compile(config, one_cpu) is False  # CPU: XLA measured slower
    assert build.resolve_jit_compile(config, two_cpu_strategy) is False  # several replicas
    monkeypatch.setattr(build, "training_device_kind", lambda strategy: "GPU")
    assert build.resolve_jit_compile(config, one_cpu) is True  # one GPU
    assert build.resolve_jit_compile(config, two_cpu_strategy) is False
    assert build.views_on_device(config, one_cpu) is False  # follows the resolved XLA
    config.training.jit_compile = "off"
    assert build.views_on_device(config, one_cpu) is True
    config.training.mixed_precision = "mixed_float16"  # explicit values stay what they are
    assert build.resolve_mixed_precision(config, one_cpu) == "mixed_float16"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_builds_and_steps_on_two_replicas(name, two_cpu_strategy):
    """Each config's own precision, XLA and method; heavy backbones shrunk to a small CNN."""
    import ml_collections
    import tensorflow as tf

    config = _config(name)
    config.model.backbone = "small_cnn"
    config.model.backbone_kwargs = ml_collections.ConfigDict({"widths": (4, 8)})
    config.model.projector = "32-32"
    config.data.image_size = min(config.data.image_size, 32)
    config.training.batch_size = 8
    precision = build.resolve_mixed_precision(config, two_cpu_strategy)
    jit_compile = build.resolve_jit_compile(config, two_cpu_strategy)
    assert jit_compile is False  # never XLA across replicas
    keras.mixed_precision.set_global_policy(precision or "float32")
    keras.utils.set_random_seed(0)
    with two_cpu_strategy.scope():
        model = build.make_model(config, total_steps=10)
        model.compile(optimizer=build.make_optimizer(config, 10), jit_compile=jit_compile)
    assert model.backbone.layers[1].compute_dtype == keras.mixed_precision.global_policy().compute_dtype
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    size, channels = config.data.image_size, config.data.channels
    images = np.random.default_rng(0).uniform(size=(2, 8, size, size, channels)).astype(np.float32)
    history = model.fit(tf.data.Dataset.from_tensors((images[0], images[1])), epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]), (name, history)
    # Applied (not skipped by the non-finite guard or the float16 loss scale); the warmup's
    # learning rate is 0 at step 0, so the weights themselves may not move yet.
    assert int(model.optimizer.iterations.numpy()) == 1, name


@pytest.mark.parametrize("override, message", [
    ({"optimizer.name": "sgd"}, "optimizer.name"),
    ({"views.preset": "fancy"}, "views.preset"),
    ({"model.backbone": "resnet9"}, "model.backbone"),
    ({"data.source": "folder", "data.path": "EMPTY"}, "image"),
    ({"training.batch_size": 1024}, "fewer than one batch"),
])
def test_a_setup_that_fails_before_training_does_not_claim_the_workdir(tmp_path, override, message):
    from trainers import pretrain

    (tmp_path / "empty").mkdir()
    config = _config("tiny")
    config.unlock()
    for dotted, value in override.items():
        section, key = dotted.split(".")
        config[section][key] = str(tmp_path / "empty") if value == "EMPTY" else value
    workdir = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pretrain.train(config, workdir)
    assert not (workdir / "experiment.json").exists()


def test_a_stale_record_without_checkpoints_is_replaced(tmp_path):
    other = _config("tiny")
    other.training.batch_size = 32
    workdirs.check_workdir(tmp_path, other)  # a run that then failed before training
    workdirs.check_workdir(tmp_path, _config("tiny"))  # the corrected rerun is not refused
    assert json.loads((tmp_path / "experiment.json").read_text())["training.batch_size"] == 64


def _fake_checkpoint(workdir):
    (workdir / "backup").mkdir(parents=True, exist_ok=True)
    (workdir / "backup" / "backup.json").write_text('{"epoch": 1, "weights": "epoch-000001.weights.h5"}')


def test_fingerprint_records_the_data_directory_actually_read(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "train-images-idx3-ubyte.gz").touch()
    workdir = tmp_path / "run"
    monkeypatch.setenv("VICREG_DATA_DIR", str(first))
    workdirs.check_workdir(workdir, _config("tiny"))
    assert json.loads((workdir / "experiment.json").read_text())["data_dir"] == str(first.resolve())
    _fake_checkpoint(workdir)
    monkeypatch.setenv("VICREG_DATA_DIR", str(second))
    with pytest.raises(ValueError, match=f"data_dir: workdir has '{first.resolve()}'"):
        workdirs.check_workdir(workdir, _config("tiny"))


def test_a_record_that_predates_the_data_directory_warns_and_resumes(tmp_path, capsys):
    record = workdirs.experiment_fingerprint(_config("tiny"))
    del record["data_dir"]
    (tmp_path / "experiment.json").write_text(json.dumps(record))
    _fake_checkpoint(tmp_path)
    workdirs.check_workdir(tmp_path, _config("tiny"))
    assert "predates the field(s) data_dir" in capsys.readouterr().err


def test_another_models_backup_without_a_record_is_refused_and_not_relabelled(tmp_path):
    from vicreg_tf import backbones

    other = vicreg_tf.VICReg(backbones.small_cnn((28, 28, 1), widths=(4,)), projector="16-16")
    other.compile(optimizer=keras.optimizers.SGD(0.1))
    other.optimizer.build(other.trainable_variables)
    _fake_checkpoint(tmp_path)
    other.save_weights(tmp_path / "backup" / "epoch-000001.weights.h5")
    config = _config("tiny")
    model = build.make_model(config, total_steps=16)
    model.compile(optimizer=build.make_optimizer(config, 8))
    with pytest.raises(ValueError, match=f"--workdir={tmp_path} holds another model's backup"):
        checks.check_backup_loads(model, tmp_path)
    assert not (tmp_path / "experiment.json").exists()


def test_help_exits_0_and_lists_the_flags():
    for module, names in (("trainers.pretrain", ("--config", "--workdir")),
                          ("trainers.linear_eval", ("--config", "--backbone", "--workdir", "--random_init"))):
        result = run_python(["-m", module, "--help"], timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        for name in (*names, "--config.KEY=VALUE"):
            assert f"  {name}: " in result.stdout, (module, name, result.stdout)


def test_verbose_auto_is_a_progress_bar_on_a_terminal_and_a_line_per_epoch_otherwise(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert build.resolve_verbose("auto") == 1
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert build.resolve_verbose("auto") == 2
    assert build.resolve_verbose("0") == 0 and _config("fashion_mnist").training.verbose == "auto"


def test_eval_of_a_truncated_keras_file_is_one_clear_error_and_writes_nothing(tmp_path):
    from trainers import linear_eval
    from vicreg_tf import backbones

    backbones.small_cnn((28, 28, 1), widths=(4,)).save(tmp_path / "good.keras")
    (tmp_path / "bad.keras").write_bytes((tmp_path / "good.keras").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"not a valid .keras file \(truncated or not a zip\): .*bad.keras"):
        linear_eval.evaluate(_config("tiny"), str(tmp_path / "bad.keras"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_eval_of_a_backbone_for_other_images_names_both_shapes_and_writes_nothing(tmp_path):
    from trainers import linear_eval
    from vicreg_tf import backbones

    backbones.small_cnn((32, 32, 3), widths=(4,), mean=(0.5,) * 3, std=(0.25,) * 3).save(tmp_path / "rgb.keras")
    with pytest.raises(ValueError, match=r"backbone input \(None, 32, 32, 3\) does not match the config's "
                                         r"image size/channels \(28, 28, 1\)"):
        linear_eval.evaluate(_config("tiny"), str(tmp_path / "rgb.keras"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_ends_in_one_error_line_and_saves_nothing(tmp_path):
    workdir = tmp_path / "run"
    result = run_python(["-m", "trainers.pretrain", "--config=tiny", f"--workdir={workdir}",
                         "--config.optimizer.base_learning_rate=1e30", "--config.eval.knn_every=0"],
                        timeout=300, env=_quiet_env())
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: training diverged in epoch 1: "), result.stderr[-3000:]
    assert "no epoch finished, so there is no backup" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("hint: "), result.stderr[-3000:]
    assert not (workdir / "vicreg.keras").exists() and not (workdir / "export").exists()


def test_vicreg_eval_on_a_folder_scores_held_out_files_and_says_which(tmp_path):
    from PIL import Image

    from trainers import linear_eval

    rng = np.random.default_rng(0)
    for k in range(60):
        folder = tmp_path / "photos" / f"class{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")
    config = _config("image_folder")
    config.data.path = str(tmp_path / "photos")
    config.data.image_size = 16
    config.data.eval_fraction = 0.25
    config.model.backbone = "small_cnn"
    config.model.backbone_kwargs = {"widths": (4, 8)}
    config.eval.knn_k = (5,)
    config.eval.linear_epochs = 2
    record = linear_eval.evaluate(config, None, str(tmp_path / "out"), random_init=True)
    assert record["train_data"]["split"] == "train" and record["test_data"]["split"] == "eval"
    assert record["train_images"] + record["test_images"] == 60
    assert 5 <= record["test_images"] <= 25  # a quarter held out, by a hash of each name


# --------------------------------------------------------------------------- the first hour (issue 24)


def _console(name):
    script = Path(sys.executable).parent / name
    assert script.exists(), f"{name} is not installed next to {sys.executable} (pip install -e .)"
    return str(script)


def _without_import_lines(stderr):
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:")).strip()


@pytest.mark.parametrize("program, args, message", [
    ("vicreg-train", ["--config=tiny", "--config.training.epochz=3"],
     "error: bad command line ['--config.training.epochz']: 'epochz' Did you mean \"epochs\" instead of \"epochz\"?"),
    ("vicreg-train", ["--config=tiny", "--workdir=WORKDIR", "--config.training.batch_size=0"],
     "error: config.training.batch_size must be a positive int, got 0"),
    ("vicreg-train", ["--config=no_such_config", "--workdir=WORKDIR"], "error: config 'no_such_config' not found"),
    ("vicreg-eval", ["--config=tiny", "--backbone=WORKDIR/missing.keras"],
     "error: no backbone file at WORKDIR/missing.keras"),
    ("vicreg-train", ["--config=tiny", "--workdir=WORKDIR", "--config.data.max_bad_fraction=1.5"],
     "error: config.data.max_bad_fraction must be a number in [0, 1], got 1.5"),
])
def test_command_line_mistakes_are_answered_before_tensorflow_loads(tmp_path, program, args, message):
    workdir = tmp_path / "run"
    args = [a.replace("WORKDIR", str(workdir)) for a in args]
    # PYTHONPROFILEIMPORTTIME: Python lists every module it imports on stderr.
    start = time.monotonic()
    result = subprocess.run([_console(program), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    seconds = time.monotonic() - start
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert _without_import_lines(result.stderr).startswith(message.replace("WORKDIR", str(workdir)))
    assert "absl.flags" in imported  # the listing works
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "keras")], seconds
    assert not workdir.exists()


def test_a_refused_workdir_names_only_the_keys_that_differ(tmp_path):
    workdirs.check_workdir(tmp_path, _config("tiny"))
    _fake_checkpoint(tmp_path)
    other = _config("tiny")
    other.model.projector = "64-64"
    other.model.backbone_kwargs.widths = (4, 16)
    with pytest.raises(ValueError) as refused:
        workdirs.check_workdir(tmp_path, other)
    message = str(refused.value)
    assert ("(model.backbone_kwargs.widths: workdir has [4, 8], config has [4, 16]; "
            "model.projector: workdir has '32-32', config has '64-64')") in message
    assert "invariance_weight" not in message and "'source'" not in message and len(message) < 400


def test_a_key_one_record_lacks_is_named_as_missing():
    theirs = {"model": {"projector": "32-32"}, "seed": 0}
    mine = {"model": {"projector": "32-32", "predictor": "16"}, "seed": 0}
    assert workdirs.fingerprint_differences(theirs, mine) == [
        "model.predictor: workdir has no such key, config has '16'"]


def test_the_bad_image_share_is_not_part_of_the_experiment(tmp_path):
    workdirs.check_workdir(tmp_path, _config("tiny"))
    _fake_checkpoint(tmp_path)
    config = _config("tiny")
    checks.add_program_defaults(config)
    config.data.max_bad_fraction = 0.9
    workdirs.check_workdir(tmp_path, config)  # resumes: the threshold is no part of what is learned


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning_naming_the_flag(capsys):
    config = _config("image_folder")
    config.data.path = "/data"
    config.training.epochs = 1
    checks.prepare_config(config)
    assert config.optimizer.warmup_epochs == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--config.optimizer.warmup_epochs" in err and "warmup_epochs=5" in err
    config.training.epochs = 3
    config.optimizer.warmup_epochs = 5
    checks.prepare_config(config)
    assert config.optimizer.warmup_epochs == 2
    config.optimizer.warmup_epochs = 3  # as long as the run: kept, as before
    checks.prepare_config(config)
    assert config.optimizer.warmup_epochs == 3


def _folder_of(tmp_path, good: int, bad: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    for k in range(good + bad):
        path = folder / f"class{k % 2}" / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if k < bad:
            path.write_bytes(b"this is not a png" * (k + 1))
        else:
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    return folder


def _folder_config(folder):
    config = _config("image_folder")
    config.data.path = str(folder)
    config.data.image_size = 16
    config.data.train_split = "all"
    config.model.backbone = "small_cnn"
    config.model.backbone_kwargs = {"widths": (4, 8)}
    config.training.batch_size = 8
    config.training.epochs = 1
    config.optimizer.warmup_epochs = 0
    return config


def test_a_folder_where_no_image_decodes_is_one_line_and_writes_nothing(tmp_path):
    from trainers import pretrain

    folder = _folder_of(tmp_path, good=0, bad=12)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as refused:
        pretrain.train(_folder_config(folder), workdir)
    assert str(refused.value) == (f"none of the 12 image files under {str(folder.resolve())!r} (config.data.path) "
                                  "decodes as an image: are they images?")
    assert not workdir.exists()


def test_a_folder_where_most_images_fail_names_the_share_and_writes_nothing(tmp_path):
    from trainers import pretrain

    folder = _folder_of(tmp_path, good=10, bad=30)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^30 of the 40 image files under .*photos' \(config.data.path\) do not "
                                         r"decode \(75%\), more than config.data.max_bad_fraction=0.5: ") as refused:
        pretrain.train(_folder_config(folder), workdir)
    assert "\n" not in str(refused.value) and "--config.data.max_bad_fraction" in str(refused.value)
    assert not workdir.exists()
    config = _folder_config(folder)
    checks.add_program_defaults(config)
    config.data.max_bad_fraction = 0.8  # a share the user accepts: the run starts
    source = build.load_source(config, "all")
    checks.check_images_decode(source, config)


def test_with_eval_path_the_training_split_is_the_whole_folder(tmp_path):
    folder = _folder_of(tmp_path, good=40, bad=0)
    config = _folder_config(folder)
    config.data.train_split = "train"
    config.data.eval_path = str(_folder_of(tmp_path / "val", good=6, bad=0))
    assert build.load_source(config, "train").count == 40  # until issue 22: 35 (10% held out by hash)
    assert build.load_source(config, config.data.eval_split).count == 6


def test_vicreg_eval_refuses_a_folder_where_no_image_decodes_before_writing(tmp_path):
    from trainers import linear_eval

    folder = _folder_of(tmp_path, good=0, bad=12)
    config = _folder_config(folder)
    config.data.eval_split = "all"
    with pytest.raises(ValueError, match="none of the 12 image files"):
        linear_eval.evaluate(config, None, str(tmp_path / "out"), random_init=True)
    assert not (tmp_path / "out").exists()


def test_json_outputs_are_rounded_to_six_significant_digits(tmp_path, capsys):
    record = workdirs.write_json_line(tmp_path / "eval.json", {
        "linear_top1": float(np.float32(0.147)), "nested": {"x": [1.0 / 3, 2]}, "count": 512, "name": "a"})
    line = capsys.readouterr().out.strip()
    assert json.loads(line) == json.loads((tmp_path / "eval.json").read_text()) == record
    assert record == {"linear_top1": 0.147, "nested": {"x": [0.333333, 2]}, "count": 512, "name": "a"}
    assert "0.1469999" not in line


def test_a_long_reason_is_clipped_between_words():
    text = "Layer 'dense' expected 2 variables, but received 0 variables during loading. " * 5
    clipped = checks._clipped(text.strip(), 200)
    kept = clipped.removesuffix(" ...")
    assert len(clipped) <= 204 and clipped != kept
    assert text.startswith(kept) and text[len(kept)] in " ,;:"  # cut between two words


def test_start_up_notices_stay_hidden_when_the_user_sets_level_2(tmp_path):
    program = ("import sys; sys.argv[0] = 'vicreg-train'\n"
               "from vicreg_tf._startup import quiet_tensorflow_startup\n"
               "with quiet_tensorflow_startup():\n"
               "    import vicreg_tf, tensorflow as tf\n"
               "    tf.config.list_physical_devices()\n"
               "print('loaded')\n")
    noisy = run_python(["-c", program], timeout=120, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert noisy.returncode == 0 and "oneDNN custom operations are on" in noisy.stderr  # 0: everything shown
    for level in ("2", "3", ""):
        quiet = run_python(["-c", program], timeout=120, env={"TF_CPP_MIN_LOG_LEVEL": level})
        assert quiet.returncode == 0 and quiet.stdout.strip() == "loaded", quiet.stderr[-2000:]
        assert quiet.stderr.strip() == "", (level, quiet.stderr[-2000:])
