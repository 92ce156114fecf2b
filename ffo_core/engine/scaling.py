"""Solving badly scaled problems as well-scaled ones, whatever the backend.

Solvers stop on tolerances that are partly absolute (Clarabel, SCS and ECOS compare
residuals with ``max(1, ||data||)``), so a problem whose solution is ~1e-6 is "solved" by
any point within ~1e-8 of the origin, and one whose rows are scaled by 1e9 hides its
multipliers below every threshold.  :class:`ScaledBackend` wraps a backend and hands it the
equivalent problem in units where the data is of order one, then returns the answer in the
original units:

    y = alpha * D_y^0 y^      (a variable scale ``alpha``),
    rows of A and G scaled by D (each row of the nonnegative block by its own factor, each
    cone block by one factor, so the cone is unchanged),
    objective divided by beta,

so that ``P^ = (alpha^2 / beta) P``, ``q^ = (alpha / beta) q``, ``A^ = D_A A``,
``b^ = D_A b / alpha``, ``G^ = D_G G``, ``h^ = D_G h / alpha``, and back

    y = alpha y^,   s = alpha D_G^-1 s^,   nu = (beta / alpha) D_A nu^,
    lam = (beta / alpha) D_G lam^

(the Lagrangian of the scaled problem is the original one divided by beta, so these are
exact: the scaled problem's KKT point maps to the original's).  ``D`` makes every row's
Euclidean norm 1; ``alpha`` is the size of the right-hand sides in those units (that of
the objective's unconstrained minimiser, ``max|q| / max|P|``, when they are zero up to
rounding); ``beta`` the size of the scaled objective's coefficients.  A problem that is
already of order one (every factor within :data:`WELL_SCALED`) is passed through
untouched, so well-scaled problems are solved exactly as before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..protocol import ConeConstraints, Equalities, Objective, Solution

#: Factors within ``[1/WELL_SCALED, WELL_SCALED]`` leave the problem as it is.
WELL_SCALED = 1e2
#: Right-hand sides below this fraction of the objective's scale are rounding, not a size.
RHS_NOISE = 1e-12
#: ``alpha`` and ``beta`` are kept within ``[1/LIMIT, LIMIT]``.
LIMIT = 1e12


def _row_norms(M: sp.csc_matrix) -> np.ndarray:
    """Euclidean norm of every row (one pass over the entries)."""
    return np.sqrt(np.bincount(M.indices, weights=M.data * M.data, minlength=M.shape[0]))


def _factor(values: np.ndarray) -> np.ndarray:
    """``1 / values`` where positive and finite, 1 elsewhere (an empty row stays)."""
    out = np.ones_like(values)
    ok = values > 0
    out[ok] = 1.0 / values[ok]
    return out


class Scaling:
    """The factors of one problem (module docstring); ``None`` from :meth:`of` when the
    problem is well scaled."""

    def __init__(self, alpha: float, beta: float, d_A: np.ndarray, d_G: np.ndarray) -> None:
        self.alpha, self.beta, self.d_A, self.d_G = alpha, beta, d_A, d_G

    @classmethod
    def of(cls, g: Objective, h: ConeConstraints, e: Equalities) -> Scaling | None:
        d_A = _factor(_row_norms(e.A))
        raw = _row_norms(h.G)
        d_G = _factor(raw)
        from .active_set import block_slices  # (active_set imports this module)

        for _, _, rows in block_slices(h.dims):  # one factor per cone block
            block = raw[rows].max(initial=0.0)
            d_G[rows] = 1.0 / block if block > 0 else 1.0
        rhs = max(
            float(np.abs(d_A * e.b).max(initial=0.0)), float(np.abs(d_G * h.h).max(initial=0.0))
        )
        P_max = float(np.abs(g.P.data).max(initial=0.0)) if g.P is not None else 0.0
        q_max = float(np.abs(g.q).max(initial=0.0))
        # the size of y: the right-hand sides in unit-row units, unless they are zero up to
        # rounding next to the unconstrained minimiser's size (a ghost's rows through a
        # point on the boundary), which would shrink it to nothing
        objective = q_max / P_max if P_max > 0 else 0.0
        if rhs > RHS_NOISE * objective:
            alpha = rhs
        else:
            alpha = objective if objective > 0 else 1.0
        alpha = float(np.clip(alpha, 1 / LIMIT, LIMIT))
        beta = max(alpha * alpha * P_max, alpha * q_max)
        beta = float(np.clip(beta, 1 / LIMIT, LIMIT)) if beta > 0 else 1.0
        factors = np.concatenate([[alpha, beta], d_A, d_G])
        if np.all((factors >= 1 / WELL_SCALED) & (factors <= WELL_SCALED)):
            return None
        return cls(alpha, beta, d_A, d_G)

    def problem(self, g: Objective, h: ConeConstraints, e: Equalities, term):
        """The scaled ``(g, h, e, extra_linear_term)``."""
        a, b = self.alpha, self.beta
        P = None if g.P is None else (a * a / b) * g.P
        g2 = Objective(P, (a / b) * g.q)
        A = sp.diags(self.d_A) @ e.A
        G = sp.diags(self.d_G) @ h.G
        h2 = ConeConstraints(sp.csc_matrix(G), self.d_G * h.h / a, h.dims)
        e2 = Equalities(sp.csc_matrix(A), self.d_A * e.b / a)
        return g2, h2, e2, (None if term is None else (a / b) * np.asarray(term))

    def solution(self, sol: Solution) -> Solution:
        """The scaled problem's answer in the original units."""
        if not sol.status.has_solution:
            return sol
        a, b = self.alpha, self.beta
        return replace(
            sol,
            primal=a * np.asarray(sol.primal),
            eq_dual=(b / a) * self.d_A * np.asarray(sol.eq_dual),
            ineq_dual=(b / a) * self.d_G * np.asarray(sol.ineq_dual),
            slack=a * np.asarray(sol.slack) / self.d_G,
            info=replace(sol.info, extra={**sol.info.extra, "scaling": self}),
        )

    def scaled(self, sol: Solution) -> Solution:
        """A point of the original problem (a warm start) in the scaled problem's units:
        the inverse of :meth:`solution`."""
        a, b = self.alpha, self.beta
        return replace(
            sol,
            primal=np.asarray(sol.primal) / a,
            eq_dual=(a / b) * np.asarray(sol.eq_dual) / self.d_A,
            ineq_dual=(a / b) * np.asarray(sol.ineq_dual) / self.d_G,
            slack=self.d_G * np.asarray(sol.slack) / a,
        )

    def units(self, slack: np.ndarray, lam: np.ndarray, h: np.ndarray):
        """``(s, lam, h)`` of the original problem in the scaled problem's units."""
        a, b = self.alpha, self.beta
        return self.d_G * slack / a, (a / b) * lam / self.d_G, self.d_G * h / a


