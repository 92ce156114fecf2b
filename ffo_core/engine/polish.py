"""Polishing a forward solution on its active set, with the same black-box solver.

An interior-point solver stops at a point where every complementary pair ``(s_i, lam_i)``
of a nonnegative row has ``s_i lam_i ~ mu``, not 0.  Where the solution sits near a kink --
a bound that is barely active or barely inactive -- both members of the pair are left of
size ~sqrt(mu) (e.g. ``s = 1.6e-4, lam = 2.4e-4`` at Clarabel's defaults on a box QP with
n = 1000), and no threshold can tell which one is zero.  A wrong guess changes the row's
gradient entries by O(1): one such row in a thousand gave 11% error in the layer's
gradient -- in the exact KKT mode too, since the point is what is wrong.

Polishing (as OSQP's ``polish``) settles it: take the active set the solver suggests, solve
the *equality-constrained* problem it defines (the ghost problem of
:mod:`.ffo_backward` at ``delta = 0``, with the exact right-hand sides), and check the
answer: a dropped row the new point violates (``s_i < 0``) joins the active set, a locked
row whose multiplier comes out negative leaves it; repeat until neither happens.  The
result satisfies the KKT conditions to the accuracy of that last solve -- an equality QP is
the easiest problem a solver gets, and it is solved to ~1e-10 -- with exact zeros where
they belong, so the backward's active set is exact too.

It runs on polyhedral problems (zero and nonnegative cones only: with a curved cone block
the polish problem would be another conic solve, no more accurate than the forward, and
dropping an inactive block frees CVXPY's auxiliary variables that only it constrains)
whose solution the solver left short of exact: a pair undecided
(:attr:`ActiveSet.ambiguous`), or a reported accuracy worse than :data:`SETTLED_ACCURACY`
(SCS's projections leave every pair complementary while its point is ~1e-3 off at its
defaults).  If polishing does not settle within
:data:`MAX_ROUNDS` solves, or its problem fails (a pure LP whose solution is not unique, a
degenerate vertex whose locked rows are inconsistent), the solver's own point is kept and
the reason is reported -- never a worse answer.  A backend that takes a warm start
(``Capabilities.warm_start``) starts each polish solve at the forward point.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ..errors import SolverError
from ..protocol import Backend, ConeConstraints, Equalities, Objective, Solution, Status
from .active_set import classify
from .ghost import GhostSource, build_ghost
from .scaling import in_units

#: A forward solution reported at least this accurate, with no unsettled pair, is kept as
#: it is (an active-set or simplex answer; an interior-point one at tight tolerances).
SETTLED_ACCURACY = 1e-10
#: Equality-constrained solves a polish may take before it gives up.
MAX_ROUNDS = 4
#: A violation counts when it exceeds this many times the polish solve's own accuracy
#: (in the row's units: ``max(1, |h_i|, |G_i y|)`` for a slack, the multipliers' scale
#: for a multiplier).
VIOLATION_FACTOR = 100.0


class Polished(NamedTuple):
    """A polish's outcome: the solution to use and what happened (``"polished"``, ``"not
    needed"``, or why the solver's own point was kept)."""

    sol: Solution
    outcome: str
    rounds: int


def polish(
    backend: Backend,
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    sol: Solution,
    *,
    tau_s: float | None = None,
    tau_lam: float | None = None,
    source: GhostSource | None = None,
) -> Polished:
    """``sol`` refined on its active set (module docstring)."""
    if not h.dims.nonneg or not sol.status.has_solution:
        return Polished(sol, "not needed", 0)
    if h.dims.kinds - {"nonneg"}:
        return Polished(sol, "not needed: the problem has curved cone blocks", 0)
    active = classify(sol, h.dims, tau_s=tau_s, tau_lam=tau_lam, rhs=h.h)
    accuracy = sol.info.accuracy if sol.info.accuracy is not None else 1.0
    if not active.ambiguous.any() and accuracy <= SETTLED_ACCURACY:
        return Polished(sol, "not needed", 0)
    source = source if source is not None else GhostSource.of(h, e)
    nn = np.zeros(h.m, dtype=bool)
    nn[: h.dims.nonneg] = True
    # violations are measured in the units the forward was solved in (:mod:`.scaling`)
    unit_s, unit_lam, _ = in_units(sol, np.ones(h.m), np.ones(h.m), h.h)
    s0, _, h0 = in_units(sol, sol.slack, sol.ineq_dual, h.h)
    row_scale = np.maximum(1.0, np.maximum(np.abs(h0), np.abs(h0 - s0)))
    locked = active.locked.copy()
    tried: set[bytes] = set()
    for rounds in range(1, MAX_ROUNDS + 1):
        tried.add(locked.tobytes())
        trial = replace(active, locked=locked)
        ghost_h, ghost_e = build_ghost(source, trial)
        warm = _warm_start(sol, trial, e.p) if backend.capabilities.warm_start else None
        try:
            got = backend.solve(g, ghost_h, ghost_e, warm_start=warm)
        except SolverError as exc:
            return Polished(
                sol, f"kept the solver's point: the polish solve failed ({exc})", rounds
            )
        if not got.status.has_solution:
            return Polished(
                sol,
                f"kept the solver's point: the polish problem ended {got.status.value}",
                rounds,
            )
        y, nu = got.primal, got.eq_dual[: e.p]
        lam = np.zeros(h.m)
        lam[locked] = got.eq_dual[e.p :]
        lam[trial.kept] = got.ineq_dual
        slack = h.h - h.G @ y
        acc = got.info.accuracy if got.info.accuracy and got.info.accuracy > 0 else 1e-9
        s_u, lam_u = slack * unit_s, lam * unit_lam
        lam_scale = max(1.0, float(np.abs(lam_u).max(initial=0.0)))
        primal_bad = nn & ~locked & (s_u < -VIOLATION_FACTOR * acc * row_scale)
        dual_bad = locked & (lam_u < -VIOLATION_FACTOR * acc * lam_scale)
        if not (primal_bad.any() or dual_bad.any()):
            slack[locked] = 0.0
            slack[nn] = np.maximum(slack[nn], 0.0)
            lam[nn] = np.maximum(lam[nn], 0.0)
            info = replace(
                got.info,
                raw_status=f"{sol.info.raw_status} (polished)",
                extra={"polish_rounds": rounds},
            )
            return Polished(Solution(Status.OPTIMAL, y, nu, lam, slack, info), "polished", rounds)
        locked = (locked | primal_bad) & ~dual_bad
        if locked.tobytes() in tried:
            return Polished(sol, "kept the solver's point: the active set cycles", rounds)
    return Polished(sol, f"kept the solver's point: not settled in {MAX_ROUNDS} solves", MAX_ROUNDS)


def _warm_start(sol: Solution, active, p: int) -> Solution:
    """The forward point in the polish problem's layout (equalities, then the locked rows
    as equalities; the kept cone blocks): a first-order solver starts at its answer's
    neighbour (measured on the box QP at n = 100-500: SCS 25 -> 0 iterations, OSQP
    75 -> 25)."""
    return Solution(
        Status.OPTIMAL,
        sol.primal,
        np.concatenate([sol.eq_dual[:p], sol.ineq_dual[active.locked]]),
        sol.ineq_dual[active.kept],
        sol.slack[active.kept],
        sol.info,
    )


__all__ = ["MAX_ROUNDS", "Polished", "polish"]
