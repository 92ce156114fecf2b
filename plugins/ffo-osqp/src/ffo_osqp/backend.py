"""OSQP as an ffo backend: the whole adapter, in one class.

OSQP (https://osqp.org) solves

    minimize 1/2 x'P x + q'x   subject to   l <= A x <= u

by ADMM, with an optional "polishing" step that re-solves the KKT system on the guessed
active set (which gives high-accuracy solutions when the guess is right).  It returns a
dual ``y`` with ``P x + q + A'y = 0``, where ``y_i > 0`` when the upper bound ``u_i`` is
active and ``y_i < 0`` when the lower bound ``l_i`` is.

The ffo protocol (``ffo_core.protocol``) asks for

    minimize 1/2 y'P y + q'y   s.t.   A y = b  (dual nu),   G y + s = h, s >= 0  (dual lam >= 0)

with KKT ``P y + q + A'nu + G'lam = 0``.  Conversion:

* constraint rows ``[A; G]``, bounds ``l = [b; -inf]``, ``u = [b; h]``: an equality is a
  row with ``l = u``, an inequality ``G y <= h`` a row with no lower bound;
* then OSQP's ``y`` *is* ``[nu; lam]`` with the same sign (an active ``G_i y <= h_i`` is an
  active upper bound, ``y_i >= 0``): no sign flip, no scaling;
* ADMM leaves ``lam`` of inactive rows at ``-eps``-sized values and ``s = h - G y`` at
  ``-eps`` on active rows; both are clipped to the cone (``>= 0``), as the protocol requires;
* ``P`` is passed as its upper triangle (OSQP's format); the protocol gives it full.

Only the zero and nonnegative cones exist in OSQP: SOC/EXP/PSD problems are declared
unsupported in ``capabilities``, so ffo refuses them up front (and the conformance suite
skips them, saying why).

Structure reuse (``resolve``, the protocol's optional second solve of one problem): a
solve with an ``extra_linear_term`` (a ghost problem) keeps its OSQP workspace in its
Solution's ``info.extra``; ``resolve`` with that Solution and the same problem objects calls
``update(q=...)`` and solves again, warm from the previous iterate, with no new setup or
factorisation.

Settings are OSQP's own names (``eps_abs``, ``eps_rel``, ``max_iter``, ``polishing``,
``time_limit``, ...), given in the config string: ``"osqp:eps_abs=1e-10,max_iter=200000"``.
The defaults below are tighter than OSQP's (1e-3) because a layer's backward pass needs
accurate solutions, and ``adaptive_rho_interval`` is fixed so that repeated solves are
bit-for-bit identical (OSQP's 0 chooses it from the measured setup time).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ffo_core.errors import ConfigError, SolverError
from ffo_core.protocol import (
    Capabilities,
    ConeConstraints,
    Equalities,
    Objective,
    Solution,
    SolveInfo,
    Status,
)

#: OSQP's status words -> protocol status (data, not branches).
STATUS_MAP = {
    "solved": Status.OPTIMAL,
    "solved inaccurate": Status.OPTIMAL_INACCURATE,
    "primal infeasible": Status.INFEASIBLE,
    "primal infeasible inaccurate": Status.INFEASIBLE_INACCURATE,
    "dual infeasible": Status.UNBOUNDED,
    "dual infeasible inaccurate": Status.UNBOUNDED_INACCURATE,
    "maximum iterations reached": Status.ITERATION_LIMIT,
    "run time limit reached": Status.TIME_LIMIT,
}

#: Settings used unless the config string overrides them.
DEFAULT_SETTINGS = {
    "verbose": False,
    "eps_abs": 1e-9,
    "eps_rel": 1e-9,
    "eps_prim_inf": 1e-7,
    "eps_dual_inf": 1e-7,
    "max_iter": 200_000,
    "polishing": True,
    "polish_refine_iter": 10,
    "adaptive_rho_interval": 25,
}


#: ``SolveInfo.extra`` key of a ghost solve's kept workspace (see ``OSQPBackend.resolve``).
_KEPT = "osqp_solver"


class _Kept(NamedTuple):
    """An OSQP workspace kept with the exact problem objects it was set up for (and the
    upper triangle of ``P`` it was given).  It lives as long as the Solution holding it:
    ffo drops a ghost's after its last solve."""

    solver: object
    P: sp.csc_matrix
    g: Objective
    h: ConeConstraints
    e: Equalities


def _inf(v: np.ndarray) -> float:
    return float(np.max(np.abs(v), initial=0.0))


