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
degenerate vertex whose locked rows are inconsistent or whose multipliers, not unique, flip
sign from one round to the next: a round that violates no fewer rows than the last one
stops it), the solver's own point is kept and the reason is reported -- never a worse
answer.  A backend that takes a warm start
(``Capabilities.warm_start``) starts each polish solve at the forward point.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ..errors import SolverError
from ..protocol import Backend, ConeConstraints, Equalities, Objective, Solution, Status
from .active_set import ActiveSet, classify
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


class _Polishing:
    """One sample's polish between solves: the trial active set (:meth:`trial`) and what a
    solve of its problem decides (:meth:`take`: done, or the next trial)."""

    def __init__(self, h: ConeConstraints, e: Equalities, sol: Solution, active) -> None:
        self.h, self.e, self.sol, self.active = h, e, sol, active
        self.nn = np.zeros(h.m, dtype=bool)
        self.nn[: h.dims.nonneg] = True
        # violations are measured in the units the forward was solved in (:mod:`.scaling`)
        self.unit_s, self.unit_lam, _ = in_units(sol, np.ones(h.m), np.ones(h.m), h.h)
        s0, _, h0 = in_units(sol, sol.slack, sol.ineq_dual, h.h)
        self.row_scale = np.maximum(1.0, np.maximum(np.abs(h0), np.abs(h0 - s0)))
        self.locked = active.locked.copy()
        self.tried: set[bytes] = set()
        self.rounds = 0
        self.violations = np.inf  # rows violated at the last round
        self.result: Polished | None = None

    def trial(self) -> ActiveSet:
        self.tried.add(self.locked.tobytes())
        self.rounds += 1
        return replace(self.active, locked=self.locked)

    def keep(self, why: str) -> None:
        self.result = Polished(self.sol, f"kept the solver's point: {why}", self.rounds)

    def take(self, got: Solution, trial: ActiveSet) -> None:
        """The polish problem of ``trial`` solved (``got``, in its own layout): accept the
        point, or move violated rows and leave :attr:`result` unset for another round."""
        h, e, sol, nn, locked = self.h, self.e, self.sol, self.nn, self.locked
        if not got.status.has_solution:
            return self.keep(f"the polish problem ended {got.status.value}")
        y, nu = got.primal, got.eq_dual[: e.p]
        lam = np.zeros(h.m)
        lam[locked] = got.eq_dual[e.p :]
        lam[trial.kept] = got.ineq_dual
        slack = h.h - h.G @ y
        acc = got.info.accuracy if got.info.accuracy and got.info.accuracy > 0 else 1e-9
        s_u, lam_u = slack * self.unit_s, lam * self.unit_lam
        lam_scale = max(1.0, float(np.abs(lam_u).max(initial=0.0)))
        primal_bad = nn & ~locked & (s_u < -VIOLATION_FACTOR * acc * self.row_scale)
        dual_bad = locked & (lam_u < -VIOLATION_FACTOR * acc * lam_scale)
        if not (primal_bad.any() or dual_bad.any()):
            slack[locked] = 0.0
            slack[nn] = np.maximum(slack[nn], 0.0)
            lam[nn] = np.maximum(lam[nn], 0.0)
            info = replace(
                got.info,
                raw_status=f"{sol.info.raw_status} (polished)",
                extra={"polish_rounds": self.rounds},
            )
            point = Solution(Status.OPTIMAL, y, nu, lam, slack, info)
            self.result = Polished(point, "polished", self.rounds)
            return None
        self.locked = (locked | primal_bad) & ~dual_bad
        if self.locked.tobytes() in self.tried:
            return self.keep("the active set cycles")
        violated = int(np.count_nonzero(primal_bad) + np.count_nonzero(dual_bad))
        if violated >= self.violations:  # no progress: a degenerate vertex, whose
            return self.keep("no progress")  # multipliers are not unique, flip-flops
        self.violations = violated
        if self.rounds >= MAX_ROUNDS:
            return self.keep(f"not settled in {MAX_ROUNDS} solves")
        return None


