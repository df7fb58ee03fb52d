"""Clients for a running TF Serving model server: gRPC (port 8500) and REST (port 8501).

    from vicreg_tf.serving_client import GrpcClient, RestClient, ServingError
    with GrpcClient("localhost:8500", "fmnist", timeout=5.0) as client:
        embeddings = client.embed(images)            # float32 (N, H, W, C) in [0, 1]
    embeddings = RestClient("http://localhost:8501", "fmnist").embed_bytes([open("x.jpg", "rb").read()])

Both return NumPy embeddings and raise `ServingError` (with a `kind`) naming the
server and the model. The signatures they call are the ones `vicreg_tf.serving`
writes.
"""
from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np
import tensorflow as tf

from vicreg_tf.serving import (
    EMBEDDING_OUTPUT,
    IMAGE_BYTES_INPUT,
    IMAGES_INPUT,
    SERVE_IMAGE_BYTES,
    SERVING_DEFAULT,
)


class ServingError(RuntimeError):
    """A request to TF Serving failed: the server is unreachable, the model unknown, or the input bad.

    Args:
        message: what went wrong, naming the server address and the model.
        kind: one of "unreachable", "timeout", "not_found", "bad_input", "server".
    """

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _check_images(images) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 4:
        raise ValueError(
            f"images must be a 4-D array (batch, height, width, channels), got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"images must be floats in [0, 1], got dtype {array.dtype}; scale integer images "
            "with x / 255 or send encoded files with embed_bytes()"
        )
    if len(array) == 0:
        raise ValueError("images is an empty batch")
    return array.astype(np.float32, copy=False)


def _check_bytes(images) -> list[bytes]:
    if isinstance(images, (bytes, bytearray, str)) or not isinstance(images, Sequence):
        raise TypeError(
            f"image bytes must be a list of encoded images (bytes), got {type(images).__name__}"
        )
    if not images:
        raise ValueError("image bytes is an empty list")
    for i, item in enumerate(images):
        if not isinstance(item, (bytes, bytearray)):
            raise TypeError(f"image bytes[{i}] must be bytes (an encoded JPEG/PNG), got {type(item).__name__}")
    return [bytes(b) for b in images]


