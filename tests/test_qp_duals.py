"""FFOQPLayer(duals=True): the multipliers as outputs, with gradients through them, checked
against finite differences of tightly solved QPs, in both backward modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffo_core import FFOQPLayer

TIGHT = "clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12"


def strict_qp(seed, n=6, m=8, p=2):
    """A QP whose active set is strictly complementary (margins ~1) at the solution."""
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, n))
    Q = F @ F.T + np.eye(n)
    G, A = rng.standard_normal((m, n)), rng.standard_normal((p, n))
    y0 = rng.standard_normal(n)
    active = rng.random(m) < 0.5
    lam0 = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    s0 = np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    nu0 = rng.standard_normal(p)
    h, b = G @ y0 + s0, A @ y0
    q = -(Q @ y0 + G.T @ lam0 + A.T @ nu0)
    return [torch.tensor(v) for v in (Q, q, G, h, A, b)], (y0, lam0, nu0)


def test_duals_are_the_qp_multipliers():
    ts, (y0, lam0, nu0) = strict_qp(0)
    y, lam, nu = FFOQPLayer(duals=True)(*ts)
    assert np.allclose(y.detach().numpy()[0], y0, atol=1e-7)
    assert np.allclose(lam.detach().numpy()[0], lam0, atol=1e-7)
    assert np.allclose(nu.detach().numpy()[0], nu0, atol=1e-7)


@pytest.mark.parametrize("backward", ["ffo", "kkt"])
def test_gradients_through_the_duals_match_finite_differences(backward):
    ts, _ = strict_qp(1)
    rng = np.random.default_rng(5)
    w_y, w_lam, w_nu = (torch.tensor(rng.standard_normal(k)) for k in (6, 8, 2))

    def loss(values, layer):
        y, lam, nu = layer(*values)
        return float((y[0] * w_y).sum() + (lam[0] * w_lam).sum() + (nu[0] * w_nu).sum())

    leaves = [t.clone().requires_grad_() for t in ts]
    y, lam, nu = FFOQPLayer(duals=True, backward=backward)(*leaves)
    ((y[0] * w_y).sum() + (lam[0] * w_lam).sum() + (nu[0] * w_nu).sum()).backward()
    tight = FFOQPLayer(TIGHT, duals=True)
    eps = 1e-6
    for k, name in enumerate("QpGhAb"):
        grad = leaves[k].grad.numpy()
        fd = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            plus = [t.clone() for t in ts]
            minus = [t.clone() for t in ts]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            fd[idx] = (loss(plus, tight) - loss(minus, tight)) / (2 * eps)
        if name == "Q":  # only the symmetric part of Q is a coordinate of the solution
            fd, grad = (fd + fd.T) / 2, (grad + grad.T) / 2
        err = np.linalg.norm(grad - fd) / max(np.linalg.norm(fd), 1e-12)
        assert err <= 1e-5, (name, err)
