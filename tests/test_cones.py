"""Second-order, exponential and PSD cones in both backward modes (issue 4), float64.

Problem families (strictly complementary random instances, by construction):
* SOCP: ``min 1/2||y||^2 + q'y  s.t.  ||G_i y + h_i|| <= c_i'y + d_i`` (i = 1..3, two of them
  active with a multiplier on the boundary of the cone, one inactive), ``F y <= g`` (one
  row active); parameters G_i, h_i, c_i, d_i, q, F, g.
* EXP (log-sum-exp): ``min 1/2||y||^2 + q'y + log_sum_exp(F y + g)``; every exponential
  cone of CVXPY's canonicalisation is active.
* EXP (entropy): ``min -theta'x - sum(entr(x)) + 1/2||x||^2  s.t. 1'x = 1, a'x <= b`` with
  the inequality active.
* SDP (matrix order 4): ``min 1/2||X||_F^2 - tr(C X)  s.t.  X >> 0, tr(A_j X) = b_j``,
  the optimum ``X0`` of rank 2 and the PSD multiplier ``Z0`` of rank 2 (ranges
  complementary), so ``X0 + Z0`` is nonsingular.
* PSD + EXP (log-det, matrix order 3): ``min tr(S X) - log_det(X) + 1/4||X||_F^2``.

References and tolerances (each stated where it is asserted):
* ``backward="kkt"`` against central finite differences of the solution map, every
  parameter entry, each solve by CVXPY + SCS at ``eps_abs = eps_rel = 1e-12`` (SCS at
  1e-12 lands within ~1e-11 of the optimum on these instances; Clarabel at 1e-10 stops
  1e-7..1e-6 away, which would spoil the differences) -- except log-sum-exp, where SCS at
  1e-12 hits its iteration limit ~1e-4 away and each point is instead solved by damped
  Newton to machine precision (the problem is smooth and strongly convex).  Step 1e-4:
  solver noise ~1e-11/1e-4 = 1e-7, truncation O(step^2).  Tolerance: relative error
  <= 1e-5.
* ``backward="kkt"`` against cvxpylayers 1.2 (diffcp, ``mode="dense"``, SCS at eps 1e-12;
  not diffcp + Clarabel, whose SDP gradient is wrong).  Tolerance: relative error <= 1e-5.
* FFO against the KKT mode, both run through the ``scs`` backend at eps 1e-12 (1e-10 for
  the exponential cone, where SCS needs 1e5+ iterations to reach 1e-12 and gets to ~1e-11
  at 1e-10 anyway; ``cache_size=0``: a reused SCS workspace was seen to stall at these
  accuracies).  Default delta -- with all defaults (central on curved cones) and forced
  one-sided: cosine >= 0.999 and relative error <= 1e-2; ``central=True``: relative error
  <= 1e-4.  Through Clarabel the one-sided numbers are not reachable with the default
  delta (Clarabel reports ~1e-11 accuracy while its point is 1e-7..1e-6 from the
  optimum); see docs/cones.md for the measured figures.  The KKT mode on Clarabel's point
  is checked against the same mode on SCS's (<= 1e-4).

Relative error is ``||a - b|| / ||b||`` over all parameters' gradients together.
"""

from __future__ import annotations

import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ffo_core import FFOLayer, get_backend
from ffo_core.datamap.compile import compile_problem
from ffo_core.engine import FFOOptions, classify
from ffo_core.engine import kkt_cones as kc
from ffo_core.engine.ffo_backward import ffo_backward
from ffo_core.engine.kkt_backward import kkt_backward, kkt_backward_cones
from ffo_core.protocol import ConeConstraints, ConeDims, Equalities, Objective

SCS12 = "scs:eps_abs=1e-12,eps_rel=1e-12,max_iters=200000,cache_size=0"
SCS10 = "scs:eps_abs=1e-10,eps_rel=1e-10,max_iters=200000,cache_size=0"
CLARABEL_TIGHT = "clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12,max_iter=500"
SEEDS = (0, 1)


# ------------------------------------------------------------------ problem families ---
class Instance:
    def __init__(
        self, name, problem, params, variables, values, backend, solution=None, exact_solve=None
    ):
        self.name, self.problem, self.params, self.variables = name, problem, params, variables
        self.values = [np.asarray(v, dtype=float) for v in values]
        self.backend = backend  # config string for the FFO/KKT layer runs
        self.solution = solution  # the known optimum of variables[0], if any
        self.exact_solve = exact_solve  # values -> optimum, for the FD reference, if any


