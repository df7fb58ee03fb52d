"""Console scripts: vicreg-train, vicreg-eval, vicreg-export, launch_local."""
import os as _os

# Before anything loads TensorFlow: oneDNN CPU kernels (see vicreg_tf/__init__.py; ~2x faster
# train step on AVX2-only CPUs, where TensorFlow leaves them off by default).
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
