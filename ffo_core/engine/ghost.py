"""The ghost problem of the first-order backward (step 2 of :mod:`.ffo_backward`): its
construction from an active set, its solve, and the checks made on its solution.

The ghost of a sample keeps the objective and the equalities, turns the *locked*
nonnegative rows into equalities and keeps the *kept* cone blocks as cones; every other
row is dropped.  :func:`build_ghosts` builds a whole batch's ghosts in one row selection
when the samples share their matrices (:class:`GhostSource`); :func:`build_ghost` is one
sample of it, so both give the same matrices bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ..errors import GhostProblemError
from ..protocol import Backend, ConeConstraints, Equalities, Objective, Solution, Status
from ..sparse_ops import no_rows, prune, row_norms, select_rows_batch, stack_rows
from .active_set import ActiveSet, block_slices


def without_stored_zeros(h: ConeConstraints, e: Equalities) -> tuple[ConeConstraints, Equalities]:
    """``(h, e)`` with the stored zeros of ``G`` and ``A`` dropped (copies).

    The engine's matrices live on the *structural* pattern (every entry a parameter can
    reach); a learnable dense ``G`` that currently holds a box has 500k stored entries at
    n = 500 and 1.5k nonzeros.  The ghost problem and the base-point check need only the
    nonzeros; the data gradient is still taken on the structural pattern."""
    return replace(h, G=prune(h.G)), replace(e, A=prune(e.A))


class GhostSource(NamedTuple):
    """What the ghost problem and the base-point check read of one sample's constraints.
    Everything but the vectors depends on the matrices only, so the layer forms it once
    per call for matrices the whole batch shares (:meth:`ffo_core.datamap.param_map.BoundData.\
ghost_source`)."""

    h: ConeConstraints  # without stored zeros (:func:`without_stored_zeros`)
    e: Equalities  # without stored zeros
    stacked: sp.csc_matrix  # [A; G] (G when p = 0): the ghost's equality rows are
    #                               one selection of these, not a selection and a stack
    G_row_norms: np.ndarray  # ||G_i||_2 per row, shape (m,)
    G_T: sp.csr_matrix  # G' (a view of G's arrays)

    @classmethod
    def of(cls, h: ConeConstraints, e: Equalities) -> GhostSource:
        h_nz, e_nz = without_stored_zeros(h, e)
        return cls(h_nz, e_nz, stack_rows(e_nz.A, h_nz.G), row_norms(h_nz.G), h_nz.G.T)


def build_ghost(
    source: GhostSource, active: ActiveSet, y: np.ndarray | None = None
) -> tuple[ConeConstraints, Equalities]:
    """The ghost's constraints for ``active``: the equalities and the locked rows as
    equalities, the kept cone blocks as cones, every other row dropped.

    The equality rows hold at ``A y' = b, G_L y' = h_L`` -- the active manifold of an exact
    solution -- or, given the forward point ``y``, *through y*: ``A y' = A y``,
    ``G_L y' = G_L y``.  The latter is what a one-sided difference wants, whose base point
    is ``y``: it keeps the difference free of the ``s*_L / delta`` error an inexact ``y``
    would add, and it keeps the ghost feasible whatever the forward solver's accuracy (at a
    degenerate vertex -- more locked rows than unknowns, as on OptNet's Sudoku --
    ``A y = b, G_L y = h_L`` is inconsistent by the forward's residuals, while rows through
    ``y`` always meet at ``y``).  A central difference, whose base point is the midpoint of
    two ghost solutions, is more accurate on the exact manifold.  One sample of
    :func:`build_ghosts`."""
    return build_ghosts([source], [active], [y])[0]


def build_ghosts(
    sources: Sequence[GhostSource],
    actives: Sequence[ActiveSet],
    ys: Sequence[np.ndarray | None],
) -> list[tuple[ConeConstraints, Equalities]]:
    """:func:`build_ghost` of every sample, ``sources[k]``, ``actives[k]`` and ``ys[k]``
    (None: the exact right-hand side) being sample ``k``'s: the ghost's equality rows
    ``[A; G_locked]`` are one row selection of the source's ``stacked``, its cone rows one
    of ``G``, and the samples that share a source (a layer's batch whose matrices are not
    batched) have theirs selected together (:func:`~ffo_core.sparse_ops.select_rows_batch`;
    the same matrices as one selection per sample, bit for bit)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, source in enumerate(sources):
        groups.setdefault((id(source.stacked), id(source.h.G)), []).append(k)
    out: list = [None] * len(sources)
    for ks in groups.values():
        stacked, G, p = sources[ks[0]].stacked, sources[ks[0]].h.G, sources[ks[0]].e.p
        locked = np.array([actives[k].locked for k in ks])  # (group, m)
        kept = np.array([actives[k].kept for k in ks])
        rows = np.concatenate([np.ones((len(ks), p), dtype=bool), locked], axis=1) if p else locked
        equalities = select_rows_batch(stacked, rows)
        cones = select_rows_batch(G, kept) if kept.any() else [no_rows(G.shape[1])] * len(ks)
        for j, k in enumerate(ks):
            h, e = sources[k].h, sources[k].e
            rhs = (
                np.concatenate([e.b, h.h[locked[j]]]) if ys[k] is None
                else equalities[j] @ ys[k]
            )  # fmt: skip
            out[k] = (
                ConeConstraints(cones[j], h.h[kept[j]], actives[k].kept_dims),
                Equalities(equalities[j], rhs),
            )
    return out


