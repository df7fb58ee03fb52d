"""VICReg on CIFAR-10 with a CIFAR-style ResNet-18 (the solo-learn / lightly benchmark setting).

Command:  vicreg-train --config=configs/cifar10_resnet18.py --workdir=runs/cifar10
          (the data comes from tensorflow-datasets: `cifar10`; set --config.data.path to a tfds
          data_dir holding a prepared copy on machines without internet)
Hardware: one or more GPUs. "auto" (trainers/build.py): one GPU: the default strategy, XLA on, views
          on the host, mixed_bfloat16 on compute capability >= 8.0 (float32 below); several GPUs:
          MirroredStrategy over all visible GPUs, XLA off, the views' second stage on the GPUs.
Reference: solo-learn reports 92.07% linear top-1 after 1000 epochs with this network;
not measured here (no GPU and no CIFAR-10 download on the development machine).
"""
import ml_collections

from vicreg_tf.configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    config = fashion_mnist.get_config()
    config.experiment = "cifar10_resnet18"
    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.eval_crop_fraction = 1.0  # CIFAR-10's 32x32 images kept whole
    config.data.channels = 3
    config.data.shuffle_buffer = 50000
    config.views.preset = "paper"
    config.model.backbone = "resnet18_cifar"
    config.model.backbone_kwargs = ml_collections.ConfigDict({"width": 64})
    config.model.projector = "2048-2048-2048"
    config.optimizer.name = "lars"
    config.optimizer.base_learning_rate = 0.3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.eta = 0.02  # solo-learn's CIFAR VICReg recipe
    config.optimizer.warmup_epochs = 10
    config.training.batch_size = 256
    config.training.epochs = 1000
    # "auto" (from fashion_mnist.py): mixed_bfloat16 on A100/H100-class GPUs, float32 on older ones
    # (set mixed_float16 there; vicreg_tf's loss scaling skips a step that overflows on any GPU);
    # XLA on for one GPU, off across several (Keras turns it off under tf.distribute anyway).
    config.training.mixed_precision = "auto"
    config.training.jit_compile = "auto"
    config.eval.knn_every = 10
    config.eval.linear_epochs = 100
    return config
