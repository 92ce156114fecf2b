"""Alt-Diff (:mod:`ffo_core.engine.altdiff`): ADMM forward and reverse-mode backward.

References, all independent of the module: Clarabel solves at tight tolerances (the
forward), the exact reduced-KKT backward :func:`kkt_backward` on protocol objects and
``FFOQPLayer(backward="kkt")`` through autograd (the gradient), central finite differences
of Clarabel solves at 1e-10 (the gradient again, with no KKT algebra at all).

The problems have a known, strictly complementary solution (multipliers in [0.5, 1.5] on
the active rows, slacks in [0.5, 1.5] off them), dense or with sparse structure (densities
0.2, passed as dense tensors), with equalities and inequalities.  Tolerances (float64
unless said): at ``tol = 1e-10`` the gradient is within rel 1e-6 of the exact one (measured
1e-10 to 9e-10); in float32 at ``tol = 1e-6`` within rel 1e-4 (measured 2e-6 to 6e-6); the
truncated variant's error stays below ``10 tol`` for tol = 1e-1 .. 1e-6 (measured at most
6.0 tol) and falls at every step.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ffo_core import FFOQPLayer
from ffo_core.engine.altdiff import (
    QPData,
    altdiff_backward,
    altdiff_factor,
    altdiff_solve,
    data_gradient,
    default_rho,
)
from ffo_core.engine.kkt_backward import kkt_backward
from ffo_core.errors import InvalidParameterError, SolverError
from ffo_core.protocol import ConeConstraints, ConeDims, Equalities, Objective
from ffo_core.registry import get_backend

TIGHT = "clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12,tol_ktratio=1e-10"
FD_SOLVER = "clarabel:tol_gap_abs=1e-10,tol_gap_rel=1e-10,tol_feas=1e-10,tol_ktratio=1e-8"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# -- problems and references ----------------------------------------------------------------
def _sparse(rng, rows, cols, density):
    """A random matrix with about ``density`` nonzeros, at least one per row."""
    M = np.where(rng.random((rows, cols)) < density, rng.standard_normal((rows, cols)), 0.0)
    M[np.arange(rows), rng.integers(0, cols, rows)] = rng.standard_normal(rows) + 2.0
    return M


def random_qp(n, m, p, seed, density=None, active_frac=0.4):
    """``(P, q, A, b, G, h)`` (NumPy) whose solution is strictly complementary by
    construction; ``density`` gives P's factor, A and G that many nonzeros."""
    rng = np.random.default_rng(seed)
    if density is None:
        F = np.eye(n) + rng.standard_normal((n, n)) / (2 * np.sqrt(n))
        G, A = rng.standard_normal((m, n)), rng.standard_normal((p, n))
    else:
        F = np.eye(n) + 0.5 * _sparse(rng, n, n, density) / np.sqrt(density * n)
        G, A = _sparse(rng, m, n, density), _sparse(rng, p, n, density)
    P = F.T @ F
    x0 = rng.standard_normal(n)
    active = np.arange(m) < round(active_frac * m)
    h = G @ x0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    lam0 = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    nu0 = rng.standard_normal(p)
    q = -(P @ x0 + A.T @ nu0 + G.T @ lam0)
    return P, q, A, A @ x0, G, h


def dfl_qp(n, seed):
    """The decision-focused-learning QP: ``min 1/2||x||^2 + q'x, -1 <= x <= 0, 1'x <= 3``."""
    rng = np.random.default_rng(seed)
    G = np.vstack([np.eye(n), -np.eye(n), np.ones((1, n))])
    h = np.r_[np.zeros(n), np.ones(n), 3.0]
    return np.eye(n), 2 * rng.standard_normal(n), np.zeros((0, n)), np.zeros(0), G, h


def protocol(P, q, A, b, G, h):
    return (
        Objective(sp.csc_matrix(P), q),
        ConeConstraints(sp.csc_matrix(G), h, ConeDims(nonneg=G.shape[0])),
        Equalities(sp.csc_matrix(A), b),
    )


