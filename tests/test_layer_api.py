"""FFOLayer's conventions, edge cases users hit with the peers, and its typed errors."""

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from problems import TIGHT, random_qp

from ffo_core import (
    BackendUnavailable,
    ConfigError,
    FFOLayer,
    GhostProblemError,
    InvalidParameterError,
    NotDPPError,
    ProblemError,
    SolverError,
)


def _check_against_kkt(problem, params, variables, tensors, tol=1e-3):
    w = [
        torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        for v in variables
    ]

    def grads(layer):
        ts = [t.clone().requires_grad_(True) for t in tensors]
        outs = layer(*ts)
        sum((wi * o).sum() for wi, o in zip(w, outs)).backward()
        return outs, [t.grad for t in ts]

    outs, g = grads(FFOLayer(problem, params, variables))
    _, g_ref = grads(FFOLayer(problem, params, variables, solver=TIGHT, backward="kkt"))
    # a block whose exact gradient is 0 is judged against the scale of the whole gradient
    scale = float(torch.sqrt(sum((b**2).sum() for b in g_ref)))
    for a, b in zip(g, g_ref):
        assert float((a - b).norm()) <= tol * max(float(b.norm()), scale)
    return outs, g


# -- edge cases ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "with_eq,with_ineq", [(False, True), (True, False)], ids=["no-equalities", "no-inequalities"]
)
def test_missing_constraint_kinds(with_eq, with_ineq):
    qp = random_qp(12, 8, 4, seed=9, with_eq=with_eq, with_ineq=with_ineq)
    (y,), _ = _check_against_kkt(qp.problem, qp.params, [qp.y], qp.tensors())
    assert np.allclose(y.detach().numpy(), qp.y0, atol=1e-6)


def test_no_constraints_at_all():
    q = cp.Parameter(5)
    y = cp.Variable(5)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y))
    qv = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (sol,) = FFOLayer(prob, [q], [y])(qv)
    assert torch.allclose(sol, -qv.detach(), atol=1e-7)
    w = torch.randn(5, dtype=torch.float64)
    (w * sol).sum().backward()
    assert torch.allclose(qv.grad, -w, rtol=1e-5, atol=1e-7)


def test_parameters_only_in_constraints():
    G, h = cp.Parameter((6, 4)), cp.Parameter(6)
    y = cp.Variable(4)
    target = np.array([1.0, -2.0, 0.5, 3.0])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - target)), [G @ y <= h])
    rng = np.random.default_rng(0)
    Gv = rng.standard_normal((6, 4))
    hv = Gv @ target - np.r_[0.5, 0.7, -0.4, -0.2, 0.6, 0.9]  # two constraints bind
    _check_against_kkt(prob, [G, h], [y], [torch.tensor(Gv), torch.tensor(hv)])


def test_batch_of_one_keeps_batch_dimension():
    qp = random_qp(8, 5, 2, seed=1)
    ts = [t[None] for t in qp.tensors()]
    (sol,), grads = _check_against_kkt(qp.problem, qp.params, [qp.y], ts)
    assert sol.shape == (1, 8)
    assert all(g.shape == t.shape for g, t in zip(grads, ts))


def test_matrix_variable_and_parameter_keep_column_major_layout():
    """X = max(P, 0) elementwise: checks reshape order and the gradient mask exactly."""
    P = cp.Parameter((3, 4))
    X = cp.Variable((3, 4))
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - P)), [X >= 0])
    Pv = torch.tensor(np.arange(12.0).reshape(3, 4) - 5.5, requires_grad=True)
    (sol,) = FFOLayer(prob, [P], [X])(Pv)
    assert torch.allclose(sol, Pv.detach().clamp(min=0), atol=1e-6)
    W = torch.tensor(np.random.default_rng(1).standard_normal((3, 4)))
    (W * sol).sum().backward()
    assert torch.allclose(Pv.grad, W * (Pv.detach() > 0), atol=1e-3)


def test_two_variables_returned_in_order():
    q = cp.Parameter(3)
    x, z = cp.Variable(3), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + q @ x + cp.sum_squares(z - 1)))
    z_t, x_t = FFOLayer(prob, [q], [z, x])(torch.ones(3, dtype=torch.float64))
    assert z_t.shape == (2,) and x_t.shape == (3,)
    assert torch.allclose(x_t, -0.5 * torch.ones(3, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(z_t, torch.ones(2, dtype=torch.float64), atol=1e-7)


def test_lp_at_a_vertex_gets_exact_gradient():
    """A pure LP with a unique vertex solution: the ghost is bounded and exact."""
    c, u = cp.Parameter(4), cp.Parameter(4)
    y = cp.Variable(4)
    prob = cp.Problem(cp.Minimize(c @ y), [y <= u, y >= -1])
    cv = torch.tensor([1.0, -2.0, 3.0, -0.5], dtype=torch.float64)
    uv = torch.tensor([0.5, 1.0, 2.0, 0.3], dtype=torch.float64)
    (sol,), (gc, gu) = _check_against_kkt(prob, [c, u], [y], [cv, uv])
    assert torch.allclose(sol, torch.tensor([-1.0, 1.0, -1.0, 0.3], dtype=torch.float64), atol=1e-6)
    assert gc.abs().max() <= 1e-4 * gu.abs().max()  # dy/dc = 0 at a vertex


def test_lp_with_non_unique_solution_raises_clear_error():
    c = cp.Parameter(2)
    y = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(c @ y), [cp.sum(y) >= 1, y >= 0])
    cv = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    (sol,) = FFOLayer(prob, [c], [y])(cv)
    with pytest.raises(GhostProblemError, match="quadratic regulariser") as info:
        (sol * torch.tensor([1.0, -1.0], dtype=torch.float64)).sum().backward()
    assert info.value.delta > 0 and f"delta={info.value.delta:.3g}" in str(info.value)


def test_large_sparse_problem_builds_in_proportion_to_nonzeros():
    n = 5000
    D = sp.diags([np.ones(n), -np.ones(n - 1)], [0, 1], format="csc")
    q, h = cp.Parameter(n), cp.Parameter(n)
    y = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), [D @ y <= h])
    layer = FFOLayer(prob, [q, h], [y])
    assert layer.compiled.M.nnz <= 2 * (D.nnz + 3 * n)  # no dense n x n anywhere
    qv = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    hv = torch.rand(n, dtype=torch.float64, requires_grad=True)
    (sol,) = layer(qv, hv)
    sol.sum().backward()
    assert torch.isfinite(qv.grad).all() and torch.isfinite(hv.grad).all()


