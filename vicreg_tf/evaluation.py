"""Evaluation of frozen representations, and collapse diagnostics.

Protocols (as solo-learn and lightly report them):
- weighted kNN: cosine similarity, the k nearest training features vote with
  weight exp(similarity / T), T = 0.07 (Wu et al. 2018);
- linear probe: a softmax classifier on frozen, standardised features;
- fine-tuning: the whole backbone plus a linear head;
- semi-supervised: the linear probe on a class-balanced 1% / 10% of the labels.

Diagnostics users watch for collapse: the mean per-dimension standard deviation
of the embeddings (VICReg's variance term drives it to >= gamma = 1), the
singular-value spectrum of the centred embedding matrix and its effective rank
(Roy & Vetterli 2007, used as "RankMe" by Garrido et al. 2023). A collapsed
expander has a spectrum that drops to ~0 after a few values.

All accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf

from vicreg_tf import losses
from vicreg_tf.atomic_io import write_atomically, write_text_atomically

__all__ = [
    "extract_features",
    "knn_accuracy",
    "linear_probe",
    "label_subset",
    "fine_tune",
    "embedding_std",
    "singular_values",
    "effective_rank",
    "plot_loss_terms",
    "plot_spectrum",
    "KNNMonitor",
    "CSVLogger",
    "StepLogger",
]


def extract_features(model, batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model(x, training=False)` over `(images, labels)` batches.

    Returns float32 features [N, F] and int64 labels [N]. BatchNorm uses its
    moving statistics; nothing is updated.
    """
    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    features, labels = [], []
    for images, batch_labels in batches:
        features.append(np.asarray(infer(images), dtype=np.float32))
        labels.append(np.asarray(batch_labels, dtype=np.int64).reshape(-1))
    if not features:
        raise ValueError("extract_features got no batches: the dataset is empty")
    return np.concatenate(features), np.concatenate(labels)


def _check_pairs(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).reshape(-1)
    if x.ndim != 2:
        raise ValueError(f"{name} features must be [N, F], got shape {x.shape}")
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{name}: no examples")
    if y.min() < 0:
        raise ValueError(f"{name} labels must be class indices >= 0, got {y.min()}")
    return x, y.astype(np.int64)


def knn_accuracy(
    train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07,
    num_classes: int | None = None, chunk: int = 1024,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier on L2-normalised features.

    Each test feature takes the `k` training features of highest cosine
    similarity s; class c scores sum(exp(s / temperature)) over those of class c.
    """
    train_x, train_y = _check_pairs(train_x, train_y, "train")
    test_x, test_y = _check_pairs(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature widths differ: train {train_x.shape[1]}, test {test_x.shape[1]}")
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(train_x))
    classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    bank = tf.math.l2_normalize(tf.constant(train_x), axis=1)
    bank_labels = tf.constant(train_y)

    @tf.function(reduce_retracing=True)
    def predict(queries):
        sims = tf.matmul(tf.math.l2_normalize(queries, axis=1), bank, transpose_b=True)
        top_sims, top_idx = tf.math.top_k(sims, k=k)
        votes = tf.one_hot(tf.gather(bank_labels, top_idx), classes) * tf.exp(top_sims / temperature)[..., None]
        return tf.argmax(tf.reduce_sum(votes, axis=1), axis=1)

    correct = 0
    for start in range(0, len(test_x), chunk):
        predicted = predict(tf.constant(test_x[start:start + chunk])).numpy()
        correct += int(np.sum(predicted == test_y[start:start + chunk]))
    return correct / len(test_x)


def linear_probe(
    train_x, train_y, test_x, test_y, *, epochs: int = 30, batch_size: int = 1024,
    learning_rate: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0,
    num_classes: int | None = None,
) -> dict:
    """Trains a softmax classifier on frozen features; returns {"top1", "train_top1"}.

    Features are standardised with the training set's mean and std (the usual
    BatchNorm-without-affine in front of the probe); AdamW with a cosine
    schedule. The test split is only scored at the end, never used to select.
    """
    train_x, train_y = _check_pairs(train_x, train_y, "train")
    test_x, test_y = _check_pairs(test_x, test_y, "test")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std

    keras.utils.set_random_seed(seed)
    probe = keras.Sequential([keras.Input((train_x.shape[1],)), keras.layers.Dense(classes)], name="linear_probe")
    steps = epochs * math.ceil(len(train_x) / batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    probe.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    probe.fit(train_x, train_y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    _, train_acc = probe.evaluate(train_x, train_y, batch_size=4096, verbose=0)
    _, test_acc = probe.evaluate(test_x, test_y, batch_size=4096, verbose=0)
    return {"top1": float(test_acc), "train_top1": float(train_acc)}


def label_subset(labels, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced `fraction` of the examples (at least one per class), sorted."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


def fine_tune(
    backbone: keras.Model, train_batches, test_batches, *, num_classes: int, epochs: int = 5,
    learning_rate: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
) -> dict:
    """Fine-tunes a copy of `backbone` with a linear head; returns {"top1"} on `test_batches`.

    The caller's backbone is left unchanged (the copy gets its weights).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    keras.utils.set_random_seed(seed)
    copy = keras.models.clone_model(backbone)
    copy.set_weights(backbone.get_weights())
    copy.trainable = True
    classifier = keras.Sequential([copy, keras.layers.Dense(num_classes)], name="fine_tune")
    classifier.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    classifier.fit(train_batches, epochs=epochs, verbose=0)
    _, test_acc = classifier.evaluate(test_batches, verbose=0)
    return {"top1": float(test_acc)}