def _start(h: ConeConstraints, e: Equalities, sol: Solution, tau_s, tau_lam):
    """A :class:`_Polishing`, or the :class:`Polished` of a solution that needs none."""
    if not h.dims.nonneg or not sol.status.has_solution:
        return Polished(sol, "not needed", 0)
    if h.dims.kinds - {"nonneg"}:
        return Polished(sol, "not needed: the problem has curved cone blocks", 0)
    active = classify(sol, h.dims, tau_s=tau_s, tau_lam=tau_lam, rhs=h.h)
    accuracy = sol.info.accuracy if sol.info.accuracy is not None else 1.0
    if not active.ambiguous.any() and accuracy <= SETTLED_ACCURACY:
        return Polished(sol, "not needed", 0)
    return _Polishing(h, e, sol, active)


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
    """``sol`` refined on its active set (module docstring), one solve at a time."""
    state = _start(h, e, sol, tau_s, tau_lam)
    if isinstance(state, Polished):
        return state
    source = source if source is not None else GhostSource.of(h, e)
    while state.result is None:
        trial = state.trial()
        ghost_h, ghost_e = build_ghost(source, trial)
        warm = _warm_start(sol, trial, e.p) if backend.capabilities.warm_start else None
        try:
            got = backend.solve(g, ghost_h, ghost_e, warm_start=warm)
        except SolverError as exc:
            state.keep(f"the polish solve failed ({exc})")
            break
        state.take(got, trial)
    return state.result


def polish_batch(
    batched,
    samples: list[tuple[Objective, ConeConstraints, Equalities]],
    sols: list[Solution],
    *,
    tau_s: float | None = None,
    tau_lam: float | None = None,
) -> list[Polished]:
    """:func:`polish` of every sample, each round's polish problems in one ``solve_batch``
    (:func:`~.batched.ghost_batch` at ``delta = 0`` with the exact right-hand sides)."""
    from .batched import ghost_batch, solve_problems

    states = [_start(h, e, s, tau_s, tau_lam) for (g, h, e), s in zip(samples, sols)]
    while True:
        ks = [k for k, s in enumerate(states) if isinstance(s, _Polishing) and s.result is None]
        if not ks:
            break
        trials = [states[k].trial() for k in ks]
        batch, _ = ghost_batch(
            [samples[k] for k in ks], trials, [None] * len(ks), [0.0] * len(ks),
            [np.zeros(samples[k][0].n) for k in ks],
        )  # fmt: skip
        try:
            answers = solve_problems(batched, batch, None)
        except SolverError as exc:
            for k in ks:
                states[k].keep(f"the polish solve failed ({exc})")
            break
        for k, trial, got in zip(ks, trials, answers):
            states[k].take(_compact(got, samples[k][2].p, trial), trial)
    return [s if isinstance(s, Polished) else s.result for s in states]


def _compact(got: Solution, p: int, trial: ActiveSet) -> Solution:
    """A polish problem's answer in :func:`~.batched.ghost_batch`'s layout (equality rows
    ``[A; G]``, absent where not locked; a polished problem is polyhedral, so it has no
    cone rows) in the compact layout of :func:`~.ghost.build_ghost` (``[A; G_locked]``),
    which :meth:`_Polishing.take` reads."""
    if not got.status.has_solution:
        return got
    eq = np.concatenate([got.eq_dual[:p], got.eq_dual[p:][trial.locked]])
    return replace(got, eq_dual=eq)


def _warm_start(sol: Solution, active, p: int) -> Solution:
    """The forward point in the polish problem's layout (equalities, then the locked rows
    as equalities; the kept cone blocks): a first-order solver starts at its answer's
    neighbour, which saves most of its iterations."""
    return Solution(
        Status.OPTIMAL,
        sol.primal,
        np.concatenate([sol.eq_dual[:p], sol.ineq_dual[active.locked]]),
        sol.ineq_dual[active.kept],
        sol.slack[active.kept],
        sol.info,
    )


__all__ = ["MAX_ROUNDS", "Polished", "polish", "polish_batch"]
