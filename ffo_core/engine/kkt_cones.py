"""Projections onto the protocol's non-polyhedral cones and their derivatives.

This is the cone machinery of the exact backward (:mod:`ffo_core.engine.kkt_backward`); the
first-order path never uses it.  One function per cone, in the protocol's layouts
(:mod:`ffo_core.protocol`):

* SOC(d) = ``{(t, x): ||x|| <= t}``, self-dual;
* EXP = ``cl{(x, y, z): y e^(x/y) <= z, y > 0}``; its dual
  ``EXP* = cl{(u, v, w): u < 0, -u e^(v/u) <= e w}`` is reached through Moreau's identity
  ``Pi_{K*}(v) = v + Pi_K(-v)``;
* PSD(s) in "svec" form: the upper triangle stacked column by column, off-diagonal entries
  times sqrt(2), so that ``svec`` is an isometry between symmetric matrices (Frobenius) and
  vectors (Euclidean); the cone is self-dual in this form and the projection of ``svec(V)``
  is ``svec`` of the matrix projection.

Why the exact backward needs these.  With ``v = lam - s`` (the dual minus the slack of one
cone block), Moreau's decomposition for a cone ``K`` and its dual gives

    lam = Pi_{K*}(v),     s = Pi_K(-v) = lam - v,

and ``lam in K*, s in K, lam's = 0`` hold automatically.  The KKT conditions then become a
system of equations in ``(y, nu, v)`` (:mod:`ffo_core.engine.kkt_backward`); its Jacobian contains
``D Pi_{K*}(v)``, which is what :func:`dual_projection_derivative` returns.  Where ``Pi``
is not differentiable (a point on the border between two of the cases below, which at a
KKT point means strict complementarity fails) each function returns one element of the
generalised Jacobian, documented per cone, and never a NaN.

References: Parikh & Boyd, *Proximal Algorithms* (6.3) for the projections; Friberg,
*Projection onto the exponential cone: a univariate root-finding problem* (2021/2023) for
the exponential cone's root function; Ali, Wong & Kolter (2017) and Agrawal et al.,
*Differentiating through a cone program* (2019) for the derivatives.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "dual_projection",
    "dual_projection_derivative",
    "exp_projection",
    "exp_projection_derivative",
    "interior_margin",
    "projection",
    "projection_derivative",
    "psd_projection",
    "psd_projection_derivative",
    "soc_projection",
    "soc_projection_derivative",
    "svec",
    "svec_indices",
    "unsvec",
]

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------- SOC ------
def soc_projection(v: np.ndarray) -> np.ndarray:
    """Projection of ``v = (t, x)`` onto ``SOC = {||x|| <= t}``.

    ``v`` if ``||x|| <= t``; ``0`` if ``||x|| <= -t``; otherwise
    ``(1 + t/||x||)/2 * (||x||, x)``.
    """
    v = np.asarray(v, dtype=float)
    t, x = v[0], v[1:]
    nx = np.linalg.norm(x)
    if nx <= t:
        return v.copy()
    if nx <= -t:
        return np.zeros_like(v)
    return 0.5 * (1.0 + t / nx) * np.concatenate([[nx], x])


def soc_projection_derivative(v: np.ndarray) -> np.ndarray:
    """Jacobian of :func:`soc_projection` at ``v = (t, x)`` (dense, ``d x d``).

    ``I`` inside the cone (``||x|| <= t``, including the apex ``v = 0``), ``0`` inside the
    polar cone (``||x|| <= -t``), and otherwise, with ``u = x/||x||``,

        1/2 [[1, u'], [u, (1 + t/||x||) I - (t/||x||) u u']].

    In the last case ``||x|| > |t| >= 0``, so nothing is divided by zero.
    """
    v = np.asarray(v, dtype=float)
    d = v.shape[0]
    t, x = v[0], v[1:]
    nx = np.linalg.norm(x)
    if nx <= t:
        return np.eye(d)
    if nx <= -t:
        return np.zeros((d, d))
    u = x / nx
    r = t / nx
    D = np.empty((d, d))
    D[0, 0] = 1.0
    D[0, 1:] = u
    D[1:, 0] = u
    D[1:, 1:] = (1.0 + r) * np.eye(d - 1) - r * np.outer(u, u)
    return 0.5 * D


# ----------------------------------------------------------------------------- EXP ------
def _exp_in_cone(x: float, y: float, z: float) -> bool:
    if y > 0.0:
        return z > 0.0 and x <= y * (math.log(z) - math.log(y))
    return y == 0.0 and x <= 0.0 and z >= 0.0


def _exp_in_polar(x: float, y: float, z: float) -> bool:
    """``(x, y, z)`` in the polar cone ``-EXP*``: ``x > 0, x e^(y/x) <= -e z`` or the ray."""
    if x > 0.0:
        return z < 0.0 and y <= x * (1.0 + math.log(-z) - math.log(x))
    return x == 0.0 and y <= 0.0 and z <= 0.0


def _exp_h(v: np.ndarray, rho: float) -> float:
    """Friberg's root function, scaled by ``e^-|rho|`` so that it never overflows.

    ``h(rho) = ((rho-1) x + y) e^rho - (x - rho y) e^-rho - (rho^2 - rho + 1) z`` vanishes
    exactly when ``v`` lies in the plane spanned by the boundary ray
    ``d = (rho, 1, e^rho)`` and the cone's outward normal there,
    ``n = (e^rho, (1-rho) e^rho, -1)`` (``h e^rho = v.(d x n)``).
    """
    x, y, z = (float(t) for t in v)  # Python floats: overflow gives inf, no warnings
    e = math.exp(-abs(rho))
    quad = rho * rho - rho + 1.0
    if rho >= 0.0:
        return ((rho - 1.0) * x + y) - (x - rho * y) * e * e - quad * z * e
    return ((rho - 1.0) * x + y) * e * e - (x - rho * y) - quad * z * e


#: Largest |rho| searched; beyond it e^-|rho| is 0 in double precision many times over.
_RHO_CAP = 1e12


def _exp_boundary_rho(v: np.ndarray) -> float:
    """Ratio ``rho = p_x/p_y`` of the projection of ``v`` (case 4: onto the smooth boundary).

    Writing ``v = a d(rho) + mu n(rho)`` (``d`` and ``n`` are orthogonal) gives
    ``a (rho^2-rho+1) = (rho-1) x + y`` and ``mu e^rho (rho^2-rho+1) = x - rho y``; both
    coefficients must be positive, so ``rho`` lies in the interval
    ``I = {(rho-1) x + y > 0, x - rho y > 0}``.  At a finite end of ``I`` the sign of ``h``
    is that of "v is not in the polar cone" (lower end ``1 - y/x``: ``h < 0``) or "v is not
    in the cone" (upper end ``x/y``: ``h > 0``), both true in case 4; at an infinite end
    ``h`` has the right sign in the limit.  So ``h`` changes sign over ``I`` and a
    bracketing root finder (Brent) cannot miss the root.
    """
    x, y = float(v[0]), float(v[1])
    lo, hi = -math.inf, math.inf
    if x > 0.0:
        lo = 1.0 - y / x
    elif x < 0.0:
        hi = 1.0 - y / x
    if y > 0.0:
        hi = min(hi, x / y)
    elif y < 0.0:
        lo = max(lo, x / y)
    # In case 4, x > 0 or y > 0, so at least one end is finite; walk out from it.
    lo = max(lo, -_RHO_CAP)
    hi = min(hi, _RHO_CAP)
    if lo == -_RHO_CAP and hi > -_RHO_CAP:
        step, lo = 1.0, hi - 1.0
        while _exp_h(v, lo) > 0.0 and lo > -_RHO_CAP:
            step *= 2.0
            lo = max(lo - step, -_RHO_CAP)
    elif hi == _RHO_CAP and lo < _RHO_CAP:
        step, hi = 1.0, lo + 1.0
        while _exp_h(v, hi) < 0.0 and hi < _RHO_CAP:
            step *= 2.0
            hi = min(hi + step, _RHO_CAP)
    flo, fhi = _exp_h(v, lo), _exp_h(v, hi)
    if not (flo < 0.0 < fhi):
        # No sign change: v is, to rounding, on the border of case 4; the root is the end
        # where h is nearer to zero.
        return lo if abs(flo) <= abs(fhi) else hi
    from scipy.optimize import brentq

    return brentq(
        lambda r: _exp_h(v, r), lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=1000
    )


def _exp_ray_normal(rho: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit vectors along the boundary ray ``d(rho)`` and the outward normal ``n(rho)``,
    and ``log(e^rho ||d|| / ||n||)``, all without overflow.

    For ``rho > 0`` both vectors are divided through by ``e^rho`` first.
    """
    if rho > 0.0:
        em = math.exp(-rho)
        d = np.array([rho * em, em, 1.0])
        n = np.array([1.0, 1.0 - rho, -em])
    else:
        er = math.exp(rho)
        d = np.array([rho, 1.0, er])
        n = np.array([er, (1.0 - rho) * er, -1.0])
    nd, nn = np.linalg.norm(d), np.linalg.norm(n)
    return d / nd, n / nn, rho + math.log(nd) - math.log(nn)