def embedding_std(embeddings) -> float:
    """Mean over dimensions of the per-dimension standard deviation over the batch (N-1)."""
    z = np.asarray(embeddings, dtype=np.float32)
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"embeddings must be [N, D] with N >= 2, got shape {z.shape}")
    return float(losses.embedding_std(z))


def singular_values(embeddings) -> np.ndarray:
    """Singular values of the centred embedding matrix, largest first (min(N, D) of them).

    From the eigenvalues of the smaller Gram matrix in float64 (z'z or zz'): 4x faster
    than LAPACK's SVD for the end-of-run probe (4,096 x 2,048: 4.5 s vs 18.5 s on 2 shared
    cores), and within 1e-12 of it relatively for values above 1e-6 of the largest; values
    below ~1e-8 of the largest (the square root of float64's epsilon) are not resolved.
    """
    z = np.asarray(embeddings, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"embeddings must be [N, D] with N >= 2, got shape {z.shape}")
    z = z - z.mean(axis=0)
    gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


def effective_rank(singular: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values: 1 for rank one, min(N, D) for a flat spectrum."""
    s = np.asarray(singular, dtype=np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def _atomic_savefig(figure, path: Path) -> None:
    fmt = Path(path).suffix.lstrip(".") or "png"
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, bbox_inches="tight", format=fmt))


def _read_log(log) -> dict[str, list[float]]:
    if isinstance(log, Mapping):
        return {k: [float(v) for v in values] for k, values in log.items()}
    columns: dict[str, list[float]] = {}
    with open(log, newline="") as f:
        for row in csv.DictReader(f):
            if None in row or None in row.values():  # a partial last line (a run killed mid-write)
                continue
            for key, value in row.items():
                try:
                    columns.setdefault(key, []).append(float(value))
                except (TypeError, ValueError):
                    columns.setdefault(key, []).append(float("nan"))
    return columns


_TERMS = ("loss", "invariance", "variance", "covariance", "embedding_std")


def _unique_steps(columns: dict[str, list[float]]) -> dict[str, list[float]]:
    """One row per step, the last one written (a steps.csv of an older version may repeat steps)."""
    if "step" not in columns:
        return columns
    last = {step: row for row, step in enumerate(columns["step"])}
    rows = [last[step] for step in sorted(last)]
    return {name: [values[row] for row in rows] for name, values in columns.items()}


def plot_loss_terms(log, path, steps=None) -> Path:
    """Plots loss, the three terms, embedding std and the kNN monitor into a PNG.

    `log` is Keras' CSVLogger file or a History.history-style dict (one row per
    epoch; integer epoch ticks). `steps` is a per-step log (a `StepLogger` CSV
    file or a dict with a "step" column); by default the `steps.csv` next to a
    `log` file, when present. With it, a second row of panels shows each
    logged step's own values (one per step), a method's own terms included.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = _read_log(log)
    names = [n for n in (*_TERMS, "val_knn_top1") if n in columns]
    if not names:
        raise ValueError(f"{log} has none of the VICReg metrics (loss, invariance, variance, covariance)")
    if steps is None and not isinstance(log, Mapping) and (Path(log).parent / StepLogger.FILENAME).exists():
        steps = Path(log).parent / StepLogger.FILENAME
    step_columns = _unique_steps(_read_log(steps)) if steps is not None else {}
    step_names = [n for n in step_columns if n not in ("step", "epoch")] if "step" in step_columns else []
    own = [n for n in step_names if n not in _TERMS and n in columns]  # a method's own terms (entropy, ...)
    names = [n for n in names if n != "val_knn_top1"] + own + [n for n in names if n == "val_knn_top1"]
    epochs = columns.get("epoch") or list(range(len(columns[names[0]])))
    epochs = [int(e) + 1 for e in epochs]
    rows = 2 if step_names else 1
    width = max(len(names), len(step_names))
    figure, axes = plt.subplots(rows, width, figsize=(3.2 * width, 2.8 * rows), squeeze=False)
    for ax in axes[0][len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes[0], names):
        values = np.asarray(columns[name], dtype=np.float64)
        shown = np.isfinite(values)
        ax.plot(np.asarray(epochs)[shown], values[shown], marker="o", markersize=3)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 on short runs
        ax.grid(alpha=0.3)
    if step_names:
        for ax in axes[1]:
            ax.set_visible(False)
        step = np.asarray(step_columns["step"], dtype=np.float64)
        for ax, name in zip(axes[1], step_names):
            ax.set_visible(True)
            values = np.asarray(step_columns[name], dtype=np.float64)
            shown = np.isfinite(values)
            ax.plot(step[shown], values[shown], linewidth=0.8)
            ax.set_title(f"{name} per step")
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    figure.tight_layout()
    _atomic_savefig(figure, path)
    plt.close(figure)
    return Path(path)


