"""Export a backbone for TF Serving: the SavedModel writer (clients: `vicreg_tf.serving_client`).

The export is a SavedModel in TF Serving's layout, written with Keras 3's
`keras.export.ExportArchive`:

    BASE/models.config                      text-format ModelServerConfig
    BASE/NAME/<version>/saved_model.pb
    BASE/NAME/<version>/variables/
    BASE/NAME/<version>/assets.extra/tf_serving_warmup_requests

Signatures (BatchNorm on moving statistics, any batch size):

    serving_default    images: float32 [None, H, W, C] in [0, 1]  -> {"embedding": float32 [None, F]}
    serve_image_bytes  image_bytes: string [None] (JPEG/PNG/BMP/GIF) -> {"embedding": float32 [None, F]}
    serve_projection   images (as serving_default) -> {"embedding", "projection"}  (only with a projector)

The bytes signature decodes each image to C channels (RGB <-> grayscale as
needed; a GIF gives its first frame), scales it to [0, 1] and resizes it to
(H, W) with bilinear interpolation, without antialiasing and without keeping
the aspect ratio (as `keras.layers.Resizing`); an image already H x W is passed
through unchanged. All of it runs inside the graph: the server needs no Python.

A version directory appears only when it is complete: everything is written to
a hidden sibling (`.tmp-export-*`, which TF Serving ignores because only
integer-named directories are versions) and renamed at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from vicreg_tf.atomic_io import write_text_atomically

SERVING_DEFAULT = "serving_default"
SERVE_IMAGE_BYTES = "serve_image_bytes"
SERVE_PROJECTION = "serve_projection"
IMAGES_INPUT = "images"
IMAGE_BYTES_INPUT = "image_bytes"
EMBEDDING_OUTPUT = "embedding"
PROJECTION_OUTPUT = "projection"
WARMUP_FILE = "tf_serving_warmup_requests"
MODELS_CONFIG = "models.config"
# Next to the warmup file: a digest of the exported weights, so a rerun can tell an
# identical model from a new one (TF Serving reloads any new version directory).
EXPORT_RECORD = "vicreg_export.json"
_TMP_PREFIX = ".tmp-export-"
# TF Serving reads at most 1000 warmup records.
_MAX_WARMUP_RECORDS = 1000


# --------------------------------------------------------------------------- export


def backbone_io_shape(backbone: keras.Model) -> tuple[tuple[int, int, int], int]:
    """Returns ((H, W, C), F) of a backbone, or raises ValueError if it is not one.

    A backbone is a Keras model with one image input (None, H, W, C) of known
    size and one output (None, F).
    """
    if not isinstance(backbone, keras.Model):
        raise TypeError(f"expected a keras.Model backbone, got {type(backbone).__name__}")
    try:
        in_shape, out_shape = backbone.input_shape, backbone.output_shape
    except (AttributeError, ValueError) as e:
        raise ValueError(
            f"backbone {backbone.name!r} has no known input/output shape (build it or use a "
            f"functional model): {e}"
        ) from e
    if (
        not isinstance(in_shape, tuple)
        or len(in_shape) != 4
        or any(d is None for d in in_shape[1:])
    ):
        raise ValueError(
            f"backbone {backbone.name!r} must take one image input (None, H, W, C) with known "
            f"H, W, C; got input_shape={in_shape!r}"
        )
    if not isinstance(out_shape, tuple) or len(out_shape) != 2 or out_shape[-1] is None:
        raise ValueError(
            f"backbone {backbone.name!r} must return one feature vector (None, F); got "
            f"output_shape={out_shape!r}"
        )
    h, w, c = (int(d) for d in in_shape[1:])
    return (h, w, c), int(out_shape[-1])


def next_version(model_dir: str | os.PathLike) -> int:
    """The next free version number in `model_dir`: 1 + the largest integer-named subdirectory.

    Non-integer names (temporary `.tmp-export-*` directories, files) are ignored, as
    TF Serving ignores them. A missing `model_dir` gives 1.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return 1
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def weights_digest(*models: keras.Model | None) -> str:
    """SHA-256 over the shapes, dtypes and values of the models' weights, in order."""
    digest = hashlib.sha256()
    for model in models:
        if model is None:
            digest.update(b"none")
            continue
        for weight in model.weights:
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
            digest.update(f"{value.dtype.str}{value.shape}".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def latest_export_with_weights(model_dir: str | os.PathLike, digest: str) -> Path | None:
    """The newest version in `model_dir` when it was exported from weights with this `digest`, else None."""
    newest = next_version(model_dir) - 1
    record = Path(model_dir) / str(newest) / "assets.extra" / EXPORT_RECORD
    try:
        recorded = json.loads(record.read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return record.parents[1] if recorded == digest else None


def decode_images(image_bytes: tf.Tensor, height: int, width: int, channels: int) -> tf.Tensor:
    """Decodes a batch of encoded images into float32 (N, height, width, channels) in [0, 1].

    This is the preprocessing of the `serve_image_bytes` signature, usable on its
    own (e.g. in `tf.data`) so that clients can reproduce it exactly.
    """

    def decode_one(data):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        image = tf.image.convert_image_dtype(image, tf.float32)  # uint8/uint16 -> [0, 1]
        # Bilinear resize to the same size is the identity (checked in the tests).
        image = tf.image.resize(image, (height, width), method="bilinear")
        return tf.ensure_shape(image, (height, width, channels))

    return tf.map_fn(
        decode_one,
        image_bytes,
        fn_output_signature=tf.TensorSpec((height, width, channels), tf.float32),
    )


def _build_archive(backbone: keras.Model, projector: keras.Model | None) -> keras.export.ExportArchive:
    (h, w, c), features = backbone_io_shape(backbone)
    images_spec = tf.TensorSpec((None, h, w, c), tf.float32, name=IMAGES_INPUT)
    bytes_spec = tf.TensorSpec((None,), tf.string, name=IMAGE_BYTES_INPUT)

    def embed(images):
        # float32 out even for a mixed-precision backbone: clients and REST JSON expect DT_FLOAT.
        return tf.cast(backbone(images, training=False), tf.float32)

    archive = keras.export.ExportArchive()
    archive.track(backbone)
    # serving_default is added first and explicitly, so it is the float signature.
    archive.add_endpoint(
        name=SERVING_DEFAULT,
        fn=lambda images: {EMBEDDING_OUTPUT: embed(images)},
        input_signature=[images_spec],
    )
    archive.add_endpoint(
        name=SERVE_IMAGE_BYTES,
        fn=lambda image_bytes: {EMBEDDING_OUTPUT: embed(decode_images(image_bytes, h, w, c))},
        input_signature=[bytes_spec],
    )
    if projector is not None:
        if not projector.built:
            # Variables must exist before tracing, or the export would create them in a tf.function.
            projector.build((None, features))
        archive.track(projector)

        def serve_projection(images):
            embedding = backbone(images, training=False)
            return {
                EMBEDDING_OUTPUT: tf.cast(embedding, tf.float32),
                PROJECTION_OUTPUT: tf.cast(projector(embedding, training=False), tf.float32),
            }

        archive.add_endpoint(
            name=SERVE_PROJECTION, fn=serve_projection, input_signature=[images_spec]
        )
    return archive


def _default_warmup_images(shape: tuple[int, int, int], n: int) -> np.ndarray:
    # Deterministic noise: exercises the same kernels as real images.
    return np.random.default_rng(0).random((n, *shape), dtype=np.float32)


def _encode_png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(tf.convert_to_tensor(np.round(image * 255.0).astype(np.uint8))).numpy()


def _write_warmup(
    path: Path,
    model_name: str,
    images: np.ndarray,
    batch_sizes: Sequence[int],
    signatures: Sequence[str],
) -> int:
    """Writes PredictionLog records (one per signature and batch size) as a TFRecord file."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature in signatures:
            for batch_size in batch_sizes:
                # Repeat the warmup images when a batch size exceeds how many there are.
                batch = images[np.arange(batch_size) % len(images)]
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
                )
                if signature == SERVE_IMAGE_BYTES:
                    value = tf.make_tensor_proto([_encode_png(x) for x in batch], dtype=tf.string)
                    request.inputs[IMAGE_BYTES_INPUT].CopyFrom(value)
                else:
                    request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(batch))
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())
                count += 1
    return count


def write_models_config(
    base_dir: str | os.PathLike,
    names: Iterable[str],
    *,
    config_base_path: str | None = None,
) -> Path:
    """Writes (or updates) BASE/models.config, a text-format ModelServerConfig.

    Pass it to the server as `--model_config_file=.../models.config`. Each model's
    `base_path` is `config_base_path/NAME`, where `config_base_path` is the
    directory *as the server sees it*: by default the absolute path of `base_dir`
    on this machine (a server running here), or e.g. "/models" when `base_dir` is
    mounted at /models in the tensorflow/serving container. Entries already in the
    file for other models are kept; an entry for one of `names` keeps its other
    fields (version policy, labels) and gets the new base_path.

    Returns the path of the config file.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    base_dir = Path(base_dir)
    names = list(names)
    for name in names:
        _check_model_name(name)
    root = config_base_path if config_base_path is not None else str(base_dir.resolve())
    root = root.rstrip("/") or "/"

    path = base_dir / MODELS_CONFIG
    config = model_server_config_pb2.ModelServerConfig()
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as e:
            raise ValueError(f"{path} exists but is not a text-format ModelServerConfig: {e}") from e
    entries = {c.name: c for c in config.model_config_list.config}
    for name in names:
        entry = entries.get(name) or config.model_config_list.config.add(name=name)
        entry.base_path = f"{root.rstrip('/')}/{name}"
        entry.model_platform = "tensorflow"
    # A server polling the file (--model_config_file_poll_wait_seconds) never reads half of it.
    write_text_atomically(path, text_format.MessageToString(config))
    return path


def _check_model_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name.isdigit():
        raise ValueError(
            f"model name must be a non-empty directory name without '/', not starting with '.' "
            f"and not all digits (TF Serving would read it as a version); got {name!r}"
        )


def export_for_serving(
    backbone: keras.Model,
    base_dir: str | os.PathLike,
    name: str,
    *,
    version: int | None = None,
    projector: keras.Model | None = None,
    warmup: bool = True,
    warmup_images: np.ndarray | None = None,
    warmup_batch_sizes: Sequence[int] = (1, 8),
    write_config: bool = True,
    config_base_path: str | None = None,
) -> Path:
    """Exports a backbone as BASE/NAME/<version>/, ready for TF Serving.

    Writes the SavedModel (signatures in the module docstring), the warmup
    requests and BASE/models.config. The version directory is renamed into place
    only when complete; on any error nothing but the previous state remains.

    Args:
        backbone: a Keras model (None, H, W, C) float32 in [0, 1] -> (None, F).
        base_dir: TF Serving's model base directory (BASE).
        name: the model name (the directory under BASE, and the name clients use).
        version: an integer version; default: the next free one. An existing
            version is never overwritten (FileExistsError).
        projector: optional expander (None, F) -> (None, D); adds the
            `serve_projection` signature.
        warmup: write assets.extra/tf_serving_warmup_requests.
        warmup_images: float32 (N, H, W, C) in [0, 1] to warm up with; default
            deterministic noise.
        warmup_batch_sizes: one warmup record per signature and batch size.
        write_config: write/update BASE/models.config.
        config_base_path: BASE as the server sees it (see `write_models_config`).

    Returns:
        The version directory, BASE/NAME/<version>.

    Example:
    >>> from vicreg_tf.backbones import small_cnn
    >>> export_for_serving(small_cnn((28, 28, 1)), "/tmp/models", "fmnist")  # doctest: +SKIP
    PosixPath('/tmp/models/fmnist/1')
    """
    _check_model_name(name)
    image_shape, _ = backbone_io_shape(backbone)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    sizes = [int(b) for b in warmup_batch_sizes]
    if warmup and (not sizes or min(sizes) < 1):
        raise ValueError(f"warmup_batch_sizes must be positive integers, got {warmup_batch_sizes!r}")
    if warmup_images is not None:
        warmup_images = np.asarray(warmup_images, dtype=np.float32)
        if warmup_images.ndim != 4 or warmup_images.shape[1:] != image_shape or not len(warmup_images):
            raise ValueError(
                f"warmup_images must be (N, {', '.join(map(str, image_shape))}) with N >= 1, got "
                f"shape {warmup_images.shape}"
            )

    model_dir = Path(base_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = next_version(model_dir)
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(
            f"{target} already exists; versions are never overwritten. Omit --version / "
            f"version= to use the next free one ({next_version(model_dir)})."
        )

    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{version}-", dir=model_dir))
    try:
        # mkdtemp makes the directory 0700; a server running as another user
        # (e.g. in a container) must be able to read the version directory.
        os.chmod(tmp, 0o755)
        archive = _build_archive(backbone, projector)
        archive.write_out(str(tmp), verbose=False)
        (tmp / "assets.extra").mkdir(exist_ok=True)
        (tmp / "assets.extra" / EXPORT_RECORD).write_text(
            json.dumps({"weights_sha256": weights_digest(backbone, projector)}) + "\n"
        )
        if warmup:
            signatures = [SERVING_DEFAULT, SERVE_IMAGE_BYTES]
            if projector is not None:
                signatures.append(SERVE_PROJECTION)
            if len(signatures) * len(sizes) > _MAX_WARMUP_RECORDS:
                raise ValueError(f"at most {_MAX_WARMUP_RECORDS} warmup records; got {len(signatures) * len(sizes)}")
            images = warmup_images if warmup_images is not None else _default_warmup_images(image_shape, max(sizes))
            _write_warmup(tmp / "assets.extra" / WARMUP_FILE, name, images, sizes, signatures)
        if target.exists():  # another exporter took this version meanwhile
            raise FileExistsError(f"{target} appeared during the export; not overwriting it")
        try:
            # Atomic on one file system; fails (ENOTEMPTY) rather than replace a complete version.
            os.rename(tmp, target)
        except OSError as e:
            if target.exists():
                raise FileExistsError(f"{target} appeared during the export; not overwriting it") from e
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if write_config:
        write_models_config(base_dir, [name], config_base_path=config_base_path)
    return target
