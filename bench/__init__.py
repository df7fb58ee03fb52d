"""vicreg-tf benchmarks: `python -m bench` runs them all, `python -m bench.NAME` one (docs/BENCHMARKS.md).

Every benchmark sees TensorFlow as a vicreg-tf user does: `import vicreg_tf` turns oneDNN's
kernels on before TensorFlow loads (TensorFlow leaves them off on CPUs without AVX-512 VNNI or
AMX), so this package does the same before any benchmark imports TensorFlow; a value the
caller set is kept.
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