def plot_spectrum(singular, path, *, title: str = "embedding spectrum") -> Path:
    """Plots the normalised singular values (log scale) with the effective rank in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(singular, dtype=np.float64)
    figure, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(np.arange(1, len(s) + 1), s / max(s[0], 1e-30))
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(f"{title}\neffective rank {effective_rank(s):.1f} of {len(s)}")
    ax.grid(alpha=0.3, which="both")
    figure.tight_layout()
    _atomic_savefig(figure, path)
    plt.close(figure)
    return Path(path)


class KNNMonitor(keras.callbacks.Callback):
    """Adds `val_knn_top1`, the weighted kNN accuracy of the backbone's features, to the epoch logs.

    Runs every `every` epochs and after the last; other epochs log nothing (no
    NaN in the progress line or TensorBoard). Prints a line of its own only when
    `fit` prints no epoch line (verbose=0), which would show the value next. Place it before CSVLogger/TensorBoard
    in the callback list so they see the value; Keras' CSVLogger fixes its columns
    at the first epoch, so use `vicreg_tf.evaluation.CSVLogger(...,
    columns=["val_knn_top1"])`, which leaves the cell empty on the other epochs.

    Args:
        train_batches: `(images, labels)` batches forming the kNN memory bank.
        val_batches: `(images, labels)` batches to classify.
        every: epochs between evaluations.
        k: neighbours.
    """

    def __init__(self, train_batches, val_batches, *, every: int = 1, k: int = 20, temperature: float = 0.07):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.every = every
        self.k = k
        self.temperature = temperature
        self.history: list[tuple[int, float]] = []

    def _backbone(self):
        return getattr(self.model, "backbone", self.model)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        last = epoch + 1 == self.params.get("epochs", -1) if self.params else False
        if (epoch + 1) % self.every and not last:
            return
        backbone = self._backbone()
        train_x, train_y = extract_features(backbone, self.train_batches)
        val_x, val_y = extract_features(backbone, self.val_batches)
        accuracy = knn_accuracy(train_x, train_y, val_x, val_y, k=self.k, temperature=self.temperature)
        self.history.append((epoch + 1, accuracy))
        logs["val_knn_top1"] = accuracy
        if not (self.params or {}).get("verbose"):  # otherwise Keras' epoch line shows val_knn_top1 next
            print(f"epoch {epoch + 1}: kNN-{self.k} top-1 {accuracy:.4f}", flush=True)


class CSVLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger with `columns` that some epochs do not log (their cells are left empty).

    Keras' own fixes the columns from the first epoch's logs, and drops a key
    that first appears later (e.g. a kNN accuracy logged every other epoch).
    """

    def __init__(self, filename, columns=(), separator: str = ",", append: bool = False):
        super().__init__(filename, separator=separator, append=append)
        self.columns = tuple(columns)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        for column in self.columns:
            logs.setdefault(column, "")
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        # Keras 3.15 reads `.closed`, which tf.io.gfile's files (a gs:// or ram:// log) lack.
        if self.csv_file is not None and not getattr(self.csv_file, "closed", False):
            self.csv_file.close()
        self.csv_file = None
        self.writer = None


