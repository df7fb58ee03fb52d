"""`.keras` files saved by vicreg-tf's main of 2026-12-02 (commit bb9ee6f, before the method family
moved onto one base model) load, give the same features and train.

Made by a script like this one's `_fit_one_step` over small_cnn((16, 16, 3), widths=(4, 8)),
projector "16-16", SGD(0.01, momentum 0.9), one step on `inputs.npy` and its reverse.
"""
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import vicreg_tf

FIXTURES = Path(__file__).parent / "fixtures"
SAVED = {
    "vicreg": vicreg_tf.VICReg,
    "vicreg_device_views": vicreg_tf.VICReg,
    "simsiam": vicreg_tf.SimSiam,
    "byol": vicreg_tf.BYOL,
    "logdet": vicreg_tf.EntropyVICReg,
}


@pytest.mark.parametrize("name", list(SAVED))
def test_a_file_saved_by_the_old_main_loads_predicts_and_trains(name):
    model = keras.saving.load_model(FIXTURES / f"{name}.keras")
    assert isinstance(model, SAVED[name])
    inputs = np.load(FIXTURES / "inputs.npy")
    np.testing.assert_allclose(model.predict(inputs, verbose=0), np.load(FIXTURES / f"{name}_features.npy"),
                               rtol=1e-5, atol=1e-6)
    if name == "vicreg_device_views":
        assert model.device_views is not None
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(tf.data.Dataset.from_tensors((inputs, inputs[::-1].copy())), verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights))