def batch(problems, dtype=torch.float64, device="cpu") -> QPData:
    return QPData(
        *(
            torch.tensor(np.stack([pr[i] for pr in problems]), dtype=dtype, device=device)
            for i in range(6)
        )
    )


def dense_gradient(problem, base, direction):
    """``(dP, dq, dA, db, dG, dh)`` from a base point and direction, written out here
    (independent of :func:`data_gradient`)."""
    x, nu, lam = base
    wx, wnu, wlam = direction
    return [
        0.5 * (np.outer(wx, x) + np.outer(x, wx)),
        wx,
        np.outer(wnu, x) + np.outer(nu, wx),
        -wnu,
        np.outer(wlam, x) + np.outer(lam, wx),
        -wlam,
    ]


def exact(problem, c):
    """Clarabel (tight) and the exact KKT gradient of ``c'x*``: the solution and the
    six dense gradient blocks."""
    parts = protocol(*problem)
    sol = get_backend(TIGHT).solve(*parts)
    grad = kkt_backward(*parts, sol, c)
    return sol, dense_gradient(problem, grad.base, grad.direction), grad


def flat(blocks) -> np.ndarray:
    return np.concatenate([np.asarray(b, dtype=float).ravel() for b in blocks])


def rel(a, b) -> float:
    a, b = flat(a), flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def sample(grads: QPData, k: int) -> list[np.ndarray]:
    return [g[k].detach().double().cpu().numpy() for g in grads]


def clarabel_point(sols, dtype=torch.float64, device="cpu"):
    fields = ("primal", "eq_dual", "ineq_dual", "slack")
    return tuple(
        torch.tensor(np.stack([getattr(s, f) for s in sols]), dtype=dtype, device=device)
        for f in fields
    )


SHAPES = {
    "dense": dict(n=30, m=20, p=8, density=None),
    "sparse": dict(n=40, m=30, p=10, density=0.2),
    "eq-only": dict(n=25, m=0, p=10, density=None),
    "ineq-only": dict(n=25, m=30, p=0, density=0.2),
}


# -- forward --------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["dense", "sparse"])
def test_forward_agrees_with_clarabel(structure):
    kw = SHAPES[structure]
    problems = [random_qp(kw["n"], kw["m"], kw["p"], s, kw["density"]) for s in range(3)]
    out = altdiff_solve(batch(problems), tol=1e-10)
    assert out.converged.all()
    for k, pr in enumerate(problems):
        sol = get_backend(TIGHT).solve(*protocol(*pr))
        for mine, ref in ((out.x, sol.primal), (out.nu, sol.eq_dual), (out.lam, sol.ineq_dual)):
            err = np.linalg.norm(mine[k].numpy() - ref) / max(1.0, np.linalg.norm(ref))
            assert err < 1e-7, err
        P, q, A, b, G, h = pr
        x, nu, lam, s = (t[k].numpy() for t in (out.x, out.nu, out.lam, out.s))
        assert lam.min() >= 0 and s.min() >= 0 and abs(lam @ s) < 1e-12
        assert np.abs(P @ x + q + A.T @ nu + G.T @ lam).max() < 1e-7 * np.abs(q).max()
        assert np.abs(G @ x + s - h).max() < 1e-8 and np.abs(A @ x - b).max() < 1e-8
        assert out.primal_residual[k] <= 1e-10 and out.dual_residual[k] <= 1e-10


def test_forward_warm_started_at_the_solution_stops_at_once():
    problems = [random_qp(30, 20, 8, s) for s in range(2)]
    sols = [get_backend(TIGHT).solve(*protocol(*pr)) for pr in problems]
    cold = altdiff_solve(batch(problems), tol=1e-9)
    warm = altdiff_solve(batch(problems), tol=1e-9, warm_start=clarabel_point(sols))
    assert (cold.iterations > 50).all() and (warm.iterations == 1).all()
    assert torch.allclose(warm.x, cold.x, atol=1e-7)


