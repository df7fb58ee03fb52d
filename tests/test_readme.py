"""The README's Keras snippet runs as written (with a shorter schedule)."""
import re

import keras

from conftest import REPO


def test_readme_keras_snippet_trains_saves_and_exports(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    short = snippet.replace("model.fit(pairs, epochs=5, steps_per_epoch=234)", "model.fit(pairs, epochs=1, steps_per_epoch=2)")
    assert short != snippet, "the README's fit call changed: update this test"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(short, "README.md", "exec"), namespace)
    assert set(namespace["model"].history.history) >= {"loss", "invariance", "variance", "covariance", "embedding_std"}
    assert (tmp_path / "models" / "fmnist" / "1" / "saved_model.pb").exists()
    backbone = keras.saving.load_model(tmp_path / "backbone.keras")
    assert backbone.output.shape == (None, 128)
