"""The plugin's CI: ffo's conformance suite, on the problem classes OSQP supports.

``conformance_test`` builds one parametrised test per (instance, check); cone classes are
left out because ``OSQPBackend.capabilities`` does not declare SOC/EXP/PSD (run them and
the suite would skip them, saying so).  Gradient failures the suite attributes to ffo_core
itself (the trusted reference solver fails them too) are reported as xfail.

Run:  pytest plugins/ffo-osqp/tests      (or, from the plugin folder, just: pytest)
Same, from the command line:  ffo conformance osqp --classes lp,qp
"""

import pytest

from ffo_conformance.pytest_plugin import conformance_test
from ffo_core import ConfigError, get_backend

test_osqp_conformance = conformance_test("osqp", classes=["lp", "qp"])


def test_settings_are_validated_and_passed_through():
    backend = get_backend("osqp:eps_abs=1e-10,max_iter=5000")
    assert backend.settings["eps_abs"] == 1e-10 and backend.settings["max_iter"] == 5000
    with pytest.raises(ConfigError, match="unknown setting"):
        get_backend("osqp:no_such_setting=1")
