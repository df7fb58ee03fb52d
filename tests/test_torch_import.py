"""The official VICReg checkpoints into Keras: vicreg_tf.transfer.from_torch_checkpoint and vicreg-import.

torchvision cannot be installed beside this torch, so `torch_resnet` is a
torchvision-compatible ResNet (same modules, same state-dict keys) with random
weights and random BatchNorm statistics. ResNet-50 is compared at 224x224;
everything else runs at 64x64, which the fully convolutional network accepts.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch  # the test extra installs it: pip install -e ".[test]"
import torch_resnet
from conftest import run_python
from test_export import _read_warmup

import vicreg_tf
from vicreg_tf import backbones, serving
from vicreg_tf.torch_import import ARCHS
from vicreg_tf.transfer import from_torch_checkpoint

torch.set_num_threads(2)

MEAN, STD = backbones.IMAGENET_MEAN, backbones.IMAGENET_STD
SMALL = (64, 64, 3)


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A torchvision-style ResNet-50 with random weights and statistics, saved as the official files are."""
    model = torch_resnet.randomize_(torch_resnet.resnet(50), seed=0)
    path = tmp_path_factory.mktemp("pth") / "resnet50.pth"
    torch.save(model.state_dict(), path)
    return SimpleNamespace(model=model, path=path, state=model.state_dict())


@pytest.fixture(scope="module")
def small_images():
    return np.random.default_rng(1).random((4, *SMALL), dtype=np.float32)


@pytest.fixture(scope="module")
def converted_small(resnet50_file):
    return from_torch_checkpoint(resnet50_file.path, "resnet50", input_shape=SMALL)


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------- equivalence with PyTorch


def test_resnet50_matches_pytorch_at_224(resnet50_file):
    images = np.random.default_rng(0).random((4, 224, 224, 3), dtype=np.float32)
    backbone = from_torch_checkpoint(resnet50_file.path, "resnet50")
    assert backbone.output.shape == (None, 2048)
    want = torch_resnet.torch_features(resnet50_file.model, images, MEAN, STD)
    got = backbone(images, training=False).numpy()
    assert relative_difference(got, want) < 1e-4
    # The statistics are the checkpoint's: training mode (batch statistics) differs.
    assert relative_difference(backbone(images, training=True).numpy(), want) > 1e-2


def test_resnet50x2_matches_pytorch_at_224(tmp_path):
    model = torch_resnet.randomize_(torch_resnet.resnet(50, widen=2), seed=2)
    path = _save(model.state_dict(), tmp_path / "resnet50x2.pth")
    images = np.random.default_rng(2).random((4, 224, 224, 3), dtype=np.float32)
    backbone = from_torch_checkpoint(path, "resnet50x2")
    assert backbone.output.shape == (None, 4096)
    assert backbone.get_layer("conv1").kernel.shape == (7, 7, 3, 128)  # the stem is widened too
    want = torch_resnet.torch_features(model, images, MEAN, STD)
    assert relative_difference(backbone(images, training=False).numpy(), want) < 1e-4


def test_fc_head_is_converted_when_present(tmp_path, small_images):
    model = torch_resnet.randomize_(torch_resnet.resnet(50, num_classes=10), seed=3)
    path = _save(model.state_dict(), tmp_path / "classifier.pth")
    classifier = from_torch_checkpoint(path, "resnet50", input_shape=SMALL)
    assert classifier.output.shape == (None, 10) and classifier.get_layer("fc").kernel.shape == (2048, 10)
    want = torch_resnet.torch_features(model, small_images, MEAN, STD)
    assert relative_difference(classifier(small_images, training=False).numpy(), want) < 1e-4
    # num_classes=0 keeps only the features.
    features = from_torch_checkpoint(path, "resnet50", input_shape=SMALL, num_classes=0)
    assert features.output.shape == (None, 2048)


def test_layer_names_follow_the_torch_modules():
    backbone = backbones.build_backbone("resnet50_torchvision", input_shape=SMALL)
    names = {layer.name for layer in backbone.layers}
    assert {"conv1", "bn1", "layer1_0_conv1", "layer1_0_downsample_0", "layer1_0_downsample_1",
            "layer4_2_bn3"} <= names
    bn = backbone.get_layer("layer2_0_bn2")
    assert (bn.epsilon, bn.momentum) == (1e-5, 0.9)
    # The stride is on the 3x3 conv (v1.5), not on the first 1x1.
    assert backbone.get_layer("layer2_0_conv2").strides == (2, 2)
    assert backbone.get_layer("layer2_0_conv1").strides == (1, 1)


# --------------------------------------------------------------------------- checkpoint layouts


