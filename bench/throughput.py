"""Train-step throughput: vicreg-tf against a PyTorch peer (lightly's VICRegLoss / the official formula).

Usage: python -m bench.throughput [--networks small_cnn,resnet18_cifar] [--reps 3]
           [--warmup 3] [--steps 10] [--resnet-steps 3] [--variants ...] [--components]

One step = two views of a batch through backbone + expander, the VICReg loss, the backward
pass and a LARS update (lr from warmup-cosine, wd 1e-6, eta 0.001, momentum 0.9, 1-D params
excluded), on pre-generated random views: no input pipeline is timed. Each variant runs in
its own child process, TensorFlow in the main venv and PyTorch in .venv-peer (the two in one
process fight over threads). The children stay alive: each builds, runs --warmup steps
(tracing / XLA compilation happens there), then the parent asks them in turn, alternating
TF and PyTorch, for --steps timed steps, --reps times. A step's time is the interval
between consecutive step ends (Python overhead included, as a user sees it). Reported:
images/s = batch / step time (each image is two views), median over the repetitions, and
the ratio to the PyTorch peer measured in the same script.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
MAIN_PYTHON = Path(sys.executable)
DATE = "2026-11-23"

NETWORKS = {  # name -> (height, width, channels)
    "small_cnn": (28, 28, 1),
    "resnet18_cifar": (32, 32, 3),
}
# variant -> (library, options)
VARIANTS = {
    "tf": ("tf", {}),
    "tf_xla": ("tf", {"jit_compile": True}),
    "tf_bf16": ("tf", {"mixed_precision": "mixed_bfloat16"}),
    "torch_lightly": ("torch", {"loss": "lightly"}),
    "torch_official": ("torch", {"loss": "official"}),
}
LABELS = {
    "tf": "vicreg-tf (tf.function)",
    "tf_xla": "vicreg-tf, jit_compile=True",
    "tf_bf16": "vicreg-tf, mixed_bfloat16",
    "torch_lightly": "PyTorch + lightly VICRegLoss",
    "torch_official": "PyTorch + official formula",
}
# LARS as in the official code (base lr 0.2 x batch / 256); schedule length only sets the lr.
LR_BASE, WEIGHT_DECAY, TOTAL_STEPS, WARMUP_STEPS = 0.2, 1e-6, 1000, 100
PROTOCOL = "@@"


# -- machine and result files (shared by the other bench modules) ------------------------


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "date": DATE, "python": platform.python_version()}


def write_results(name: str, payload: dict, markdown: str) -> None:
    """bench/results/NAME.json and NAME.md, each replaced in one step (partial runs stay readable)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2)), (".md", markdown)):
        tmp = RESULTS / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, RESULTS / f"{name}{suffix}")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- child processes -------------------------------------------------------------------------


class Worker:
    """A child process that builds one variant and answers `run N` / `components N` / `quit`."""

    def __init__(self, variant: str, network: str, batch: int, expander: str, log_dir: Path, peer_python: Path):
        library, options = VARIANTS[variant]
        python = MAIN_PYTHON if library == "tf" else peer_python
        spec = {"library": library, "network": network, "batch": batch, "expander": expander, **options}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"throughput-{network}-{variant}.log", "w")
        self.variant = variant
        self.proc = subprocess.Popen(
            [str(python), "-m", "bench.throughput", "--worker", json.dumps(spec)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.variant} exited (rc={self.proc.wait()}); see {self.log.name}")
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit")
            except (RuntimeError, BrokenPipeError):
                pass
            self.proc.wait(timeout=60)
        self.log.close()


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serve(step, components) -> None:
    """The worker loop: `run N` times N steps (N intervals between N + 1 step ends)."""
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "quit":
            break
        if command == "run":
            out = step(int(arg))
        elif command == "components":
            out = components(int(arg))
        else:
            out = {"error": f"unknown command {command!r}"}
        out["rss_mib"] = _rss_mib()
        print(PROTOCOL + json.dumps(out), flush=True)


def _tf_worker(spec: dict) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    import vicreg_tf
    from vicreg_tf import backbones

    if spec.get("mixed_precision"):
        keras.mixed_precision.set_global_policy(spec["mixed_precision"])
    keras.utils.set_random_seed(0)
    h, w, c = NETWORKS[spec["network"]]
    backbone = getattr(backbones, spec["network"])((h, w, c))
    model = vicreg_tf.VICReg(backbone, projector=spec["expander"])
    batch = spec["batch"]
    lr = vicreg_tf.warmup_cosine(vicreg_tf.scaled_learning_rate(LR_BASE, batch), TOTAL_STEPS, WARMUP_STEPS)
    model.compile(optimizer=vicreg_tf.LARS(lr, weight_decay=WEIGHT_DECAY), jit_compile=bool(spec.get("jit_compile")))
    rng = np.random.default_rng(0)
    views = tuple(tf.constant(rng.random((batch, h, w, c), dtype=np.float32)) for _ in range(2))
    dataset = tf.data.Dataset.from_tensors(views).repeat()

    class Ends(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.loss = float(logs["loss"])  # waits for the step
            self.times.append(time.perf_counter())

    ends = Ends()

    def step(n):
        ends.times = []
        t0 = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=n + 1, verbose=0, callbacks=[ends])
        times = [b - a for a, b in zip(ends.times, ends.times[1:])]
        return {"step_s": times, "first_s": ends.times[0] - t0, "loss": ends.loss}

    trainables = model.trainable_variables

    @tf.function(jit_compile=bool(spec.get("jit_compile")))
    def forward(a, b):
        z_a, z_b = model._embed(a, b, training=True)
        return tf.reduce_sum(tf.cast(z_a, tf.float32)) + tf.reduce_sum(tf.cast(z_b, tf.float32))

    @tf.function(jit_compile=bool(spec.get("jit_compile")))
    def forward_backward(a, b):
        with tf.GradientTape() as tape:
            loss = model.compute_vicreg_terms((a, b), training=True)["loss"]
        grads = tape.gradient(loss, trainables)
        return loss, tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])

    def components(n):
        out = {}
        for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
            fn(*views)  # trace
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                result = fn(*views)
                tf.nest.map_structure(lambda t: t.numpy(), result)
                times.append(time.perf_counter() - t0)
            out[name] = times
        return out

    print(PROTOCOL + json.dumps({"ready": True,
                                  "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                                              tf.config.threading.get_inter_op_parallelism_threads()],
                                  "version": tf.__version__}), flush=True)
    _serve(step, components)


