"""Every method of the family through one battery (tests/method_checks.py): a new method is one entry here."""
import pytest
from method_checks import CHECKS, run_method_checks

import vicreg_tf

MAKERS = {
    "vicreg": lambda backbone: vicreg_tf.VICReg(backbone, projector="16-16"),
    "simsiam": lambda backbone: vicreg_tf.SimSiam(backbone, projector="16-16", predictor="8", variance_weight=1.0),
    "byol": lambda backbone: vicreg_tf.BYOL(backbone, projector="16-16", predictor="8", total_steps=10),
    "logdet": lambda backbone: vicreg_tf.EntropyVICReg(backbone, projector="16-16", entropy="logdet"),
    "pairwise": lambda backbone: vicreg_tf.EntropyVICReg(backbone, projector="16-16", entropy="pairwise"),
}


def test_every_registered_method_is_in_the_battery():
    from vicreg_tf.methods import METHODS

    assert set(MAKERS) == set(METHODS)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("method", list(MAKERS))
def test_method_passes_the_battery(method, check, tmp_path, two_cpu_strategy):
    run_method_checks(MAKERS[method], check, tmp_path=tmp_path, strategy=two_cpu_strategy)