def solve_ghost(
    backend: Backend,
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    active: ActiveSet,
    ghost: tuple[ConeConstraints, Equalities],
    step: float,
    c: np.ndarray,
    c_dual: tuple[np.ndarray, np.ndarray] | None = None,
    previous: Solution | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], Solution]:
    """Solve the ghost at ``delta = step``: ``extra_linear_term = step * c``, and with dual
    upstream gradients ``c_dual = (c_nu, c_lam)`` the right-hand sides moved by
    ``-step * c_nu`` / ``-step * c_lam`` on the ghost's rows.  Returns ``(y, nu, lam)``
    full-size and the backend's Solution.

    ``lam`` has length ``m``: the locked rows' multipliers are the duals of their equality
    rows, the kept blocks' are the ghost's cone duals, dropped rows are 0.  ``previous``:
    the Solution of this same ghost at another step, for a backend that can reuse its
    set-up (the protocol's optional ``resolve``; a plain ``solve`` otherwise, and always
    when the right-hand sides move).
    """
    ghost_h, ghost_e = ghost
    if c_dual is not None:
        c_nu, c_lam = c_dual
        ghost_e = Equalities(
            ghost_e.A, ghost_e.b - step * np.concatenate([c_nu, c_lam[active.locked]])
        )
        ghost_h = ConeConstraints(ghost_h.G, ghost_h.h - step * c_lam[active.kept], ghost_h.dims)
        previous = None
    again = getattr(backend, "resolve", None) if previous is not None else None
    term = step * c
    sol_g = (
        again(previous, g, ghost_h, ghost_e, term)
        if again is not None
        else backend.solve(g, ghost_h, ghost_e, term)
    )
    if not sol_g.status.has_solution:
        pure_lp = not g.is_quadratic
        hint = (
            " The problem is a pure LP whose solution is not unique under a tilt of "
            "the objective, so its ghost problem is unbounded; add a small quadratic "
            "regulariser (e.g. `+ 1e-4 * cp.sum_squares(y)`) or use backward='kkt'."
            if pure_lp
            and sol_g.status
            in (Status.UNBOUNDED, Status.UNBOUNDED_INACCURATE, Status.NUMERICAL_ERROR)
            else ""
        )
        raise GhostProblemError(
            f"the ghost problem of the backward pass ended with status "
            f"{sol_g.status.value} ({getattr(backend, 'name', backend)}).{hint}",
            status=sol_g.status,
            backend=getattr(backend, "name", None),
        )
    p = e.p
    lam = np.zeros(h.m)
    lam[active.locked] = sol_g.eq_dual[p:]
    lam[active.kept] = sol_g.ineq_dual
    return (sol_g.primal, sol_g.eq_dual[:p], lam), sol_g


