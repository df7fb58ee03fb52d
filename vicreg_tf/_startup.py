"""TensorFlow's start-up notices, hidden for the command-line programs (not for library users).

No TensorFlow import here: the programs enter `quiet_tensorflow_startup()` before
TensorFlow loads (`vicreg_tf/__init__.py` leaves it unloaded for them).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

_STARTUP_NOISE = (
    "All log messages before absl::InitializeLog",
    "oneDNN custom operations are on",
    "Could not find cuda drivers",
    "cpu_feature_guard.cc",
    "To enable the following instructions",
    "failed call to cuInit",
)


@contextlib.contextmanager
def quiet_tensorflow_startup():
    """Hides TensorFlow's start-up notices on stderr (see _STARTUP_NOISE) and passes on everything else.

    TF_CPP_MIN_LOG_LEVEL unset is set to 2 (no C++ INFO or WARNING lines, such
    as PredictCost() or cache notices). Set by the user to 2 or 3 (the usual advice
    for a quiet TensorFlow) it is kept, and the notices stay hidden too, since
    TensorFlow prints them before it reads the level. Only 0 or 1, asking for
    TensorFlow's notices, shows everything.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() in ("0", "1"):
        yield
        return
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip():
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            skip_next = False
            for line in lines:
                if skip_next or any(noise in line for noise in _STARTUP_NOISE):
                    # cpu_feature_guard's notice continues on a second line
                    skip_next = "cpu_feature_guard.cc" in line
                    continue
                sys.stderr.write(line)
            sys.stderr.flush()
