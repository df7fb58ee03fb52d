"""Evaluation protocols and collapse diagnostics."""
import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from vicreg_tf import evaluation


def _reference_knn(train_x, train_y, test_x, k, temperature, classes):
    """Verbatim weighted kNN of solo-learn / InstDisc, in NumPy, one query at a time."""
    bank = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    predictions = []
    for q in test_x:
        sims = bank @ (q / np.linalg.norm(q))
        top = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(classes)
        for i in top:
            scores[train_y[i]] += np.exp(sims[i] / temperature)
        predictions.append(np.argmax(scores))
    return np.asarray(predictions)


def _blobs(rng, n_per_class, classes=4, dim=16, spread=0.3):
    centres = rng.normal(size=(classes, dim)) * 3
    x = np.concatenate([centres[c] + spread * rng.normal(size=(n_per_class, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per_class)
    return x.astype(np.float32), y


def test_knn_matches_reference_implementation(rng):
    train_x = rng.normal(size=(300, 8)).astype(np.float32)
    train_y = rng.integers(0, 5, size=300)
    test_x = rng.normal(size=(50, 8)).astype(np.float32)
    test_y = rng.integers(0, 5, size=50)
    for k in (1, 20):
        expected = np.mean(_reference_knn(train_x, train_y, test_x, k, 0.07, 5) == test_y)
        got = evaluation.knn_accuracy(train_x, train_y, test_x, test_y, k=k, chunk=16)
        assert got == pytest.approx(expected)


def test_knn_weights_votes_by_similarity():
    # Two far neighbours of class 1 outvote nothing: one very close neighbour of class 0 wins
    # with exp(s / 0.07) weights, while a plain majority vote of k=3 would say class 1.
    train_x = np.array([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866]], np.float32)
    train_y = np.array([0, 1, 1])
    test_x = np.array([[1.0, 0.01]], np.float32)
    assert evaluation.knn_accuracy(train_x, train_y, test_x, np.array([0]), k=3) == 1.0


def test_knn_separable_clusters_are_perfect(rng):
    x, y = _blobs(rng, 50)
    assert evaluation.knn_accuracy(x, y, x + 0.01, y, k=5) == 1.0


def test_knn_rejects_mismatched_widths(rng):
    with pytest.raises(ValueError, match="feature widths differ"):
        evaluation.knn_accuracy(np.ones((4, 3)), np.zeros(4), np.ones((2, 5)), np.zeros(2))


def test_linear_probe_learns_separable_data_and_not_noise(rng):
    x, y = _blobs(rng, 200, spread=1.0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    result = evaluation.linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=20, batch_size=128)
    assert result["top1"] > 0.95
    noise = rng.normal(size=(800, 16)).astype(np.float32)
    labels = rng.integers(0, 4, size=800)
    chance = evaluation.linear_probe(noise[:600], labels[:600], noise[600:], labels[600:], epochs=5)
    assert chance["top1"] < 0.45


def test_linear_probe_rejects_label_count_mismatch():
    with pytest.raises(ValueError, match="feature rows but"):
        evaluation.linear_probe(np.ones((5, 2)), np.zeros(4), np.ones((2, 2)), np.zeros(2))


def test_label_subset_is_class_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    subset = evaluation.label_subset(labels, 0.1, seed=3)
    assert len(subset) == 100 and len(np.unique(subset)) == 100
    np.testing.assert_array_equal(np.bincount(labels[subset]), np.full(10, 10))
    np.testing.assert_array_equal(subset, evaluation.label_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, evaluation.label_subset(labels, 0.1, seed=4))
    assert len(evaluation.label_subset(labels, 0.001)) == 10  # at least one per class


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_subset_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction must be in"):
        evaluation.label_subset(np.zeros(10), fraction)


def test_effective_rank_of_rank_one_and_isotropic_embeddings(rng):
    direction = rng.normal(size=(1, 32))
    collapsed = rng.normal(size=(512, 1)) * direction
    assert evaluation.effective_rank(evaluation.singular_values(collapsed)) == pytest.approx(1.0, abs=1e-3)
    isotropic = rng.normal(size=(4096, 32))
    assert evaluation.effective_rank(evaluation.singular_values(isotropic)) > 30


def test_embedding_std_uses_n_minus_one(rng):
    z = rng.normal(size=(10, 4))
    assert evaluation.embedding_std(z) == pytest.approx(np.mean(np.std(z, axis=0, ddof=1)))
    with pytest.raises(ValueError, match="N >= 2"):
        evaluation.embedding_std(z[:1])


def test_plots_write_png_files(tmp_path):
    log = tmp_path / "log.csv"
    with open(log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "covariance", "embedding_std", "invariance", "loss", "val_knn_top1", "variance"])
        writer.writerow([0, 3.0, 0.5, 0.1, 20.0, "nan", 0.6])
        writer.writerow([1, 2.0, 0.9, 0.2, 10.0, 0.7, 0.2])
    out = evaluation.plot_loss_terms(log, tmp_path / "plots" / "loss_terms.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = evaluation.plot_spectrum(np.array([3.0, 2.0, 1.0, 0.1]), tmp_path / "spectrum.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("**/.tmp-*"))


def test_plot_loss_terms_rejects_a_log_without_vicreg_metrics(tmp_path):
    with pytest.raises(ValueError, match="none of the VICReg metrics"):
        evaluation.plot_loss_terms({"accuracy": [0.1]}, tmp_path / "x.png")


def _tiny_backbone():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu")], name="tiny")


def test_extract_features_returns_all_rows(rng):
    backbone = _tiny_backbone()
    x = rng.normal(size=(10, 4)).astype(np.float32)
    batches = tf.data.Dataset.from_tensor_slices((x, np.arange(10))).batch(3)
    features, labels = evaluation.extract_features(backbone, batches)
    assert features.shape == (10, 8)
    np.testing.assert_array_equal(labels, np.arange(10))
    np.testing.assert_allclose(features, backbone(x).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        evaluation.extract_features(backbone, batches.take(0))


def test_fine_tune_leaves_the_callers_backbone_unchanged(rng):
    x, y = _blobs(rng, 64, classes=2, dim=4)
    backbone = _tiny_backbone()
    before = [w.copy() for w in backbone.get_weights()]
    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(128, seed=0).batch(32)
    result = evaluation.fine_tune(backbone, batches, batches, num_classes=2, epochs=10, learning_rate=1e-2)
    assert result["top1"] > 0.9
    for a, b in zip(before, backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_knn_monitor_logs_every_n_epochs_and_after_the_last(rng):
    x, y = _blobs(rng, 16, classes=2, dim=4)
    labelled = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    monitor = evaluation.KNNMonitor(labelled, labelled, every=2, k=3)
    model.fit(x, y.astype(np.float32), epochs=3, verbose=0, callbacks=[monitor])
    assert [epoch for epoch, _ in monitor.history] == [2, 3]
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in monitor.history)


def test_knn_monitor_logs_nothing_on_skipped_epochs_and_the_csv_keeps_its_column(rng, tmp_path):
    x, y = _blobs(rng, 16, classes=2, dim=4)
    labelled = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    epoch_logs = []
    callbacks = [
        evaluation.KNNMonitor(labelled, labelled, every=2, k=3),
        evaluation.CSVLogger(tmp_path / "log.csv", columns=["val_knn_top1"]),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_logs.append(dict(logs))),
    ]
    model.fit(x, y.astype(np.float32), epochs=3, verbose=0, callbacks=callbacks)
    assert "val_knn_top1" not in epoch_logs[0]  # no NaN in the progress line on skipped epochs
    assert 0.0 <= epoch_logs[1]["val_knn_top1"] <= 1.0
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["val_knn_top1"] != "" for row in rows] == [False, True, True]
    assert all(float(row["loss"]) >= 0 for row in rows)


