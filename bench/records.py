"""Record sources: class mixing per batch on class-sorted TFRecords, and records read per worker.

Usage: python -m bench.records [--batch 32] [--shuffle-buffer 256] [--epochs 3]

Writes 10 classes x 200 small JPEGs into 8 TFRecord files in class order (file k holds records
250k..250k+249: one or two classes, the usual result of converting a class-folder tree), then:
  classes per batch  distinct classes in each global batch, averaged over `--epochs` epochs:
                     before  the windows until issue 22 (the files interleaved in their stored
                             order, fixed windows of `shuffle_buffer` records permuted);
                     after   `data.order` (the epoch's file order, windows that move each epoch);
                     uniform a uniform permutation of the 2,000 records per epoch.
  reads per worker   records read from the files by worker w of W (W = 1, 2, 4) in one epoch,
                     counted by wrapping `records.read_file`, next to the total.
Writes bench/results/records.{json,md}.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# isort: off
from vicreg_tf import data  # noqa: E402  first, as users do: it decides TensorFlow's oneDNN default
from vicreg_tf.data import records as records_module  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
# isort: on

CLASSES, PER_CLASS, FILES = 10, 200, 8


def write_class_sorted(folder: Path) -> str:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    per_file = len(labels) // FILES
    for f in range(FILES):
        with tf.io.TFRecordWriter(str(folder / f"train-{f:02d}-of-{FILES:02d}.tfrecord")) as writer:
            for label in labels[f * per_file:(f + 1) * per_file]:
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
                feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()])),
                           "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return str(folder / "train-*.tfrecord")


def classes_per_batch(labels: np.ndarray, batch: int) -> float:
    batches = labels[: len(labels) // batch * batch].reshape(-1, batch)
    return float(np.mean([len(np.unique(b)) for b in batches]))


def label_stream(dataset) -> np.ndarray:
    return np.array([int(label) for _, label in dataset])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="vicreg-records-"))
    source = data.RecordSource.from_tfrecords(write_class_sorted(folder), cache_mb=0)
    count, batch, window = source.count, args.batch, args.shuffle_buffer

    def seed_of(epoch):
        return tf.stack([data.mix_seeds(0, epoch), tf.constant(-1, tf.int64)])

    before, after, uniform = [], [], []
    read = source.epoch_records(0, 1)
    for epoch in range(args.epochs):
        stored = source.records()  # the stored order, every file interleaved (as before issue 22)
        before.append(classes_per_batch(label_stream(data.windowed_permutation(stored, window, seed_of(epoch))), batch))
        moved = data.windowed_permutation(read(seed_of(epoch)), window, seed_of(epoch), moving=True)
        after.append(classes_per_batch(label_stream(moved), batch))
        labels = np.repeat(np.arange(CLASSES), PER_CLASS)
        uniform.append(classes_per_batch(np.random.default_rng(epoch).permutation(labels), batch))

    reads = []
    original = records_module.read_file
    counter = []

    def counting(filename):
        def tick():
            counter.append(1)
            return np.int64(0)
        return original(filename).map(lambda record: (tf.py_function(tick, [], tf.int64), record)[1])

    records_module.read_file = counting
    try:
        for workers in (1, 2, 4):
            share = batch // workers
            for worker in range(workers):
                counter.clear()
                for _ in data.order(source, batch, epochs=1, steps_per_epoch=count // batch, seed=0,
                                    shuffle_buffer=window, rows=(worker * share, (worker + 1) * share)):
                    pass
                reads.append({"W": workers, "worker": worker, "records_read": len(counter), "total": count})
    finally:
        records_module.read_file = original

    result = {"batch": batch, "shuffle_buffer": window, "epochs": args.epochs, "records": count, "files": FILES,
              "classes": CLASSES, "before": float(np.mean(before)), "after": float(np.mean(after)),
              "uniform": float(np.mean(uniform)), "reads": reads}
    result["after_over_uniform"] = result["after"] / result["uniform"]
    lines = [
        f"Class-sorted TFRecords: {CLASSES} classes x {PER_CLASS} JPEGs in {FILES} files, batch {batch}, "
        f"shuffle_buffer {window}, mean over {args.epochs} epochs",
        "",
        "| order | distinct classes per batch | / uniform |",
        "|---|---|---|",
        *(f"| {name} | {result[name]:.2f} | {result[name] / result['uniform']:.2f} |"
          for name in ("before", "after", "uniform")),
        "",
        "| W | worker | records read in one epoch | of |",
        "|---|---|---|---|",
        *(f"| {r['W']} | {r['worker']} | {r['records_read']} | {r['total']} |" for r in reads),
    ]
    print("\n".join(lines))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "records.json").write_text(json.dumps(result, indent=1))
    (out / "records.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
