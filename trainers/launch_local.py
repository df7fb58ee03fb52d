"""Runs N vicreg-train workers on this machine as one MultiWorkerMirroredStrategy cluster.

    vicreg-launch-local --workers=2 -- --config=tiny --workdir=/tmp/run

Each worker gets a free port on 127.0.0.1 and its own TF_CONFIG; their output
is streamed with a "[worker i]" prefix. If one worker fails (or is killed),
the others are stopped and the launcher exits with that worker's code, so a
job never hangs on a dead peer. A worker that exits after a preemption (status 143)
is the exception: the others back up at the same step and exit on their own, and
the launcher waits for them (up to PREEMPTION_WAIT seconds). The chief (worker 0) prints the progress and
the kNN monitor; the others print only warnings and errors. Rerunning the same command resumes from the
chief's last backup. For real clusters set TF_CONFIG on each host instead
(docs/DISTRIBUTED.md).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_configs(ports: list[int]) -> list[str]:
    workers = [f"127.0.0.1:{p}" for p in ports]
    return [
        json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        for i in range(len(ports))
    ]


def _stream(index: int, pipe) -> None:
    for line in iter(pipe.readline, ""):
        sys.stdout.write(f"[worker {index}] {line}")
        sys.stdout.flush()


# vicreg_tf.trainers.pretrain when installed, trainers.pretrain in the repository.
PRETRAIN = f"{__package__ or 'trainers'}.pretrain"
PREEMPTED_EXIT_STATUS = 143  # vicreg-train's status after a preemption backup (trainers.pretrain)
# After one worker's preemption exit, how long the others get to back up and exit themselves.
PREEMPTION_WAIT = 120.0


def launch(num_workers: int, train_args: list[str], timeout: float | None = None,
           module: str = PRETRAIN) -> int:
    if num_workers < 1:
        raise ValueError(f"--workers must be >= 1, got {num_workers}")
    procs, threads = [], []
    ports = free_ports(num_workers)
    for index, tf_config in enumerate(tf_configs(ports)):
        env = dict(os.environ, TF_CONFIG=tf_config, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *train_args], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        print(f"launch_local: worker {index} pid {proc.pid} on 127.0.0.1:{ports[index]}", flush=True)
        thread = threading.Thread(target=_stream, args=(index, proc.stdout), daemon=True)
        thread.start()
        procs.append(proc)
        threads.append(thread)
    deadline = None if timeout is None else time.monotonic() + timeout
    status, preempted_at = 0, None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and failed[0][1] == PREEMPTED_EXIT_STATUS and preempted_at is None:
                # Preempted: the others back up at the same step and stop by themselves.
                preempted_at = time.monotonic()
                print(f"launch_local: worker {failed[0][0]} was preempted; waiting up to {PREEMPTION_WAIT:.0f} s "
                      "for the others to back up at the same step", flush=True)
            if failed and (preempted_at is None or None not in codes
                           or time.monotonic() > preempted_at + PREEMPTION_WAIT):
                index, status = failed[0]
                if None in codes:
                    print(f"launch_local: worker {index} exited with code {status}; stopping the others", flush=True)
                else:
                    print(f"launch_local: every worker has stopped, exit codes {codes}", flush=True)
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch_local: timed out after {timeout:.0f} s; stopping all workers", flush=True)
                status = 124
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for thread in threads:
            thread.join(timeout=5)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vicreg-launch-local", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, required=True, help="number of worker processes")
    parser.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the vicreg-train arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        return launch(args.workers, train_args, timeout=args.timeout)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
