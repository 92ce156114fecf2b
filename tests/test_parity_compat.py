"""``ffo_core.compat.CvxpyLayer``: cvxpylayers' signature and call, its arguments mapped
(solver names, solver_args, verbose, canon_backend, gp), errors in our typed hierarchy, and
the features nothing can answer refused by name."""

from __future__ import annotations

import inspect

import cvxpy as cp
import numpy as np
import pytest
import torch

from ffo_core import (
    BackendUnavailable,
    ConfigError,
    FFOError,
    FFOLayer,
    InvalidParameterError,
    NotDPPError,
    ProblemError,
    SolverError,
    UnsupportedError,
)
from ffo_core.compat import DEFAULT_SOLVER, CvxpyLayer, backend_for

F64 = torch.float64


def small_qp():
    x = cp.Variable(3, name="x")
    q = cp.Parameter(3, name="q")
    con = x >= -0.5
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + q @ x), [con])
    return prob, q, x, con


def test_signature_is_cvxpylayers_signature():
    ref = pytest.importorskip("cvxpylayers.torch").CvxpyLayer
    mine = inspect.signature(CvxpyLayer.__init__).parameters
    theirs = inspect.signature(ref.__init__).parameters
    assert list(mine) == list(theirs)
    assert [p.default for p in mine.values()] == [p.default for p in theirs.values()]
    call = inspect.signature(CvxpyLayer.forward).parameters
    assert "solver_args" in call and call["solver_args"].default is None


@pytest.mark.parametrize(
    "given, expected",
    [
        (None, DEFAULT_SOLVER),
        ("DIFFCP", DEFAULT_SOLVER),
        ("CLARABEL", "clarabel"),
        ("SCS", "scs"),
        ("ECOS", "ecos"),
        ("GUROBI", "gurobi"),
        ("Clarabel", "clarabel"),
        ("HIGHS", "cvxpy:HIGHS"),  # a CVXPY solver with no backend of its own
        ("scs:eps_abs=1e-9", "scs:eps_abs=1e-9"),  # our config strings pass through
    ],
)
def test_solver_names_map_to_backends(given, expected):
    assert backend_for(given) == expected


def test_solver_name_selects_the_backend_and_unknown_names_list_the_others():
    prob, q, x, _ = small_qp()
    assert CvxpyLayer(prob, [q], [x], solver="ECOS").backend.name == "ecos"
    assert CvxpyLayer(prob, [q], [x]).backend.name == "scs"
    with pytest.raises(BackendUnavailable, match="clarabel"):
        CvxpyLayer(prob, [q], [x], solver="NO_SUCH_SOLVER")


def test_solver_interface_objects_and_warm_start_are_refused_by_name():
    prob, q, x, _ = small_qp()

    class SomeSolverInterface:
        pass

    with pytest.raises(UnsupportedError, match="SolverInterface"):
        CvxpyLayer(prob, [q], [x], solver=SomeSolverInterface())
    layer = CvxpyLayer(prob, [q], [x])
    with pytest.raises(UnsupportedError, match="warm_start"):
        layer(torch.zeros(3, dtype=F64), warm_start=True)


def test_solver_args_at_construction_and_per_call():
    """SCS's own ``max_iters``: two iterations cannot reach 1e-8, so a call limited to
    them fails (an iteration-limit SolverError); the limit of one call does not stick, and
    the constructor's applies to every call."""
    prob, q, x, _ = small_qp()
    value = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    layer = CvxpyLayer(prob, [q], [x])
    (ok,) = layer(value)
    np.testing.assert_allclose(ok.numpy(), np.maximum(-value.numpy() / 2, -0.5), atol=1e-6)
    with pytest.raises(SolverError, match="iteration_limit"):
        layer(value, solver_args={"max_iters": 2})
    (again,) = layer(value)
    assert torch.equal(again, ok)
    limited = CvxpyLayer(prob, [q], [x], solver_args={"max_iters": 2})
    with pytest.raises(SolverError, match="iteration_limit"):
        limited(value)
    (fine,) = limited(value, solver_args={"max_iters": 100000})
    torch.testing.assert_close(fine, ok, atol=1e-6, rtol=0)


def test_keys_a_backend_has_no_equivalent_for_are_refused_by_name():
    prob, q, x, _ = small_qp()
    with pytest.raises(ConfigError, match="'acceleration_lookback'.*'clarabel'"):
        CvxpyLayer(prob, [q], [x], solver="CLARABEL", solver_args={"acceleration_lookback": 0})
    layer = CvxpyLayer(prob, [q], [x], solver="CLARABEL")
    with pytest.raises(ConfigError, match="'acceleration_lookback'"):
        layer(torch.zeros(3, dtype=F64), solver_args={"acceleration_lookback": 0})


