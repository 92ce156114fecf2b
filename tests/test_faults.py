"""Faults a training loop meets, in both layers: each gives the right numbers or a typed
``FFOError`` that names the cause -- never a silent wrong answer, an untyped crash or a
hang.  (Backend-level faults -- pickling, Ctrl-C, settings by value -- are tested with the
backends.)"""

from __future__ import annotations

import copy
import pickle

import cvxpy as cp
import numpy as np
import pytest
import torch

from ffo_core import (
    ConfigError,
    FFOLayer,
    FFOQPLayer,
    InvalidGradientError,
    InvalidParameterError,
    SolverError,
    UnsupportedError,
)


def qp_tensors(n=6, m=8, seed=0, batch=3):
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, n))
    Q = torch.tensor(F @ F.T + np.eye(n))
    p = torch.tensor(rng.standard_normal((batch, n)))
    G = torch.tensor(rng.standard_normal((m, n)))
    h = torch.tensor(rng.uniform(0.5, 1.5, m))
    return Q, p, G, h


def projection_layer(**options):
    x = cp.Variable(3)
    a = cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0, cp.sum(x) <= 1])
    return FFOLayer(prob, [a], [x], **options)


def test_qp_layer_uses_the_forward_values_when_the_input_buffer_is_refilled():
    """Gradient accumulation over micro-batches through one float64 buffer: the backward
    must use the values of the forward (it read the refilled buffer: 92-104% off)."""
    Q, p, G, h = qp_tensors()
    layer = FFOQPLayer()
    buf = p.clone().requires_grad_()
    want_p = p.clone().requires_grad_()
    y_ref = layer(Q, want_p, G, h, None, None)
    (y_ref**2).sum().backward()
    y = layer(Q, buf, G, h, None, None)
    with torch.no_grad():
        buf.mul_(-3.0).add_(1.0)  # refilled in place before the backward
    (y**2).sum().backward()
    assert torch.allclose(buf.grad, want_p.grad, atol=1e-10)


