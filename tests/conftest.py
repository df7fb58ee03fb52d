"""Test session setup: one TensorFlow import, two logical CPUs for the whole session.

The logical devices must be configured before any TensorFlow op runs, so this
happens at import time of the conftest, before any test module is collected.
Tests that need a second process (CLI tools, SIGKILL, multi-worker) spawn one
with `run_python` below.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (`make test` runs `-n 2`), each worker's TensorFlow gets its share of the cores.

    TensorFlow sizes its intra-op pool to every core; two workers (and their child
    processes, which inherit the variable) then preempt each other's threads inside
    every parallel op. Measured on 2 cores, 203 tests: 165 s with the default, 121 s
    with one thread per worker. A value the caller set is kept.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, cores // workers)))


_share_the_cores_between_workers()  # before TensorFlow starts

# isort: off
import vicreg_tf  # noqa: E402,F401  first, as users do: it decides TensorFlow's oneDNN default
import tensorflow as tf  # noqa: E402
# isort: on

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--gpu-matrix", default="covering", choices=("covering", "full"),
                     help="tests/test_gpu_paths.py: a covering subset of the GPU-path matrix (default) or all cells")


# `make test` runs the suite on two workers with `--dist loadfile --no-loadscope-reorder`: a module stays on
# one worker (its module fixtures are made once) and the modules start in collection order. Reordered here
# so that the longest modules (measured on 2 cores) start first, each with its long tests first: the last
# module a worker starts is then a short one, and no worker idles while the other finishes a long one.
LONGEST_FIRST = ("test_multiworker.py", "test_trainers.py", "test_gpu_paths.py", "test_methods.py",
                 "test_sources.py", "test_model.py", "test_torch_import.py")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the files' own order

    first_seen = {}
    for index, item in enumerate(items):
        first_seen.setdefault(item.path, index)

    def rank(item):
        name = item.path.name
        longest = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return longest, first_seen[item.path], item.get_closest_marker("large") is None

    items.sort(key=rank)


def run_python(args, *, timeout: float, env: dict | None = None, cwd=None):
    """Runs `python ARGS` in a fresh process with the repo on PYTHONPATH."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or REPO,
    )


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with default dtype policy and a cleared Keras session."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()  # ends in a full gc.collect(): this test's garbage is freed
    # What survived is frozen, so the next test's collection walks only that test's objects:
    # without this, each of the suite's ~600 collections walked TensorFlow, Keras and every
    # earlier test's survivors (over a million objects, up to seconds per test).
    gc.freeze()


@pytest.fixture(scope="module", autouse=True)
def _collect_the_modules_garbage():
    """After a module: everything frozen becomes collectable again (its module fixtures' models)."""
    yield
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def two_cpu_strategy():
    # One strategy per process: two MirroredStrategy objects over the same devices
    # reuse collective instance keys and clash ("Collective instance N expected type ...").
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def counted_reads(monkeypatch):
    """Records read through `records.read_file` (every read of a record file by a source, per pipeline run
    in this process): tests/test_sources.py and tests/test_tfrecords.py count reads with it."""
    from vicreg_tf.data import records as records_module

    reads = []
    original = records_module.read_file

    def counting(*args):
        def tick():
            reads.append(1)
            return np.int64(0)

        return original(*args).map(lambda record: (tf.py_function(tick, [], tf.int64), record)[1])

    monkeypatch.setattr(records_module, "read_file", counting)
    return reads
