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
:meth:`OSQPBackend.with_settings` returns a configured copy (``FFOLayer(time_limit=...)``
calls it; ``time_limit`` is OSQP's own name, in seconds).

Polish early (:data:`EARLY_EPS`).  ADMM needs very many iterations to reach 1e-9 on a
linear program -- on 6 of the conformance zoo's 29 LP and QP problems, all pure LPs, it did
not within 200 000 -- while OSQP's polishing step (a solve of the KKT system on the guessed
active set) turns a rough iterate into an exact vertex whenever the guess is right.  So a
solve first runs OSQP to looser tolerances, 1e-1 down to 1e-6 a decade at a time,
continuing warm from one to the next, and stops as soon as a polished point's relative KKT
residual (:func:`ffo_core.accuracy.kkt_accuracy`) meets the tolerance asked for
(``max(eps_abs, eps_rel)``); otherwise it ends with OSQP's own stop at the settings asked
for.  ``max_iter`` and ``time_limit`` bound the whole sequence.  On those 29 problems: 7 800
iterations in all instead of 1.2 million, every answer within 4e-9 of the reference (the
same problems with four random 1% tilts of ``q`` each, 145 in all: every one solved).
``polishing=false`` turns it off (nothing to accept early).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ffo_core.accuracy import kkt_accuracy
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


#: The looser tolerances tried first, each accepted only if its polished point is as
#: accurate as the tolerance asked for (see "Polish early" above).
EARLY_EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

#: ``SolveInfo.extra`` key of a ghost solve's kept workspace (see ``OSQPBackend.resolve``).
_KEPT = "osqp_solver"


class _Run(NamedTuple):
    """OSQP's last result and the counts over the whole early-polish sequence."""

    res: object
    raw: str  # OSQP's status word for the sequence
    iterations: int
    seconds: float
    accuracy: float | None
    point: tuple | None  # (x, nu, lam, s) in protocol conventions


class _Kept(NamedTuple):
    """An OSQP workspace kept with the exact problem objects it was set up for (and the
    upper triangle of ``P`` it was given).  It lives as long as the Solution holding it:
    ffo drops a ghost's after its last solve."""

    solver: object
    P: sp.csc_matrix
    g: Objective
    h: ConeConstraints
    e: Equalities


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
        self._given = dict(settings)
        self.settings = {**DEFAULT_SETTINGS, **settings}
        self._check_values(settings)

    @staticmethod
    def _check_values(given: dict) -> None:
        """Raise :class:`ConfigError` naming the setting whose value OSQP refuses (a wrong
        type, or out of range), by a set-up of a one-variable problem per given setting:
        a bad value fails at construction, not in the middle of a layer's batch."""
        import osqp

        for key, value in given.items():
            probe = osqp.OSQP()
            try:
                probe.setup(
                    sp.csc_matrix((1, 1)),
                    np.zeros(1),
                    sp.csc_matrix(np.ones((1, 1))),
                    np.zeros(1),
                    np.ones(1),
                    **{**DEFAULT_SETTINGS, key: value},
                )
            except (TypeError, ValueError, AssertionError, osqp.OSQPException) as exc:
                why = " ".join(str(exc).split())[:200] or "refused"
                raise ConfigError(
                    f"osqp setting {key}={value!r} is not accepted by OSQP "
                    f"({type(exc).__name__}: {why})"
                ) from exc

    def with_settings(self, **settings) -> OSQPBackend:
        """A new backend with ``settings`` added to (or replacing) this one's."""
        return type(self)(**{**self._given, **settings})

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
        return self._answer(self._run(solver, g, q, h, e), g, h, kept)

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
        return self._answer(self._run(kept.solver, g, q, h, e), g, h, kept)

    def _run(self, solver, g: Objective, q, h: ConeConstraints, e: Equalities) -> _Run:
        """OSQP on a set-up workspace: the early-polish tolerances, then the ones asked for
        (module docstring).  The point is kept in protocol conventions."""
        eps_abs, eps_rel = self.settings["eps_abs"], self.settings["eps_rel"]
        target = max(eps_abs, eps_rel)
        max_iter = int(self.settings["max_iter"])
        time_limit = float(self.settings.get("time_limit", 0) or 0)  # OSQP: 0 = none
        stages = [(eps, eps) for eps in EARLY_EPS if eps > target and target > 0]
        if not self.settings.get("polishing", False):
            stages = []
        stages.append((eps_abs, eps_rel))
        used, seconds = 0, 0.0
        for k, (abs_, rel_) in enumerate(stages):
            last = k == len(stages) - 1
            update = {"eps_abs": abs_, "eps_rel": rel_, "max_iter": max_iter - used}
            if time_limit > 0:
                update["time_limit"] = max(time_limit - seconds, 1e-9)
            if len(stages) > 1:
                solver.update_settings(**update)
            res = solver.solve(raise_error=False)
            used += int(res.info.iter)
            seconds += float(res.info.run_time)
            point, accuracy = self._point(res, q, h, e), None
            if point is not None:
                accuracy = kkt_accuracy(g, h, e, *point, extra_linear_term=q - g.q)
            raw = str(res.info.status)
            polished = int(getattr(res.info, "status_polish", 0)) == 1
            if last or raw not in ("solved", "solved inaccurate"):
                break
            if polished and accuracy is not None and accuracy <= target:
                break  # accurate enough already
            # a looser stage's point that is not accurate enough is never the answer
            if used >= max_iter:
                raw, point = "maximum iterations reached", None
                break
            if time_limit > 0 and seconds >= time_limit:
                raw, point = "run time limit reached", None
                break
        return _Run(res, raw, used, seconds, accuracy, point)

    @staticmethod
    def _point(res, q, h: ConeConstraints, e: Equalities):
        """``(x, nu, lam, s)`` of OSQP's iterate (lam and s clipped to the cone)."""
        if str(res.info.status) not in ("solved", "solved inaccurate"):
            return None
        p = e.p
        x, yd = np.asarray(res.x, float), np.asarray(res.y, float)
        nu, lam = yd[:p].copy(), np.maximum(yd[p:], 0.0)
        s = np.maximum(h.h - h.G @ x, 0.0)
        return x, nu, lam, s

    def _answer(self, run: _Run, g: Objective, h: ConeConstraints, kept: _Kept | None) -> Solution:
        """OSQP's result as a protocol Solution; ``kept`` (a ghost solve's workspace, for
        :meth:`resolve`) goes into ``info.extra``.  ``SolveInfo.accuracy`` is the relative
        KKT residual of the returned point (OSQP's own residuals are absolute)."""
        raw = run.raw
        status = STATUS_MAP.get(raw, Status.NUMERICAL_ERROR)
        extra = {"polished": int(getattr(run.res.info, "status_polish", 0)) == 1}
        if kept is not None:
            extra[_KEPT] = kept
        info = SolveInfo(
            iterations=run.iterations,
            solve_time=run.seconds,
            raw_status=raw,
            accuracy=run.accuracy,
            extra=extra,
        )
        if not status.has_solution or run.point is None:
            return Solution(status=status, info=info)
        x, nu, lam, s = run.point
        return Solution(status=status, primal=x, eq_dual=nu, ineq_dual=lam, slack=s, info=info)
