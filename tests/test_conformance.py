"""The conformance suite: it passes on good backends and fails on broken ones.

* clarabel (first party) and osqp (the example plugin in plugins/ffo-osqp, installed with
  pip as a user would) pass on the classes/checks that the engine gets right today;
* every deliberately broken backend below (wrong dual sign, dual scaling, ignored
  extra_linear_term, a race, noise, a fake warm start, a wrong status map, a broken adapter
  registered under the reference's own name, broken solve_batch variants) makes the suite
  FAIL, at the check that should catch it, with the advice that fits: the suite can fail.
  tests/test_conformance_mutants.py has one broken backend per kind of bug, end to end.
* the parts of the suite itself: the zoo (pure LPs, limits), the input guard, the
  ProblemBatches of the solve-batch check, the worker process, the CLI's argument checks,
  and the shared accuracy helper ``ffo_core.accuracy``.

Engine-side failures the suite found and ffo_core has since fixed are kept as regression
cases in FIXED_ENGINE_FAILURES (they must pass now, through both backends).  The full run
(test_full_suite) tolerates no failure, with Clarabel at its *default* tolerances.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ffo_backends.clarabel import ClarabelBackend
from ffo_conformance import Suite, build_zoo
from ffo_conformance.batch import batches
from ffo_conformance.checks import check_shapes, residuals
from ffo_conformance.guard import GuardedBackend, InputsModified
from ffo_conformance.reference import ReferenceSolver
from ffo_conformance.zoo import get_instance, select
from ffo_core import Solution, Status, available_backends
from ffo_core.accuracy import kkt_accuracy, solution_accuracy
from ffo_core.cli import main as ffo_main
from ffo_core.protocol import BatchSolution, Objective

#: (instance, check) pairs that fail because of ffo_core, whatever the backend.
FIXED_ENGINE_FAILURES = {
    (
        "lp-scaled-n10",
        "grad-ffo",
    ): "one-sided FFO truncation error on a badly scaled LP (rel[P] 0.67 even with exact "
    "solves) -- fixed by differentiating the Lagrangian gradient exactly along the "
    "differenced ghost solution",
    ("qp-scaled-n12", "grad-ffo"): "same, badly scaled QP (rel[G] 0.067 with exact solves)",
    (
        "socp-scaled-n10",
        "grad-central",
    ): "central step too large for the SOC's curvature (cos 0.71 with exact solves) -- "
    "fixed by limiting how far a step moves each kept cone block",
}
POLYHEDRAL = ["lp", "qp"]
#: The tests of what the suite judges run it in this process: each Suite saves a worker's
#: start and its import of torch and CVXPY.  The worker process itself is tested by
#: test_worker_process_and_in_process_give_the_same_results, the CLI and pytest-plugin
#: tests, test_full_suite and tests/test_conformance_mutants.py.
HERE = {"isolate": False}
TIGHT_CLARABEL = "clarabel:tol_gap_abs=1e-11,tol_gap_rel=1e-11,tol_feas=1e-11"


def _unexpected(report):
    return [r.describe() for r in report.results if r.failed]


def _failures(report, check=None):
    return [r for r in report.results if r.failed and (check is None or r.check == check)]


# -- the zoo itself -----------------------------------------------------------------------


def test_zoo_size_coverage_and_seeding():
    zoo = build_zoo(0)
    assert len(zoo) >= 45
    assert {i.cls for i in zoo} == {"lp", "qp", "socp", "exp", "sdp"}
    assert {
        "well",
        "batched",
        "scaled",
        "degenerate",
        "infeasible",
        "unbounded",
        "limit",
        "layer",
    } <= {i.variant for i in zoo}
    a, b = build_zoo(0), build_zoo(0)
    for x, y in zip(a, b):
        for s, t in zip(x.samples, y.samples):
            assert np.array_equal(s.g.q, t.g.q) and np.array_equal(s.h.h, t.h.h)
    scaled = [i for i in zoo if i.variant == "scaled"]
    for inst in scaled:
        data = np.abs(inst.samples[0].h.G.data)
        assert data.max() / data.min() > 1e6  # entries span ~1e-4..1e4


def test_pure_linear_instances_are_nondegenerate_vertices_or_curved():
    """The pure LPs have no quadratic term, as many independent active rows (equalities
    included) as variables and multipliers ~1 on them: a unique vertex and unique duals.
    Every cone class has a pure linear instance too (for LP-only conic backends)."""
    zoo = build_zoo(0)
    linear = select(zoo, ["linear"])
    assert {i.cls for i in linear} == {"lp", "socp", "exp", "sdp"}
    assert {"well", "batched", "scaled", "limit"} <= {i.variant for i in linear if i.cls == "lp"}
    for inst in linear:
        assert not inst.quadratic and "linear" in inst.tags
        for smp in inst.samples:
            assert smp.g.P is None
            t = smp.truth
            if inst.cls != "lp" or t is None:  # cones; infeasible/unbounded instances
                continue
            active = np.flatnonzero(t["s"] <= 0)
            assert active.size + smp.e.p == smp.g.n, inst.name
            J = np.vstack([smp.e.A.toarray(), smp.h.G.toarray()[active]])
            assert np.linalg.matrix_rank(J) == smp.g.n, inst.name
            assert t["lam"][active].min() >= (1e-3 if inst.variant == "scaled" else 0.5)
    layer = get_instance("lp-pure-layer").layer
    problem, _, _ = layer.build()
    assert problem.objective.expr.is_affine()  # no quadratic term in the layer either


def test_get_instance_rebuilds_by_name_and_limits_are_set():
    zoo = {i.name: i for i in build_zoo(3)}
    again = get_instance("qp-scaled-n12", seed=3)
    assert np.array_equal(
        again.samples[0].h.G.toarray(), zoo["qp-scaled-n12"].samples[0].h.G.toarray()
    )
    assert {i.limit for i in zoo.values() if i.variant == "limit"} == {"iterations", "time"}
    assert all(i.kind == "limit" for i in zoo.values() if i.variant == "limit")
    with pytest.raises(KeyError, match="no zoo instance"):
        get_instance("no-such-instance")


def test_constructed_truth_satisfies_kkt_and_reference_finds_it():
    """The zoo's KKT constructions are right, and so are the residuals and cone tests
    (checked on the known optimum, with no solver involved), and the reference finds it."""
    ref = ReferenceSolver()
    for inst in build_zoo(0):
        for smp in inst.samples:
            if smp.truth is None:
                continue
            t = smp.truth
            truth = Solution(Status.OPTIMAL, t["y"], t["nu"], t["lam"], t["s"])
            check_shapes(smp, truth)
            assert max(residuals(smp, truth).values()) < 1e-11, inst.name
            sol = ref.solve(smp.g, smp.h, smp.e)
            scale = 1 + np.abs(t["y"]).max()
            assert np.abs(sol.primal - t["y"]).max() / scale < 1e-5, inst.name


# -- good backends pass -------------------------------------------------------------------


def test_clarabel_passes_polyhedral_classes():
    report = Suite("clarabel", classes=POLYHEDRAL, **HERE).run()
    assert not _unexpected(report), "\n".join(_unexpected(report))
    assert report.count("pass") >= 80
    skipped = {r.check for r in report.results if r.outcome == "skip"}
    assert skipped == {"warm-start", "solve-batch"}  # no warm start, no solve_batch
    reasons = {r.reason for r in report.results if r.outcome == "skip"}
    assert any("warm_start is False" in x for x in reasons)
    assert any("no solve_batch" in x for x in reasons)
    limits = [r for r in report.results if r.group.endswith("/limit")]
    assert len(limits) == 4 and all(r.outcome == "pass" for r in limits)
    assert all("iteration_limit ('MaxIterations')" in r.metrics[0].text for r in limits[:1])


def test_clarabel_passes_cone_classes():
    report = Suite("clarabel", classes=["socp", "exp", "sdp"], **HERE).run()
    assert not _unexpected(report), "\n".join(_unexpected(report))
    assert report.count("pass") >= 60


def test_osqp_plugin_is_installed_as_a_user_would_and_passes():
    info = available_backends()["osqp"]
    assert info.available and info.plugin == "osqp"  # found through its entry point
    assert info.capabilities.warm_start and info.capabilities.cones == {"zero", "nonneg"}
    report = Suite("osqp", classes=POLYHEDRAL, **HERE).run()
    assert not _unexpected(report), "\n".join(_unexpected(report))
    assert report.count("pass") >= 130  # warm start checked too, pure LPs included
    assert {r.check for r in report.results if r.outcome == "skip"} == {"solve-batch"}
    resolved = [r for r in report.results if r.check == "resolve"]
    assert resolved and all(r.outcome == "pass" for r in resolved)  # its resolve too


def test_osqp_skips_cones_with_reasons():
    report = Suite("osqp", classes=["socp", "exp", "sdp"], **HERE).run()
    assert report.results and all(r.outcome == "skip" for r in report.results)
    reasons = {r.reason for r in report.results}
    assert any("capabilities.cones lacks soc" in x for x in reasons)
    assert any("does not support the exp cone" in x for x in reasons)  # layer instance
    assert not report.passed  # nothing was checked: not a pass


def test_fixed_engine_failures_stay_fixed():
    for (instance, check), why in FIXED_ENGINE_FAILURES.items():
        for backend in ("clarabel", "osqp"):
            if backend == "osqp" and instance.startswith("socp"):
                continue
            suite = Suite(backend, classes=[instance], checks=[check], **HERE)
            result = suite.run_case(suite.instances[0], check)
            assert result.outcome == "pass", f"{backend}: {why}"


# -- the CLI and the pytest plugin --------------------------------------------------------


def test_cli_exit_codes_table_and_json(tmp_path, capsys):
    path = tmp_path / "report.json"
    rc = ffo_main(
        [
            "conformance",
            "clarabel",
            "--classes",
            "qp/batched,qp/infeasible",
            "--json",
            str(path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "qp/batched" in out and "grad-central" in out and "tolerances" in out
    report = json.loads(path.read_text())
    assert report["passed"] and report["summary"]["fail"] == 0
    assert report["tolerances"]["profiles"]["well"]["grad_rel_central"] > 0
    metric = report["results"][1]["metrics"][0]
    assert {"name", "value", "tol", "ok"} <= set(metric)

    assert ffo_main(["conformance", "no-such-solver", "--no-progress"]) == 2
    assert "unknown solver" in capsys.readouterr().err
    assert ffo_main(["conformance", "clarabel", "--classes", "nope"]) == 2
    assert ffo_main(["conformance", "clarabel", "--timeout", "0"]) == 2


def test_cli_json_into_a_missing_folder_is_created_and_unwritable_fails_first(tmp_path, capsys):
    path = tmp_path / "new" / "deeper" / "r.json"
    rc = ffo_main(
        [
            "conformance",
            "clarabel",
            "--classes",
            "qp-interior-n6",
            "--no-progress",
            "--checks",
            "status",
            "--json",
            str(path),
        ]
    )
    assert rc == 0 and json.loads(path.read_text())["passed"]
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    start = time.perf_counter()
    rc = ffo_main(["conformance", "clarabel", "--no-progress", "--json", str(blocker / "r.json")])
    captured = capsys.readouterr()
    assert rc == 2 and "cannot be written" in captured.err
    assert "checks:" not in captured.out  # refused before the run, not after it
    assert time.perf_counter() - start < 5


class LazySettings:
    """Clarabel called directly; settings are stored as given and only used (and so only
    refused) by the solve -- a plugin that does not check values at construction."""

    name = "lazy-settings"
    capabilities = ClarabelBackend.capabilities

    def __init__(self, **settings):
        self.settings = settings

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        import clarabel

        settings = clarabel.DefaultSettings()
        for key, value in self.settings.items():
            setattr(settings, key, value)  # TypeError / OverflowError for a bad value
        return ClarabelBackend(verbose=False).solve(g, h, e, extra_linear_term)


def test_cli_bad_value_found_by_a_trial_solve(registered, capsys):
    """A backend whose constructor lets a bad value through: one trial solve up front, and
    the solve without each setting, name it (exit 2) before any check runs."""
    name = registered(LazySettings)
    rc = ffo_main(["conformance", f"{name}:tol_feas=1e-9,max_iter=abc", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "checks:" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "setting max_iter='abc' (parsed as str)" in lines[0], lines
    assert (
        ffo_main(
            [
                "conformance",
                f"{name}:tol_feas=1e-9",
                "--classes",
                "qp-interior-n6",
                "--checks",
                "status",
                "--no-progress",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "spec, setting",
    [
        ("scs:eps_abs=abc", "eps_abs"),
        ("clarabel:max_iter=-3", "max_iter"),
        ("osqp:eps_rel=1e-9,eps_abs=abc", "eps_abs"),
    ],
)
def test_cli_bad_setting_value_exits_2_naming_it(spec, setting, capsys):
    """A value the backend refuses: exit 2 with one message naming the setting (from the
    constructor, or from the suite's trial solve), instead of a run of hundreds of errors."""
    start = time.perf_counter()
    rc = ffo_main(["conformance", spec, "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2, captured.out[-2000:]
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and f"setting {setting}=" in lines[0], captured.err
    assert "checks:" not in captured.out
    assert time.perf_counter() - start < 30


def test_pytest_plugin_runs_the_suite(tmp_path):
    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "ffo_conformance.pytest_plugin",
        "--pyargs",
        "ffo_conformance.tests",
        "--ffo-backend",
        "osqp",
        "--ffo-classes",
        "qp/batched",
        "-q",
        "-p",
        "no:cacheprovider",
        "--ffo-json",
        str(tmp_path / "r.json"),
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 passed" in out.stdout and "ffo conformance: osqp" in out.stdout  # resolve too
    assert json.loads((tmp_path / "r.json").read_text())["passed"]


# -- broken backends fail -----------------------------------------------------------------


class FlippedDuals(ClarabelBackend):
    """ineq_dual with the wrong sign (a classic adapter bug)."""

    name = "broken-flipped-duals"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        sol = super().solve(g, h, e, extra_linear_term, warm_start=warm_start)
        if sol.ineq_dual is not None:
            sol.ineq_dual = -sol.ineq_dual
        return sol


class ScaledDuals(ClarabelBackend):
    """Both duals scaled by 2 (a solver whose Lagrangian has a factor 1/2)."""

    name = "broken-scaled-duals"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        sol = super().solve(g, h, e, extra_linear_term, warm_start=warm_start)
        if sol.ineq_dual is not None:
            sol.ineq_dual, sol.eq_dual = 2 * sol.ineq_dual, 2 * sol.eq_dual
        return sol


class IgnoresExtraTerm(ClarabelBackend):
    """Forward solves are perfect; the ghost's extra_linear_term is dropped."""

    name = "broken-ignores-extra-term"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        return super().solve(g, h, e, None, warm_start=warm_start)


class Racy(ClarabelBackend):
    """Declares thread_safe (inherited) but keeps the problem on the instance."""

    name = "broken-racy"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        self._problem = (g, h, e, extra_linear_term)
        time.sleep(0.002)
        return super().solve(*self._problem, warm_start=warm_start)


class Noisy(ClarabelBackend):
    """Drifts by 1e-9 (relative) from call to call, far below its tolerance: not
    deterministic (a drift, not random noise, so the check cannot pass by chance)."""

    name = "broken-noisy"
    calls = itertools.count(1)

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        sol = super().solve(g, h, e, extra_linear_term, warm_start=warm_start)
        if sol.primal is not None:
            sol.primal = sol.primal * (1 + 1e-9 * next(self.calls))
        return sol


def _fake_warm_start_class():
    from ffo_osqp import OSQPBackend

    class FakeWarmStart(OSQPBackend):
        """Returns the warm-start point as if it were the solution."""

        name = "broken-fake-warm-start"

        def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
            if warm_start is not None and warm_start.status.has_solution:
                return warm_start
            return super().solve(g, h, e, extra_linear_term)

    return FakeWarmStart


class WrongStatus(ClarabelBackend):
    """Maps 'infeasible' to a generic numerical error."""

    name = "broken-status"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        sol = super().solve(g, h, e, extra_linear_term, warm_start=warm_start)
        if sol.status in (Status.INFEASIBLE, Status.INFEASIBLE_INACCURATE):
            sol.status = Status.NUMERICAL_ERROR
        return sol


@pytest.mark.parametrize(
    "cls, classes, checks, must_fail",
    [
        (
            FlippedDuals,
            ["qp-eq-ineq-n12", "qp-scaled-n12"],
            None,
            {"solution", "grad-ffo", "grad-central"},
        ),
        (
            ScaledDuals,
            ["qp-eq-ineq-n12", "lp-scaled-n10"],
            None,
            {"solution", "grad-ffo", "grad-central"},
        ),
        (IgnoresExtraTerm, ["qp-eq-ineq-n12"], None, {"grad-ffo", "grad-central"}),
        (Racy, ["qp-batch4"], ["threads"], {"threads"}),
        (Noisy, ["qp-eq-ineq-n12"], ["deterministic"], {"deterministic"}),
        (WrongStatus, ["infeasible"], ["status"], {"status"}),
    ],
    ids=lambda v: v.name if isinstance(v, type) else None,
)
def test_broken_backend_fails_the_suite(registered, cls, classes, checks, must_fail):
    name = registered(cls)
    report = Suite(name, classes=classes, checks=checks, **HERE).run()
    assert not report.passed
    failed = {r.check for r in _failures(report)}
    assert must_fail <= failed, report.text()
    # never blamed on the engine, even where the engine has a known limitation too
    assert not [r for r in _failures(report) if r.engine_limited], report.text()
    if cls is IgnoresExtraTerm:  # the forward is perfect: only the backward fails
        assert not [r for r in _failures(report) if r.check in ("solution", "status")]


def test_fake_warm_start_fails(registered):
    name = registered(_fake_warm_start_class())
    report = Suite(name, classes=["qp-eq-ineq-n12"], checks=["warm-start"], **HERE).run()
    assert [r.check for r in _failures(report)] == ["warm-start"]


def test_broken_backend_fails_through_the_cli(registered, capsys):
    name = registered(FlippedDuals)
    rc = ffo_main(["conformance", name, "--classes", "qp-eq-ineq-n12", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "dual_res" in out


def test_broken_adapter_named_clarabel_cannot_corrupt_the_reference(registered):
    """The reference calls the clarabel package directly: a broken backend registered
    under the name 'clarabel' is still judged against the truth."""

    class Impostor(FlippedDuals):
        name = "clarabel"

    registered(Impostor)
    report = Suite("clarabel", classes=["qp-eq-ineq-n12"], checks=["solution"], **HERE).run()
    assert not report.passed and _failures(report, "solution")


# -- the full run -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["clarabel", TIGHT_CLARABEL, "osqp"])
def test_full_suite(backend):
    """Every class and check, in the worker process: no failure.  (.ci/conformance runs the
    same through the command on every first-party backend.)"""
    report = Suite(backend).run()
    unexpected = _unexpected(report)
    assert not unexpected, "\n".join(unexpected)
    assert not [r for r in report.results if r.outcome == "error"]


class StaleResolve(ClarabelBackend):
    """Reuses its kept solver for any previous answer, whatever the problem now is."""

    name = "broken-stale-resolve"

    def resolve(self, previous, g, h, e, extra_linear_term):
        from ffo_backends.clarabel import _KEPT

        kept = previous.info.extra.get(_KEPT) if previous is not None else None
        if kept is None:
            return self.solve(g, h, e, extra_linear_term)
        return super().resolve(previous, kept.g, kept.h, kept.e, extra_linear_term)


class ResolveIgnoresTerm(ClarabelBackend):
    """Answers resolve with the previous solution, as if the term had not changed."""

    name = "broken-resolve-ignores-term"

    def resolve(self, previous, g, h, e, extra_linear_term):
        return previous if previous is not None else self.solve(g, h, e, extra_linear_term)


@pytest.mark.parametrize("cls", [StaleResolve, ResolveIgnoresTerm], ids=lambda c: c.name)
def test_broken_resolve_fails_the_resolve_check(registered, cls):
    """Clarabel's own resolve passes the check; one that reuses a solver set up for other
    data, or ignores the new term, fails it."""
    good = Suite("clarabel", classes=["qp-eq-ineq-n12", "socp"], checks=["resolve"], **HERE).run()
    assert good.passed and good.count("pass") >= 2, good.text()
    name = registered(cls)
    report = Suite(name, classes=["qp-eq-ineq-n12"], checks=["resolve"], **HERE).run()
    assert [r.check for r in _failures(report)] == ["resolve"], report.text()


# -- the parts of the suite ---------------------------------------------------------------


class WritesIntoQ(ClarabelBackend):
    """Negates q in place, solves the negated problem's negation... and never restores."""

    name = "broken-writes-q"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        sol = super().solve(g, h, e, extra_linear_term, warm_start=warm_start)
        g.q *= 1.0 + 1e-3  # "scaling for the solver", left behind
        return sol


def test_guard_detects_restores_and_names_the_array():
    smp = get_instance("qp-eq-ineq-n12").samples[0]
    before = smp.g.q.copy()
    guarded = GuardedBackend(WritesIntoQ())
    with pytest.raises(InputsModified, match=r"Objective\.q changed in 12 of 12 entries"):
        guarded.solve(smp.g, smp.h, smp.e)
    assert np.array_equal(smp.g.q, before)  # restored: later measures see the true data
    assert len(guarded.violations) == 1
    clean = GuardedBackend(ClarabelBackend())
    assert clean.solve(smp.g, smp.h, smp.e).status is Status.OPTIMAL and not clean.violations
    assert getattr(clean, "solve_batch", None) is None  # only what the backend has
    assert callable(clean.resolve) and callable(clean.with_settings)


def test_accuracy_helper_matches_the_suites_residuals():
    """ffo_core.accuracy (what plugins report as SolveInfo.accuracy) and the suite's own
    residuals are independent implementations of one definition: they agree on every zoo
    answer, and both see a flipped dual."""
    backend = ClarabelBackend()
    for inst in build_zoo(0):
        for smp in inst.samples:
            sol = backend.solve(smp.g, smp.h, smp.e)
            if not sol.status.has_solution:
                assert solution_accuracy(smp.g, smp.h, smp.e, sol) is None
                continue
            mine = solution_accuracy(smp.g, smp.h, smp.e, sol, floor=0.0)
            suite = max(residuals(smp, sol).values())
            assert mine == pytest.approx(suite, rel=1e-6, abs=1e-15), inst.name
    smp = get_instance("socp-n10").samples[0]
    sol = backend.solve(smp.g, smp.h, smp.e)
    flipped = kkt_accuracy(smp.g, smp.h, smp.e, sol.primal, sol.eq_dual, -sol.ineq_dual, sol.slack)
    assert flipped > 0.1
    t = np.ones(smp.g.n)  # the extra linear term counts in the dual residual
    assert (
        kkt_accuracy(smp.g, smp.h, smp.e, sol.primal, sol.eq_dual, sol.ineq_dual, sol.slack, t)
        > 0.1
    )


def test_batches_share_values_and_have_absent_rows():
    inst = get_instance("qp-batch4")
    cases = {c.label: c for c in batches(inst.samples)}
    assert set(cases) == {"samples", "shared", "shared-rhs", "absent"}
    shared = cases["shared"].batch
    assert shared.G_values.shape[0] == shared.q.shape[0] == 1 and shared.h.shape[0] == 4
    assert cases["shared"].extra.shape == (4, inst.samples[0].g.n)
    absent = cases["absent"]
    for k in range(4):
        g, h, e = absent.batch.sample(k)
        for i in absent.absent_ineq[k]:
            assert not h.G.toarray()[i].any() and h.h[i] >= 0
        for i in absent.absent_eq[k]:
            assert not e.A.toarray()[i].any() and e.b[i] == 0
    assert any(len(a) for a in absent.absent_eq) and any(len(a) > 1 for a in absent.absent_ineq)
    # sample k of "samples" is the instance's own sample k (union pattern, same values)
    g, h, e = cases["samples"].batch.sample(2)
    assert np.array_equal(h.G.toarray(), inst.samples[2].h.G.toarray())
    assert np.array_equal(g.P.toarray(), inst.samples[2].g.P.toarray())


def _stack(sols, batch) -> BatchSolution:
    def rows(name, size):
        return np.array(
            [getattr(s, name) if s.status.has_solution else np.full(size, np.nan) for s in sols]
        )

    return BatchSolution(
        [s.status for s in sols],
        rows("primal", batch.n),
        rows("eq_dual", batch.p),
        rows("ineq_dual", batch.m),
        rows("slack", batch.m),
        [s.info for s in sols],
    )


class LoopBatch(ClarabelBackend):
    """An honest solve_batch: Clarabel on every batch.sample(k)."""

    name = "loop-batch"

    def solve_batch(self, batch, extra_linear_term=None):
        sols = [
            self.solve(
                *batch.sample(k), None if extra_linear_term is None else extra_linear_term[k]
            )
            for k in range(batch.batch)
        ]
        return _stack(sols, batch)


class BatchIgnoresTerm(LoopBatch):
    name = "broken-batch-ignores-term"

    def solve_batch(self, batch, extra_linear_term=None):
        return super().solve_batch(batch, None)


class BatchFirstQ(LoopBatch):
    """Reads q of sample 0 for every sample (a broadcasting slip)."""

    name = "broken-batch-first-q"

    def solve_batch(self, batch, extra_linear_term=None):
        sols = []
        for k in range(batch.batch):
            g, h, e = batch.sample(k)
            g = Objective(g.P, np.asarray(batch.q[0], float))
            t = None if extra_linear_term is None else extra_linear_term[k]
            sols.append(self.solve(g, h, e, t))
        return _stack(sols, batch)


class BatchDropsAbsentRows(LoopBatch):
    """Removes absent inequality rows before solving and reinserts them with slack 0 (the
    slack of an absent row is h_i)."""

    name = "broken-batch-absent-rows"

    def solve_batch(self, batch, extra_linear_term=None):
        from ffo_core.protocol import ConeConstraints, ConeDims

        sols = []
        for k in range(batch.batch):
            g, h, e = batch.sample(k)
            nn = h.dims.nonneg
            dense = h.G.toarray()
            keep = np.array([i >= nn or dense[i].any() for i in range(h.m)])
            dims = ConeDims(int(keep[:nn].sum()), h.dims.soc, h.dims.exp, h.dims.psd)
            small = ConeConstraints(type(h.G)(dense[keep]), h.h[keep], dims)
            t = None if extra_linear_term is None else extra_linear_term[k]
            sol = self.solve(g, small, e, t)
            if sol.status.has_solution:
                lam, s = np.zeros(h.m), np.zeros(h.m)
                lam[keep], s[keep] = sol.ineq_dual, sol.slack
                sol = Solution(sol.status, sol.primal, sol.eq_dual, lam, s, sol.info)
            sols.append(sol)
        return _stack(sols, batch)


BATCHED = ["lp-batch4", "lp-pure-batch4", "qp-batch4", "socp-batch3", "exp-batch3", "sdp-batch3"]


def test_solve_batch_check_passes_an_honest_batched_backend(registered):
    name = registered(LoopBatch)
    report = Suite(name, classes=BATCHED, checks=["solve-batch"], **HERE).run()
    assert report.passed and report.count("pass") == len(BATCHED), report.text()
    for r in report.results:
        assert "shared-rhs" in r.metrics[-1].text and "absent" in r.metrics[-1].text
        dists = [m.value for m in r.metrics if m.name.startswith("dist")]
        assert len(dists) == 3 and max(dists) == 0.0  # the very same solves
    # non-batched instances have no solve-batch column; Clarabel itself skips it, saying why
    plain = Suite(
        "clarabel", classes=["qp-eq-ineq-n12", "qp-batch4"], checks=["solve-batch"], **HERE
    )
    assert [(i.name, c) for i, c in plain.cases()] == [("qp-batch4", "solve-batch")]
    skipped = plain.run().results[0]
    assert skipped.outcome == "skip" and "no solve_batch" in skipped.reason


@pytest.mark.parametrize(
    "cls, where",
    [
        (BatchIgnoresTerm, "dist_"),
        (BatchFirstQ, "dist_"),
        (BatchDropsAbsentRows, "dist_slack"),
    ],
    ids=lambda v: v.name if isinstance(v, type) else None,
)
def test_solve_batch_check_fails_broken_batched_backends(registered, cls, where):
    name = registered(cls)
    report = Suite(
        name, classes=["qp-batch4", "lp-pure-batch4"], checks=["solve-batch"], **HERE
    ).run()
    assert not report.passed
    failed = _failures(report, "solve-batch")
    assert failed, report.text()
    assert any(where in m.name for r in failed for m in r.metrics if not m.ok), report.text()


def test_gradient_advice_matches_the_failure(registered):
    """A gradient failure says the solution check already fails (flipped duals), or that the
    extra linear term is mishandled -- not "tighten tolerances"; a status failure shows
    the solver's own status word."""
    flipped = registered(FlippedDuals)
    report = Suite(
        flipped, classes=["qp-eq-ineq-n12"], checks=["solution", "grad-central"], **HERE
    ).run()
    grad = _failures(report, "grad-central")[0]
    assert "the solution check fails on this instance too" in grad.reason
    assert "tighten" not in grad.reason
    sol = _failures(report, "solution")[0]
    assert "ineq_dual negated?" in sol.reason  # the hint under the residuals
    ignores = registered(IgnoresExtraTerm)
    report = Suite(
        ignores, classes=["qp-eq-ineq-n12", "lp-layer"], checks=["grad-ffo"], **HERE
    ).run()
    for r in _failures(report, "grad-ffo"):
        assert "mishandles extra_linear_term" in r.reason, r.reason
    assert len(_failures(report, "grad-ffo")) == 2
    wrong = registered(WrongStatus)
    report = Suite(wrong, classes=["lp-infeasible"], checks=["status"], **HERE).run()
    assert "numerical_error ('PrimalInfeasible')" in report.results[0].metrics[0].text


def test_worker_process_and_in_process_give_the_same_results():
    classes = ["qp-batch4", "lp-pure-vertex-n8", "qp-iter-limit"]
    isolated = Suite("clarabel", classes=classes)
    assert isolated.isolation.startswith("a worker process")
    inproc = Suite("clarabel", classes=classes, isolate=False)
    a, b = isolated.run(), inproc.run()
    assert [(r.instance, r.check, r.outcome) for r in a.results] == [
        (r.instance, r.check, r.outcome) for r in b.results
    ]
    assert a.passed and "isolation: a worker process" in a.text()
    assert isolated._worker is None  # run() stops its worker


def test_unpicklable_backend_runs_in_process_and_says_so():
    class Local(ClarabelBackend):  # defined in a function: cannot be sent to a worker
        name = "local-clarabel"

    suite = Suite(Local(), classes=["qp-interior-n6"], checks=["status"])
    assert suite.isolation.startswith("off (the backend cannot be sent")
    report = suite.run()
    assert report.passed and "isolation: off" in report.text()
