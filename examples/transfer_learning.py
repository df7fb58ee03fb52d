"""Transfer learning: a Fashion-MNIST classifier on top of a pretrained VICReg backbone.

    python examples/transfer_learning.py runs/fmnist/backbone.keras
    python examples/transfer_learning.py runs/fmnist/backbone.keras --epochs=5 --fine_tune_epochs=2

1. `vicreg_tf.load_backbone(path)` gives the backbone as a plain, frozen Keras model.
2. A Dense classifier on its features is trained (the backbone stays fixed).
3. Optionally the backbone is unfrozen and everything is fine-tuned with a small
   learning rate. The backbone is called with training=False, so its
   BatchNormalization keeps the pretrained statistics even while its weights
   train (the usual Keras fine-tuning recipe).

Prints the test accuracy after each stage. Images are float32 in [0, 1]: the
backbone normalises them itself. Reads the Fashion-MNIST IDX files from
--data_dir (Debian package dataset-fashion-mnist).
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vicreg_tf.transfer import load_backbone  # noqa: E402


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST format): a big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 28, 28, 1) in [0, 1] and int labels."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz")
    return (images[..., None] / np.float32(255.0)).astype(np.float32), labels.astype(np.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbone", help="a backbone .keras file (vicreg-train writes one)")
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3, help="epochs for the classifier head")
    parser.add_argument("--fine_tune_epochs", type=int, default=1, help="then epochs with the backbone unfrozen (0: skip)")
    parser.add_argument("--train_size", type=int, default=60000, help="use the first N training images")
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    x_train, y_train = fashion_mnist(Path(args.data_dir), "train")
    x_test, y_test = fashion_mnist(Path(args.data_dir), "test")
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]

    # The one line: the pretrained backbone as a frozen Keras model.
    backbone = load_backbone(args.backbone, trainable=False)
    if backbone.input_shape[1:] != x_train.shape[1:]:
        raise SystemExit(f"backbone takes {backbone.input_shape[1:]}, Fashion-MNIST is {x_train.shape[1:]}")

    inputs = keras.Input(backbone.input_shape[1:])
    features = backbone(inputs, training=False)
    outputs = keras.layers.Dense(10, name="classifier")(features)
    model = keras.Model(inputs, outputs)

    def train(epochs: int, learning_rate: float) -> float:
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=epochs, verbose=2)
        return model.evaluate(x_test, y_test, batch_size=1024, verbose=0)[1]

    head_accuracy = train(args.epochs, 1e-3)
    print(f"frozen backbone + linear classifier: test accuracy {head_accuracy:.4f}")
    if args.fine_tune_epochs > 0:
        backbone.trainable = True  # recompiling (inside train) makes this take effect
        tuned_accuracy = train(args.fine_tune_epochs, 1e-4)
        print(f"after fine-tuning the backbone: test accuracy {tuned_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
