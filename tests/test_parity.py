"""CVXPY modelling features through FFOLayer, checked against CVXPY itself.

Every case is a small problem using one feature a cvxpylayers user writes: attribute
variables (symmetric, PSD, NSD, diag, nonneg, nonpos, bounds, sparsity), attribute
parameters (symmetric, PSD, NSD, diag, sparsity), scalars and n-d arrays, dual variables
of every cone kind, and geometric programs (``gp=True``).  For each, unbatched and batched
(two samples with different values), in both backward modes:

* values: within 1e-4 of CVXPY's own solve with Clarabel at 1e-10 (``problem.solve``; the
  duals read from ``constraint.dual_value``);
* gradients of a random linear functional of every output: cosine >= 0.999 and relative
  error <= 1e-2 against central finite differences of that tight CVXPY solve.

Finite differences move a parameter within its declared structure: a symmetric/PSD/NSD
parameter's entry (i, j), i <= j, together with its mirror (the layer reads the upper
triangle, so that is the derivative it returns on the upper triangle, zero below, as
cvxpylayers returns it), a diag parameter's diagonal, a sparsity parameter's pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
import pytest
import torch

from ffo_core import FFOLayer, NotDPPError, ProblemError

#: Clarabel at 1e-10, for the layer and for CVXPY's reference solves.
TIGHT_SETTINGS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}
TIGHT = "clarabel:" + ",".join(f"{k}={v}" for k, v in TIGHT_SETTINGS.items())
VALUE_TOL = 1e-4
COS_MIN, REL_MAX = 0.999, 1e-2


@dataclass
class Case:
    """A problem, its parameters and outputs, and a sampler of parameter values."""

    name: str
    problem: cp.Problem
    params: list
    outputs: list  # variables and dual variables
    sample: object  # rng -> list of np arrays (one per parameter)
    gp: bool = False
    fd_eps: float = 1e-4
    extra: dict = field(default_factory=dict)


def owner(problem: cp.Problem, dual_var):
    """The constraint ``dual_var`` belongs to, and its index there (None for a variable)."""
    for con in problem.constraints:
        for k, dv in enumerate(con.dual_variables):
            if dv.id == dual_var.id:
                return con, k
    return None


def cvxpy_values(case: Case, values) -> list[np.ndarray]:
    """The outputs of CVXPY's own tight solve at ``values`` (duals as ``dual_value``)."""
    for prm, v in zip(case.params, values):
        prm.value = v
    case.problem.solve(cp.CLARABEL, gp=case.gp, **TIGHT_SETTINGS)
    assert case.problem.status == cp.OPTIMAL, case.problem.status
    out = []
    for v in case.outputs:
        found = owner(case.problem, v)
        value = v.value if found is None else found[0].dual_variables[found[1]].value
        value = value.toarray() if hasattr(value, "toarray") else np.asarray(value, float)
        out.append(np.reshape(value, v.shape, order="F"))  # CVXPY may add a unit axis
    return out


def coordinates(prm) -> list[tuple[tuple, tuple]]:
    """The free coordinates of a parameter: (entry, mirror) pairs a finite difference
    moves together (mirror == entry when alone)."""
    shape = tuple(prm.shape)
    attrs = prm.attributes
    if attrs.get("symmetric") or attrs.get("PSD") or attrs.get("NSD"):
        n = shape[-1]
        return [((i, j), (j, i)) for i in range(n) for j in range(i, n)]
    if attrs.get("diag"):
        return [((i, i), (i, i)) for i in range(shape[0])]
    if prm.sparse_idx is not None:
        return [(ix, ix) for ix in zip(*prm.sparse_idx)]
    return [(ix, ix) for ix in np.ndindex(*shape)] if shape else [((), ())]


def loss_of(outs, weights) -> float:
    return float(sum(np.sum(w * o) for w, o in zip(weights, outs)))


