"""vicreg-tfrecords (folder -> shuffled TFRecord files + index) and record sources read from segments (issue 22)."""
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_python
from PIL import Image

from vicreg_tf import data
from vicreg_tf.data import convert
from vicreg_tf.data import records as records_module

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """30 tiny JPEGs, 10 per class sub-folder, every file's bytes different."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k in range(30):
        folder = root / CLASSES[k % 3]
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(folder / f"{k:03d}.jpg")
    return root


def _stored(pattern: str) -> list[tuple[str, bytes, int]]:
    """(filename, encoded bytes, label) of every record, files in name order, records in stored order."""
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/filename": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64)}
    rows = []
    for record in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))):
        parsed = tf.io.parse_single_example(record, spec)
        rows.append((parsed["image/filename"].numpy().decode(), parsed["image/encoded"].numpy(),
                     int(parsed["image/class/label"])))
    return rows


def _folder_rows(source: data.FolderSource) -> list[tuple[str, bytes, int]]:
    return [(Path(n).relative_to(source.root).as_posix(), Path(n).read_bytes(), int(label))
            for n, label in zip(source.names, source.labels)]



# -- the converter -----------------------------------------------------------------------------


def test_a_converted_folder_reads_back_the_folders_bytes_and_labels(photos, tmp_path):
    index = convert.folder_to_tfrecords(photos, tmp_path / "set", shards=4, eval_fraction=0)
    assert sorted(os.listdir(tmp_path / "set")) == ["index.json"] + [f"train-{k:05d}-of-00004.tfrecord"
                                                                     for k in range(4)]
    folder = data.FolderSource(photos)
    assert index["classes"] == folder.classes == list(CLASSES)
    source = data.RecordSource.from_tfrecords(str(tmp_path / "set" / "train-*.tfrecord"))
    read = [(bytes(item.numpy()), int(label)) for item, label in source.records()]
    assert Counter(read) == Counter((encoded, label) for _, encoded, label in _folder_rows(folder))
    assert source.count == 30 and source.labelled and source.classes == list(CLASSES)


def test_records_are_shuffled_across_files_in_an_order_the_seed_fixes(photos, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        convert.folder_to_tfrecords(photos, tmp_path / name, shards=3, eval_fraction=0, seed=seed)
    a, b, c = (_stored(str(tmp_path / name / "train-*.tfrecord")) for name in "abc")
    assert a == b  # the same seed: the same files
    assert [r[0] for r in a] != [r[0] for r in c]  # another seed: another order
    folder_order = [r[0] for r in _folder_rows(data.FolderSource(photos))]
    assert [r[0] for r in a] != folder_order
    # Not class-sorted: every file (10 records) holds all three classes.
    assert all({label for _, _, label in a[k:k + 10]} == {0, 1, 2} for k in (0, 10, 20))


def test_the_eval_split_holds_the_files_the_folder_holds_out(photos, tmp_path):
    index = convert.folder_to_tfrecords(photos, tmp_path / "set", shards=2, eval_fraction=0.3)
    held = data.FolderSource(photos, split="eval", eval_fraction=0.3)
    train = data.FolderSource(photos, split="train", eval_fraction=0.3)
    assert Counter(_stored(str(tmp_path / "set" / "eval-*.tfrecord"))) == Counter(_folder_rows(held))
    assert Counter(_stored(str(tmp_path / "set" / "train-*.tfrecord"))) == Counter(_folder_rows(train))
    assert index["splits"]["eval"]["records"] == held.count > 0 and index["splits"]["train"]["records"] == train.count


def test_a_conversion_that_fails_midway_leaves_no_set_and_keeps_the_old_one(photos, tmp_path, monkeypatch):
    output = tmp_path / "set"
    written, before = [], {}
    original = convert._example

    def contents():
        return {p.name: p.read_bytes() for p in output.iterdir()} if output.exists() else {}

    def failing(*args):
        if len(written) == 12:
            assert contents() == before  # the set is being written elsewhere: a kill here leaves the old state
            raise OSError("disk full")
        written.append(1)
        return original(*args)

    monkeypatch.setattr(convert, "_example", failing)
    with pytest.raises(OSError, match="disk full"):
        convert.folder_to_tfrecords(photos, output, shards=4, eval_fraction=0)
    assert not output.exists() and os.listdir(tmp_path) == []  # no staging directory left either
    with pytest.raises(ValueError, match="no TFRecord files match"):
        data.RecordSource.from_tfrecords(str(output / "train-*.tfrecord"))

    monkeypatch.setattr(convert, "_example", original)
    convert.folder_to_tfrecords(photos, output, shards=4, eval_fraction=0)
    before.update(contents())
    assert len(before) == 5
    monkeypatch.setattr(convert, "_example", failing)
    written.clear()
    with pytest.raises(OSError, match="disk full"):
        convert.folder_to_tfrecords(photos, output, shards=2, eval_fraction=0, overwrite=True)
    assert contents() == before and os.listdir(tmp_path) == ["set"]


def test_an_output_holding_a_set_or_other_files_is_refused_in_one_line(photos, tmp_path):
    convert.folder_to_tfrecords(photos, tmp_path / "set", shards=2, eval_fraction=0)
    with pytest.raises(ValueError, match=r"^--output=\S*set already holds a TFRecord set; pass --overwrite [^\n]*$"):
        convert.folder_to_tfrecords(photos, tmp_path / "set", shards=3, eval_fraction=0)
    convert.folder_to_tfrecords(photos, tmp_path / "set", shards=3, eval_fraction=0, overwrite=True)
    assert len(list((tmp_path / "set").glob("train-*-of-00003.tfrecord"))) == 3
    assert not list((tmp_path / "set").glob("*-of-00002.tfrecord"))  # the old set went whole
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a directory that is not empty"):
        convert.folder_to_tfrecords(photos, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, message", [
    ({"shards": 0}, r"--shards must be a positive int, got 0"),
    ({"shards": 31}, r"--shards=31 is more than the 30 images of the training split"),
    ({"shards": 2, "shard_mb": 1}, r"give --shards or --shard_mb, not both"),
    ({"eval_fraction": 1.0}, r"--eval_fraction must be a number in \[0, 1\), got 1.0"),
])
def test_bad_conversion_arguments_are_one_line(photos, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=rf"^{message}[^\n]*$"):
        convert.folder_to_tfrecords(photos, tmp_path / "set", **{"eval_fraction": 0, **kwargs})
    assert not (tmp_path / "set").exists()


def test_a_folder_without_images_is_one_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no photos here")
    with pytest.raises(ValueError, match=r"^no image files under [^\n]*$"):
        convert.folder_to_tfrecords(tmp_path / "empty", tmp_path / "set")
    assert not (tmp_path / "set").exists()


# -- the program -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--shards=0"], "--shards must be a positive int, got 0"),
    (["--shards=2", "--shard_mb=64"], "give --shards or --shard_mb, not both"),
    (["--existing"], "already holds a TFRecord set; pass --overwrite to replace it"),
    (["--input=/no/such/folder"], "--input=/no/such/folder: image folder does not exist"),
    (["--eval_fraction=x"], "argument --eval_fraction: invalid float value: 'x'"),
])
def test_vicreg_tfrecords_answers_usage_errors_in_one_line_before_tensorflow_loads(tmp_path, photos, args, message):
    output = tmp_path / "set"
    if args == ["--existing"]:
        output.mkdir()
        (output / "index.json").write_text("{}")
        args = []
    argv = [f"--input={photos}", f"--output={output}", *args]
    result = run_python(["-m", "trainers.tfrecords", *argv], timeout=60, env={"PYTHONPROFILEIMPORTTIME": "1"})
    lines = result.stderr.splitlines()
    imported = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
    errors = [line for line in lines if not line.startswith("import time:")]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], \
        result.stderr[-800:]
    assert "tensorflow" not in imported and "vicreg_tf" not in imported


def test_vicreg_tfrecords_writes_the_same_bytes_in_every_process_and_names_the_training_flags(
        photos, tmp_path, capsys):
    from trainers import tfrecords

    result = run_python(["-m", "trainers.tfrecords", f"--input={photos}", f"--output={tmp_path / 'set'}",
                         "--shards=2", "--eval_fraction=0.3"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'"--config.data.path={tmp_path / "set"}/train-*.tfrecord"' in result.stdout
    assert f'"--config.data.eval_path={tmp_path / "set"}/eval-*.tfrecord"' in result.stdout
    index = json.loads((tmp_path / "set" / "index.json").read_text())
    assert sorted(index["files"]) == sorted(p.name for p in (tmp_path / "set").glob("*.tfrecord"))
    assert tfrecords.main([f"--input={photos}", f"--output={tmp_path / 'here'}", "--shards=2",
                           "--eval_fraction=0.3"]) == 0
    for name in index["files"]:  # the same seed, another process: the same bytes (map keys in order)
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "set" / name).read_bytes(), name
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        tfrecords.main([f"--input={tmp_path / 'set'}", f"--output={tmp_path / 'again'}"])  # records, no images
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: no image files under")


# -- reading: the index, segments ----------------------------------------------------------------


def test_the_index_replaces_the_counting_pass(photos, tmp_path, counted_reads):
    convert.folder_to_tfrecords(photos, tmp_path / "set", shards=3, eval_fraction=0)
    pattern = str(tmp_path / "set" / "train-*.tfrecord")
    source = data.RecordSource.from_tfrecords(pattern, segment_records=8)
    assert counted_reads == [] and source.count == 30  # counts and offsets from the index: nothing read
    assert source.segmented and (source.segments[:, 3] >= 0).all()  # every segment starts at its byte offset
    index_path = tmp_path / "set" / "index.json"
    index = json.loads(index_path.read_text())
    index["files"]["train-00001-of-00003.tfrecord"]["bytes"] += 1  # as if that file had changed since
    index_path.write_text(json.dumps(index))
    data.RecordSource.from_tfrecords(pattern, segment_records=8)
    assert len(counted_reads) == 10  # that file alone is counted
    index_path.unlink()
    counted_reads.clear()
    counted = data.RecordSource.from_tfrecords(pattern, segment_records=8)
    assert len(counted_reads) == 30 and counted.count == 30  # without it: one pass over the records
    np.testing.assert_array_equal(counted.segments, source.segments)
    convert.index_tfrecords(pattern)  # files written by something else: their index, once
    counted_reads.clear()
    np.testing.assert_array_equal(data.RecordSource.from_tfrecords(pattern, segment_records=8).segments,
                                  source.segments)
    assert counted_reads == []


def _class_sorted(folder: Path, files: int, classes: int, per_class: int) -> str:
    """Records of labels 0, 0, ..., 1, ... in order, cut into `files` files (1-pixel PNGs: only labels matter)."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(buffer, "PNG")
    for f, part in enumerate(np.array_split(np.repeat(np.arange(classes), per_class), files)):
        with tf.io.TFRecordWriter(str(folder / f"train-{f:02d}.tfrecord")) as writer:
            for label in part:
                feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()])),
                           "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return str(folder / "train-*.tfrecord")


