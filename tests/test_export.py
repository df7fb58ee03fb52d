"""Export for TF Serving (vicreg_tf.serving.export_for_serving, vicreg-export) and load_backbone.

The model server cannot be installed here, so these tests check what it would
load with TensorFlow's own tools: saved_model_cli, tf.saved_model.load in a
fresh process, and the warmup records parsed as PredictionLog.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_python
from google.protobuf import text_format
from serving_standins import make_test_backbone
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from export.export import main as export_main
from vicreg_tf import serving
from vicreg_tf.transfer import load_backbone

NAME = "fmnist"
H, W, C, F = 28, 28, 1, 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export shared by the module: BASE/fmnist/1 with warmup, and the backbone's .keras file."""
    base = tmp_path_factory.mktemp("models")
    backbone = make_test_backbone(seed=0)
    keras_path = tmp_path_factory.mktemp("keras") / "backbone.keras"
    backbone.save(keras_path)
    version_dir = serving.export_for_serving(backbone, base, NAME)
    return SimpleNamespace(base=base, backbone=backbone, keras_path=keras_path, version_dir=version_dir)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((64, H, W, C), dtype=np.float32)


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported.version_dir))


def _png(image_u8: np.ndarray) -> bytes:
    return tf.io.encode_png(image_u8).numpy()


# --------------------------------------------------------------------------- layout


def test_export_writes_tf_serving_layout(exported):
    version_dir = exported.version_dir
    assert version_dir == exported.base / NAME / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables" / "variables.index").is_file()
    assert (version_dir / "assets.extra" / serving.WARMUP_FILE).is_file()
    # Only the version directory: no temporary sibling left behind.
    assert sorted(p.name for p in (exported.base / NAME).iterdir()) == ["1"]
    # Readable by a server running as another user.
    assert os.stat(version_dir).st_mode & 0o005 == 0o005


def test_models_config_parses_as_model_server_config(exported):
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((exported.base / "models.config").read_text(), config)
    (entry,) = config.model_config_list.config
    assert entry.name == NAME
    assert entry.base_path == str((exported.base / NAME).resolve())
    assert entry.model_platform == "tensorflow"


def test_models_config_keeps_other_models_and_uses_container_path(tmp_path):
    serving.write_models_config(tmp_path, ["a"], config_base_path="/models")
    serving.write_models_config(tmp_path, ["b"], config_base_path="/models/")
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((tmp_path / "models.config").read_text(), config)
    assert {(c.name, c.base_path) for c in config.model_config_list.config} == {
        ("a", "/models/a"),
        ("b", "/models/b"),
    }