def fd_gradients(case: Case, values, weights) -> list[np.ndarray]:
    """Central differences of ``sum <w_k, out_k>`` under CVXPY's tight solve."""
    grads = []
    for k, prm in enumerate(case.params):
        g = np.zeros(prm.shape)
        for entry, mirror in coordinates(prm):
            step = case.fd_eps * max(1.0, abs(float(values[k][entry])))
            f = []
            for sign in (1.0, -1.0):
                moved = [np.array(v, dtype=float, copy=True) for v in values]
                moved[k][entry] += sign * step
                if mirror != entry:
                    moved[k][mirror] += sign * step
                f.append(loss_of(cvxpy_values(case, moved), weights))
            g[entry] = (f[0] - f[1]) / (2 * step)
        grads.append(g)
    return grads


def cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_close_gradient(mine, ref, what: str) -> None:
    mine, ref = (
        np.concatenate([np.ravel(g) for g in mine]),
        np.concatenate([np.ravel(g) for g in ref]),
    )
    norm = np.linalg.norm(ref)
    assert norm > 0, f"{what}: the reference gradient is zero (a useless check)"
    cos, rel = cosine(mine, ref), np.linalg.norm(mine - ref) / norm
    assert cos >= COS_MIN and rel <= REL_MAX, f"{what}: cos {cos:.6f}, rel {rel:.2e}"


def layer_run(layer, values_per_sample, weights, batched: bool):
    """Outputs (per sample) and gradients (per sample) of the layer for the loss
    ``sum_i sum_k <w_k, out_k[i]>``."""
    if batched:
        tensors = [
            torch.tensor(np.stack([vals[k] for vals in values_per_sample]), requires_grad=True)
            for k in range(len(values_per_sample[0]))
        ]
    else:
        tensors = [torch.tensor(v, requires_grad=True) for v in values_per_sample[0]]
    outs = layer(*tensors)
    loss = sum((torch.as_tensor(w) * o).sum() for w, o in zip(weights, outs))
    loss.backward()
    B = len(values_per_sample)
    out_np = [o.detach().numpy() for o in outs]
    grad_np = [t.grad.numpy() for t in tensors]
    if not batched:
        return [out_np], [grad_np]
    return (
        [[o[i] for o in out_np] for i in range(B)],
        [[g[i] for g in grad_np] for i in range(B)],
    )


def check_case(case: Case, backward: str, batched: bool, solver: str = TIGHT) -> None:
    rng = np.random.default_rng(7)
    samples = [case.sample(rng) for _ in range(2 if batched else 1)]
    wrng = np.random.default_rng(11)
    weights = [wrng.standard_normal(v.shape) for v in case.outputs]
    layer = FFOLayer(case.problem, case.params, case.outputs, solver=solver, backward=backward,
                     gp=case.gp)  # fmt: skip
    outs, grads = layer_run(layer, samples, weights, batched)
    for i, values in enumerate(samples):
        ref = cvxpy_values(case, values)
        for v, mine, want in zip(case.outputs, outs[i], ref):
            assert mine.shape == tuple(v.shape), f"{case.name}: output shape {mine.shape}"
            err = np.max(np.abs(mine - want)) if want.size else 0.0
            assert err <= VALUE_TOL, f"{case.name} sample {i}: output {v.name()} off by {err:.2e}"
        fd = fd_gradients(case, values, weights)
        assert_close_gradient(grads[i], fd, f"{case.name} ({backward}) sample {i}")


# -- the cases --------------------------------------------------------------------------------
def _sym(rng, n, shift=0.0):
    A = rng.standard_normal((n, n))
    return (A + A.T) / 2 + shift * np.eye(n)


def case_symmetric_sdp() -> Case:
    """Symmetric variable, symmetric parameter, PSD and trace duals (an SDP with a small
    quadratic term so that the solution map is smooth)."""
    n = 3
    X = cp.Variable((n, n), symmetric=True, name="X")
    C = cp.Parameter((n, n), symmetric=True, name="C")
    psd, tr = X >> 0, cp.trace(X) == 1
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X) + 0.5 * cp.sum_squares(X)), [psd, tr])
    return Case(
        "symmetric-sdp",
        prob,
        [C],
        [X, psd.dual_variables[0], tr.dual_variables[0]],
        lambda rng: [_sym(rng, n, 0.0)],
    )


