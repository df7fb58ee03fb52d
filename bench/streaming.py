"""The input pipeline on photo collections at 224x224: memory, time to first batch, views per core.

Usage: python -m bench.streaming [--counts 1000,4000,8000] [--before-counts 1000,4000] [--steps 20]
       [--folder /tmp/vicreg-photos] [--trainer-counts 1000,4000]

Generates folders of JPEGs at photo sizes (320-500 x 240-400 px, smooth random content,
quality 90; made once with PIL and reused), then, each row in a fresh process so that its
peak resident memory (ru_maxrss) is its own:

  before    the data path trainers/pretrain.py built until issue 13: `data.from_folder(validate=True)`
            (every file decoded once up front), `.cache()` of the decoded float32 images, then
            the views of those images (`data.view_pairs`, the input pipeline's order and views;
            `training.resumable_view_pairs` until issue 23), paper's views at 224x224, batch 32.
  after     `data.FolderSource` + `data.view_pair_batches` (file names shuffled, each
            view's crop sampled on the original and decoded as a window, rows per worker).
  worker    the same, as worker 0 of 2 (`row_start=0, row_count=16` of a global batch of 32):
            the images it decodes per global batch are half of a single process's.
  trainer   `vicreg-train --config=image_folder` at 224x224 (small CNN, batch 32, 2 steps, no
            kNN, no export): the whole program's peak memory, as the issue measured it.

Rates are view pairs per second over `--steps` batches after the first, divided by the
cores this process may use (os.sched_getaffinity). Writes bench/results/streaming.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import cpu_flags

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import vicreg_tf
import tensorflow as tf
from vicreg_tf import augment, data

mode, folder, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
batch = 32
views = augment.paper_views(224, seed=0)
start = time.perf_counter()
if mode == "before":
    images = data.from_folder(folder, (224, 224), validate=True).cache()
    dataset = data.view_pairs(images, views, batch, seed=0, shuffle_buffer=10000)
    rows = batch
else:
    source = data.FolderSource(folder)
    rows = batch if mode == "after" else batch // 2
    dataset = data.view_pair_batches(source, views, batch, steps_per_epoch=steps + 1, epochs=1, seed=0,
                                     row_start=0, row_count=rows)
iterator = iter(dataset)
next(iterator)
first = time.perf_counter() - start
t0 = time.perf_counter()
for _ in range(steps):
    next(iterator)
seconds = time.perf_counter() - t0
print(json.dumps({"first_batch_s": first, "pairs_per_s": steps * rows / seconds, "rows_per_batch": rows,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TRAINER = r"""
import json, resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": result.returncode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "tail": result.stderr[-400:] if result.returncode else ""}))
"""


def make_photos(root: Path, count: int) -> Path:
    """`count` JPEGs at photo sizes under root/c{k % 10}/ (made once; kept between runs)."""
    import numpy as np
    from PIL import Image

    done = root / f".done-{count}"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for k in range(count):
        w, h = int(rng.integers(320, 501)), int(rng.integers(240, 401))
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        folder = root / f"c{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(folder / f"{k:06d}.jpg", quality=90)
    done.touch()
    return root


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")


def child(mode: str, folder: Path, steps: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(steps)], capture_output=True,
                            text=True, env=_env(), cwd=REPO)
    if result.returncode:
        return {"error": result.stderr[-600:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def trainer(folder: Path, workdir: Path) -> dict:
    command = [sys.executable, "-m", "trainers.pretrain", "--config=image_folder", f"--config.data.path={folder}",
               f"--workdir={workdir}", "--config.data.image_size=224", "--config.model.backbone=small_cnn",
               "--config.model.backbone_kwargs={'widths': (8, 16)}", "--config.model.projector=64-64",
               "--config.training.batch_size=32", "--config.training.epochs=1",
               "--config.training.steps_per_epoch=2", "--config.optimizer.warmup_epochs=0",
               "--config.eval.knn_every=0", "--config.export.enabled=False"]
    result = subprocess.run([sys.executable, "-c", TRAINER, *command], capture_output=True, text=True,
                            env=_env(), cwd=REPO)
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(payload: dict) -> str:
    lines = [f"Machine: {payload['cpu']}, {payload['cores']} cores; {payload['date']}. Paper views at 224x224, "
             f"global batch 32, {payload['steps']} timed batches after the first; JPEGs 320-500 x 240-400 px. "
             "`python -m bench.streaming`.", "",
             "| row | photos | first batch (s) | view pairs/s per core | images decoded per global batch "
             "| peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in payload["rows"]:
        if "error" in row:
            lines.append(f"| {row['row']} | {row['photos']} | failed: {row['error'][-80:]!r} | | | |")
            continue
        if row["row"] == "trainer":
            lines.append(f"| trainer (vicreg-train, 2 steps) | {row['photos']} | | | | {row['peak_rss_mb']:.0f} |")
            continue
        lines.append(f"| {row['row']} | {row['photos']} | {row['first_batch_s']:.1f} | "
                     f"{row['pairs_per_s'] / payload['cores']:.1f} | {row['rows_per_batch']} | "
                     f"{row['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,4000,8000")
    parser.add_argument("--before-counts", default="1000,4000")
    parser.add_argument("--trainer-counts", default="1000,4000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "vicreg-photos"))
    parser.add_argument("--out", default="streaming")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c]
    before = [int(c) for c in args.before_counts.split(",") if c]
    trainer_counts = [int(c) for c in args.trainer_counts.split(",") if c]
    payload = {"cpu": cpu_flags(), "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
               "steps": args.steps, "rows": []}
    for count in sorted(set(counts) | set(before) | set(trainer_counts)):
        folder = make_photos(Path(args.folder) / str(count), count)
        modes = (["before"] if count in before else []) + (["after", "worker"] if count in counts else [])
        for mode in modes:
            row = {"row": mode, "photos": count, **child(mode, folder, args.steps)}
            print(json.dumps(row), flush=True)
            payload["rows"].append(row)
        if count in trainer_counts:
            with tempfile.TemporaryDirectory() as workdir:
                row = {"row": "trainer", "photos": count, **trainer(folder, Path(workdir) / "run")}
            print(json.dumps(row), flush=True)
            payload["rows"].append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
