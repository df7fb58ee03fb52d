"""Multi-worker training: TF_CONFIG checks, MultiWorkerMirroredStrategy, who writes what.

TF_CONFIG is TensorFlow's own format, e.g. for the second of two workers:

    {"cluster": {"worker": ["host0:12345", "host1:12345"]},
     "task": {"type": "worker", "index": 1}}

Worker 0 (or the "chief" task, if the cluster has one) is the chief: it alone
writes checkpoints, logs and the export into --workdir; the other workers write
theirs into a scratch directory that is removed when they finish, as
TensorFlow's multi-worker guide prescribes. All workers read the chief's
backup when they restart, so --workdir must be on a file system they share.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from trainers.common import WorkerRole

# How long to wait for every peer's server before giving up with a clear error.
PEER_TIMEOUT_ENV = "VICREG_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 120.0
# Set to keep non-chief scratch directories (in $TMPDIR) after the run, for debugging.
KEEP_SCRATCH_ENV = "VICREG_KEEP_SCRATCH"


def parse_tf_config(raw: str | None = None) -> dict:
    """Parses and checks TF_CONFIG; raises ValueError naming what is wrong."""
    raw = os.environ.get("TF_CONFIG", "") if raw is None else raw
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {raw[:200]!r}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError(f'TF_CONFIG needs a "cluster" object, got {raw[:200]!r}')
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f'TF_CONFIG needs a "task" with "type" and "index", got {task!r}')
    cluster = config["cluster"]
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise ValueError(f'TF_CONFIG cluster job {job!r} must list "host:port" strings, got {addresses!r}')
    if task["type"] not in cluster:
        raise ValueError(f"TF_CONFIG task type {task['type']!r} is not a job of the cluster {sorted(cluster)}")
    size = len(cluster[task["type"]])
    if not isinstance(task["index"], int) or not 0 <= task["index"] < size:
        raise ValueError(
            f"TF_CONFIG task index {task['index']!r} is out of range: job {task['type']!r} has {size} task(s)"
        )
    return config


def is_chief_task(config: dict) -> bool:
    task = config["task"]
    if "chief" in config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


# Runs beside a worker while MultiWorkerMirroredStrategy's constructor waits for
# its peers. That wait is in C++ and holds the GIL, so no Python thread or signal
# handler of the worker itself can interrupt it; this separate process can.
_WATCHDOG = r"""
import os, signal, socket, sys, time
parent, timeout, env, peers = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
time.sleep(timeout)
if os.getppid() != parent:
    sys.exit(0)
missing = []
for address in peers:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except OSError:
        missing.append(address)
what = "peer " + ", ".join(missing) if missing else "the cluster (every peer answered, but it did not form)"
sys.stderr.write(
    f"error: {what} from TF_CONFIG did not answer within {timeout:.0f} s; is its worker running? "
    f"(set {env} to wait longer). Stopping this worker.\n"
)
sys.stderr.flush()
os.kill(parent, signal.SIGKILL)  # SIGTERM is not enough: the wait ignores it
"""


def multi_worker_strategy():
    """MultiWorkerMirroredStrategy for this TF_CONFIG, after checking it; bounded by the peer timeout.

    The constructor starts this worker's server and blocks until every peer has
    joined. A watchdog process ends this worker with a message naming the peers
    that did not answer if that takes longer than $VICREG_PEER_TIMEOUT seconds.
    """
    import subprocess
    import sys

    import tensorflow as tf

    config = parse_tf_config()
    timeout = float(os.environ.get(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT))
    me = config["cluster"][config["task"]["type"]][config["task"]["index"]]
    peers = [a for job in ("chief", "worker") for a in config["cluster"].get(job, []) if a != me]
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), PEER_TIMEOUT_ENV, *peers]
    )
    try:
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    finally:
        watchdog.kill()
        watchdog.wait()


def worker_role(resolver, workdir: Path) -> WorkerRole:
    config = parse_tf_config()
    if is_chief_task(config):
        workdir.mkdir(parents=True, exist_ok=True)
        return WorkerRole(True, workdir)
    scratch = Path(tempfile.mkdtemp(prefix=f"vicreg-worker{config['task']['index']}-"))
    if not os.environ.get(KEEP_SCRATCH_ENV):
        import atexit

        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return WorkerRole(False, scratch)
