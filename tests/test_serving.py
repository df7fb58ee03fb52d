"""The TF Serving clients (vicreg_tf.serving_client.GrpcClient, RestClient) against loopback TEST STAND-INS.

The stand-ins (tests/serving_standins.py) serve the exported SavedModel on
127.0.0.1 the way tensorflow_model_server answers, including its error codes;
the real server is not installable on the test machine.
"""
from __future__ import annotations

import base64
import socket

import numpy as np
import pytest
import tensorflow as tf
from serving_standins import GrpcPredictionServiceStandIn, RestStandIn, make_test_backbone

from vicreg_tf import serving
from vicreg_tf.serving_client import GrpcClient, RestClient, ServingError

NAME = "fmnist"
H, W, C, F = 28, 28, 1, 16


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    backbone = make_test_backbone(seed=0)
    version_dir = serving.export_for_serving(
        backbone, tmp_path_factory.mktemp("models"), NAME, warmup=False, write_config=False
    )
    return backbone, version_dir


@pytest.fixture(scope="module")
def grpc_server(export):
    with GrpcPredictionServiceStandIn(export[1], NAME) as server:
        yield server


@pytest.fixture(scope="module")
def rest_server(export):
    with RestStandIn(export[1], NAME) as server:
        yield server


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((5, H, W, C), dtype=np.float32)


@pytest.fixture(scope="module")
def expected(export, images):
    backbone, _ = export
    return backbone(images, training=False).numpy()


@pytest.fixture(scope="module")
def pngs():
    u8 = np.random.default_rng(2).integers(0, 256, (3, H, W, C), dtype=np.uint8)
    return u8, [tf.io.encode_png(x).numpy() for x in u8]


def _closed_port() -> int:
    """A local port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["grpc", "rest"])
def make_client(request, grpc_server, rest_server):
    """Builds a client of either kind against its stand-in: make_client(model_name=..., **kw)."""

    def make(model_name=NAME, address=None, **kwargs):
        if request.param == "grpc":
            return GrpcClient(address or grpc_server.target, model_name, **kwargs)
        return RestClient(address or rest_server.url, model_name, **kwargs)

    make.kind = request.param
    return make


# --------------------------------------------------------------------------- round trips


def test_embed_round_trips(make_client, images, expected):
    got = make_client().embed(images)
    assert got.dtype == np.float32 and got.shape == (5, F)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_embed_bytes_round_trips(make_client, export, pngs):
    backbone, _ = export
    u8, data = pngs
    got = make_client().embed_bytes(data)
    want = backbone(u8.astype(np.float32) / 255.0, training=False).numpy()
    assert got.shape == (3, F)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_specific_version_round_trips(make_client, images, expected):
    np.testing.assert_allclose(make_client(version=1).embed(images[:2]), expected[:2], atol=1e-5)


def test_float64_images_are_sent_as_float32(make_client, images, expected):
    np.testing.assert_allclose(make_client().embed(images.astype(np.float64)), expected, atol=1e-5)


def test_predict_returns_every_output_by_name(make_client, images, expected):
    client = make_client()
    if make_client.kind == "grpc":
        outputs = client.predict("serving_default", {"images": images[:2]})
        assert set(outputs) == {"embedding"}
        got = outputs["embedding"]
    else:
        # The columnar ("inputs") format, which embed() does not use.
        answer = client.predict({"signature_name": "serving_default", "inputs": {"images": images[:2].tolist()}})
        got = np.asarray(answer["outputs"], np.float32)
    np.testing.assert_allclose(got, expected[:2], atol=1e-5, rtol=0)


def test_rest_client_sends_binary_inputs_as_b64(rest_server, pngs, monkeypatch):
    sent = []
    client = RestClient(rest_server.url, NAME)
    original = client.predict
    monkeypatch.setattr(client, "predict", lambda body: sent.append(body) or original(body))
    client.embed_bytes(pngs[1][:1])
    (body,) = sent
    assert body["signature_name"] == "serve_image_bytes"
    assert body["instances"] == [{"b64": base64.b64encode(pngs[1][0]).decode("ascii")}]


def test_rest_client_needs_an_http_url():
    with pytest.raises(ValueError, match="http://.*'localhost:8501'"):
        RestClient("localhost:8501", NAME)


# --------------------------------------------------------------------------- errors


def test_unknown_model_raises_not_found(make_client, images):
    client = make_client(model_name="no_such_model")
    with pytest.raises(ServingError, match="'no_such_model'.*not found") as info:
        client.embed(images[:1])
    assert info.value.kind == "not_found"
    assert (client.target if make_client.kind == "grpc" else client.url) in str(info.value)


def test_unknown_version_raises_not_found(make_client, images):
    with pytest.raises(ServingError, match="version 7.*not found") as info:
        make_client(version=7).embed(images[:1])
    assert info.value.kind == "not_found"


def test_wrong_image_size_raises_bad_input(make_client):
    with pytest.raises(ServingError, match="serving_default.*bad input") as info:
        make_client().embed(np.zeros((2, 32, 32, 3), np.float32))
    assert info.value.kind == "bad_input"
    assert NAME in str(info.value)


def test_undecodable_bytes_raise_bad_input(make_client):
    with pytest.raises(ServingError, match="serve_image_bytes.*bad input") as info:
        make_client().embed_bytes([b"this is not a PNG"])
    assert info.value.kind == "bad_input"


def test_unreachable_server_raises_quickly(make_client, images):
    port = _closed_port()
    address = f"127.0.0.1:{port}" if make_client.kind == "grpc" else f"http://127.0.0.1:{port}"
    with pytest.raises(ServingError, match="unreachable") as info:
        make_client(address=address, timeout=5.0).embed(images[:1])
    assert info.value.kind == "unreachable"
    assert f"127.0.0.1:{port}" in str(info.value) and NAME in str(info.value)


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_slow_server_raises_timeout(export, images, kind):
    stand_in = GrpcPredictionServiceStandIn if kind == "grpc" else RestStandIn
    with stand_in(export[1], NAME, delay_s=1.0) as server:
        client = (
            GrpcClient(server.target, NAME, timeout=0.2)
            if kind == "grpc"
            else RestClient(server.url, NAME, timeout=0.2)
        )
        with pytest.raises(ServingError, match=r"no answer within 0.2 s") as info:
            client.embed(images[:1])
    assert info.value.kind == "timeout"


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.zeros((28, 28, 1), np.float32), ValueError, r"4-D array.*\(28, 28, 1\)"),
        (np.zeros((1, 28, 28, 1), np.uint8), ValueError, r"floats in \[0, 1\].*uint8"),
        (np.zeros((0, 28, 28, 1), np.float32), ValueError, "empty batch"),
    ],
)
def test_client_rejects_malformed_images_before_sending(make_client, bad, error, message):
    with pytest.raises(error, match=message):
        make_client().embed(bad)


@pytest.mark.parametrize(
    "bad, error, message",
    [(b"one image", TypeError, "list of encoded images"), ([], ValueError, "empty"),
     (["x.png"], TypeError, r"\[0\].*str")],
)
def test_client_rejects_malformed_bytes_before_sending(make_client, bad, error, message):
    with pytest.raises(error, match=message):
        make_client().embed_bytes(bad)


def test_serving_error_is_a_runtime_error():
    assert issubclass(ServingError, RuntimeError)