def test_verbose_prints_the_solver_log(capfd):
    prob, q, x, _ = small_qp()
    layer = CvxpyLayer(prob, [q], [x], verbose=True)
    assert layer.solver_args == {"verbose": True}
    layer(torch.zeros(3, dtype=F64))
    assert "SCS" in capfd.readouterr().out
    CvxpyLayer(prob, [q], [x])(torch.zeros(3, dtype=F64))
    assert capfd.readouterr().out == ""


def test_canon_backend_is_passed_to_cvxpy():
    prob, q, x, _ = small_qp()
    a = CvxpyLayer(prob, [q], [x], canon_backend="SCIPY")
    b = CvxpyLayer(prob, [q], [x], canon_backend="CPP")
    value = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    torch.testing.assert_close(a(value)[0], b(value)[0])
    fresh, q2, x2, _ = small_qp()  # CVXPY keeps a problem's first canonicalisation
    with pytest.raises(ProblemError, match="NOT_A_BACKEND"):
        CvxpyLayer(fresh, [q2], [x2], canon_backend="NOT_A_BACKEND")


def test_geometric_program_from_cvxpylayers_readme():
    """cvxpylayers' README GP (parameters and outputs in the original space)."""
    x, y, z = (cp.Variable(pos=True) for _ in range(3))
    a, b = cp.Parameter(pos=True), cp.Parameter(pos=True)
    c = cp.Parameter()
    prob = cp.Problem(cp.Minimize(1 / (x * y * z)), [a * (x * y + x * z + y * z) <= b, x >= y**c])
    layer = CvxpyLayer(prob, parameters=[a, b, c], variables=[x, y, z], gp=True)
    vals = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (2.0, 1.0, 0.5)]
    outs = layer(*vals)
    a.value, b.value, c.value = 2.0, 1.0, 0.5
    prob.solve(cp.CLARABEL, gp=True)
    for o, v in zip(outs, (x, y, z)):
        assert o.shape == () and abs(o.item() - v.value) < 1e-4
    sum(outs).backward()
    assert all(torch.isfinite(v.grad) for v in vals)


def test_a_dgp_problem_without_gp_says_so():
    x = cp.Variable(pos=True)
    a = cp.Parameter(pos=True)
    prob = cp.Problem(cp.Minimize(1 / x), [a * x <= 1])
    with pytest.raises(ProblemError, match="pass gp=True"):
        CvxpyLayer(prob, [a], [x])


def test_errors_stay_typed_and_input_errors_are_value_errors():
    prob, q, x, _ = small_qp()
    layer = CvxpyLayer(prob, [q], [x])
    cases = [
        ((torch.zeros(4, dtype=F64),), "Invalid parameter shape"),
        ((torch.zeros(2, 3, 3, dtype=F64),), "Invalid parameter dimensionality"),
        ((), "A tensor must be provided for each CVXPY parameter"),
        ((torch.tensor([float("nan"), 0, 0], dtype=F64),), "NaN"),
    ]
    for args, message in cases:
        with pytest.raises(InvalidParameterError, match=message) as info:
            layer(*args)
        assert isinstance(info.value, ValueError) and isinstance(info.value, FFOError)
    other = cp.Variable(3)
    with pytest.raises(ProblemError, match="must be a subset of problem.variables"):
        CvxpyLayer(prob, [q], [other])
    with pytest.raises(ProblemError, match="must exactly match problem.parameters"):
        CvxpyLayer(prob, [], [x])
    P = cp.Parameter((3, 3))
    not_dpp = cp.Problem(cp.Minimize(cp.sum_squares(P @ P @ x) + q @ x))
    with pytest.raises(NotDPPError):
        CvxpyLayer(not_dpp, [P, q], [x])
    infeasible = cp.Problem(cp.Minimize(q @ x), [x >= 1, x <= -1])
    with pytest.raises(SolverError, match="infeasible"):
        CvxpyLayer(infeasible, [q], [x])(torch.zeros(3, dtype=F64))


def test_integer_boolean_and_complex_leaves_are_refused_by_name():
    q = cp.Parameter(3)
    for kind in ("integer", "boolean"):
        z = cp.Variable(3, name=f"z_{kind}", **{kind: True})
        prob = cp.Problem(cp.Minimize(cp.sum_squares(z) + q @ z))
        with pytest.raises(ProblemError, match=f"variable z_{kind} is integer/boolean"):
            CvxpyLayer(prob, [q], [z])
    w = cp.Variable(3, name="w", complex=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(cp.real(w)) + q @ cp.real(w)))
    with pytest.raises(ProblemError, match="variable w is complex"):
        CvxpyLayer(prob, [q], [w])


