"""A mutation test of the conformance suite: backends with one deliberate bug each.

Each class below is a working backend (Clarabel underneath) with exactly one bug of a kind
that plugin authors have written: an LP-only adapter whose duals have the wrong sign, one
that writes into its inputs, one that reports an iteration or time limit as "optimal", one
that shares a module-level buffer between threads, one with the PSD triangle in the wrong
order, one that drops the extra linear term, one that hangs in one group, and one that
crashes the process when two threads call it at once.  The suite must fail every one of
them with a report -- exit status 1 and its summary line, within 5 minutes -- never hang,
never crash.

The default run checks each mutant on the instances and checks that catch it (the suite's
Python API, with its worker process, a few seconds each); the slow run (``-m slow``) runs
the whole suite on each one through the ``ffo conformance`` command, as a plugin author
would, with the default per-check timeout.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from typing import ClassVar

import numpy as np
import pytest

from ffo_backends.clarabel import ClarabelBackend
from ffo_conformance import Suite
from ffo_core import Solution, Status
from ffo_core.backend_base import linear_cost
from ffo_core.protocol import Capabilities, ConeConstraints, Objective, SolveInfo

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the mutants --------------------------------------------------------------------------


class LPOnlyFlippedDuals(ClarabelBackend):
    """An LP-only backend (no quadratic objective) whose inequality duals have the wrong
    sign: only the pure linear instances reach it."""

    name = "mutant-lp-only-flipped-duals"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg"}), quadratic_objective=False, thread_safe=True
    )

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        c = linear_cost(g, extra_linear_term, self.name)  # refuses a quadratic term
        sol = super().solve(Objective(None, c), h, e)
        if sol.ineq_dual is not None:
            sol.ineq_dual = -sol.ineq_dual
        return sol


class MutatesInputs(ClarabelBackend):
    """Normalises the rows of G and h in place "for the solver" and never undoes it."""

    name = "mutant-mutates-inputs"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        if h.m:
            scale = np.maximum(np.abs(h.G).max(axis=1).toarray().ravel(), 1e-12)
            h.h /= scale
            h.G.data /= scale[h.G.indices]
        return super().solve(g, h, e, extra_linear_term, warm_start=warm_start)


class MiniClarabel:
    """A small Clarabel adapter written from docs/plugins.md, bug-free (the base of the
    status-map mutant; it uses no adapter internals)."""

    name = "mini-clarabel"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp", "psd"}), thread_safe=True
    )
    STATUS: ClassVar[dict] = {
        "Solved": Status.OPTIMAL,
        "AlmostSolved": Status.OPTIMAL_INACCURATE,
        "PrimalInfeasible": Status.INFEASIBLE,
        "DualInfeasible": Status.UNBOUNDED,
        "MaxIterations": Status.ITERATION_LIMIT,
        "MaxTime": Status.TIME_LIMIT,
    }

    def __init__(self, **settings) -> None:
        self.settings = settings

    def setting_names(self):
        import clarabel

        return [a for a in dir(clarabel.DefaultSettings()) if not a.startswith("_")]

    def with_settings(self, **settings):
        return type(self)(**{**self.settings, **settings})

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        import clarabel
        import scipy.sparse as sp

        n = g.n
        P = sp.triu(g.P, format="csc") if g.P is not None else sp.csc_matrix((n, n))
        q = g.q if extra_linear_term is None else g.q + extra_linear_term
        d = h.dims
        cones = [clarabel.ZeroConeT(e.p)] if e.p else []
        cones += [clarabel.NonnegativeConeT(d.nonneg)] if d.nonneg else []
        cones += [clarabel.SecondOrderConeT(k) for k in d.soc]
        cones += [clarabel.ExponentialConeT() for _ in range(d.exp)]
        cones += [clarabel.PSDTriangleConeT(k) for k in d.psd]
        settings = clarabel.DefaultSettings()
        settings.verbose = False
        for key, value in self.settings.items():
            setattr(settings, key, value)
        A = sp.vstack([e.A, h.G], format="csc")
        res = clarabel.DefaultSolver(P, q, A, np.concatenate([e.b, h.h]), cones, settings).solve()
        raw = str(res.status)
        status = self.STATUS.get(raw, Status.NUMERICAL_ERROR)
        info = SolveInfo(iterations=int(res.iterations), accuracy=1e-8, raw_status=raw)
        if not status.has_solution:
            return Solution(status, info=info)
        z, s = np.asarray(res.z), np.asarray(res.s)
        return Solution(status, np.asarray(res.x), z[: e.p], z[e.p :], s[e.p :], info)


class LimitAsOptimal(MiniClarabel):
    """Maps Clarabel's iteration and time limits to OPTIMAL (and hands out the iterate)."""

    name = "mutant-limit-as-optimal"
    STATUS: ClassVar[dict] = {
        **MiniClarabel.STATUS,
        "MaxIterations": Status.OPTIMAL,
        "MaxTime": Status.OPTIMAL,
    }