class ScaledBackend:
    """``backend`` seen through :class:`Scaling`: ``solve`` (and ``resolve``) scale a
    badly scaled problem first and unscale the answer; everything else is the wrapped
    backend's.  The scaled problem of a ``(g, h, e)`` is kept with its answer, so a
    ``resolve`` of the same problem hands the backend the same scaled objects (its own
    structure reuse keeps working)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.name = getattr(backend, "name", type(backend).__name__)
        self.capabilities = backend.capabilities

    def __getattr__(self, attr: str):
        if attr == "_backend":
            raise AttributeError(attr)
        return getattr(self._backend, attr)

    def tightened(self) -> ScaledBackend:
        """This wrapper around the wrapped backend's tightened copy."""
        from .solves import tightened

        return ScaledBackend(tightened(self._backend))

    def solve(self, g, h, e, extra_linear_term=None, **kwargs) -> Solution:
        scaling = Scaling.of(g, h, e)
        if scaling is None:
            return self._backend.solve(g, h, e, extra_linear_term, **kwargs)
        g2, h2, e2, t2 = scaling.problem(g, h, e, extra_linear_term)
        if kwargs.get("warm_start") is not None:
            kwargs["warm_start"] = scaling.scaled(kwargs["warm_start"])
        sol = self._backend.solve(g2, h2, e2, t2, **kwargs)
        out = scaling.solution(sol)
        if extra_linear_term is not None:  # a ghost: kept for its second solve (resolve)
            out.info.extra["scaled_problem"] = (g, h, e, scaling, g2, h2, e2, sol)
        return out

    def resolve(self, previous, g, h, e, extra_linear_term) -> Solution:
        again = getattr(self._backend, "resolve", None)
        kept = previous.info.extra.get("scaled_problem") if previous is not None else None
        if kept is not None and kept[0] is g and kept[1] is h and kept[2] is e:
            scaling, g2, h2, e2, inner = kept[3:]
            t2 = (scaling.alpha / scaling.beta) * np.asarray(extra_linear_term)
            sol = (
                again(inner, g2, h2, e2, t2)
                if again is not None
                else self._backend.solve(g2, h2, e2, t2)
            )
            out = scaling.solution(sol)
            out.info.extra["scaled_problem"] = (g, h, e, scaling, g2, h2, e2, sol)
            return out
        if kept is None and previous is not None and again is not None:
            if Scaling.of(g, h, e) is None:
                return again(previous, g, h, e, extra_linear_term)
        return self.solve(g, h, e, extra_linear_term)


def in_units(sol: Solution, slack, lam, h):
    """``(slack, lam, h)`` in the units ``sol`` was solved in (:meth:`Scaling.units` when
    a :class:`ScaledBackend` scaled its problem; unchanged otherwise).  The active set and
    the polish measure slacks and multipliers in these units, so their thresholds hold
    whatever the data's scale."""
    scaling = sol.info.extra.get("scaling") if sol.info is not None else None
    if isinstance(scaling, Scaling) and scaling.d_G.shape == np.shape(slack):
        return scaling.units(np.asarray(slack), np.asarray(lam), np.asarray(h))
    return slack, lam, h


__all__ = ["LIMIT", "WELL_SCALED", "ScaledBackend", "Scaling", "in_units"]
