"""Sources (IDX, tfds, folders, arrays) and the batching that feeds VICReg."""
from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vicreg_tf import augment, data

FMNIST = Path(data.FASHION_MNIST_DIR)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "t10k-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)


def _header(path: Path) -> tuple[int, tuple[int, ...]]:
    with gzip.open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        dims = struct.unpack(f">{magic & 0xFF}I", f.read(4 * (magic & 0xFF)))
    return magic, dims


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True, magic: bytes | None = None) -> Path:
    header = (magic or bytes([0, 0, 0x08, array.ndim])) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _check_source(dataset, shape, labelled=True):
    image_spec, label_spec = dataset.element_spec
    assert tuple(image_spec.shape) == shape and image_spec.dtype == tf.float32
    assert label_spec.shape == () and label_spec.dtype.is_integer
    for image, label in dataset.take(4):
        assert 0.0 <= float(tf.reduce_min(image)) and float(tf.reduce_max(image)) <= 1.0
        assert (int(label) >= 0) == labelled


# -- IDX / Fashion-MNIST -----------------------------------------------------------------


@needs_fmnist
@pytest.mark.parametrize("split, count", [("train", 60_000), ("t10k", 10_000)])
def test_read_idx_matches_headers_of_installed_fashion_mnist(split, count):
    images_path = FMNIST / f"{split}-images-idx3-ubyte.gz"
    labels_path = FMNIST / f"{split}-labels-idx1-ubyte.gz"
    assert _header(images_path) == (0x0803, (count, 28, 28))
    assert _header(labels_path) == (0x0801, (count,))
    images, labels = data.read_idx(images_path), data.read_idx(labels_path)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and set(np.unique(labels)) == set(range(10))
    assert images.max() == 255


def test_read_idx_reads_raw_and_gzipped_alike(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = data.read_idx(_write_idx(tmp_path / "raw-idx3-ubyte", array, compress=False))
    gz = data.read_idx(_write_idx(tmp_path / "gz-idx3-ubyte", array))
    np.testing.assert_array_equal(raw, array)
    np.testing.assert_array_equal(gz, array)


def test_read_idx_bad_magic_raises(tmp_path):
    path = _write_idx(tmp_path / "bad", np.zeros((2, 2), np.uint8), magic=b"\x01\x02\x08\x02")
    with pytest.raises(ValueError, match="magic number 0x01020802"):
        data.read_idx(path)


def test_read_idx_payload_shorter_than_header_raises(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(7))
    with pytest.raises(ValueError, match=r"announces shape \(10,\).*payload has 7 bytes"):
        data.read_idx(path)


@needs_fmnist
def test_fashion_mnist_test_split():
    dataset = data.fashion_mnist("test")
    assert int(dataset.cardinality()) == 10_000
    _check_source(dataset, (28, 28, 1))
    labels = np.fromiter((int(label) for _, label in dataset.take(200)), int)
    np.testing.assert_array_equal(labels, data.read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:200])


@needs_fmnist
def test_fashion_mnist_split_slices():
    assert int(data.fashion_mnist("train[:10%]").cardinality()) == 6000
    assert int(data.fashion_mnist("test[:100]").cardinality()) == 100


def _tiny_fashion_dir(directory: Path, count: int = 6) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _write_idx(directory / "train-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
    _write_idx(directory / "train-labels-idx1-ubyte", np.arange(count) % 10)
    return directory


def test_fashion_mnist_reads_vicreg_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VICREG_DATA_DIR", str(_tiny_fashion_dir(tmp_path / "fm")))
    labels = [int(label) for _, label in data.fashion_mnist("train")]
    assert labels == [0, 1, 2, 3, 4, 5]


def test_fashion_mnist_missing_directory_names_paths_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        data.fashion_mnist("train", data_dir=missing)
    text = str(error.value)
    assert str(missing / "train-images-idx3-ubyte") in text
    assert "sudo apt-get install dataset-fashion-mnist" in text and "VICREG_DATA_DIR" in text


def test_fashion_mnist_unknown_split_raises():
    with pytest.raises(ValueError, match="'validation'"):
        data.fashion_mnist("validation")


# -- arrays ---------------------------------------------------------------------------------


def test_from_arrays_uint8_is_rescaled_and_unlabelled():
    images = np.full((3, 4, 4), 255, np.uint8)
    dataset = data.from_arrays(images)
    _check_source(dataset, (4, 4, 1), labelled=False)
    assert all(float(tf.reduce_min(image)) == 1.0 for image, _ in dataset)


def test_from_arrays_float_keeps_values_and_labels():
    images = np.linspace(0, 1, 2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    pairs = list(data.from_arrays(images, labels=[4, 7]))
    np.testing.assert_allclose(pairs[1][0].numpy(), images[1])
    assert [int(label) for _, label in pairs] == [4, 7]


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.full((2, 4, 4), 2.0), None, r"\[0, 1\], got values in \[2.0, 2.0\]"),
        (np.zeros((2, 4, 4), np.int64), None, "uint8 .* got dtype int64"),
        (np.zeros((2, 4, 4), np.uint8), [1, 2, 3], "2 integers"),
        (np.zeros((0, 4, 4), np.uint8), None, "non-empty"),
    ],
)
def test_from_arrays_bad_input_raises(images, labels, match):
    with pytest.raises(ValueError, match=match):
        data.from_arrays(images, labels)


