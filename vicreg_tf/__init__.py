"""vicreg-tf: VICReg for TensorFlow / Keras 3, exportable to TF Serving.

Public API:
    VICReg                 the Keras model (backbone + expander, VICReg train_step)
    SimSiam, BYOL, EntropyVICReg   the VICReg family on the same step (methods)
    variance_covariance_regularizer, VarianceCovarianceRegularizer   VICReg's terms for other methods
    logdet_entropy, pairwise_entropy   the entropy estimators of the information-theoretic variants
    vicreg_loss            the loss, and its terms invariance_loss, variance_loss, covariance_loss
    build_projector        "8192-8192-8192" -> expander
    LARS, warmup_cosine    the paper's optimizer and learning-rate schedule
    gather_replicas        all-gather across replicas (identity for one)
    StopOnNonFiniteLoss    callback that ends fit on a NaN/Inf loss
    TwoViews, paper_views, grayscale_views   the paired-view pipelines (augment)
    view_pairs             images -> batches of (view_a, view_b), one line (data)
    load_backbone          a pretrained backbone for transfer learning (transfer)
    export_for_serving     the TF Serving export (serving)
Submodules: backbones, augment (the views), kerascv_pipeline (the same views from KerasCV layers),
data (sources), evaluation, methods, serving (the export writer), serving_client, transfer.
"""
import os as _os

# oneDNN CPU kernels. TensorFlow turns them on by default only on CPUs with AVX-512
# VNNI/BF16 or AMX; on others (this project's AVX2 AMD EPYC) it falls back to Eigen
# kernels built without AVX2/FMA, and a VICReg train step is about 2x slower
# (bench/throughput.py, docs/BENCHMARKS.md). Read once, when TensorFlow loads: this
# only helps if vicreg_tf is imported first; an explicit user setting wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import sys as _sys

# The console scripts (vicreg-train, ...) import TensorFlow themselves, inside a context that
# hides its start-up notices, and answer --help without it: for them the names below load on
# first use (PEP 562). Everyone else gets them at once, as before, with the Keras classes
# (VICReg, the view layers, ...) registered for keras.saving.load_model.
_CONSOLE_SCRIPTS = ("vicreg-train", "vicreg-eval", "vicreg-export", "vicreg-import", "vicreg-launch-local",
                    "vicreg-tfrecords")
_PROGRAMS = ("trainers/pretrain.py", "trainers/linear_eval.py", "export/export.py", "export/import_torch.py",
             "trainers/launch_local.py", "trainers/tfrecords.py")
_PROGRAM = (_sys.argv[0] if _sys.argv else "").replace(_os.sep, "/")
# `python -m vicreg_tf.trainers.pretrain`: this package loads while sys.argv[0] is still "-m".
_ORIG_ARGV = list(getattr(_sys, "orig_argv", []))
_MODULE = _ORIG_ARGV[_ORIG_ARGV.index("-m") + 1] if "-m" in _ORIG_ARGV[:-1] else ""
_LAZY = (_os.path.basename(_PROGRAM) in _CONSOLE_SCRIPTS or _PROGRAM.endswith(_PROGRAMS)
         or (_PROGRAM == "-m" and (_MODULE.replace(".", "/") + ".py").endswith(_PROGRAMS)))

if not _LAZY:
    from vicreg_tf import (
        augment,
        backbones,
        data,
        evaluation,
        kerascv_pipeline,
        methods,
        serving,
        serving_client,
        transfer,
    )
    from vicreg_tf.augment import TwoViews, grayscale_views, paper_views
    from vicreg_tf.data import view_pairs
    from vicreg_tf.distribute import gather_replicas, num_replicas
    from vicreg_tf.guard import StopOnNonFiniteLoss
    from vicreg_tf.kerascv_pipeline import kerascv_views
    from vicreg_tf.losses import (
        VarianceCovarianceRegularizer,
        covariance_loss,
        invariance_loss,
        logdet_entropy,
        negative_cosine_similarity,
        pairwise_entropy,
        variance_covariance_regularizer,
        variance_loss,
        vicreg_loss,
    )
    from vicreg_tf.methods import BYOL, EntropyVICReg, SimSiam
    from vicreg_tf.model import VICReg
    from vicreg_tf.optimizers import LARS, scaled_learning_rate, warmup_cosine
    from vicreg_tf.projector import build_projector, parse_projector_spec
    from vicreg_tf.serving import export_for_serving
    from vicreg_tf.transfer import load_backbone, set_trainable

_EXPORTS = {
    "vicreg_tf.distribute": ("gather_replicas", "num_replicas"),
    "vicreg_tf.losses": (
        "covariance_loss", "invariance_loss", "variance_loss", "vicreg_loss", "VarianceCovarianceRegularizer",
        "logdet_entropy", "negative_cosine_similarity", "pairwise_entropy", "variance_covariance_regularizer",
    ),
    "vicreg_tf.guard": ("StopOnNonFiniteLoss",),
    "vicreg_tf.model": ("VICReg",),
    "vicreg_tf.methods": ("BYOL", "EntropyVICReg", "SimSiam"),
    "vicreg_tf.optimizers": ("LARS", "scaled_learning_rate", "warmup_cosine"),
    "vicreg_tf.projector": ("build_projector", "parse_projector_spec"),
    "vicreg_tf.augment": ("TwoViews", "grayscale_views", "paper_views"),
    "vicreg_tf.kerascv_pipeline": ("kerascv_views",),
    "vicreg_tf.data": ("view_pairs",),
    "vicreg_tf.serving": ("export_for_serving",),
    "vicreg_tf.transfer": ("load_backbone", "set_trainable"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = ("arguments", "atomic_io", "augment", "backbones", "base", "batchnorm", "data", "distribute",
               "evaluation", "guard", "kerascv_pipeline", "losses", "methods", "model", "optimizers", "projector",
               "run_state", "serving", "serving_client", "transfer", "torch_import")


def __getattr__(name: str):
    import importlib

    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"vicreg_tf.{name}")
    else:
        raise AttributeError(f"module 'vicreg_tf' has no attribute {name!r}")
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "VICReg",
    "SimSiam",
    "BYOL",
    "EntropyVICReg",
    "VarianceCovarianceRegularizer",
    "variance_covariance_regularizer",
    "negative_cosine_similarity",
    "logdet_entropy",
    "pairwise_entropy",
    "StopOnNonFiniteLoss",
    "vicreg_loss",
    "invariance_loss",
    "variance_loss",
    "covariance_loss",
    "build_projector",
    "parse_projector_spec",
    "LARS",
    "warmup_cosine",
    "scaled_learning_rate",
    "gather_replicas",
    "num_replicas",
    "TwoViews",
    "paper_views",
    "grayscale_views",
    "kerascv_views",
    "view_pairs",
    "load_backbone",
    "set_trainable",
    "export_for_serving",
    "augment",
    "backbones",
    "data",
    "evaluation",
    "methods",
    "serving",
    "serving_client",
    "kerascv_pipeline",
    "transfer",
]