def socp_instance(
    seed: int, n: int = 5, dsoc: int = 3, k: int = 3, n_active: int = 2, m_lin: int = 2
) -> Instance:
    """``y0`` optimal, cones 0..n_active-1 active with multiplier ``mu (1, -u)``, the rest
    inactive by a margin; linear row 0 active, row 1 inactive."""
    rng = np.random.default_rng(100 + seed)
    y0 = rng.standard_normal(n)
    G = [rng.standard_normal((dsoc - 1, n)) for _ in range(k)]
    h = [rng.standard_normal(dsoc - 1) for _ in range(k)]
    c = [0.3 * rng.standard_normal(n) for _ in range(k)]
    d, force = [], np.zeros(n)
    for i in range(k):
        r = G[i] @ y0 + h[i]
        nr = np.linalg.norm(r)
        if i < n_active:
            d.append(nr - c[i] @ y0)
            force += rng.uniform(0.5, 1.5) * (G[i].T @ (r / nr) - c[i])
        else:
            d.append(nr - c[i] @ y0 + rng.uniform(0.5, 1.5))
    F = rng.standard_normal((m_lin, n))
    active = np.arange(m_lin) < 1
    g = F @ y0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m_lin))
    force += F.T @ np.where(active, rng.uniform(0.5, 1.5, m_lin), 0.0)
    q = -(y0 + force)
    y = cp.Variable(n, name="y")
    Gp = [cp.Parameter((dsoc - 1, n), name=f"G{i}") for i in range(k)]
    hp = [cp.Parameter(dsoc - 1, name=f"h{i}") for i in range(k)]
    cpar = [cp.Parameter(n, name=f"c{i}") for i in range(k)]
    dp = [cp.Parameter(name=f"d{i}") for i in range(k)]
    qp, Fp, gp = (
        cp.Parameter(n, name="q"),
        cp.Parameter((m_lin, n), name="F"),
        cp.Parameter(m_lin, name="g"),
    )
    cons = [cp.norm(Gp[i] @ y + hp[i]) <= cpar[i] @ y + dp[i] for i in range(k)] + [Fp @ y <= gp]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + qp @ y), cons)
    return Instance(
        "socp", prob, Gp + hp + cpar + dp + [qp, Fp, gp], [y], G + h + c + d + [q, F, g], SCS12, y0
    )


def lse_newton(F, g, q) -> np.ndarray:
    """Minimiser of the smooth, 1-strongly convex ``1/2||y||^2 + q'y + lse(F y + g)`` by
    damped Newton to machine precision: an exact reference that involves no cone solver."""

    def f(y):
        z = F @ y + g
        return 0.5 * y @ y + q @ y + z.max() + math.log(np.exp(z - z.max()).sum())

    y = np.zeros(q.size)
    for _ in range(100):
        z = F @ y + g
        pi = np.exp(z - z.max())
        pi /= pi.sum()
        grad = y + q + F.T @ pi
        if np.linalg.norm(grad) <= 1e-15 * (1 + np.linalg.norm(q)):
            break
        H = np.eye(q.size) + F.T @ (np.diag(pi) - np.outer(pi, pi)) @ F
        step, t = np.linalg.solve(H, grad), 1.0
        while f(y - t * step) > f(y) - 0.25 * t * grad @ step and t > 1e-4:
            t /= 2
        y = y - t * step
    return y


def lse_instance(seed: int, n: int = 4, m: int = 3) -> Instance:
    rng = np.random.default_rng(200 + seed)
    y = cp.Variable(n, name="y")
    F, g, q = cp.Parameter((m, n), name="F"), cp.Parameter(m, name="g"), cp.Parameter(n, name="q")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y + cp.log_sum_exp(F @ y + g)))
    return Instance(
        "lse",
        prob,
        [F, g, q],
        [y],
        [rng.standard_normal((m, n)), rng.standard_normal(m), rng.standard_normal(n)],
        SCS10,
        exact_solve=lambda vals: [lse_newton(*vals)],
    )


def entropy_instance(seed: int, n: int = 4) -> Instance:
    """``x0`` in the simplex's interior optimal with the row ``a'x <= b`` active."""
    rng = np.random.default_rng(300 + seed)
    x0 = rng.dirichlet(np.full(n, 3.0))
    a = rng.standard_normal(n)
    b = a @ x0
    nu, lam = rng.standard_normal(), rng.uniform(0.5, 1.5)
    theta = np.log(x0) + 1.0 + x0 + nu + lam * a  # stationarity of the Lagrangian
    x = cp.Variable(n, name="x")
    th, A, bp = (
        cp.Parameter(n, name="theta"),
        cp.Parameter((1, n), name="a"),
        cp.Parameter(1, name="b"),
    )
    prob = cp.Problem(
        cp.Minimize(-th @ x - cp.sum(cp.entr(x)) + 0.5 * cp.sum_squares(x)),
        [cp.sum(x) == 1, A @ x <= bp],
    )
    return Instance("entropy", prob, [th, A, bp], [x], [theta, a[None], [b]], SCS10, x0)


def sdp_instance(
    seed: int, n: int = 4, rank: int = 2, p: int = 2, symmetric_constraint: bool = False
) -> Instance:
    """``X0 = V V'`` optimal with multiplier ``Z0 = W W'``, ``[V W]`` orthogonal: strictly
    complementary.  ``symmetric_constraint`` adds the (redundant) ``X == X.T``."""
    rng = np.random.default_rng(400 + seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    X0 = (Q[:, :rank] * rng.uniform(0.5, 1.5, rank)) @ Q[:, :rank].T
    Z0 = (Q[:, rank:] * rng.uniform(0.5, 1.5, n - rank)) @ Q[:, rank:].T
    As = [(lambda M: (M + M.T) / 2)(rng.standard_normal((n, n))) for _ in range(p)]
    nu = rng.standard_normal(p)
    C = X0 + sum(v * A for v, A in zip(nu, As)) - Z0  # stationarity: X - C + A'nu - Z = 0
    b = np.array([np.trace(A @ X0) for A in As])
    X = cp.Variable((n, n), name="X")
    Cp = cp.Parameter((n, n), name="C")
    Ap = [cp.Parameter((n, n), name=f"A{j}") for j in range(p)]
    bp = cp.Parameter(p, name="b")
    cons = [X >> 0] + [cp.trace(Ap[j] @ X) == bp[j] for j in range(p)]
    if symmetric_constraint:
        cons.append(X == X.T)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(X) - cp.trace(Cp @ X)), cons)
    return Instance("sdp", prob, [Cp] + Ap + [bp], [X], [C] + As + [b], SCS12, X0)


