"""The paper's recipe: ResNet-50, expander 8192-8192-8192, LARS, batch 2048, 1000 epochs.

Command:  vicreg-train --config=configs/imagenet_resnet50.py --workdir=runs/imagenet
          (tfds `imagenet2012` must be prepared manually in --config.data.path; multi-host
          runs set TF_CONFIG, see docs/DISTRIBUTED.md)
Hardware: the paper used 32 V100 GPUs (about 2 days per 100 epochs on 8 GPUs in the official repo).
          What "auto" chooses (trainers/build.py, docs/DISTRIBUTED.md):
          - one GPU: the default strategy, XLA on, views on the host, mixed_bfloat16 on compute
            capability >= 8.0 (A100, H100, L4, RTX 30xx/40xx), float32 below;
          - several GPUs (one host or many): MirroredStrategy / MultiWorkerMirroredStrategy, XLA off,
            views' second stage on the GPUs, mixed_bfloat16 as above;
          - CPU: float32, XLA off, views on the host.
Backbone: ResNet-50 v1.5 as torchvision builds it (`resnet50_torchvision`: stride on the 3x3, BN eps
          1e-5), the paper's and the one `vicreg-import` reads the official weights into.
Reference: 73.2% ImageNet linear top-1 (paper, Table 1); not measured here.
The learning rate is base 0.2 x batch / 256 at batch 2048. For other batch sizes the paper's
100-epoch table (Appendix) gives the base rate: `base_learning_rate_for_batch` below.
"""
import ml_collections

from vicreg_tf.configs import fashion_mnist

# Appendix C of the paper (100-epoch runs): global batch -> base learning rate.
PAPER_BASE_LR = {128: 0.8, 256: 0.5, 512: 0.4, 1024: 0.3}


def base_learning_rate_for_batch(batch_size: int) -> float:
    """The paper's 100-epoch base learning rate for a global batch size (>= 1024 -> 0.3)."""
    if batch_size >= 1024:
        return 0.3
    eligible = [b for b in PAPER_BASE_LR if b <= batch_size]
    if not eligible:
        raise ValueError(f"no base learning rate for batch {batch_size}; expected >= 128")
    return PAPER_BASE_LR[max(eligible)]


def get_config() -> ml_collections.ConfigDict:
    config = fashion_mnist.get_config()
    config.experiment = "imagenet_resnet50"
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.eval_split = "validation"
    config.data.image_size = 224
    config.data.eval_crop_fraction = 0.875  # the paper's evaluation: resize 256, center crop 224
    config.data.channels = 3
    config.data.shuffle_buffer = 10000  # encoded JPEGs, ~110 kB each: ~1.1 GB of host memory
    config.views.preset = "paper"
    config.model.backbone = "resnet50_torchvision"
    config.model.backbone_kwargs = ml_collections.ConfigDict({})
    config.model.projector = "8192-8192-8192"
    config.optimizer.name = "lars"
    config.optimizer.base_learning_rate = 0.2  # the 1000-epoch recipe at batch 2048
    config.optimizer.weight_decay = 1e-6
    config.optimizer.eta = 0.001  # the official LARS
    config.optimizer.warmup_epochs = 10
    config.optimizer.final_fraction = 0.001
    config.training.batch_size = 2048
    config.training.epochs = 1000
    config.training.mixed_precision = "auto"  # mixed_bfloat16 on GPUs >= 8.0 and TPUs, float32 elsewhere
    config.training.jit_compile = "auto"  # on for one GPU (views on the host), off under several replicas
    config.eval.knn_every = 0
    config.eval.linear_epochs = 100
    return config
