"""The fully first-order backward pass (FFOLayer; Zhao, Mo, Ho, Amos, Wang, ICML 2026).

Read this file top to bottom: it is the whole method.  Notation is the protocol's
(:mod:`ffo_core.protocol`): one sample

    minimize 1/2 y'Py + q'y   s.t.  A y = b (nu),   G y + s = h, s in K (lam in K*),

Lagrangian ``L = 1/2 y'Py + q'y + nu'(Ay - b) + lam'(Gy - h)``, forward solution
``(y*, nu*, lam*, s*)`` and upstream gradient ``c = dloss/dy``.

1. **Active set** (:mod:`ffo_core.engine.active_set`): nonnegative rows whose slack is numerically
   zero are *locked*; SOC/EXP/PSD blocks whose multiplier is nonzero are *kept*; the rest are
   dropped.
2. **Ghost problem**: the same objective plus ``delta * c'y``, the equalities, the locked rows
   as equalities ``G_L y = h_L``, and the kept cone blocks.  Solved by the *same backend*
   through ``solve(g, h, e, extra_linear_term=delta * c)``.
3. **Finite difference of Lagrangian gradients**.  With ``V(theta, delta)`` the ghost's
   optimal value, the envelope theorem gives ``dV/dtheta = grad_theta L`` at the ghost's
   primal-dual optimum, and ``d2V/(d delta d theta) = c' dy*/dtheta``, which is the
   hypergradient.  The design note differences ``grad_data L`` in delta directly:

       dq = (y_d - y*)/delta
       dP = (y_d y_d' - y* y*')/(2 delta)                      on P's pattern
       dA = (nu_d y_d' - nu* y*')/delta,   db = -(nu_d - nu*)/delta   on A's pattern
       dG = (lam_d y_d' - lam* y*')/delta, dh = -(lam_d - lam*)/delta  ghost rows only

   We compute the same limit in two steps: the finite difference of the ghost's
   primal-dual solution, ``w = (y_d - y*, nu_d - nu*, lam_d - lam*)/delta``, and then the
   *exact* derivative of the bilinear ``grad_data L`` along ``w``
   (:func:`lagrangian_gradient_derivative`), e.g. ``dA = nu* w_y' + w_nu y*'``.  By the
   identity ``u_d v_d' - u v' = u (v_d - v)' + (u_d - u) v_d'`` the two differ only by the
   truncation term ``delta * w_u w_v'``, which this form removes: for a polyhedral problem
   the ghost solution is affine in delta, so ``w`` and hence every term is exact up to
   solver accuracy even one-sided (the product form loses up to 70% on badly scaled
   instances of the conformance zoo).
   With ``central=True`` ``w`` is ``(ghost(+delta) - ghost(-delta))/(2 delta)`` and the base
   point is the midpoint of the two ghost solutions instead of the forward solution.
   ``P`` is stored full (both triangles), each stored entry an independent coordinate.
4. **Choosing delta**: the solver's error ``eps`` in ``y_d`` becomes ``eps/delta`` in the
   gradient, truncation grows with ``delta``.  We use a scale-aware step

       delta = kappa * (1 + ||y*||) / ||c||

   so ``delta * c`` moves the objective by a fixed fraction of the solution's scale whatever
   the loss's scale.  When the ghost keeps a curved cone block its solution is nonlinear in
   delta, and ``kappa`` defaults to the classical optimum for the solver's reported accuracy
   ``acc``: ``sqrt(acc)`` one-sided, ``acc**(1/3)`` central.  When it keeps none (every
   polyhedral problem) the ghost is an equality-constrained QP whose solution is *affine* in
   delta: there is no truncation error at all, so ``kappa = 1``.  A step of the solution's
   own size divides both the solver's error and the forward point's error (an
   interior-point solution near a degenerate vertex is only ~sqrt(gap) accurate) by a
   ~1e4 larger delta than ``sqrt(acc)`` would, and one ghost solve suffices where a small
   step needed the central difference's second solve to be accurate.

5. **Batches** (:func:`ffo_backward_batch`, what the layers call): the steps above for every
   sample, in three passes over the batch -- plan (steps 1, 4, and the ghost of step 2),
   solve (the ghosts, in the layer's thread pool), finish (step 3) -- rather than sample by
   sample.  Each sample gets exactly the result of a lone :func:`ffo_backward`.

The engine maps the data gradient back to parameters with ``M.T``
(:mod:`ffo_core.datamap.param_map`).
Nothing here forms or factorises a KKT matrix or a Hessian: the only linear algebra is
row selection and entrywise products on the data's sparsity pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ..errors import GhostProblemError
from ..protocol import Backend, ConeConstraints, ConeDims, Equalities, Objective, Solution, Status
from ..sparse_ops import no_rows, prune, row_norms, select_rows_batch, stack_rows
from .active_set import DEFAULT_ACCURACY, ActiveSet, block_slices, classify_batch


@dataclass
class FFOOptions:
    """Knobs of the first-order backward.

    delta:    absolute perturbation; ``None`` (default) chooses it scale-aware (step 4).
    kappa:    relative perturbation used when ``delta`` is None; ``None``: 1 when the ghost
              keeps no curved cone block (it is then affine in delta, step 4), else derived
              from the solver's accuracy (``sqrt(acc)``, or ``acc**(1/3)`` when central),
              clipped to [1e-5, 1e-2] (a ghost solve is rarely more accurate than
              1e-10 relative, whatever the forward accuracy).
    central:  two ghost solves at ``+delta`` and ``-delta`` (second-order accurate; exact
              for QPs up to solver accuracy).  ``None`` (default): central when the ghost
              keeps a curved cone block (SOC/EXP/PSD: the ghost solution is then nonlinear
              in delta, and interior-point solutions on such cones are only ~sqrt(tol)
              accurate, too inexact a base point), one-sided otherwise.
    tau_s, tau_lam: active-set thresholds; ``None`` ties them to the solver's accuracy
              (see :mod:`ffo_core.engine.active_set`).
    base_check: one-sided differences use the forward solution as base point, so they
              are only as good as its accuracy *relative to the step*.  After the ghost
              solve :func:`base_point_error` estimates that ratio; above ``base_check`` the
              base point is not trusted and a second ghost solve at ``-delta`` makes the
              difference central (``diagnostics["central_fallback"]``).  ``None`` disables
              the check (always one solve).  The estimate tracks the true error (on the
              DFL QP through Clarabel the error vs the KKT gradient was 0.66x the estimate
              for every kappa from 1 to 1e5); with the affine step (kappa = 1) it is
              ~3e-5 there and the fallback does not fire, where with kappa = 1e-4 it was
              0.3 and every sample needed the second solve.
    max_curved_step: on curved cone blocks the ghost solution is nonlinear in delta and the
              truncation error grows with how far the step moves each kept block's slack
              and multiplier relative to their size.  If the ``+delta`` ghost moves some
              kept block by more than this fraction, delta is shrunk to match and the ghost
              re-solved (at most twice).  Measured on a badly scaled SOCP: relative step
              1e-1 -> gradient
              error 0.14; 1e-3 -> 6e-6.
    """

    delta: float | None = None
    kappa: float | None = None
    central: bool | None = None
    tau_s: float | None = None
    tau_lam: float | None = None
    base_check: float | None = 1e-3
    max_curved_step: float = 1e-2


class DataGradient:
    """Gradient of the loss with respect to one sample's problem data.

    ``P``, ``A``, ``G`` are aligned with the ``.data`` arrays of the sample's CSC matrices
    (the fixed sparsity pattern); ``q``, ``b``, ``h`` are dense.

    Made by :meth:`along` (what both backward passes return), the gradient is *low rank*:
    every matrix part is ``U V'`` on the pattern with ``U``, ``V`` built from ``base`` and
    ``direction`` (:func:`lagrangian_gradient_derivative`), and the pattern arrays are only
    formed when first read.  The engine never reads them: it sums the shared parameters'
    gradient over the batch as one rank-``2 batch`` product and evaluates the batched ones
    on the entries they touch (:mod:`ffo_core.datamap.param_map`).
    """

    def __init__(
        self,
        P: np.ndarray,
        q: np.ndarray,
        A: np.ndarray,
        b: np.ndarray,
        G: np.ndarray,
        h: np.ndarray,
        diagnostics: dict | None = None,
    ) -> None:
        self._matrices = {"P": P, "A": A, "G": G}
        self.q, self.b, self.h = q, b, h
        self.diagnostics = diagnostics if diagnostics is not None else {}
        #: ``(y, nu, lam)`` the derivative was taken at, and the direction ``d(y, nu,
        #: lam)/d delta`` per unit of ``c`` (set by :meth:`along`; lets a caller assemble
        #: gradients as low-rank products instead of reading the pattern arrays).
        self.base: tuple | None = None
        self.direction: tuple | None = None
        self._patterns: tuple | None = None

    @classmethod
    def along(
        cls, g: Objective, h: ConeConstraints, e: Equalities, base: tuple, direction: tuple
    ) -> DataGradient:
        """The derivative of ``grad_data L`` at ``base`` along ``direction`` (see
        :func:`lagrangian_gradient_derivative`), its matrix parts formed lazily."""
        y, nu, lam = (np.asarray(v, dtype=float) for v in base)
        wy, wnu, wlam = (np.asarray(v, dtype=float) for v in direction)
        grad = cls(None, wy, None, -wnu, None, -wlam)
        grad.base, grad.direction = (y, nu, lam), (wy, wnu, wlam)
        grad._patterns = {"P": g.P, "A": e.A, "G": h.G}
        return grad

    def _matrix(self, name: str) -> np.ndarray:
        value = self._matrices[name]
        if value is None:
            M = self._patterns[name] if self._patterns else None
            if M is None:
                value = np.zeros(0)
            else:
                (y, nu, lam), (wy, wnu, wlam) = self.base, self.direction
                u, wu, half = {"P": (y, wy, 0.5), "A": (nu, wnu, 1.0), "G": (lam, wlam, 1.0)}[name]
                r = M.indices  # (w_u)_i y_j + u_i (w_y)_j on M's pattern
                value = half * (wu[r] * _by_column(M, y) + u[r] * _by_column(M, wy))
            self._matrices[name] = value
        return value

    P = property(lambda self: self._matrix("P"))
    A = property(lambda self: self._matrix("A"))
    G = property(lambda self: self._matrix("G"))

    @property
    def low_rank(self) -> bool:
        """True when ``base``/``direction`` describe every part exactly."""
        return self.base is not None and self.direction is not None and self._patterns is not None

    def vector(self) -> np.ndarray:
        """Concatenation in the compiled data order ``[P | q | A | b | G | h]``."""
        return np.concatenate([self.P, self.q, self.A, self.b, self.G, self.h])

    def is_finite(self) -> bool:
        """True when every entry is finite (for a low-rank gradient: its factors, without
        forming the pattern arrays; an overflow of their products is caught where the
        parameter gradient is assembled)."""
        if self.low_rank:  # one check of the six factors joined: 7 against 21 us
            return bool(np.isfinite(np.concatenate((*self.base, *self.direction))).all())
        return all(np.isfinite(part).all() for part in self._parts())

    def _parts(self):
        return self.P, self.q, self.A, self.b, self.G, self.h


def _by_column(M: sp.csc_matrix, v: np.ndarray) -> np.ndarray:
    """``v[col]`` for every stored entry of CSC ``M`` (a repeat, cheaper than a gather)."""
    return np.repeat(v, np.diff(M.indptr))


#: ``kappa`` of a ghost without curved cone blocks (affine in delta, step 4).  The error
#: of the one-sided difference then falls as 1/kappa (measured on the DFL QP through
#: Clarabel: 2e-5 relative at 1, 2e-8 at 1e3, 2e-10 at 1e5), but a first-order solver
#: must reach a ghost solution kappa times the solution's scale: OSQP passes the whole
#: conformance suite at 1 and 10 and hits its iteration limit at 100.  ``kappa=`` (or
#: ``central=True``, exact for these ghosts) buys more accuracy per layer.
AFFINE_KAPPA = 1.0


def choose_delta(
    y: np.ndarray, c: np.ndarray, accuracy: float | None, options: FFOOptions, curved: bool = True
) -> float:
    """Step 4: the perturbation size for upstream gradient ``c`` at solution ``y``;
    ``curved``: the ghost keeps a curved cone block (else it is affine in delta)."""
    if options.delta is not None:
        return float(options.delta)
    kappa = options.kappa
    if kappa is None and not curved:
        kappa = AFFINE_KAPPA
    if kappa is None:
        acc = accuracy if accuracy and accuracy > 0 else DEFAULT_ACCURACY
        kappa = float(np.clip(acc ** (1 / 3) if options.central else np.sqrt(acc), 1e-5, 1e-2))
    return kappa * (1.0 + np.linalg.norm(y)) / np.linalg.norm(c)


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
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    active: ActiveSet,
    stacked: sp.csc_matrix | None = None,
) -> tuple[ConeConstraints, Equalities]:
    """Step 2: locked rows join the equalities; kept cone blocks stay cones; rest dropped.
    ``stacked``: ``[e.A; h.G]`` if the caller has it (:class:`GhostSource`).  One sample
    of :func:`build_ghosts`."""
    source = GhostSource(h, e, stacked if stacked is not None else stack_rows(e.A, h.G), None, None)
    return build_ghosts([source], [active])[0]


def build_ghosts(
    sources: Sequence[GhostSource], actives: Sequence[ActiveSet]
) -> list[tuple[ConeConstraints, Equalities]]:
    """:func:`build_ghost` of every sample, ``sources[k]`` and ``actives[k]`` being sample
    ``k``'s: the ghost's equality rows ``[A; G_locked]`` are one row selection of the
    source's ``stacked``, its cone rows one of ``G``, and the samples that share a source
    (a layer's batch whose matrices are not batched) have theirs selected together
    (:func:`~ffo_core.sparse_ops.select_rows_batch`; the same matrices as one selection
    per sample, bit for bit)."""
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
            out[k] = (
                ConeConstraints(cones[j], h.h[kept[j]], actives[k].kept_dims),
                Equalities(equalities[j], np.concatenate([e.b, h.h[locked[j]]])),
            )
    return out


def solve_ghost(
    backend: Backend,
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    active: ActiveSet,
    ghost: tuple[ConeConstraints, Equalities],
    step: np.ndarray,
    previous: Solution | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], Solution]:
    """Solve the ghost with ``extra_linear_term = step``; return ``(y, nu, lam)`` full-size
    and the backend's Solution.

    ``lam`` has length ``m``: the locked rows' multipliers are the duals of their equality
    rows, the kept blocks' are the ghost's cone duals, dropped rows are 0.  ``previous``:
    the Solution of this same ghost at another step, for a backend that can reuse its
    set-up (the protocol's optional ``resolve``; a plain ``solve`` otherwise).
    """
    ghost_h, ghost_e = ghost
    again = getattr(backend, "resolve", None) if previous is not None else None
    sol = (
        again(previous, g, ghost_h, ghost_e, step)
        if again is not None
        else backend.solve(g, ghost_h, ghost_e, step)
    )
    if not sol.status.has_solution:
        pure_lp = not g.is_quadratic
        hint = (
            " The problem is a pure LP whose solution is not unique under a tilt of "
            "the objective, so its ghost problem is unbounded; add a small quadratic "
            "regulariser (e.g. `+ 1e-4 * cp.sum_squares(y)`) or use backward='kkt'."
            if pure_lp
            and sol.status
            in (Status.UNBOUNDED, Status.UNBOUNDED_INACCURATE, Status.NUMERICAL_ERROR)
            else ""
        )
        raise GhostProblemError(
            f"the ghost problem of the backward pass ended with status "
            f"{sol.status.value} ({getattr(backend, 'name', backend)}).{hint}",
            status=sol.status,
            backend=getattr(backend, "name", None),
        )
    p = e.p
    lam = np.zeros(h.m)
    lam[active.locked] = sol.eq_dual[p:]
    lam[active.kept] = sol.ineq_dual
    return (sol.primal, sol.eq_dual[:p], lam), sol


def base_point_error(
    source: GhostSource, sol: Solution, active: ActiveSet, y_up: np.ndarray, step: np.ndarray
) -> float:
    """How much the forward point ``(y*, lam*)`` disagrees with the ghost at ``delta = 0``,
    relative to the step: the larger of

    * primal: the distance of ``y*`` to the locked hyperplanes, ``max |s*_i| / ||G_i||``
      over locked rows (``G_i y* - h_i = -s*_i`` up to the forward's primal residual, which
      also bounds how far ``y*`` is off the equalities), over ``||y_d - y*||``;
    * dual: the force ``||G_D' lam*_D||`` that the *dropped* rows' leftover multipliers
      exert on ``y*`` (an interior-point solver leaves them at ~gap/slack) over the force
      ``||delta c||`` of the perturbation.

    Both are ~1e-6..1e-8 for strictly complementary problems solved to 1e-8, and 1e-4..1
    near degenerate vertices or weakly inactive rows, where one-sided differences with a
    small step fail.  ``source`` holds ``G``'s row norms and transpose.  The force is first
    bounded by ``sum_D |lam*_i| ||G_i||`` (one dot product); only when that bound could
    exceed the primal part is it computed exactly (one pass over ``G``'s entries), so the
    result is exact either way.

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
    arrays and one product ``G' [leftover_1 ...]`` for those whose bound needs the exact
    force; each sample's figure is the same whatever else is in its group."""
    out = np.zeros(len(sources))
    groups: dict[int, list[int]] = {}
    for k, source in enumerate(sources):
        groups.setdefault(id(source.h.G), []).append(k)
    for ks in groups.values():
        norms, G_T = sources[ks[0]].G_row_norms, sources[ks[0]].G_T
        locked = np.array([actives[k].locked for k in ks])  # (group, m)
        ghost_rows = locked | np.array([actives[k].kept for k in ks])
        slack = np.array([sols[k].slack for k in ks])
        lam = np.array([sols[k].ineq_dual for k in ks])
        moved = np.linalg.norm(np.array([y_ups[k] - sols[k].primal for k in ks]), axis=1)
        scale = np.linalg.norm(np.array([steps[k] for k in ks]), axis=1)
        dist = np.where(locked, np.abs(slack) / np.maximum(norms, _TINY), 0.0)
        primal = dist.max(axis=1, initial=0.0) / np.maximum(moved, _TINY)
        leftover = np.where(ghost_rows, 0.0, lam)  # dropped rows' lam*
        error = primal
        # row sums, not a matrix-vector product: BLAS may order a row's terms differently
        # for different group sizes, and a sample's figure must not depend on its group
        exact = (np.abs(leftover) * norms).sum(axis=1) / scale > primal
        if exact.any():
            force = np.linalg.norm(G_T @ leftover[exact].T, axis=0) / scale[exact]
            error[exact] = np.maximum(primal[exact], force)
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


def lagrangian_gradient_derivative(
    g: Objective, h: ConeConstraints, e: Equalities, base: tuple, direction: tuple
) -> DataGradient:
    """Derivative of ``grad_data L`` at ``base = (y, nu, lam)`` along
    ``direction = (w_y, w_nu, w_lam)``, on the data's sparsity pattern:

        dP_ij = (w_y_i y_j + y_i w_y_j)/2,  dq = w_y,
        dA_ij = w_nu_i y_j + nu_i w_y_j,    db = -w_nu,
        dG_ij = w_lam_i y_j + lam_i w_y_j,  dh = -w_lam.
    """
    return DataGradient.along(g, h, e, base, direction)


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
) -> DataGradient:
    """Gradient of ``c'y*`` with respect to the sample's data, first-order only.

    ``source``: ``GhostSource.of(h, e)`` if the caller has it already (the layer prunes
    and stacks matrices shared by the whole batch once per call, not once per sample).
    Raises :class:`GhostProblemError` (with ``delta``) when a ghost solve fails."""
    (out,) = ffo_backward_batch([FFOSample(backend, g, h, e, sol, c, source)], options)
    if isinstance(out, GhostProblemError):
        raise out
    return out


#: Per-sample data (bytes, as the layers estimate it: ``sample_bytes()``) that a layer's
#: first-order backward keeps alive at once; it stages its batch in chunks of at most this.
BACKWARD_CHUNK_BYTES = 256 << 20


def backward_chunks(batch: int, sample_bytes: int) -> list[range]:
    """The batch indices in chunks that hold at most :data:`BACKWARD_CHUNK_BYTES` of
    per-sample data (``sample_bytes`` each; at least one sample per chunk): what a layer
    hands :func:`ffo_backward_batch` at a time."""
    step = max(1, BACKWARD_CHUNK_BYTES // max(1, sample_bytes))
    return [range(start, min(start + step, batch)) for start in range(0, batch, step)]


class FFOSample(NamedTuple):
    """One sample of :func:`ffo_backward_batch`: the backend its ghosts go to (the layers
    pass a per-sample guard that names the batch index), its data, forward solution and
    upstream gradient ``c = dloss/dy``; ``source`` as in :func:`ffo_backward`."""

    backend: Backend
    g: Objective
    h: ConeConstraints
    e: Equalities
    sol: Solution
    c: np.ndarray
    source: GhostSource | None = None


def ffo_backward_batch(
    samples: Sequence[FFOSample],
    options: FFOOptions | None = None,
    run: Callable[[Callable[[int], None], int], object] | None = None,
) -> list[DataGradient | GhostProblemError]:
    """:func:`ffo_backward` of every sample, in three passes over the batch:

    1. plan: step 1 for all samples at once (:func:`_active_sets`), then step 4 and 2's
       construction (:func:`_plans`) -- the active set, delta and ghost of every sample;
    2. solve (:func:`_solve`): every sample's ghost at ``+delta`` (and ``-delta`` when the
       difference is central), through ``run(fn, count)``, which calls ``fn(i)`` for
       every index (the layers pass their thread pool; default: in order);
    3. finish: the base-point check of all samples at once (:func:`_base_errors`), then
       per sample (:func:`_finish`) its fallback solve at ``-delta`` when it failed
       (rarely) and step 3.

    Each sample goes through exactly the steps, in the order, of a lone call; only the
    interleaving across samples differs.  Running one kind of step over the whole batch
    keeps the interpreter's and the CPU's caches on that step instead of cycling through
    a solver's set-up between each: measured on the DFL QP (n = 200-1000, batch 8 and 32,
    paired against the bare ghost solves) the backward fell by 7-15%.  Memory: every
    sample's ghost problem is alive until pass 3 (the layers split large batches,
    :data:`BACKWARD_CHUNK_BYTES`).

    Returns one entry per sample: its :class:`DataGradient`, or the
    :class:`GhostProblemError` (with ``delta``) its ghost solve raised, for the caller's
    fallback policy.  Other errors propagate.
    """
    options = options or FFOOptions()
    live = [k for k, s in enumerate(samples) if np.any(s.c)]
    actives = dict(zip(live, _active_sets([samples[k] for k in live], options)))
    plans = _plans(samples, actives, options)

    def solve(i: int) -> None:
        if isinstance(plans[i], _Ghost):
            try:
                _solve(plans[i], options)
            except GhostProblemError as exc:
                plans[i] = exc

    if run is None:
        for i in range(len(plans)):
            solve(i)
    else:
        run(solve, len(plans))
    base_errors = _base_errors(plans, options)
    out = []
    for k, plan in enumerate(plans):
        if isinstance(plan, _Ghost):
            try:
                plan = _finish(plan, options, base_errors.get(k))
            except GhostProblemError as exc:
                plan = exc
        out.append(plan)
    return out


@dataclass
class _Ghost:
    """One sample's backward between the passes of :func:`ffo_backward_batch`."""

    s: FFOSample
    active: ActiveSet
    central: bool  # decided up front (curved blocks, or asked for)
    delta: float
    source: GhostSource
    ghost: tuple[ConeConstraints, Equalities] | None  # set once the batch's are built
    upper: tuple | None = None  # ghost solution (y, nu, lam) at +delta
    lower: tuple | None = None  # ... at -delta (central differences)


def _active_sets(samples: Sequence[FFOSample], options: FFOOptions) -> list[ActiveSet]:
    """Step 1 of every sample: one :func:`~ffo_core.engine.active_set.classify_batch` per cone
    layout (a layer's samples share one), each result exactly a lone ``classify``."""
    groups: dict[ConeDims, list[int]] = {}
    for k, s in enumerate(samples):
        groups.setdefault(s.h.dims, []).append(k)
    out: list = [None] * len(samples)
    for dims, ks in groups.items():
        found = classify_batch(
            [samples[k].sol for k in ks],
            dims,
            tau_s=options.tau_s,
            tau_lam=options.tau_lam,
            rhs=[samples[k].h.h for k in ks],
        )
        for k, active in zip(ks, found):
            out[k] = active
    return out


def _plans(
    samples: Sequence[FFOSample], actives: dict[int, ActiveSet], options: FFOOptions
) -> list[_Ghost | DataGradient]:
    """Pass 1: step 4 and the ghost problem of step 2 (:func:`build_ghosts`, the samples
    that share matrices together) for the active sets of step 1 (:func:`_active_sets`,
    ``actives[k]`` for sample ``k``); a zero gradient for a sample with ``c = 0`` (no
    loss through it: nothing to solve, it has no active set)."""
    plans: list = [None] * len(samples)
    live, sources = [], []
    as_central: dict[bool, FFOOptions] = {}  # options with `central` decided
    for k, s in enumerate(samples):
        y, nu, lam = s.sol.primal, s.sol.eq_dual, s.sol.ineq_dual
        if k not in actives:
            plans[k] = DataGradient.along(
                s.g,
                s.h,
                s.e,
                (y, nu, lam),
                (np.zeros_like(y), np.zeros_like(nu), np.zeros_like(lam)),
            )
            continue
        active = actives[k]
        curved = bool(active.kept.any())
        central = bool(options.central if options.central is not None else curved)
        if central not in as_central:
            as_central[central] = replace(options, central=central)
        delta = choose_delta(y, s.c, s.sol.info.accuracy, as_central[central], curved)
        source = s.source if s.source is not None else GhostSource.of(s.h, s.e)
        plans[k] = _Ghost(s, active, central, delta, source, None)
        live.append(k)
        sources.append(source)
    ghosts = build_ghosts(sources, [actives[k] for k in live])
    for k, ghost in zip(live, ghosts):
        plans[k].ghost = ghost
    return plans


def _ghost_at(
    plan: _Ghost, step: float, previous: Solution | None = None
) -> tuple[tuple, Solution]:
    """The ghost solution at ``delta = step`` (:func:`solve_ghost`; ``previous``: this
    ghost's Solution at another step); a failure says which step failed."""
    s = plan.s
    try:
        return solve_ghost(s.backend, s.g, s.h, s.e, plan.active, plan.ghost, step * s.c, previous)
    except GhostProblemError as exc:
        if exc.delta is None:
            exc.delta = abs(step)
            exc.args = (f"{exc.args[0] if exc.args else exc} (delta={abs(step):.3g})",)
        raise


def _solve(plan: _Ghost, options: FFOOptions) -> None:
    """Pass 2: the ghost at ``+delta``, shrinking delta while it moves a curved block out
    of its linear range (at most twice), and at ``-delta`` when central.  Each solve after
    the first hands the backend the previous Solution (``resolve``: Clarabel then updates
    ``q`` instead of setting the same ghost up again); it is dropped when this returns."""
    plan.upper, sol = _ghost_at(plan, plan.delta)
    for _ in range(2):
        moved = curved_step(plan.s.h, plan.active, plan.s.sol, plan.upper)
        if moved <= options.max_curved_step or options.delta is not None:
            break
        plan.delta *= options.max_curved_step / moved
        plan.upper, sol = _ghost_at(plan, plan.delta, sol)
    if plan.central:
        plan.lower, _ = _ghost_at(plan, -plan.delta, sol)


def _base_errors(plans: Sequence, options: FFOOptions) -> dict[int, float]:
    """Pass 3's base-point check (:func:`base_point_errors`) of every one-sided plan whose
    ghost was solved, by index into ``plans``; none when ``options.base_check`` is None."""
    checked = [
        k
        for k, plan in enumerate(plans)
        if isinstance(plan, _Ghost) and not plan.central and options.base_check is not None
    ]
    if not checked:
        return {}
    errors = base_point_errors(
        [plans[k].source for k in checked],
        [plans[k].s.sol for k in checked],
        [plans[k].active for k in checked],
        [plans[k].upper[0] for k in checked],
        [plans[k].delta * plans[k].s.c for k in checked],
    )
    return dict(zip(checked, errors.tolist()))


def _finish(plan: _Ghost, options: FFOOptions, base_error: float | None) -> DataGradient:
    """Pass 3: for a one-sided difference whose base-point check (:func:`_base_errors`)
    gave ``base_error`` above ``options.base_check``, the ghost at ``-delta`` too (the
    difference becomes central); then step 3."""
    s, active, delta = plan.s, plan.active, plan.delta
    y, nu, lam = s.sol.primal, s.sol.eq_dual, s.sol.ineq_dual
    forward = (y, nu, np.where(active.ghost_rows, lam, 0.0))
    fallback = False
    if base_error is not None:
        fallback = base_error > options.base_check
        if fallback:  # a fresh solve: pass 2 kept no Solution
            plan.lower, _ = _ghost_at(plan, -delta)
    if plan.lower is not None:
        direction = tuple((u - w) / (2 * delta) for u, w in zip(plan.upper, plan.lower))
        base = tuple((u + w) / 2 for u, w in zip(plan.upper, plan.lower))
    else:
        direction = tuple((u - f) / delta for u, f in zip(plan.upper, forward))
        base = forward
    grad = lagrangian_gradient_derivative(s.g, s.h, s.e, base, direction)
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


__all__ = [
    "ConeDims",
    "DataGradient",
    "FFOOptions",
    "FFOSample",
    "GhostSource",
    "backward_chunks",
    "build_ghost",
    "choose_delta",
    "ffo_backward",
    "ffo_backward_batch",
    "lagrangian_gradient_derivative",
]
