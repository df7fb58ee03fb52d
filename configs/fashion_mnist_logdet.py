"""VICReg with LogDet entropy (Shwartz-Ziv et al., arXiv 2303.00633) on Fashion-MNIST, small CNN.

loss = 25 * MSE(z_a, z_b) - (25 / D) * (H(z_a) + H(z_b)) / 2, H = 1/2 log det(Cov(Z) + 1e-3 I)
on the gathered expander outputs (vicreg_tf.EntropyVICReg, vicreg_tf.losses.logdet_entropy).

Command:  vicreg-train --config=configs/fashion_mnist_logdet.py --workdir=runs/fashion_mnist_logdet
          The pairwise-distance estimator instead: ... --config.model.method=pairwise
          [--config.model.kernel_width=32.0]
Hardware: 2 CPU cores, like fashion_mnist (the float64 Cholesky of a 256 x 256 matrix per view
          and step is small next to the CNN; the Gram matrix is float32); on GPUs "auto" chooses as
          fashion_mnist does.
Result:   not measured at this (5-epoch) budget; the 2-epoch, 10,000-image comparison of the
          whole family is in docs/BENCHMARKS.md, "The VICReg family".
Everything else is fashion_mnist's (equal budget).
"""
import ml_collections

from vicreg_tf.configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    config = fashion_mnist.get_config()
    config.experiment = "fashion_mnist_logdet"
    config.model.method = "logdet"
    config.model.entropy_beta = 1e-3
    config.export.name = "vicreg_logdet"
    return config