class GrpcClient:
    """Client for TF Serving's gRPC PredictionService (port 8500), returning NumPy embeddings.

    Args:
        target: "host:port" of the server.
        model_name: the served model's name (the directory under the base path).
        signature_name: the float-image signature used by `embed`.
        bytes_signature_name: the encoded-image signature used by `embed_bytes`.
        version: a specific version to query; default the latest the server serves.
        timeout: seconds per request.

    Example:
    >>> with GrpcClient("localhost:8500", "fmnist") as client:  # doctest: +SKIP
    ...     embeddings = client.embed(images)  # float32 (N, H, W, C) in [0, 1] -> (N, F)
    """

    def __init__(
        self,
        target: str = "localhost:8500",
        model_name: str = "vicreg",
        *,
        signature_name: str = SERVING_DEFAULT,
        bytes_signature_name: str = SERVE_IMAGE_BYTES,
        version: int | None = None,
        timeout: float = 10.0,
    ):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.target = target
        self.model_name = model_name
        self.signature_name = signature_name
        self.bytes_signature_name = bytes_signature_name
        self.version = version
        self.timeout = float(timeout)
        # TF Serving accepts messages up to 2 GiB; gRPC's client default receive limit is 4 MiB.
        self._channel = grpc.insecure_channel(
            target,
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embeds float32 images (N, H, W, C) in [0, 1]; returns float32 (N, F)."""
        array = _check_images(images)
        return self._predict(self.signature_name, IMAGES_INPUT, tf.make_tensor_proto(array))

    def embed_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        """Embeds encoded JPEG/PNG images; the server decodes and resizes them. Returns (N, F)."""
        data = _check_bytes(images)
        proto = tf.make_tensor_proto(data, dtype=tf.string, shape=[len(data)])
        return self._predict(self.bytes_signature_name, IMAGE_BYTES_INPUT, proto)

    def predict(self, signature_name: str, inputs: dict) -> dict[str, np.ndarray]:
        """Runs any signature with {input name: array}; returns {output name: array}."""
        request = self._request(signature_name)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        response = self._call(request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def _request(self, signature_name: str):
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature_name
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        return request

    def _predict(self, signature_name: str, input_name: str, proto) -> np.ndarray:
        request = self._request(signature_name)
        request.inputs[input_name].CopyFrom(proto)
        response = self._call(request)
        if EMBEDDING_OUTPUT not in response.outputs:
            raise ServingError(
                f"TF Serving at {self.target}, model {self.model_name!r}, signature "
                f"{signature_name!r} returned outputs {sorted(response.outputs)}, not "
                f"{EMBEDDING_OUTPUT!r}: is this a vicreg-export model?",
                "server",
            )
        return tf.make_ndarray(response.outputs[EMBEDDING_OUTPUT])

    def _call(self, request):
        import grpc

        try:
            return self._stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error(e, request.model_spec.signature_name) from None

    def _error(self, e, signature_name: str) -> ServingError:
        import grpc

        code, details = e.code(), e.details()
        where = f"TF Serving at {self.target} (gRPC), model {self.model_name!r}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServingError(
                f"{where}: server unreachable ({details}); is tensorflow_model_server running "
                "with --port (gRPC, default 8500) at this address?",
                "unreachable",
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServingError(f"{where}: no answer within {self.timeout:g} s ({details})", "timeout")
        if code == grpc.StatusCode.NOT_FOUND:
            version = f" version {self.version}" if self.version is not None else ""
            return ServingError(
                f"{where}{version}: model not found on the server ({details}); check the model "
                "name and that the server has loaded it",
                "not_found",
            )
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return ServingError(
                f"{where}, signature {signature_name!r}: bad input ({details})", "bad_input"
            )
        return ServingError(f"{where}: request failed with {code.name} ({details})", "server")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RestClient:
    """Client for TF Serving's REST API (port 8501), returning NumPy embeddings; stdlib only.

    Images are sent in the row ("instances") format; encoded images as
    {"b64": ...}, as TF Serving requires for binary strings.

    Args:
        url: the server's REST root, e.g. "http://localhost:8501".
        model_name: the served model's name.
        signature_name: the float-image signature used by `embed`.
        bytes_signature_name: the encoded-image signature used by `embed_bytes`.
        version: a specific version to query; default the latest the server serves.
        timeout: seconds per request.

    Example:
    >>> client = RestClient("http://localhost:8501", "fmnist")  # doctest: +SKIP
    >>> client.embed_bytes([open("shoe.png", "rb").read()]).shape  # doctest: +SKIP
    (1, 128)
    """

    def __init__(
        self,
        url: str = "http://localhost:8501",
        model_name: str = "vicreg",
        *,
        signature_name: str = SERVING_DEFAULT,
        bytes_signature_name: str = SERVE_IMAGE_BYTES,
        version: int | None = None,
        timeout: float = 10.0,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.signature_name = signature_name
        self.bytes_signature_name = bytes_signature_name
        self.version = version
        self.timeout = float(timeout)

    @property
    def predict_url(self) -> str:
        version = f"/versions/{int(self.version)}" if self.version is not None else ""
        return f"{self.url}/v1/models/{self.model_name}{version}:predict"

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embeds float32 images (N, H, W, C) in [0, 1]; returns float32 (N, F)."""
        array = _check_images(images)
        return self._embedding(self.signature_name, array.tolist())

    def embed_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        """Embeds encoded JPEG/PNG images; the server decodes and resizes them. Returns (N, F)."""
        data = _check_bytes(images)
        instances = [{"b64": base64.b64encode(b).decode("ascii")} for b in data]
        return self._embedding(self.bytes_signature_name, instances)

    def predict(self, body: dict) -> dict:
        """POSTs a raw predict request body; returns the decoded JSON answer."""
        where = f"TF Serving at {self.url} (REST), model {self.model_name!r}"
        request = urllib.request.Request(
            self.predict_url,
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as e:
            message = _error_text(e)
            signature = body.get("signature_name", SERVING_DEFAULT)
            if e.code == 404:
                version = f" version {self.version}" if self.version is not None else ""
                raise ServingError(
                    f"{where}{version}: model not found on the server (HTTP 404: {message}); "
                    "check the model name and that the server has loaded it",
                    "not_found",
                ) from None
            if e.code == 400:
                raise ServingError(
                    f"{where}, signature {signature!r}: bad input (HTTP 400: {message})", "bad_input"
                ) from None
            raise ServingError(f"{where}: HTTP {e.code} ({message})", "server") from None
        except (TimeoutError, socket.timeout):
            raise ServingError(f"{where}: no answer within {self.timeout:g} s", "timeout") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise ServingError(f"{where}: no answer within {self.timeout:g} s", "timeout") from None
            raise ServingError(
                f"{where}: server unreachable ({e.reason}); is tensorflow_model_server running "
                "with --rest_api_port (default 8501) at this address?",
                "unreachable",
            ) from None
        except (ConnectionError, json.JSONDecodeError) as e:
            raise ServingError(f"{where}: broken answer ({e})", "server") from None

    def _embedding(self, signature_name: str, instances: list) -> np.ndarray:
        answer = self.predict({"signature_name": signature_name, "instances": instances})
        predictions = answer.get("predictions")
        if predictions is None:
            raise ServingError(
                f"TF Serving at {self.url}, model {self.model_name!r}: answer has no 'predictions' "
                f"(keys {sorted(answer)})",
                "server",
            )
        # One output: rows are the vectors; several outputs: rows are dicts by output name.
        if predictions and isinstance(predictions[0], dict):
            predictions = [row[EMBEDDING_OUTPUT] for row in predictions]
        return np.asarray(predictions, dtype=np.float32)


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", "replace")
    except OSError:
        return e.reason or ""
    try:
        return str(json.loads(body).get("error", body))
    except (json.JSONDecodeError, AttributeError):
        return body.strip() or str(e.reason)
