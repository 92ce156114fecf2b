"""The fully first-order backward pass of one sample (FFOLayer; Zhao, Mo, Ho, Amos, Wang,
ICML 2026).  Read this file top to bottom: it is the whole method, and
:func:`ffo_backward` at its end runs the steps in this order.

Notation is the protocol's (:mod:`ffo_core.protocol`): one sample

    minimize 1/2 y'Py + q'y   s.t.  A y = b (nu),   G y + s = h, s in K (lam in K*),

Lagrangian ``L = 1/2 y'Py + q'y + nu'(Ay - b) + lam'(Gy - h)``, forward solution
``(y*, nu*, lam*, s*)`` and upstream gradient ``c = dloss/dy`` (and, when the layer returns
duals, ``c_nu = dloss/dnu``, ``c_lam = dloss/dlam``).

1. **Active set** (:mod:`.active_set`): nonnegative rows whose slack is numerically zero
   are *locked*; SOC/EXP/PSD blocks whose multiplier is nonzero are *kept*; the rest are
   dropped.
2. **Step size** (:func:`choose_delta`): the solver's error ``eps`` in the ghost's solution
   becomes ``eps/delta`` in the gradient, truncation grows with ``delta``.  We use a
   scale-aware step

       delta = kappa * (1 + ||y*||) / ||c||

   so ``delta * c`` moves the objective by a fixed fraction of the solution's scale whatever
   the loss's scale.  When the ghost keeps a curved cone block its solution is nonlinear in
   delta, and ``kappa`` defaults to the classical optimum for the solver's reported accuracy
   ``acc``: ``sqrt(acc)`` one-sided, ``acc**(1/3)`` central.  When it keeps none (every
   polyhedral problem) the ghost is an equality-constrained QP whose solution is *affine*
   in delta: there is no truncation error, so ``kappa = 1`` (a step of the solution's own
   size divides the solvers' errors by the largest possible delta).
3. **Ghost problem** (:mod:`.ghost`): the same objective plus ``delta * c'y``, the
   equalities, the locked rows as equalities, and the kept cone blocks; solved by the
   *same backend* through ``solve(g, h, e, extra_linear_term=delta * c)``.  Duals as
   outputs perturb the right-hand sides too: ``b - delta c_nu`` and ``h - delta c_lam`` on
   the ghost's rows, since ``d/d delta`` of the ghost's optimal value is then
   ``c'y + c_nu'nu + c_lam'lam``.  The locked rows are locked *where the forward point
   has them* (``G_L y = G_L y*``, ``A y = A y*``): the equalities then hold at ``y*``
   exactly, so the ghost is feasible whenever the forward solve was accepted, even at a
   degenerate vertex where more rows are locked than there are unknowns (:mod:`.ghost`).
4. **Finite difference of Lagrangian gradients**.  With ``V(theta, delta)`` the ghost's
   optimal value, the envelope theorem gives ``dV/dtheta = grad_theta L`` at the ghost's
   primal-dual optimum, and ``d2V/(d delta d theta)`` is the hypergradient.  We compute
   it in two steps: the finite difference of the ghost's primal-dual solution,
   ``w = (y_d - y*, nu_d - nu*, lam_d - lam*)/delta``, and then the *exact* derivative of
   the bilinear ``grad_data L`` along ``w`` (:mod:`.data_gradient`), e.g.
   ``dA = nu* w_y' + w_nu y*'``.  Differencing ``grad_data L`` itself would add the
   truncation term ``delta * w_u w_v'``, which this form removes: for a polyhedral problem
   ``w`` and hence every term is exact up to solver accuracy even one-sided.

   One-sided differences use the forward solution as base point, so they are only as good
   as its accuracy *relative to the step*: :func:`~.ghost.base_point_error` estimates that
   ratio after the ghost solve, and above ``options.base_check`` a second ghost solve at
   ``-delta`` makes the difference central.  Central differences (``central=True``, and by
   default on curved cones) take ``w = (ghost(+delta) - ghost(-delta))/(2 delta)`` at the
   midpoint of the two ghost solutions.

The batch version, :func:`ffo_core.engine.schedule.ffo_backward_batch`, runs these steps
over a whole batch (each step vectorised where it can be) and gives every sample what
:func:`ffo_backward` gives it: exactly for per-sample backends, up to rounding for
polyhedral batches on a batched backend (:mod:`ffo_core.engine.batch_backward`).  The
engine maps the data gradient back to parameters with ``M'``
(:mod:`ffo_core.datamap.param_map`).  Nothing here forms or factorises a KKT
matrix or a Hessian: the only linear algebra is row selection and entrywise products on the
data's sparsity pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import ConfigError, GhostProblemError
from ..protocol import Backend, ConeConstraints, Equalities, Objective, Solution
from .active_set import DEFAULT_ACCURACY, ActiveSet, classify
from .data_gradient import DataGradient, lagrangian_gradient_derivative
from .ghost import (
    GhostSource,
    base_point_error,
    build_ghost,
    curved_step,
    solve_ghost,
)
from .solves import tightened


@dataclass(frozen=True)
class FFOOptions:
    """Knobs of the first-order backward (validated when made; all optional).

    delta:    absolute perturbation, > 0; ``None`` (default) chooses it scale-aware (step 2).
    kappa:    relative perturbation (> 0) used when ``delta`` is None; ``None``: 1 when the
              ghost keeps no curved cone block (it is then affine in delta), else derived
              from the solver's accuracy (``sqrt(acc)``, or ``acc**(1/3)`` when central),
              clipped to [1e-5, 1e-2].
    central:  two ghost solves at ``+delta`` and ``-delta``.  ``None`` (default): central
              when the ghost keeps a curved cone block (SOC/EXP/PSD: the ghost solution is
              then nonlinear in delta), one-sided otherwise.
    tau_s, tau_lam: active-set thresholds (>= 0); ``None`` ties them to the solver's
              accuracy (see :mod:`ffo_core.engine.active_set`).
    base_check: the largest base-point error (step 4, >= 0) a one-sided difference accepts
              before it adds the ``-delta`` solve; ``None``: never checked.
    max_curved_step: on curved cone blocks, the largest relative move of a kept block's
              slack or multiplier over the ``+delta`` step; a larger one shrinks delta to
              match and solves the ghost again (at most twice).
    """

    delta: float | None = None
    kappa: float | None = None
    central: bool | None = None
    tau_s: float | None = None
    tau_lam: float | None = None
    base_check: float | None = 1e-3
    max_curved_step: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("delta", "kappa", "max_curved_step"):
            _positive(name, getattr(self, name))
        for name in ("tau_s", "tau_lam", "base_check"):
            value = getattr(self, name)
            if value is not None and (not _number(value) or value < 0):
                raise ConfigError(f"{name} must be a finite number >= 0 or None, got {value!r}")
        if self.central not in (None, True, False):
            raise ConfigError(f"central must be True, False or None, got {self.central!r}")


def _number(x) -> bool:
    return (
        isinstance(x, (int, float, np.integer, np.floating))
        and not isinstance(x, bool)
        and math.isfinite(float(x))
    )


def _positive(name: str, value) -> None:
    if value is not None and (not _number(value) or value <= 0):
        raise ConfigError(f"{name} must be a finite number > 0 or None, got {value!r}")


# -- step 2: the step size ---------------------------------------------------------------
#: ``kappa`` of a ghost without curved cone blocks (affine in delta).  The error of the
#: one-sided difference then falls as 1/kappa, but a first-order solver must reach a ghost
#: solution kappa times the solution's scale away; ``kappa=`` (or ``central=True``, exact
#: for these ghosts) buys more accuracy per layer.
AFFINE_KAPPA = 1.0


def choose_delta(
    y: np.ndarray, c: np.ndarray, accuracy: float | None, options: FFOOptions, curved: bool = True
) -> float:
    """The perturbation size for upstream gradient ``c`` at solution ``y``; ``curved``:
    the ghost keeps a curved cone block (else it is affine in delta)."""
    if options.delta is not None:
        return float(options.delta)
    kappa = options.kappa
    if kappa is None and not curved:
        kappa = AFFINE_KAPPA
    if kappa is None:
        acc = accuracy if accuracy and accuracy > 0 else DEFAULT_ACCURACY
        kappa = float(np.clip(acc ** (1 / 3) if options.central else np.sqrt(acc), 1e-5, 1e-2))
    return kappa * (1.0 + np.linalg.norm(y)) / np.linalg.norm(c)


# -- steps 3 and 4 for one sample, in the order they run ---------------------------------
@dataclass
class GhostPlan:
    """One sample's backward between its steps: what step 1-2 decided, the ghost of step
    3 and its solutions.  ``c_dual``: the upstream gradient of the duals ``(c_nu, c_lam)``,
    or None when the layer returns only primal variables."""

    backend: Backend
    g: Objective
    h: ConeConstraints
    e: Equalities
    sol: Solution
    c: np.ndarray
    c_dual: tuple[np.ndarray, np.ndarray] | None
    active: ActiveSet
    central: bool  # decided up front (curved blocks, or asked for)
    delta: float
    source: GhostSource
    ghost: tuple[ConeConstraints, Equalities] | None = None  # built by build_ghost(s)
    upper: tuple | None = None  # ghost solution (y, nu, lam) at +delta
    lower: tuple | None = None  # ... at -delta (central differences)
    tight: Backend | None = None  # the tightened backend of a curved ghost, made once

    def through(self) -> np.ndarray | None:
        """The point the ghost's equality rows pass through (:func:`~.ghost.build_ghost`):
        the forward solution for a one-sided difference, whose base point it is; None
        (the exact right-hand sides) for a central one."""
        return None if self.central else self.sol.primal


def plan(
    backend: Backend,
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    sol: Solution,
    c: np.ndarray,
    active: ActiveSet,
    options: FFOOptions,
    source: GhostSource | None = None,
    c_dual: tuple[np.ndarray, np.ndarray] | None = None,
) -> GhostPlan:
    """Step 2 for an active set of step 1: central or not, and delta."""
    curved = bool(active.kept.any())
    central = bool(options.central if options.central is not None else curved)
    size = np.concatenate([c, *c_dual]) if c_dual is not None else c
    decided = options if options.central == central else replace(options, central=central)
    delta = choose_delta(sol.primal, size, sol.info.accuracy, decided, curved)
    return GhostPlan(
        backend, g, h, e, sol, c, c_dual, active, central, delta,
        source if source is not None else GhostSource.of(h, e),
    )  # fmt: skip


def _ghost_at(plan: GhostPlan, step: float, previous: Solution | None = None):
    """The ghost solution at ``delta = step`` (:func:`~.ghost.solve_ghost`; ``previous``:
    this ghost's Solution at another step); a failure says which step failed.  A ghost
    that keeps a curved cone block is solved by the backend's tightened copy
    (:func:`~.solves.tightened`): its point is only ~sqrt(tolerance) accurate on the cone,
    and measured on the conformance zoo's SOC/EXP/PSD instances a ghost solved to 1e-11
    under a forward solved to 1e-8 is as accurate as both at 1e-11."""
    backend = plan.backend
    if plan.active.kept.any():
        backend = plan.tight if plan.tight is not None else tightened(backend)
        plan.tight = backend
    try:
        return solve_ghost(
            backend, plan.g, plan.h, plan.e, plan.active, plan.ghost,
            step, plan.c, plan.c_dual, previous,
        )  # fmt: skip
    except GhostProblemError as exc:
        if exc.delta is None:
            exc.delta = abs(step)
            exc.args = (f"{exc.args[0] if exc.args else exc} (delta={abs(step):.3g})",)
        raise


def solve_plan(plan: GhostPlan, options: FFOOptions) -> None:
    """Step 3's solves: the ghost at ``+delta``, shrinking delta while it moves a curved
    block out of its linear range (at most twice), and at ``-delta`` when central.  Each
    solve after the first hands the backend the previous Solution (the protocol's optional
    ``resolve``: set-up reused); it is dropped when this returns."""
    plan.upper, sol = _ghost_at(plan, plan.delta)
    for _ in range(2):
        moved = curved_step(plan.h, plan.active, plan.sol, plan.upper)
        if moved <= options.max_curved_step or options.delta is not None:
            break
        plan.delta *= options.max_curved_step / moved
        plan.upper, sol = _ghost_at(plan, plan.delta, sol)
    if plan.central:
        plan.lower, _ = _ghost_at(plan, -plan.delta, sol)


def finish(plan: GhostPlan, options: FFOOptions, base_error: float | None) -> DataGradient:
    """Step 4: for a one-sided difference whose base-point error (:func:`base_error`) is
    above ``options.base_check``, the ghost at ``-delta`` too (the difference becomes
    central); then the difference and the derivative of ``grad_data L`` along it."""
    active, delta, sol = plan.active, plan.delta, plan.sol
    forward = (sol.primal, sol.eq_dual, np.where(active.ghost_rows, sol.ineq_dual, 0.0))
    fallback = base_error is not None and base_error > options.base_check
    if fallback and plan.lower is None:  # a fresh solve: step 3 kept no Solution
        plan.lower, _ = _ghost_at(plan, -delta)
    if plan.lower is not None:
        direction = tuple((u - w) / (2 * delta) for u, w in zip(plan.upper, plan.lower))
        base = tuple((u + w) / 2 for u, w in zip(plan.upper, plan.lower))
    else:
        direction = tuple((u - f) / delta for u, f in zip(plan.upper, forward))
        base = forward
    grad = lagrangian_gradient_derivative(plan.g, plan.h, plan.e, base, direction)
    grad.diagnostics = {
        "delta": delta,
        "central": plan.lower is not None,
        "locked": int(np.count_nonzero(active.locked)),
        "kept": int(np.count_nonzero(active.kept)),
        "weak": int(np.count_nonzero(active.weak)),
        "weak_blocks": int(np.count_nonzero(active.weak_blocks)),
        "tau_s": active.tau_s,
        "tau_lam": active.tau_lam,
        "central_fallback": bool(fallback),
        "base_error": base_error,
    }
    return grad


def base_error(plan: GhostPlan, options: FFOOptions) -> float | None:
    """Step 4's check of a one-sided plan (:func:`~.ghost.base_point_error`); None when
    the difference is central or the check is off."""
    if plan.central or options.base_check is None:
        return None
    return base_point_error(plan.source, plan.sol, plan.active, plan.upper[0], plan.delta * plan.c)


def zero_gradient(g: Objective, h: ConeConstraints, e: Equalities, sol: Solution) -> DataGradient:
    """The gradient of a sample no loss reaches (``c = 0``): zero, nothing solved."""
    y, nu, lam = sol.primal, sol.eq_dual, sol.ineq_dual
    zeros = (np.zeros_like(y), np.zeros_like(nu), np.zeros_like(lam))
    return lagrangian_gradient_derivative(g, h, e, (y, nu, lam), zeros)


# -- the whole method for one sample ------------------------------------------------------
def ffo_backward(
    backend: Backend,
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    sol: Solution,
    c: np.ndarray,
    options: FFOOptions | None = None,
    *,
    source: GhostSource | None = None,
    c_dual: tuple[np.ndarray, np.ndarray] | None = None,
) -> DataGradient:
    """Gradient of ``c'y* (+ c_nu'nu* + c_lam'lam*)`` with respect to the sample's data,
    first-order only.  ``source``: ``GhostSource.of(h, e)`` if the caller has it.
    Raises :class:`GhostProblemError` (with ``delta``) when a ghost solve fails."""
    options = options or FFOOptions()
    if not (np.any(c) or (c_dual is not None and any(np.any(v) for v in c_dual))):
        return zero_gradient(g, h, e, sol)
    active = classify(sol, h.dims, tau_s=options.tau_s, tau_lam=options.tau_lam, rhs=h.h)  # 1
    planned = plan(backend, g, h, e, sol, c, active, options, source, c_dual)  # 2
    planned.ghost = build_ghost(planned.source, active, planned.through())  # 3
    solve_plan(planned, options)
    return finish(planned, options, base_error(planned, options))  # 4


__all__ = [
    "AFFINE_KAPPA",
    "FFOOptions",
    "GhostPlan",
    "choose_delta",
    "ffo_backward",
]