def _epoch_labels(source, worker=0, workers=1, epoch=0, window=16):
    seed = tf.stack([data.mix_seeds(0, epoch), tf.constant(-1, tf.int64)])
    stream = data.windowed_permutation(source.epoch_records(worker, workers)(seed), window, seed, moving=True)
    return [int(label) for _, label in stream]


def test_segments_mix_class_sorted_files_and_each_worker_still_reads_a_wth(tmp_path, counted_reads):
    pattern = _class_sorted(tmp_path, files=4, classes=16, per_class=16)  # 256 records, 4 classes per file
    whole = data.RecordSource.from_tfrecords(pattern, cache_mb=0, segment_records=None)
    split = data.RecordSource.from_tfrecords(pattern, cache_mb=0, segment_records=8)
    assert len(split.segments) == 32 and not whole.segmented

    def classes_per_batch(labels, batch=16):
        return np.mean([len(set(labels[k:k + batch])) for k in range(0, len(labels), batch)])

    mixed = [classes_per_batch(_epoch_labels(s, epoch=e)) for s in (whole, split) for e in (0, 1)]
    # A window of 16 from 4 read positions holds ~5 classes; from 16 segments at once, ~12.
    assert max(mixed[:2]) < 6 and min(mixed[2:]) > 8, mixed
    for workers in (2, 4):
        per_worker, labels = [], []
        for worker in range(workers):
            counted_reads.clear()
            labels += _epoch_labels(split, worker, workers)
            per_worker.append(len(counted_reads))
        assert per_worker == [256 // workers] * workers  # whole files per worker: exactly its share
        assert sorted(labels) == sorted(np.repeat(np.arange(16), 16).tolist())  # together: every record once


def test_segmented_epochs_are_a_function_of_seed_and_epoch_and_a_cache_reads_once(tmp_path, counted_reads):
    pattern = _class_sorted(tmp_path, files=2, classes=4, per_class=10)  # 40 records, 20 per file
    source = data.RecordSource.from_tfrecords(pattern, cache_mb=0)
    assert source.segmented
    epochs = [_epoch_labels(source, epoch=e) for e in (0, 1, 2)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and epochs[0] != epochs[1] != epochs[2]
    assert _epoch_labels(data.RecordSource.from_tfrecords(pattern, cache_mb=0), epoch=2) == epochs[2]  # a resumed run
    cached = data.RecordSource.from_tfrecords(pattern)
    assert cached.cache and cached.segmented
    counted_reads.clear()
    batches = list(data.order(cached, 8, epochs=3, steps_per_epoch=5, seed=0, shuffle_buffer=8))
    assert len(batches) == 15 and len(counted_reads) == 40  # read once, not once per epoch


def test_segments_compose_with_a_tfds_slice_of_each_file(tmp_path):
    table = records_module.segment_table([10, 7], 4, skip_take=[(2, -1), (0, 5)])
    assert table[:, :3].tolist() == [[0, 2, 4], [0, 6, 4], [1, 0, 4], [1, 4, 1]]
    assert (table[:, 3] == -1).all()  # no byte offsets: each segment skips its first records
    pattern = _class_sorted(tmp_path, files=2, classes=17, per_class=1)  # labels 0..8 and 9..16
    files = sorted(tf.io.gfile.glob(pattern))
    plain = data.RecordSource.from_tfrecords(pattern, segment_records=None)
    sliced = data.RecordSource(files, plain._parse, 9, 3, True, description={}, skip_take=[(2, -1), (0, 2)],
                               segments=records_module.segment_table([9, 8], 3, skip_take=[(2, -1), (0, 2)]))
    assert sorted(_epoch_labels(sliced, window=1)) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_a_sample_of_class_sorted_records_comes_from_all_over_the_set(tmp_path, counted_reads):
    pattern = _class_sorted(tmp_path, files=4, classes=16, per_class=16)  # 256 records in class order
    source = data.RecordSource.from_tfrecords(pattern, cache_mb=0, segment_records=8)
    counted_reads.clear()
    first = [int(label) for _, label in source.limited(32).encoded()]
    drawn = [int(label) for _, label in source.sample(32, seed=1).encoded()]
    assert len(set(first)) == 4  # the stored order: each file's first class (what the kNN bank took)
    assert len(drawn) == 32 and len(set(drawn)) >= 12, drawn  # one record from each of 32 segments
    assert drawn == [int(label) for _, label in source.sample(32, seed=1).encoded()]  # the same every time
    assert drawn != [int(label) for _, label in source.sample(32, seed=2).encoded()]
    assert source.sample(0) is source and source.sample(256) is source
    counted_reads.clear()
    assert len(list(source.sample(32, seed=3).encoded())) == 32
    assert len(counted_reads) == 32, f"{len(counted_reads)} records read for a sample of 32 of 256"
    counted_reads.clear()
    assert len(list(source.sample(20, seed=3).encoded())) == 20  # fewer than the segments: 20 of them, one each
    assert len(counted_reads) == 20
    counted_reads.clear()
    assert len(list(source.sample(100, seed=3).encoded())) == 100  # 4 from each of 25 segments
    assert len(counted_reads) == 100
    sevens = data.RecordSource.from_tfrecords(pattern, cache_mb=0, segment_records=7)  # 9 of 7 and 1 of 1 a file
    assert sorted(set(sevens.segments[:, 2])) == [1, 7]
    for seed in range(4):  # 3 from each segment, a 1-record one counted as 1: still 100 drawn
        counted_reads.clear()
        assert len(list(sevens.sample(100, seed=seed).encoded())) == 100
        assert 100 <= len(counted_reads) <= 100 + 2, seed  # the last segment opened may be read past the 100th
    whole = data.RecordSource.from_tfrecords(pattern, cache_mb=0, segment_records=None)  # files, not segments
    assert len([1 for _ in whole.sample(32, seed=1).encoded()]) == 32
