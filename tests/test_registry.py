"""Config strings, the pluggy registry over the `ffo` entry-point group, and `ffo backends`."""

import importlib.metadata

import pytest

import ffo_core
from ffo_core import BackendUnavailable, ConfigError, available_backends, get_backend
from ffo_core.cli import main
from ffo_core.config import parse_config
from ffo_core.registry import _Registry


def test_parse_config_types_and_positionals():
    cfg = parse_config("Gurobi:Threads=1,FeasibilityTol=1e-9,Presolve=true,Method=barrier")
    assert cfg.name == "gurobi"
    assert cfg.settings == {
        "Threads": 1,
        "FeasibilityTol": 1e-9,
        "Presolve": True,
        "Method": "barrier",
    }
    assert parse_config("cvxpy:OSQP,eps_abs=1e-6").args == ("OSQP",)
    for bad in ("", ":x=1", "scs:=3", "scs:a=1,a=2", "scs:a=1,POS"):
        with pytest.raises(ConfigError):
            parse_config(bad)


def test_get_backend_applies_settings():
    backend = get_backend("clarabel:max_iter=50,tol_gap_abs=1e-10")
    assert backend.name == "clarabel"
    assert backend.settings == {"max_iter": 50, "tol_gap_abs": 1e-10}
    assert get_backend(backend) is backend


def test_available_backends_reports_clarabel():
    info = available_backends()["clarabel"]
    assert info.available and info.version and "psd" in info.capabilities.cones


def test_backend_that_cannot_run_says_why():
    class NeedsLicence(ffo_core.backend_base.BackendBase):
        name = "licensed"

        @classmethod
        def availability(cls):
            return False, "no licence found (set LICENSED_LICENSE_FILE)"

    ffo_core.register_backend(NeedsLicence)
    try:
        with pytest.raises(BackendUnavailable, match="cannot run here: no licence found"):
            get_backend("licensed")
        assert not available_backends()["licensed"].available
    finally:
        ffo_core.unregister_backend("licensed")


def test_a_broken_plugin_does_not_break_the_others(monkeypatch):
    eps = [
        importlib.metadata.EntryPoint("broken", "ffo_backends.no_such_module", "ffo"),
        importlib.metadata.EntryPoint("clarabel", "ffo_backends.clarabel", "ffo"),
    ]
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group=None: eps if group == "ffo" else []
    )
    registry = _Registry()
    assert "clarabel" in registry.factories()
    assert "No module named" in registry.broken()["broken"]


def test_cli_backends_table(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "clarabel" in out and "zero,nonneg,soc,exp,psd" in out