_BUFFER = np.zeros(4096)  # one per process: shared by every thread


class SharedBuffer(ClarabelBackend):
    """Declares thread_safe (inherited) but passes q through a module-level buffer."""

    name = "mutant-shared-buffer"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        n = g.n
        q = g.q if extra_linear_term is None else g.q + extra_linear_term
        _BUFFER[:n] = q
        time.sleep(0.002)  # anything that lets another thread in
        return super().solve(Objective(g.P, _BUFFER[:n].copy()), h, e)


def _row_major(k: int) -> np.ndarray:
    """Protocol svec positions (upper triangle by columns) listed row by row."""
    index, pos = {}, 0
    for j in range(k):
        for i in range(j + 1):
            index[(i, j)] = pos
            pos += 1
    return np.array([index[(i, j)] for i in range(k) for j in range(i, k)])


class WrongPSDLayout(ClarabelBackend):
    """Hands the PSD blocks to the solver with the triangle read row by row instead of
    column by column (and converts the answer back the same wrong way)."""

    name = "mutant-psd-row-major"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        if not h.dims.psd:
            return super().solve(g, h, e, extra_linear_term, warm_start=warm_start)
        perm = np.arange(h.m)
        start = h.dims.rows - sum(k * (k + 1) // 2 for k in h.dims.psd)
        for k in h.dims.psd:
            rows = k * (k + 1) // 2
            perm[start : start + rows] = start + _row_major(k)
            start += rows
        moved = ConeConstraints(h.G[perm], h.h[perm], h.dims)
        sol = super().solve(g, moved, e, extra_linear_term, warm_start=warm_start)
        if sol.status.has_solution:
            back = np.argsort(perm)
            sol.ineq_dual, sol.slack = sol.ineq_dual[back], sol.slack[back]
        return sol


class DropsExtraTerm(ClarabelBackend):
    """Forward solves are right; the ghost problems' extra_linear_term is dropped."""

    name = "mutant-drops-extra-term"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        return super().solve(g, h, e, None, warm_start=warm_start)

    def resolve(self, previous, g, h, e, extra_linear_term):
        return self.solve(g, h, e, None)


class HangsOnTwoPSDBlocks(ClarabelBackend):
    """Sleeps forever on problems with two PSD blocks (one instance, in group sdp)."""

    name = "mutant-hangs"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        if len(h.dims.psd) == 2:
            while True:
                time.sleep(3600)
        return super().solve(g, h, e, extra_linear_term, warm_start=warm_start)


_IN_SOLVE = threading.Lock()


class CrashesWhenShared(ClarabelBackend):
    """One solver object for all threads: a second concurrent call crashes the process
    (a segmentation fault, as a native solver's would)."""

    name = "mutant-crashes"

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        if not _IN_SOLVE.acquire(blocking=False):
            ctypes.string_at(0)  # SIGSEGV
        try:
            time.sleep(0.002)
            return super().solve(g, h, e, extra_linear_term, warm_start=warm_start)
        finally:
            _IN_SOLVE.release()


class CrashesWhenMadeElsewhere(ClarabelBackend):
    """Crashes when it is made in another process than the test's (the worker): the
    suite must not fall back to running it in its own process."""

    name = "mutant-crashes-when-made"

    def __init__(self, **settings):
        if os.environ.get("FFO_MUTANT_PARENT", str(os.getpid())) != str(os.getpid()):
            ctypes.string_at(0)
        super().__init__(**settings)


#: mutant -> (instances and checks that catch it, the check that must fail, what the
#: report must say)
MUTANTS = {
    LPOnlyFlippedDuals: (["lp-pure-vertex-n8"], ["solution"], "solution", "ineq_dual negated"),
    MutatesInputs: (["qp-eq-ineq-n12"], ["solution"], "solution", "wrote into its inputs"),
    LimitAsOptimal: (["limit"], ["status"], "status", "a limit stop reported as an optimum"),
    SharedBuffer: (["lp-pure-batch4"], ["threads"], "threads", "solution_rel_diff"),
    WrongPSDLayout: (["sdp-n10"], ["solution"], "solution", "dist_primal"),
    DropsExtraTerm: (["qp-eq-ineq-n12"], ["grad-ffo"], "grad-ffo", "mishandles extra_linear_term"),
    HangsOnTwoPSDBlocks: (["sdp"], ["status", "solution"], "status", "timed out after"),
    CrashesWhenShared: (["qp-batch4"], ["threads"], "threads", "SIGSEGV"),
}


# -- the default run: each mutant where it is caught ----------------------------------------


@pytest.mark.parametrize(
    "cls", [c for c in MUTANTS if c is not HangsOnTwoPSDBlocks], ids=lambda c: c.name
)
def test_the_suite_fails_each_mutant_with_a_report(registered, cls):
    """(The hang has its own test below.)"""
    classes, checks, failing, says = MUTANTS[cls]
    name = registered(cls)
    start = time.perf_counter()
    report = Suite(name, classes=classes, checks=checks).run()
    text = report.text()
    assert not report.passed
    assert text.splitlines()[-1].endswith("-> FAIL"), text
    bad = [r for r in report.results if r.failed and r.check == failing]
    assert bad, text
    described = "\n".join(r.describe() for r in bad)
    assert says in described, text
    assert not any(r.engine_limited for r in report.results)  # never blamed on ffo_core
    assert time.perf_counter() - start < 120


def test_a_hang_is_an_error_of_its_group_and_the_rest_still_runs(registered):
    """The hang mutant, with a 4 s timeout (the slow test below uses the default 60 s)."""
    name = registered(HangsOnTwoPSDBlocks)
    report = Suite(
        name, classes=["sdp", "qp-interior-n6"], checks=["status", "solution"], timeout=4.0
    ).run()
    by = {(r.instance, r.check): r for r in report.results}
    hung = by[("sdp-two-blocks-n14", "status")]
    assert hung.outcome == "error" and "in group sdp" in hung.reason
    skipped = by[("sdp-two-blocks-n14", "solution")]
    assert skipped.outcome == "error" and "not run: group sdp hung" in skipped.reason
    assert by[("sdp-batch3", "status")].outcome == "pass"  # another group: a fresh worker
    assert by[("qp-interior-n6", "solution")].outcome == "pass"
    assert "ERROR" in report.table() and not report.passed
    assert report.text().splitlines()[-1].endswith("-> FAIL")


def test_a_crash_is_an_error_and_the_run_goes_on(registered):
    name = registered(CrashesWhenShared)
    report = Suite(name, classes=["qp-batch4"], checks=["status", "threads", "solution"]).run()
    by = {r.check: r for r in report.results}
    assert by["threads"].outcome == "error"
    assert "crashed the worker process (signal 11 (SIGSEGV))" in by["threads"].reason
    # the worker's stderr: the crash, and the stack of the thread that crashed
    assert "Fatal Python error: Segmentation fault" in by["threads"].reason
    assert "in solve" in by["threads"].reason
    assert by["status"].outcome == "pass" and by["solution"].outcome == "pass"


def test_a_backend_that_crashes_the_worker_on_start_is_reported(registered, monkeypatch):
    monkeypatch.setenv("FFO_MUTANT_PARENT", str(os.getpid()))
    name = registered(CrashesWhenMadeElsewhere)
    report = Suite(name, classes=["qp-interior-n6"], checks=["status", "solution"]).run()
    assert [r.outcome for r in report.results] == ["error", "error"]
    assert "the worker process died while making the backend: signal 11" in (
        report.results[0].reason
    )
    assert report.text().splitlines()[-1].endswith("-> FAIL")


def test_good_backends_pass_the_cases_that_catch_the_mutants():
    """The same instances and checks pass with Clarabel itself and with the mutants' bug-free
    base: every failure above is the mutant's bug."""
    instances = sorted({c for classes, *_ in MUTANTS.values() for c in classes})
    checks = ["status", "solution", "grad-ffo", "threads"]
    report = Suite("clarabel", classes=instances, checks=checks).run()
    assert report.passed, report.text()
    report = Suite(MiniClarabel(), classes=["limit"], checks=["status"]).run()
    assert report.passed and report.count("pass") == 5, report.text()


# -- the slow run: the whole suite, through the command ------------------------------------


def _cli(cls, *args, timeout=300):
    code = (
        "import sys; sys.path.insert(0, {here!r}); import test_conformance_mutants as m; "
        "from ffo_core import register_backend; register_backend(m.{cls}); "
        "from ffo_conformance.cli import main; sys.exit(main({args!r}))"
    ).format(here=HERE, cls=cls.__name__, args=[cls.name, "--no-progress", *args])
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.parametrize("cls", list(MUTANTS), ids=lambda c: c.name)
def test_ffo_conformance_fails_each_mutant_within_5_minutes(cls, tmp_path):
    _, _, failing, says = MUTANTS[cls]
    path = tmp_path / "report.json"
    start = time.perf_counter()
    out = _cli(cls, "--json", str(path))
    seconds = time.perf_counter() - start
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    summary = [line for line in out.stdout.splitlines() if line.endswith("-> FAIL")]
    assert len(summary) == 1 and " checks: " in summary[0], out.stdout[-3000:]
    assert says in out.stdout, out.stdout[-5000:]
    report = json.loads(path.read_text())
    assert not report["passed"]
    assert any(
        r["check"] == failing and r["outcome"] in ("fail", "error") for r in report["results"]
    )
    assert seconds < 300