def test_forward_iterations_do_not_depend_on_the_scale_of_objective_or_rows():
    P, q, A, b, G, h = random_qp(30, 20, 8, 0)
    rows = np.r_[1e3 * np.ones(5), np.ones(15)][:, None]  # five rows 1000x longer
    scaled = [
        (P, q, A, b, G, h),
        (1e3 * P, 1e3 * q, A, b, G, h),
        (P, q, A, b, rows * G, rows[:, 0] * h),
    ]
    outs = [altdiff_solve(batch([pr]), tol=1e-8) for pr in scaled]
    assert len({int(o.iterations[0]) for o in outs}) == 1
    for o in outs[1:]:
        assert torch.allclose(o.x, outs[0].x, atol=1e-7)
    assert torch.allclose(outs[1].lam, 1e3 * outs[0].lam, rtol=1e-6, atol=1e-6)


def test_max_iter_reports_unconverged_samples_without_raising():
    problems = [random_qp(30, 20, 8, 0), random_qp(30, 20, 8, 1)]
    out = altdiff_solve(batch(problems), tol=1e-10, max_iter=5)
    assert not out.converged.any() and (out.iterations == 5).all()
    assert (out.primal_residual > 1e-10).all()
    c = torch.ones(2, 30, dtype=torch.float64)
    back = altdiff_backward(batch(problems), out.point, c, tol=1e-10, max_iter=3)
    assert not back.info["converged"].any() and (back.info["iterations"] == 3).all()


# -- backward against the exact KKT gradient ------------------------------------------------
@pytest.mark.parametrize("structure", list(SHAPES))
@pytest.mark.parametrize("start", ["clarabel", "altdiff"])
def test_gradient_matches_exact_kkt(structure, start):
    """Batched; from a Clarabel point (warm start) and from Alt-Diff's own forward."""
    kw = SHAPES[structure]
    problems = [random_qp(kw["n"], kw["m"], kw["p"], 10 + s, kw["density"]) for s in range(3)]
    rng = np.random.default_rng(0)
    cs = rng.standard_normal((3, kw["n"]))
    refs = [exact(pr, c) for pr, c in zip(problems, cs)]
    data = batch(problems)
    if start == "clarabel":
        point, factor = clarabel_point([r[0] for r in refs]), None
    else:
        fwd = altdiff_solve(data, tol=1e-10)
        point, factor = fwd.point, fwd.factor
    out = altdiff_backward(data, point, torch.tensor(cs), tol=1e-10, factor=factor)
    assert out.info["converged"].all()
    if start == "clarabel":  # the point needs one ADMM step, not more
        assert (out.info["primal_iterations"] == 1).all()
    grads = data_gradient(out.base, out.direction)
    for k, (pr, (_, ref, kkt)) in enumerate(zip(problems, refs)):
        assert rel(sample(grads, k), ref) < 1e-6
        # the direction itself is the reduced KKT solution (w_lam zero off the active set)
        for mine, theirs in zip(out.direction, kkt.direction):
            scale = np.abs(flat(kkt.direction)).max()
            assert np.abs(mine[k].numpy() - theirs).max(initial=0.0) < 1e-6 * scale
        # and data_gradient agrees with the engine's DataGradient on the data's pattern
        pattern = np.concatenate([kkt.P, kkt.q, kkt.A, kkt.b, kkt.G, kkt.h])
        g, h, e = protocol(*pr)
        mine = [sample(grads, k)[i] for i in range(6)]
        on_pattern = np.concatenate(
            [
                mine[0][g.P.indices, np.repeat(np.arange(g.n), np.diff(g.P.indptr))],
                mine[1],
                mine[2][e.A.indices, np.repeat(np.arange(g.n), np.diff(e.A.indptr))],
                mine[3],
                mine[4][h.G.indices, np.repeat(np.arange(g.n), np.diff(h.G.indptr))],
                mine[5],
            ]
        )
        assert np.linalg.norm(on_pattern - pattern) < 1e-6 * np.linalg.norm(pattern)


