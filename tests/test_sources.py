"""Streaming sources and the per-worker view pipeline: crops from the original, rows, bad files."""
import importlib
import io
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_python
from PIL import Image

from vicreg_tf import augment, data


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image, like a photo (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((width, height), Image.BILINEAR))


def _photo_folder(root: Path, count: int, classes: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for k in range(count):
        w, h = int(rng.integers(320, 501)), int(rng.integers(240, 401))
        folder = root / f"class{k % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(w, h, seed=k)).save(folder / f"{k:05d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _photo_folder(tmp_path_factory.mktemp("photos"), 48)


# -- the crop ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, options", [("JPEG", {"quality": 95, "subsampling": 0}), ("PNG", {})],
                         ids=["jpeg", "png"])
def test_a_window_on_the_left_half_decodes_the_left_half(tmp_path, fmt, options):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(_photo(400, 300)).save(path, fmt, **options)
    contents = tf.io.read_file(str(path))
    crop = data.decode_crop(contents, lambda h, w: (0, 0, h, w // 2), (300, 200), 3)
    reference = tf.io.decode_image(contents, channels=3)[:, :200]
    np.testing.assert_array_equal(crop.numpy(), reference.numpy())


def test_a_jpeg_window_with_subsampled_chroma_differs_only_on_its_last_column(tmp_path):
    # libjpeg upsamples 4:2:0 chroma with the window's own edge: the last column may differ a little.
    path = tmp_path / "x.jpg"
    Image.fromarray(_photo(400, 300)).save(path, "JPEG", quality=95)
    contents = tf.io.read_file(str(path))
    crop = data.decode_crop(contents, lambda h, w: (0, 0, h, w // 2), (300, 200), 3).numpy().astype(int)
    reference = tf.io.decode_image(contents, channels=3)[:, :200].numpy().astype(int)
    np.testing.assert_array_equal(crop[:, :-1], reference[:, :-1])
    assert np.abs(crop[:, -1] - reference[:, -1]).max() <= 16


def _torchvision_crops(height, width, count, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, ported line by line to NumPy: (h, w) per draw."""
    out = []
    for _ in range(count):
        for _ in range(10):
            target = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                out.append((h, w))
                break
        else:
            in_ratio = width / height
            w, h = (width, int(round(width / min(ratio)))) if in_ratio < min(ratio) else (
                (int(round(height * max(ratio))), height) if in_ratio > max(ratio) else (width, height))
            out.append((h, w))
    return np.array(out, float)


def test_crop_area_and_aspect_follow_the_paper_over_10000_draws():
    crop = augment.RandomResizedCrop(224)
    params = crop.get_random_transformation((10_000, None, None, 3), tf.constant([3, 4]))
    top, left, h, w = (v.numpy() for v in crop.window(params, tf.fill([10_000], 300.0), tf.fill([10_000], 400.0)))
    area, aspect = h * w / (300 * 400), w / h
    # Rounding the sides to pixels moves the edges of the ranges by a pixel's worth.
    assert area.min() >= 0.08 * 0.95 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
    assert 0.0 <= top.min() and (top + h).max() <= 300 and 0.0 <= left.min() and (left + w).max() <= 400
    # The same distribution as torchvision's sampler (large crops of a 4:3 image often do not
    # fit and are redrawn, so the mean area is below the middle of [0.08, 1]).
    reference = _torchvision_crops(300, 400, 10_000, np.random.default_rng(0))
    ref_area, ref_aspect = reference[:, 0] * reference[:, 1] / (300 * 400), reference[:, 1] / reference[:, 0]
    assert abs(area.mean() - ref_area.mean()) < 0.015  # 3 standard errors of the mean
    assert abs(np.log(aspect).mean() - np.log(ref_aspect).mean()) < 0.01
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.03


def test_one_pixel_and_tiny_images_fall_back_to_a_center_crop(tmp_path):
    Image.new("RGB", (1, 1), (10, 200, 30)).save(tmp_path / "dot.png")
    Image.new("RGB", (3, 2), (90, 90, 90)).save(tmp_path / "tiny.png")
    source = data.FolderSource(tmp_path)
    views = augment.paper_views(16)
    batches = data.view_pair_batches(source, views, 2, steps_per_epoch=3, epochs=1, seed=0)
    for view_a, view_b in batches:
        assert view_a.shape == (2, 16, 16, 3) and np.isfinite(view_a.numpy()).all()
    assert not data.unreadable_images.take()


def test_eval_images_are_resized_then_center_cropped_not_squashed(tmp_path):
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # a white middle half: a center crop of the resized image is all white
    Image.fromarray(image).save(tmp_path / "wide.png")
    (out, _), = data.FolderSource(tmp_path).images(32).as_numpy_iterator()
    assert out.shape == (32, 32, 3)
    assert out[:, 4:28].min() > 0.99  # squashing 200 -> 32 would keep black bands at both sides
    same = data.ArraySource(np.full((2, 28, 28, 1), 51, np.uint8))
    np.testing.assert_allclose(next(iter(same.images(28)))[0].numpy(), 0.2, atol=1e-6)


def _ramp(side: int) -> np.ndarray:
    """A side x side uint8 image whose column j holds its centre's position (j + 0.5) / side."""
    row = np.round((np.arange(side) + 0.5) / side * 255).astype(np.uint8)
    return np.tile(row[None, :, None], (side, 1, 1))


@pytest.mark.parametrize("crop_fraction", [0.875, 1.0])
def test_eval_geometry_is_the_same_for_a_28x28_and_a_30x30_image(crop_fraction):
    # Until issue 23 an image of exactly the output size skipped the resize and the crop: a 28x28
    # image was evaluated whole while a 30x30 one lost its border. Now both keep the central
    # crop_fraction of their shorter side, so output column k shows position 0.5 + ((k + 0.5) / 28 - 0.5) * f.
    expected = 0.5 + ((np.arange(28) + 0.5) / 28 - 0.5) * crop_fraction
    outs = [data.eval_transform(tf.constant(_ramp(side)), (28, 28), crop_fraction).numpy() for side in (28, 30)]
    for out in outs:
        assert out.shape == (28, 28, 1) and out.dtype == np.float32
        np.testing.assert_allclose(out[14, 2:-2, 0], expected[2:-2], atol=1 / 255)  # the borders: the filter's edge
    np.testing.assert_allclose(outs[0][:, 2:-2], outs[1][:, 2:-2], atol=2 / 255)


def test_eval_crop_fraction_one_keeps_fashion_mnist_pixel_for_pixel():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    source = data.ArraySource(images)
    got = np.stack([image for image, _ in source.images(28, crop_fraction=1.0).as_numpy_iterator()])
    np.testing.assert_array_equal(got, images.astype(np.float32) / 255.0)
    assert not np.array_equal(np.stack([i for i, _ in source.images(28).as_numpy_iterator()]), got)  # 0.875 crops
    with pytest.raises(ValueError, match=r"crop_fraction must be a number in \(0, 1\], got 1.5"):
        source.images(28, crop_fraction=1.5)


# -- rows and workers ----------------------------------------------------------------


def _views_of(source, start, count, *, batch=16, start_epoch=0, epochs=2, device=False, views=None):
    views = views or augment.paper_views(48)
    return list(data.view_pair_batches(
        source, views, batch, steps_per_epoch=2, start_epoch=start_epoch, epochs=epochs, seed=5,
        row_start=start, row_count=count, device_views=device,
    ))


@pytest.mark.parametrize("start_epoch", [0, 1])
def test_two_workers_rows_equal_the_single_process_batch_bitwise(photos, start_epoch):
    source = data.FolderSource(photos)
    whole = _views_of(source, 0, 16, start_epoch=start_epoch)
    first, second = _views_of(source, 0, 8, start_epoch=start_epoch), _views_of(source, 8, 8, start_epoch=start_epoch)
    assert len(whole) == len(first) == 2 * (2 - start_epoch)
    for (a, b), (a0, b0), (a1, b1) in zip(whole, first, second):
        assert a0.shape == (8, 48, 48, 3)
        np.testing.assert_array_equal(a.numpy(), np.concatenate([a0, a1]))
        np.testing.assert_array_equal(b.numpy(), np.concatenate([b0, b1]))


def test_a_resumed_epoch_equals_the_same_epoch_of_a_full_run(photos):
    source = data.FolderSource(photos)
    full, resumed = _views_of(source, 0, 16), _views_of(source, 0, 16, start_epoch=1)
    for (a, b), (ra, rb) in zip(full[2:], resumed):
        np.testing.assert_array_equal(a.numpy(), ra.numpy())
        np.testing.assert_array_equal(b.numpy(), rb.numpy())


class _CountingFolder(data.FolderSource):
    """Counts the files its pipeline reads (each read is one decode of two views)."""

    reads = 0

    def read(self, item):
        def count(name):
            type(self).reads += 1
            return np.int32(0)

        with tf.control_dependencies([tf.py_function(count, [item], tf.int32)]):
            return tf.io.read_file(item)


def test_each_worker_reads_and_decodes_only_its_rows(photos):
    source = _CountingFolder(photos)
    _CountingFolder.reads = 0
    _views_of(source, 4, 4, epochs=1)
    assert _CountingFolder.reads == 2 * 4  # two steps of its four rows, not two of sixteen


def test_views_made_on_the_device_equal_the_cpu_views(photos):
    source = data.FolderSource(photos)
    views = augment.paper_views(48)
    cpu = _views_of(source, 0, 16, views=views, epochs=1)
    crops = _views_of(source, 0, 16, views=views, epochs=1, device=True)
    for (a, b), batch in zip(cpu, crops):
        assert batch["crops_a"].dtype == tf.uint8
        device_a, device_b = data.views_from_crops(views, batch)
        np.testing.assert_allclose(device_a.numpy(), a.numpy(), atol=1e-5)
        np.testing.assert_allclose(device_b.numpy(), b.numpy(), atol=1e-5)


def test_vicreg_trains_on_device_views_as_on_cpu_views(photos):
    import keras

    import vicreg_tf
    from vicreg_tf.backbones import small_cnn

    source = data.FolderSource(photos)
    views = augment.paper_views(32)

    def run(device):
        keras.utils.set_random_seed(0)
        model = vicreg_tf.VICReg(small_cnn((32, 32, 3), widths=(4, 8)), projector="16-16",
                                 device_views=views if device else None)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        batches = data.view_pair_batches(source, views, 8, steps_per_epoch=2, epochs=1, seed=1, device_views=device)
        history = model.fit(batches, epochs=1, steps_per_epoch=2, verbose=0).history
        return history["loss"][0], [w.numpy() for w in model.trainable_weights]

    (loss_cpu, w_cpu), (loss_dev, w_dev) = run(False), run(True)
    assert loss_cpu == pytest.approx(loss_dev, rel=1e-5)
    for a, b in zip(w_cpu, w_dev):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_arrays_rows_equal_the_whole_batch_and_stay_uint8_in_memory():
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    source = data.ArraySource(images, np.arange(40) % 4)
    views = augment.grayscale_views(28)
    whole = _views_of(source, 0, 16, views=views)
    halves = _views_of(source, 0, 8, views=views), _views_of(source, 8, 8, views=views)
    for (a, _), (a0, _), (a1, _) in zip(whole, *halves):
        np.testing.assert_array_equal(a.numpy(), np.concatenate([a0, a1]))
    assert source.items()[0].dtype == tf.uint8


# -- bad input -----------------------------------------------------------------------


def test_an_image_that_fails_mid_epoch_is_replaced_and_counted(tmp_path):
    _photo_folder(tmp_path, 6, classes=1)
    bad = tmp_path / "class0" / "00002.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: the header reads, the scan does not
    (tmp_path / "class0" / "fake.png").write_text("not an image")
    source = data.FolderSource(tmp_path)
    assert source.count == 7  # listed, never decoded up front
    data.unreadable_images.take()
    batches = list(data.view_pair_batches(source, augment.paper_views(32), 7, steps_per_epoch=1, epochs=1))
    assert batches[0][0].shape == (7, 32, 32, 3)
    names = sorted(Path(n).name for n in data.unreadable_images.take())
    assert names == ["00002.jpg", "fake.png"]


def test_unreadable_images_report_prints_one_line_per_epoch(capsys):
    data.unreadable_images.take()
    data.unreadable_images.record("a.jpg")
    data.unreadable_images.record("b.jpg")
    data.UnreadableImagesReport().on_epoch_end(0)
    data.UnreadableImagesReport().on_epoch_end(1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["warning: epoch 1: 2 image(s) could not be decoded and were replaced by gray images: a.jpg, b.jpg"]


def test_folder_with_no_images_and_missing_folder_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files under"):
        data.FolderSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.FolderSource(tmp_path / "missing")


def test_the_start_up_check_decodes_a_bounded_random_sample_of_the_folder(tmp_path, monkeypatch):
    from vicreg_tf.data import folders

    for k in range(150):
        if k % 3:
            (tmp_path / f"{k:03d}.png").write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(tmp_path / f"{k:03d}.png")
    source = data.FolderSource(tmp_path)
    opened = []
    readable = folders._readable
    monkeypatch.setattr(folders, "_readable", lambda names, channels: opened.extend(names) or readable(names, channels))
    bad, checked = source.sample_unreadable(64, seed=0)
    assert checked == 64 and len(opened) == 64 and len(set(opened)) == 64  # not the whole folder
    assert 0.5 < bad / checked < 0.85  # about two thirds do not decode
    assert source.sample_unreadable(64, seed=0) == (bad, checked)  # the same sample for the same seed
    assert data.FolderSource(tmp_path).limited(10).sample_unreadable(64)[1] == 10  # a small folder: every file


def test_folder_eval_split_is_held_out_stably_by_name(photos):
    train, held = data.FolderSource(photos, split="train"), data.FolderSource(photos, split="eval", eval_fraction=0.25)
    train25 = data.FolderSource(photos, split="train", eval_fraction=0.25)
    assert not set(train25.names) & set(held.names)
    assert len(train25.names) + len(held.names) == 48 and 4 <= len(held.names) <= 20
    assert data.FolderSource(photos, split="eval", eval_fraction=0.25).names == held.names
    assert train.count > train25.count


def _write_records(path: Path, images, image_key="image/encoded", label_key="image/class/label"):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for k, image in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "JPEG")
            feature = {image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()]))}
            if label_key:
                feature[label_key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[k % 2]))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def test_tfrecords_stream_encoded_and_give_the_folder_element_spec(tmp_path, photos):
    images = [_photo(120, 90, seed=k) for k in range(10)]
    _write_records(tmp_path / "a.tfrecord", images[:6])
    _write_records(tmp_path / "b.tfrecord", images[6:])
    source = data.RecordSource.from_tfrecords(str(tmp_path / "*.tfrecord"))
    assert source.count == 10 and source.labelled
    assert source.encoded().element_spec == data.FolderSource(photos).encoded().element_spec
    batches = list(data.view_pair_batches(source, augment.paper_views(32), 4, steps_per_epoch=2, epochs=1))
    assert len(batches) == 2 and batches[0][0].shape == (4, 32, 32, 3)
    halves = [list(data.view_pair_batches(source, augment.paper_views(32), 4, steps_per_epoch=2, epochs=1,
                                              row_start=s, row_count=2)) for s in (0, 2)]
    assert [a.shape[0] for half in halves for a, _ in half] == [2, 2, 2, 2]  # each worker: its own files


# -- record sources on W workers (issue 22) ----------------------------------------------------


def _labelled_records(folder: Path, files: int, per_file: int) -> str:
    """`files` TFRecord files of `per_file` 8x8 PNGs each, label = the record's index in the stored order."""
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for f in range(files):
        with tf.io.TFRecordWriter(str(folder / f"train-{f:02d}.tfrecord")) as writer:
            for _ in range(per_file):
                buffer = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), k % 256, np.uint8)).save(buffer, "PNG")
                feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()])),
                           "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[k]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
                k += 1
    return str(folder / "train-*.tfrecord")