@pytest.mark.parametrize("which", ["qp", "cvxpy"])
def test_double_backward_is_refused_at_once(which):
    if which == "qp":
        Q, p, G, h = qp_tensors()
        p.requires_grad_()
        y = FFOQPLayer()(Q, p, G, h, None, None)
        x = p
    else:
        x = torch.tensor([0.2, -0.1, 0.5], dtype=torch.float64, requires_grad=True)
        (y,) = projection_layer()(x)
    with pytest.raises(UnsupportedError, match="create_graph"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_vmap_is_refused_by_name():
    layer = projection_layer()
    xs = torch.rand(4, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="torch.func"):
        torch.func.vmap(lambda a: layer(a)[0])(xs)


def test_zero_size_batches_are_refused_not_dropped():
    Q, p, G, h = qp_tensors(batch=1)
    with pytest.raises(InvalidParameterError, match="batch of size 0"):
        FFOQPLayer()(Q, p[0], torch.empty(0, 8, 6, dtype=torch.float64), h, None, None)
    with pytest.raises(InvalidParameterError, match="batch of size 0"):
        FFOQPLayer()(Q, p[0], G, torch.empty(0, 8, dtype=torch.float64), None, None)


def test_non_psd_q_is_refused_naming_q():
    Q, p, G, h = qp_tensors()
    Q_bad = Q.clone()
    Q_bad[0, 1] = Q_bad[1, 0] = 10 * float(Q.abs().max())  # positive diagonal, indefinite
    with pytest.raises(InvalidParameterError, match="argument Q.*not positive semidefinite"):
        FFOQPLayer()(Q_bad, p, G, h, None, None)
    batched = torch.stack([Q, Q_bad, Q])
    with pytest.raises(InvalidParameterError, match=r"Q at batch index \[1\]"):
        FFOQPLayer()(batched, p, G, h, None, None)
    box = torch.cat([torch.eye(6), -torch.eye(6)]).double()
    y = FFOQPLayer()(torch.zeros(6, 6, dtype=torch.float64), p, box, torch.ones(12).double())
    assert torch.allclose(y, -torch.sign(p), atol=1e-6)  # an LP's Q = 0 is PSD


@pytest.mark.parametrize(
    "option",
    [
        {"tau_s": -1},
        {"tau_lam": float("inf")},
        {"kappa": 0},
        {"delta": -1.0},
        {"central": "yes"},
        {"polish": "sometimes"},
        {"executor": "mpi"},
    ],
)
def test_bad_options_are_refused_by_both_layers(option):
    with pytest.raises(ConfigError):
        FFOQPLayer(**option)
    with pytest.raises(ConfigError):
        projection_layer(**option)


def test_a_nan_upstream_gradient_gives_the_same_error_in_both_layers():
    Q, p, G, h = qp_tensors()
    p.requires_grad_()
    y = FFOQPLayer()(Q, p, G, h, None, None)
    with pytest.raises(InvalidGradientError, match=r"output y .*batch index \[1\]"):
        y.backward(torch.tensor([[1.0] * 6, [float("nan")] * 6, [0.0] * 6]))
    x = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    (out,) = projection_layer()(x)
    with pytest.raises(InvalidGradientError, match=r"batch index \[1\]"):
        out.backward(torch.tensor([[1.0] * 3, [float("nan")] * 3, [0.0] * 3]))


def test_qp_layer_has_the_runtime_policies():
    """ghost_fallback, time_limit and check_every work on FFOQPLayer as on FFOLayer."""
    Q, p, G, h = qp_tensors()
    p.requires_grad_()
    layer = FFOQPLayer(ghost_fallback="kkt", time_limit=10.0, check_every=1)
    y = layer(Q, p, G, h, None, None)
    (y**2).sum().backward()
    (record,) = layer.health_log
    assert record["cosine"] > 0.999999
    assert all(d["ghost_fallback"] is None for d in layer.last_diagnostics)


def test_float16_outputs_that_do_not_fit_are_refused():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - 1e3 * a)), [x >= 0])
    layer = FFOLayer(prob, [a], [x])
    (y,) = layer(torch.tensor([1.0, 2.0], dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    with pytest.raises(InvalidParameterError, match="do not fit torch.float16"):
        layer(torch.tensor([100.0, 2.0], dtype=torch.float16))  # 1e5 > 65504


def test_near_coincident_bounds_work_in_the_default_backward():
    """``a - 1e-6 <= y <= a``: the row pair is nearly parallel and the problem nearly
    degenerate; the default backward must still give the derivative (here dy/da = 1)."""
    n = 4
    y = cp.Variable(n)
    a, q = cp.Parameter(n), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), [y >= a - 1e-6, y <= a])
    layer = FFOLayer(prob, [a, q], [y])
    at = torch.tensor([0.5, -0.3, 0.2, 1.0], dtype=torch.float64, requires_grad=True)
    qt = torch.tensor([1.0, -2.0, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    (out,) = layer(at, qt)
    out.sum().backward()
    assert torch.allclose(out.detach(), at.detach(), atol=2e-6)
    assert torch.allclose(at.grad, torch.ones(n, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(qt.grad, torch.zeros(n, dtype=torch.float64), atol=1e-6)


def test_badly_scaled_feasible_data_is_solved_not_called_infeasible():
    """Data scaled by 1e10 was reported infeasible/unbounded though feasible."""
    n = 5
    Q, G, h = (
        torch.eye(n, dtype=torch.float64),
        torch.eye(n, dtype=torch.float64),
        1e10 * torch.ones(n, dtype=torch.float64),
    )
    p = torch.full((n,), -2e10, dtype=torch.float64, requires_grad=True)
    y = FFOQPLayer()(Q, p, G, h, None, None)
    assert torch.allclose(y, 1e10 * torch.ones(n, dtype=torch.float64), rtol=1e-6)
    y.sum().backward()
    assert torch.allclose(p.grad, torch.zeros(n, dtype=torch.float64), atol=1e-6)


def test_layers_copy_and_pickle_with_their_runtime_state():
    layer = projection_layer(check_every=1)
    x = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    (y,) = layer(x)
    y.sum().backward()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        (y2,) = clone(x.detach())
        assert torch.allclose(y2, y.detach())
    qp = FFOQPLayer(solver_args={"max_iter": 100})
    assert pickle.loads(pickle.dumps(qp)).backend.settings["max_iter"] == 100


def test_solver_args_per_layer_and_per_call():
    """solver_args (cvxpylayers' idiom): the backend's own names, per layer and per call;
    an unknown key is refused by name; a call's settings do not stick."""
    layer = projection_layer(solver_args={"max_iter": 200})
    assert layer.backend.settings["max_iter"] == 200
    x = torch.tensor([0.2, -0.1, 0.5], dtype=torch.float64)
    with pytest.raises(SolverError, match="iteration limit"):
        layer(x, solver_args={"max_iter": 1})  # too few: the call's own setting applies
    layer(x)
    assert layer.last_status[0].value == "optimal"  # and it did not stick
    with pytest.raises(ConfigError, match="'no_such_key'"):
        layer(x, solver_args={"no_such_key": 1})


@pytest.mark.parametrize(
    ("solver", "want"),
    [
        ("clarabel", {"tol_gap_abs": 1e-9, "tol_gap_rel": 1e-9, "tol_feas": 1e-9, "max_iter": 50}),
        ("scs", {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 50}),
        ("ecos", {"abstol": 1e-9, "reltol": 1e-9, "feastol": 1e-9, "max_iters": 50}),
        ("pdipm", {"tol": 1e-9, "max_iter": 50}),
    ],
)
def test_common_solver_args_are_translated_per_backend(solver, want):
    """cvxpylayers' keys (``eps``, ``max_iters``) become each backend's own settings."""
    layer = projection_layer(solver=solver)
    backend = layer.backend_for({"eps": 1e-9, "max_iters": 50})
    assert {k: backend.settings[k] for k in want} == want
