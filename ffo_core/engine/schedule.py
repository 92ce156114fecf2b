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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from ..errors import GhostProblemError
from ..protocol import Backend, ConeConstraints, ConeDims, Equalities, Objective, Solution
from .active_set import ActiveSet, classify_batch
from .data_gradient import DataGradient
from .ffo_backward import FFOOptions, GhostPlan, finish, plan, solve_plan, zero_gradient
from .ghost import GhostSource, base_point_errors, build_ghosts


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
) -> list[DataGradient | GhostProblemError]:
    """:func:`~.ffo_backward.ffo_backward` of every sample, step by step over the batch
    (module docstring).  ``run(fn, count)`` calls ``fn(i)`` for every index (default: in
    order).  Returns one entry per sample: its :class:`DataGradient`, or the
    :class:`GhostProblemError` (with ``delta``) its ghost raised, for the caller's fallback
    policy.  Other errors propagate."""
    options = options or FFOOptions()
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
    errors = _base_errors(plans, options)  # 4
    out = []
    for k, planned in enumerate(plans):
        if isinstance(planned, GhostPlan):
            try:
                planned = finish(planned, options, errors.get(k))
            except GhostProblemError as exc:
                planned = exc
        out.append(planned)
    return out


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
