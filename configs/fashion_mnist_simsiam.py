"""SimSiam on Fashion-MNIST with the small CNN: `configs/fashion_mnist.py` with model.method=simsiam.

Command:  vicreg-train --config=configs/fashion_mnist_simsiam.py --workdir=runs/fashion_mnist_simsiam
          With VICReg's variance and covariance on the expander outputs (VICReg Table 4):
          ... --config.model.regularizer_variance_weight=1.0 --config.model.regularizer_covariance_weight=0.01
          Without a predictor (collapses unless the variance term is on): --config.model.predictor=''
Hardware: 2 CPU cores, like fashion_mnist; on GPUs "auto" chooses as fashion_mnist
          does (one GPU: XLA, host views, mixed_bfloat16 on compute capability >= 8.0; several:
          MirroredStrategy, no XLA, views on the GPUs).
Result:   not measured at this (5-epoch) budget; the 2-epoch, 10,000-image comparison of the
          whole family is in docs/BENCHMARKS.md, "The VICReg family".
Everything else (data, views, expander 1024-1024-1024, LARS recipe, batch, epochs) is
fashion_mnist's, so the runs compare at equal budget.
"""
import ml_collections

from vicreg_tf.configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    config = fashion_mnist.get_config()
    config.experiment = "fashion_mnist_simsiam"
    config.model.method = "simsiam"
    config.model.predictor = "256"  # SimSiam's bottleneck predictor: hidden width 1/4 of the expander's
    config.export.name = "simsiam"
    return config
