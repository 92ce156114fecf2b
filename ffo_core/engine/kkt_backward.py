"""The exact reference backward: implicit differentiation of the KKT conditions.

This is the yardstick the first-order path is measured against, and the ``backward="kkt"``
mode of the layers.  Unlike :mod:`ffo_core.engine.ffo_backward` it *does* factorise a matrix.

Polyhedral problems (zero and nonnegative cones).  With the active set ``L`` of
:mod:`ffo_core.engine.active_set` fixed, the solution is locally that of the equality QP
``min 1/2 y'Py + q'y s.t. Ay = b, G_L y = h_L``; perturbing the objective by ``delta * c``
moves ``(y, nu, lam_L)`` at rate ``(z, z_nu, z_L)`` solving the reduced KKT system

    [ P   A'  G_L' ] [ z    ]   [ -c ]
    [ A   0   0    ] [ z_nu ] = [  0 ]
    [ G_L 0   0    ] [ z_L  ]   [  0 ]

(sparse LU).  The hypergradient is then the derivative of ``grad_data L`` along that
direction, i.e. exactly the ``delta -> 0`` limit of the first-order finite difference:
``dq = z``, ``dP = (z y' + y z')/2``, ``dA = z_nu y' + nu z'``, ``db = -z_nu``,
``dG_L = z_L y' + lam_L z'``, ``dh_L = -z_L``.  Because ``grad_data L`` is a quadratic
function of ``(y, nu, lam)``, its directional derivative equals the central difference
``[f(x + w) - f(x - w)] / 2`` exactly; both modes evaluate it with one function,
:func:`ffo_core.engine.ffo_backward.lagrangian_gradient_derivative`.

Cone programs (SOC, EXP, PSD blocks; :func:`kkt_backward_cones`).  For each row block ``k``
put ``v_k = lam_k - s_k``.  Moreau's decomposition (:mod:`ffo_core.engine.kkt_cones`) gives
``lam_k = Pi_{K_k*}(v_k)`` and ``s_k = lam_k - v_k``, which encode ``s in K``,
``lam in K*`` and ``s'lam = 0`` at once, so the KKT conditions are the equations

    R(y, nu, v) = [ P y + q + A'nu + G' Pi_{K*}(v) ]
                  [ A y - b                         ]  = 0
                  [ G y + Pi_{K*}(v) - v - h        ]

(the residual map of diffcp, written for our QP form rather than the homogeneous
embedding).  With ``D = D Pi_{K*}(v)`` (block diagonal), perturbing ``q`` by ``delta * c``
moves ``(y, nu, v)`` at rate ``(z, z_nu, dv)`` solving

    [ P   A'  G'D   ] [ z    ]   [ -c ]
    [ A   0   0     ] [ z_nu ] = [  0 ]
    [ G   0   D - I ] [ dv   ]   [  0 ]

and ``lam`` at rate ``z_lam = D dv``.  The hypergradient is, as in the polyhedral case,
the derivative of ``grad_data L`` along ``(z, z_nu, z_lam)`` (envelope theorem), so both
modes share :func:`~ffo_core.engine.ffo_backward.lagrangian_gradient_derivative` and the
result is the
``delta -> 0`` limit of what the first-order path computes.  Only the rows the first-order
ghost problem keeps enter the system: locked nonnegative rows (``D = 1``) and kept cone
blocks (``D = D Pi_{K*}(v_k)``); dropped rows have ``D = 0``, so their ``dv`` decouples and
``z_lam = 0`` there.  Weakly active cone blocks (multiplier and distance to the boundary
both numerically zero; kept as cones by the first-order ghost) are non-differentiable
points: this mode takes ``D = 0`` for them, the one-sided derivative in which the block
stays inactive, and reports them in ``diagnostics["weak"]``.  Problems with zero and
nonnegative cones only take the polyhedral path above, unchanged.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ..errors import SolverError
from ..protocol import ConeConstraints, Equalities, Objective, Solution
from . import kkt_cones
from .active_set import ActiveSet, block_slices, classify
from .data_gradient import DataGradient, lagrangian_gradient_derivative


def _solve_kkt(K: sp.csc_matrix, rhs: np.ndarray, n: int) -> np.ndarray:
    """Solve the reduced KKT system; if it is singular, regularise the multiplier block.

    Dependent active constraints (LICQ fails: e.g. a budget row implied by locked bounds)
    make ``K`` singular although ``z`` is still unique when ``P`` is positive definite on
    the null space of the constraints; only the multipliers are not.  We then solve the
    quasi-definite ``[[P, C'], [C, -rho I]]`` and refine against ``K`` (a few steps of
    iterative refinement), which converges to the minimum-norm multipliers and the unique
    ``z``.  If even that fails (an LP with a non-unique solution) we raise.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", spla.MatrixRankWarning)
            return spla.splu(K).solve(rhs)
    except (RuntimeError, spla.MatrixRankWarning):
        pass
    scale = max(1.0, float(abs(K).max()))
    reg = sp.diags(np.r_[np.zeros(n), -1e-10 * scale * np.ones(K.shape[0] - n)])
    try:
        lu = spla.splu((K + reg).tocsc())
    except RuntimeError as exc:
        raise SolverError(
            "backward='kkt': the reduced KKT matrix is singular (for an LP, a non-unique "
            "solution; add a small quadratic regulariser)"
        ) from exc
    w = lu.solve(rhs)
    for _ in range(5):
        w = w + lu.solve(rhs - K @ w)
    if not np.all(np.isfinite(w)) or np.linalg.norm(K @ w - rhs) > 1e-6 * max(
        1.0, float(np.linalg.norm(rhs))
    ):
        raise SolverError(
            "backward='kkt': the reduced KKT system has no solution (for an "
            "LP, a non-unique solution; add a small quadratic regulariser)"
        )
    return w


def _thresholds(options) -> dict:
    """The active-set thresholds of ``options`` (any object with ``tau_s``/``tau_lam``,
    e.g. the layers' options; None: the defaults of :mod:`.active_set`)."""
    return {
        "tau_s": getattr(options, "tau_s", None),
        "tau_lam": getattr(options, "tau_lam", None),
    }


def _dual_rhs(c_dual, p: int, rows: np.ndarray) -> np.ndarray:
    """``[-c_nu; -c_lam[rows]]``: the right-hand side of the equality and ghost rows when
    the loss reaches the duals (zeros otherwise)."""
    if c_dual is None:
        return np.zeros(p + rows.size)
    c_nu, c_lam = c_dual
    return -np.concatenate([c_nu, c_lam[rows]])


def kkt_backward(
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    sol: Solution,
    c: np.ndarray,
    options=None,
    *,
    c_dual: tuple[np.ndarray, np.ndarray] | None = None,
) -> DataGradient:
    """Exact gradient of ``c'y* (+ c_nu'nu* + c_lam'lam*)`` with respect to the sample's
    data.  ``options``: anything with ``tau_s``/``tau_lam`` (active-set thresholds)."""
    if h.dims.kinds - {"nonneg"}:
        return kkt_backward_cones(g, h, e, sol, c, options, c_dual=c_dual)
    y, nu, lam = sol.primal, sol.eq_dual, sol.ineq_dual
    active = classify(sol, h.dims, rhs=h.h, **_thresholds(options))
    locked = np.flatnonzero(active.locked)
    n, p, k = g.n, e.p, locked.size
    GL = h.G.tocsr()[locked]
    P = g.P if g.P is not None else sp.csc_matrix((n, n))
    K = sp.bmat([[P, e.A.T, GL.T], [e.A, None, None], [GL, None, None]], format="csc")
    rhs = np.concatenate([-c, _dual_rhs(c_dual, p, locked)])
    w = _solve_kkt(K, rhs, n)
    z, z_nu = w[:n], w[n : n + p]
    z_lam = np.zeros(h.m)
    z_lam[locked] = w[n + p :]
    lam_L = np.where(active.locked, lam, 0.0)
    grad = lagrangian_gradient_derivative(g, h, e, (y, nu, lam_L), (z, z_nu, z_lam))
    grad.diagnostics = {"locked": int(k), "weak": int(active.weak.sum())}
    return grad


def cone_jacobian_blocks(h: ConeConstraints, sol: Solution, active: ActiveSet):
    """``D Pi_{K*}(v)`` for every ghost block: ``(rows, D)`` pairs, ``rows`` a slice of ``G``.

    Locked nonnegative rows give one identity block; kept SOC/EXP/PSD blocks give the
    derivative of the projection onto their dual cone at ``v = lam - s``; weakly active
    cone blocks give none (``D = 0``, see the module docstring).
    """
    lam, s = np.asarray(sol.ineq_dual), np.asarray(sol.slack)
    out = []
    for kind, _, rows in block_slices(h.dims):
        if not active.kept[rows.start] or active.weak_blocks[rows.start]:
            continue
        out.append((rows, kkt_cones.dual_projection_derivative(kind, lam[rows] - s[rows])))
    return out


def kkt_backward_cones(
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    sol: Solution,
    c: np.ndarray,
    options=None,
    *,
    c_dual: tuple[np.ndarray, np.ndarray] | None = None,
) -> DataGradient:
    """Exact gradient of ``c'y*`` for problems with SOC/EXP/PSD blocks (residual map).

    See the module docstring for the system solved.  Raises :class:`SolverError` when the
    Jacobian is singular (no unique solution or multiplier, or strict complementarity
    fails in a way the chosen generalised Jacobian cannot absorb).
    """
    y, nu, lam = sol.primal, sol.eq_dual, sol.ineq_dual
    active = classify(sol, h.dims, rhs=h.h, **_thresholds(options))
    n, p = g.n, e.p
    blocks = cone_jacobian_blocks(h, sol, active)
    locked = np.flatnonzero(active.locked)
    cone_rows = [np.arange(r.start, r.stop) for r, _ in blocks]
    rows = np.concatenate([locked] + cone_rows).astype(np.int64)
    k = rows.size
    D = (
        sp.block_diag([sp.identity(locked.size)] + [Db for _, Db in blocks], format="csc")
        if k
        else sp.csc_matrix((0, 0))
    )
    Gk = h.G.tocsr()[rows]
    P = g.P if g.P is not None else sp.csc_matrix((n, n))
    J = sp.bmat(
        [[P, e.A.T, Gk.T @ D], [e.A, None, sp.csc_matrix((p, k))], [Gk, None, D - sp.identity(k)]],
        format="csc",
    )
    rhs = np.concatenate([-c, _dual_rhs(c_dual, p, rows)])
    w, how = _solve_residual_jacobian(J, rhs)
    z, z_nu = w[:n], w[n : n + p]
    z_lam = np.zeros(h.m)
    z_lam[rows] = D @ w[n + p :]
    base = np.zeros(h.m)
    base[rows] = lam[rows]
    grad = lagrangian_gradient_derivative(g, h, e, (y, nu, base), (z, z_nu, z_lam))
    grad.diagnostics = {
        "locked": int(locked.size),
        "kept": int(sum(r.stop - r.start for r, _ in blocks)),
        "weak": int(active.weak.sum()),
        "weak_blocks": int(active.weak_blocks.sum()),
        "solve": how,
    }
    return grad


#: Largest system solved densely (least squares) when the sparse LU finds it singular;
#: larger ones go to LSMR.
DENSE_FALLBACK_MAX = 6000


def _solve_residual_jacobian(J: sp.csc_matrix, rhs: np.ndarray) -> tuple[np.ndarray, str]:
    """Solve ``J w = rhs``: sparse LU, or the minimum-norm least-squares solution when ``J``
    is singular but the system is consistent.

    CVXPY's canonical form often makes ``J`` singular without making the derivative
    ill-defined: an auxiliary variable that only appears in dropped rows (the epigraph
    variable ``t`` of an inactive ``||G y + h|| <= t <= c'y + d``) has no unique value, and
    redundant equalities (``X == X.T`` next to ``X >> 0`` gives duplicated and empty rows)
    have no unique multipliers.  Such directions carry constant data (CVXPY's own
    coefficients), so the parameter gradient does not depend on the choice; the
    minimum-norm one is the convention (diffcp's LSQR makes the same choice): dense
    least squares up to :data:`DENSE_FALLBACK_MAX` rows, LSMR beyond.  A system
    that is inconsistent (its least-squares residual is not at rounding level) means the
    derivative does not exist: :class:`SolverError`.
    """
    scale = max(1.0, float(np.abs(rhs).max(initial=0.0)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", spla.MatrixRankWarning)
            w = spla.splu(J).solve(rhs)
        if np.all(np.isfinite(w)):
            res = np.linalg.norm(J @ w - rhs)
            if res <= 1e-9 * scale * max(1.0, float(np.abs(w).max())):
                return w, "lu"
    except (RuntimeError, spla.MatrixRankWarning):
        pass
    if J.shape[0] <= DENSE_FALLBACK_MAX:
        w, *_ = np.linalg.lstsq(J.toarray(), rhs, rcond=None)
        how = "lstsq"
    else:  # too large to densify: iterative least squares (LSMR)
        w = spla.lsmr(J, rhs, atol=1e-14, btol=1e-14, maxiter=20 * J.shape[0])[0]
        how = "lsmr"
    res = np.linalg.norm(J @ w - rhs)
    if not np.all(np.isfinite(w)) or res > 1e-7 * scale * max(1.0, float(np.linalg.norm(w))):
        raise SolverError(
            "backward='kkt': the Jacobian of the KKT residual map is singular and the "
            f"derivative system inconsistent ({how} residual {res:.2e}): the solution map "
            "is not differentiable here (degenerate active set, non-unique solution, or "
            "strict complementarity fails)"
        )
    return w, how
