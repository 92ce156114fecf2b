"""The exact reference backward: implicit differentiation of the KKT conditions.

This is the yardstick the first-order path is measured against, and the ``backward="kkt"``
mode of the layers.  Unlike :mod:`ffo_core.ffo_backward` it *does* factorise a matrix.

Polyhedral problems (zero and nonnegative cones).  With the active set ``L`` of
:mod:`ffo_core.active_set` fixed, the solution is locally that of the equality QP
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
``[f(x + w) - f(x - w)] / 2`` exactly, which is how we evaluate it (one code path for both
modes: :func:`ffo_core.ffo_backward.lagrangian_gradient`).
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .active_set import classify
from .errors import FFOError, SolverError
from .ffo_backward import DataGradient, FFOOptions, lagrangian_gradient
from .protocol import ConeConstraints, Equalities, Objective, Solution


def kkt_backward(g: Objective, h: ConeConstraints, e: Equalities, sol: Solution,
                 c: np.ndarray, options: FFOOptions | None = None) -> DataGradient:
    """Exact gradient of ``c'y*`` with respect to the sample's data (polyhedral problems)."""
    options = options or FFOOptions()
    if h.dims.kinds - {"nonneg"}:
        raise FFOError("backward='kkt' currently differentiates zero and nonnegative cones "
                       f"only; this problem has {sorted(h.dims.kinds - {'nonneg'})} cones")
    y, nu, lam = sol.primal, sol.eq_dual, sol.ineq_dual
    active = classify(sol, h.dims, tau_s=options.tau_s, tau_lam=options.tau_lam)
    locked = np.flatnonzero(active.locked)
    n, p, k = g.n, e.p, locked.size
    GL = h.G.tocsr()[locked]
    P = g.P if g.P is not None else sp.csc_matrix((n, n))
    K = sp.bmat([[P, e.A.T, GL.T],
                 [e.A, None, None],
                 [GL, None, None]], format="csc")
    rhs = np.concatenate([-c, np.zeros(p + k)])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", spla.MatrixRankWarning)
            w = spla.splu(K).solve(rhs)
    except (RuntimeError, spla.MatrixRankWarning) as exc:
        raise SolverError(
            "backward='kkt': the reduced KKT matrix is singular (degenerate active set or "
            "dependent constraints; for an LP, a non-unique solution)") from exc
    z, z_nu = w[:n], w[n:n + p]
    z_lam = np.zeros(h.m)
    z_lam[locked] = w[n + p:]
    lam_L = np.where(active.locked, lam, 0.0)
    plus = lagrangian_gradient(g, h, e, y + z, nu + z_nu, lam_L + z_lam)
    minus = lagrangian_gradient(g, h, e, y - z, nu - z_nu, lam_L - z_lam)
    grad = (plus - minus) / 2.0
    grad.diagnostics = {"locked": int(k), "weak": int(active.weak.sum())}
    return grad