def _exp_case(v: np.ndarray):
    """Which of the four cases of the projection ``v`` is in, with its data.

    Returns ``("cone",)``, ``("polar",)``, ``("ray",)`` or, on the smooth boundary,
    ``("boundary", rho, d, n, vd, vn, log_ratio)`` with ``d``, ``n`` the unit ray and
    normal, ``vd = v.d >= 0``, ``vn = v.n >= 0`` (so ``Pi(v) = vd d`` and
    ``v - Pi(v) = vn n``) and ``log_ratio`` from :func:`_exp_ray_normal`.
    """
    x, y, z = (float(t) for t in v)
    if _exp_in_cone(x, y, z):
        return ("cone",)
    if _exp_in_polar(x, y, z):
        return ("polar",)
    if x <= 0.0 and y <= 0.0:
        return ("ray",)
    rho = _exp_boundary_rho(np.array([x, y, z]))
    d, n, log_ratio = _exp_ray_normal(rho)
    w = np.array([x, y, z])
    return ("boundary", rho, d, n, max(float(w @ d), 0.0), max(float(w @ n), 0.0), log_ratio)


def exp_projection(v: np.ndarray) -> np.ndarray:
    """Projection of ``v = (x, y, z)`` onto the exponential cone.

    Four cases (Parikh & Boyd 6.3.4; Friberg): ``v`` in the cone: ``v``; ``v`` in the polar
    cone ``-EXP*``: ``0``; ``x <= 0`` and ``y <= 0``: ``(x, 0, max(z, 0))`` (the face
    ``y = 0``); otherwise ``a (rho, 1, e^rho)`` on the smooth boundary, ``rho`` the root of
    Friberg's univariate function (see :func:`_exp_boundary_rho`).
    """
    v = np.asarray(v, dtype=float)
    case = _exp_case(v)
    if case[0] == "cone":
        return v.copy()
    if case[0] == "polar":
        return np.zeros(3)
    if case[0] == "ray":
        return np.array([v[0], 0.0, max(v[2], 0.0)])
    _, _, d, _, vd, _, _ = case
    return vd * d


