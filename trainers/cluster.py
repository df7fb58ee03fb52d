"""Multi-worker training: TF_CONFIG checks, MultiWorkerMirroredStrategy, who writes what.

TF_CONFIG is TensorFlow's own format, e.g. for the second of two workers:

    {"cluster": {"worker": ["host0:12345", "host1:12345"]},
     "task": {"type": "worker", "index": 1}}

Worker 0 (or the "chief" task, if the cluster has one) is the chief: it alone
writes checkpoints, logs and the export into --workdir; the other workers write
theirs into a scratch directory that is removed when they finish, as
TensorFlow's multi-worker guide prescribes. All workers read the chief's
backup when they restart, so --workdir must be on a file system they share.

Under Slurm (`srun` with several tasks, SLURM_* set and no TF_CONFIG) the cluster
comes from `tf.distribute.cluster_resolver.SlurmClusterResolver` instead: task
SLURM_PROCID is worker PROCID, on port $VICREG_SLURM_PORT (default 8888, plus
the task's index on its node). GPUs are Slurm's to bind (`--gpus-per-task`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .workdirs import tf_makedirs

# How long to wait for every peer's server before giving up with a clear error.
PEER_TIMEOUT_ENV = "VICREG_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 120.0
# Set to keep non-chief scratch directories (in $TMPDIR) after the run, for debugging.
KEEP_SCRATCH_ENV = "VICREG_KEEP_SCRATCH"
SLURM_PORT_ENV = "VICREG_SLURM_PORT"
DEFAULT_SLURM_PORT = 8888


def in_slurm_job(environ=None) -> bool:
    """Whether this process is one of several tasks of a Slurm job step (and TF_CONFIG does not say otherwise)."""
    environ = os.environ if environ is None else environ
    if environ.get("TF_CONFIG") or not environ.get("SLURM_JOB_ID") or "SLURM_PROCID" not in environ:
        return False
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
    return int(tasks) > 1


def slurm_cluster_resolver():
    """TensorFlow's SlurmClusterResolver for this task, leaving the GPUs as Slurm bound them.

    The resolver would set CUDA_VISIBLE_DEVICES itself, but TensorFlow has already
    listed the GPUs by then (vicreg-train does at start-up), so Slurm's binding
    (`--gpus-per-task`, `--gpu-bind`) decides; this task's visible GPUs are its replicas.
    """
    import tensorflow as tf

    from vicreg_tf.compat import expand_tasks_per_node

    gpus = len(tf.config.list_physical_devices("GPU"))
    per_node = max(expand_tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")))

    class SlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
        # The strategy's replicas: this task's visible GPUs (none on CPU nodes), not the
        # resolver's own GPU arithmetic, which is unused here (auto_set_gpu=False) and
        # cannot describe CPU-only tasks.
        def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
            return {"GPU": gpus} if gpus else {}

    return SlurmResolver(port_base=int(os.environ.get(SLURM_PORT_ENV, DEFAULT_SLURM_PORT)),
                         gpus_per_node=per_node, gpus_per_task=1, auto_set_gpu=False)


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


def is_chief_process(environ=None) -> bool:
    """Whether this process reports for the cluster (prints progress), decided before any strategy exists.

    The chief of a TF_CONFIG cluster, task 0 of a Slurm step, and any process
    outside a cluster. A TF_CONFIG that does not parse counts as the chief: the
    strategy then names what is wrong.
    """
    environ = os.environ if environ is None else environ
    if environ.get("TF_CONFIG"):
        try:
            return is_chief_task(parse_tf_config(environ["TF_CONFIG"]))
        except ValueError:
            return True
    if in_slurm_job(environ):
        return environ.get("SLURM_PROCID") == "0"
    return True


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


def multi_worker_strategy(resolver=None):
    """MultiWorkerMirroredStrategy for this TF_CONFIG (checked first) or `resolver`; bounded start-up.

    The constructor starts this worker's server and blocks until every peer has
    joined. A watchdog process ends this worker with a message naming the peers
    that did not answer if that takes longer than $VICREG_PEER_TIMEOUT seconds.
    No timeout is set on the collectives themselves (TensorFlow documents
    `CommunicationOptions.timeout_seconds` as a debugging aid: a timer per
    collective): a peer that dies mid-run is detected by the coordination
    service's heartbeats, which fail the collectives on the other workers.
    """
    import subprocess
    import sys

    import tensorflow as tf

    if resolver is None:
        config = parse_tf_config()
        cluster, task_type, task_id = config["cluster"], config["task"]["type"], config["task"]["index"]
    else:
        cluster, task_type, task_id = resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id
    timeout = float(os.environ.get(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT))
    me = cluster[task_type][task_id]
    peers = [a for job in ("chief", "worker") for a in cluster.get(job, []) if a != me]
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), PEER_TIMEOUT_ENV, *peers]
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    finally:
        watchdog.kill()
        watchdog.wait()


def resolver_role(resolver, workdir) -> WorkerRole:
    """The role of this task of a multi-worker cluster (TF_CONFIG or Slurm)."""
    if os.environ.get("TF_CONFIG"):
        config = parse_tf_config()
    else:  # Slurm: the resolver knows the task
        config = {"cluster": resolver.cluster_spec().as_dict(),
                  "task": {"type": resolver.task_type, "index": resolver.task_id}}
    if is_chief_task(config):
        tf_makedirs(workdir)
        return WorkerRole(True, workdir)
    scratch = tempfile.mkdtemp(prefix=f"vicreg-worker{config['task']['index']}-")
    if not os.environ.get(KEEP_SCRATCH_ENV):
        import atexit

        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return WorkerRole(False, scratch)


class WorkerRole:
    """Who writes what: the chief writes to the workdir, other workers to a scratch copy."""

    def __init__(self, is_chief: bool, workdir: Path):
        self.is_chief = is_chief
        self.workdir = workdir


def preemption_resolver(strategy):
    """The resolver through which a SIGTERM reaches every worker (None outside a cluster).

    MultiWorkerMirroredStrategy without TF_CONFIG or Slurm has a resolver with no
    jobs: one process, which handles its own SIGTERM.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not (os.environ.get("TF_CONFIG") or in_slurm_job()):
        return None
    return resolver


def worker_role(strategy, workdir) -> WorkerRole:
    """The chief of a multi-worker run, or the only process, writes into the workdir."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not (os.environ.get("TF_CONFIG") or in_slurm_job()):
        tf_makedirs(workdir)
        return WorkerRole(True, workdir)
    return resolver_role(resolver, workdir)
