"""TEST STAND-INS for TF Serving: loopback gRPC and REST servers backed by an exported SavedModel.

The real model server (tensorflow_model_server) cannot be installed on the test
machine, so these stand-ins answer the same requests the way it does, on
127.0.0.1 only, by running the export's signatures with tf.saved_model.load:

- gRPC `tensorflow.serving.PredictionService/Predict`: NOT_FOUND for an unknown
  model or version, INVALID_ARGUMENT for an unknown signature or bad inputs.
- REST `POST /v1/models/NAME[/versions/N]:predict` with "instances" (row) or
  "inputs" (columnar) and {"b64": ...} for binary strings: 404 {"error": ...}
  for an unknown model, 400 {"error": ...} for bad input.

They are not a model server: no batching, no version policy, one model.
"""
from __future__ import annotations

import base64
import json
import re
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

# Bounds so that a runaway test cannot keep a stand-in busy forever.
MAX_REQUESTS = 500


class LoadedExport:
    """An exported version directory, loaded once, runnable by signature name."""

    def __init__(self, version_dir: Path, name: str):
        self.name = name
        self.version = int(Path(version_dir).name)
        self.model = tf.saved_model.load(str(version_dir))
        self.lock = threading.Lock()

    def input_specs(self, signature: str) -> dict[str, tf.TensorSpec]:
        if signature not in self.model.signatures:
            raise KeyError(
                f"Serving signature key \"{signature}\" not found; available: "
                f"{sorted(self.model.signatures)}"
            )
        return self.model.signatures[signature].structured_input_signature[1]

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs a signature; raises ValueError with TF Serving-like text for bad input."""
        specs = self.input_specs(signature)
        if set(inputs) != set(specs):
            raise ValueError(f"inputs {sorted(inputs)} do not match the signature's {sorted(specs)}")
        feeds = {}
        for key, spec in specs.items():
            value = inputs[key]
            if spec.dtype == tf.string:
                if value.dtype.kind not in "SO":
                    raise ValueError(f"input {key!r}: expects strings, got {value.dtype}")
                tensor = tf.constant(value, dtype=tf.string)
            else:
                if value.dtype.kind not in "fiu":
                    raise ValueError(f"input {key!r}: expects {spec.dtype.name}, got {value.dtype}")
                tensor = tf.constant(value, dtype=spec.dtype)
            if not spec.shape.is_compatible_with(tensor.shape):
                raise ValueError(f"input {key!r}: expects shape {spec.shape}, got {tensor.shape}")
            feeds[key] = tensor
        try:
            with self.lock:
                outputs = self.model.signatures[signature](**feeds)
        except (tf.errors.InvalidArgumentError, TypeError, ValueError) as e:
            raise ValueError(str(e).splitlines()[0]) from e
        return {k: v.numpy() for k, v in outputs.items()}


class _PredictionServiceStandIn(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, export: LoadedExport, delay_s: float):
        self.export = export
        self.delay_s = delay_s
        self.requests = 0

    def Predict(self, request, context):
        self.requests += 1
        if self.requests > MAX_REQUESTS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "test stand-in request bound reached")
        if self.delay_s:
            time.sleep(self.delay_s)
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else self.export.version
        if spec.name != self.export.name or version != self.export.version:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({spec.name}, {version})"
                if spec.HasField("version")
                else f"Servable not found for request: Latest({spec.name})",
            )
        signature = spec.signature_name or "serving_default"
        try:
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            outputs = self.export.run(signature, inputs)
        except (KeyError, ValueError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.export.name
        response.model_spec.version.value = self.export.version
        response.model_spec.signature_name = signature
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


class GrpcPredictionServiceStandIn:
    """TEST STAND-IN for tensorflow_model_server's gRPC port, on 127.0.0.1.

    Args:
        version_dir: an exported BASE/NAME/<version> directory.
        name: the model name it answers to.
        delay_s: seconds to wait before answering (to test client timeouts).

    Example:
    >>> with GrpcPredictionServiceStandIn(path, "m") as server:  # doctest: +SKIP
    ...     GrpcClient(server.target, "m").embed(x)
    """

    def __init__(self, version_dir: Path, name: str, delay_s: float = 0.0):
        self.servicer = _PredictionServiceStandIn(LoadedExport(version_dir, name), delay_s)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(grace=None).wait(5)


_PREDICT_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?:predict$")


def _decode_b64(value):
    """Replaces {"b64": "..."} leaves by bytes, recursively, as TF Serving does."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {k: _decode_b64(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    return value