def logdet_instance(seed: int, n: int = 3, rho: float = 0.5) -> Instance:
    """Regularised covariance estimation ``min tr(S X) - log_det(X) + rho/2 ||X||_F^2``:
    CVXPY canonicalises ``log_det`` with a PSD block *and* exponential cones, so this
    also checks the PSD/EXP row order from CVXPY through the protocol.  For symmetric
    ``S = U diag(s) U'`` the optimum is ``U diag(x) U'``, ``s - 1/x + rho x = 0``."""
    rng = np.random.default_rng(500 + seed)
    B = rng.standard_normal((n, n))
    S = B @ B.T / n + 0.1 * np.eye(n)
    s, U = np.linalg.eigh(S)
    X0 = (U * ((-s + np.sqrt(s * s + 4 * rho)) / (2 * rho))) @ U.T
    X = cp.Variable((n, n), name="X")
    Sp = cp.Parameter((n, n), name="S")
    prob = cp.Problem(cp.Minimize(cp.trace(Sp @ X) - cp.log_det(X) + 0.5 * rho * cp.sum_squares(X)))
    return Instance("logdet", prob, [Sp], [X], [S], SCS12, X0)


FAMILIES = {
    "socp": socp_instance,
    "lse": lse_instance,
    "entropy": entropy_instance,
    "sdp": sdp_instance,
    "logdet": logdet_instance,
}


@pytest.fixture(
    scope="module", params=[(f, s) for f in FAMILIES for s in SEEDS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def inst(request):
    family, seed = request.param
    return FAMILIES[family](seed)


# ------------------------------------------------------------------------- helpers ---
def weights(inst: Instance, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(v.shape) for v in inst.variables]


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=float).ravel(order="F") for a in arrays])


def layer_gradient(layer, values, w, **call_kw):
    """Solution and gradient of ``sum_k <w_k, x_k>`` through ``layer``, flattened."""
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = layer(*ts, **call_kw)
    loss = sum((torch.as_tensor(wk) * o).sum() for wk, o in zip(w, outs))
    loss.backward()
    return [o.detach().numpy() for o in outs], flat(t.grad.numpy() for t in ts)


def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def scs_loss(inst: Instance, values, w) -> float:
    """``sum <w, x*>`` with ``x*`` from CVXPY + SCS at eps 1e-12 (the FD reference)."""
    for p, v in zip(inst.params, values):
        p.value = v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inst.problem.solve(solver=cp.SCS, eps_abs=1e-12, eps_rel=1e-12, max_iters=500_000)
    assert inst.problem.status in ("optimal", "optimal_inaccurate"), inst.problem.status
    return float(sum(np.sum(wk * v.value) for wk, v in zip(w, inst.variables)))


def exact_loss(inst: Instance, values, w) -> float:
    return float(sum(np.sum(wk * x) for wk, x in zip(w, inst.exact_solve(values))))


def fd_gradient(inst: Instance, w, step: float = 1e-4) -> np.ndarray:
    """Central differences of the loss in every parameter entry (column-major order), each
    point solved by CVXPY + SCS at eps 1e-12, or by the instance's exact solver if it has
    one (log-sum-exp: there SCS at 1e-12 runs into its 5e5-iteration limit and stops
    ~1e-4 from the optimum)."""
    scs_loss_ = exact_loss if inst.exact_solve is not None else scs_loss
    out = []
    for i, v in enumerate(inst.values):
        for j in range(v.size):
            vals = [x.copy() for x in inst.values]
            e = np.zeros(v.size)
            e[j] = step
            vals[i] = v + e.reshape(v.shape, order="F")
            up = scs_loss_(inst, vals, w)
            vals[i] = v - e.reshape(v.shape, order="F")
            out.append((up - scs_loss_(inst, vals, w)) / (2 * step))
    return np.array(out)


def kkt_gradient(inst: Instance, w):
    layer = FFOLayer(inst.problem, inst.params, inst.variables, solver=inst.backend, backward="kkt")
    sol, g = layer_gradient(layer, inst.values, w)
    return sol, g, layer


# --------------------------------------------------- projections and their derivatives ---
def _fd_jacobian(f, v, h=1e-7):
    return np.column_stack([(f(v + h * e) - f(v - h * e)) / (2 * h) for e in np.eye(v.size)])


def _in_exp(p, tol):
    """``p`` within ~``tol`` of EXP: ``p + tol (-1, 1, 1)`` (an interior direction) is in it."""
    x, y, z = np.asarray(p) + tol * np.array([-1.0, 1.0, 1.0])
    return y > 0 and z > 0 and x <= y * math.log(z / y)


def _in_exp_dual(u, tol):
    """``u`` within ~``tol`` of EXP* = cl{(a, b, c): a < 0, -a e^(b/a) <= e c}."""
    a, b, c = np.asarray(u) + tol * np.array([-1.0, 1.0, 1.0])
    return a < 0 and c > 0 and math.log(-a) + b / a <= 1.0 + math.log(c)


