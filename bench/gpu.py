"""GPU acceptance run: `python -m bench.gpu` (under 8 minutes on one GPU), writes bench/results/gpu.{md,json}.

On a machine with a GPU it measures, with everything on "auto":
  1. a one-GPU `vicreg-train` of the tiny config for about 200 steps (what it chose, its first line,
     wall time, the loss at the end);
  2. ResNet-50 (torchvision layout) at 224x224 in mixed_bfloat16: train-step images/s and peak GPU memory;
  3. input view pairs/s at 224 on this host's cores, views made on the host and on the device, against
     what the step of (2) consumes;
  4. MirroredStrategy over two logical GPUs made from the one: one step equals one device within 1e-4;
  5. the NaN guard (a NaN pixel: every weight bitwise unchanged) and float16 loss scaling on the GPU.
Without a GPU it says so, runs the parts that TensorFlow's GPU code paths allow on the CPU
(`vicreg_tf.gpu_emulation`: the one-GPU cells of the matrix, and the one-GPU strategy choice:
default strategy against MirroredStrategy over one device, step time on the CPU), and exits 0.
Every figure names the device it was measured on; nothing here is an estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")


def _step_time(model, batch, steps: int) -> float:
    """Seconds per train step after two warm-up steps (trace, compile)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(dataset, steps_per_epoch=2, verbose=0)
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, verbose=0)
    return (time.perf_counter() - start) / steps


# --------------------------------------------------------------------------- parts that need a GPU

def one_gpu_training_run(workdir: Path) -> dict:
    command = [sys.executable, "-m", "trainers.pretrain", "--config=tiny", f"--workdir={workdir}",
               "--config.training.epochs=4", "--config.training.steps_per_epoch=50",
               "--config.export.enabled=False"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO)
    lines = result.stdout.splitlines()
    return {"part": "one-GPU vicreg-train, tiny config, 200 steps, auto", "rc": result.returncode,
            "first_line": next((line for line in lines if line.startswith("devices:")), ""),
            "wall_s": round(time.perf_counter() - start, 1), "stderr_tail": result.stderr[-400:]}


def resnet50_step(batch_size: int = 64, steps: int = 20) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import vicreg_tf

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = vicreg_tf.VICReg(vicreg_tf.backbones.resnet50_torchvision((224, 224, 3)), projector="8192-8192-8192")
        model.compile(optimizer=vicreg_tf.LARS(0.1), jit_compile=True)
        images = np.random.default_rng(0).uniform(size=(batch_size, 224, 224, 3)).astype(np.float32)
        tf.config.experimental.reset_memory_stats("GPU:0")
        seconds = _step_time(model, (images, images[::-1].copy()), steps)
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {"part": "ResNet-50 224x224 mixed_bfloat16, XLA", "batch": batch_size,
            "images_per_s": round(batch_size / seconds, 1), "peak_gpu_mb": round(peak / 2**20)}


def input_rate(steps: int = 10, batch_size: int = 64) -> list[dict]:
    from vicreg_tf import augment, data

    rows = []
    folder = REPO / "bench" / "results" / "photos"
    from bench.streaming import make_photos

    source = data.FolderSource(make_photos(folder, 512), 3)
    views = augment.paper_views(224, seed=0)
    for device in (False, True):
        batches = data.view_pair_batches(source, views, batch_size, steps_per_epoch=steps + 1, epochs=1,
                                         seed=0, device_views=device)
        iterator = iter(batches)
        next(iterator)
        start = time.perf_counter()
        for _ in range(steps):
            next(iterator)
        pairs = steps * batch_size / (time.perf_counter() - start)
        rows.append({"part": f"input at 224, views on the {'device' if device else 'host'} (host work only)",
                     "view_pairs_per_s": round(pairs, 1), "cores": os.cpu_count()})
    return rows