def test_module_backbone_prefix_is_stripped_and_the_expander_ignored(resnet50_file, converted_small, tmp_path,
                                                                    small_images):
    state = {f"module.backbone.{k}": v for k, v in resnet50_file.state.items()}
    state["module.projector.0.weight"] = torch.zeros(8, 2048)  # a full training checkpoint's expander
    path = _save({"epoch": 3, "model": state, "optimizer": {"state": {}}}, tmp_path / "checkpoint.pth")
    backbone = from_torch_checkpoint(path, "resnet50", input_shape=SMALL)
    np.testing.assert_array_equal(
        backbone(small_images, training=False).numpy(), converted_small(small_images, training=False).numpy()
    )


def test_backbone_prefix_is_stripped(resnet50_file, tmp_path):
    state = {f"backbone.{k}": v for k, v in resnet50_file.state.items()}
    path = _save({"state_dict": state}, tmp_path / "lightning_style.pth")
    backbone = from_torch_checkpoint(path, "resnet50", input_shape=SMALL)
    np.testing.assert_array_equal(
        backbone.get_layer("layer3_5_conv2").kernel.numpy(),
        resnet50_file.state["layer3.5.conv2.weight"].numpy().transpose(2, 3, 1, 0),
    )


# --------------------------------------------------------------------------- errors


def test_missing_key_is_named(resnet50_file, tmp_path):
    state = {k: v for k, v in resnet50_file.state.items() if k != "layer2.1.bn2.running_var"}
    path = _save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys: layer2\.1\.bn2\.running_var \(1\)") as info:
        from_torch_checkpoint(path, "resnet50", input_shape=SMALL)
    assert str(path) in str(info.value) and "'resnet50'" in str(info.value)
    assert "unexpected" not in str(info.value)


def test_unexpected_key_is_named(resnet50_file, tmp_path):
    state = dict(resnet50_file.state)
    state["layer5.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    path = _save(state, tmp_path / "unexpected.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight \(1\)") as info:
        from_torch_checkpoint(path, "resnet50", input_shape=SMALL)
    assert str(path) in str(info.value) and "missing" not in str(info.value)


def test_many_missing_keys_are_counted(resnet50_file, tmp_path):
    state = {k: v for k, v in resnet50_file.state.items() if not k.startswith("layer4.")}
    path = _save(state, tmp_path / "no_layer4.pth")
    with pytest.raises(ValueError, match=r"missing keys: layer4\.0\.bn1\.bias, .*\.\.\. \(\d+ in all\)"):
        from_torch_checkpoint(path, "resnet50", input_shape=SMALL)


def test_wrong_arch_names_the_key_and_both_shapes(resnet50_file):
    with pytest.raises(ValueError) as info:
        from_torch_checkpoint(resnet50_file.path, "resnet50x2", input_shape=SMALL)
    message = str(info.value)
    assert str(resnet50_file.path) in message and "'resnet50x2'" in message
    assert "conv1.weight has shape (64, 3, 7, 7), resnet50x2 expects (128, 3, 7, 7)" in message
    assert re.search(r"and \d+ more", message)


def test_unknown_arch_lists_the_known_ones(resnet50_file):
    with pytest.raises(ValueError, match=r"unknown arch 'resnet51'.*'resnet200x2'.*'resnet50x2'"):
        from_torch_checkpoint(resnet50_file.path, "resnet51")


@pytest.mark.parametrize("content", [os.urandom(4096), b"this is a text file\n" * 20], ids=["random", "text"])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "resnet50.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint: expected a PyTorch state dict") as info:
        from_torch_checkpoint(path)
    assert str(path) in str(info.value)
    # PyTorch's own advice, to retry with weights_only=False, would run the file's code: not passed on.
    assert "weights_only" not in str(info.value) and "arbitrary code" not in str(info.value)
    assert "\n" not in str(info.value)