def test_exp_projection_satisfies_moreau_optimality():
    """``p = Pi(v)``: ``p in EXP``, ``p - v in EXP*``, ``p'(p - v) = 0`` (tolerance 1e-9
    relative to ``||v||``) on 3000 random points over six orders of magnitude, every case
    represented."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        v = rng.standard_normal(3) * math.exp(rng.uniform(-3, 3))
        seen.add(kc._exp_case(v)[0])
        p = kc.exp_projection(v)
        s = max(1.0, np.linalg.norm(v))
        assert np.all(np.isfinite(p))
        assert _in_exp(p / s, 1e-9), v
        assert _in_exp_dual((p - v) / s, 1e-9), v
        assert abs(p @ (p - v)) <= 1e-9 * s * s, v
    assert seen == {"cone", "polar", "ray", "boundary"}


def test_exp_projection_is_nearest_point_to_high_precision():
    """Against a 40-digit mpmath minimisation of the distance along the boundary rays, on
    points whose projection is on the smooth boundary: agreement to 1e-12."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    rng = np.random.default_rng(1)
    checked = 0
    while checked < 5:
        v = rng.standard_normal(3)
        case = kc._exp_case(v)
        if case[0] != "boundary":
            continue
        V = [mp.mpf(float(t)) for t in v]

        def dist2(r):
            d = [r, 1, mp.e**r]
            vd = sum(a * b for a, b in zip(V, d))
            return sum(a * a for a in V) - vd**2 / sum(a * a for a in d)

        r = mp.findroot(lambda r: mp.diff(dist2, r), case[1])
        d = np.array([float(r), 1.0, float(mp.e**r)])
        p_ref = (v @ d) / (d @ d) * d
        assert np.allclose(kc.exp_projection(v), p_ref, rtol=0, atol=1e-12)
        checked += 1


@pytest.mark.parametrize(
    "kind,dim", [("soc", 2), ("soc", 4), ("exp", 3), ("psd", 1), ("psd", 6), ("psd", 10)]
)
def test_projection_derivatives_match_finite_differences(kind, dim):
    """Jacobians against central differences (step 1e-7) at 200 random points: max entry
    error <= 1e-6 (the points are almost surely away from the non-differentiable set)."""
    rng = np.random.default_rng(2)
    for _ in range(200 if kind != "psd" else 40):
        v = rng.standard_normal(dim) * (3.0 if kind == "exp" else 1.0)
        D = kc.projection_derivative(kind, v)
        fd = _fd_jacobian(lambda x: kc.projection(kind, x), v)
        assert np.abs(D - fd).max() <= 1e-6, (kind, v)
        Dd = kc.dual_projection_derivative(kind, v)
        fdd = _fd_jacobian(lambda x: kc.dual_projection(kind, x), v)
        assert np.abs(Dd - fdd).max() <= 1e-6, (kind, v)


def test_psd_layout_is_the_protocols():
    """svec = upper triangle, column by column, off-diagonals times sqrt(2): the layout of
    Clarabel's PSDTriangleConeT (the protocol's); svec is an isometry and PSD projection
    in svec form is the matrix projection."""
    M = np.array([[1.0, 2.0, 4.0], [2.0, 3.0, 5.0], [4.0, 5.0, 6.0]])
    r2 = math.sqrt(2.0)
    assert np.allclose(kc.svec(M), [1, 2 * r2, 3, 4 * r2, 5 * r2, 6])
    rng = np.random.default_rng(3)
    S = rng.standard_normal((5, 5))
    S = S + S.T
    v = kc.svec(S)
    assert np.allclose(kc.unsvec(v, 5), S)
    assert np.isclose(np.linalg.norm(v), np.linalg.norm(S))
    lam, Q = np.linalg.eigh(S)
    assert np.allclose(kc.unsvec(kc.psd_projection(v), 5), (Q * np.maximum(lam, 0)) @ Q.T)
    # Clarabel's own PSD cone agrees: project S by solving min ||X - S|| s.t. X in PSD.
    backend = get_backend(CLARABEL_TIGHT)
    k = 15
    sol = backend.solve(
        Objective(sp.identity(k, format="csc"), -v),
        ConeConstraints(-sp.identity(k, format="csc"), np.zeros(k), ConeDims(psd=(5,))),
        Equalities(sp.csc_matrix((0, k)), np.zeros(0)),
    )
    assert np.allclose(sol.primal, kc.psd_projection(v), atol=1e-7)


@pytest.mark.parametrize(
    "v",
    [
        np.zeros(3),
        np.array([1.0, 1.0, 0.0]),
        np.array([-1.0, 1.0, 0.0]),  # SOC apex/edges
    ],
)
def test_soc_derivative_degenerate_points_finite(v):
    D = kc.soc_projection_derivative(v)
    assert np.all(np.isfinite(D))


