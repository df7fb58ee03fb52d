"""The README's Keras snippet runs as written (with a shorter schedule)."""
import re

import keras
import numpy as np
from conftest import REPO


def test_readme_keras_snippet_trains_saves_and_exports(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    short = snippet.replace("model.fit(pairs, epochs=5, steps_per_epoch=234)",
                            "model.fit(pairs, epochs=1, steps_per_epoch=2)")
    assert short != snippet, "the README's fit call changed: update this test"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(short, "README.md", "exec"), namespace)
    assert set(namespace["model"].history.history) >= {"loss", "invariance", "variance", "covariance", "embedding_std"}
    assert (tmp_path / "models" / "fmnist" / "1" / "saved_model.pb").exists()
    backbone = keras.saving.load_model(tmp_path / "backbone.keras")
    assert backbone.output.shape == (None, 128)


def _serving_commands():
    """The README's serving recipe, as argument lists (line continuations joined, comments dropped)."""
    import shlex

    text = (REPO / "README.md").read_text()
    section = text.split("## Serving", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = {}
    for line in block.splitlines():
        if line.strip():
            args = shlex.split(line, comments=True)
            commands[args[0]] = args
    return commands


def test_readme_serving_recipe_matches_the_export_and_the_container(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    import tensorflow as tf
    from google.protobuf import text_format
    from serving_standins import make_test_backbone
    from tensorflow_serving.config import model_server_config_pb2

    from export.export import main as export_main

    commands = _serving_commands()
    export_args = dict(a[2:].split("=", 1) for a in commands["vicreg-export"][1:])
    docker = commands["docker"]
    host, container = docker[docker.index("-v") + 1].split(":")
    # The directory vicreg-export writes is the one docker mounts, and the config file the
    # server reads is the one vicreg-export writes, seen through the mount.
    assert export_args["base"] == host
    config_flag = next(a for a in docker if a.startswith("--model_config_file="))
    assert config_flag == f"--model_config_file={container}/models.config"

    # Run the README's vicreg-export line with BASE moved to a temporary directory.
    backbone_path = tmp_path / "backbone.keras"
    make_test_backbone(seed=0).save(backbone_path)
    base = tmp_path / "srv_models"
    argv = [a.replace(export_args["backbone"], str(backbone_path)).replace(host, str(base))
            for a in commands["vicreg-export"][1:]]
    assert export_main(argv) == 0
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((base / "models.config").read_text(), config)
    (entry,) = config.model_config_list.config
    assert entry.name == export_args["name"]
    assert entry.base_path == f"{container}/{export_args['name']}"  # a path inside the container

    # The curl body is a batch of instances the exported signature accepts.
    python = commands["python3"]
    monkeypatch.chdir(tmp_path)
    body = json.loads(subprocess.run([sys.executable, *python[1:]], capture_output=True, text=True, check=True).stdout)
    instances = np.asarray(body["instances"], dtype=np.float32)
    loaded = tf.saved_model.load(str(base / export_args["name"] / "1"))
    signature = loaded.signatures[body["signature_name"]]
    (spec,) = signature.structured_input_signature[1].values()
    assert spec.shape.is_compatible_with(instances.shape) and instances.shape[0] == 1
    assert 0.0 <= instances.min() and instances.max() <= 1.0
    curl = commands["curl"]
    assert f"/v1/models/{export_args['name']}:predict" in curl[2] and curl[-1] == "@request.json"


def test_readme_commands_name_installed_programs():
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    programs = {line.split("=")[0].strip() for line in setup["options.entry_points"]["console_scripts"].splitlines()
                if line.strip()}
    text = (REPO / "README.md").read_text()
    block = re.search(r"## The command-line tools\n\n```bash\n(.*?)```", text, re.S).group(1)
    for line in block.splitlines():
        assert line.split()[0] in programs, line  # not `python -m trainers...`: that needs the checkout
    assert any(line.startswith("vicreg-launch-local --workers=2 -- ") for line in block.splitlines())
