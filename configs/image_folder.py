"""VICReg on your own images: a folder (recursive; jpeg/png/bmp/gif), ResNet-18 at 64x64.

Command:  vicreg-train --config=configs/image_folder.py --config.data.path=/path/to/images --workdir=runs/mine
          Class sub-folders, where present, become labels for the kNN monitor and vicreg-eval.
Hardware: a GPU is advisable; on a 2-core CPU, expect a few images per second per core at 64x64.
Result: depends on your data; watch embedding_std and the spectrum plot for collapse.
"""
import ml_collections

from configs import cifar10_resnet18


def get_config() -> ml_collections.ConfigDict:
    config = cifar10_resnet18.get_config()
    config.experiment = "image_folder"
    config.data.source = "folder"
    config.data.name = ""
    config.data.image_size = 64
    config.data.shuffle_buffer = 10000
    config.training.epochs = 200
    config.training.mixed_precision = ""
    config.training.jit_compile = False
    config.optimizer.warmup_epochs = 5
    return config