def test_gradient_matches_the_qp_layers_kkt_mode_through_autograd():
    """The six input gradients of ``FFOQPLayer(backward="kkt")`` (dense, batched)."""
    problems = [random_qp(20, 14, 5, 20 + s) for s in range(4)]
    data = batch(problems)
    weights = torch.tensor(np.random.default_rng(3).standard_normal((4, 20)))
    inputs = [
        t.clone().requires_grad_(True) for t in (data.P, data.q, data.G, data.h, data.A, data.b)
    ]
    y = FFOQPLayer(TIGHT, backward="kkt")(*inputs)
    (weights * y).sum().backward()
    ref = dict(zip("PqGhAb", (t.grad for t in inputs)))
    out = altdiff_backward(data, altdiff_solve(data, tol=1e-10).point, weights, tol=1e-10)
    mine = dict(zip("PqAbGh", data_gradient(out.base, out.direction)))
    for name in "PqAbGh":
        err = float((mine[name] - ref[name]).norm() / ref[name].norm())
        assert err < 1e-6, (name, err)


def test_dfl_qp_gradient_matches_exact_kkt():
    problems = [dfl_qp(25, s) for s in range(3)]
    cs = np.random.default_rng(1).standard_normal((3, 25))
    refs = [exact(pr, c) for pr, c in zip(problems, cs)]
    data = batch(problems)
    out = altdiff_backward(data, altdiff_solve(data, tol=1e-10).point, torch.tensor(cs), tol=1e-10)
    grads = data_gradient(out.base, out.direction)
    for k, (_, ref, _) in enumerate(refs):
        assert rel(sample(grads, k), ref) < 1e-6


def test_matrices_shared_by_the_batch_factorise_once():
    """``P``, ``A``, ``G`` (and ``h``) with leading dimension 1: one ``H^-1`` for the batch,
    the same answers as per-sample copies."""
    problems = [dfl_qp(25, s) for s in range(3)]
    cs = torch.tensor(np.random.default_rng(1).standard_normal((3, 25)))
    copies = batch(problems)
    shared = copies._replace(P=copies.P[:1], A=copies.A[:1], G=copies.G[:1], h=copies.h[:1])
    outs = []
    for data in (copies, shared):
        fwd = altdiff_solve(data, tol=1e-10)
        outs.append((fwd, altdiff_backward(data, fwd.point, cs, tol=1e-10, factor=fwd.factor)))
    (f0, b0), (f1, b1) = outs
    assert f0.factor.H_inv.shape[0] == 3 and f1.factor.H_inv.shape[0] == 1
    for a, b in zip(f0.point + b0.direction, f1.point + b1.direction):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    # a rho per sample cannot share H: one factorisation per sample, same answer
    f2 = altdiff_solve(shared, tol=1e-10, rho=torch.tensor([1.0, 1.0, 1.5], dtype=torch.float64))
    assert f2.factor.H_inv.shape[0] == 3
    assert torch.allclose(f2.x, f0.x, atol=1e-8)


def test_float32():
    """float32 throughout (the Cholesky factor too): rel 1e-4 at tol 1e-6 (measured 6e-6)."""
    problems = [random_qp(30, 20, 8, 30 + s) for s in range(3)]
    cs = np.random.default_rng(2).standard_normal((3, 30))
    refs = [exact(pr, c) for pr, c in zip(problems, cs)]
    data = batch(problems, torch.float32)
    fwd = altdiff_solve(data, tol=1e-6)
    out = altdiff_backward(
        data, fwd.point, torch.tensor(cs, dtype=torch.float32), tol=1e-6, factor=fwd.factor
    )
    assert fwd.x.dtype == torch.float32 and all(t.dtype == torch.float32 for t in out.direction)
    assert fwd.converged.all() and out.info["converged"].all()
    grads = data_gradient(out.base, out.direction)
    for k, (sol, ref, _) in enumerate(refs):
        assert rel([fwd.x[k].double().numpy()], [sol.primal]) < 1e-4
        assert rel(sample(grads, k), ref) < 1e-4