class _FakeModel:
    def __init__(self, metrics=()):
        self.optimizer = keras.optimizers.SGD(0.1)
        self.metrics = [keras.metrics.Mean(name=name) for name in metrics]


def _fit_like(logger, model, per_step, *, start_step=0, epoch=0, applied=None):
    """Calls `logger` as fit does for one epoch whose steps have the values `per_step` (Keras logs running means)."""
    logger.on_train_begin()
    logger.on_epoch_begin(epoch)
    model.optimizer.iterations.assign(start_step)
    sums = {}
    for batch, values in enumerate(per_step):
        logger.on_train_batch_begin(batch)
        if applied is None or applied[batch]:
            model.optimizer.iterations.assign_add(1)
        sums = {k: sums.get(k, 0.0) + v for k, v in values.items()}
        logger.on_train_batch_end(batch, {k: np.float32(total / (batch + 1)) for k, total in sums.items()})


def test_step_logger_appends_every_n_steps_and_continues_the_global_step(tmp_path):
    path = tmp_path / "steps.csv"
    logger = evaluation.StepLogger(path, every=2)
    model = _FakeModel()
    logger.set_model(model)
    logs = {"loss": 20.0, "invariance": 0.5, "variance": 0.6, "covariance": 0.7, "embedding_std": 0.1, "lr": 1.0}
    for step in range(1, 6):
        model.optimizer.iterations.assign(step)
        logger.on_train_batch_end(step - 1, logs)
    with open(path, "a") as f:
        f.write("6,1,19.")  # a run killed mid-write
    columns = evaluation._read_log(path)
    assert columns["step"] == [2.0, 4.0]
    assert set(columns) == {"step", "epoch", "loss", "invariance", "variance", "covariance", "embedding_std"}


