"""Folders at scale: start-up (listing, held-out split, first batch) and the end-of-run summary by folder size.

Usage: python -m bench.folders [--counts 1000,10000,100000] [--trainer-counts 1000,100000]
       [--root /tmp/vicreg-folders] [--cold]

Generates folders of N small JPEGs (100 class sub-folders; 32 distinct 96x128 images written
under N names, so that making 10^5 files takes seconds; made once and reused), then measures,
for each N in a fresh process (so that memory figures are its own):

  list before    the listing FolderSource did until issue 22 (pathlib rglob, a Path per file,
                 a stat per file for its size), timed in the same process as the rows below;
  list train     `build.load_source(config, "train")` of configs/image_folder.py: the listing,
                 the labels and the held-out split (os.scandir, names as strings);
  list eval      the same for the "eval" split (the kNN monitor's and the summary's images);
  check decode   the start-up check: 64 files drawn at random, decoded;
  first batch    `data.view_pair_batches` at 64x64, batch 64: building it and its first batch;
  knn + summary  the kNN monitor's bank and queries (random samples of at most
                 eval.knn_max_train / knn_max_eval = 1,024 here) and the end-of-run probe
                 (4,096 held-out images, or all of them when fewer), decoded at 64x64;
  memory         resident memory the listing adds (ru_maxrss after it minus before it; the
                 "before" listing in a process of its own) and the Python memory the train
                 split's names hold (tracemalloc, on a second listing: it slows what it traces);
                 the process's peak resident memory (ru_maxrss; TensorFlow alone is ~700 MB).

`--cold` (root): the kernel's page, dentry and inode caches are emptied before each process, so
the listings read the disk (the rows are otherwise timed on a warm cache, the folder just made).
`--trainer-counts`: also `vicreg-train --config=image_folder` on the folder (small CNN, 64 px,
batch 64, 2 steps, kNN at the end, no export): seconds to its first line and to its end.
The extrapolation to 10^6 files fits each row linearly on the counts measured. Figures name the
CPU flags. Writes bench/results/folders.{json,md}.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import cpu_flags

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
CLASSES = 100

CHILD = r"""
import json, os, resource, sys, time, tracemalloc, zlib
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import vicreg_tf
from pathlib import Path
import numpy as np
import tensorflow as tf
from vicreg_tf import data
from vicreg_tf.configs import image_folder
from vicreg_tf.trainers import build, checks

folder = sys.argv[1]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
out = {}

def timed(name, fn):
    start = time.perf_counter()
    value = fn()
    out[name] = round(time.perf_counter() - start, 3)
    return value

def before():  # FolderSource's listing until issue 22
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    relative = [f.relative_to(root) for f in files]
    held = [(zlib.crc32(r.as_posix().encode()) % 10_000) < 1_000 for r in relative]
    size = sum(f.stat().st_size for f in files)
    return len(files), size

