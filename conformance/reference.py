"""The trusted reference: a tight Clarabel solve, called directly, and KKT differentiation.

The reference solve does *not* go through the registry or any adapter: it calls the
``clarabel`` package (a hard dependency of ffo) itself, so a broken adapter (or a runtime
backend registered under the name ``clarabel``) cannot corrupt the yardstick it is measured
against.  Its answer is itself checked with the suite's residuals (it must reach
:data:`ffo_conformance.tolerances.REFERENCE_RESIDUAL`) before anything is judged against it.

The reference gradient is :func:`ffo_core.engine.kkt_backward.kkt_backward` at the reference
solution.  Where it cannot differentiate a problem (it raises), the gradient checks report
an *error* saying so; they never pass by default.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ffo_core.protocol import (
    Capabilities,
    ConeConstraints,
    Equalities,
    Objective,
    Solution,
    SolveInfo,
    Status,
)

from .tolerances import REFERENCE_SETTINGS

_STATUS = {
    "Solved": Status.OPTIMAL,
    "AlmostSolved": Status.OPTIMAL_INACCURATE,
    "PrimalInfeasible": Status.INFEASIBLE,
    "AlmostPrimalInfeasible": Status.INFEASIBLE_INACCURATE,
    "DualInfeasible": Status.UNBOUNDED,
    "AlmostDualInfeasible": Status.UNBOUNDED_INACCURATE,
    "MaxIterations": Status.ITERATION_LIMIT,
    "MaxTime": Status.TIME_LIMIT,
}


class ReferenceSolver:
    """Protocol-compliant backend object (usable by ``FFOLayer(solver=...)``)."""

    name = "conformance-reference"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp", "psd"}),
        quadratic_objective=True,
        warm_start=False,
        thread_safe=True,
    )

    def __init__(self, **settings) -> None:
        self.settings = {**REFERENCE_SETTINGS, **settings}

    @staticmethod
    def version() -> str:
        import clarabel

        return getattr(clarabel, "__version__", "?")

    def describe(self) -> str:
        tol = self.settings.get("tol_gap_rel")
        return f"clarabel {self.version()} called directly (tol {tol:g})"

    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term=None,
        *,
        warm_start=None,
    ) -> Solution:
        import clarabel

        n = g.n
        P = sp.triu(g.P, format="csc") if g.P is not None else sp.csc_matrix((n, n))
        q = g.q if extra_linear_term is None else g.q + extra_linear_term
        A = sp.vstack([e.A, h.G], format="csc")
        b = np.concatenate([e.b, h.h])
        d = h.dims
        cones = []
        if e.p:
            cones.append(clarabel.ZeroConeT(e.p))
        if d.nonneg:
            cones.append(clarabel.NonnegativeConeT(d.nonneg))
        cones += [clarabel.SecondOrderConeT(k) for k in d.soc]
        cones += [clarabel.ExponentialConeT() for _ in range(d.exp)]
        cones += [clarabel.PSDTriangleConeT(k) for k in d.psd]
        settings = clarabel.DefaultSettings()
        for key, value in self.settings.items():
            setattr(settings, key, value)
        res = clarabel.DefaultSolver(P, q, A, b, cones, settings).solve()
        raw = str(res.status)
        status = _STATUS.get(raw, Status.NUMERICAL_ERROR)
        gap = abs(res.obj_val - res.obj_val_dual) / max(1.0, abs(res.obj_val))
        info = SolveInfo(
            iterations=int(res.iterations),
            solve_time=float(res.solve_time),
            accuracy=float(max(res.r_prim, res.r_dual, gap, 1e-14)) if np.isfinite(gap) else None,
            raw_status=raw,
        )
        if not status.has_solution:
            return Solution(status=status, info=info)
        z, s = np.asarray(res.z), np.asarray(res.s)
        return Solution(
            status=status,
            primal=np.asarray(res.x),
            eq_dual=z[: e.p],
            ineq_dual=z[e.p :],
            slack=s[e.p :],
            info=info,
        )


def kkt_reference(g, h, e, sol: Solution, c: np.ndarray):
    """The exact data gradient of ``c'y*`` at the reference solution (may raise)."""
    from ffo_core.engine.kkt_backward import kkt_backward

    return kkt_backward(g, h, e, sol, c)
