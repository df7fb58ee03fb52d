"""vicreg-tfrecords: a folder of images -> sharded, shuffled TFRecord files that vicreg-train streams.

    vicreg-tfrecords --input=/photos --output=/data/photos-tfrecords \\
        [--shards=N | --shard_mb=128] [--eval_fraction=0.1] [--seed=0] [--overwrite]

Class sub-folders become labels (as for training from the folder). The image files'
bytes are written unchanged (no decoding, no re-encoding) as tf.train.Example records
(image/encoded, image/class/label, image/filename) in a random order fixed by --seed,
into OUTPUT/train-00000-of-000NN.tfrecord ... and, with --eval_fraction > 0,
OUTPUT/eval-...: the same held-out files as training from the folder with
--config.data.eval_fraction. OUTPUT/index.json records each file's record count and
byte offsets and the class names; readers use it instead of counting the records.
OUTPUT appears only when the set is whole (written beside it, then renamed): a killed
conversion leaves a hidden .NAME.tmp-PID directory and no set. Train on it with

    vicreg-train --config=image_folder --config.data.source=tfrecords \\
        "--config.data.path=OUTPUT/train-*.tfrecord" "--config.data.eval_path=OUTPUT/eval-*.tfrecord" ...

TFRecord files written by something else get the index alone (one pass over their
records, instead of one per run):

    vicreg-tfrecords --index="/data/train-*.tfrecord"
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
import time
from pathlib import Path

INDEX_FILENAME = "index.json"  # vicreg_tf.data.records.INDEX_FILENAME, read here before TensorFlow loads


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as the other programs (trainers/cli.py: fail)
        sys.exit(fail(f"{message} (see --help)"))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vicreg-tfrecords", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="the image folder (recursive; class sub-folders as labels)")
    parser.add_argument("--output", help="the directory to create for the set")
    parser.add_argument("--index", metavar="PATTERN",
                        help="instead: write the index of these TFRecord files beside them")
    parser.add_argument("--shards", type=int, help="the number of training files (default: files of about 128 MB, "
                        "at least 16)")
    parser.add_argument("--shard_mb", type=float, help="the size of each file in MB, instead of --shards")
    parser.add_argument("--eval_fraction", type=float, default=0.1,
                        help="share of the files held out as eval-* (0: none; default 0.1, as training from a folder)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the records' order (default 0)")
    parser.add_argument("--labels", choices=("auto", "folders", "none"), default="auto",
                        help="class sub-folders as labels: auto (when every image is in one), folders (demand "
                        "it), none")
    parser.add_argument("--overwrite", action="store_true", help="replace a set already in --output")
    return parser


def check(args) -> None:
    """The command line's mistakes, before TensorFlow loads: one ValueError or FileNotFoundError line."""
    if args.index is not None:
        if args.input or args.output:
            raise ValueError("--index writes an index only: give it without --input and --output")
        if not glob.glob(args.index):
            raise ValueError(f"no TFRecord files match --index={args.index!r}")
        return
    if not args.input or not args.output:
        raise ValueError("give --input=FOLDER and --output=DIRECTORY (or --index=PATTERN)")
    if not Path(args.input).is_dir():
        raise FileNotFoundError(f"--input={args.input}: image folder does not exist or is not a folder")
    if args.shards is not None and args.shard_mb is not None:
        raise ValueError("give --shards or --shard_mb, not both")
    if args.shards is not None and args.shards < 1:
        raise ValueError(f"--shards must be a positive int, got {args.shards}")
    if args.shard_mb is not None and not args.shard_mb > 0:
        raise ValueError(f"--shard_mb must be a number > 0, got {args.shard_mb}")
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval_fraction must be a number in [0, 1), got {args.eval_fraction}")
    if args.seed < 0:
        raise ValueError(f"--seed must be an int >= 0, got {args.seed}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output={args.output} exists and is not a directory")
    if output.is_dir() and ((output / INDEX_FILENAME).exists() or any(output.glob("*.tfrecord"))):
        if not args.overwrite:
            raise ValueError(f"--output={args.output} already holds a TFRecord set; pass --overwrite to replace it")
    elif output.is_dir() and any(output.iterdir()):
        raise ValueError(f"--output={args.output} is a directory that is not empty; give a new or empty one")


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(fail(str(error)))

    from vicreg_tf._startup import quiet_tensorflow_startup

    with quiet_tensorflow_startup():
        import vicreg_tf  # noqa: F401  first: it decides TensorFlow's oneDNN default

        # isort: split
        import tensorflow  # noqa: F401

    from vicreg_tf.data import convert

    start = time.perf_counter()
    if args.index is not None:
        try:
            index = convert.index_tfrecords(args.index)
        except ValueError as error:
            sys.exit(fail(str(error)))
        files = [f for f in glob.glob(args.index)]
        records = sum(index["files"][os.path.basename(f)]["records"] for f in files)
        print(f"indexed {records} records in {len(files)} files in {time.perf_counter() - start:.1f} s: "
              f"{os.path.join(os.path.dirname(os.path.abspath(files[0])), INDEX_FILENAME)}")
        return 0
    # SIGTERM as an exception: the staging directory is removed on the way out.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        index = convert.folder_to_tfrecords(args.input, args.output, shards=args.shards, shard_mb=args.shard_mb,
                                            eval_fraction=args.eval_fraction, seed=args.seed, labels=args.labels,
                                            overwrite=args.overwrite, progress=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(fail(str(error)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - start
    records = sum(split["records"] for split in index["splits"].values())
    megabytes = sum(entry["bytes"] for entry in index["files"].values()) / 1e6
    print(f"wrote {records} images ({megabytes:.1f} MB) into {len(index['files'])} files in {args.output} "
          f"in {seconds:.1f} s ({records / max(seconds, 1e-9):.0f} images/s); {len(index['classes'])} classes")
    output = os.path.abspath(args.output)
    flags = f'--config.data.source=tfrecords "--config.data.path={output}/train-*.tfrecord"'
    if "eval" in index["splits"]:
        flags += f' "--config.data.eval_path={output}/eval-*.tfrecord"'
    print(f"train on it with: vicreg-train --config=image_folder {flags} --workdir=...")
    return 0


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