if sys.argv[2] == "before":  # alone in its process: its peak memory is its own
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed("list_before_s", before)
    out["before_listing_rss_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024, 1)
    print(json.dumps(out))
    sys.exit(0)
config = image_folder.get_config()
config.data.path = folder
config.eval.knn_max_train = config.eval.knn_max_eval = 1024
checks.add_program_defaults(config)
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
source = timed("list_train_s", lambda: build.load_source(config, "train"))
out["listing_rss_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1)
tracemalloc.start()  # a second listing, traced (tracemalloc slows it: not timed)
traced = build.load_source(config, "train")
out["names_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
tracemalloc.stop()
del traced
eval_source = timed("list_eval_s", lambda: build.load_source(config, "eval"))
out["train_files"], out["eval_files"] = source.count, eval_source.count
timed("check_decode_s", lambda: checks.check_images_decode(source, config))
views = build.make_views(config, seed=0)
def first():
    dataset = data.view_pair_batches(source, views, 64, steps_per_epoch=max(1, source.count // 64), epochs=1, seed=0)
    return next(iter(dataset))
timed("first_batch_s", first)
def summary():
    geometry = (config.data.image_size, config.data.eval_crop_fraction)
    bank = build.labelled_batches(source.sample(config.eval.knn_max_train, 0).images(*geometry), 256)
    queries = build.labelled_batches(eval_source.sample(config.eval.knn_max_eval, 0).images(*geometry), 256)
    seen = sum(int(x.shape[0]) for x, _ in bank) + sum(int(x.shape[0]) for x, _ in queries)
    probe = build.labelled_batches(eval_source.sample(4096, 0).images(*geometry), 256)
    return seen + sum(int(x.shape[0]) for x, _ in probe.take(16))
out["summary_images"] = timed("summary_s", summary)
out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(out))
"""


def make_folder(root: Path, count: int) -> Path:
    """`count` JPEGs in CLASSES sub-folders (made once: a `.complete` marker names the count)."""
    folder = root / f"{count}"
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == str(count):
        return folder
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(32):
        base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(base).resize((128, 96), Image.BILINEAR).save(buffer, "JPEG", quality=85)
        blobs.append(buffer.getvalue())
    for c in range(CLASSES):
        (folder / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with open(folder / f"class_{i % CLASSES:03d}" / f"img_{i:07d}.jpg", "wb") as f:
            f.write(blobs[i % len(blobs)])
    marker.write_text(str(count))
    return folder


def drop_page_cache() -> bool:
    """Empties the kernel's page, dentry and inode caches (root only): the next listing reads the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(folder: Path, mode: str, cold: bool = False) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if cold and not drop_page_cache():
        raise SystemExit("--cold needs root (it writes /proc/sys/vm/drop_caches)")
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True, env=env,
                          cwd=REPO, check=False)
    if done.returncode:
        raise RuntimeError(f"child for {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_trainer(folder: Path, workdir: Path) -> dict:
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "vicreg_tf.trainers.pretrain", "--config=image_folder", f"--workdir={workdir}",
               f"--config.data.path={folder}", "--config.model.backbone=small_cnn", "--config.training.batch_size=64",
               "--config.training.steps_per_epoch=2", "--config.training.epochs=1", "--config.eval.knn_every=1",
               "--config.export.enabled=False", "--config.training.verbose=0"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    first_line = None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if first_line is None and line.startswith("devices:"):
            first_line = time.perf_counter() - start
    if process.wait():
        raise RuntimeError("vicreg-train failed:\n" + "".join(lines[-30:]))
    return {"first_line_s": round(first_line or float("nan"), 2), "total_s": round(time.perf_counter() - start, 2)}


def fit(counts, values, at):
    """Least-squares line through (count, value), evaluated at `at`."""
    n = len(counts)
    mean_c, mean_v = sum(counts) / n, sum(values) / n
    var = sum((c - mean_c) ** 2 for c in counts)
    slope = sum((c - mean_c) * (v - mean_v) for c, v in zip(counts, values)) / var if var else 0.0
    return mean_v + slope * (at - mean_c)


ROWS = [
    ("list_before_s", "list before (s)"),
    ("before_listing_rss_mb", "list before: RSS added (MB)"),
    ("list_train_s", "list train (s)"),
    ("list_eval_s", "list eval (s)"),
    ("check_decode_s", "check decode (s)"),
    ("first_batch_s", "first batch (s)"),
    ("summary_s", "knn + summary (s)"),
    ("summary_images", "knn + summary (images)"),
    ("listing_rss_mb", "list train: RSS added (MB)"),
    ("names_mb", "names (MB, Python)"),
    ("peak_rss_mb", "peak RSS (MB)"),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000,100000")
    parser.add_argument("--trainer-counts", default="")
    parser.add_argument("--root", default="/tmp/vicreg-folders")
    parser.add_argument("--cold", action="store_true", help="empty the page cache before each process (root)")
    parser.add_argument("--tables-only", action="store_true", help="rewrite folders.md from folders.json")
    args = parser.parse_args(argv)
    if args.tables_only:
        return write_tables(json.loads((RESULTS / "folders.json").read_text()))
    counts = [int(c) for c in args.counts.split(",") if c]
    root = Path(args.root)
    results = {"cpu": cpu_flags(), "command": "python -m bench.folders " + " ".join(argv or sys.argv[1:]),
               "rows": {}, "trainer": {}}
    for count in counts:
        made = time.perf_counter()
        folder = make_folder(root, count)
        print(f"{count} files ready in {time.perf_counter() - made:.1f} s; measuring", flush=True)
        results["rows"][count] = {**run_child(folder, "before", args.cold), **run_child(folder, "after", args.cold)}
        print(json.dumps(results["rows"][count]), flush=True)
    for count in [int(c) for c in args.trainer_counts.split(",") if c]:
        results["trainer"][count] = run_trainer(make_folder(root, count), root / "workdir")
        print(f"vicreg-train on {count} files: {results['trainer'][count]}", flush=True)
    return write_tables(results)


# Rows bounded by a sample or a batch, not by the folder: at 10^6 files they are what the largest folder
# measured gives (its samples are already full: 1,024 + 1,024 kNN images and the 4,096-image probe).
BOUNDED = {"check_decode_s", "first_batch_s", "summary_s", "summary_images"}


def write_tables(results: dict) -> dict:
    rows = {int(c): r for c, r in results["rows"].items()}
    counts = sorted(rows)
    fitted = len(counts) >= 2 and 10**6 not in counts  # measured at 10^6: no extrapolation
    if fitted:
        results["extrapolated_1e6"] = {
            key: rows[counts[-1]][key] if key in BOUNDED
            else round(fit(counts, [rows[c][key] for c in counts], 10**6), 2) for key, _ in ROWS}
    lines = [f"# Folders at scale ({results['cpu']})", "", f"`{results['command']}`", "",
             "| | " + " | ".join(f"{c:,} files" for c in counts) + (" | 10^6 (linear fit) |" if fitted else " |"),
             "|---|" + "---|" * (len(counts) + fitted)]
    for key, label in ROWS:
        cells = [str(rows[c][key]) for c in counts]
        if fitted:
            cells.append(str(results["extrapolated_1e6"][key]) + (" (bounded)" if key in BOUNDED else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if fitted:
        lines += ["", "(bounded): a sample or a batch, not the folder, sets it; at 10^6 files it is the largest "
                  "folder's figure (its samples are full)."]
    if results["trainer"]:
        lines += ["", "| vicreg-train (2 steps, kNN at the end) | first line (s) | total (s) |", "|---|---|---|"]
        lines += [f"| {int(c):,} files | {r['first_line_s']} | {r['total_s']} |" for c, r in results["trainer"].items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "folders.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "folders.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