def test_loss_terms_plot_has_integer_epoch_ticks_and_a_per_step_row(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    log = {"epoch": [0, 1], "loss": [20.0, 19.0], "invariance": [1.0, 0.5], "variance": [0.6, 0.5],
           "covariance": [0.5, 0.7]}
    steps = {"step": [1, 2, 3, 4], "epoch": [1, 1, 2, 2], "loss": [21.0, 20.0, 19.5, 19.0]}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    evaluation.plot_loss_terms(log, tmp_path / "terms.png", steps=steps)
    axes = [ax for ax in figures[0].axes if ax.get_visible()]
    epoch_ticks = np.concatenate([ax.get_xticks() for ax in axes if ax.get_xlabel() == "epoch"])
    assert np.all(epoch_ticks == np.round(epoch_ticks))
    assert [ax.get_title() for ax in axes if ax.get_xlabel() == "step"] == ["loss per step"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_step_logger_writes_each_steps_own_value_and_the_methods_own_terms(tmp_path):
    path = tmp_path / "steps.csv"
    model = _FakeModel(metrics=("loss", "negative_cosine", "variance"))
    logger = evaluation.StepLogger(path, every=1)
    logger.set_model(model)
    losses = [4.0, 2.0, 9.0, 1.0]
    _fit_like(logger, model, [{"loss": v, "negative_cosine": -v / 10, "variance": 0.5, "lr": 1.0} for v in losses])
    rows = _rows(path)
    assert list(rows[0]) == ["step", "epoch", "loss", "variance", "negative_cosine"]
    np.testing.assert_allclose([float(r["loss"]) for r in rows], losses, rtol=1e-6)  # not 4, 3, 5, 4
    np.testing.assert_allclose([float(r["negative_cosine"]) for r in rows], [-v / 10 for v in losses], rtol=1e-5)


def test_step_logger_rows_stay_unique_after_a_restart_and_a_skipped_step(tmp_path):
    path = tmp_path / "steps.csv"
    model = _FakeModel()
    logger = evaluation.StepLogger(path, every=1)
    logger.set_model(model)
    _fit_like(logger, model, [{"loss": float(v)} for v in range(1, 7)])  # steps 1-6, then killed
    with open(path, "a") as f:
        f.write("7,1,19.")  # mid-write
    # Restarted from the backup after step 3 (epoch 1 of 3 steps each): steps 4-6 again, with new
    # values; the second step of the epoch is not applied (the global step stays at 4).
    _fit_like(logger, model, [{"loss": v} for v in (40.0, 41.0, 50.0)], start_step=3, epoch=1,
              applied=[True, False, True])
    rows = _rows(path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == [1.0, 2.0, 3.0, 40.0, 50.0]
    assert [r["epoch"] for r in rows] == ["1", "1", "1", "2", "2"]
    # A rerun after a diverged first epoch starts again from step 0.
    _fit_like(logger, model, [{"loss": 7.0}], start_step=0)
    assert [(int(r["step"]), float(r["loss"])) for r in _rows(path)] == [(1, 7.0)]


def test_knn_monitor_prints_its_own_line_only_without_keras_epoch_lines(rng, capsys):
    x, y = _blobs(rng, 16, classes=2, dim=4)
    labelled = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    for verbose in (2, 0):
        model.fit(x, y.astype(np.float32), epochs=1, verbose=verbose,
                  callbacks=[evaluation.KNNMonitor(labelled, labelled, k=3)])
        lines = capsys.readouterr().out.splitlines()
        knn = [line for line in lines if "kNN-3 top-1" in line]
        epoch_lines = [line for line in lines if "val_knn_top1" in line]
        assert len(knn) + len(epoch_lines) == 1, (verbose, lines)  # the value once, not twice
        assert bool(knn) == (verbose == 0)


def test_per_step_panels_draw_one_point_per_step_and_the_methods_own_terms(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    log = {"epoch": [0], "loss": [20.0], "invariance": [1.0], "variance": [0.6], "covariance": [0.5],
           "entropy": [3.0]}
    steps = {"step": [1, 2, 3, 2, 3], "epoch": [1] * 5, "loss": [21.0, 20.0, 19.5, 30.0, 31.0],
             "entropy": [3.0, 2.9, 2.8, 2.7, 2.6]}  # an older file: steps 2 and 3 written twice
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    evaluation.plot_loss_terms(log, tmp_path / "terms.png", steps=steps)
    axes = {ax.get_title(): ax for ax in figures[0].axes if ax.get_visible()}
    assert "entropy" in axes and "entropy per step" in axes
    (line,) = axes["loss per step"].get_lines()
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [21.0, 30.0, 31.0]
