"""Forward + backward time and peak memory of `vicreg_loss` against the textbook D x D form.

Usage: python -m bench.loss [--reps 3] [--sizes 256x2048,256x8192,2048x2048,2048x8192]

Each (form, N, D) runs in its own child process so that peak memory (ru_maxrss,
minus the child's baseline after TensorFlow has started) belongs to that form
alone; timings are medians of --reps runs after one warm-up. The textbook form
builds the D x D covariance and an off-diagonal mask, as most ports do.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import vicreg_tf  # first, as users do: it decides TensorFlow's oneDNN default
import numpy as np, tensorflow as tf
from vicreg_tf.losses import covariance_loss, invariance_loss, variance_loss

def textbook(z_a, z_b):
    def cov(z):
        n, d = z.shape
        z = z - tf.reduce_mean(z, axis=0)
        c = tf.matmul(z, z, transpose_a=True) / (n - 1)
        return tf.reduce_sum(tf.square(c * (1.0 - tf.eye(d)))) / d
    var = 0.5 * (variance_loss(z_a) + variance_loss(z_b))
    return 25 * invariance_loss(z_a, z_b) + 25 * var + cov(z_a) + cov(z_b)

def ours(z_a, z_b):
    var = 0.5 * (variance_loss(z_a) + variance_loss(z_b))
    return 25 * invariance_loss(z_a, z_b) + 25 * var + covariance_loss(z_a) + covariance_loss(z_b)

form, n, d, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fn = {"textbook": textbook, "vicreg_tf": ours}[form]
rng = np.random.default_rng(0)
z_a = tf.constant(rng.normal(size=(n, d)).astype(np.float32))
z_b = tf.constant(rng.normal(size=(n, d)).astype(np.float32))

@tf.function
def step(z_a, z_b):
    with tf.GradientTape() as tape:
        tape.watch([z_a, z_b])
        loss = fn(z_a, z_b)
    ga, gb = tape.gradient(loss, [z_a, z_b])
    return loss, tf.reduce_sum(ga) + tf.reduce_sum(gb)

step.get_concrete_function(z_a, z_b)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for i in range(reps + 1):
    t0 = time.perf_counter()
    out = step(z_a, z_b)
    [o.numpy() for o in out]
    if i:
        times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"form": form, "n": n, "d": d, "seconds": sorted(times)[len(times) // 2],
                  "peak_mib": peak / 1024, "loss": float(out[0])}))
"""


def run_child(form: str, n: int, d: int, reps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, form, str(n), str(d), str(reps)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{form} N={n} D={d} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="256x2048,256x8192,2048x2048,2048x8192")
    parser.add_argument("--out", default="bench/results/loss.json")
    args = parser.parse_args(argv)
    rows = []
    print("| N | D | textbook s | vicreg_tf s | speed-up | textbook peak MiB | vicreg_tf peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n, d = (int(v) for v in size.split("x"))
        ref = run_child("textbook", n, d, args.reps)
        fast = run_child("vicreg_tf", n, d, args.reps)
        if abs(ref["loss"] - fast["loss"]) > 1e-4 * abs(ref["loss"]):
            raise AssertionError(f"losses differ at N={n} D={d}: {ref['loss']} vs {fast['loss']}")
        row = {"n": n, "d": d, "textbook_s": ref["seconds"], "vicreg_tf_s": fast["seconds"],
               "speedup": ref["seconds"] / fast["seconds"],
               "textbook_peak_mib": ref["peak_mib"], "vicreg_tf_peak_mib": fast["peak_mib"]}
        rows.append(row)
        print(f"| {n} | {d} | {row['textbook_s']:.4f} | {row['vicreg_tf_s']:.4f} | "
              f"{row['speedup']:.1f}x | {row['textbook_peak_mib']:.0f} | {row['vicreg_tf_peak_mib']:.0f} |",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