def test_power_cones_are_refused_by_name():
    x, y, z = cp.Variable(), cp.Variable(), cp.Variable()
    t = cp.Parameter(nonneg=True)
    pc = cp.PowCone3D(x, y, z, 0.5)
    prob = cp.Problem(cp.Minimize(-z + 0.1 * (x**2 + y**2)), [pc, x + y <= t])
    with pytest.raises(ProblemError, match="power cones"):
        CvxpyLayer(prob, [t], [x, pc.dual_variables[0]])


def test_dual_of_a_constraint_outside_the_problem_is_refused():
    prob, q, x, _ = small_qp()
    other = x <= 3
    with pytest.raises(ProblemError, match="must be a subset of problem.variables"):
        CvxpyLayer(prob, [q], [x, other.dual_variables[0]])


def test_declared_parameter_structure_is_checked():
    """PSD/NSD values must be semidefinite, diag/sparsity values zero off their pattern,
    a GP parameter that enters as its logarithm positive: refused by name, before any
    solve."""
    x = cp.Variable(2)
    P = cp.Parameter((2, 2), PSD=True, name="P")
    D = cp.Parameter((2, 2), diag=True, name="D")
    prob = cp.Problem(cp.Minimize(cp.quad_form(x, P) + cp.sum(D @ x)), [x >= -1, x <= 1])
    layer = FFOLayer(prob, [P, D], [x])
    eye = torch.eye(2, dtype=F64)
    layer(eye, eye)
    with pytest.raises(InvalidParameterError, match="parameter P .*PSD=True"):
        layer(torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64), eye)
    with pytest.raises(InvalidParameterError, match=r"parameter P .*PSD=True.*batch index \[1\]"):
        layer(torch.stack([eye, -eye]), eye)
    with pytest.raises(InvalidParameterError, match="parameter D .*diag=True"):
        layer(eye, torch.ones(2, 2, dtype=F64))
    g = cp.Variable(pos=True)
    a = cp.Parameter(pos=True, name="a")  # it enters as log(a)
    gp = cp.Problem(cp.Minimize(1 / g), [a * g <= 1])
    glayer = FFOLayer(gp, [a], [g], gp=True)
    assert abs(glayer(torch.tensor(2.0, dtype=F64))[0].item() - 0.5) < 1e-6
    with pytest.raises(InvalidParameterError, match="parameter a .*pos=True"):
        glayer(torch.tensor(-2.0, dtype=F64))


def test_symmetric_parameter_reads_the_upper_triangle_as_cvxpylayers():
    """The lower triangle is ignored (values and gradient), like cvxpylayers."""
    n = 2
    x = cp.Variable(n)
    S = cp.Parameter((n, n), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + cp.sum(S @ x)))
    layer = CvxpyLayer(prob, [S], [x])
    upper = torch.tensor([[1.0, 2.0], [2.0, 3.0]], dtype=F64, requires_grad=True)
    skewed = torch.tensor([[1.0, 2.0], [-7.0, 3.0]], dtype=F64, requires_grad=True)
    (a,), (b,) = layer(upper), layer(skewed)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    assert upper.grad[1, 0] == 0 and skewed.grad[1, 0] == 0
    torch.testing.assert_close(upper.grad, skewed.grad)


def test_raw_cone_constraint_duals_match_cvxpy():
    """NonPos, Zero and a 1x1 PSD constraint written directly (CVXPY's sign conventions:
    the NonPos dual is >= 0)."""
    x = cp.Variable(2)
    t = cp.Parameter(2)
    cons = [cp.NonPos(x - 3), cp.Zero(x[0] - t[0]), cp.PSD(cp.reshape(x[1], (1, 1), order="F"))]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - t)), cons)
    layer = FFOLayer(prob, [t], [x] + [c.dual_variables[0] for c in cons])
    value = np.array([1.0, 4.0])
    outs = layer(torch.tensor(value, dtype=F64))
    t.value = value
    prob.solve(cp.CLARABEL)
    for out, con in zip(outs[1:], cons):
        np.testing.assert_allclose(out.numpy(), np.reshape(con.dual_value, out.shape), atol=1e-6)
    assert outs[1][1] > 1  # x[1] <= 3 is active, with a positive multiplier


def test_dual_of_an_unsupported_constraint_is_refused_by_name():
    x, y, z = cp.Variable(2), cp.Variable(2), cp.Variable(2)
    t = cp.Parameter(2)
    con = cp.constraints.RelEntrConeQuad(x, y, z, 3, 3)
    prob = cp.Problem(
        cp.Minimize(cp.sum_squares(x - t) + cp.sum_squares(y) + cp.sum_squares(z)),
        [con, x >= 0, y >= 0.1, z <= 5],
    )
    FFOLayer(prob, [t], [x])  # the primal is fine
    with pytest.raises(UnsupportedError, match="RelEntrConeQuad.*cannot be a layer output"):
        FFOLayer(prob, [t], [x, con.dual_variables[0]])