def exp_projection_derivative(v: np.ndarray) -> np.ndarray:
    """Jacobian of :func:`exp_projection` at ``v`` (3 x 3).

    ``I`` in the cone, ``0`` in the polar cone, ``diag(1, 0, [z > 0])`` on the ``x, y <= 0``
    region.  On the smooth boundary the projection ``p = a d`` and multiplier ``mu >= 0``
    solve ``p - v + mu grad f(p) = 0``, ``f(p) = 0`` with ``f = y e^(x/y) - z``; implicit
    differentiation gives ``Dp = M^-1 - M^-1 n n' M^-1 / (n' M^-1 n)`` with
    ``n = grad f = (e^rho, (1-rho) e^rho, -1)`` (any scaling of ``n`` gives the same
    matrix) and ``M = I + mu Hess f``.  ``Hess f = (e^rho / a) u u'`` with
    ``u = (1, -rho, 0)``, so by Sherman-Morrison ``M^-1 = I - beta u u'`` with
    ``beta = r / (1 + r ||u||^2)``, ``r = mu e^rho / a``; ``r`` is formed in logarithms, and
    ``beta -> 1/||u||^2`` stays finite when ``a -> 0`` (the projection approaching the
    boundary ray ``y = 0``, where the Hessian blows up).
    """
    v = np.asarray(v, dtype=float)
    case = _exp_case(v)
    if case[0] == "cone":
        return np.eye(3)
    if case[0] == "polar":
        return np.zeros((3, 3))
    if case[0] == "ray":
        return np.diag([1.0, 0.0, 1.0 if v[2] > 0.0 else 0.0])
    _, rho, _, n, vd, vn, log_ratio = case
    u = np.array([1.0, -rho, 0.0])
    uu = float(u @ u)
    if vn <= 0.0:
        beta = 0.0
    elif vd <= 0.0:
        beta = 1.0 / uu
    else:
        log_r = math.log(vn) - math.log(vd) + log_ratio  # r = mu e^rho / a
        beta = 1.0 / (math.exp(-log_r) + uu) if log_r > -700.0 else 0.0
    Minv = np.eye(3) - beta * np.outer(u, u)
    w = Minv @ n
    return Minv - np.outer(w, w) / (n @ w)


