"""VICReg on your own images: a folder (recursive; jpeg/png/bmp/gif), ResNet-18 at 64x64.

Command:  vicreg-train --config=configs/image_folder.py --config.data.path=/path/to/images --workdir=runs/mine
          Class sub-folders, where present, become labels for the kNN monitor and vicreg-eval,
          which score a held-out 10% of the files (chosen by a hash of each name, never trained
          on; --config.data.eval_path=/other/folder to evaluate on a folder of your own).
Data:     streams from disk at any size (docs/DATA.md): file names are shuffled, each view's
          crop is taken from the original photo (JPEG: only that window is decoded), unreadable
          files are counted and reported once per epoch, nothing is decoded up front. Start-up
          lists names only (no stat per file); the kNN monitor and the end-of-run summary decode
          random samples of at most eval.knn_max_train / knn_max_eval / 4,096 images, whatever the
          folder's size (docs/DATA.md, "Folders at scale"; past ~10^6 files, or on object storage,
          convert once with vicreg-tfrecords).
Hardware: a GPU is advisable; on a 2-core CPU, expect a few images per second per core at 64x64.
          "auto" (trainers/build.py): one GPU: XLA on, views on the host, mixed_bfloat16 on compute
          capability >= 8.0 (float32 below); several GPUs: XLA off, the views' second stage on the
          GPUs, same precision; CPU: mixed_bfloat16 where it has AVX512_BF16 or AMX (float32
          otherwise), XLA off, views on the host.
Result: depends on your data; watch embedding_std and the spectrum plot for collapse.
"""
import ml_collections

from vicreg_tf.configs import cifar10_resnet18


def get_config() -> ml_collections.ConfigDict:
    config = cifar10_resnet18.get_config()
    config.experiment = "image_folder"
    config.data.source = "folder"
    config.data.name = ""
    config.data.image_size = 64
    config.data.eval_crop_fraction = 0.875  # photos of any size: 224 of 256, the standard evaluation crop
    config.data.train_split = "train"  # the files not held out
    config.data.eval_split = "eval"  # data.eval_fraction of the files, or data.eval_path
    config.training.epochs = 200
    config.training.mixed_precision = "auto"
    config.training.jit_compile = "auto"
    config.optimizer.warmup_epochs = 5
    return config