def _labels_of_epochs(source, batch, rows, epochs, steps, seed=0, shuffle_buffer=16, start_epoch=0):
    batches = data.order(source, batch, epochs=epochs, steps_per_epoch=steps, seed=seed, shuffle_buffer=shuffle_buffer,
                         rows=rows, start_epoch=start_epoch)
    def index(item):  # the record's index in the stored order, from its pixels
        return int(tf.io.decode_png(item)[0, 0, 0])

    return [(int(e), int(t), [index(item) for item in items]) for e, t, items in batches]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_each_of_w_workers_reads_about_a_w_th_of_the_tfrecords_per_epoch(tmp_path, counted_reads, workers):
    source = data.RecordSource.from_tfrecords(_labelled_records(tmp_path, 8, 20), cache_mb=0)  # 160 records
    share = 16 // workers
    per_worker = []
    for worker in range(workers):
        counted_reads.clear()
        _labels_of_epochs(source, 16, (worker * share, (worker + 1) * share), epochs=1, steps=10)
        per_worker.append(len(counted_reads))
    # Until issue 22 every worker read all 160 records and kept its rows.
    assert all(160 / workers <= n <= 160 / workers * 1.15 for n in per_worker), per_worker


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_each_of_w_workers_reads_about_a_w_th_of_a_tfds_split_per_epoch(tmp_path, counted_reads, workers):
    import tensorflow_datasets as tfds

    builder_class = _tiny_builder(tmp_path)
    builder_class(data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    source = data.RecordSource.from_tfds(builder_class.name, "train", data_dir=tmp_path, cache_mb=0)
    assert len(source.files) == 4 and source.count == 12
    per_worker = []
    for worker in range(workers):
        counted_reads.clear()
        _labels_of_epochs(source, 4, (worker * 4 // workers, (worker + 1) * 4 // workers), epochs=1, steps=3)
        per_worker.append(len(counted_reads))
    assert all(12 / workers <= n <= 12 / workers + 3 for n in per_worker), per_worker


def test_fewer_record_files_than_workers_is_one_line_naming_the_pattern(tmp_path):
    pattern = _labelled_records(tmp_path, 3, 4)
    source = data.RecordSource.from_tfrecords(pattern)
    with pytest.raises(ValueError, match=r"^\S*train-\*\.tfrecord: 3 record file\(s\) for 4 workers; [^\n]*$"):
        source.check_workers(4)
    with pytest.raises(ValueError, match="3 record file"):
        data.order(source, 8, epochs=1, steps_per_epoch=1, rows=(0, 2))
    source.check_workers(3)


def test_empty_record_files_are_one_line_naming_the_pattern(tmp_path):
    (tmp_path / "empty-0.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty-\*\.tfrecord'?: the 1 file\(s\) it matches hold no records$"):
        data.RecordSource.from_tfrecords(str(tmp_path / "empty-*.tfrecord"))


def test_record_order_file_order_and_window_boundaries_change_each_epoch(tmp_path):
    source = data.RecordSource.from_tfrecords(_labelled_records(tmp_path, 8, 8), cache_mb=0)  # 64 records
    epochs = _labels_of_epochs(source, 8, (0, 8), epochs=3, steps=8, shuffle_buffer=16)
    orders = [[label for e, _, items in epochs if e == epoch for label in items] for epoch in range(3)]
    assert all(sorted(o) == list(range(64)) for o in orders)  # every record once per epoch
    assert orders[0] != orders[1] != orders[2]
    # The file order: the interleave takes one record of each file in turn, in the epoch's file order.
    read = source.epoch_records(0, 1)
    file_orders = [[int(label) // 8
                    for _, label in read(tf.stack([data.mix_seeds(0, e), tf.constant(-1, tf.int64)])).take(8)]
                   for e in range(3)]
    assert all(sorted(f) == list(range(8)) for f in file_orders) and len(set(map(tuple, file_orders))) == 3
    # Window boundaries: the 16 records of the first window differ as a set (a fixed boundary would not move them).
    assert len({frozenset(o[:16]) for o in orders}) == 3
    # A pure function of (seed, epoch): a run resumed at epoch 2 gets epoch 2.
    resumed = _labels_of_epochs(source, 8, (0, 8), epochs=3, steps=8, shuffle_buffer=16, start_epoch=2)
    assert [label for _, _, items in resumed for label in items] == orders[2]


def test_a_cached_record_source_reads_its_records_once_over_three_epochs(tmp_path, counted_reads):
    source = data.RecordSource.from_tfrecords(_labelled_records(tmp_path, 2, 5))  # 10 records, well under cache_mb
    assert source.cache
    counted_reads.clear()  # the counting pass (no index beside these files)
    batches = list(data.view_pair_batches(source, augment.paper_views(8), 2, steps_per_epoch=5, epochs=3))
    assert len(batches) == 15
    assert len(counted_reads) == 10  # until issue 22: 30 (the cache was rebuilt every epoch)


def test_tfrecords_without_an_image_feature_name_the_features(tmp_path):
    _write_records(tmp_path / "x.tfrecord", [_photo(20, 20)], image_key="pixels")
    with pytest.raises(ValueError, match=r"no encoded-image feature .*features \['image/class/label', 'pixels'\]"):
        data.RecordSource.from_tfrecords(str(tmp_path / "*.tfrecord"))
    with pytest.raises(ValueError, match="no TFRecord files match"):
        data.RecordSource.from_tfrecords(str(tmp_path / "none-*.tfrecord"))


_TINY_BUILDER = {}


def _tiny_builder(tmp_path):
    if not _TINY_BUILDER:  # tfds registers a builder's name once per process
        _TINY_BUILDER["class"] = _make_tiny_builder()
    return _TINY_BUILDER["class"]


def _make_tiny_builder():
    import tensorflow_datasets as tfds

    class VicregStreamImages(tfds.core.GeneratorBasedBuilder):
        """12 JPEG images of 40x30, labels 0-1."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12)}

        def _generate_examples(self, count):
            for k in range(count):
                yield k, {"image": _photo(40, 30, seed=k), "label": k % 2}

    return VicregStreamImages


def test_tfds_source_skips_decoding_and_names_the_prepare_command(tmp_path):
    builder_class = _tiny_builder(tmp_path)
    with pytest.raises(ValueError, match=rf"not prepared in .*tfds build {builder_class.name}"):
        data.RecordSource.from_tfds(builder_class.name, "train", data_dir=tmp_path)
    builder_class(data_dir=str(tmp_path)).download_and_prepare()
    source = data.RecordSource.from_tfds(builder_class.name, "train", data_dir=tmp_path)
    assert source.count == 12  # from the metadata, nothing read
    item, label = next(iter(source.encoded()))
    assert item.dtype == tf.string and bytes(item.numpy()[:3]) == b"\xff\xd8\xff"  # still JPEG bytes
    batches = list(data.view_pair_batches(source, augment.paper_views(24), 4, steps_per_epoch=3, epochs=1))
    assert [a.shape[0] for a, _ in batches] == [4, 4, 4]


# -- memory and first batch ------------------------------------------------------------


_PEAK = textwrap.dedent("""
    import json, resource, sys, time
    import vicreg_tf
    from vicreg_tf import augment, data
    source = data.FolderSource(sys.argv[1])
    start = time.perf_counter()
    batches = data.view_pair_batches(source, augment.paper_views(224), 16, steps_per_epoch=source.count // 16,
                                      epochs=1, seed=0)
    first = None
    for k, _ in enumerate(batches):
        first = first or time.perf_counter() - start
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "first_s": first}))
""")


@pytest.mark.large
def test_peak_memory_does_not_grow_with_the_folder(tmp_path):
    small, large = _photo_folder(tmp_path / "small", 48), _photo_folder(tmp_path / "large", 192)
    runs = []
    for folder in (small, large):
        result = run_python(["-c", _PEAK, str(folder)], timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    # Before streaming, every decoded photo stayed in memory (2.2 MB each at 224x224): +317 MB here.
    assert runs[1]["peak_mb"] - runs[0]["peak_mb"] < 100, runs
    assert runs[1]["first_s"] < 10, runs


def test_a_run_resumed_mid_epoch_gets_the_rest_of_that_epoch(photos):
    source = data.FolderSource(photos)
    views = augment.paper_views(32)
    full = list(data.view_pair_batches(source, views, 8, steps_per_epoch=3, epochs=2, seed=2))
    resumed = list(data.view_pair_batches(source, views, 8, steps_per_epoch=3, start_epoch=0, start_step=2,
                                              epochs=2, seed=2))
    assert len(resumed) == 4
    for (a, b), (ra, rb) in zip(full[2:], resumed):
        np.testing.assert_array_equal(a.numpy(), ra.numpy())
        np.testing.assert_array_equal(b.numpy(), rb.numpy())


def test_vicreg_train_refuses_fewer_record_files_than_workers_before_claiming_the_workdir(tmp_path, monkeypatch):
    import types

    from trainers import build, pretrain

    pattern = _labelled_records(tmp_path, 3, 4)
    config = importlib.import_module("configs.tiny").get_config()
    config.data.source, config.data.path, config.data.limit = "tfrecords", pattern, 0
    config.data.eval_path = pattern
    four_workers = types.SimpleNamespace(extended=types.SimpleNamespace(_num_workers=4), num_replicas_in_sync=4)
    monkeypatch.setattr(build, "make_strategy", lambda: four_workers)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="3 record file\\(s\\) for 4 workers"):
        pretrain.train(config, workdir)
    assert not workdir.exists()