def case_pure_sdp() -> Case:
    """cvxpylayers' SDP: min trace(C X), X PSD, trace X = 1 (a well separated smallest
    eigenvalue, so the solution is a smooth rank-one projector)."""
    n = 3
    X = cp.Variable((n, n), symmetric=True, name="X")
    C = cp.Parameter((n, n), symmetric=True, name="C")
    psd, tr = X >> 0, cp.trace(X) == 1
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X)), [psd, tr])
    base = np.array([[2.0, 0.5, 0.1], [0.5, 3.0, 0.2], [0.1, 0.2, 1.5]])
    return Case(
        "pure-sdp",
        prob,
        [C],
        [X, psd.dual_variables[0]],
        lambda rng: [base + 0.05 * _sym(rng, n)],
    )


def case_psd_nsd_variables() -> Case:
    n = 3
    X = cp.Variable((n, n), PSD=True, name="X")
    Y = cp.Variable((n, n), NSD=True, name="Y")
    C = cp.Parameter((n, n), name="C")
    prob = cp.Problem(
        cp.Minimize(cp.sum_squares(X - C) + cp.sum_squares(Y - C)), [cp.trace(X) <= 2]
    )
    return Case("psd-nsd-variables", prob, [C], [X, Y], lambda rng: [rng.standard_normal((n, n))])


def case_attribute_variables() -> Case:
    n = 4
    q = cp.Parameter(n, name="q")
    Dg = cp.Parameter((3, 3), name="Dg")
    a = cp.Variable(n, nonneg=True, name="a")
    b = cp.Variable(n, nonpos=True, name="b")
    c = cp.Variable(n, bounds=[-0.5, 0.7], name="c")
    d = cp.Variable((3, 3), diag=True, name="d")
    s = cp.Variable((3, 3), sparsity=([0, 1, 2], [1, 2, 0]), name="s")
    obj = (
        cp.sum_squares(a - q)
        + cp.sum_squares(b - q)
        + cp.sum_squares(c - q)
        + cp.sum_squares(d - Dg)
        + cp.sum_squares(s - Dg)
    )
    prob = cp.Problem(cp.Minimize(obj))
    return Case(
        "attribute-variables",
        prob,
        [q, Dg],
        [a, b, c, d, s],
        lambda rng: [rng.standard_normal(n), rng.standard_normal((3, 3))],
    )


def case_scalars() -> Case:
    """0-d variables and parameters."""
    x, y = cp.Variable(name="x"), cp.Variable(name="y")
    a, t = cp.Parameter(name="a"), cp.Parameter(nonneg=True, name="t")
    con = x - y <= t
    prob = cp.Problem(cp.Minimize(cp.square(x - a) + cp.square(y + 2 * a)), [con, x >= -1])
    return Case(
        "scalars",
        prob,
        [a, t],
        [x, y, con.dual_variables[0]],
        lambda rng: [np.array(rng.uniform(0.5, 1.5)), np.array(rng.uniform(0.2, 0.4))],
    )


def case_nd_symmetric_variable() -> Case:
    """A (2, 3, 3) symmetric variable (two symmetric matrices), a PSD constraint on one
    and a trace constraint on the other.  (CVXPY itself cannot take a value for an n-d
    symmetric *parameter*; the layer refuses one with a ProblemError.)"""
    X = cp.Variable((2, 3, 3), symmetric=True, name="X")
    B = cp.Parameter((2, 3, 3), name="B")
    psd, tr = X[0] >> 0, cp.trace(X[1]) == 1
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - B)), [psd, tr])
    return Case(
        "nd-symmetric-variable",
        prob,
        [B],
        [X, psd.dual_variables[0], tr.dual_variables[0]],
        lambda rng: [rng.standard_normal((2, 3, 3))],
    )


