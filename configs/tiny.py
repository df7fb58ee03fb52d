"""A seconds-long smoke configuration (Fashion-MNIST, 512 images, a tiny CNN): used by tests.

Command:  vicreg-train --config=configs/tiny.py --workdir=/tmp/tiny
Hardware: any CPU; runs in well under a minute; on GPUs "auto" chooses as fashion_mnist
          does (one GPU: XLA, host views, mixed_bfloat16 on compute capability >= 8.0; several:
          MirroredStrategy, no XLA, views on the GPUs). Result: none to speak of (it checks plumbing).
"""
import ml_collections

from vicreg_tf.configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    config = fashion_mnist.get_config()
    config.experiment = "tiny"
    config.data.limit = 512
    config.data.shuffle_buffer = 512
    config.model.backbone_kwargs.widths = (4, 8)
    config.model.projector = "32-32"
    config.training.batch_size = 64
    config.training.epochs = 2
    config.optimizer.warmup_epochs = 0
    config.eval.knn_every = 1
    config.eval.knn_k = (5,)
    config.eval.knn_max_train = 256
    config.eval.linear_epochs = 20  # 512 images: one probe step per epoch
    return config
