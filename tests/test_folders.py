"""Folders at scale: the listing (order, symlinks, no stat per file, memory per name) and evaluation samples."""
import io
import os
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vicreg_tf import data
from vicreg_tf.data import folders


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def _tree(root: Path, relative_names) -> Path:
    blob = _jpeg()
    for name in relative_names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return root


def test_the_listing_is_pathlib_s_order_with_extensions_in_any_case_and_other_files_left_out(tmp_path):
    names = ["a/x.jpg", "a-b/x.jpg", "a/b/c.png", "a.b/y.JPG", "Z/q.jpeg", "a/b-c/d.gif", "a/bc.bmp", "a/b/z.txt",
             "a/notes.jpg.txt"]
    _tree(tmp_path, names)
    expected = [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))
                if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".gif") and p.is_file()]
    assert folders._list_images(str(tmp_path)) == expected
    assert "a-b/x.jpg" in expected and expected.index("a/x.jpg") < expected.index("a-b/x.jpg")  # part by part
    source = data.FolderSource(tmp_path)
    assert source.names == [os.path.join(str(tmp_path), name) for name in expected]
    assert source.classes == ["Z", "a", "a-b", "a.b"] and source.labels.tolist() == [0, 1, 1, 1, 1, 2, 3]


def test_a_linked_folder_is_followed_once_and_a_link_loop_ends(tmp_path):
    _tree(tmp_path / "real", ["cat/1.jpg", "cat/2.jpg"])
    (tmp_path / "real" / "dog").symlink_to(tmp_path / "real" / "cat", target_is_directory=True)
    (tmp_path / "real" / "cat" / "loop").symlink_to(tmp_path / "real", target_is_directory=True)
    listed = folders._list_images(str(tmp_path / "real"))
    assert {"cat/1.jpg", "cat/2.jpg", "dog/1.jpg", "dog/2.jpg"} <= set(listed)
    assert len(listed) == len(set(listed)) < 20  # the loop is entered at most once


def test_listing_reads_directories_not_one_stat_per_file(tmp_path, monkeypatch):
    _tree(tmp_path, [f"c{k % 4}/{k:04d}.jpg" for k in range(400)])
    calls = []
    real_stat = os.stat

    def counting_stat(*args, **kwargs):
        calls.append(args[0])
        return real_stat(*args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    source = data.FolderSource(tmp_path, split="train")
    assert source.count > 300
    assert len(calls) < 20, f"{len(calls)} stat calls for 400 files"  # pathlib's is_file() made one per file


def test_listing_holds_a_name_per_file_and_peaks_below_pathlib_s_cost(tmp_path):
    count = 6000
    _tree(tmp_path, [f"class_{k % 10:02d}/img_{k:07d}.jpg" for k in range(count)])
    data.FolderSource(tmp_path, split="train")  # the allocator's free lists filled once
    tracemalloc.start()
    try:
        source = data.FolderSource(tmp_path, split="train")
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    name_bytes = sys.getsizeof(source.names[0]) + 8  # the string and its list slot
    assert held / source.count < name_bytes + 48, f"{held / source.count:.0f} bytes held per name ({name_bytes})"
    # Path objects per file (the listing until issue 22) peaked at ~660 bytes per file here; strings ~270.
    assert peak / count < 400, f"the listing peaked at {peak / count:.0f} bytes per file"


def test_a_sample_draws_from_every_part_of_a_class_sorted_folder_and_keeps_stored_order(tmp_path):
    _tree(tmp_path, [f"class{c}/{k:03d}.jpg" for c in range(10) for k in range(20)])
    source = data.FolderSource(tmp_path)
    first, drawn = source.limited(20), source.sample(20, seed=3)
    assert len(set(first.labels.tolist())) == 1  # what the kNN monitor took before: one class
    assert len(set(drawn.labels.tolist())) >= 6 and drawn.count == 20
    assert drawn.names == sorted(drawn.names, key=source.names.index)  # stored order
    assert drawn.names == source.sample(20, seed=3).names != source.sample(20, seed=4).names
    assert [source.labels[source.names.index(n)] for n in drawn.names] == drawn.labels.tolist()
    assert source.sample(0) is source and source.sample(500) is source  # 0: all; more than there are: all


def test_an_array_source_samples_too():
    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1).repeat(4, 1).repeat(4, 2)
    source = data.ArraySource(images, np.arange(50) // 10)
    drawn = source.sample(10, seed=0)
    assert drawn.count == 10 and len(set(drawn.labels.tolist())) >= 3
    assert np.array_equal(drawn.array[:, 0, 0, 0] // 10, drawn.labels)  # images and labels stay paired
    assert np.all(np.diff(drawn.array[:, 0, 0, 0].astype(int)) > 0)


@pytest.mark.parametrize("bad", [-1, True])
def test_knn_max_eval_must_be_a_count(bad):
    from vicreg_tf.configs import image_folder
    from vicreg_tf.trainers import checks

    config = image_folder.get_config()
    config.data.path = "/somewhere"
    config.eval.knn_max_eval = bad
    with pytest.raises(ValueError, match=r"config.eval.knn_max_eval must be an int >= 0 \(0: the whole evaluation"):
        checks.validate_config(config)


# -- the end-of-run summary ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_the_spectrum_matches_lapack_s_svd_for_tall_and_wide_embeddings(shape):
    from vicreg_tf import evaluation

    rng = np.random.default_rng(0)
    z = rng.standard_normal(shape) @ np.diag(np.logspace(0, -5, shape[1])) + 3.0
    expected = np.linalg.svd(z - z.mean(axis=0), compute_uv=False)
    got = evaluation.singular_values(z)
    assert got.shape == expected.shape == (min(shape),)
    np.testing.assert_allclose(got[expected > 1e-6 * expected[0]], expected[expected > 1e-6 * expected[0]],
                               rtol=1e-9)
    assert np.all(np.diff(got) <= 0)
