"""Latency and throughput of the exported SavedModel in-process, next to Keras' predict.

    python -m bench.serving                                   # small_cnn 28x28x1, 1000 calls
    python -m bench.serving --backbone=runs/fmnist/backbone.keras
    python -m bench.serving --arch=resnet18_cifar --calls=200 --batch=256

For each path the same inputs are used in the same run: batch-1 latency (p50,
p99 over --calls calls, after --warmup_calls) and throughput at --batch (images
per second over --iters calls, after one untimed call). Paths:

- SavedModel serving_default: `tf.saved_model.load(...).signatures[...]` on float images
- SavedModel serve_image_bytes: the same on PNG-encoded images (decode + resize in the graph)
- Keras predict: `backbone.predict(x, verbose=0)`, what a Python service would call
- Keras __call__: `backbone(x, training=False)`, eager

Every path checks its embeddings against `backbone(x, training=False)` before
timing. This measures the model graph, not TF Serving's batching, RPC or JSON
costs. Prints a Markdown table and writes it, with the raw numbers and the
machine (CPU count, load average at start and end: other processes skew the
timings), to --out_dir/serving.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# isort: off
import vicreg_tf  # noqa: E402,F401  first, as users do: it decides TensorFlow's oneDNN default
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vicreg_tf import backbones  # noqa: E402
from vicreg_tf.serving import export_for_serving  # noqa: E402
from vicreg_tf.transfer import load_backbone  # noqa: E402


def _latency_ms(fn, x, calls: int, warmup_calls: int) -> tuple[float, float]:
    for _ in range(warmup_calls):
        fn(x)
    times = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter()
        fn(x)
        times[i] = time.perf_counter() - start
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def _throughput(fn, x, iters: int) -> float:
    fn(x)  # trace / allocate once
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return len(x) * iters / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default=None, help="a backbone .keras file (default: a random --arch)")
    parser.add_argument("--arch", default="small_cnn", choices=sorted(backbones.BACKBONES))
    parser.add_argument("--calls", type=int, default=1000, help="batch-1 calls for p50/p99")
    parser.add_argument("--warmup_calls", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256, help="batch size for throughput")
    parser.add_argument("--iters", type=int, default=20, help="calls at --batch for throughput")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    if args.backbone:
        backbone = load_backbone(args.backbone)
        label = Path(args.backbone).name
    else:
        backbone = backbones.build_backbone(args.arch)
        label = f"{args.arch} (random init)"
    shape = backbone.input_shape[1:]
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, *shape), dtype=np.float32)
    one = x[:1]
    u8 = np.round(x * 255).astype(np.uint8)
    pngs = [tf.io.encode_png(image).numpy() for image in u8]

    reference = backbone(x, training=False).numpy()
    # The PNGs hold 8-bit pixels: the bytes path is checked against those.
    reference_u8 = backbone(u8.astype(np.float32) / 255.0, training=False).numpy()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as base:
        version_dir = export_for_serving(backbone, base, "bench", warmup=False, write_config=False)
        model = tf.saved_model.load(str(version_dir))
        float_sig = model.signatures["serving_default"]
        bytes_sig = model.signatures["serve_image_bytes"]

        paths = {
            "SavedModel serving_default": (
                lambda a: float_sig(images=tf.constant(a))["embedding"].numpy(), one, x
            ),
            "SavedModel serve_image_bytes (PNG)": (
                lambda a: bytes_sig(image_bytes=tf.constant(a))["embedding"].numpy(), pngs[:1], pngs
            ),
            "Keras predict": (lambda a: backbone.predict(a, batch_size=len(a), verbose=0), one, x),
            "Keras __call__ (training=False)": (lambda a: backbone(a, training=False).numpy(), one, x),
        }
        rows = []
        for name, (fn, single, batch) in paths.items():
            want = reference_u8 if "bytes" in name else reference
            error = float(np.abs(fn(batch) - want).max())
            if error > 1e-4:
                raise AssertionError(f"{name}: embeddings differ from backbone(x) by {error:.2e}")
            p50, p99 = _latency_ms(fn, single, args.calls, args.warmup_calls)
            rows.append({
                "path": name,
                "batch1_p50_ms": p50,
                "batch1_p99_ms": p99,
                f"batch{args.batch}_images_per_s": _throughput(fn, batch, args.iters),
                "max_abs_diff_vs_backbone": error,
            })
    load_after = os.getloadavg()

    header = (
        f"Backbone: {label}, input {tuple(shape)}, {backbone.output_shape[-1]} features; "
        f"TF {tf.__version__}, Keras {keras.__version__}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} at start, {load_after[0]:.1f} at end; "
        f"batch-1 latency over {args.calls} calls, throughput at batch {args.batch} over {args.iters} calls."
    )
    lines = [
        "Command: `" + " ".join(["python -m bench.serving", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "",
        header,
        "",
        f"| path | batch 1 p50 (ms) | batch 1 p99 (ms) | batch {args.batch} (images/s) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['path']} | {row['batch1_p50_ms']:.2f} | {row['batch1_p99_ms']:.2f} | "
            f"{row[f'batch{args.batch}_images_per_s']:,.0f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.md").write_text(table)
    (out_dir / "serving.json").write_text(json.dumps({
        "backbone": label,
        "input_shape": list(shape),
        "features": int(backbone.output_shape[-1]),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_start": load_before[0],
        "load_average_end": load_after[0],
        "calls": args.calls,
        "batch": args.batch,
        "iters": args.iters,
        "rows": rows,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