@pytest.mark.parametrize(
    "v",
    [
        np.zeros(3),
        np.array([-1.0, 0.0, 2.0]),
        np.array([0.0, 0.0, 1.0]),  # boundary ray
        np.array([-1.0, 1e-300, 2.0]),
        np.array([1e-12, -3.0, 2.0]),  # near the ray
        np.array([0.0, 1.0, 1.0]),
        np.array([1.0, 1.0, math.e]),  # on the boundary
        np.array([1.0, -0.5, -1e-3]),
        np.array([-800.0, 1.0, -1.0]),  # huge |rho|
        np.array([1e-3, -5.0, 10.0]),
        np.array([5.0, 1e-9, -1e-9]),
    ],
)
def test_exp_derivative_degenerate_points_finite(v):
    """Points on the borders between the four cases and on the boundary ray ``y = 0``: a
    finite projection in the cone and a finite Jacobian (an element of the generalised
    Jacobian), never a NaN, and the dual-cone Jacobian too."""
    p = kc.exp_projection(v)
    assert np.all(np.isfinite(p)) and _in_exp(p / max(1, np.linalg.norm(v)), 1e-9)
    for D in (kc.exp_projection_derivative(v), kc.dual_projection_derivative("exp", v)):
        assert np.all(np.isfinite(D))
        assert np.linalg.norm(D, 2) <= 1 + 1e-9  # projections are non-expansive


def test_psd_derivative_repeated_and_zero_eigenvalues_finite():
    for lam in ([1.0, 1.0, -1.0, -1.0], [0.0, 0.0, 1.0, -1.0], [0.0] * 4):
        Q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((4, 4)))
        v = kc.svec((Q * np.array(lam)) @ Q.T)
        D = kc.psd_projection_derivative(v)
        assert np.all(np.isfinite(D)) and np.allclose(D, D.T)
        assert np.linalg.norm(D, 2) <= 1 + 1e-9


# ------------------------------------------------------------ the exact (KKT) mode ---
def test_kkt_matches_finite_differences(inst):
    """KKT gradient vs central FD of the solution map (CVXPY + SCS eps 1e-12, step 1e-4),
    every parameter entry: relative error <= 1e-5."""
    w = weights(inst)
    sol, g, _ = kkt_gradient(inst, w)
    if inst.solution is not None:
        assert np.allclose(sol[0], inst.solution, atol=1e-7)
    fd = fd_gradient(inst, w)
    assert rel(g, fd) <= 1e-5


def test_kkt_matches_cvxpylayers(inst):
    """KKT gradient vs cvxpylayers 1.2 (diffcp dense mode, SCS eps 1e-12): relative error
    <= 1e-5."""
    cvxpylayers = pytest.importorskip("cvxpylayers.torch")
    w = weights(inst)
    ref = cvxpylayers.CvxpyLayer(inst.problem, inst.params, inst.variables)
    _, g_ref = layer_gradient(
        ref,
        inst.values,
        w,
        solver_args=dict(
            mode="dense", solve_method="SCS", eps_abs=1e-12, eps_rel=1e-12, max_iters=200_000
        ),
    )
    _, g, layer = kkt_gradient(inst, w)
    assert rel(g, g_ref) <= 1e-5
    assert layer.last_diagnostics[0]["kept"] > 0


def test_kkt_through_clarabel_close_to_exact(inst):
    """The KKT mode on Clarabel's (less accurate) forward point: relative error <= 1e-4
    against the same mode on SCS's point (Clarabel stops 1e-7..1e-6 from the optimum)."""
    w = weights(inst)
    _, g, _ = kkt_gradient(inst, w)
    layer = FFOLayer(
        inst.problem, inst.params, inst.variables, solver=CLARABEL_TIGHT, backward="kkt"
    )
    _, g_c = layer_gradient(layer, inst.values, w)
    assert rel(g_c, g) <= 1e-4


def test_cone_path_reproduces_polyhedral_path():
    """On a QP, the residual-map path (all blocks as 'cones' with D in {0, 1}) and the
    unchanged polyhedral path are two exact methods: they agree to 1e-10, and
    ``kkt_backward`` still takes the polyhedral path there."""
    rng = np.random.default_rng(5)
    n, m, p = 6, 5, 2
    y = cp.Variable(n)
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    A, b = cp.Parameter((p, n)), cp.Parameter(p)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), [G @ y <= h, A @ y == b])
    comp = compile_problem(prob, [q, G, h, A, b], [y])
    y0, Gv, Av = rng.standard_normal(n), rng.standard_normal((m, n)), rng.standard_normal((p, n))
    act = np.arange(m) < 2
    hv = Gv @ y0 + np.where(act, 0, 1.0)
    qv = -(y0 + Gv.T @ np.where(act, 1.0, 0) + Av.T @ rng.standard_normal(p))
    theta = np.zeros(comp.n_theta + 1)
    theta[comp.const_col] = 1
    for slot, v in zip(comp.params, [qv, Gv, hv, Av, Av @ y0]):
        theta[slot.offset : slot.offset + slot.size] = v.ravel(order="F")
    g, hc, e = comp.sample(comp.M @ theta)
    sol = get_backend(CLARABEL_TIGHT).solve(g, hc, e)
    c = rng.standard_normal(n)
    poly = kkt_backward(g, hc, e, sol, c)
    cone = kkt_backward_cones(g, hc, e, sol, c)
    assert "solve" not in poly.diagnostics and "solve" in cone.diagnostics  # two paths
    assert rel(cone.vector(), poly.vector()) <= 1e-10