def test_samples_of_a_batch_do_not_interact():
    """Samples converge at different iterations: each stops alone, as if solved alone."""
    problems = [random_qp(30, 20, 8, 40), random_qp(30, 20, 8, 41, density=0.2)]
    cs = torch.tensor(np.random.default_rng(4).standard_normal((2, 30)))
    data = batch(problems)
    fwd = altdiff_solve(data, tol=1e-8)
    out = altdiff_backward(data, fwd.point, cs, tol=1e-8, factor=fwd.factor)
    assert fwd.iterations[0] != fwd.iterations[1]
    for k in range(2):
        one = batch([problems[k]])
        f1 = altdiff_solve(one, tol=1e-8)
        o1 = altdiff_backward(one, f1.point, cs[k : k + 1], tol=1e-8, factor=f1.factor)
        assert f1.iterations[0] == fwd.iterations[k]
        assert o1.info["iterations"][0] == out.info["iterations"][k]
        for a, b in zip(out.direction + fwd.point, o1.direction + f1.point):
            assert torch.allclose(a[k], b[0], rtol=1e-9, atol=1e-12)


# -- finite differences, no KKT algebra -----------------------------------------------------
@pytest.mark.parametrize("structure", ["dense", "sparse"])
def test_gradient_matches_finite_differences_of_tight_solves(structure):
    """Directional derivatives of ``c'x*`` along random perturbations of each data block,
    by central differences (step 1e-5) of Clarabel solves at 1e-10; agreement within
    ``1e-6 |grad| |direction|`` (measured at most 3e-9 of it)."""
    kw = dict(SHAPES[structure], n=20, m=14, p=5)
    problem = random_qp(kw["n"], kw["m"], kw["p"], 50, kw["density"])
    c = np.random.default_rng(5).standard_normal(kw["n"])
    data = batch([problem])
    out = altdiff_backward(
        data, altdiff_solve(data, tol=1e-10).point, torch.tensor(c)[None], tol=1e-10
    )
    grads = sample(data_gradient(out.base, out.direction), 0)
    rng = np.random.default_rng(6)
    solver = get_backend(FD_SOLVER)
    step = 1e-5
    for i, name in enumerate("PqAbGh"):
        D = rng.standard_normal(problem[i].shape)
        if name == "P":
            D = 0.5 * (D + D.T)
        if name in "AG":  # perturb the structure's entries only, like a sparse parameter
            D = np.where(problem[i] != 0, D, 0.0)
        values = []
        for sign in (1.0, -1.0):
            pr = list(problem)
            pr[i] = problem[i] + sign * step * D
            values.append(c @ solver.solve(*protocol(*pr)).primal)
        fd = (values[0] - values[1]) / (2 * step)
        analytic = float(np.sum(grads[i] * D))
        assert abs(fd - analytic) <= 1e-6 * np.linalg.norm(grads[i]) * np.linalg.norm(D), name


# -- the truncated variant ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truncation_error_falls_with_the_tolerance(seed):
    """Alt-Diff's Theorem 4.1: stopping both passes at ``tol`` leaves a gradient error of
    the order of the solution's.  Forward and backward at tol = 1e-1 .. 1e-6: the error
    falls at every step and stays below 10 tol (measured at most 6.0 tol); the solution's
    error likewise (at most 2.9 tol)."""
    problem = random_qp(40, 30, 10, 60 + seed)
    c = np.random.default_rng(seed).standard_normal(40)
    sol, ref, _ = exact(problem, c)
    data = batch([problem])
    grad_err, x_err = [], []
    tols = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    for tol in tols:
        fwd = altdiff_solve(data, tol=tol)
        out = altdiff_backward(data, fwd.point, torch.tensor(c)[None], tol=tol, factor=fwd.factor)
        assert fwd.converged.all() and out.info["converged"].all()
        grad_err.append(rel(sample(data_gradient(out.base, out.direction), 0), ref))
        x_err.append(rel([fwd.x[0].numpy()], [sol.primal]))
    for errs in (grad_err, x_err):
        assert all(b < a for a, b in itertools.pairwise(errs)), errs
        assert all(e <= 10 * t for e, t in zip(errs, tols)), errs


