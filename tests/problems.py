"""Random test problems with a known, strictly complementary solution.

``random_qp`` builds ``min 1/2 ||F y||^2 + q'y  s.t.  G y <= h,  A y = b`` (F, q, G, h, A, b
all CVXPY parameters) with data chosen so that a given ``y0`` is optimal with multipliers
``lam0`` that are strictly positive on a known active set and zero elsewhere, and slacks
strictly positive off it: strict complementarity by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import torch

TIGHT = "clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12,tol_ktratio=1e-10"
NAMES = ("F", "q", "G", "h", "A", "b")


@dataclass
class QPInstance:
    problem: cp.Problem
    params: list[cp.Parameter]
    y: cp.Variable
    values: list[np.ndarray]  # one sample: F, q, G, h, A, b
    y0: np.ndarray

    def tensors(self, batch: int | None = None, dtype=torch.float64, seed: int = 1):
        """Parameter tensors; with ``batch``, each sample's q, h, b are perturbed slightly
        (the active set stays the same: perturbations are far below the margins)."""
        if batch is None:
            return [torch.tensor(v, dtype=dtype) for v in self.values]
        rng = np.random.default_rng(seed)
        out = []
        for name, v in zip(NAMES, self.values):
            vb = np.repeat(v[None], batch, axis=0)
            if name in ("q",):
                vb = vb + 1e-3 * rng.standard_normal(vb.shape)
            out.append(torch.tensor(vb, dtype=dtype))
        return out


def random_qp(
    n: int,
    m: int,
    p: int,
    seed: int = 0,
    active_frac: float = 0.4,
    with_eq: bool = True,
    with_ineq: bool = True,
) -> QPInstance:
    rng = np.random.default_rng(seed)
    F = np.eye(n) + rng.standard_normal((n, n)) / (2 * np.sqrt(n))
    y0 = rng.standard_normal(n)
    G = rng.standard_normal((m, n))
    active = np.zeros(m, dtype=bool)
    active[: round(active_frac * m)] = True
    h = G @ y0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    lam0 = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    A = rng.standard_normal((p, n))
    b = A @ y0
    nu0 = rng.standard_normal(p)
    q = -(F.T @ F @ y0 + A.T @ nu0 + G.T @ lam0)

    y = cp.Variable(n, name="y")
    Fp, qp_ = cp.Parameter((n, n), name="F"), cp.Parameter(n, name="q")
    Gp, hp = cp.Parameter((m, n), name="G"), cp.Parameter(m, name="h")
    Ap, bp = cp.Parameter((p, n), name="A"), cp.Parameter(p, name="b")
    cons = ([Gp @ y <= hp] if with_ineq else []) + ([Ap @ y == bp] if with_eq else [])
    params = [Fp, qp_] + ([Gp, hp] if with_ineq else []) + ([Ap, bp] if with_eq else [])
    values = [F, q] + ([G, h] if with_ineq else []) + ([A, b] if with_eq else [])
    if not with_ineq:
        values[1] = -(F.T @ F @ y0 + A.T @ nu0)
    if not with_eq:
        values[1] = -(F.T @ F @ y0 + G.T @ lam0) if with_ineq else -(F.T @ F @ y0)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Fp @ y) + qp_ @ y), cons)
    return QPInstance(prob, params, y, values, y0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a - b).norm() / b.norm())


def layer_grads(layer, tensors, weights):
    """Gradients of ``sum(weights * y)`` through ``layer`` w.r.t. every tensor."""
    ts = [t.clone().requires_grad_(True) for t in tensors]
    (sol,) = layer(*ts)
    (weights.to(sol.dtype) * sol).sum().backward()
    return sol.detach(), [t.grad for t in ts]