def test_a_checkpoint_without_a_state_dict_is_named(tmp_path):
    path = _save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=re.escape(f"{path} holds a list, not a state dict")):
        from_torch_checkpoint(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        from_torch_checkpoint(tmp_path / "nope.pth")


def test_without_torch_the_error_says_what_to_install(resnet50_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=re.escape('pip install "vicreg-tf[torch]"')):
        from_torch_checkpoint(resnet50_file.path)


# --------------------------------------------------------------------------- transfer learning


def test_saved_backbone_loads_with_plain_keras_and_fine_tunes(converted_small, tmp_path, small_images):
    path = tmp_path / "backbone.keras"
    converted_small.save(path)
    plain = keras.saving.load_model(path, compile=False)  # no custom objects
    want = converted_small(small_images, training=False).numpy()
    np.testing.assert_allclose(plain(small_images, training=False).numpy(), want, atol=1e-5, rtol=0)

    backbone = vicreg_tf.set_trainable(vicreg_tf.load_backbone(path), True)
    classifier = keras.Sequential([backbone, keras.layers.Dense(3)])
    classifier.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = {w.path: w.numpy().copy() for w in backbone.weights}
    history = classifier.fit(small_images, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = {w.path for w in backbone.weights if not np.array_equal(before[w.path], w.numpy())}
    assert any("layer4_2_conv3" in p for p in changed)
    # BatchNorm keeps the checkpoint's statistics.
    assert not any("bn" in p or "downsample_1" in p for p in changed), sorted(changed)


# --------------------------------------------------------------------------- vicreg-import


def test_cli_arch_choices_are_the_importers():
    from export import import_torch

    assert set(import_torch._ARCHS) == set(ARCHS)


def test_cli_rejects_a_bad_checkpoint_with_status_2(tmp_path, capsys):
    from export.import_torch import main

    assert main(["--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.pth is not a file" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert main(["--checkpoint", str(junk), "--out", str(tmp_path / "out")]) == 2
    assert f"{junk} is not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _listed_signatures(version_dir) -> dict:
    """The signatures as `saved_model_cli show --all` lists them, read in this process from the same proto.

    tests/test_export.py runs the tool itself; a second process here would only load TensorFlow again.
    """
    from tensorflow.core.framework import types_pb2
    from tensorflow.python.tools import saved_model_utils

    def listed(infos):  # saved_model_cli's format: ("DT_FLOAT", "(-1, 64, 64, 3)")
        return {name: (types_pb2.DataType.Name(info.dtype), "(" + ", ".join(str(d.size) for d in info.tensor_shape.dim)
                       + ")") for name, info in infos.items()}

    meta_graph = saved_model_utils.get_meta_graph_def(str(version_dir), "serve")
    return {name: {"inputs": listed(signature.inputs), "outputs": listed(signature.outputs)}
            for name, signature in meta_graph.signature_def.items()}


@pytest.mark.large
def test_vicreg_import_writes_backbone_and_serving_export(resnet50_file, converted_small, tmp_path):
    out = tmp_path / "imported"
    result = run_python(
        ["-m", "export.import_torch", f"--checkpoint={resnet50_file.path}", "--arch=resnet50",
         f"--out={out}", "--name=vicreg_resnet50", "--image_size=64"],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    version_dir = out / "export" / "vicreg_resnet50" / "1"
    assert result.stdout.split() == [str(out / "backbone.keras"), str(version_dir)]
    assert sorted(p.name for p in out.iterdir()) == ["backbone.keras", "export"]  # no temporary left
    assert (out / "export" / "models.config").is_file()

    images = np.random.default_rng(5).random((3, *SMALL), dtype=np.float32)
    want = converted_small(images, training=False).numpy()
    backbone = keras.saving.load_model(out / "backbone.keras", compile=False)
    np.testing.assert_allclose(backbone(images, training=False).numpy(), want, atol=1e-5, rtol=0)

    # The signatures vicreg-export writes (tests/test_export.py's checks).
    signatures = _listed_signatures(version_dir)
    signatures.pop("__saved_model_init_op", None)
    assert signatures == {
        "serving_default": {
            "inputs": {"images": ("DT_FLOAT", "(-1, 64, 64, 3)")},
            "outputs": {"embedding": ("DT_FLOAT", "(-1, 2048)")},
        },
        "serve_image_bytes": {
            "inputs": {"image_bytes": ("DT_STRING", "(-1)")},
            "outputs": {"embedding": ("DT_FLOAT", "(-1, 2048)")},
        },
    }
    loaded = tf.saved_model.load(str(version_dir))
    got = loaded.signatures["serving_default"](images=tf.constant(images))["embedding"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    u8 = np.random.default_rng(6).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    pngs = tf.constant([tf.io.encode_png(x).numpy() for x in u8])
    from_bytes = loaded.signatures["serve_image_bytes"](image_bytes=pngs)["embedding"].numpy()
    np.testing.assert_allclose(
        from_bytes, converted_small(u8.astype(np.float32) / 255.0, training=False).numpy(), atol=1e-4, rtol=0
    )
    assert sorted(
        (log.predict_log.request.model_spec.signature_name, log.predict_log.request.model_spec.name)
        for log in _read_warmup(version_dir)
    ) == sorted([(s, "vicreg_resnet50") for s in (serving.SERVING_DEFAULT, serving.SERVE_IMAGE_BYTES)] * 2)
