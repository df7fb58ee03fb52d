"""GPU code paths on the CPU: the one-GPU crash, and the matrix of strategies x XLA x precision x method x views.

`vicreg_tf.gpu_emulation.gpu_code_paths()` makes TensorFlow take the paths it takes
on GPUs (no merge_call inside XLA, NCCL collectives). Each cell runs two steps and a
NaN batch (see `run_cell`). The default suite runs a covering subset (every pair of
values of any two factors at least once); `pytest tests/test_gpu_paths.py
--gpu-matrix=full` (`make test-gpu-matrix`) runs all 192 cells.

Cells whose step XLA would compile with collectives run in a child process: XLA
cannot compile a collective for a CPU device (the cell then checks that the step
traced), and TensorFlow can abort at exit after that. MultiWorkerMirrored cells run
in two local worker processes.
"""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_python

from vicreg_tf import gpu_emulation as emulation


def pytest_generate_tests(metafunc):
    if "cell" in metafunc.fixturenames:
        full = metafunc.config.getoption("--gpu-matrix") == "full"
        cells = emulation.all_cells() if full else emulation.covering_cells()
        metafunc.parametrize("cell", cells, ids=[c.id for c in cells])


def _in_child(cell) -> bool:
    return cell.strategy == "multiworker" or (cell.strategy == "mirrored1" and cell.xla)


@pytest.fixture(scope="module")
def child_results(request):
    """Results of every child-process cell of this session's matrix, run once per strategy."""
    full = request.config.getoption("--gpu-matrix") == "full"
    cells = [c for c in (emulation.all_cells() if full else emulation.covering_cells()) if _in_child(c)]
    results = {}
    single = [c.id for c in cells if c.strategy != "multiworker"]
    if single:
        run = run_python(["-m", "vicreg_tf.gpu_emulation", *single], timeout=120 + 30 * len(single))
        results.update(_parse(run.stdout, run.stderr))
    workers = [c.id for c in cells if c.strategy == "multiworker"]
    if workers:
        results.update(_run_two_workers(workers))
    return results


def _parse(stdout: str, stderr: str) -> dict:
    results = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record.pop("cell")] = record
    if not results:
        results["_stderr"] = stderr[-3000:]
    return results


def _run_two_workers(cell_ids) -> dict:
    from trainers import launch_local

    ports = launch_local.free_ports(2)
    configs = launch_local.tf_configs(ports)
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    processes = [
        subprocess.Popen([sys.executable, "-m", "vicreg_tf.gpu_emulation", *cell_ids], cwd=REPO,
                         env=dict(env, TF_CONFIG=config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for config in configs
    ]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=180 + 40 * len(cell_ids)))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
    per_worker = [_parse(out, err) for out, err in outputs]
    results = {}
    for cell_id in cell_ids:
        records = [worker.get(cell_id) for worker in per_worker]
        if any(r is None for r in records):
            results[cell_id] = {"status": "failed", "error": f"a worker gave no result: {per_worker}"}
        elif len({r["status"] for r in records}) != 1:
            results[cell_id] = {"status": "failed", "error": f"the two workers disagree: {records}"}
        else:
            results[cell_id] = records[0]
    return results


@pytest.fixture(scope="module")
def strategies():
    made = {"default": None}

    def get(name):
        if name not in made:
            made[name] = emulation.make_strategy(name)
        return made[name]

    return get


def _expected(cell) -> set:
    """The statuses a cell may end in: refused where XLA cannot work, traced where XLA meets a collective."""
    if cell.xla and (cell.views == "device" or cell.strategy in ("mirrored2", "multiworker")):
        return {"refused"}
    if cell.xla and cell.strategy != "default":
        return {"traced"}
    return {"ran"}


def test_matrix_cell(cell, strategies, child_results):
    if _in_child(cell):
        result = child_results.get(cell.id) or {"status": "missing", "error": child_results.get("_stderr", "")}
    else:
        result = emulation.run_cell(cell, strategies(cell.strategy))
    assert result["status"] in _expected(cell), (cell.id, result)
    if result["status"] == "refused":
        assert "jit_compile=True cannot work here" in result["error"] and "\n" not in result["error"]
        assert "use jit_compile=False" in result["error"] or "on_device=off" in result["error"]


REPRODUCTION = r"""
import keras, numpy as np, tensorflow as tf, vicreg_tf
from tensorflow.python.distribute import mirrored_strategy
mirrored_strategy.MirroredExtended._use_merge_call = lambda self: False  # what it returns inside XLA on GPUs
strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
with strategy.scope():
    model = vicreg_tf.VICReg(vicreg_tf.backbones.small_cnn((28, 28, 1), widths=(4, 8)), projector="32-32")
    model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=True)
x = np.random.rand(8, 28, 28, 1).astype("float32")
try:
    model.fit(tf.data.Dataset.from_tensors((x, x)).repeat(), steps_per_epoch=2, verbose=0)
    print("RESULT ran")
except Exception as error:
    lines = [text for text in str(error).splitlines() if "merge_call" in text or "ollective" in text]
    print("RESULT", type(error).__name__, " | ".join(lines)[:600])
import os, sys
sys.stdout.flush()
os._exit(0)
"""


