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
    "tf": ("tf", {}),  # the package's defaults: oneDNN kernels on, fused BatchNormalization
    "tf_xla": ("tf", {"jit_compile": True}),
    "tf_bf16": ("tf", {"mixed_precision": "mixed_bfloat16"}),
    # The two fixes, one at a time: Keras' own BatchNormalization (oneDNN on), and neither
    # (TF's default on CPUs without AVX-512 VNNI/AMX: Eigen kernels, Keras BN; vicreg-tf <= 69da234).
    "tf_keras_bn": ("tf", {"fused_batchnorm": False}),
    "tf_eigen": ("tf", {"onednn": "0", "fused_batchnorm": False}),
    "torch_lightly": ("torch", {"loss": "lightly"}),
    "torch_official": ("torch", {"loss": "official"}),
}
LABELS = {
    "tf": "vicreg-tf (tf.function)",
    "tf_xla": "vicreg-tf, jit_compile=True",
    "tf_bf16": "vicreg-tf, mixed_bfloat16",
    "tf_keras_bn": "vicreg-tf, Keras BatchNormalization (not fused)",
    "tf_eigen": "vicreg-tf, no oneDNN, Keras BatchNormalization (previous default)",
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
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    bf16 = sorted({"avx512_bf16", "amx_bf16"} & flags)
    return {"cpu": model, "cores": os.cpu_count(), "date": DATE, "python": platform.python_version(),
            "device": f"CPU: {model}" + (f" ({', '.join(bf16)})" if bf16 else " (no native bfloat16)")}


def write_results(name: str, payload: dict, markdown: str) -> None:
    """bench/results/NAME.json and NAME.md, each replaced in one step (partial runs stay readable)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2)), (".md", markdown)):
        tmp = RESULTS / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, RESULTS / f"{name}{suffix}")


def md_table(header: list[str], rows: list[list]) -> str:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- child processes -------------------------------------------------------------------------


class Worker:
    """A child process that builds one variant and answers `run N` / `components N` / `quit`."""

    def __init__(self, variant: str, network: str, batch: int, expander: str, log_dir: Path, peer_python: Path):
        library, options = VARIANTS[variant]
        python = MAIN_PYTHON if library == "tf" else peer_python
        spec = {"library": library, "network": network, "batch": batch, "expander": expander, **options}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT),
                   TF_ENABLE_ONEDNN_OPTS=options.get("onednn", "1"))
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


def _serve(step, components, profile=None) -> None:
    """The worker loop: `run N` times N steps (N intervals between N + 1 step ends)."""
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "quit":
            break
        if command == "run":
            out = step(int(arg))
        elif command == "components":
            out = components(int(arg))
        elif command == "profile" and profile is not None:
            out = profile(int(arg))
        else:
            out = {"error": f"unknown command {command!r}"}
        out["rss_mib"] = _rss_mib()
        print(PROTOCOL + json.dumps(out), flush=True)


def _tf_worker(spec: dict) -> None:
    import vicreg_tf  # first, as users do (each variant sets TF_ENABLE_ONEDNN_OPTS itself)

    # isort: split
    import keras
    import numpy as np
    import tensorflow as tf

    from vicreg_tf import backbones

    if spec.get("mixed_precision"):
        keras.mixed_precision.set_global_policy(spec["mixed_precision"])
    keras.utils.set_random_seed(0)
    h, w, c = NETWORKS[spec["network"]]
    backbone = getattr(backbones, spec["network"])((h, w, c))
    model = vicreg_tf.VICReg(backbone, projector=spec["expander"], fused_batchnorm=spec.get("fused_batchnorm", True))
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
        z_a, z_b = model.embed(a, b, training=True)
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
    _serve(step, components, lambda n: _tf_profile(step, n))


def _op_type(name: str) -> str:
    """The op type of a profile event name ("scope/op:Type"), with oneDNN's kernel prefixes and
    fusions folded in: _MklNativeConv2D -> Conv2D, _MklNativeFusedMatMul (matmul + bias) -> MatMul."""
    op_type = name.rsplit(":", 1)[-1]
    for prefix in ("_MklNative", "_Mkl"):
        if op_type.startswith(prefix):
            op_type = op_type[len(prefix):]
            break
    return {"FusedMatMul": "MatMul", "FusedConv2D": "Conv2D"}.get(op_type, op_type)


def _op_category(name: str) -> str:
    op_type = _op_type(name)
    if "/lars/" in name or name.startswith("lars/"):
        return "LARS update"
    if op_type in ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "MatMul", "BatchMatMulV2"):
        return op_type
    if "/bn" in name or "batch_normalization" in name.lower() or "FusedBatchNorm" in op_type:
        return "BatchNorm (fwd + bwd)"
    return "other (ReLU, pooling, loss, casts, ...)"


def _tf_profile(step, n: int) -> dict:
    """Runs n steps under tf.profiler and sums op time per category from the XPlane trace
    (op events on the executor threads; the Eigen work inside them is not counted twice)."""
    import collections
    import glob
    import shutil
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="vicreg_profile_")
    tf.profiler.experimental.start(logdir)
    timed = step(n)
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    space.ParseFromString(open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[-1], "rb").read())
    shutil.rmtree(logdir, ignore_errors=True)
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or name.startswith(("ThreadpoolListener", "ExecutorState")):
                    continue
                totals[_op_category(name)] += event.duration_ps / 1e9
    steps = n + 1
    return {"ms_per_step": {k: v / steps for k, v in totals.most_common()}, "step_s": timed["step_s"]}


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
            float((z_a.sum() + z_b.sum()).detach())
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
        "load_avg_1min": [r.get("load_before") for r in runs],
    }


def _ratio_text(r: dict, peer: dict) -> str:
    """Ratio of medians, and in brackets the median of the per-repetition ratios (each TF
    repetition against the peer's repetition of the same round: less sensitive to load drift)."""
    of_medians = r["images_per_s_median"] / peer["images_per_s_median"]
    paired = [a / b for a, b in zip(r["images_per_s_reps"], peer["images_per_s_reps"])]
    if r.get("probe") or len(paired) < 2:
        return f"{of_medians:.2f}x"
    return f"{of_medians:.2f}x ({statistics.median(paired):.2f}x)"


def markdown(payload: dict) -> str:
    payload["loads"] = [item for vs in payload["results"].values() for r in vs.values()
                        for item in r.get("load_avg_1min", []) if item]
    machine = payload["machine"]
    out = [f"Machine: {machine['cpu']}, {machine['cores']} cores; date {machine['date']}; "
           f"batch {payload['batch']} (two views each), expander {payload['expander']}, "
           f"{{warmup}} warm-up + {{steps}} timed steps x {payload['reps']} alternating repetitions; "
           f"images/s = batch / step time, median of repetitions. "
           f"1-minute load average during the timings (other users share these cores): "
           f"{min(payload['loads'] or [0]):.1f}-{max(payload['loads'] or [0]):.1f}.\n"]
    out[0] = out[0].replace("{steps}", "/".join(str(s) for s in payload["steps"].values()) + " (per network)")
    warm = payload["warmup"]
    warm_text = "/".join(str(s) for s in warm.values()) if isinstance(warm, dict) else str(warm)
    out[0] = out[0].replace("{warmup}", warm_text)
    rows = []
    device = payload["machine"].get("device", payload["machine"]["cpu"])
    for network, variants in payload["results"].items():
        peers = {k: v["images_per_s_median"] for k, v in variants.items()
                 if k.startswith("torch") and "images_per_s_median" in v}
        for variant, r in variants.items():
            if "images_per_s_median" not in r:
                rows.append([network, device, LABELS[variant], r.get("error", "n/a"), "", "", "", ""])
                continue
            reps = r["images_per_s_reps"]

            def ratio(peer, r=r, variants=variants, peers=peers):
                return _ratio_text(r, variants.get(peer)) if peer in peers else "-"

            label = LABELS[variant] + (" (probe: 2 steps, once)" if r.get("probe") else "")
            rows.append([network, device, label, f"{r['images_per_s_median']:.1f}",
                         f"{min(reps):.1f}-{max(reps):.1f}", f"{r['step_ms_median']:.0f}",
                         ratio("torch_lightly"), ratio("torch_official")])
    out.append(md_table(["network", "device", "implementation", "images/s (median)", "range", "step ms",
                         "vs torch+lightly", "vs torch+official"], rows))
    out.append("Ratios: of the medians, and (in brackets) the median of per-repetition ratios.\n")
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
        out.append(md_table(["network", "implementation", "forward ms", "fwd+loss+bwd ms", "loss+bwd ms", "step ms",
                             "optimizer+overhead ms"], crow))
    prof = payload.get("profile", {})
    if prof:
        out.append("\nWhere vicreg-tf's step time goes (tf.profiler, op time summed per category, ms per step; "
                   "ops may overlap across the inter-op threads):\n")
        prow = []
        for network, variants in prof.items():
            for variant, p in variants.items():
                for category, ms in p["ms_per_step"].items():
                    prow.append([network, LABELS[variant], category, f"{ms:.0f}"])
        out.append(md_table(["network", "implementation", "op category", "ms / step"], prow))
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
    def resnet(n):
        return n == "resnet18_cifar"

    steps = {n: (args.resnet_steps if resnet(n) and args.resnet_steps else args.steps) for n in networks}
    warmups = {n: (args.resnet_warmup if resnet(n) and args.resnet_warmup else args.warmup) for n in networks}
    resnet_variants = [v for v in args.resnet_variants.split(",") if v in variants]
    network_variants = {n: (resnet_variants if resnet(n) and args.resnet_variants else variants) for n in networks}
    payload = {"machine": machine(), "batch": args.batch, "expander": args.expander, "warmup": warmups,
               "steps": steps, "reps": args.reps, "variants": network_variants, "results": {}, "components": {},
               "workers": {}, "commands": ["python -m bench.throughput " + " ".join(args.argv)]}
    previous = RESULTS / f"{args.out}.json"
    if previous.exists():  # keep other networks' rows from an earlier run with the same batch and expander
        old = json.loads(previous.read_text())
        same_setup = (old.get("batch"), old.get("expander")) == (args.batch, args.expander)
        if same_setup and isinstance(old.get("warmup"), dict):
            for key in ("results", "components", "profile", "workers"):
                kept = {k: v for k, v in old.get(key, {}).items() if k.split("/")[0] not in networks}
                payload.setdefault(key, {}).update(kept)
            for key in ("steps", "warmup", "variants"):
                payload[key] = {**{k: v for k, v in old[key].items() if k not in networks}, **payload[key]}
            payload["commands"] = old.get("commands", []) + payload["commands"]
    log_dir = RESULTS / "logs"
    for network in networks:
        results = payload["results"].setdefault(network, {})
        runs = {v: [] for v in network_variants[network]}
        workers = {}
        # Build one at a time so start-up (imports, tracing, XLA) never overlaps a timing.
        for v in network_variants[network]:
            t0 = time.perf_counter()
            worker = Worker(v, network, args.batch, args.expander, log_dir, Path(args.peer_python))
            try:
                info = worker.read()
                warm = worker.ask(f"run {warmups[network] - 1}")  # run N times N + 1 steps
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
                    load = os.getloadavg()[0]
                    out = workers[v].ask(f"run {steps[network]}")
                    out["load_before"], out["load_after"] = load, os.getloadavg()[0]
                    runs[v].append(out)
                    results[v] = _summary(runs[v], args.batch)
                    print(f"  {network} rep {rep} {v}: {results[v]['images_per_s_reps'][-1]:.1f} images/s", flush=True)
                write_results(args.out, payload, markdown(payload))
            if args.profile and network in args.components_networks.split(","):
                for v in [v for v in order if v in ("tf", "tf_eigen")]:
                    profile = workers[v].ask(f"profile {args.profile}")
                    payload.setdefault("profile", {}).setdefault(network, {})[v] = profile
                    write_results(args.out, payload, markdown(payload))
            if args.components and network in args.components_networks.split(","):
                comps = payload["components"].setdefault(network, {})
                for v in order:
                    comps[v] = workers[v].ask(f"components {args.components}")
                    write_results(args.out, payload, markdown(payload))
        finally:
            for worker in workers.values():
                worker.close()
        if network in args.bf16_probe.split(",") and "tf_bf16" not in network_variants[network]:
            _bf16_probe(payload, network, args, log_dir)
        write_results(args.out, payload, markdown(payload))
    return payload


def _bf16_probe(payload: dict, network: str, args, log_dir: Path) -> None:
    worker = Worker("tf_bf16", network, args.batch, args.expander, log_dir, Path(args.peer_python))
    try:
        worker.read()
        worker.ask("run 1")
        out = worker.ask("run 2")
        out["load_before"] = out["load_after"] = os.getloadavg()[0]
        payload["results"][network]["tf_bf16"] = dict(_summary([out], args.batch), probe=True)
        probe = payload["results"][network]["tf_bf16"]["images_per_s_median"]
        print(f"  {network} tf_bf16 probe: {probe:.1f} images/s", flush=True)
    except RuntimeError as error:
        payload["results"][network]["tf_bf16"] = {"error": f"failed: {error}"}
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--networks", default="small_cnn,resnet18_cifar")
    parser.add_argument("--variants", default="tf,torch_lightly,tf_eigen,tf_keras_bn,tf_xla,torch_official",
                        help="timed alternately; tf_bf16 is also a variant (slow on CPUs without bf16 units)")
    parser.add_argument("--bf16-probe", default="small_cnn",
                        help="networks where mixed_bfloat16 gets a short probe (1 warm-up + 2 steps, once); "
                             "'' for none")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--expander", default="2048-2048-2048")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per child (tracing, XLA compile)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    parser.add_argument("--resnet-steps", type=int, default=1,
                        help="timed steps per repetition for resnet18_cifar (0: --steps)")
    parser.add_argument("--resnet-warmup", type=int, default=2, help="warm-up steps for resnet18_cifar (0: --warmup)")
    parser.add_argument("--resnet-variants", default="tf,torch_lightly,tf_eigen,tf_xla",
                        help="variants for resnet18_cifar ('': --variants)")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--components", type=int, default=2, help="calls for the forward / backward breakdown (0: off)")
    parser.add_argument("--components-networks", default="small_cnn", help="networks that get the breakdown")
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    parser.add_argument("--profile", type=int, default=2,
                        help="steps of tf.profiler op breakdown for the TF variants (0: off)")
    parser.add_argument("--out", default="throughput", help="name of the result files in bench/results")
    parser.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json")
    args = parser.parse_args(argv)
    if args.render:
        payload = json.loads((RESULTS / f"{args.out}.json").read_text())
        write_results(args.out, payload, markdown(payload))
        print(markdown(payload))
        return 0
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