def _torch_worker(spec: dict) -> None:
    import torch

    from bench import peer_torch

    torch.manual_seed(0)
    h, w, c = NETWORKS[spec["network"]]
    model = peer_torch.VICRegPeer(spec["network"], spec["expander"], c).train()
    loss_fn = peer_torch.make_loss(spec["loss"])
    batch = spec["batch"]
    base_lr = LR_BASE * batch / 256
    optimizer = peer_torch.make_lars(model, lr=base_lr, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(0)
    views = [torch.rand(batch, c, h, w, generator=generator) for _ in range(2)]
    state = {"step": 0}

    def one():
        peer_torch.adjust_learning_rate(optimizer, state["step"], TOTAL_STEPS, WARMUP_STEPS, base_lr)
        state["step"] += 1
        return float(peer_torch.train_step(model, optimizer, loss_fn, *views))

    def step(n):
        t0 = time.perf_counter()
        ends = []
        for _ in range(n + 1):
            loss = one()
            ends.append(time.perf_counter())
        return {"step_s": [b - a for a, b in zip(ends, ends[1:])], "first_s": ends[0] - t0, "loss": loss}

    def components(n):
        out = {"forward": [], "forward_backward": []}
        for _ in range(n):
            t0 = time.perf_counter()
            z_a, z_b = model.embed(views[0]), model.embed(views[1])
            float(z_a.sum() + z_b.sum())
            out["forward"].append(time.perf_counter() - t0)
            del z_a, z_b
            optimizer.zero_grad()
            t0 = time.perf_counter()
            loss = loss_fn(model.embed(views[0]), model.embed(views[1]))
            loss.backward()
            float(loss)
            out["forward_backward"].append(time.perf_counter() - t0)
        optimizer.zero_grad()
        return out

    print(PROTOCOL + json.dumps({"ready": True, "threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
                                  "version": torch.__version__}), flush=True)
    _serve(step, components)


# -- the parent ---------------------------------------------------------------------------------


def _summary(runs: list[dict], batch: int) -> dict:
    per_rep = [batch * len(r["step_s"]) / sum(r["step_s"]) for r in runs]
    return {
        "images_per_s_median": statistics.median(per_rep),
        "images_per_s_reps": per_rep,
        "step_ms_median": 1000 * statistics.median(s for r in runs for s in r["step_s"]),
        "loss_last": runs[-1]["loss"],
    }


def markdown(payload: dict) -> str:
    out = [f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores; date {payload['machine']['date']}; "
           f"batch {payload['batch']} (two views each), expander {payload['expander']}, "
           f"{payload['warmup']} warm-up + {{steps}} timed steps x {payload['reps']} alternating repetitions; "
           f"images/s = batch / step time, median of repetitions.\n"]
    out[0] = out[0].replace("{steps}", "/".join(str(s) for s in payload["steps"].values()))
    rows = []
    for network, variants in payload["results"].items():
        peers = {k: v["images_per_s_median"] for k, v in variants.items() if k.startswith("torch") and "images_per_s_median" in v}
        for variant, r in variants.items():
            if "images_per_s_median" not in r:
                rows.append([network, LABELS[variant], r.get("error", "n/a"), "", "", "", ""])
                continue
            reps = r["images_per_s_reps"]
            ratio = lambda peer: f"{r['images_per_s_median'] / peers[peer]:.2f}x" if peer in peers else "-"
            rows.append([network, LABELS[variant], f"{r['images_per_s_median']:.1f}",
                         f"{min(reps):.1f}-{max(reps):.1f}", f"{r['step_ms_median']:.0f}",
                         ratio("torch_lightly"), ratio("torch_official")])
    out.append(md_table(["network", "implementation", "images/s (median)", "range", "step ms", "vs torch+lightly", "vs torch+official"], rows))
    comps = payload.get("components", {})
    if comps:
        out.append("\nComponents (median ms of one call: both views through backbone + expander; + loss + backward;"
                   " the full step from the table; optimizer and overhead = step - forward/backward):\n")
        crow = []
        for network, variants in comps.items():
            for variant, c in variants.items():
                step_ms = payload["results"][network].get(variant, {}).get("step_ms_median")
                fwd, fb = 1000 * statistics.median(c["forward"]), 1000 * statistics.median(c["forward_backward"])
                crow.append([network, LABELS[variant], f"{fwd:.0f}", f"{fb:.0f}", f"{fb - fwd:.0f}",
                             f"{step_ms:.0f}" if step_ms else "-", f"{step_ms - fb:.0f}" if step_ms else "-"])
        out.append(md_table(["network", "implementation", "forward ms", "fwd+loss+bwd ms", "loss+bwd ms", "step ms", "optimizer+overhead ms"], crow))
    return "\n".join(out)


def run(args) -> dict:
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; expected some of {sorted(VARIANTS)}")
    if any(VARIANTS[v][0] == "torch" for v in variants) and not Path(args.peer_python).exists():
        print(f"note: {args.peer_python} missing, PyTorch peers skipped (see bench/requirements-peer.txt)")
        variants = [v for v in variants if VARIANTS[v][0] != "torch"]
    networks = [n for n in args.networks.split(",") if n]
    steps = {n: (args.resnet_steps if n == "resnet18_cifar" and args.resnet_steps else args.steps) for n in networks}
    payload = {"machine": machine(), "batch": args.batch, "expander": args.expander, "warmup": args.warmup,
               "steps": steps, "reps": args.reps, "variants": variants, "results": {}, "components": {},
               "workers": {}, "command": "python -m bench.throughput " + " ".join(args.argv)}
    log_dir = RESULTS / "logs"
    for network in networks:
        results = payload["results"].setdefault(network, {})
        runs = {v: [] for v in variants}
        workers = {}
        # Build one at a time so start-up (imports, tracing, XLA) never overlaps a timing.
        for v in variants:
            t0 = time.perf_counter()
            worker = Worker(v, network, args.batch, args.expander, log_dir, Path(args.peer_python))
            try:
                info = worker.read()
                warm = worker.ask(f"run {args.warmup}")
            except RuntimeError as error:
                print(f"  {network} {v}: failed ({error})", flush=True)
                results[v] = {"error": "failed to run, see log"}
                worker.close()
                continue
            info.update(warmup_s=time.perf_counter() - t0, warmup_steps_s=warm["step_s"], first_step_s=warm["first_s"],
                        rss_mib=warm["rss_mib"])
            payload["workers"][f"{network}/{v}"] = info
            print(f"  {network} {v}: ready in {info['warmup_s']:.0f}s, rss {warm['rss_mib']:.0f} MiB", flush=True)
            workers[v] = worker
        try:
            order = [v for v in variants if v in workers]
            for rep in range(args.reps):
                # Interleave TF and PyTorch; reverse every other repetition against drift.
                for v in (order if rep % 2 == 0 else order[::-1]):
                    time.sleep(0.5)  # let the previous child's threads go idle
                    out = workers[v].ask(f"run {steps[network]}")
                    runs[v].append(out)
                    results[v] = _summary(runs[v], args.batch)
                    print(f"  {network} rep {rep} {v}: {results[v]['images_per_s_reps'][-1]:.1f} images/s", flush=True)
                write_results("throughput", payload, markdown(payload))
            if args.components:
                comps = payload["components"].setdefault(network, {})
                for v in order:
                    comps[v] = workers[v].ask(f"components {args.components}")
                    write_results("throughput", payload, markdown(payload))
        finally:
            for worker in workers.values():
                worker.close()
        write_results("throughput", payload, markdown(payload))
    return payload


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--networks", default="small_cnn,resnet18_cifar")
    parser.add_argument("--variants", default="tf,torch_lightly,tf_xla,torch_official,tf_bf16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--expander", default="2048-2048-2048")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per child (tracing, XLA compile)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--resnet-steps", type=int, default=3, help="timed steps per repetition for resnet18_cifar (0: --steps)")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--components", type=int, default=3, help="calls for the forward / backward breakdown (0: off)")
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        (_tf_worker if spec["library"] == "tf" else _torch_worker)(spec)
        return 0
    args.argv = argv
    payload = run(args)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
