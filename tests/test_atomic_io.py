"""Atomic files (vicreg_tf.atomic_io) and the shared argument checks (vicreg_tf.arguments)."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from vicreg_tf import arguments, atomic_io


def test_text_replaces_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "record.json"
    atomic_io.write_text_atomically(path, "old")
    atomic_io.write_text_atomically(path, "new")
    assert atomic_io.read_text(path) == "new"
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


def test_a_writer_that_fails_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "steps.csv"
    atomic_io.write_text_atomically(path, "step\n1\n")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("step\n")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_io.write_atomically(path, half_then_fail)
    assert path.read_text() == "step\n1\n" and [p.name for p in tmp_path.iterdir()] == ["steps.csv"]


def test_remote_paths_go_through_gfile(tmp_path):
    path = "ram://vicreg-atomic-io/run/record.json"
    atomic_io.write_text_atomically(path, "epoch 3")
    assert atomic_io.is_remote(path) and not atomic_io.is_remote(tmp_path)
    assert atomic_io.read_text(path) == "epoch 3"
    assert tf.io.gfile.listdir("ram://vicreg-atomic-io/run") == ["record.json"]


@pytest.mark.parametrize("where", ["local", "ram"])
def test_keras_files_are_written_whole_under_their_own_suffix(tmp_path, where):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    base = str(tmp_path) if where == "local" else "ram://vicreg-atomic-io/models"
    atomic_io.save_keras_file(model, f"{base}/m.keras")
    atomic_io.save_keras_file(model, f"{base}/m.weights.h5", weights_only=True)
    assert sorted(tf.io.gfile.listdir(base)) == ["m.keras", "m.weights.h5"]
    if where == "local":
        loaded = keras.saving.load_model(tmp_path / "m.keras")
        np.testing.assert_array_equal(loaded.get_weights()[0], model.get_weights()[0])


def test_argument_errors_name_the_argument_the_expectation_and_the_value():
    with pytest.raises(ValueError, match=r"^config.data.limit must be an int >= 0, got -1$"):
        arguments.non_negative_int("config.data.limit", -1)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive int, got True$"):
        arguments.positive_int("batch_size", True)
    with pytest.raises(ValueError, match=r"^channels must be 1 or 3, got 4$"):
        arguments.channels(4)
    assert arguments.image_size(np.int64(28)) == (28, 28) and arguments.image_size((32, 24)) == (32, 24)
    assert arguments.optional_seed(np.int32(7)) == 7 and arguments.optional_seed(None) is None
    assert arguments.is_number(0.5) and not arguments.is_number(float("nan")) and not arguments.is_int(1.0)
