"""Deprecated names, kept so that code written against them runs: import from the modules named below.

The input pipeline is `vicreg_tf.data.pipeline` (`view_pair_batches`, `distribute_view_pairs`,
`views_from_crops`, once `device_view_pairs`); a run's state (backups, SIGTERM) is
`vicreg_tf.run_state`; atomic files are `vicreg_tf.atomic_io`.
"""
import warnings

from vicreg_tf.atomic_io import is_remote, read_text, save_keras_file, write_text_atomically  # noqa: F401
from vicreg_tf.data.images import UnreadableImagesReport  # noqa: F401
from vicreg_tf.data.pipeline import distribute_view_pairs, view_pair_batches  # noqa: F401
from vicreg_tf.data.pipeline import views_from_crops as device_view_pairs  # noqa: F401
from vicreg_tf.run_state import (  # noqa: F401
    SIGTERM_AT_STEP_ENV,
    AtomicBackupAndRestore,
    Preempted,
    load_backup,
    read_backup_epoch,
    read_backup_position,
    save_backup,
)

warnings.warn("vicreg_tf.training is deprecated: use vicreg_tf.data.pipeline (the input pipeline) and "
              "vicreg_tf.run_state (backups, preemption)", DeprecationWarning, stacklevel=2)