def test_truncated_adjoint_at_an_exact_point():
    """With the point exact (Clarabel's), only the adjoint is truncated: same behaviour."""
    problem = random_qp(40, 30, 10, 70)
    c = np.random.default_rng(7).standard_normal(40)
    sol, ref, _ = exact(problem, c)
    data = batch([problem])
    errs = []
    for tol in (1e-2, 1e-4, 1e-6):
        out = altdiff_backward(data, clarabel_point([sol]), torch.tensor(c)[None], tol=tol)
        errs.append(rel(sample(data_gradient(out.base, out.direction), 0), ref))
    assert errs[0] > errs[1] > errs[2] and errs[2] <= 1e-5, errs


# -- errors ---------------------------------------------------------------------------------
def test_errors_are_typed_and_named():
    problem = random_qp(10, 6, 3, 0)
    data = batch([problem, problem])
    P, G = data.P.clone(), data.G.clone()
    P[1], G[1, :, 5:] = 0.0, 0.0  # an LP in sample 1 whose last 5 variables are free
    singular = data._replace(P=P, A=data.A[:, :0], b=data.b[:, :0], G=G)
    with pytest.raises(SolverError, match="batch index 1") as info:
        altdiff_solve(singular)
    assert info.value.batch_index == 1
    with pytest.raises(InvalidParameterError, match="h must have shape"):
        altdiff_solve(data._replace(h=data.h[:, :-1]))
    with pytest.raises(InvalidParameterError, match="one dtype"):
        altdiff_solve(data._replace(q=data.q.float()))
    with pytest.raises(InvalidParameterError, match="NaN"):
        altdiff_solve(data._replace(h=data.h.clone().fill_(float("nan"))))
    fwd = altdiff_solve(data)
    with pytest.raises(InvalidParameterError, match="c must be"):
        altdiff_backward(data, fwd.point, torch.ones(2, 9, dtype=torch.float64))
    with pytest.raises(InvalidParameterError, match="warm start lam"):
        altdiff_backward(data, (fwd.x, fwd.nu, fwd.lam[:, :2]), torch.ones(2, 10))
    with pytest.raises(InvalidParameterError, match="rho"):
        altdiff_factor(data, rho=-1.0)


def test_default_rho_is_the_mean_curvature_and_covers_lps():
    P = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))[None]
    q = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    assert default_rho(P, q).item() == pytest.approx(2.0)
    assert default_rho(torch.zeros_like(P), q).item() == pytest.approx(5.0 / np.sqrt(2))
    assert default_rho(torch.zeros_like(P), torch.zeros_like(q)).item() == 1.0


# -- CUDA -----------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize(
    "dtype,tol,bound", [(torch.float64, 1e-10, 1e-6), (torch.float32, 1e-6, 1e-4)]
)
def test_cuda(dtype, tol, bound):
    problems = [random_qp(30, 20, 8, 80 + s, density=0.2 if s else None) for s in range(3)]
    cs = np.random.default_rng(8).standard_normal((3, 30))
    refs = [exact(pr, c) for pr, c in zip(problems, cs)]
    data = batch(problems, dtype, "cuda")
    fwd = altdiff_solve(data, tol=tol)
    out = altdiff_backward(
        data, fwd.point, torch.tensor(cs, dtype=dtype, device="cuda"), tol=tol, factor=fwd.factor
    )
    assert out.direction[0].device.type == "cuda"
    grads = data_gradient(out.base, out.direction)
    for k, (_, ref, _) in enumerate(refs):
        assert rel(sample(grads, k), ref) < bound
