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
from trainers import common

import vicreg_tf  # noqa: F401  (registers VICReg for keras.saving.load_model)

SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")

# Fast, deterministic settings for runs whose weights are compared.
FAST = [
    "--config.export.enabled=False",
    "--config.eval.knn_every=0",
    "--config.training.deterministic=True",
]


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
    assert config.model.backbone == "resnet50"
    assert config.model.projector == "8192-8192-8192"
    assert (config.optimizer.name, config.optimizer.base_learning_rate) == ("lars", 0.2)
    assert config.optimizer.weight_decay == 1e-6
    assert (config.training.batch_size, config.training.epochs) == (2048, 1000)
    assert (config.optimizer.warmup_epochs, config.optimizer.final_fraction) == (10, 0.001)
    assert (config.model.invariance_weight, config.model.variance_weight, config.model.covariance_weight) == (25, 25, 1)


def test_config_by_name_and_unknown_name():
    assert common.resolve_config_path("tiny").endswith("configs/tiny.py")
    with pytest.raises(FileNotFoundError, match="fashion_mnist"):
        common.resolve_config_path("no_such_experiment")


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
    common.check_workdir(tmp_path, config)
    common.check_workdir(tmp_path, config)  # the same experiment resumes
    other = _config("tiny")
    other.unlock()
    other.training.batch_size = 32
    with pytest.raises(ValueError, match="training.batch_size: workdir has 64, config has 32"):
        common.check_workdir(tmp_path, other)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    config = _config("tiny")
    config.data.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        common.load_images(config, "train")


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

    # Rerunning a finished run redoes the outputs from the final backup, without training.
    again = pretrain.train(_config("tiny"), tmp_path)
    assert again["effective_rank"] == pytest.approx(summary["effective_rank"], rel=1e-4)
    assert (tmp_path / "export/vicreg/2/saved_model.pb").exists()


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


@pytest.mark.large
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = ["--config.training.epochs=4", "--config.data.limit=2048"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(straight, *args), env=_env(), cwd=REPO, check=True, timeout=300,
                   capture_output=True)

    proc = subprocess.Popen(_train_cmd(killed, *args), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _backup_epoch(killed) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stopped_at = _backup_epoch(killed)
    assert 1 <= stopped_at < 4 and not (killed / "backbone.keras").exists(), "the kill came too late"

    resumed = subprocess.run(_train_cmd(killed, *args), env=_env(), cwd=REPO, timeout=300,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming after epoch {stopped_at}" in resumed.stdout
    for a, b in zip(_weights(straight / "vicreg.keras"), _weights(killed / "vicreg.keras")):
        np.testing.assert_allclose(a, b, atol=1e-6)
    epochs_logged = [int(row.split(",")[0]) for row in (killed / "log.csv").read_text().splitlines()[1:]]
    assert epochs_logged[-(4 - stopped_at):] == list(range(stopped_at, 4)), epochs_logged