# ----------------------------------------------------------------------------- PSD ------
def svec_indices(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each svec entry: the upper triangle, column by column."""
    lower_r, lower_c = np.tril_indices(s)  # row-major lower = column-major upper
    return lower_c, lower_r


def unsvec(v: np.ndarray, s: int) -> np.ndarray:
    """Symmetric ``s x s`` matrix of an svec vector (protocol layout)."""
    i, j = svec_indices(s)
    off = i != j
    vals = np.where(off, np.asarray(v, dtype=float) / SQRT2, v)
    M = np.zeros((s, s))
    M[i, j] = vals
    M[j, i] = vals
    return M


def svec(M: np.ndarray) -> np.ndarray:
    """svec of a symmetric matrix (protocol layout; off-diagonals times sqrt(2))."""
    s = M.shape[0]
    i, j = svec_indices(s)
    return np.where(i != j, SQRT2 * M[i, j], M[i, j])


def _order(rows: int) -> int:
    s = round((math.sqrt(8 * rows + 1) - 1) / 2)
    if s * (s + 1) // 2 != rows:
        raise ValueError(f"{rows} is not a triangular number: not an svec length")
    return s


def psd_projection(v: np.ndarray) -> np.ndarray:
    """Projection onto the PSD cone in svec form: ``svec(Q max(L, 0) Q')``."""
    s = _order(np.asarray(v).shape[0])
    lam, Q = np.linalg.eigh(unsvec(v, s))
    return svec((Q * np.maximum(lam, 0.0)) @ Q.T)


def psd_projection_derivative(v: np.ndarray) -> np.ndarray:
    """Jacobian of :func:`psd_projection` in svec coordinates (``k x k``, ``k = s(s+1)/2``).

    With ``V = Q diag(l) Q'``, ``D Pi(V)[dV] = Q (B o (Q' dV Q)) Q'`` where
    ``B_ij = (l_i+ - l_j+)/(l_i - l_j)``: 1 when both eigenvalues are positive, 0 when
    both are <= 0, and ``l_i/(l_i - l_j)`` when ``l_i > 0 >= l_j`` (the denominator is at
    least ``l_i``: no division by zero, even for repeated or zero eigenvalues).  The matrix
    is assembled column by column from the svec unit vectors; since svec is an isometry the
    result is symmetric.
    """
    v = np.asarray(v, dtype=float)
    k = v.shape[0]
    s = _order(k)
    lam, Q = np.linalg.eigh(unsvec(v, s))
    pos = lam > 0.0
    lp = np.maximum(lam, 0.0)
    B = np.where(pos[:, None] & pos[None, :], 1.0, 0.0)
    mixed = pos[:, None] & ~pos[None, :]
    num = np.broadcast_to(lp[:, None], (s, s))
    den = lam[:, None] - lam[None, :]
    B = np.where(mixed, num / np.where(mixed, den, 1.0), B)
    B = np.where(mixed.T, B.T, B)  # symmetric: l_j/(l_j - l_i) for l_j > 0 >= l_i
    i, j = svec_indices(s)
    E = np.zeros((k, s, s))  # unsvec of each unit vector
    scale = np.where(i != j, 1.0 / SQRT2, 1.0)
    E[np.arange(k), i, j] = scale
    E[np.arange(k), j, i] = scale
    T = np.einsum("ai,kab,bj->kij", Q, E, Q) * B  # Q' E_k Q, masked
    R = np.einsum("ia,kab,jb->kij", Q, T, Q)  # Q T_k Q'
    cols = np.where(i != j, SQRT2 * R[:, i, j], R[:, i, j])  # svec of each R_k
    return cols.T


# ------------------------------------------------------------------------ dispatch ------
_PROJ = {"soc": soc_projection, "exp": exp_projection, "psd": psd_projection}
_DPROJ = {
    "soc": soc_projection_derivative,
    "exp": exp_projection_derivative,
    "psd": psd_projection_derivative,
}


def projection(kind: str, v: np.ndarray) -> np.ndarray:
    """Projection of one block ``v`` onto the cone ``kind`` ("soc", "exp", "psd")."""
    return _PROJ[kind](v)


def projection_derivative(kind: str, v: np.ndarray) -> np.ndarray:
    """Jacobian of :func:`projection` at ``v``."""
    return _DPROJ[kind](v)


def dual_projection(kind: str, v: np.ndarray) -> np.ndarray:
    """Projection onto the dual cone: the cone itself for SOC and PSD (self-dual), and
    ``v + Pi_EXP(-v)`` (Moreau) for the exponential cone."""
    if kind == "exp":
        return v + exp_projection(-np.asarray(v, dtype=float))
    return projection(kind, v)


def dual_projection_derivative(kind: str, v: np.ndarray) -> np.ndarray:
    """Jacobian of :func:`dual_projection`: ``I - D Pi_EXP(-v)`` for EXP."""
    if kind == "exp":
        return np.eye(3) - exp_projection_derivative(-np.asarray(v, dtype=float))
    return projection_derivative(kind, v)


def interior_margin(kind: str, s: np.ndarray) -> float:
    """How far inside the cone a slack block ``s`` is (> 0 inside, <= 0 on the boundary
    or outside), in the units of ``s``.  Used to tell an inactive block (slack strictly
    inside) from a weakly active one (multiplier and distance to the boundary both zero).

    SOC: ``t - ||x||``.  PSD: the smallest eigenvalue.  EXP: ``min(y, z - y e^(x/y))``
    (both must be positive in the interior; ``-inf`` when ``e^(x/y)`` overflows).
    """
    s = np.asarray(s, dtype=float)
    if kind == "soc":
        return float(s[0] - np.linalg.norm(s[1:]))
    if kind == "psd":
        return float(np.linalg.eigvalsh(unsvec(s, _order(s.shape[0])))[0])
    x, y, z = s
    if y <= 0.0:
        return float(min(y, z))
    r = x / y
    if r > 700.0:
        return -math.inf
    return float(min(y, z - y * math.exp(r)))
