"""Record sources: class mixing per batch on class-sorted TFRecords, what segments cost, records read per worker.

Usage: python -m bench.records [--epochs 3] [--large-epochs 2] [--memory]

Two sets of records written in class order (the usual result of converting a class-folder tree):
  small  10 classes x 200 JPEGs (16x16) in 8 files, batch 32, shuffle_buffer 256;
  large  200 classes x 128 tiny JPEGs (8x8, one image repeated: only labels are measured) in 64
         files, batch 256, shuffle_buffer 2,000: the set is 13x the window, as ImageNet in 1,024
         class-sorted files is 128x a window of 10,000.
Rows, distinct classes in each global batch, averaged over the epochs:
  before issue 22  the files interleaved in their stored order, fixed windows permuted;
  whole files      `data.order` reading each file from its start (the epoch's file order, windows
                   that move each epoch): the pipeline until segments;
  segments L       the same, each file read from ceil(n / L) places (`RecordSource`, "Segments");
                   L = SEGMENT_RECORDS is the default;
  uniform          a uniform permutation of the records per epoch.
With each (large set) row: seconds per epoch (the label stream, no decoding), bytes the process
read (/proc/self/io rchar), and readers opened (segments) per epoch.
Reads per worker: records read from the files by worker w of W (W = 1, 2, 4) in one epoch of the
small set with the default segments, counted by wrapping `records.read_file`, next to the total.
Model: the same order computed with NumPy (file order, segments permuted, interleave of
CYCLE_LENGTH, moving windows) for ImageNet's geometry, too large to write here: 1,000 classes x
1,281 records in 1,024 class-sorted files, shuffle_buffer 10,000, batch 256, one worker; and for the
large set, next to the measurement, to check the model.
Index: seconds `RecordSource.from_tfrecords` takes on the large set with its counting pass, and with
the index `convert.index_tfrecords` wrote beside the files.
Conversion: `convert.folder_to_tfrecords` (what `vicreg-tfrecords` runs after TensorFlow has loaded)
on 2,000 JPEGs of about 400x300 (PIL, quality 90, 10 class folders), the files in the page cache;
the median of 3 runs, eval_fraction 0.1, the default shards.
Memory (--memory, off by default: it writes 225 MB): resident memory above the start of an epoch
while reading 128 files x 16 records of 110 kB (an ImageNet JPEG's size), whole files vs segments of
SEGMENT_RECORDS, CYCLE_LENGTH readers open, in a fresh process each.
Writes bench/results/records.{json,md}.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import cpu_flags  # noqa: E402  (no TensorFlow)

# isort: off
from vicreg_tf import data  # noqa: E402  first, as users do: it decides TensorFlow's oneDNN default
from vicreg_tf.data import convert  # noqa: E402
from vicreg_tf.data import records as records_module  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
# isort: on

SETS = {
    "small": {"classes": 10, "per_class": 200, "files": 8, "image": 16, "batch": 32, "window": 256,
              "sweep": (None, 64, 32, 16, 8, 4)},
    "large": {"classes": 200, "per_class": 128, "files": 64, "image": 8, "batch": 256, "window": 2000,
              "sweep": (None, 64, 32, 16, 8, 4)},
}


def write_class_sorted(folder: Path, classes: int, per_class: int, files: int, image: int) -> str:
    """`files` TFRecord files holding classes 0, 0, ..., 1, 1, ... in order (file k: records k n / files ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    repeated = None if image >= 16 else _jpeg(rng, image)
    for f, part in enumerate(np.array_split(labels, files)):
        with tf.io.TFRecordWriter(str(folder / f"train-{f:03d}-of-{files:03d}.tfrecord")) as writer:
            for label in part:
                encoded = repeated or _jpeg(rng, image)
                feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                           "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return str(folder / "train-*.tfrecord")


def _jpeg(rng, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def classes_per_batch(labels: np.ndarray, batch: int) -> float:
    batches = labels[: len(labels) // batch * batch].reshape(-1, batch)
    return float(np.mean([len(np.unique(b)) for b in batches]))


def label_stream(dataset) -> np.ndarray:
    labels = dataset.map(lambda item, label: label).batch(4096)
    return np.concatenate(list(labels.as_numpy_iterator()))


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def seed_of(epoch: int) -> tf.Tensor:
    return tf.stack([data.mix_seeds(0, epoch), tf.constant(-1, tf.int64)])


def mixing(pattern: str, spec: dict, epochs: int) -> list[dict]:
    batch, window = spec["batch"], spec["window"]
    labels = np.repeat(np.arange(spec["classes"]), spec["per_class"])
    rows = []
    stored = data.RecordSource.from_tfrecords(pattern, cache_mb=0, segment_records=None)
    rows.append({"order": "before issue 22", "classes_per_batch": float(np.mean([classes_per_batch(label_stream(
        data.windowed_permutation(stored.records(), window, seed_of(e))), batch) for e in range(epochs)]))})
    for segment_records in spec["sweep"]:
        source = data.RecordSource.from_tfrecords(pattern, cache_mb=0, segment_records=segment_records)
        read = source.epoch_records(0, 1)
        scores, seconds, read_bytes = [], [], []
        for epoch in range(epochs):
            start, before = time.perf_counter(), bytes_read()
            stream = label_stream(data.windowed_permutation(read(seed_of(epoch)), window, seed_of(epoch), moving=True))
            seconds.append(time.perf_counter() - start)
            read_bytes.append(bytes_read() - before)
            assert sorted(stream.tolist()) == labels.tolist()  # every record once
            scores.append(classes_per_batch(stream, batch))
        name = "whole files" if segment_records is None else f"segments L={segment_records}"
        if segment_records == records_module.SEGMENT_RECORDS:
            name += " (default)"
        rows.append({"order": name, "segment_records": segment_records, "classes_per_batch": float(np.mean(scores)),
                     "seconds_per_epoch": float(np.median(seconds)), "bytes_read_per_epoch": int(np.median(read_bytes)),
                     "readers_per_epoch": len(source.segments)})
    rows.append({"order": "uniform", "classes_per_batch": float(np.mean([classes_per_batch(
        np.random.default_rng(e).permutation(labels), batch) for e in range(epochs)]))})
    uniform = rows[-1]["classes_per_batch"]
    for row in rows:
        row["over_uniform"] = row["classes_per_batch"] / uniform
    return rows


def modelled_classes_per_batch(classes: int, per_class: int, files: int, window: int, batch: int,
                               segment_records: int | None, cycle: int = records_module.CYCLE_LENGTH,
                               epoch: int = 0) -> float:
    """`data.order`'s label stream for one worker, in NumPy: files permuted, segments permuted, interleaved one
    record per open reader (`cycle` open), windows of `window` moved by a random offset, then permuted."""
    rng = np.random.default_rng([0, epoch])
    parts = np.array_split(np.repeat(np.arange(classes), per_class), files)
    segments = []
    for f in rng.permutation(files):
        size = len(parts[f]) if segment_records is None else segment_records
        segments += [parts[f][k:k + size] for k in range(0, len(parts[f]), size)]
    if segment_records is not None:
        segments = [segments[i] for i in rng.permutation(len(segments))]
    stream, pending, slots = [], iter(segments), []
    for segment in pending:
        slots.append(list(segment[::-1]))
        if len(slots) == cycle:
            break
    slot = 0
    while slots:
        slot %= len(slots)
        stream.append(slots[slot].pop())
        if not slots[slot]:
            following = next(pending, None)
            if following is None:
                slots.pop(slot)
                continue
            slots[slot] = list(following[::-1])
        slot += 1
    stream = np.array(stream)
    offset = int(rng.integers(window))
    windows = [stream[:window - offset]] + [stream[k:k + window] for k in range(window - offset, len(stream), window)]
    return classes_per_batch(np.concatenate([rng.permutation(w) for w in windows]), batch)


def modelled(spec: dict, sweep=(None, 64, 32, 16, 8, 4)) -> list[dict]:
    geometry = (spec["classes"], spec["per_class"], spec["files"], spec["window"], spec["batch"])
    labels = np.repeat(np.arange(spec["classes"]), spec["per_class"])
    uniform = classes_per_batch(np.random.default_rng(0).permutation(labels), spec["batch"])
    rows = [{"order": "whole files" if L is None else f"segments L={L}", "segment_records": L,
             "classes_per_batch": modelled_classes_per_batch(*geometry, L)} for L in sweep]
    rows.append({"order": "uniform", "classes_per_batch": uniform})
    for row in rows:
        row["over_uniform"] = row["classes_per_batch"] / uniform
    return rows


IMAGENET = {"classes": 1000, "per_class": 1281, "files": 1024, "window": 10_000, "batch": 256}


def reads_per_worker(pattern: str, spec: dict) -> list[dict]:
    source = data.RecordSource.from_tfrecords(pattern, cache_mb=0)
    batch, count = spec["batch"], source.count
    reads, counter = [], []
    original = records_module.read_file

    def counting(*args):
        def tick():
            counter.append(1)
            return np.int64(0)
        return original(*args).map(lambda record: (tf.py_function(tick, [], tf.int64), record)[1])

    records_module.read_file = counting
    try:
        for workers in (1, 2, 4):
            share = batch // workers
            for worker in range(workers):
                counter.clear()
                for _ in data.order(source, batch, epochs=1, steps_per_epoch=count // batch, seed=0,
                                    shuffle_buffer=spec["window"], rows=(worker * share, (worker + 1) * share)):
                    pass
                reads.append({"W": workers, "worker": worker, "records_read": len(counter), "total": count})
    finally:
        records_module.read_file = original
    return reads


def index_timing(pattern: str) -> dict:
    start = time.perf_counter()
    data.RecordSource.from_tfrecords(pattern, cache_mb=0)
    counted = time.perf_counter() - start
    start = time.perf_counter()
    convert.index_tfrecords(pattern)
    indexing = time.perf_counter() - start
    start = time.perf_counter()
    data.RecordSource.from_tfrecords(pattern, cache_mb=0)
    return {"counting_pass_s": counted, "with_index_s": time.perf_counter() - start, "writing_the_index_s": indexing}


def write_photos(root: Path, count: int) -> int:
    """`count` JPEGs of about 400x300 (smooth random images, quality 90) in 10 class folders; their bytes."""
    rng = np.random.default_rng(0)
    for k in range(count):
        w, h = int(rng.integers(380, 421)), int(rng.integers(280, 321))
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        folder = root / f"class{k % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(folder / f"{k:05d}.jpg", quality=90)
    return sum(p.stat().st_size for p in root.rglob("*.jpg"))


def conversion(folder: Path, count: int = 2000, runs: int = 3) -> dict:
    size = write_photos(folder / "photos", count)
    seconds = []
    for run in range(runs):
        start = time.perf_counter()
        index = convert.folder_to_tfrecords(folder / "photos", folder / f"set{run}", eval_fraction=0.1)
        seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds))
    return {"images": count, "megabytes": size / 1e6, "files": len(index["files"]), "seconds": median,
            "images_per_s": count / median, "mb_per_s": size / 1e6 / median, "runs": runs}


_MEMORY = """
import sys
import numpy as np
from vicreg_tf import data
import tensorflow as tf
segment_records = None if sys.argv[2] == "none" else int(sys.argv[2])
source = data.RecordSource.from_tfrecords(sys.argv[1], cache_mb=0, segment_records=segment_records)
read = source.epoch_records(0, 1)
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
samples, base = [], None
for epoch in range(2):
    base = base or resident()
    for n, _ in enumerate(read(tf.constant([epoch, -1], tf.int64))):
        if n % 100 == 50:
            samples.append(resident() - base)
print(float(np.median(samples)), float(max(samples)))
"""


def memory(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    blob = np.random.default_rng(0).bytes(110_000)
    for f in range(128):
        with tf.io.TFRecordWriter(str(folder / f"train-{f:03d}.tfrecord")) as writer:
            for k in range(16):
                feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[blob])),
                           "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[f]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    rows = []
    for segment_records in ("none", str(records_module.SEGMENT_RECORDS)):
        out = subprocess.run([sys.executable, "-c", _MEMORY, str(folder / "train-*.tfrecord"), segment_records],
                             capture_output=True, text=True, check=True).stdout.split()
        rows.append({"segment_records": segment_records, "median_mb": float(out[-2]), "max_mb": float(out[-1])})
    shutil.rmtree(folder)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the small set")
    parser.add_argument("--large-epochs", type=int, default=2, help="epochs of the large set")
    parser.add_argument("--memory", action="store_true", help="also measure the readers' memory (writes 225 MB)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="vicreg-records-"))
    result = {"segment_records_default": records_module.SEGMENT_RECORDS, "cycle_length": records_module.CYCLE_LENGTH,
              "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "sets": {}}
    lines = [f"CPU: {result['cpu_flags']}; {result['cores']} cores. `python -m bench.records "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    for name, epochs in (("small", args.epochs), ("large", args.large_epochs)):
        spec = SETS[name]
        pattern = write_class_sorted(folder / name, spec["classes"], spec["per_class"], spec["files"], spec["image"])
        rows = mixing(pattern, spec, epochs)
        result["sets"][name] = {**{k: v for k, v in spec.items() if k != "sweep"}, "epochs": epochs, "rows": rows}
        lines += [
            f"{name}: {spec['classes']} classes x {spec['per_class']} records in {spec['files']} class-sorted files, "
            f"batch {spec['batch']}, shuffle_buffer {spec['window']}, mean over {epochs} epochs",
            "",
            "| order | distinct classes per batch | / uniform | s per epoch | MB read per epoch | readers opened |",
            "|---|---|---|---|---|---|",
            *(f"| {r['order']} | {r['classes_per_batch']:.2f} | {r['over_uniform']:.2f} | "
              + (f"{r['seconds_per_epoch']:.2f} | {r['bytes_read_per_epoch'] / 1e6:.2f} | {r['readers_per_epoch']} |"
                 if "seconds_per_epoch" in r else " | | |") for r in rows),
            "",
        ]
        if name == "large":
            model = modelled(spec, spec["sweep"])
            result["sets"][name]["model"] = model
            lines += ["The model of the same order (NumPy) on the large set, to compare with the measurement: "
                      + ", ".join(f"{r['order']} {r['classes_per_batch']:.1f}" for r in model), ""]
            timing = index_timing(pattern)
            result["index"] = timing
            lines += [f"Building the large set's source: {timing['counting_pass_s']:.2f} s with the counting pass, "
                      f"{timing['with_index_s']:.2f} s with the index (written once in "
                      f"{timing['writing_the_index_s']:.2f} s by convert.index_tfrecords)", ""]
        if name == "small":
            reads = reads_per_worker(pattern, spec)
            result["reads"] = reads
            lines += [
                f"Records read per worker in one epoch of the small set (segments of "
                f"{records_module.SEGMENT_RECORDS} records)",
                "",
                "| W | worker | records read in one epoch | of |",
                "|---|---|---|---|",
                *(f"| {r['W']} | {r['worker']} | {r['records_read']} | {r['total']} |" for r in reads),
                "",
            ]
    imagenet = modelled(IMAGENET)
    result["imagenet_model"] = {**IMAGENET, "rows": imagenet}
    lines += [
        "Modelled (NumPy, not measured): ImageNet, 1,000 classes x 1,281 records in 1,024 class-sorted files, "
        "batch 256, shuffle_buffer 10,000, one worker",
        "",
        "| order | distinct classes per batch | / uniform |",
        "|---|---|---|",
        *(f"| {r['order']} | {r['classes_per_batch']:.1f} | {r['over_uniform']:.2f} |" for r in imagenet),
        "",
    ]
    speed = conversion(folder / "convert")
    result["conversion"] = speed
    lines += [f"Conversion (convert.folder_to_tfrecords, median of {speed['runs']}): {speed['images']} JPEGs of about "
              f"400x300 ({speed['megabytes']:.1f} MB) into {speed['files']} files in {speed['seconds']:.2f} s: "
              f"{speed['images_per_s']:.0f} images/s, {speed['mb_per_s']:.0f} MB/s (files in the page cache)", ""]
    if args.memory:
        result["memory"] = memory(folder / "memory")
        names = {"none": "whole files"}
        lines += ["Resident memory above the epoch's start, 128 files x 16 records of 110 kB, "
                  f"{records_module.CYCLE_LENGTH} readers open: "
                  + "; ".join(f"{names.get(r['segment_records'], 'segments of ' + r['segment_records'])} median "
                              f"{r['median_mb']:.0f} MB, max {r['max_mb']:.0f} MB" for r in result["memory"]), ""]
    lines.append(f"CPU: {result['cores']} cores, flags {result['cpu_flags']}")
    print("\n".join(lines))
    shutil.rmtree(folder, ignore_errors=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "records.json").write_text(json.dumps(result, indent=1))
    (out / "records.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