# ------------------------------------------------------------ the first-order mode ---
@pytest.mark.parametrize("central", [None, False], ids=["all-defaults", "one-sided"])
def test_ffo_default_delta_matches_kkt(inst, central):
    """Default delta (chosen from the backend's reported accuracy), with all defaults
    (``central=None``: central because the ghost keeps curved cone blocks) and forced
    one-sided: cosine >= 0.999 and relative error <= 1e-2 against the KKT mode on the same
    backend."""
    w = weights(inst)
    _, g_ref, _ = kkt_gradient(inst, w)
    layer = FFOLayer(
        inst.problem, inst.params, inst.variables, solver=inst.backend, central=central
    )
    _, g = layer_gradient(layer, inst.values, w)
    assert cosine(g, g_ref) >= 0.999
    assert rel(g, g_ref) <= 1e-2
    assert layer.last_diagnostics[0]["kept"] > 0  # cone blocks in the ghost


def test_ffo_central_matches_kkt(inst):
    """``central=True``: relative error <= 1e-4 against the KKT mode."""
    w = weights(inst)
    _, g_ref, _ = kkt_gradient(inst, w)
    layer = FFOLayer(inst.problem, inst.params, inst.variables, solver=inst.backend, central=True)
    _, g = layer_gradient(layer, inst.values, w)
    assert rel(g, g_ref) <= 1e-4


def test_ffo_batched_socp_matches_per_sample_kkt():
    """A batch of two SOCP samples (q perturbed): per-sample FFO (central) gradients
    within 1e-4 of the per-sample KKT gradients."""
    inst = socp_instance(0)
    w = weights(inst)
    rng = np.random.default_rng(8)
    qi = next(i for i, p in enumerate(inst.params) if p.name() == "q")
    batch = [np.repeat(v[None], 2, axis=0) for v in inst.values]
    batch[qi] = batch[qi] + 1e-3 * rng.standard_normal(batch[qi].shape)
    wb = [np.repeat(x[None], 2, axis=0) for x in w]
    grads = {}
    for mode, kw in (("kkt", dict(backward="kkt")), ("ffo", dict(central=True))):
        layer = FFOLayer(inst.problem, inst.params, inst.variables, solver=SCS12, **kw)
        ts = [torch.tensor(v, requires_grad=True) for v in batch]
        (x,) = layer(*ts)
        (torch.as_tensor(wb[0]) * x).sum().backward()
        grads[mode] = [flat(t.grad[i].numpy() for t in ts) for i in range(2)]
    for a, b in zip(grads["ffo"], grads["kkt"]):
        assert rel(a, b) <= 1e-4


def test_sdp_with_redundant_symmetry_constraint(monkeypatch):
    """``X == X.T`` next to ``X >> 0`` makes the equalities dependent (duplicated and empty
    rows): the KKT mode falls back to the minimum-norm solve (dense least squares; LSMR
    for systems too large to densify, forced here) and still matches cvxpylayers (1e-5);
    FFO central matches the KKT mode (1e-4)."""
    import ffo_core.engine.kkt_backward as kb

    cvxpylayers = pytest.importorskip("cvxpylayers.torch")
    inst = sdp_instance(0, symmetric_constraint=True)
    w = weights(inst)
    _, g, layer = kkt_gradient(inst, w)
    assert layer.last_diagnostics[0]["solve"] == "lstsq"
    ref = cvxpylayers.CvxpyLayer(inst.problem, inst.params, inst.variables)
    _, g_ref = layer_gradient(
        ref,
        inst.values,
        w,
        solver_args=dict(
            mode="dense", solve_method="SCS", eps_abs=1e-12, eps_rel=1e-12, max_iters=200_000
        ),
    )
    assert rel(g, g_ref) <= 1e-5
    monkeypatch.setattr(kb, "DENSE_FALLBACK_MAX", 0)
    _, g_lsmr, layer = kkt_gradient(inst, w)
    assert layer.last_diagnostics[0]["solve"] == "lsmr"
    assert rel(g_lsmr, g_ref) <= 1e-5
    ffo = FFOLayer(inst.problem, inst.params, inst.variables, solver=SCS12, central=True)
    _, g_f = layer_gradient(ffo, inst.values, w)
    assert rel(g_f, g) <= 1e-4


# ------------------------------------------------ degenerate blocks, via projections ---
def projection_problem(kind: str, dim: int):
    """``min 1/2||u - theta||^2  s.t.  u in K``: the solution is ``Pi_K(theta)`` and the
    gradient of ``w'u*`` is ``D Pi_K(theta)' w`` -- known in closed form."""
    u = cp.Variable(dim, name="u")
    theta = cp.Parameter(dim, name="theta")
    con = {
        "soc": lambda: [cp.SOC(u[0], u[1:])],
        "exp": lambda: [cp.constraints.ExpCone(u[0], u[1], u[2])],
    }[kind]()
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - theta)), con), theta, u


def _proj_grads(kind, theta, w, **kw):
    prob, tp, u = projection_problem(kind, theta.size)
    layer = FFOLayer(prob, [tp], [u], solver=SCS12, **kw)
    sol, g = layer_gradient(layer, [theta], [w])
    return sol[0], g, layer