class OSQPBackend:
    """The backend class registered with ffo (a factory: ``OSQPBackend(**settings)``)."""

    # -- what the registry and the engine read ---------------------------------------
    name = "osqp"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg"}),
        quadratic_objective=True,
        warm_start=True,  # x and y are passed to OSQP's warm_start
        thread_safe=True,  # each solve builds its own OSQP workspace (resolve
        #                           reuses one only for its own ghost, in ffo's one thread)
    )

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("osqp") is None:
            return False, "Python package 'osqp' is not installed (pip install osqp)"
        return True, ""

    @classmethod
    def version(cls) -> str | None:
        try:
            return importlib.metadata.version("osqp")
        except importlib.metadata.PackageNotFoundError:
            return None

    # -- configuration ----------------------------------------------------------------
    def __init__(self, **settings) -> None:
        valid = self.setting_names()
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)} for backend 'osqp'; "
                f"valid settings: {', '.join(sorted(valid))}"
            )
        self.settings = {**DEFAULT_SETTINGS, **settings}

    @staticmethod
    def setting_names() -> set[str]:
        import osqp

        names = {k for k in osqp.OSQP().ext.OSQPSettings.__dict__ if not k.startswith("_")}
        return names | {"solver_type", "rho"}

    def __repr__(self) -> str:
        return f"<OSQPBackend {self.settings}>"

    # -- the protocol -----------------------------------------------------------------
    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term: np.ndarray | None = None,
        *,
        warm_start: Solution | None = None,
    ) -> Solution:
        import osqp

        unsupported = h.dims.kinds - {"nonneg"}
        if unsupported:
            raise SolverError(
                f"osqp supports zero and nonnegative cones only, got {sorted(unsupported)}",
                backend=self.name,
            )
        n, p, m = g.n, e.p, h.m
        P = sp.triu(g.P, format="csc") if g.P is not None else sp.csc_matrix((n, n))
        q = g.q if extra_linear_term is None else g.q + extra_linear_term
        A = sp.vstack([e.A, h.G], format="csc")
        lower = np.concatenate([e.b, np.full(m, -np.inf)])
        upper = np.concatenate([e.b, h.h])

        solver = osqp.OSQP()
        try:
            solver.setup(P, q, A, lower, upper, **self.settings)
        except (ValueError, osqp.OSQPException) as exc:
            raise SolverError(f"osqp setup failed: {exc}", backend=self.name) from exc
        if (
            warm_start is not None
            and warm_start.primal is not None
            and np.shape(warm_start.primal) == (n,)
        ):
            y0 = None
            if (
                warm_start.eq_dual is not None
                and warm_start.ineq_dual is not None
                and np.shape(warm_start.eq_dual) == (p,)
                and np.shape(warm_start.ineq_dual) == (m,)
            ):
                y0 = np.concatenate([warm_start.eq_dual, warm_start.ineq_dual])
            solver.warm_start(x=np.asarray(warm_start.primal, float), y=y0)
        kept = _Kept(solver, P, g, h, e) if extra_linear_term is not None else None
        return self._answer(solver.solve(raise_error=False), P, g, q, h, e, kept)

    def resolve(
        self,
        previous: Solution | None,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term: np.ndarray,
    ) -> Solution:
        """``solve(g, h, e, extra_linear_term)``, reusing the workspace of ``previous`` when
        it is this backend's answer to a solve of these same ``(g, h, e)`` objects with
        another extra linear term (ffo's second solve of one ghost problem: central
        differences): only ``q`` changes, so ``OSQP.update(q=...)`` replaces a new setup
        and its KKT factorisation, and OSQP starts from the previous solution.  The answer
        differs from a fresh solve's by OSQP's tolerance.  Anything else is a fresh
        :meth:`solve`."""
        kept = previous.info.extra.get(_KEPT) if previous is not None else None
        if not (isinstance(kept, _Kept) and kept.g is g and kept.h is h and kept.e is e):
            return self.solve(g, h, e, extra_linear_term)
        q = g.q + extra_linear_term
        kept.solver.update(q=q)
        return self._answer(kept.solver.solve(raise_error=False), kept.P, g, q, h, e, kept)

    def _answer(
        self,
        res,
        P,
        g: Objective,
        q: np.ndarray,
        h: ConeConstraints,
        e: Equalities,
        kept: _Kept | None,
    ) -> Solution:
        """OSQP's result as a protocol Solution; ``kept`` (a ghost solve's workspace, for
        :meth:`resolve`) goes into ``info.extra``."""
        raw = str(res.info.status)
        status = STATUS_MAP.get(raw, Status.NUMERICAL_ERROR)
        extra = {"polished": int(getattr(res.info, "status_polish", 0)) == 1}
        if kept is not None:
            extra[_KEPT] = kept
        info = SolveInfo(
            iterations=int(res.info.iter),
            solve_time=float(res.info.run_time),
            raw_status=raw,
            extra=extra,
        )
        if not status.has_solution:
            return Solution(status=status, info=info)

        p = e.p
        x, yd = np.asarray(res.x, float), np.asarray(res.y, float)
        nu, lam = yd[:p].copy(), np.maximum(yd[p:], 0.0)
        s = np.maximum(h.h - h.G @ x, 0.0)
        info.accuracy = self._accuracy(P, g, q, e, h, x, nu, lam, s)
        return Solution(status=status, primal=x, eq_dual=nu, ineq_dual=lam, slack=s, info=info)

    @staticmethod
    def _accuracy(P_upper, g, q, e, h, x, nu, lam, s) -> float:
        """Relative KKT residual of the returned point (what ffo's active-set thresholds
        and step sizes are derived from); OSQP's own residuals are absolute."""
        Px = g.P @ x if g.P is not None else np.zeros_like(x)
        Atnu, Gtl = e.A.T @ nu, h.G.T @ lam
        dual = _inf(Px + q + Atnu + Gtl) / (1 + max(_inf(q), _inf(Px), _inf(Atnu), _inf(Gtl)))
        Ax, Gx = e.A @ x, h.G @ x
        prim = max(
            _inf(Ax - e.b) / (1 + max(_inf(e.b), _inf(Ax))),
            _inf(Gx + s - h.h) / (1 + max(_inf(h.h), _inf(Gx))),
        )
        obj = 0.5 * float(x @ Px) + float(q @ x)
        gap = abs(float(s @ lam)) / (1 + abs(obj))
        return float(max(prim, dual, gap, 1e-15))
