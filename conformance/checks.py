"""The checks: their names in report order, the instances each applies to, and running one.

A check is a function of an :class:`~ffo_conformance.instance.InstanceRun` (the state the
checks of one instance share) that returns its metrics, or ``(metrics, reason)``, or
``(metrics, (reason, engine_limited))``; :func:`run_check` makes a
:class:`~ffo_conformance.results.CheckResult` of that, of a skip or of an exception.  The
checks themselves:

* ``status``, ``solution``, ``warm-start``, ``resolve``, ``deterministic``, ``threads``:
  :mod:`ffo_conformance.checks_solve` (the status of a ``limit`` instance:
  :mod:`ffo_conformance.checks_limits`);
* ``grad-ffo``, ``grad-central``: :mod:`ffo_conformance.checks_gradients`;
* ``solve-batch``: :mod:`ffo_conformance.checks_batch`.

What they measure (residuals, distances, gradient comparison) is defined in
:mod:`ffo_conformance.measures`.  A write into the backend's inputs seen during a check
makes that check fail, whatever it measured (:mod:`ffo_conformance.guard`).

The public names of those modules are importable from here too, e.g.
``from ffo_conformance.checks import residuals, ITERATION_LIMIT_NAMES``.
"""

from __future__ import annotations

import time

from .checks_batch import check_solve_batch
from .checks_gradients import (
    accuracy_note,
    baseline_note,
    check_gradient,
    extra_term_problem,
    gradient_advice,
    solution_problem,
)
from .checks_limits import (
    ITERATION_LIMIT_NAMES,
    check_limit,
    configure,
    iteration_limit_setting,
    limited_backend,
)
from .checks_solve import (
    check_deterministic,
    check_resolve,
    check_solution,
    check_status,
    check_threads,
    check_warm_start,
)
from .guard import InputsModified
from .instance import InstanceRun, copy_sample
from .measures import (
    BLOCKS,
    check_shapes,
    compare_gradients,
    distances,
    dual_hint,
    rel_diff,
    residuals,
)
from .results import CheckResult, Fail, Metric, ReferenceUnavailable, Skip
from .zoo import Instance

__all__ = [
    "APPLICABLE",
    "BLOCKS",
    "CHECKS",
    "ITERATION_LIMIT_NAMES",
    "CheckResult",
    "Fail",
    "InstanceRun",
    "Metric",
    "ReferenceUnavailable",
    "Skip",
    "accuracy_note",
    "applies",
    "baseline_note",
    "capability_skip",
    "check_deterministic",
    "check_gradient",
    "check_limit",
    "check_resolve",
    "check_shapes",
    "check_solution",
    "check_solve_batch",
    "check_status",
    "check_threads",
    "check_warm_start",
    "compare_gradients",
    "configure",
    "copy_sample",
    "distances",
    "dual_hint",
    "extra_term_problem",
    "gradient_advice",
    "iteration_limit_setting",
    "limited_backend",
    "rel_diff",
    "residuals",
    "run_check",
    "solution_problem",
]


#: Check names, in report order.
CHECKS = (
    "status",
    "solution",
    "grad-ffo",
    "grad-central",
    "warm-start",
    "resolve",
    "solve-batch",
    "deterministic",
    "threads",
)

#: The checks each kind of instance (:attr:`ffo_conformance.zoo.Instance.kind`) can run;
#: ``solve-batch`` runs on optimal instances with several samples only (:func:`applies`).
APPLICABLE = {
    "optimal": CHECKS,
    "status": ("status",),
    "limit": ("status",),
    "layer": ("solution", "grad-ffo", "grad-central"),
}


def applies(inst: Instance, check: str) -> bool:
    """Whether ``check`` is meaningful for ``inst`` (else '·' in the table)."""
    if check not in APPLICABLE[inst.kind]:
        return False
    return check != "solve-batch" or len(inst.samples) > 1


def capability_skip(inst: Instance, backend) -> str | None:
    """Why the backend's declared capabilities exclude this instance (None: they do not)."""
    caps = backend.capabilities
    if inst.kind == "layer":
        return None  # FFOLayer itself decides (it compiles for the backend)
    missing = caps.missing_cones(inst.dims, inst.has_equalities)
    if missing:
        return (
            f"capabilities.cones lacks {', '.join(sorted(missing))} "
            f"(has {', '.join(sorted(caps.cones))})"
        )
    if inst.quadratic and not caps.quadratic_objective:
        return (
            "the instance has a quadratic objective and capabilities.quadratic_objective "
            "is False (its layers compile P into a SOC: see the layer instances; the "
            "pure linear instances, tag 'linear', are this backend's)"
        )
    n, rows = inst.size
    if caps.max_variables is not None and n > caps.max_variables:
        return f"{n} variables exceed capabilities.max_variables={caps.max_variables}"
    if caps.max_constraints is not None and rows > caps.max_constraints:
        return f"{rows} rows exceed capabilities.max_constraints={caps.max_constraints}"
    return None


_FUNCS = {
    "status": check_status,
    "solution": check_solution,
    "grad-ffo": lambda run: check_gradient(run, central=False),
    "grad-central": lambda run: check_gradient(run, central=True),
    "warm-start": check_warm_start,
    "resolve": check_resolve,
    "solve-batch": check_solve_batch,
    "deterministic": check_deterministic,
    "threads": check_threads,
}


def run_check(run: InstanceRun, check: str) -> CheckResult:
    """Run one check of one instance; never raises (errors become ``outcome="error"``).

    A check returns its metrics, or ``(metrics, reason)``, or ``(metrics, (reason,
    engine_limited))``.  Whatever happened, a write into the inputs seen during the check
    makes it a failure that says so."""
    inst = run.inst
    result = CheckResult(inst.name, inst.group, check, "pass", profile=inst.profile)
    start = time.perf_counter()
    seen = len(run.backend.violations)
    try:
        reason = capability_skip(inst, run.backend)
        if reason:
            raise Skip(reason)
        out = _FUNCS[check](run)
        if isinstance(out, tuple):
            out, note = out
            if isinstance(note, tuple):  # (reason, engine_limited)
                result.reason, result.engine_limited = note
            else:
                result.reason = note
        result.metrics = out
        if not all(m.ok for m in result.metrics):
            result.outcome = "fail"
        elif result.outcome == "pass" and check != "status":
            result.reason = ""  # notes explain failures only
    except Skip as exc:
        result.outcome, result.reason = "skip", str(exc)
    except (Fail, InputsModified) as exc:
        result.outcome, result.reason = "fail", str(exc)
    except ReferenceUnavailable as exc:
        result.outcome, result.reason = "error", f"reference: {exc}"
    except Exception as exc:  # a backend that raises fails the check, with the error
        result.outcome, result.reason = "error", f"{type(exc).__name__}: {exc}"
    new = run.backend.violations[seen:]
    if new:
        result.outcome, result.engine_limited = "fail", False
        result.reason = new[0] + (f" (and {len(new) - 1} more such writes)" if len(new) > 1 else "")
    result.seconds = time.perf_counter() - start
    return result
