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
from ffo_conformance.zoo import get_instance
from ffo_core import ConfigError, Status, get_backend

test_osqp_conformance = conformance_test("osqp", classes=["lp", "qp"])


def test_settings_are_validated_and_passed_through():
    backend = get_backend("osqp:eps_abs=1e-10,max_iter=5000")
    assert backend.settings["eps_abs"] == 1e-10 and backend.settings["max_iter"] == 5000
    with pytest.raises(ConfigError, match="unknown setting"):
        get_backend("osqp:no_such_setting=1")
    with pytest.raises(ConfigError, match="osqp setting eps_abs='abc'"):
        get_backend("osqp:eps_abs=abc")
    with pytest.raises(ConfigError, match="osqp setting max_iter=-3"):
        get_backend("osqp:max_iter=-3")


def test_with_settings_is_a_configured_copy():
    backend = get_backend("osqp:eps_abs=1e-10")
    limited = backend.with_settings(time_limit=1e-6, max_iter=7)
    assert limited.settings["eps_abs"] == 1e-10 and limited.settings["max_iter"] == 7
    assert backend.settings["max_iter"] == 200_000  # unchanged
    smp = get_instance("qp-time-limit").samples[0]
    assert limited.solve(smp.g, smp.h, smp.e).status in (
        Status.TIME_LIMIT,
        Status.ITERATION_LIMIT,
    )


def test_pure_lps_are_solved_by_polishing_early():
    """A pure LP: ADMM alone does not reach 1e-9 within 200 000 iterations; a polished
    point from a looser stage does, and is what the solve returns."""
    smp = get_instance("lp-pure-vertex-n8").samples[0]
    sol = get_backend("osqp").solve(smp.g, smp.h, smp.e)
    assert sol.status is Status.OPTIMAL and sol.info.extra["polished"]
    assert sol.info.accuracy <= 1e-9 and sol.info.iterations < 20_000
    assert abs(sol.primal - smp.truth["y"]).max() < 1e-8
    plain = get_backend("osqp:polishing=false,max_iter=20000").solve(smp.g, smp.h, smp.e)
    assert plain.status is Status.ITERATION_LIMIT  # honest about the stop