def test_one_gpu_under_mirrored_with_xla_traces_without_merge_call_in_a_cond():
    """The issue's reproduction: before the fix, `RuntimeError: merge_call called while defining a new graph`."""
    result = run_python(["-c", REPRODUCTION], timeout=180)
    line = next((text for text in result.stdout.splitlines() if text.startswith("RESULT")), result.stderr[-2000:])
    assert "merge_call" not in line, line
    # The step traced; on a CPU, XLA then stops at the collective, as it does for a plain Keras model.
    assert "Only compiling NCCL/auto collective is supported" in line, line


def test_covering_subset_has_every_pair_of_values():
    cells = emulation.covering_cells()
    assert len(cells) < len(emulation.all_cells()) / 8
    fields = ("strategy", "xla", "precision", "method", "views")
    values = {f: {getattr(c, f) for c in emulation.all_cells()} for f in fields}
    for i, a in enumerate(fields):
        for b in fields[i + 1:]:
            seen = {(getattr(c, a), getattr(c, b)) for c in cells}
            assert len(seen) == len(values[a]) * len(values[b]), (a, b)


def test_gpu_code_paths_restores_tensorflow():
    from tensorflow.python.distribute import mirrored_strategy

    original = mirrored_strategy.MirroredExtended._use_merge_call
    with emulation.gpu_code_paths():
        assert mirrored_strategy.MirroredExtended._use_merge_call is not original
    assert mirrored_strategy.MirroredExtended._use_merge_call is original


# --------------------------------------------------------------------------- what "auto" picks per hardware

def _config(name="fashion_mnist"):
    import importlib

    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("kind", ["CPU", "GPU"])
@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("config_name", ["fashion_mnist", "cifar10_resnet18", "image_folder", "imagenet_resnet50"])
def test_auto_never_picks_a_cell_that_cannot_work(kind, replicas, config_name, two_cpu_strategy, monkeypatch):
    import tensorflow as tf

    from trainers import build
    from vicreg_tf.base import xla_refusal

    monkeypatch.setattr(build, "training_device_kind", lambda strategy: kind)
    monkeypatch.setattr(build, "gpu_capabilities", lambda: [(8, 0)] * replicas)
    strategy = two_cpu_strategy if replicas == 2 else tf.distribute.get_strategy()
    config = _config(config_name)
    assert (config.training.jit_compile, config.views.on_device) == ("auto", "auto")
    jit = build.resolve_jit_compile(config, strategy)
    on_device = build.views_on_device(config, strategy)
    precision = build.resolve_mixed_precision(config, strategy)
    build.check_precision(precision, strategy)
    assert not (jit and xla_refusal(on_device, strategy))
    if kind == "GPU" and replicas == 1:
        assert (jit, on_device, precision) == (True, False, "mixed_bfloat16")  # the usual single-GPU setup
    if replicas == 2:
        assert jit is False
    line = build.describe_setup(config, strategy, precision, jit, on_device)
    assert f"XLA: {'on' if jit else 'off'}" in line and f"replicas: {replicas}" in line
    assert f"{config.training.batch_size // replicas} per replica" in line


def test_explicit_xla_under_several_replicas_is_a_one_line_error(two_cpu_strategy):
    from trainers import build

    config = _config()
    config.training.jit_compile = "on"
    with pytest.raises(ValueError, match="jit_compile=on cannot work here: MirroredStrategy has 2 replicas") as error:
        build.resolve_jit_compile(config, two_cpu_strategy)
    assert "\n" not in str(error.value) and "jit_compile=auto" in str(error.value)


def test_bfloat16_on_a_gpu_older_than_ampere_is_a_one_line_error(monkeypatch):
    import tensorflow as tf

    from trainers import build

    monkeypatch.setattr(build, "training_device_kind", lambda strategy: "GPU")
    monkeypatch.setattr(build, "gpu_capabilities", lambda: [(7, 0)])
    config = _config()
    assert build.resolve_mixed_precision(config, tf.distribute.get_strategy()) == ""  # auto: float32 on a V100
    with pytest.raises(ValueError, match="compute capability 8.0 or newer.*this one is 7.0: use mixed_float16"):
        build.check_precision("mixed_bfloat16", tf.distribute.get_strategy())


def test_one_gpu_gets_the_default_strategy(monkeypatch):
    import tensorflow as tf

    from trainers import build

    class FakeDevice:
        name = "/device:GPU:0"

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: [FakeDevice()] if kind == "GPU" else [])
    strategy = build.make_strategy()
    assert not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()


def test_vicreg_train_refuses_xla_with_device_views_before_claiming_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    result = run_python(["-m", "trainers.pretrain", "--config=tiny", f"--workdir={workdir}",
                         "--config.training.jit_compile=on", "--config.views.on_device=on"], timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "jit_compile=on cannot work here" in errors[0], result.stderr[-2000:]
    assert "on_device=off" in errors[0]
    assert not workdir.exists()


def test_model_refuses_explicit_xla_with_device_views_and_auto_turns_it_off():
    import keras

    import vicreg_tf
    from vicreg_tf import augment

    model = emulation.build_cell_model("vicreg", device_views=augment.paper_views(emulation.IMAGE_SIZE, seed=0))
    with pytest.raises(ValueError, match="jit_compile=True cannot work here: views made on the device"):
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile="auto")
    assert model.jit_compile is False
    assert isinstance(model, vicreg_tf.VICReg)