def case_nd_arrays() -> Case:
    Y = cp.Variable((2, 3, 2), name="Y")
    B = cp.Parameter((2, 3, 2), name="B")
    lo = cp.Parameter(name="lo")
    con = Y >= lo
    prob = cp.Problem(cp.Minimize(cp.sum_squares(Y - B)), [con])
    return Case(
        "nd-arrays",
        prob,
        [B, lo],
        [Y, con.dual_variables[0]],
        lambda rng: [rng.standard_normal((2, 3, 2)), np.array(-0.3)],
    )


def case_attribute_parameters() -> Case:
    """PSD parameter in a parametric quad_form, NSD, symmetric, diag and sparsity
    parameters in the linear term."""
    n = 3
    x = cp.Variable(n, name="x")
    P = cp.Parameter((n, n), PSD=True, name="P")
    N = cp.Parameter((n, n), NSD=True, name="N")
    S = cp.Parameter((n, n), symmetric=True, name="S")
    D = cp.Parameter((n, n), diag=True, name="D")
    Z = cp.Parameter((n, n), sparsity=([0, 2], [1, 0]), name="Z")
    one = np.ones(n)
    obj = cp.quad_form(x, P) + 0.3 * (N @ one + S @ one + D @ one + Z @ one) @ x
    prob = cp.Problem(cp.Minimize(obj), [x >= -2, x <= 2])

    def sample(rng):
        L = rng.standard_normal((n, n))
        Dv = np.diag(rng.standard_normal(n))
        Zv = np.zeros((n, n))
        Zv[[0, 2], [1, 0]] = rng.standard_normal(2)
        M = rng.standard_normal((n, n))
        return [L @ L.T + np.eye(n), -(M @ M.T) / 3 - 0.1 * np.eye(n), _sym(rng, n), Dv, Zv]

    return Case("attribute-parameters", prob, [P, N, S, D, Z], [x], sample)


def case_eq_ineq_duals() -> Case:
    n, m = 3, 2
    x = cp.Variable(n, name="x")
    A, b = cp.Parameter((m, n), name="A"), cp.Parameter(m, name="b")
    c = cp.Parameter(n, name="c")
    eq, ineq = A @ x == b, x >= 0
    prob = cp.Problem(cp.Minimize(c @ x + 0.5 * cp.sum_squares(x)), [eq, ineq])

    def sample(rng):
        Av = rng.standard_normal((m, n))
        return [Av, Av @ rng.uniform(0.5, 1.5, n), rng.standard_normal(n)]

    return Case(
        "eq-ineq-duals",
        prob,
        [A, b, c],
        [x, eq.dual_variables[0], ineq.dual_variables[0]],
        sample,
    )


def case_soc_duals() -> Case:
    n = 3
    x = cp.Variable(n, name="x")
    c, t = cp.Parameter(n, name="c"), cp.Parameter(nonneg=True, name="t")
    norm_con = cp.norm(x) <= t
    raw = cp.SOC(t, x - 0.5)
    prob = cp.Problem(cp.Minimize(c @ x + 0.1 * cp.sum_squares(x)), [norm_con, raw])
    return Case(
        "soc-duals",
        prob,
        [c, t],
        [x, norm_con.dual_variables[0], raw.dual_variables[0], raw.dual_variables[1]],
        lambda rng: [rng.standard_normal(n) + np.array([2.0, 0, 0]), np.array(1.5)],
    )


def case_exp_duals() -> Case:
    x, y, z = cp.Variable(name="x"), cp.Variable(name="y"), cp.Variable(name="z")
    t = cp.Parameter(nonneg=True, name="t")
    ec = cp.constraints.ExpCone(x, y, z)
    prob = cp.Problem(cp.Minimize(-(x + y) + 0.1 * (x**2 + y**2 + z**2)), [ec, y >= 0.1, z <= t])
    return Case(
        "exp-duals",
        prob,
        [t],
        [x, y, z, *ec.dual_variables],
        lambda rng: [np.array(rng.uniform(1.5, 2.5))],
    )


