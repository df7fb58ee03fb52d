"""Where images come from, and the batches VICReg trains on: one module per kind of source.

Streaming sources (for training at any size; images stay encoded, or uint8 in
memory, until a view is made; docs/DATA.md):

    FolderSource(path)                   folders.py   a folder of jpg/png/bmp/gif, class sub-folders as labels
    RecordSource.from_tfds(name, split)  records.py   a prepared tfds dataset, image bytes undecoded
    RecordSource.from_tfrecords(glob)    records.py   TFRecord files of tf.train.Example
    ArraySource(images, labels)          arrays.py    uint8 arrays in memory (Fashion-MNIST)

`folder_to_tfrecords(folder, output)` (convert.py; the `vicreg-tfrecords` program) writes a
folder once as shuffled TFRecord files with an index, the path past ~10^6 files or for object
storage; `index_tfrecords(pattern)` indexes TFRecords made elsewhere.

`view_pair_batches(source, two_views, batch, ...)` (pipeline.py) turns a source
into each worker's rows of the global `(view_a, view_b)` batches, in three stages:
`order` (which items form global batch t of epoch e, from (seed, epoch)),
`decode_and_crop` and `views_from_crops` (here, or inside the train step).

tf.data datasets of `(image float32 in [0, 1], label int32)` (for evaluation,
transfer learning, or `view_pairs` in a Keras script):

    fashion_mnist(split)                 fashion_mnist.py  the local IDX files (read_idx reads one)
    from_tfds(name, split, image_size)   records.py
    from_folder(path, image_size)        folders.py
    from_arrays(images, labels)          arrays.py

`view_pairs(images, two_views, batch_size)` gives `(view_a, view_b)` batches from
any such dataset (the pipeline's order and views) and `eval_batches` plain batches
(batches.py). Decoding, the crop window, the evaluation transform and the
unreadable-image report are in images.py; the common source interface in base.py.
"""
from vicreg_tf.data.arrays import ArraySource, from_arrays
from vicreg_tf.data.batches import eval_batches, view_pairs
from vicreg_tf.data.convert import folder_to_tfrecords, index_tfrecords
from vicreg_tf.data.fashion_mnist import (
    FASHION_MNIST_DIR,
    fashion_mnist,
    fashion_mnist_arrays,
    fashion_mnist_dirs,
    read_idx,
)
from vicreg_tf.data.folders import FolderSource, from_folder
from vicreg_tf.data.images import (
    EVAL_CROP_FRACTION,
    IMAGE_EXTENSIONS,
    NO_LABEL,
    UnreadableImagesReport,
    decode_crop,
    eval_transform,
    gray_image,
    safe_map,
    unreadable_images,
)
from vicreg_tf.data.pipeline import (
    batch_seed,
    ceil_div,
    decode_and_crop,
    distribute_view_pairs,
    epoch_permutation,
    mix_seeds,
    order,
    view_pair_batches,
    views_from_crops,
    windowed_permutation,
)
from vicreg_tf.data.records import RecordSource, from_tfds

__all__ = [
    "ArraySource",
    "FolderSource",
    "RecordSource",
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_DIR",
    "EVAL_CROP_FRACTION",
    "NO_LABEL",
    "read_idx",
    "fashion_mnist",
    "fashion_mnist_arrays",
    "fashion_mnist_dirs",
    "from_tfds",
    "from_folder",
    "from_arrays",
    "view_pairs",
    "view_pair_batches",
    "distribute_view_pairs",
    "order",
    "decode_and_crop",
    "views_from_crops",
    "batch_seed",
    "mix_seeds",
    "eval_batches",
    "decode_crop",
    "eval_transform",
    "gray_image",
    "safe_map",
    "unreadable_images",
    "UnreadableImagesReport",
    "epoch_permutation",
    "windowed_permutation",
    "ceil_div",
    "folder_to_tfrecords",
    "index_tfrecords",
]
