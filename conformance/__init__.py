"""ffo's conformance suite: prove a backend's solutions and layer gradients right.

Ships inside the ``ffo`` wheel, so a plugin author runs it on their own solver with no
checkout of this repository::

    ffo conformance NAME                      # any installed backend, config strings allowed
    ffo conformance "osqp:eps_abs=1e-9" --classes lp,qp --json report.json

or from Python (:func:`run_suite`), or under pytest (:mod:`ffo_conformance.pytest_plugin`).

What it checks, per instance of a seeded problem zoo (:mod:`ffo_conformance.zoo`; rebuild
one by name with :func:`get_instance`): statuses (limits included), solution quality
(residuals computed from the returned ``Solution``, distance to a trusted reference), FFO
gradients (default and central) against KKT implicit differentiation per data block /
parameter, warm start, ``resolve``, ``solve_batch``, repeated-call determinism and thread
safety; and, on every call, that the backend left its inputs unchanged
(:mod:`ffo_conformance.guard`).  Each check runs in a worker process under a timeout
(:mod:`ffo_conformance.isolation`): a hang or a crash is reported, not fatal.  All
tolerances live in :mod:`ffo_conformance.tolerances`.  The backend's declared capabilities
decide what is skipped, and every skip says why.
"""

from __future__ import annotations

from .checks import CHECKS, CheckResult, Metric
from .report import Report
from .runner import Suite, run_suite
from .zoo import CLASSES, VARIANTS, Instance, build_zoo, get_instance

__all__ = [
    "CHECKS",
    "CLASSES",
    "VARIANTS",
    "CheckResult",
    "Instance",
    "Metric",
    "Report",
    "Suite",
    "build_zoo",
    "get_instance",
    "run_suite",
]
