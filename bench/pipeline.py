"""Views per second of the view pipelines, next to the images per second a train step consumes.

Usage: python -m bench.pipeline [--batches 30] [--kerascv-batches 8] [--train-steps 20] [--batch-size 256]

Rows, all at the same batch size, in one process:
  views      `data.view_pairs(source, two_views, batch)` iterated on its own (tf.data,
             parallel map, prefetch): the default stateless layers (`paper_views` on
             32x32 RGB, `grayscale_views` on 28x28 gray) and the same recipes from
             KerasCV layers (`kerascv_views`).
  train      `VICReg(small_cnn((28, 28, 1)), projector="1024-1024-1024")` with LARS,
             `fit` on pre-made view batches: what the train step alone consumes.
  end to end `fit` fed by `view_pairs(fashion-like images, grayscale_views(28))`.
Rates are images (pairs of views) per second, medians of three timed windows
after warm-up batches that include tracing; a pair is two views. The pipeline is
the bottleneck when its rate is below the train step's. Writes
bench/results/pipeline.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# isort: off
import numpy as np  # noqa: E402
import vicreg_tf  # noqa: E402,F401  first, as users do: it decides TensorFlow's oneDNN default
import tensorflow as tf  # noqa: E402
# isort: on

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(next_batch, batches: int, batch_size: int, warmup: int, start: float) -> tuple[float, float]:
    """(seconds from `start` to the end of warm-up, median images/s over three windows of batches // 3)."""
    for _ in range(warmup):
        next_batch()
    warm = time.perf_counter() - start
    window = max(1, batches // 3)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(window):
            next_batch()
        rates.append(window * batch_size / (time.perf_counter() - start))
    return warm, statistics.median(rates)


def _source(shape, count: int, seed: int = 0):
    from vicreg_tf import data

    rng = np.random.default_rng(seed)
    return data.from_arrays(rng.integers(0, 256, (count, *shape), dtype=np.uint8))


def views_rate(name: str, views, shape, batch_size: int, batches: int, warmup: int = 3) -> dict:
    from vicreg_tf import data

    start = time.perf_counter()  # warm-up includes building (tracing) the pipeline
    pairs = data.view_pairs(_source(shape, 8 * batch_size), views, batch_size, seed=0, shuffle_buffer=4096)
    iterator = iter(pairs)

    def next_batch():
        view_a, view_b = next(iterator)
        return view_a

    warm, rate = _timed(next_batch, batches, batch_size, warmup, start)
    return {"row": name, "kind": "views", "input": "x".join(map(str, shape)), "images_per_s": rate,
            "views_per_s": 2 * rate, "warmup_s": warm}


def _model():
    import keras

    from vicreg_tf import LARS, backbones

    keras.utils.set_random_seed(0)
    model = vicreg_tf.VICReg(backbones.small_cnn((28, 28, 1)), projector="1024-1024-1024")
    model.compile(optimizer=LARS(learning_rate=0.1, weight_decay=1e-6))
    return model


def train_rate(batch_size: int, steps: int) -> dict:
    """fit on one pre-made batch of views, repeated: the train step's own consumption."""
    views = tf.random.stateless_uniform((2, batch_size, 28, 28, 1), (0, 1))
    dataset = tf.data.Dataset.from_tensors((views[0], views[1])).repeat()
    model = _model()
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)  # trace + warm-up
    warm = time.perf_counter() - start
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=max(1, steps // 3), epochs=1, verbose=0)
        rates.append(max(1, steps // 3) * batch_size / (time.perf_counter() - start))
    return {"row": "train step (small_cnn, 1024-1024-1024, LARS)", "kind": "train", "input": "28x28x1",
            "images_per_s": statistics.median(rates), "views_per_s": 2 * statistics.median(rates), "warmup_s": warm}


def end_to_end_rate(batch_size: int, steps: int) -> dict:
    from vicreg_tf import augment, data

    model = _model()
    start = time.perf_counter()
    pairs = data.view_pairs(_source((28, 28, 1), 8 * batch_size), augment.grayscale_views(28), batch_size, seed=0)
    model.fit(pairs, steps_per_epoch=3, epochs=1, verbose=0)
    warm = time.perf_counter() - start
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        model.fit(pairs, steps_per_epoch=max(1, steps // 3), epochs=1, verbose=0)
        rates.append(max(1, steps // 3) * batch_size / (time.perf_counter() - start))
    return {"row": "end to end: view_pairs(grayscale_views) -> fit", "kind": "train", "input": "28x28x1",
            "images_per_s": statistics.median(rates), "views_per_s": 2 * statistics.median(rates), "warmup_s": warm}


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# View pipeline vs train step (`python -m bench.pipeline`)",
        "",
        f"{meta['machine']}; TF {meta['tensorflow']}, Keras {meta['keras']}, KerasCV {meta['keras_cv']}; "
        f"batch {meta['batch_size']}; load average at start {meta['load_average']}.",
        "",
        "| row | input | images/s | views/s | warm-up s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['input']} | {r['images_per_s']:.0f} | {r['views_per_s']:.0f} | {r['warmup_s']:.1f} |"
        )
    lines += ["", meta["verdict"], ""]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per default pipeline")
    parser.add_argument("--kerascv-batches", type=int, default=6, help="timed batches per KerasCV pipeline")
    parser.add_argument("--train-steps", type=int, default=15)
    parser.add_argument("--skip-kerascv", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import keras
    import keras_cv

    from vicreg_tf import augment, kerascv_pipeline

    size = args.batch_size
    rows = [
        views_rate("paper_views (default layers)", augment.paper_views(32), (32, 32, 3), size, args.batches),
        views_rate("grayscale_views (default layers)", augment.grayscale_views(28), (28, 28, 1), size, args.batches),
    ]
    if not args.skip_kerascv:
        rows += [
            views_rate("kerascv_views paper (KerasCV layers)", kerascv_pipeline.kerascv_views(32), (32, 32, 3), size,
                       args.kerascv_batches, warmup=1),
            views_rate("kerascv_views grayscale (KerasCV layers)",
                       kerascv_pipeline.kerascv_views(28, preset="grayscale"),
                       (28, 28, 1), size, args.kerascv_batches, warmup=1),
        ]
    rows.append(train_rate(size, args.train_steps))
    rows.append(end_to_end_rate(size, args.train_steps))

    train = next(r["images_per_s"] for r in rows if r["row"].startswith("train step"))
    gray = next(r["images_per_s"] for r in rows if r["row"].startswith("grayscale_views"))
    verdict = (
        f"grayscale_views makes {gray / train:.1f}x the images/s the train step consumes: "
        + ("the pipeline is not the bottleneck." if gray > train else "the pipeline IS the bottleneck.")
    )
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, no accelerator"
        if not tf.config.list_physical_devices("GPU")
        else f"{platform.machine()} with {tf.config.list_physical_devices('GPU')}",
        "tensorflow": tf.__version__, "keras": keras.__version__, "keras_cv": keras_cv.__version__,
        "batch_size": size, "load_average": [round(x, 1) for x in os.getloadavg()], "verdict": verdict,
        "command": "python -m bench.pipeline", "argv": vars(args) | {"out": str(args.out)},
    }
    print(f"{'row':48s} {'input':>8s} {'images/s':>10s} {'views/s':>10s} {'warm-up s':>10s}")
    for r in rows:
        print(f"{r['row']:48s} {r['input']:>8s} {r['images_per_s']:10.0f} {r['views_per_s']:10.0f} "
              f"{r['warmup_s']:10.1f}")
    print(verdict)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "pipeline.md").write_text(_markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
