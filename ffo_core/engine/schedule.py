"""The first-order backward of a whole batch: the steps of :mod:`.ffo_backward`, each run
over every sample before the next, vectorised where a step can be.

1. active sets: one :func:`~.active_set.classify_batch` per cone layout;
2. plans (central or not, delta) and the ghosts: one row selection for the samples that
   share their matrices (:func:`~.ghost.build_ghosts`);
3. the ghost solves, through ``run(fn, count)`` (the layers pass their thread pool);
4. the base-point check of the one-sided samples at once
   (:func:`~.ghost.base_point_errors`), then each sample's difference
   (:func:`~.ffo_backward.finish`).

Each sample goes through exactly the steps of a lone :func:`~.ffo_backward.ffo_backward`,
with the same arithmetic (the batched helpers are written so that a sample's result does
not depend on its batch; the tests check it bit for bit); only the interleaving differs.
Running one kind of step over the whole batch keeps the interpreter's and the CPU's caches
on that step instead of cycling through a solver's set-up between samples.  Memory: every
sample's ghost is alive until step 4 (the layers stage large batches in chunks).

With a batched backend (one with ``solve_batch``) the ghosts of step 3 go out in one call
per kind of solve.  A polyhedral batch (zero and nonnegative cones) then skips the
per-sample steps altogether: :mod:`.batch_backward` runs all four as array operations over
the batch, giving each sample the same result up to rounding (the order of a few sums).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from ..errors import GhostProblemError
from ..protocol import Backend, ConeConstraints, ConeDims, Equalities, Objective, Solution
from .active_set import ActiveSet, classify_batch
from .batch_backward import applies as polyhedral_applies
from .batch_backward import ffo_backward_polyhedral
from .batched import failed_ghost as _with_delta
from .batched import ghost_answers, ghost_batch, inaccurate_ghost, solve_problems
from .data_gradient import DataGradient
from .ffo_backward import FFOOptions, GhostPlan, finish, plan, solve_plan, zero_gradient
from .ghost import GhostSource, base_point_errors, build_ghosts, curved_step
from .solves import backend_name


class FFOSample(NamedTuple):
    """One sample of :func:`ffo_backward_batch`: the backend its ghosts go to (the layers
    pass a per-sample guard that names the batch index), its data, forward solution and
    upstream gradient ``c = dloss/dy`` (``c_dual = (dloss/dnu, dloss/dlam)`` when duals are
    outputs); ``source`` as in :func:`~.ffo_backward.ffo_backward`."""

    backend: Backend
    g: Objective
    h: ConeConstraints
    e: Equalities
    sol: Solution
    c: np.ndarray
    source: GhostSource | None = None
    c_dual: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def live(self) -> bool:
        """A loss reaches this sample (some upstream gradient is nonzero)."""
        return bool(np.any(self.c)) or (
            self.c_dual is not None and any(bool(np.any(v)) for v in self.c_dual)
        )


def ffo_backward_batch(
    samples: Sequence[FFOSample],
    options: FFOOptions | None = None,
    run: Callable[[Callable[[int], None], int], object] | None = None,
    batched=None,
) -> list[DataGradient | GhostProblemError]:
    """:func:`~.ffo_backward.ffo_backward` of every sample, step by step over the batch
    (module docstring).  ``run(fn, count)`` calls ``fn(i)`` for every index (default: in
    order).  ``batched``: a backend with ``solve_batch`` (:func:`~.batched.batch_solver`):
    step 3 then solves every sample's ghost in one call per step kind
    (:func:`_solve_batched`) instead of one call per sample, and a polyhedral batch runs
    every step as array operations over the batch
    (:func:`~.batch_backward.ffo_backward_polyhedral`).  Returns one entry per sample:
    its :class:`DataGradient`, or the :class:`GhostProblemError` (with ``delta``) its ghost
    raised, for the caller's fallback policy.  Other errors propagate."""
    options = options or FFOOptions()
    if batched is not None and samples and polyhedral_applies(samples):
        return ffo_backward_polyhedral(samples, options, batched)  # array operations
    live = [k for k, s in enumerate(samples) if s.live]
    actives = dict(zip(live, _active_sets([samples[k] for k in live], options)))  # 1
    plans: list = [None] * len(samples)
    for k, s in enumerate(samples):  # 2
        if k not in actives:
            plans[k] = zero_gradient(s.g, s.h, s.e, s.sol)
            continue
        plans[k] = plan(
            s.backend, s.g, s.h, s.e, s.sol, s.c, actives[k], options, s.source, s.c_dual
        )
    if batched is not None:
        _solve_batched(plans, options, batched)
        return _finish_all(plans, options, batched)
    ghosts = build_ghosts(
        [plans[k].source for k in live], [actives[k] for k in live],
        [plans[k].through() for k in live],
    )  # fmt: skip
    for k, ghost in zip(live, ghosts):
        plans[k].ghost = ghost

    def solve(i: int) -> None:  # 3
        if isinstance(plans[i], GhostPlan):
            try:
                solve_plan(plans[i], options)
            except GhostProblemError as exc:
                plans[i] = exc

    if run is None:
        for i in range(len(plans)):
            solve(i)
    else:
        run(solve, len(plans))
    return _finish_all(plans, options)


