"""The expander built from a spec string."""
import keras
import numpy as np
import pytest

from vicreg_tf import build_projector, parse_projector_spec


def test_spec_parses_into_widths():
    assert parse_projector_spec("8192-8192-8192") == [8192, 8192, 8192]
    assert parse_projector_spec(" 64 ") == [64]


def test_blocks_are_dense_bn_relu_and_a_linear_last_layer():
    expander = build_projector("16-16-8")
    kinds = [type(layer).__name__ for layer in expander.layers]
    assert kinds == ["Dense", "BatchNormalization", "ReLU"] * 2 + ["Dense"]
    assert all(layer.synchronized for layer in expander.layers if isinstance(layer, keras.layers.BatchNormalization))
    out = expander(np.ones((4, 5), np.float32))
    assert out.shape == (4, 8)


def test_spec_of_wrong_type_raises():
    with pytest.raises(TypeError, match="got 8192"):
        parse_projector_spec(8192)


@pytest.mark.parametrize("spec", ["a-b", "8192-", "-1-2", "12.5"])
def test_bad_spec_names_the_received_string(spec):
    with pytest.raises(ValueError, match=f"{spec!r}"):
        build_projector(spec)