def _as_array(value, dtype: tf.dtypes.DType) -> np.ndarray:
    if dtype == tf.string:
        return np.asarray(value, dtype=object)
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"expects numbers for a {dtype.name} input, got {array.dtype} values")
    return array.astype(dtype.as_numpy_dtype)


class RestStandIn:
    """TEST STAND-IN for tensorflow_model_server's REST port, on 127.0.0.1 (stdlib http.server).

    Args:
        version_dir: an exported BASE/NAME/<version> directory.
        name: the model name it answers to.
        delay_s: seconds to wait before answering (to test client timeouts).
    """

    def __init__(self, version_dir: Path, name: str, delay_s: float = 0.0):
        export = LoadedExport(version_dir, name)
        self.export = export
        self.requests = 0
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _answer(self, status: int, body: dict):
                data = json.dumps(body).encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test): nothing to answer

            def do_POST(self):
                standin.requests += 1
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if standin.requests > MAX_REQUESTS:
                    return self._answer(503, {"error": "test stand-in request bound reached"})
                if delay_s:
                    time.sleep(delay_s)
                match = _PREDICT_PATH.match(self.path)
                if not match:
                    return self._answer(404, {"error": f"Malformed request: POST {self.path}"})
                name, version = match["name"], match["version"]
                if name != export.name or (version is not None and int(version) != export.version):
                    what = f"Specific({name}, {version})" if version else f"Latest({name})"
                    return self._answer(404, {"error": f"Servable not found for request: {what}"})
                try:
                    body = json.loads(raw)
                    return self._answer(200, standin.predict(body))
                except (KeyError, ValueError, TypeError) as e:
                    return self._answer(400, {"error": str(e)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def predict(self, body: dict) -> dict:
        signature = body.get("signature_name", "serving_default")
        specs = self.export.input_specs(signature)
        if ("instances" in body) == ("inputs" in body):
            raise ValueError('JSON object must have exactly one of "instances" or "inputs"')
        if "instances" in body:
            rows = _decode_b64(body["instances"])
            if not isinstance(rows, list) or not rows:
                raise ValueError('"instances" must be a non-empty list')
            if len(specs) == 1 and not isinstance(rows[0], dict):
                (key,) = specs
                inputs = {key: _as_array(rows, specs[key].dtype)}
            else:
                inputs = {k: _as_array([row[k] for row in rows], specs[k].dtype) for k in specs}
        else:
            columns = _decode_b64(body["inputs"])
            if not isinstance(columns, dict):
                (key,) = specs
                columns = {key: columns}
            inputs = {k: _as_array(v, specs[k].dtype) for k, v in columns.items()}
        outputs = self.export.run(signature, inputs)
        if "instances" in body:
            if len(outputs) == 1:
                (value,) = outputs.values()
                return {"predictions": value.tolist()}
            n = len(next(iter(outputs.values())))
            return {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(n)]}
        if len(outputs) == 1:
            (value,) = outputs.values()
            return {"outputs": value.tolist()}
        return {"outputs": {k: v.tolist() for k, v in outputs.items()}}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def make_test_backbone(seed: int = 0):
    """A small functional backbone (28x28x1 -> 16) whose BatchNorm statistics are not the defaults.

    Random moving means/variances make inference mode (moving statistics)
    visibly different from training mode (batch statistics), so a test that
    compares against `backbone(x, training=False)` would catch the wrong mode.
    """
    from vicreg_tf.backbones import small_cnn

    rng = np.random.default_rng(seed)
    backbone = small_cnn((28, 28, 1), widths=(8, 16))
    for layer in backbone.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0.0, 0.1, beta.shape).astype("float32"),
                rng.normal(0.0, 0.3, mean.shape).astype("float32"),
                rng.uniform(0.5, 2.0, var.shape).astype("float32"),
            ])
    return backbone