def base_point_error(
    source: GhostSource, sol: Solution, active: ActiveSet, y_up: np.ndarray, step: np.ndarray
) -> float:
    """How far the ghost's solution at ``delta = 0`` is from the forward point, relative
    to the step: the force ``||G_D' lam*_D||`` that the *dropped* rows' leftover
    multipliers exert on ``y*`` (an interior-point solver leaves them at ~gap/slack), over
    the force ``||delta c||`` of the perturbation.  (The ghost's locked rows pass through
    ``y*`` (:func:`build_ghost`), so the forward point is on the ghost's affine set; this
    force is what moves the ghost's own optimum away from it.)

    ~1e-6..1e-8 for strictly complementary problems solved to 1e-8, and 1e-4..1 near
    degenerate vertices or weakly inactive rows, where a one-sided difference fails.
    ``source`` holds ``G``'s row norms and transpose; the force is bounded first by
    ``sum_D |lam*_i| ||G_i||`` (one pass) and computed exactly only when that bound is not
    zero.  ``y_up`` (the ghost's primal at ``+delta``) is not needed by this measure and
    is kept for the signature of :func:`base_point_errors`.

    One sample of :func:`base_point_errors`.
    """
    return float(base_point_errors([source], [sol], [active], [y_up], [step])[0])


def base_point_errors(
    sources: Sequence[GhostSource],
    sols: Sequence[Solution],
    actives: Sequence[ActiveSet],
    y_ups: Sequence[np.ndarray],
    steps: Sequence[np.ndarray],
) -> np.ndarray:
    """:func:`base_point_error` of every sample (``sources[k]``, ``sols[k]``, ... being
    sample ``k``'s), shape ``(batch,)``.  Samples that share ``G`` (one source's row norms
    and transpose) are checked together, as elementwise operations on ``(group, m)``
    arrays and one product ``G' [leftover_1 ...]``; each sample's figure is the same
    whatever else is in its group."""
    out = np.zeros(len(sources))
    groups: dict[int, list[int]] = {}
    for k, source in enumerate(sources):
        groups.setdefault(id(source.h.G), []).append(k)
    for ks in groups.values():
        norms, G_T = sources[ks[0]].G_row_norms, sources[ks[0]].G_T
        ghost_rows = np.array([actives[k].ghost_rows for k in ks])  # (group, m)
        lam = np.array([sols[k].ineq_dual for k in ks])
        scale = np.linalg.norm(np.array([steps[k] for k in ks]), axis=1)
        leftover = np.where(ghost_rows, 0.0, lam)  # dropped rows' lam*
        error = np.zeros(len(ks))
        # row sums, not a matrix-vector product: BLAS may order a row's terms differently
        # for different group sizes, and a sample's figure must not depend on its group
        exact = (np.abs(leftover) * norms).sum(axis=1) > 0
        if exact.any():
            force = np.linalg.norm(G_T @ leftover[exact].T, axis=0)
            error[exact] = force / np.maximum(scale[exact], _TINY)
        out[ks] = error
    return out


_TINY = np.finfo(float).tiny


def curved_step(h: ConeConstraints, active: ActiveSet, sol: Solution, upper: tuple) -> float:
    """Largest relative change of a kept cone block over the ``+delta`` step: of its slack
    ``||G_k (y_up - y)|| / ||s_k||`` and of its multiplier ``||lam_up_k - lam_k|| /
    ||lam_k||``.  A block whose multiplier moves by ~100% can leave the cone's face inside
    the step (measured: an SOCP at scale 1e3 off by 30% with a 0.85 multiplier step)."""
    if not active.kept.any():
        return 0.0
    y_up, _, lam_up = upper
    moved = h.G @ (y_up - sol.primal)
    worst = 0.0
    for _, _, rows in block_slices(h.dims):
        if active.kept[rows].any():
            size = max(np.linalg.norm(sol.slack[rows]), active.tau_s)
            worst = max(worst, float(np.linalg.norm(moved[rows]) / size))
            lam_size = max(np.linalg.norm(sol.ineq_dual[rows]), active.tau_lam)
            worst = max(worst, float(np.linalg.norm(lam_up[rows] - sol.ineq_dual[rows]) / lam_size))
    return worst