class StepLogger(keras.callbacks.Callback):
    """Writes the loss terms of every `every`-th training step to a CSV file (`steps.csv`).

    Columns: step (the optimizer's global step, so a resumed run continues the
    count), epoch, then every metric the model reports: loss, invariance,
    variance, covariance, embedding_std and a method's own terms (SimSiam's and
    BYOL's negative_cosine, the entropy variants' entropy). Each is that step's
    value (the mean over the steps since the previous call, when Keras calls less
    often), recovered from the running means over the epoch that Keras reports.

    Rows are unique by step. When `fit` starts, the rows past the step it starts
    from are dropped: a run resumed from an epoch backup, or rerun after a
    diverged epoch, writes those steps again. A step that was not applied (the
    global step did not advance) writes no row. Each row is appended in one
    `write` of a whole line, so a run killed mid-write leaves at most a partial
    last line, which readers skip.

    Args:
        path: the CSV file.
        every: steps between rows.
        write: whether this process writes (False on non-chief workers).
    """

    FILENAME = "steps.csv"

    def __init__(self, path, every: int = 10, write: bool = True):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path = os.fspath(path)  # any tf.io.gfile path
        self.every = every
        self.write = write
        self._epoch = 0
        self._start_step = None  # the global step this fit started from
        self._last_step = None  # the last step with a row
        self._means = (0, {})  # batches of this epoch so far, and their running means

    def _global_step(self, default: int) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        return int(optimizer.iterations.numpy()) if optimizer is not None else default

    def on_train_begin(self, logs=None):
        self._start_step = self._last_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._means = (0, {})

    def on_train_batch_begin(self, batch, logs=None):
        if self._start_step is None:  # the first step of this fit: a backup is restored by now
            self._start_step = self._global_step(default=batch)

    def _names(self, logs) -> list[str]:
        reported = [m.name for m in getattr(self.model, "metrics", [])]
        return list(dict.fromkeys(n for n in (*_TERMS, *reported) if n in logs))

    def on_train_batch_end(self, batch, logs=None):
        if not self.write or not logs:
            return
        names = self._names(logs)
        # Keras logs each metric's mean over the epoch's first `batch + 1` steps: the steps
        # since the previous call sum to (batch + 1) * mean - seen * previous mean.
        seen, previous = self._means
        means = {n: float(logs[n]) for n in names}
        self._means = (batch + 1, means)
        count = batch + 1 - seen
        values = {n: ((batch + 1) * means[n] - seen * previous.get(n, means[n])) / count for n in names}
        step = self._global_step(default=batch + 1)
        if self._last_step is None:
            start = self._start_step if self._start_step is not None else step - 1
            self._keep_rows_up_to(start, ["step", "epoch", *names])
            self._last_step = start
        if step <= self._last_step or step % self.every:
            return
        self._last_step = step
        line = ",".join([str(step), str(self._epoch + 1)] + [f"{values[n]:.7g}" for n in names]) + "\n"
        if not tf.io.gfile.exists(self.path) or tf.io.gfile.stat(self.path).length == 0:
            line = ",".join(["step", "epoch", *names]) + "\n" + line
        with tf.io.gfile.GFile(self.path, "a") as f:
            f.write(line)

    def _keep_rows_up_to(self, step: int, columns: list[str]) -> None:
        """Rewrites the file without the rows past `step` (and a partial last line), under `columns`."""
        if not tf.io.gfile.exists(self.path):
            return
        with tf.io.gfile.GFile(self.path, "r") as f:
            text = f.read()
        lines = text.splitlines(keepends=True)
        if not lines:
            return
        header = lines[0].rstrip("\n").split(",")
        rows = [dict(zip(header, line.rstrip("\n").split(","))) for line in lines[1:]
                if line.endswith("\n") and line.count(",") == len(header) - 1]
        kept = [row for row in rows if _as_step(row.get("step")) <= step]
        if header == columns and len(kept) == len(lines) - 1:
            return
        body = "".join(",".join(row.get(c, "") for c in columns) + "\n" for row in kept)
        write_text_atomically(self.path, ",".join(columns) + "\n" + body)


def _as_step(value) -> float:
    try:
        return int(value)
    except (TypeError, ValueError):
        return math.inf  # not a step: dropped