def two_logical_gpus_equal_one(tolerance: float = 1e-4) -> dict:
    """Run in a child: the logical GPUs must be configured before TensorFlow starts."""
    code = r"""
import json, keras, numpy as np, tensorflow as tf
gpu = tf.config.list_physical_devices("GPU")[0]
tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=4096)] * 2)
import vicreg_tf
def model():
    keras.utils.set_random_seed(0)
    return vicreg_tf.VICReg(vicreg_tf.backbones.small_cnn((32, 32, 3), widths=(8, 16)), projector="64-64")
x = np.random.default_rng(0).uniform(size=(32, 32, 32, 3)).astype("float32")
data = tf.data.Dataset.from_tensors((x, x[::-1].copy()))
single = model(); start = single.get_weights()
single.compile(optimizer=keras.optimizers.SGD(0.5)); single.fit(data, verbose=0)
strategy = tf.distribute.MirroredStrategy(["/gpu:0", "/gpu:1"])
with strategy.scope():
    mirrored = model(); mirrored.set_weights(start); mirrored.compile(optimizer=keras.optimizers.SGD(0.5))
mirrored.fit(data, verbose=0)
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single.get_weights(), mirrored.get_weights()))
print(json.dumps({"max_abs_difference": diff}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO)
    if result.returncode:
        return {"part": "Mirrored over 2 logical GPUs = one device", "error": result.stderr[-400:]}
    diff = json.loads(result.stdout.strip().splitlines()[-1])["max_abs_difference"]
    return {"part": "Mirrored over 2 logical GPUs = one device", "max_abs_difference": diff,
            "within_1e-4": diff < tolerance}


def guard_on_gpu() -> list[dict]:
    from vicreg_tf import gpu_emulation as emulation

    rows = []
    for cell in (emulation.Cell("default", True, "mixed_bfloat16", "vicreg", "host"),
                 emulation.Cell("default", False, "mixed_float16", "vicreg", "host"),
                 emulation.Cell("default", False, "float32", "vicreg", "device")):
        rows.append({"part": f"NaN guard / loss scaling on the GPU: {cell.id}", **emulation.run_cell(cell)})
    return rows


# --------------------------------------------------------------------------- parts that run on the CPU

def emulated_cells() -> list[dict]:
    """The one-GPU cells on TensorFlow's GPU code paths, each in a child (XLA collectives; see tests)."""
    from vicreg_tf import gpu_emulation as emulation

    rows = []
    for strategy in ("default", "mirrored1"):
        cells = [c.id for c in emulation.all_cells() if c.strategy == strategy and c.method == "vicreg"
                 and c.views == "host"]
        result = subprocess.run([sys.executable, "-m", "vicreg_tf.gpu_emulation", *cells], capture_output=True,
                                text=True, env=_env(), cwd=REPO)
        for line in result.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                rows.append({"part": f"emulated cell {record.pop('cell')}", **record})
    return rows


CHOICE = r"""
import vicreg_tf
import json, sys, time, keras, numpy as np, tensorflow as tf
from vicreg_tf import gpu_emulation as emulation
sys.path.insert(0, ".")
from bench.gpu import _step_time
kind = sys.argv[1]
strategy = emulation.make_strategy(kind) if kind != "default" else None
scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
keras.utils.set_random_seed(0)
with emulation.gpu_code_paths(), scope:
    model = vicreg_tf.VICReg(vicreg_tf.backbones.small_cnn((32, 32, 3), widths=(16, 32)), projector="512-512-512")
    model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=False)
x = np.random.default_rng(0).uniform(size=(64, 32, 32, 3)).astype("float32")
with emulation.gpu_code_paths():
    seconds = _step_time(model, (x, x[::-1].copy()), 30)
print(json.dumps({"seconds_per_step": seconds}))
import os; os._exit(0)
"""


def one_gpu_strategy_choice(repeats: int = 2) -> dict:
    """Step time of the default strategy against MirroredStrategy over one device (the CPU; XLA off)."""
    times = {"default": [], "mirrored1": []}
    for _ in range(repeats):  # interleaved: the machine's load changes
        for kind in times:
            result = subprocess.run([sys.executable, "-c", CHOICE, kind], capture_output=True, text=True,
                                    env=_env(), cwd=REPO)
            if result.returncode:
                return {"part": "one-GPU strategy choice", "error": result.stderr[-400:]}
            times[kind].append(json.loads(result.stdout.strip().splitlines()[-1])["seconds_per_step"])
    best = {kind: min(values) for kind, values in times.items()}
    return {"part": "one device: default strategy vs MirroredStrategy over it (CPU, XLA off, small CNN, batch 64)",
            "default_ms": round(1000 * best["default"], 1), "mirrored1_ms": round(1000 * best["mirrored1"], 1),
            "mirrored_over_default": round(best["mirrored1"] / best["default"], 3)}


def markdown(payload: dict) -> str:
    lines = [f"Device: {payload['device']}; {payload['date']}. `python -m bench.gpu`.", ""]
    if not payload["gpu"]:
        lines += ["No GPU here: the GPU parts did not run. Rows below are the CPU-emulated parts "
                  "(TensorFlow's GPU code paths on CPU devices) and CPU timings.", ""]
    lines += ["| part | result |", "|---|---|"]
    for row in payload["rows"]:
        rest = {k: v for k, v in row.items() if k != "part"}
        lines.append(f"| {row['part']} | {json.dumps(rest)[:300]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "gpu"))
    args = parser.parse_args(argv)
    import vicreg_tf  # noqa: F401  first, as users do: it decides TensorFlow's oneDNN default

    # isort: split
    import tensorflow as tf

    from bench import cpu_flags

    gpus = tf.config.list_physical_devices("GPU")
    rows = []
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"{len(gpus)} x {details.get('device_name', 'GPU')} (compute capability " \
                 f"{'.'.join(map(str, details.get('compute_capability', ())))}); host CPU {cpu_flags()}"
        import tempfile

        rows.append(one_gpu_training_run(Path(tempfile.mkdtemp(prefix="bench-gpu-"))))
        rows.append(resnet50_step())
        rows += input_rate()
        rows.append(two_logical_gpus_equal_one())
        rows += guard_on_gpu()
    else:
        device = f"no GPU; CPU {cpu_flags()}, {os.cpu_count()} cores"
        print("bench.gpu: no GPU here; running the emulated parts only", flush=True)
        rows += emulated_cells()
        rows.append(one_gpu_strategy_choice())
    payload = {"device": device, "gpu": bool(gpus), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
