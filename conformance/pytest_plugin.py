"""The conformance suite as pytest tests, for a plugin's CI.

Three ways to use it (NAME is a backend config string, e.g. ``osqp`` or ``"scs:eps_abs=1e-9"``):

1. Run the shipped test package::

       pytest -p ffo_conformance.pytest_plugin --pyargs ffo_conformance.tests --ffo-backend NAME \\
              [--ffo-classes lp,qp] [--ffo-checks ...] [--ffo-json report.json]

   (``-p`` is unnecessary once this module is registered as a ``pytest11`` entry point;
   ``FFO_BACKEND=NAME pytest --pyargs ffo_conformance.tests`` also works, as do
   ``FFO_CLASSES`` and ``FFO_CHECKS``).  One test per (instance, check), run in the
   suite's worker process (a hang or a crash of the backend fails that test, and the others
   go on); skips carry their reason; a failure's message has every measure against its
   tolerance; the terminal
   summary prints the suite's table.  A gradient failure that the suite attributes to
   ffo_core itself (the same FFO through the trusted reference solver fails too) is an
   xfail with that reason, unless ``--ffo-strict`` (or ``FFO_STRICT=1``).

2. In the plugin's own tests, with no command-line option at all::

       from ffo_conformance.pytest_plugin import conformance_test
       test_osqp_conformance = conformance_test("osqp", classes=["lp", "qp"])

3. Any test may request the ``ffo_conformance_case`` argument; this plugin parametrises it
   from ``--ffo-backend`` and the case's ``check()`` runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported lazily: loading the plugin stays cheap
    from .runner import Suite
    from .zoo import Instance

FIXTURE = "ffo_conformance_case"

_SUITES: dict[tuple, object] = {}  # one Suite per (backend, classes, checks, seed)


@dataclass
class Case:
    """One (instance, check) of a suite: ``check()`` runs it and skips/asserts."""

    suite: Suite
    instance: Instance
    check_name: str
    strict: bool = False

    @property
    def id(self) -> str:
        return f"{self.instance.name}-{self.check_name}"

    def run(self):
        return self.suite.run_case(self.instance, self.check_name)

    def check(self):
        result = self.run()
        if result.outcome == "skip":
            pytest.skip(result.reason)
        if result.engine_limited and not self.strict:
            # the same FFO through the trusted reference solver fails too: not the
            # backend's fault, so not its CI's (the CLI still counts it; --ffo-strict)
            pytest.xfail("ffo_core limitation: " + result.describe())
        if result.outcome != "pass":
            pytest.fail(result.describe(), pytrace=False)
        return result


@dataclass
class Unusable:
    """Stands in for the cases of a backend that cannot run: its test fails, saying why."""

    backend: str
    message: str

    def check(self):
        pytest.fail(f"backend {self.backend!r} is unusable: {self.message}", pytrace=False)


def get_suite(backend: str, classes=None, checks=None, seed: int = 0):
    """The (cached) :class:`conformance.Suite` for these settings."""
    from .runner import Suite

    key = (backend, tuple(classes or ()), tuple(checks or ()), seed)
    if key not in _SUITES:
        _SUITES[key] = Suite(backend, classes=classes, checks=checks, seed=seed)
    return _SUITES[key]


def _params(
    backend: str,
    classes=None,
    checks=None,
    seed: int = 0,
    prefix: bool = False,
    strict: bool = False,
):
    from ffo_core.errors import FFOError

    try:
        suite = get_suite(backend, classes, checks, seed)
    except (FFOError, ValueError) as exc:
        return [pytest.param(Unusable(backend, str(exc)), id=f"{backend}-unusable")]
    return [
        pytest.param(case, id=f"{backend}-{case.id}" if prefix else case.id)
        for case in (Case(suite, inst, check, strict) for inst, check in suite.cases())
    ]


def conformance_test(
    backend: str, *, classes=None, checks=None, seed: int = 0, strict: bool = False
):
    """A parametrised test function running the suite on ``backend`` (see module doc).

    Failures the suite attributes to ffo_core itself (``engine_limited``) are xfailed
    unless ``strict``."""

    @pytest.mark.parametrize("case", _params(backend, classes, checks, seed, strict=strict))
    def test_conformance(case):
        case.check()

    test_conformance.__name__ = "test_conformance"
    return test_conformance


# -- pytest hooks -------------------------------------------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("ffo-conformance", "ffo conformance suite")
    group.addoption(
        "--ffo-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="backend config string to run the conformance suite on (repeatable; env FFO_BACKEND)",
    )
    group.addoption(
        "--ffo-classes",
        default=None,
        metavar="LIST",
        help="comma-separated problem classes/variants/groups (env FFO_CLASSES)",
    )
    group.addoption(
        "--ffo-checks", default=None, metavar="LIST", help="comma-separated checks (env FFO_CHECKS)"
    )
    group.addoption("--ffo-seed", default=None, type=int, metavar="N", help="zoo seed")
    group.addoption(
        "--ffo-strict",
        action="store_true",
        default=False,
        help="fail (instead of xfail) gradient checks that the suite attributes "
        "to ffo_core itself (the trusted reference solver fails them too)",
    )
    group.addoption(
        "--ffo-json",
        default=None,
        metavar="PATH",
        help="write the conformance report as JSON (one file per backend: "
        "PATH, or PATH with the backend name inserted)",
    )


def _opt(config, name: str, env: str):
    value = config.getoption(name, default=None)
    if value in (None, [], ""):
        value = os.environ.get(env) or None
        if value is not None and name == "ffo_backend":
            value = [value]
    return value


def pytest_generate_tests(metafunc):
    if FIXTURE not in metafunc.fixturenames:
        return
    from .runner import parse_list

    config = metafunc.config
    backends = _opt(config, "ffo_backend", "FFO_BACKEND") or []
    classes = parse_list(_opt(config, "ffo_classes", "FFO_CLASSES"))
    checks = parse_list(_opt(config, "ffo_checks", "FFO_CHECKS"))
    seed = config.getoption("ffo_seed", default=None) or 0
    strict = bool(config.getoption("ffo_strict", default=False) or os.environ.get("FFO_STRICT"))
    if not backends:
        metafunc.parametrize(
            FIXTURE,
            [
                pytest.param(
                    None,
                    id="no-backend",
                    marks=pytest.mark.skip(
                        reason="no backend given: pass --ffo-backend NAME or set FFO_BACKEND"
                    ),
                )
            ],
        )
        return
    params = []
    for backend in backends:
        params += _params(backend, classes, checks, seed, prefix=len(backends) > 1, strict=strict)
    metafunc.parametrize(FIXTURE, params)


def pytest_unconfigure(config):
    """Stop the suites' worker processes."""
    for suite in _SUITES.values():
        suite.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    used = [s for s in _SUITES.values() if s.results]
    if not used:
        return
    path = config.getoption("ffo_json", default=None)
    for suite in used:
        report = suite.report()
        terminalreporter.section(f"ffo conformance: {suite.spec}")
        terminalreporter.write_line(report.table())
        terminalreporter.write_line("")
        terminalreporter.write_line("tolerances: conformance/tolerances.py")
        from . import tolerances

        for line in tolerances.describe().splitlines():
            terminalreporter.write_line(line)
        if path:
            target = (
                path if len(used) == 1 else f"{os.path.splitext(path)[0]}-{suite.backend.name}.json"
            )
            report.write_json(target)
            terminalreporter.write_line(f"JSON report written to {target}")