def test_problem_is_canonicalised_once(monkeypatch):
    qp = random_qp(10, 6, 2, seed=3)
    layer = FFOLayer(qp.problem, qp.params, [qp.y])

    def forbidden(*args, **kwargs):
        raise AssertionError("CVXPY canonicalisation or solve called at layer-call time")

    monkeypatch.setattr(cp.Problem, "get_problem_data", forbidden)
    monkeypatch.setattr(cp.Problem, "solve", forbidden)
    ts = [t.requires_grad_(True) for t in qp.tensors(batch=2)]
    layer(*ts)[0].sum().backward()


# -- errors --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    qp = random_qp(6, 4, 2, seed=8)
    return qp, FFOLayer(qp.problem, qp.params, [qp.y])


def test_nan_parameter_is_refused_with_its_name(small):
    qp, layer = small
    ts = qp.tensors(batch=3)
    ts[3][1, 0] = float("nan")
    with pytest.raises(InvalidParameterError, match=r"parameter h .*NaN.*batch index \[1\]"):
        layer(*ts)


def test_misshaped_parameter_is_refused(small):
    qp, layer = small
    ts = qp.tensors()
    ts[2] = ts[2][:, :-1]
    with pytest.raises(InvalidParameterError, match="parameter G: expected shape"):
        layer(*ts)


def test_inconsistent_batch_sizes_are_refused(small):
    qp, layer = small
    ts = qp.tensors(batch=3)
    ts[1] = ts[1][:2]
    with pytest.raises(InvalidParameterError, match="inconsistent batch sizes"):
        layer(*ts)


def test_wrong_number_of_parameters(small):
    qp, layer = small
    with pytest.raises(InvalidParameterError, match="takes 6 parameter tensors"):
        layer(*qp.tensors()[:5])


def test_infeasible_sample_names_batch_index_and_status():
    lo, hi = cp.Parameter(3), cp.Parameter(3)
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y)), [y >= lo, y <= hi])
    lov = torch.zeros(4, 3, dtype=torch.float64)
    hiv = torch.ones(4, 3, dtype=torch.float64)
    lov[2, 1] = 2.0
    with pytest.raises(SolverError, match="batch index 2: the problem is infeasible") as err:
        FFOLayer(prob, [lo, hi], [y])(lov, hiv)
    assert err.value.batch_index == 2 and err.value.status.value == "infeasible"


def test_iteration_limit_is_a_solver_error(small):
    qp, _ = small
    layer = FFOLayer(qp.problem, qp.params, [qp.y], solver="clarabel:max_iter=1")
    with pytest.raises(SolverError, match="iteration limit"):
        layer(*qp.tensors())


def test_unknown_solver_lists_available_ones(small):
    qp, _ = small
    with pytest.raises(BackendUnavailable, match="unknown solver 'nosuch'.*clarabel"):
        FFOLayer(qp.problem, qp.params, [qp.y], solver="nosuch")


def test_unknown_setting_names_valid_ones(small):
    qp, _ = small
    with pytest.raises(ConfigError, match="unknown setting.*tol_gap_abs"):
        FFOLayer(qp.problem, qp.params, [qp.y], solver="clarabel:tolerance=1e-3")


def test_non_dpp_problem_is_refused():
    a, b = cp.Parameter(pos=True), cp.Parameter(3)
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + (a * b) @ y))
    with pytest.raises(NotDPPError, match="not DPP"):
        FFOLayer(prob, [a, b], [y])


def test_integer_variable_is_refused():
    q = cp.Parameter(2)
    y = cp.Variable(2, integer=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + q @ y))
    with pytest.raises(ProblemError, match="integer"):
        FFOLayer(prob, [q], [y])


def test_parameters_must_be_listed():
    qp = random_qp(4, 2, 1, seed=1)
    with pytest.raises(ProblemError, match="missing: q"):
        FFOLayer(qp.problem, [p for p in qp.params if p.name() != "q"], [qp.y])