def test_soc_block_at_apex_with_interior_multiplier():
    """``theta`` inside the polar cone: ``u* = 0`` (slack at the apex), multiplier in the
    interior of the cone (strictly complementary).  The block is kept; the gradient is 0
    (``D Pi = 0``), from both modes, without NaN (absolute tolerance 1e-6)."""
    theta, w = np.array([-2.0, 0.5, -0.3]), np.array([0.3, -1.0, 0.7])
    for kw in (dict(backward="kkt"), {}, dict(central=True)):
        sol, g, layer = _proj_grads("soc", theta, w, **kw)
        assert np.allclose(sol, 0, atol=1e-8)
        assert np.all(np.isfinite(g)) and np.abs(g).max() <= 1e-6, kw
        assert layer.last_diagnostics[0]["kept"] == 3


def test_soc_block_weakly_active_is_kept_and_one_sided():
    """``theta`` on the cone's boundary: ``u* = theta``, multiplier 0, slack on the
    boundary -- weakly active, a kink of the solution map.  The block is kept (and
    reported); the one-sided FFO difference follows the branch its perturbation enters
    (tolerance 1e-4): ``-delta w`` pointing into the cone gives ``w`` (interior branch),
    pointing out of it gives ``D_boundary w``; the central difference (the default on
    curved cones) gives their mean; the KKT mode returns the interior branch."""
    theta = np.array([5.0, 3.0, 4.0])  # ||(3, 4)|| = 5
    outward = np.array([-1.0, 0.6, 0.8])  # normal of the cone at theta
    rng = np.random.default_rng(9)
    t = rng.standard_normal(3)
    t -= (t @ outward) / (outward @ outward) * outward  # tangent part
    D_out = kc.soc_projection_derivative(theta + 1e-9 * outward)
    for sign, expect in ((1.0, lambda w: w), (-1.0, lambda w: D_out @ w)):
        w = t + sign * 0.5 * outward  # -delta w moves theta in (sign=+1) or out (-1)
        sol, g, _ = _proj_grads("soc", theta, w, central=False)
        assert np.allclose(sol, theta, atol=1e-7)
        assert np.all(np.isfinite(g))
        assert rel(g, expect(w)) <= 1e-4, sign
        # the default here is central (a curved block is kept): the mean of both branches
        _, g_c, _ = _proj_grads("soc", theta, w)
        assert rel(g_c, (w + D_out @ w) / 2) <= 1e-4, sign
    _, g_kkt, layer = _proj_grads("soc", theta, t + 0.5 * outward, backward="kkt")
    assert layer.last_diagnostics[0]["weak_blocks"] == 3
    assert rel(g_kkt, t + 0.5 * outward) <= 1e-6


def test_exp_block_on_the_boundary_ray():
    """``theta = (x<0, y<0, z>0)``: ``u* = (x, 0, z)`` lies on the boundary ray ``y = 0``
    of the exponential cone (where ``y e^(x/y)`` has no derivative).  The projection is
    differentiable there with ``D = diag(1, 0, 1)``; both modes give ``D w`` (KKT 1e-6,
    FFO default 1e-2, central 1e-4), without NaN."""
    theta, w = np.array([-1.0, -0.5, 2.0]), np.array([0.4, -0.8, 1.1])
    expect = np.array([w[0], 0.0, w[2]])
    for kw, tol in ((dict(backward="kkt"), 1e-6), ({}, 1e-2), (dict(central=True), 1e-4)):
        sol, g, _layer = _proj_grads("exp", theta, w, **kw)
        assert np.allclose(sol, [-1.0, 0.0, 2.0], atol=1e-6)
        assert np.all(np.isfinite(g))
        assert np.abs(g - expect).max() <= tol * np.linalg.norm(expect), kw


def test_exp_projection_layer_matches_closed_form():
    """``theta`` projecting onto the smooth boundary: the layer's gradient equals
    ``D Pi_EXP(theta)' w`` (KKT 1e-6, FFO central 1e-4)."""
    theta, w = np.array([1.0, 0.5, 0.2]), np.array([0.4, -0.8, 1.1])
    assert kc._exp_case(theta)[0] == "boundary"
    expect = kc.exp_projection_derivative(theta).T @ w
    for kw, tol in ((dict(backward="kkt"), 1e-6), (dict(central=True), 1e-4)):
        sol, g, _ = _proj_grads("exp", theta, w, **kw)
        assert np.allclose(sol, kc.exp_projection(theta), atol=1e-8)
        assert rel(g, expect) <= tol, kw


def test_classify_keeps_weak_cone_blocks_and_drops_interior_ones():
    """The cone-block rule: multiplier > tau_lam -> kept; multiplier ~ 0 and slack on the
    boundary -> kept and weak; multiplier ~ 0 and slack inside -> dropped.  The
    nonnegative rows follow the unchanged rule."""
    from ffo_core.protocol import Solution, SolveInfo, Status

    dims = ConeDims(nonneg=2, soc=(3, 3, 3), exp=2, psd=(2,))
    s = np.concatenate(
        [
            [0.0, 1.0],
            [1.0, 0.6, 0.8],
            [0.0, 0.0, 0.0],
            [2.0, 0.6, 0.8],  # SOC
            [-1.0, 0.0, 2.0],
            [0.0, 1.0, 2.0],  # EXP
            kc.svec(np.diag([1.0, 0.0])),
        ]
    )  # PSD
    lam = np.concatenate(
        [
            [1.0, 0.0],
            [1.0, -0.6, -0.8],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            kc.svec(np.diag([0.0, 1.0])),
        ]
    )
    sol = Solution(Status.OPTIMAL, np.zeros(1), np.zeros(0), lam, s, SolveInfo(accuracy=1e-12))
    a = classify(sol, dims)
    assert list(a.locked[:2]) == [True, False]
    kept = [bool(a.kept[r]) for r in (2, 5, 8, 11, 14, 17)]
    assert kept == [True, True, False, True, False, True]
    weak = [bool(a.weak_blocks[r]) for r in (2, 5, 8, 11, 14, 17)]
    assert weak == [False, True, False, True, False, False]
    assert a.kept_dims == ConeDims(0, (3, 3), 1, (2,))


