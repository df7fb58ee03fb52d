"""BYOL on Fashion-MNIST with the small CNN: `configs/fashion_mnist.py` with model.method=byol.

Command:  vicreg-train --config=configs/fashion_mnist_byol.py --workdir=runs/fashion_mnist_byol
          With VICReg's variance term on the expander outputs (VICReg Table 4, BYOL 69.3% -> 70.2%):
          ... --config.model.regularizer_variance_weight=1.0
Hardware: 2 CPU cores, like fashion_mnist; a step costs about a third more (the EMA target's
          forward pass on both views); on GPUs "auto" chooses as fashion_mnist
          does (one GPU: XLA, host views, mixed_bfloat16 on compute capability >= 8.0; several:
          MirroredStrategy, no XLA, views on the GPUs).
Result:   not measured at this (5-epoch) budget; the 2-epoch, 10,000-image comparison of the
          whole family is in docs/BENCHMARKS.md, "The VICReg family".
The EMA decay follows BYOL's cosine schedule from model.tau_base (0.996) to 1 over all
training steps. Everything else is fashion_mnist's (equal budget).
"""
import ml_collections

from vicreg_tf.configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    config = fashion_mnist.get_config()
    config.experiment = "fashion_mnist_byol"
    config.model.method = "byol"
    config.model.predictor = "1024"  # BYOL's predictor: hidden width as wide as the expander's
    config.model.tau_base = 0.996
    config.export.name = "byol"
    return config