# -- folders ----------------------------------------------------------------------------------


def _save(path: Path, fmt: str, size=(12, 10), color=(200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def _mixed_folder(root: Path) -> dict[str, Path]:
    """Class folders cats/ and dogs/ (nested deeper too), four formats, one truncated file, one fake image."""
    files = {
        "cats/a.jpg": _save(root / "cats" / "a.jpg", "JPEG"),
        "cats/deep/er/b.png": _save(root / "cats" / "deep" / "er" / "b.png", "PNG"),
        "dogs/c.BMP": _save(root / "dogs" / "c.BMP", "BMP"),
        "dogs/d.gif": _save(root / "dogs" / "d.gif", "GIF"),
        "dogs/e.jpeg": _save(root / "dogs" / "e.jpeg", "JPEG", size=(40, 30)),
    }
    truncated = _save(root / "dogs" / "truncated.png", "PNG", size=(32, 32))
    truncated.write_bytes(truncated.read_bytes()[:60])
    (root / "cats" / "fake.jpg").write_text("not an image")
    (root / "cats" / "notes.txt").write_text("ignored: no image extension")
    return files


def test_from_folder_class_subfolders_mixed_formats_bad_files_warned_once(tmp_path):
    _mixed_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.from_folder(tmp_path, (16, 16), channels=3, validate=True)
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(messages) == 1
    assert "skipped 2 unreadable of 7" in messages[0]
    assert "fake.jpg" in messages[0] and "truncated.png" in messages[0]
    _check_source(dataset, (16, 16, 3))
    labels = sorted(int(label) for _, label in dataset)  # iterating never raises
    assert labels == [0, 0, 1, 1, 1]  # cats -> 0, dogs -> 1; all five good files arrive


def test_from_folder_gray_channels_and_colors(tmp_path):
    _save(tmp_path / "x.png", "PNG", color=(255, 255, 255))
    _save(tmp_path / "y.bmp", "BMP", color=(0, 0, 0))
    dataset = data.from_folder(tmp_path, 8, channels=1)
    _check_source(dataset, (8, 8, 1), labelled=False)
    means = sorted(round(float(tf.reduce_mean(image)), 3) for image, _ in dataset)
    assert means == [0.0, 1.0]


def test_from_folder_images_at_root_are_unlabelled(tmp_path):
    _save(tmp_path / "root.jpg", "JPEG")
    _save(tmp_path / "cls" / "inside.jpg", "JPEG")
    dataset = data.from_folder(tmp_path, (8, 8))
    assert [int(label) for _, label in dataset] == [-1, -1]
    with pytest.raises(ValueError, match="root.jpg"):
        data.from_folder(tmp_path, (8, 8), labels="folders")


def test_from_folder_by_default_decodes_nothing_up_front_and_skips_bad_files_while_iterating(tmp_path):
    _mixed_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.from_folder(tmp_path, (8, 8))
    assert not [w for w in caught if "unreadable" in str(w.message)]  # no decoding pass ran
    assert len(list(dataset)) == 5


def test_from_folder_empty_raises(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files under"):
        data.from_folder(tmp_path, (8, 8))


def test_from_folder_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.from_folder(tmp_path / "missing", (8, 8))


def test_from_folder_all_unreadable_raises_when_validated(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="skipped 1 unreadable of 1"), pytest.raises(ValueError, match="none of the 1"):
        data.from_folder(tmp_path, (8, 8), validate=True)


@pytest.mark.parametrize("size", [0, -2, (8, 0), (8,), "8"])
def test_from_folder_bad_image_size_raises(tmp_path, size):
    escaped = repr(size).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=r"image_size must be .* got " + escaped):
        data.from_folder(tmp_path, size)


# -- tfds --------------------------------------------------------------------------------------


def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class VicregTinyImages(tfds.core.GeneratorBasedBuilder):
        """20 RGB images of 10x12, labels 0-2."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(shape=(10, 12, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(20), "test": self._generate_examples(6)}

        def _generate_examples(self, count):
            rng = np.random.default_rng(count)
            for k in range(count):
                yield k, {"image": rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "label": k % 3}

    return VicregTinyImages


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    builder_class = _tiny_tfds_builder()
    return builder_class.name, tmp_path_factory.mktemp("tfds")


def test_from_tfds_local_builder(tiny_tfds):
    name, data_dir = tiny_tfds
    train = data.from_tfds(name, "train", data_dir=data_dir, image_size=(8, 8))
    _check_source(train, (8, 8, 3))
    assert sorted(int(label) for _, label in train) == sorted(k % 3 for k in range(20))
    assert len(list(data.from_tfds(name, "train[:50%]", data_dir=data_dir, image_size=(8, 8)))) == 10
    gray = data.from_tfds(name, "test", data_dir=data_dir, channels=1)  # stored size kept
    _check_source(gray, (10, 12, 1))


def test_from_tfds_unknown_name_raises():
    with pytest.raises(ValueError, match="'no_such_dataset_xyz' is not a registered tfds dataset"):
        data.from_tfds("no_such_dataset_xyz", "train")


# -- view_pairs / eval_batches -------------------------------------------------------------------


def _toy_images(count=40, size=12):
    rng = np.random.default_rng(1)
    return data.from_arrays(rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), np.arange(count) % 4)


def _noise_views(images, seed):
    """A cheap stand-in for TwoViews (tracing the real one takes seconds): stateless noise from `seed`."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 2)
    noise = [tf.random.stateless_uniform(tf.shape(images), seeds[k], maxval=0.1) for k in range(2)]
    return images * 0.9 + noise[0], images * 0.9 + noise[1]


def _take(dataset, count):
    return [tuple(t.numpy() for t in pair) for pair in dataset.take(count)]


def test_view_pairs_shapes_and_remainder_dropped():
    pairs = data.view_pairs(_toy_images(40), augment.paper_views(8), 16, seed=0, repeat=False)
    batches = _take(pairs, 10)
    assert len(batches) == 2  # 40 images -> two full batches of 16
    for view_a, view_b in batches:
        assert view_a.shape == view_b.shape == (16, 8, 8, 3) and view_a.dtype == np.float32
        assert 0.0 <= view_a.min() and view_a.max() <= 1.0
        assert np.abs(view_a - view_b).mean() > 0.01  # the two views differ


def test_view_pairs_same_seed_same_stream_different_seed_differs():
    first = _take(data.view_pairs(_toy_images(), _noise_views, 8, seed=3), 6)
    again = _take(data.view_pairs(_toy_images(), _noise_views, 8, seed=3), 6)
    other = _take(data.view_pairs(_toy_images(), _noise_views, 8, seed=4), 6)
    for (a1, b1), (a2, b2) in zip(first, again):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(first[0][0], other[0][0])
    assert not np.array_equal(first[0][0], first[5][0])  # batches get different seeds


def test_view_pairs_without_seed_differs_between_runs():
    first = _take(data.view_pairs(_toy_images(), _noise_views, 8), 1)
    second = _take(data.view_pairs(_toy_images(), _noise_views, 8), 1)
    assert not np.array_equal(first[0][0], second[0][0])


def test_view_pairs_under_mirrored_strategy(two_cpu_strategy):
    pairs = data.view_pairs(_toy_images(), _noise_views, 8, seed=0)
    distributed = two_cpu_strategy.experimental_distribute_dataset(pairs)
    view_a, view_b = next(iter(distributed))
    local = two_cpu_strategy.experimental_local_results(view_a)
    assert len(local) == 2 and all(tuple(t.shape) == (4, 12, 12, 3) for t in local)


def test_view_pairs_bad_batch_size_raises():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        data.view_pairs(_toy_images(), _noise_views, 0)
    with pytest.raises(ValueError, match="shuffle_buffer must be an int >= 0, got -1"):
        data.view_pairs(_toy_images(), _noise_views, 8, shuffle_buffer=-1)
    with pytest.raises(ValueError, match="seed must be an int or None, got 1.5"):
        data.view_pairs(_toy_images(), _noise_views, 8, seed=1.5)


def test_view_pairs_shuffles_every_pass_and_batches_across_them():
    # Image k is filled with k: a pass is a permutation of 0..9, and batches of 8 run on into the next pass.
    images = data.from_arrays(np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8))
    pairs = data.view_pairs(images, lambda x, seed: (x, x), 8, seed=0)
    ids = np.concatenate([np.round(a[:, 0, 0, 0] * 255).astype(int) for a, _ in _take(pairs, 5)])
    passes = ids.reshape(4, 10)
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4  # a new order each pass


def test_eval_batches_keep_remainder_and_labels():
    batches = data.eval_batches(_toy_images(10), 4)
    sizes = [(int(images.shape[0]), labels.numpy().tolist()) for images, labels in batches]
    assert [n for n, _ in sizes] == [4, 4, 2]
    assert sum((labels for _, labels in sizes), []) == [k % 4 for k in range(10)]
