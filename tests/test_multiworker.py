"""MultiWorkerMirroredStrategy: two local worker processes, faults, bad TF_CONFIG.

Every run here is bounded: the launcher's --timeout, the subprocess timeout, and
VICREG_PEER_TIMEOUT for peers that never come up.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO, run_python

from trainers import cluster, launch_local

TINY = [
    "--config=tiny",
    "--config.export.enabled=False",
    "--config.eval.knn_every=0",
    "--config.eval.knn_max_eval=256",  # the chief's closing spectrum from 256 held-out images, not 4096
    "--config.training.deterministic=True",
]


def _env(tmp_path, **extra):
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(scratch),
                VICREG_KEEP_SCRATCH="1", VICREG_PEER_TIMEOUT="60", **extra)


def _launch(tmp_path, workdir, *extra, timeout=400, wait=True):
    cmd = [sys.executable, "-m", "trainers.launch_local", "--workers=2", f"--timeout={timeout - 20}", "--",
           *TINY, f"--workdir={workdir}", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=_env(tmp_path), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _weights(path):
    import vicreg_tf  # noqa: F401  registers VICReg for loading

    return keras.saving.load_model(path, compile=False).get_weights()


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'needs a "cluster"'),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}', "out of range"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}', "not a job"),
        ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ],
)
def test_bad_tf_config_is_named(raw, message):
    with pytest.raises(ValueError, match=message):
        cluster.parse_tf_config(raw)


def test_chief_is_worker_zero_or_the_chief_task():
    two = {"worker": ["a:1", "b:2"]}
    assert cluster.is_chief_task({"cluster": two, "task": {"type": "worker", "index": 0}})
    assert not cluster.is_chief_task({"cluster": two, "task": {"type": "worker", "index": 1}})
    with_chief = {"chief": ["c:3"], **two}
    assert cluster.is_chief_task({"cluster": with_chief, "task": {"type": "chief", "index": 0}})
    assert not cluster.is_chief_task({"cluster": with_chief, "task": {"type": "worker", "index": 0}})


def test_tf_configs_of_the_launcher_are_valid():
    configs = [json.loads(c) for c in launch_local.tf_configs(launch_local.free_ports(3))]
    assert [c["task"]["index"] for c in configs] == [0, 1, 2]
    assert len({tuple(c["cluster"]["worker"]) for c in configs}) == 1
    for c in configs:
        cluster.parse_tf_config(json.dumps(c))


def test_bad_tf_config_stops_vicreg_train_with_a_clear_error(tmp_path):
    result = run_python(["-m", "trainers.pretrain", *TINY, f"--workdir={tmp_path}"], timeout=120,
                        env={"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"]}, '
                                          '"task": {"type": "worker", "index": 3}}'})
    assert result.returncode == 2
    assert "task index 3 is out of range" in result.stderr


def test_unreachable_peer_times_out_with_a_clear_error(tmp_path):
    ports = launch_local.free_ports(2)
    tf_config = json.loads(launch_local.tf_configs(ports)[0])
    start = time.monotonic()
    result = run_python(["-m", "trainers.pretrain", *TINY, f"--workdir={tmp_path}"], timeout=150,
                        env={"TF_CONFIG": json.dumps(tf_config), "VICREG_PEER_TIMEOUT": "2"})
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL from the watchdog
    assert f"error: peer 127.0.0.1:{ports[1]} from TF_CONFIG did not answer within 2 s" in result.stderr
    assert time.monotonic() - start < 120


@pytest.mark.large
def test_two_workers_match_each_other_and_a_single_process(tmp_path):
    # float64 layers: in float32 the BatchNorm gradients of a batch of 64 and of
    # two batches of 32 differ by ~1e-3 from summation order alone (cancelling
    # sums); in float64 that noise is ~1e-8 and 1e-5 tests the algorithm.
    steps = ["--config.training.epochs=2", "--config.training.steps_per_epoch=3",
             "--config.training.mixed_precision=float64"]
    result = _launch(tmp_path, tmp_path / "cluster", *steps)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "launch_local: worker 1 pid" in result.stdout
    chief = _weights(tmp_path / "cluster" / "vicreg.keras")
    (other_dir,) = (tmp_path / "scratch").glob("vicreg-worker1-*")
    other = _weights(other_dir / "vicreg.keras")
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)

    single = run_python(["-m", "trainers.pretrain", *TINY, f"--workdir={tmp_path / 'single'}", *steps],
                        timeout=300, env={"CUDA_VISIBLE_DEVICES": ""})
    assert single.returncode == 0, single.stderr[-3000:]
    alone = _weights(tmp_path / "single" / "vicreg.keras")
    assert len(alone) == len(chief)
    for a, b in zip(chief, alone):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_the_launcher_starts_the_installed_trainer():
    from vicreg_tf.trainers import launch_local as installed

    assert installed.PRETRAIN == "vicreg_tf.trainers.pretrain" and launch_local.PRETRAIN == "trainers.pretrain"


@pytest.mark.large
def test_the_console_launcher_runs_outside_the_checkout_and_only_the_chief_reports(tmp_path):
    launcher = Path(sys.executable).parent / "vicreg-launch-local"
    assert launcher.exists(), f"vicreg-launch-local is not installed next to {sys.executable} (pip install -e .)"
    env = {k: v for k, v in _env(tmp_path).items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    result = subprocess.run(
        [str(launcher), "--workers=2", "--timeout=380", "--", "--config=tiny", f"--workdir={tmp_path / 'run'}",
         "--config.export.enabled=False", "--config.training.epochs=1", "--config.training.steps_per_epoch=2",
         "--config.eval.knn_every=1", "--config.eval.knn_max_eval=256"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    chief = [line for line in result.stdout.splitlines() if line.startswith("[worker 0] ")]
    other = [line for line in result.stdout.splitlines() if line.startswith("[worker 1] ")]
    assert any("val_knn_top1" in line for line in chief), chief  # the chief's epoch line, with the kNN monitor
    assert any('"effective_rank"' in line for line in chief), chief  # and its summary
    assert other == [], other  # the other worker: neither progress nor a kNN monitor, nor the summary
    for noise in ("oneDNN custom operations", "cpu_feature_guard", "absl::InitializeLog", "cuda"):
        assert noise not in result.stdout + result.stderr, noise
    assert (tmp_path / "run" / "vicreg.keras").exists()


@pytest.mark.large
def test_killed_worker_stops_the_job_and_a_restart_resumes(tmp_path):
    workdir = tmp_path / "cluster"
    epochs = ["--config.training.epochs=3", "--config.training.steps_per_epoch=16"]
    proc = _launch(tmp_path, workdir, *epochs, wait=False)
    record = workdir / "backup" / "backup.json"
    output, pids = [], {}
    deadline = time.monotonic() + 300
    try:
        for line in proc.stdout:  # read until the first backup is committed
            output.append(line)
            match = re.match(r"launch_local: worker (\d) pid (\d+)", line)
            if match:
                pids[int(match.group(1))] = int(match.group(2))
            if record.exists() or time.monotonic() > deadline:
                break
        assert record.exists(), "".join(output[-50:])
        os.kill(pids[1], signal.SIGKILL)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(output) + rest
    assert proc.returncode != 0
    assert "worker 1 exited with code -9; stopping the others" in output
    stopped_at = json.loads(record.read_text())["epoch"]
    assert 1 <= stopped_at < 3 and not (workdir / "vicreg.keras").exists()

    again = _launch(tmp_path, workdir, *epochs)
    assert again.returncode == 0, again.stdout[-4000:]
    assert f"Resuming after epoch {stopped_at}" in again.stdout
    assert json.loads(record.read_text())["epoch"] == 3
    assert (workdir / "vicreg.keras").exists()


_FAKE_WORKER = """
import json, os, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
time.sleep(0.5 + 2.0 * index)  # worker 1 backs up later than worker 0
print("stopping", flush=True)
sys.exit(int(sys.argv[1 + index]))
"""


@pytest.mark.parametrize("codes, status, report", [
    ((143, 143), 143, "every worker has stopped, exit codes [143, 143]"),  # waited: worker 1 not killed
    ((1, 0), 1, "worker 0 exited with code 1; stopping the others"),  # a failure still stops the rest
])
def test_the_launcher_waits_for_the_others_only_after_a_preemption_exit(tmp_path, monkeypatch, capsys,
                                                                       codes, status, report):
    (tmp_path / "fake_worker.py").write_text(_FAKE_WORKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert launch_local.launch(2, [str(c) for c in codes], timeout=60, module="fake_worker") == status
    out = capsys.readouterr().out
    assert report in out, out
    assert ("[worker 1] stopping" in out) == (codes[0] == 143), out


def _steps_logged(workdir) -> int:
    try:
        return len((Path(workdir) / "steps.csv").read_text().splitlines()) - 1
    except OSError:
        return 0


@pytest.mark.large
def test_sigterm_to_one_worker_backs_up_every_worker_at_one_step_and_the_rerun_resumes_there(tmp_path):
    import threading

    args = ["--config.training.epochs=2", "--config.training.steps_per_epoch=20"]
    straight = _launch(tmp_path, tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stdout[-4000:]

    workdir = tmp_path / "stopped"
    proc = _launch(tmp_path, workdir, *args, wait=False)
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    try:
        while _steps_logged(workdir) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = dict(re.findall(r"launch_local: worker (\d) pid (\d+)", "".join(output)))
        signalled_after = _steps_logged(workdir)
        assert 5 <= signalled_after < 40, "".join(output[-50:])
        os.kill(int(pids["1"]), signal.SIGTERM)  # one host preempted; worker 0 gets no signal
        proc.wait(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    output = "".join(output)
    assert proc.returncode == 143, output[-4000:]
    assert re.search(r"launch_local: worker \d was preempted", output), output[-4000:]
    # The other worker was not killed by the launcher: it stopped by itself, with the same status.
    assert "launch_local: every worker has stopped, exit codes [143, 143]" in output, output[-4000:]
    stops = re.findall(r"\[worker (\d)\] preempted: stopped by SIGTERM to a worker of the cluster "
                       r"after epoch (\d+) \+ (\d+) steps", output)
    assert sorted(w for w, _, _ in stops) == ["0", "1"], output[-4000:]  # both backed up and stopped
    (epoch, step), = {(int(e), int(s)) for _, e, s in stops}  # at one step
    record = json.loads((workdir / "backup" / "backup.json").read_text())
    assert (record["epoch"], record.get("step", 0)) == (epoch, step)
    done = 20 * epoch + step
    assert signalled_after <= done < 40 and _steps_logged(workdir) == done, (signalled_after, done)
    assert not (workdir / "vicreg.keras").exists()

    again = _launch(tmp_path, workdir, *args)
    assert again.returncode == 0, again.stdout[-4000:]
    where = f"epoch {epoch}, step {step} of the next" if step else f"epoch {epoch}"
    assert f"[worker 0] Resuming after {where} from the backup" in again.stdout
    steps = [int(row.split(",")[0]) for row in (workdir / "steps.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 41)), steps  # no step done twice, none skipped
    expected = _weights(tmp_path / "straight" / "vicreg.keras")
    # Worker 1 resumed at the same step: it ends at step 40 with the chief's weights (its own save).
    other_dirs = sorted((tmp_path / "scratch").glob("vicreg-worker1-*"), key=os.path.getmtime)
    for path in (workdir / "vicreg.keras", other_dirs[-1] / "vicreg.keras"):
        model = keras.saving.load_model(path, compile=True)
        assert int(model.optimizer.iterations.numpy()) == 40, path
        for a, b in zip(expected, model.get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- Slurm (issue 17)

_SLURM = {
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
}


def _fake_slurm(monkeypatch, **overrides):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name, value in {**_SLURM, **overrides}.items():
        monkeypatch.setenv(name, value)


def test_a_slurm_step_resolves_to_a_worker_cluster_without_tf_config(monkeypatch, tmp_path):
    import tensorflow as tf

    from trainers import build

    _fake_slurm(monkeypatch)
    assert cluster.in_slurm_job()
    resolver = cluster.slurm_cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": ["gpu01:8888", "gpu02:8888"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    role = cluster.resolver_role(resolver, str(tmp_path / "run"))
    assert not role.is_chief and not (tmp_path / "run").exists()  # task 1 writes to its scratch directory

    picked = []
    monkeypatch.setattr(cluster, "multi_worker_strategy", lambda resolver=None: picked.append(resolver) or "mwms")
    assert build.make_strategy() == "mwms"
    assert isinstance(picked[0], tf.distribute.cluster_resolver.SlurmClusterResolver)
    assert picked[0].num_accelerators() == {}  # no GPU here: CPU replicas

    monkeypatch.setenv("SLURM_PROCID", "0")
    assert cluster.resolver_role(cluster.slurm_cluster_resolver(), str(tmp_path / "run")).is_chief


def test_two_slurm_tasks_on_one_node_get_their_own_ports(monkeypatch):
    _fake_slurm(monkeypatch, SLURM_STEP_NODELIST="gpu07", SLURM_STEP_TASKS_PER_NODE="2", SLURM_PROCID="0")
    monkeypatch.setenv(cluster.SLURM_PORT_ENV, "23456")
    assert cluster.slurm_cluster_resolver().cluster_spec().as_dict() == {"worker": ["gpu07:23456", "gpu07:23457"]}


@pytest.mark.parametrize("change", [{"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, {"TF_CONFIG": "{}"},
                                    {"SLURM_JOB_ID": ""}])
def test_one_slurm_task_or_a_tf_config_is_not_a_slurm_cluster(monkeypatch, change):
    _fake_slurm(monkeypatch)
    for name, value in change.items():
        monkeypatch.setenv(name, value)
    assert not cluster.in_slurm_job()