def test_next_version_ignores_non_integer_entries(tmp_path):
    assert serving.next_version(tmp_path / "missing") == 1
    assert serving.next_version(tmp_path) == 1
    for name in ("1", "3", ".tmp-export-4-x", "tmp", "10a"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert serving.next_version(tmp_path) == 4


# --------------------------------------------------------------------------- signatures


def _parse_saved_model_cli(text: str) -> dict:
    """{signature: {"inputs"|"outputs": {name: (dtype, shape)}}} from `saved_model_cli show --all`."""
    signatures = {}
    blocks = re.split(r"^signature_def\['([^']+)'\]:\s*$", text, flags=re.M)
    for name, block in zip(blocks[1::2], blocks[2::2]):
        block = block.split("Method name is")[0]
        entry = {"inputs": {}, "outputs": {}}
        for kind, tensor, dtype, shape in re.findall(
            r"(inputs|outputs)\['([^']+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([^)]*\))", block
        ):
            entry[kind][tensor] = (dtype, shape)
        signatures[name] = entry
    return signatures


@pytest.mark.large
def test_saved_model_cli_lists_both_signatures(exported):
    cli = shutil.which("saved_model_cli", path=str(Path(sys.executable).parent))
    assert cli, f"saved_model_cli not found next to {sys.executable}"
    result = subprocess.run(
        [cli, "show", "--dir", str(exported.version_dir), "--all"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    signatures = _parse_saved_model_cli(result.stdout)
    assert signatures["serving_default"] == {
        "inputs": {"images": ("DT_FLOAT", f"(-1, {H}, {W}, {C})")},
        "outputs": {"embedding": ("DT_FLOAT", f"(-1, {F})")},
    }
    assert signatures["serve_image_bytes"] == {
        "inputs": {"image_bytes": ("DT_STRING", "(-1)")},
        "outputs": {"embedding": ("DT_FLOAT", f"(-1, {F})")},
    }
    assert "tensorflow/serving/predict" in result.stdout


_FRESH_PROCESS_SCRIPT = r"""
import sys
from pathlib import Path
import numpy as np
import tensorflow as tf

version_dir, inputs_path, png_dir, out_path, keras_path = sys.argv[1:6]
images = np.load(inputs_path)
model = tf.saved_model.load(version_dir)
embed = model.signatures["serving_default"]
run = lambda x: embed(images=tf.constant(x))["embedding"].numpy()
pngs = [p.read_bytes() for p in sorted(Path(png_dir).glob("*.png"))]
decoded = np.stack([tf.io.decode_png(b, channels=1).numpy() for b in pngs]).astype(np.float32) / 255.0


def plain_keras(path):
    # The backbone file with Keras alone: no vicreg_tf import, no custom objects.
    import keras
    backbone = keras.saving.load_model(path, compile=False)
    assert not any(m.startswith("vicreg_tf") for m in sys.modules), "vicreg_tf was imported"
    return backbone(images, training=False).numpy()

np.savez(
    out_path,
    batch64=run(images),
    batch1=np.concatenate([run(images[i:i + 1]) for i in range(len(images))]),
    batch7=np.concatenate([run(images[i:i + 7]) for i in range(0, len(images), 7)]),
    from_bytes=model.signatures["serve_image_bytes"](image_bytes=tf.constant(pngs))["embedding"].numpy(),
    from_decoded=run(decoded),
    decoded=decoded,
    keras_file=plain_keras(keras_path),
)
"""


@pytest.fixture(scope="module")
def fresh_process(exported, images, tmp_path_factory):
    """Runs the export in a new Python process (no Keras model in memory); returns its outputs."""
    work = tmp_path_factory.mktemp("fresh")
    np.save(work / "images.npy", images)
    png_dir = work / "png"
    png_dir.mkdir()
    u8 = np.random.default_rng(2).integers(0, 256, (9, H, W, C), dtype=np.uint8)
    for i, image in enumerate(u8):
        (png_dir / f"{i:02d}.png").write_bytes(_png(image))
    script = work / "load.py"
    script.write_text(_FRESH_PROCESS_SCRIPT)
    result = run_python(
        [
            str(script), str(exported.version_dir), str(work / "images.npy"), str(png_dir),
            str(work / "out.npz"), str(exported.keras_path),
        ],
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = dict(np.load(work / "out.npz"))
    out["u8"] = u8
    return out


@pytest.mark.large
def test_fresh_process_load_equals_backbone_in_inference_mode(exported, images, fresh_process):
    expected = exported.backbone(images, training=False).numpy()
    assert fresh_process["batch64"].shape == (64, F)
    np.testing.assert_allclose(fresh_process["batch64"], expected, atol=1e-5, rtol=0)
    # The random BatchNorm statistics make training mode differ: the check above has teeth.
    # (On a copy: a call with training=True updates the moving statistics.)
    copy = keras.models.clone_model(exported.backbone)
    copy.set_weights(exported.backbone.get_weights())
    assert np.abs(copy(images, training=True).numpy() - expected).max() > 1e-2


@pytest.mark.large
def test_backbone_file_loads_with_plain_keras_in_fresh_process(exported, images, fresh_process):
    expected = exported.backbone(images, training=False).numpy()
    np.testing.assert_allclose(fresh_process["keras_file"], expected, atol=1e-6, rtol=0)


@pytest.mark.large
def test_batch_sizes_1_7_64_agree_row_by_row(fresh_process):
    np.testing.assert_allclose(fresh_process["batch1"], fresh_process["batch64"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(fresh_process["batch7"], fresh_process["batch64"], atol=1e-5, rtol=0)


@pytest.mark.large
def test_bytes_signature_equals_float_signature_on_decoded_png(fresh_process):
    np.testing.assert_array_equal(fresh_process["decoded"], fresh_process["u8"] / np.float32(255.0))
    assert fresh_process["from_bytes"].shape == (9, F)
    np.testing.assert_allclose(fresh_process["from_bytes"], fresh_process["from_decoded"], atol=1e-5, rtol=0)


def test_bytes_signature_converts_channels_and_resizes(loaded, exported):
    rgb = np.random.default_rng(3).integers(0, 256, (2, 40, 52, 3), dtype=np.uint8)
    data = [_png(x) for x in rgb]
    got = loaded.signatures["serve_image_bytes"](image_bytes=tf.constant(data))["embedding"].numpy()
    # Reference: decode to grayscale, scale to [0, 1], bilinear resize to 28x28.
    reference = np.stack([
        tf.image.resize(tf.io.decode_png(b, channels=1), (H, W), method="bilinear").numpy() / 255.0
        for b in data
    ]).astype(np.float32)
    np.testing.assert_allclose(got, exported.backbone(reference, training=False).numpy(), atol=1e-4, rtol=0)
    jpeg = tf.io.encode_jpeg(rgb[0]).numpy()
    out = loaded.signatures["serve_image_bytes"](image_bytes=tf.constant([jpeg, data[1]]))["embedding"]
    assert out.shape == (2, F)


def test_bytes_signature_rejects_undecodable_bytes(loaded):
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serve_image_bytes"](image_bytes=tf.constant([b"not an image"]))


def test_export_reloads_as_tfsm_layer(exported, images):
    layer = keras.layers.TFSMLayer(str(exported.version_dir), call_endpoint="serving_default")
    got = layer(images[:5])["embedding"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(got), exported.backbone(images[:5], training=False).numpy(), atol=1e-5
    )


# --------------------------------------------------------------------------- warmup


def _read_warmup(version_dir: Path) -> list:
    records = tf.data.TFRecordDataset(str(version_dir / "assets.extra" / serving.WARMUP_FILE))
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]


def test_warmup_records_parse_and_replay(exported, loaded):
    logs = _read_warmup(exported.version_dir)
    seen = []
    for log in logs:
        request = log.predict_log.request
        signature = request.model_spec.signature_name
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        (batch,) = {int(t.shape[0]) for t in inputs.values()}
        outputs = loaded.signatures[signature](**inputs)
        assert outputs["embedding"].shape == (batch, F)
        # The replayed answer is the backbone's on the same images (decoded, for the bytes record).
        if signature == "serve_image_bytes":
            images = np.stack([tf.io.decode_png(b, channels=C).numpy() for b in inputs["image_bytes"].numpy()])
            images = images.astype(np.float32) / 255.0
        else:
            images = inputs["images"].numpy()
        np.testing.assert_allclose(
            outputs["embedding"].numpy(), exported.backbone(images, training=False).numpy(), atol=1e-5, rtol=0
        )
        seen.append((request.model_spec.name, signature, tuple(request.inputs), batch))
    assert sorted(seen) == sorted(
        (NAME, s, (i,), b)
        for s, i in (("serving_default", "images"), ("serve_image_bytes", "image_bytes"))
        for b in (1, 8)
    )


# --------------------------------------------------------------------------- versions and atomicity


def test_export_into_existing_version_fails(exported):
    before = {p: p.stat().st_mtime_ns for p in exported.version_dir.rglob("*")}
    with pytest.raises(FileExistsError, match=re.escape(str(exported.version_dir))):
        serving.export_for_serving(exported.backbone, exported.base, NAME, version=1)
    assert {p: p.stat().st_mtime_ns for p in exported.version_dir.rglob("*")} == before


@pytest.mark.parametrize("crash_in", ["_build_archive", "_write_warmup"])
def test_crash_mid_export_leaves_no_version_directory(exported, monkeypatch, crash_in):
    model_dir = exported.base / NAME
    before = sorted(p.name for p in model_dir.iterdir())

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(serving, crash_in, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        serving.export_for_serving(exported.backbone, exported.base, NAME)
    assert sorted(p.name for p in model_dir.iterdir()) == before


_KILLED_EXPORT_SCRIPT = r"""
import os, signal, sys
import keras
from vicreg_tf import serving

keras_path, base = sys.argv[1:3]
write_warmup = serving._write_warmup

def write_warmup_then_die(*args, **kwargs):
    write_warmup(*args, **kwargs)  # SavedModel and warmup are on disk; only the rename is left
    print("killing myself", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

serving._write_warmup = write_warmup_then_die
serving.export_for_serving(keras.saving.load_model(keras_path), base, "fmnist")
print("not killed", flush=True)
"""


@pytest.mark.large
def test_sigkill_mid_export_leaves_no_version_directory(exported, tmp_path):
    base = tmp_path / "models"
    (base / NAME / "1").mkdir(parents=True)  # an existing version, which must stay the latest
    script = tmp_path / "killed_export.py"
    script.write_text(_KILLED_EXPORT_SCRIPT)
    result = run_python([str(script), str(exported.keras_path), str(base)], timeout=180)
    assert result.returncode == -9 and "killing myself" in result.stdout, result.stderr[-3000:]
    entries = sorted(p.name for p in (base / NAME).iterdir())
    # Only the hidden temporary directory is left, which TF Serving ignores (not an integer).
    assert len(entries) == 2 and entries[0].startswith(".tmp-export-2-") and entries[1] == "1", entries
    assert (base / NAME / entries[0] / "assets.extra" / serving.WARMUP_FILE).is_file()
    assert serving.next_version(base / NAME) == 2
    assert not (base / "models.config").exists()
    # The next export is unaffected.
    assert serving.export_for_serving(exported.backbone, base, NAME, warmup=False) == base / NAME / "2"


def test_export_with_projector_adds_projection_signature(tmp_path, images):
    from vicreg_tf.projector import build_projector

    backbone = make_test_backbone(seed=4)
    projector = build_projector("32-8")
    version_dir = serving.export_for_serving(
        backbone, tmp_path, "with_projection", version=5, projector=projector, warmup_batch_sizes=(2,)
    )
    assert version_dir.name == "5"
    model = tf.saved_model.load(str(version_dir))
    assert set(model.signatures) == {"serving_default", "serve_image_bytes", "serve_projection"}
    out = model.signatures["serve_projection"](images=tf.constant(images[:6]))
    embedding = backbone(images[:6], training=False)
    np.testing.assert_allclose(out["embedding"].numpy(), embedding.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        out["projection"].numpy(), projector(embedding, training=False).numpy(), atol=1e-5
    )
    assert sorted(log.predict_log.request.model_spec.signature_name for log in _read_warmup(version_dir)) == [
        "serve_image_bytes", "serve_projection", "serving_default"
    ]


def test_mixed_precision_backbone_exports_float32_embeddings(tmp_path, images):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # reset by conftest
    backbone = make_test_backbone(seed=7)
    version_dir = serving.export_for_serving(backbone, tmp_path, "mixed", warmup=False, write_config=False)
    out = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=tf.constant(images[:2]))
    assert out["embedding"].dtype == tf.float32
    want = keras.ops.convert_to_numpy(keras.ops.cast(backbone(images[:2], training=False), "float32"))
    np.testing.assert_allclose(out["embedding"].numpy(), want, atol=1e-5, rtol=0)


def test_export_rejects_a_model_without_image_input(tmp_path):
    mlp = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"image input \(None, H, W, C\).*\(None, 4\)"):
        serving.export_for_serving(mlp, tmp_path, "mlp")
    assert not (tmp_path / "mlp").exists()


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "12"])
def test_export_rejects_bad_model_names(tmp_path, exported, name):
    with pytest.raises(ValueError, match="model name"):
        serving.export_for_serving(exported.backbone, tmp_path, name)


# --------------------------------------------------------------------------- vicreg-export


def test_cli_exports_next_version_and_prints_it(exported, tmp_path, capsys):
    base = tmp_path / "cli"
    args = ["--backbone", str(exported.keras_path), "--base", str(base), "--name", NAME]
    assert export_main(args + ["--no-warmup", "--config_base_path", "/models"]) == 0
    assert capsys.readouterr().out.strip() == str(base / NAME / "1")
    assert not (base / NAME / "1" / "assets.extra" / serving.WARMUP_FILE).exists()
    assert 'base_path: "/models/fmnist"' in (base / "models.config").read_text()
    # The same weights again: no identical version 2 for TF Serving to reload; version 1 is printed.
    assert export_main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(base / NAME / "1")
    assert err.strip() == f"vicreg-export: {base / NAME / '1'} already holds these weights; no new version written"
    assert sorted(p.name for p in (base / NAME).iterdir()) == ["1"]
    # Other weights: the existing version is kept; the next export gets version 2, with warmup by default.
    other = tmp_path / "other.keras"
    make_test_backbone(seed=1).save(other)
    other_args = ["--backbone", str(other), "--base", str(base), "--name", NAME]
    assert export_main(other_args) == 0
    assert capsys.readouterr().out.strip() == str(base / NAME / "2")
    assert (base / NAME / "2" / "assets.extra" / serving.WARMUP_FILE).is_file()
    # An explicit existing version fails with exit status 1 and a message naming it.
    assert export_main(other_args + ["--version", "2"]) == 1
    assert str(base / NAME / "2") in capsys.readouterr().err


@pytest.mark.large
def test_console_script_exports_end_to_end(exported, tmp_path):
    script = shutil.which("vicreg-export", path=str(Path(sys.executable).parent))
    assert script, f"vicreg-export is not installed next to {sys.executable} (pip install -e .)"
    base = tmp_path / "models"
    result = subprocess.run(
        [script, f"--backbone={exported.keras_path}", f"--base={base}", f"--name={NAME}", "--version=3"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    version_dir = base / NAME / "3"
    assert result.stdout.strip() == str(version_dir)
    assert (version_dir / "assets.extra" / serving.WARMUP_FILE).is_file()
    assert (base / "models.config").is_file()
    images = np.random.default_rng(5).random((3, H, W, C), dtype=np.float32)
    got = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(
        got["embedding"].numpy(), exported.backbone(images, training=False).numpy(), atol=1e-5, rtol=0
    )


def test_cli_existing_version_fails_before_loading_anything(tmp_path, capsys):
    (tmp_path / "m" / "4").mkdir(parents=True)
    backbone = tmp_path / "backbone.keras"
    backbone.write_bytes(b"never read")
    args = ["--backbone", str(backbone), "--base", str(tmp_path), "--name", "m", "--version", "4"]
    assert export_main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["4"]


@pytest.fixture(scope="module")
def vicreg_file(tmp_path_factory):
    """A whole VICReg model (backbone + expander) saved as .keras, as vicreg-train writes vicreg.keras."""
    from vicreg_tf import VICReg

    model = VICReg(make_test_backbone(seed=6), projector="32-8")
    path = tmp_path_factory.mktemp("vicreg") / "vicreg.keras"
    model.save(path)
    return SimpleNamespace(model=model, path=path)


def test_load_backbone_takes_the_backbone_of_a_whole_vicreg_model(vicreg_file, images):
    backbone = load_backbone(vicreg_file.path)
    assert backbone.name == vicreg_file.model.backbone.name and backbone.trainable_weights == []
    np.testing.assert_allclose(
        backbone(images[:4], training=False).numpy(),
        vicreg_file.model.backbone(images[:4], training=False).numpy(),
        atol=1e-6,
    )


def test_cli_projection_exports_the_expander(vicreg_file, tmp_path, images, capsys):
    args = ["--backbone", str(vicreg_file.path), "--base", str(tmp_path), "--name", "proj", "--projection"]
    assert export_main(args) == 0, capsys.readouterr().err
    version_dir = tmp_path / "proj" / "1"
    model = tf.saved_model.load(str(version_dir))
    assert set(model.signatures) == {"serving_default", "serve_image_bytes", "serve_projection"}
    out = model.signatures["serve_projection"](images=tf.constant(images[:3]))
    embedding = vicreg_file.model.backbone(images[:3], training=False)
    np.testing.assert_allclose(out["embedding"].numpy(), embedding.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        out["projection"].numpy(), vicreg_file.model.projector(embedding, training=False).numpy(), atol=1e-5, rtol=0
    )
    assert len(_read_warmup(version_dir)) == 3 * 2  # three signatures, batch sizes 1 and 8


def test_cli_projection_needs_a_whole_model(exported, tmp_path, capsys):
    args = ["--backbone", str(exported.keras_path), "--base", str(tmp_path), "--name", "p", "--projection"]
    assert export_main(args) == 2
    assert "--projection needs a whole VICReg model" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_cli_missing_backbone_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.keras"
    assert export_main(["--backbone", str(missing), "--base", str(tmp_path), "--name", "m"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- load_backbone


def test_load_backbone_is_frozen_and_equal(exported, images):
    backbone = load_backbone(exported.keras_path)
    assert isinstance(backbone, keras.Model)
    assert backbone.trainable_weights == []
    np.testing.assert_allclose(
        backbone(images[:4], training=False).numpy(),
        exported.backbone(images[:4], training=False).numpy(),
        atol=1e-6,
    )


@pytest.mark.parametrize("trainable", [False, True])
def test_load_backbone_fine_tunes_only_when_trainable_and_never_batchnorm(exported, images, trainable):
    backbone = load_backbone(exported.keras_path, trainable=trainable)
    classifier = keras.Sequential([backbone, keras.layers.Dense(10)])
    classifier.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = {w.path: w.numpy().copy() for w in backbone.weights}
    classifier.fit(images[:16], np.arange(16) % 10, batch_size=16, epochs=1, verbose=0)
    changed = {w.path for w in backbone.weights if not np.array_equal(before[w.path], w.numpy())}
    conv = {w.path for w in backbone.weights if "conv" in w.path}
    assert bool(changed & conv) == trainable
    # BatchNorm stays on the pretrained statistics (a training-mode fit would move them).
    assert not any("bn" in path for path in changed), sorted(changed)


def test_set_trainable_can_unfreeze_batchnorm_too(exported):
    from vicreg_tf.transfer import set_trainable

    backbone = load_backbone(exported.keras_path)
    bn = backbone.get_layer("bn0_0")
    assert not set_trainable(backbone, True).get_layer("bn0_0").trainable
    assert set_trainable(backbone, True, freeze_batchnorm=False).get_layer("bn0_0").trainable
    assert set_trainable(backbone, False).trainable_weights == [] and not bn.trainable


def test_load_backbone_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.keras"):
        load_backbone(tmp_path / "nope.keras")


def test_load_backbone_points_a_savedmodel_to_tfsmlayer(exported):
    with pytest.raises(ValueError, match="TFSMLayer"):
        load_backbone(exported.version_dir)


def test_load_backbone_rejects_a_model_that_is_not_a_backbone(tmp_path):
    path = tmp_path / "mlp.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save(path)
    with pytest.raises(ValueError, match="does not hold a backbone"):
        load_backbone(path)
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.keras"):
        load_backbone(tmp_path / "junk.keras")


def test_an_export_records_its_weights_so_an_identical_rerun_can_be_told_apart(tmp_path):
    backbone = make_test_backbone(seed=0)
    model_dir = tmp_path / NAME
    digest = serving.weights_digest(backbone, None)
    assert serving.latest_export_with_weights(model_dir, digest) is None  # nothing exported yet
    version_dir = serving.export_for_serving(backbone, tmp_path, NAME, warmup=False, write_config=False)
    assert serving.latest_export_with_weights(model_dir, digest) == version_dir
    changed = make_test_backbone(seed=1)
    assert serving.latest_export_with_weights(model_dir, serving.weights_digest(changed, None)) is None


def test_cli_rejects_a_truncated_keras_file_in_one_line(exported, tmp_path, capsys):
    truncated = tmp_path / "backbone.keras"
    truncated.write_bytes(Path(exported.keras_path).read_bytes()[:1000])
    assert export_main(["--backbone", str(truncated), "--base", str(tmp_path / "models"), "--name", NAME]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vicreg-export: error: not a valid .keras file (truncated or not a zip): {truncated}"
    )
    assert not (tmp_path / "models").exists()
