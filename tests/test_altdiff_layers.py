"""``backward="altdiff"`` in both layers: the same gradients as the exact mode and the
closed form, refusals by name where Alt-Diff does not apply."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from ffo_core import FFOLayer, FFOQPLayer, SolverError, UnsupportedError


def box(n):
    G = torch.cat([torch.eye(n), -torch.eye(n), torch.ones(1, n)]).double()
    h = torch.cat([torch.zeros(n), torch.ones(n), torch.tensor([3.0])]).double()
    return torch.eye(n, dtype=torch.float64), G, h


def test_qp_layer_altdiff_matches_the_closed_form_and_the_kkt_mode():
    n = 40
    Q, G, h = box(n)
    rng = np.random.default_rng(1)
    q, w = rng.standard_normal((3, n)), rng.standard_normal((3, n))
    grads = {}
    for mode in ("kkt", "altdiff"):
        qt = torch.tensor(q, requires_grad=True)
        y = FFOQPLayer(backward=mode)(Q, qt, G, h, None, None)
        (y * torch.tensor(w)).sum().backward()
        grads[mode] = qt.grad.numpy()
    ref = -w * ((q > 0) & (q < 1))
    assert np.linalg.norm(grads["altdiff"] - ref) <= 1e-6 * np.linalg.norm(ref)
    assert np.linalg.norm(grads["altdiff"] - grads["kkt"]) <= 1e-6 * np.linalg.norm(ref)


def test_cvxpy_layer_altdiff_with_equalities_matches_the_kkt_mode():
    n, m, p = 8, 6, 2
    rng = np.random.default_rng(3)
    y = cp.Variable(n)
    q, G, h, A, b = (cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m),
                     cp.Parameter((p, n)), cp.Parameter(p))  # fmt: skip
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), [G @ y <= h, A @ y == b])
    y0 = rng.standard_normal(n)
    values = [rng.standard_normal(n), rng.standard_normal((m, n)), None,
              rng.standard_normal((p, n)), None]  # fmt: skip
    values[2] = values[1] @ y0 + rng.uniform(0, 1, m) * (rng.random(m) < 0.5)
    values[4] = values[3] @ y0
    w = torch.tensor(rng.standard_normal(n))
    out = {}
    for mode in ("kkt", "altdiff"):
        ts = [torch.tensor(v, requires_grad=True) for v in values]
        (sol,) = FFOLayer(prob, [q, G, h, A, b], [y], backward=mode)(*ts)
        (sol * w).sum().backward()
        out[mode] = torch.cat([t.grad.flatten() for t in ts])
    assert torch.norm(out["altdiff"] - out["kkt"]) <= 1e-5 * torch.norm(out["kkt"])


def test_altdiff_refuses_cones_and_dual_outputs_by_name():
    x = cp.Variable(3)
    a = cp.Parameter(3)
    with pytest.raises(UnsupportedError, match="polyhedral"):
        FFOLayer(cp.Problem(cp.Minimize(cp.norm(x - a)), []), [a], [x], backward="altdiff")


def test_altdiff_that_does_not_converge_is_a_typed_error():
    n = 20
    Q, G, h = box(n)
    qt = torch.tensor(np.random.default_rng(0).standard_normal((2, n)), requires_grad=True)
    y = FFOQPLayer(backward="altdiff", altdiff_max_iter=2)(Q, qt, G, h, None, None)
    with pytest.raises(SolverError, match="altdiff.*did not converge.*batch index"):
        y.sum().backward()
