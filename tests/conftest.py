"""Test session setup: one TensorFlow import, two logical CPUs for the whole session.

The logical devices must be configured before any TensorFlow op runs, so this
happens at import time of the conftest, before any test module is collected.
Tests that need a second process (CLI tools, SIGKILL, multi-worker) spawn one
with `run_python` below.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
    keras.backend.clear_session()


@pytest.fixture(scope="session")
def two_cpu_strategy():
    # One strategy per process: two MirroredStrategy objects over the same devices
    # reuse collective instance keys and clash ("Collective instance N expected type ...").
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def rng():
    return np.random.default_rng(0)
