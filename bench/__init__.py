"""vicreg-tf benchmarks: `python -m bench` runs them all, `python -m bench.NAME` one (docs/BENCHMARKS.md).

Every benchmark sees TensorFlow as a vicreg-tf user does: it imports `vicreg_tf` before
TensorFlow, and `vicreg_tf/__init__.py` decides TensorFlow's oneDNN default (the one place
that does).
"""

