"""Transfer learning: a Fashion-MNIST classifier on top of a pretrained VICReg backbone.

    python examples/transfer_learning.py runs/fmnist/backbone.keras
    python examples/transfer_learning.py runs/fmnist/backbone.keras --epochs=20 --fine_tune_epochs=2

1. `load_backbone(path)` gives the backbone as a plain, frozen Keras model.
2. A Dense classifier is trained on its features. The backbone is frozen, so
   its features are computed once with `predict` and the head trains on them
   (many epochs in seconds); the same head layer then sits on the backbone.
3. Optionally the backbone is unfrozen (`set_trainable`, which keeps its
   BatchNormalization frozen on the pretrained statistics) and everything is
   fine-tuned with a small learning rate. Passing training=False when calling
   the backbone is not enough in Keras 3: `fit` calls the outer model with
   training=True, which replaces it, and BatchNorm would then train.

Prints the test accuracy after each stage. Images are float32 in [0, 1]: the
backbone normalises them itself. Reads the Fashion-MNIST IDX files from
--data_dir (Debian package dataset-fashion-mnist).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: off
from vicreg_tf import data  # noqa: E402  first: it decides TensorFlow's oneDNN default
from vicreg_tf.transfer import load_backbone, set_trainable  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
# isort: on


def fashion_mnist(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 28, 28, 1) in [0, 1] and int labels, from the local IDX files."""
    batches = data.fashion_mnist(split, data_dir=data_dir).batch(10_000)
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in batches))
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbone", help="a backbone .keras file (vicreg-train writes one)")
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=20, help="epochs for the classifier head")
    parser.add_argument("--head_learning_rate", type=float, default=1e-2)
    parser.add_argument("--fine_tune_learning_rate", type=float, default=1e-4)
    parser.add_argument("--fine_tune_epochs", type=int, default=1,
                        help="then epochs with the backbone unfrozen (0: skip)")
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

    # Stage 1: the linear classifier on frozen features, computed once.
    train_features = backbone.predict(x_train, batch_size=1024, verbose=0)
    test_features = backbone.predict(x_test, batch_size=1024, verbose=0)
    head = keras.layers.Dense(10, name="classifier")
    probe = keras.Sequential([keras.Input(train_features.shape[1:]), head])
    probe.compile(
        optimizer=keras.optimizers.Adam(args.head_learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    probe.fit(train_features, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
    print(f"frozen backbone + linear classifier: test accuracy "
          f"{probe.evaluate(test_features, y_test, batch_size=1024, verbose=0)[1]:.4f}")

    # The classifier on images: backbone -> the trained head.
    inputs = keras.Input(backbone.input_shape[1:])
    outputs = head(backbone(inputs))
    model = keras.Model(inputs, outputs)

    if args.fine_tune_epochs > 0:
        # Stage 2: unfreeze all but BatchNorm and fine-tune end to end, gently
        # (compile after changing trainable).
        set_trainable(backbone, True)
        model.compile(
            optimizer=keras.optimizers.Adam(args.fine_tune_learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.fine_tune_epochs, verbose=2)
        accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)[1]
        print(f"after fine-tuning the backbone: test accuracy {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