def _finish_all(plans: list, options: FFOOptions, batched=None) -> list:
    """Step 4 for every plan: the base-point check at once, then each difference; with
    ``batched``, the ``-delta`` solves of the one-sided plans that fail the check go in one
    batch first."""
    errors = _base_errors(plans, options)  # 4
    if batched is not None:
        again = [
            k for k, e in errors.items()
            if e > options.base_check and isinstance(plans[k], GhostPlan)
        ]  # fmt: skip
        _ghosts_at(plans, again, -1.0, batched)
    out = []
    for k, planned in enumerate(plans):
        if isinstance(planned, GhostPlan):
            try:
                planned = finish(planned, options, errors.get(k))
            except GhostProblemError as exc:
                planned = exc
        out.append(planned)
    return out


def _ghosts_at(plans: list, ks: list[int], sign: float, batched) -> None:
    """The ghosts of ``plans[k]``, ``k`` in ``ks``, at ``delta = sign * plan.delta``, in one
    ``solve_batch``: sets ``upper`` (sign > 0) or ``lower``; a sample whose ghost failed
    becomes its :class:`GhostProblemError` (all of them when the whole call failed)."""
    ks = [k for k in ks if isinstance(plans[k], GhostPlan)]
    if not ks:
        return
    ps = [plans[k] for k in ks]
    samples = [(p.g, p.h, p.e) for p in ps]
    actives = [p.active for p in ps]
    steps = [sign * p.delta for p in ps]
    duals = [p.c_dual for p in ps] if any(p.c_dual is not None for p in ps) else None
    batch, extra = ghost_batch(samples, actives, [p.through() for p in ps], steps,
                               [p.c for p in ps], duals)  # fmt: skip
    try:
        answers = solve_problems(batched, batch, extra, ghost=True)
    except GhostProblemError as exc:  # the whole call failed: every sample in it
        for k, p in zip(ks, ps):
            own = GhostProblemError(str(exc), status=exc.status, backend=exc.backend)
            own.__cause__ = exc
            plans[k] = _with_delta(own, abs(p.delta), p.backend)
        return
    points = ghost_answers(answers, samples, actives)
    for k, p, sol, point, step in zip(ks, ps, answers, points, steps):
        if not sol.status.has_solution:
            plans[k] = _with_delta(
                GhostProblemError(
                    f"the ghost problem of the backward pass ended with status "
                    f"{sol.status.value} ({backend_name(batched)})",
                    status=sol.status,
                    backend=backend_name(batched),
                ),
                abs(step),
                p.backend,
            )
            continue
        refused = inaccurate_ghost(p.backend, sol.status, backend_name(batched))
        if refused is not None:
            plans[k] = _with_delta(refused, abs(step), p.backend)
        elif sign > 0:
            p.upper = point
        else:
            p.lower = point


def _solve_batched(plans: list, options: FFOOptions, batched) -> None:
    """Step 3 with a batched backend (the per-sample :func:`~.ffo_backward.solve_plan`,
    one batch per kind of solve): every ghost at ``+delta``; the curved ones whose step
    left a block's linear range again at a smaller delta (at most twice); the central ones
    at ``-delta``."""
    live = [k for k, p in enumerate(plans) if isinstance(p, GhostPlan)]
    _ghosts_at(plans, live, 1.0, batched)
    for _ in range(2):
        shrink = []
        for k in live:
            p = plans[k]
            if not isinstance(p, GhostPlan) or options.delta is not None:
                continue
            moved = curved_step(p.h, p.active, p.sol, p.upper)
            if moved > options.max_curved_step:
                p.delta *= options.max_curved_step / moved
                shrink.append(k)
        if not shrink:
            break
        _ghosts_at(plans, shrink, 1.0, batched)
    _ghosts_at(plans, [k for k in live if isinstance(plans[k], GhostPlan) and plans[k].central],
               -1.0, batched)  # fmt: skip


def _active_sets(samples: Sequence[FFOSample], options: FFOOptions) -> list[ActiveSet]:
    """Step 1 of every sample: one :func:`~.active_set.classify_batch` per cone layout (a
    layer's samples share one), each result exactly a lone ``classify``."""
    groups: dict[ConeDims, list[int]] = {}
    for k, s in enumerate(samples):
        groups.setdefault(s.h.dims, []).append(k)
    out: list = [None] * len(samples)
    for dims, ks in groups.items():
        found = classify_batch(
            [samples[k].sol for k in ks], dims, tau_s=options.tau_s,
            tau_lam=options.tau_lam, rhs=[samples[k].h.h for k in ks],
        )  # fmt: skip
        for k, active in zip(ks, found):
            out[k] = active
    return out


def _base_errors(plans: Sequence, options: FFOOptions) -> dict[int, float]:
    """Step 4's base-point check (:func:`~.ghost.base_point_errors`) of every one-sided
    plan whose ghost was solved, by index; none when ``options.base_check`` is None."""
    checked = [
        k for k, p in enumerate(plans)
        if isinstance(p, GhostPlan) and not p.central and options.base_check is not None
    ]  # fmt: skip
    if not checked:
        return {}
    errors = base_point_errors(
        [plans[k].source for k in checked], [plans[k].sol for k in checked],
        [plans[k].active for k in checked], [plans[k].upper[0] for k in checked],
        [plans[k].delta * plans[k].c for k in checked],
    )  # fmt: skip
    return dict(zip(checked, errors.tolist()))


__all__ = ["FFOSample", "ffo_backward_batch"]