def test_first_order_path_never_touches_the_kkt_machinery(monkeypatch):
    """The FFO backward on a cone program calls no projection derivative and no sparse
    factorisation (only the backend's solves)."""
    import scipy.sparse.linalg as spla

    inst = socp_instance(1)
    comp = compile_problem(inst.problem, inst.params, inst.variables)
    theta = np.zeros(comp.n_theta + 1)
    theta[comp.const_col] = 1
    for slot, v in zip(comp.params, inst.values):
        theta[slot.offset : slot.offset + slot.size] = v.ravel(order="F")
    g, h, e = comp.sample(comp.M @ theta)
    backend = get_backend(SCS12)
    sol = backend.solve(g, h, e)

    def forbidden(*a, **k):
        raise AssertionError("the first-order path factorised a matrix / used D Pi")

    for name in ("splu", "spsolve", "factorized"):
        monkeypatch.setattr(spla, name, forbidden)
    for name in ("projection_derivative", "dual_projection_derivative"):
        monkeypatch.setattr(kc, name, forbidden)
    monkeypatch.setattr(np.linalg, "solve", forbidden)
    c = np.zeros(g.n)  # the layer's c lives on the user's variables
    slot = comp.variables[0]
    c[slot.offset : slot.offset + slot.size] = 1.0
    grad = ffo_backward(backend, g, h, e, sol, c, FFOOptions(central=True))
    assert np.all(np.isfinite(grad.vector()))


def test_socp_delta_example_runs(tmp_path):
    """examples/socp_delta.py at n = 10: writes its figure, the ball's SOC block is kept,
    and with SCS the default-delta errors are small (one-sided <= 1e-3, central <= 1e-5)."""
    import importlib.util
    import os

    pytest.importorskip("matplotlib")
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "socp_delta.py")
    spec = importlib.util.spec_from_file_location("socp_delta", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    res = ex.sweep(10, np.logspace(-6, -2, 3))
    assert res["kept_rows"] == 11
    scs = next(k for k in ex.BACKENDS if k.startswith("SCS"))
    assert res["default"][(scs, False)][1] <= 1e-3
    assert res["default"][(scs, True)][1] <= 1e-5
    out = tmp_path / "socp_delta.png"
    ex.plot([res], np.logspace(-6, -2, 3), str(out))
    assert out.stat().st_size > 10_000


def test_classify_batch_is_classify_per_sample():
    """classify_batch gives every sample exactly its lone classify (no threshold or row
    leaks across the batch), for every threshold option, samples of very different scales
    and accuracies (None and 0 mean the default) and mixed cones; the thresholds are the
    documented sqrt(acc) * max(1, ||.||_inf)."""
    from ffo_core.engine.active_set import DEFAULT_ACCURACY, classify_batch
    from ffo_core.protocol import Solution, SolveInfo, Status

    dims = ConeDims(nonneg=6, soc=(3,), exp=1, psd=(2,))
    rng = np.random.default_rng(4)
    sols, rhs = [], []
    for k, acc in enumerate((1e-8, 1e-4, None, 0.0, 1e-12)):
        scale = 10.0 ** (2 * k - 4)
        s = scale * np.abs(rng.standard_normal(dims.rows))
        lam = scale * np.abs(rng.standard_normal(dims.rows))
        off = rng.random(dims.rows) < 0.5
        s[off], lam[~off] = 1e-9 * scale, 1e-9 * scale
        sols.append(
            Solution(Status.OPTIMAL, np.zeros(2), np.zeros(0), lam, s, SolveInfo(accuracy=acc))
        )
        rhs.append(scale * rng.standard_normal(dims.rows))
    for kw in (dict(), dict(rhs=rhs), dict(tau_s=1e-3, rhs=rhs), dict(tau_lam=1e-2)):
        batch = classify_batch(sols, dims, **kw)
        for i, (sol, got) in enumerate(zip(sols, batch)):
            one = dict(kw, rhs=kw["rhs"][i]) if "rhs" in kw else kw
            alone = classify(sol, dims, **one)
            for mask in ("locked", "kept", "weak", "weak_blocks"):
                assert np.array_equal(getattr(got, mask), getattr(alone, mask)), (kw, i)
            assert (got.tau_s, got.tau_lam, got.kept_dims) == (
                alone.tau_s,
                alone.tau_lam,
                alone.kept_dims,
            )
            if not kw:
                root = np.sqrt(sol.info.accuracy or DEFAULT_ACCURACY)
                assert got.tau_s == root * max(1.0, np.abs(sol.slack).max())
                assert got.tau_lam == root * max(1.0, np.abs(sol.ineq_dual).max())
        assert any(a.locked.any() for a in batch) and not all(a.locked.all() for a in batch)