def case_gp() -> Case:
    x, y, z = (cp.Variable(pos=True, name=k) for k in "xyz")
    a, b = cp.Parameter(pos=True, name="a"), cp.Parameter(pos=True, name="b")
    c = cp.Parameter(name="c")
    cons = [a * (x * y + x * z + y * z) <= b, x >= y**c]
    prob = cp.Problem(cp.Minimize(1 / (x * y * z)), cons)
    return Case(
        "gp",
        prob,
        [a, b, c],
        [x, y, z, cons[0].dual_variables[0]],
        lambda rng: [
            np.array(rng.uniform(1.5, 2.5)),
            np.array(rng.uniform(0.8, 1.2)),
            np.array(rng.uniform(0.4, 0.6)),
        ],
        gp=True,
        fd_eps=1e-3,  # exponential cones: CVXPY's solution is good to ~1e-7, not 1e-10
    )


def case_gp_log_and_raw() -> Case:
    """A GP parameter that enters twice: as a coefficient (its logarithm) and as an
    exponent (itself); the layer feeds both and autograd adds the two gradients."""
    x, y = cp.Variable(pos=True, name="x"), cp.Variable(pos=True, name="y")
    a = cp.Parameter(pos=True, name="a")
    cons = [a * x * y <= 1, x >= y**a, x <= 4]
    prob = cp.Problem(cp.Minimize(1 / (x * y**2) + x), cons)
    return Case(
        "gp-log-and-raw",
        prob,
        [a],
        [x, y, cons[0].dual_variables[0]],
        lambda rng: [np.array(rng.uniform(0.4, 0.6))],
        gp=True,
        fd_eps=1e-3,
    )


CASES = {
    f.__name__[5:]: f
    for f in (
        case_symmetric_sdp,
        case_pure_sdp,
        case_psd_nsd_variables,
        case_attribute_variables,
        case_scalars,
        case_nd_arrays,
        case_nd_symmetric_variable,
        case_attribute_parameters,
        case_eq_ineq_duals,
        case_soc_duals,
        case_exp_duals,
        case_gp,
        case_gp_log_and_raw,
    )
}


@pytest.mark.parametrize("backward", ["ffo", "kkt"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_gradients_unbatched(name, backward):
    check_case(CASES[name](), backward, batched=False)


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["ffo", "kkt"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_gradients_batched(name, backward):
    check_case(CASES[name](), backward, batched=True)


#: ECOS has no quadratic objective: CVXPY moves it into a second-order cone, so the cone
#: rows (and the duals' positions) differ from the Clarabel target's.
ECOS_TIGHT = "ecos:abstol=1e-10,reltol=1e-10,feastol=1e-10"


@pytest.mark.parametrize("name", ["eq_ineq_duals", "soc_duals", "exp_duals", "symmetric_sdp"])
def test_backend_without_quadratic_objective(name):
    case = CASES[name]()
    if name == "symmetric_sdp":  # ECOS has no PSD cone: refused by name, naming who has
        with pytest.raises(ProblemError, match="psd.*backends that do: clarabel"):
            FFOLayer(case.problem, case.params, case.outputs, solver=ECOS_TIGHT)
        return
    case.fd_eps = 1e-3  # ECOS's solutions are good to ~1e-8
    check_case(case, "ffo", batched=False, solver=ECOS_TIGHT)


def test_parametric_quad_form_needs_a_quadratic_objective():
    """A backend without a quadratic objective gets P compiled into a cone, which a
    parametric quad_form cannot be (not DPP there): refused by name."""
    from dataclasses import replace

    from ffo_backends.clarabel import ClarabelBackend

    class LinearOnly(ClarabelBackend):
        name = "linear-only"
        capabilities = replace(ClarabelBackend.capabilities, quadratic_objective=False)

    x = cp.Variable(2)
    P = cp.Parameter((2, 2), PSD=True)
    prob = cp.Problem(cp.Minimize(cp.quad_form(x, P)), [x >= 1])
    with pytest.raises(NotDPPError, match="quad_form"):
        FFOLayer(prob, [P], [x], solver=LinearOnly())
