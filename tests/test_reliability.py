"""Reliability under bad input, faults and load (issue 7).

What is checked, and against what:

* Bad input is refused before anything is solved, naming the parameter: dtypes (complex,
  bool refused; float32/float64 mixes promoted, documented), devices (meta refused; CUDA
  round trip where a GPU exists), sparse layouts, values violating declared CVXPY attributes
  (``nonneg``, ``pos``, ``neg``, ``nonpos``, ``boolean``, ``integer``, ``bounds``),
  parameters CVXPY would reduce (PSD, symmetric, diag, complex), data overflow, and a
  non-finite gradient entering the backward pass.  "Before solving" is checked with a
  counting backend that must see no solve.
* Faults are typed errors naming backend and batch index, never NaN: exceptions inside a
  backend (forward and ghost, with the original as ``__cause__``), malformed answers (NaN,
  wrong shape, not a Solution), time limits, the three ``inaccurate`` policies, and the
  ``ghost_fallback`` policies (gradients after a fallback agree with the KKT mode to the
  tolerance of tests/test_gradients.py: cosine >= 0.9999).
* ``time_limit`` reaches every installed backend that has one, without mutating the backend
  given; a backend without one is a ConfigError at construction.
* Concurrency: one layer used from 4 threads at once gives the results of sequential use
  (Clarabel is deterministic: equal to 1e-12).
* The gradient health check (``check_every``): schedule, log records, ``health_log``, and
  a warning when a corrupted ghost solver makes the FFO gradient wrong.
* Property-based (hypothesis): random feasible problems of every cone class (QP, LP with a
  small quadratic, SOCP, EXP, SDP) through FFOLayer on Clarabel never raise anything but
  ``FFOError`` subclasses, return finite values, and where they succeed the first-order
  gradient agrees with ``backward="kkt"`` on the same forward solution: cosine >= 0.999
  (QP/LP: 0.9999 as tests/test_gradients.py; curved cones through Clarabel: 0.995, see
  POLY_COS/CONE_COS).  Fast profile: 20 examples per class; ``-m slow``: 150 per class; both
  derandomised (the same examples every run).
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from functools import cache

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from ffo_core import (
    ConfigError,
    FFOError,
    FFOLayer,
    GhostProblemError,
    InvalidParameterError,
    ProblemError,
    SolverError,
    Status,
    get_backend,
)
from ffo_core.engine.solves import InaccurateSolutionWarning
from ffo_core.errors import GradientHealthWarning, InvalidGradientError
from ffo_core.protocol import Solution, SolveInfo

F64 = torch.float64


# ------------------------------------------------------------------------ helpers ---
def projection_problem(n: int = 4):
    """``y = argmin 1/2||y||^2 - a'y  s.t. y <= u`` = ``min(a, u)``: ``dy/da = [a < u]``,
    ``dy/du = [a > u]``.  Sample markers go in ``a[0]``."""
    a, u = cp.Parameter(n, name="a"), cp.Parameter(n, name="u")
    y = cp.Variable(n, name="y")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) - a @ y), [y <= u])
    return prob, [a, u], [y]


def projection_values(batch: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, 4))
    u = a + np.where(rng.random((batch, 4)) < 0.5, -1.0, 1.0) * rng.uniform(0.3, 1.0, (batch, 4))
    return torch.tensor(a), torch.tensor(u)


def grads_of(layer, tensors, w_seed: int = 3):
    """Outputs and gradients of a fixed random linear loss of the first output."""
    ts = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    outs = layer(*ts)
    w = torch.randn(outs[0].shape, dtype=F64, generator=torch.Generator().manual_seed(w_seed))
    (w.to(outs[0].dtype) * outs[0]).sum().backward()
    return [o.detach() for o in outs], [t.grad for t in ts]


def cosine(a, b) -> float:
    a = torch.cat([x.flatten().double() for x in a])
    b = torch.cat([x.flatten().double() for x in b])
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0
    return float(a @ b / (na * nb))


class Faulty:
    """Clarabel behind a switchboard: ``forward``/``ghost`` hooks (``None``: pass through)
    receive ``(inner, g, h, e, extra)`` and return a Solution or raise.  Counts calls."""

    def __init__(self, forward=None, ghost=None, name="faulty", inner="clarabel"):
        self.inner = get_backend(inner)
        self.name = name
        self.capabilities = self.inner.capabilities
        self.hooks = {"forward": forward, "ghost": ghost}
        self.calls = {"forward": 0, "ghost": 0}
        self._lock = threading.Lock()

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        kind = "forward" if extra_linear_term is None else "ghost"
        with self._lock:
            self.calls[kind] += 1
        hook = self.hooks[kind]
        if hook is None:
            return self.inner.solve(g, h, e, extra_linear_term)
        return hook(self.inner, g, h, e, extra_linear_term)


def marked(g) -> bool:
    """The projection problem's sample with ``a[0] == 42`` (q = -a)."""
    return bool(np.isclose(g.q[0], -42.0))


def mark(a: torch.Tensor, i: int) -> torch.Tensor:
    a = a.clone()
    a[i, 0] = 42.0
    return a


# ======================================================================= bad input ===
@pytest.fixture(scope="module")
def proj():
    prob, params, variables = projection_problem()
    return prob, params, variables


@pytest.mark.parametrize("dtype", [torch.complex128, torch.bool, torch.int8])
def test_non_real_dtypes_are_refused_naming_the_parameter(proj, dtype):
    backend = Faulty()
    layer = FFOLayer(*proj, solver=backend)
    a, u = projection_values(2)
    with pytest.raises(InvalidParameterError, match=r"parameter u: dtype") as err:
        layer(a, u.to(dtype))
    if dtype.is_complex:
        assert "complex" in str(err.value)
    assert backend.calls["forward"] == 0


def test_float32_and_float64_mix_promotes_to_float64(proj):
    """Documented policy: solves in float64; outputs take torch's promotion of the floating
    inputs (float32 + float64 -> float64); each gradient keeps its parameter's dtype."""
    layer = FFOLayer(*proj)
    a, u = projection_values(3)
    (y64,), (ga64, _gu64) = grads_of(layer, [a, u])
    (y_mix,), (ga, gu) = grads_of(layer, [a.float(), u])
    assert y_mix.dtype == F64 and ga.dtype == torch.float32 and gu.dtype == F64
    assert torch.allclose(y_mix, y64, atol=1e-6)  # a rounded to float32
    assert torch.allclose(ga.double(), ga64, atol=1e-5)
    (y32,), (_ga32, gu32) = grads_of(layer, [a.float(), u.float()])
    assert y32.dtype == torch.float32 and gu32.dtype == torch.float32


def test_integer_parameters_are_solved_as_float64(proj):
    layer = FFOLayer(*proj)
    a = torch.tensor([[1, -2, 3, 0]], dtype=torch.int64)
    u = torch.tensor([[0, 0, 5, 1]], dtype=torch.int32)
    (y,) = layer(a, u)
    assert y.dtype == F64
    assert torch.allclose(y, torch.minimum(a, u).double(), atol=1e-7)


def test_meta_device_is_refused(proj):
    layer = FFOLayer(*proj)
    a, u = projection_values(2)
    with pytest.raises(InvalidParameterError, match="parameter a is on the meta device"):
        layer(a.to("meta"), u)


def test_sparse_tensor_is_refused(proj):
    layer = FFOLayer(*proj)
    a, u = projection_values(2)
    with pytest.raises(InvalidParameterError, match=r"parameter u: torch.sparse_coo"):
        layer(a, u.to_sparse())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parameters_round_trip_and_mixed_devices_are_refused(proj):
    layer = FFOLayer(*proj)
    a, u = projection_values(2)
    (y_cpu,), (ga_cpu, _gu_cpu) = grads_of(layer, [a, u])
    (y,), (ga, _gu) = grads_of(layer, [a.cuda(), u.cuda()])
    assert y.device.type == "cuda" and ga.device.type == "cuda"
    assert torch.allclose(y.cpu(), y_cpu) and torch.allclose(ga.cpu(), ga_cpu)
    with pytest.raises(InvalidParameterError, match="different devices"):
        layer(a.cuda(), u)


SIGN_CASES = [  # attribute, a valid value, a violating value
    ("nonneg", 0.0, -1e-9),
    ("pos", 1e-9, 0.0),
    ("nonpos", 0.0, 1e-9),
    ("neg", -1e-9, 0.0),
]


@pytest.mark.parametrize("attr,ok,bad", SIGN_CASES, ids=[c[0] for c in SIGN_CASES])
def test_values_violating_declared_sign_are_refused(attr, ok, bad):
    s = cp.Parameter(3, name="s", **{attr: True})
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + s @ y), [y >= -1])
    backend = Faulty()
    layer = FFOLayer(prob, [s], [y], solver=backend)
    good = torch.full((3, 3), ok + (1.0 if attr in ("nonneg", "pos") else -1.0), dtype=F64)
    good[0, 0] = ok  # the boundary value is allowed
    layer(good)
    calls = backend.calls["forward"]
    wrong = good.clone()
    wrong[2, 1] = bad
    with pytest.raises(
        InvalidParameterError,
        match=rf"parameter s violates its declared attribute {attr}=True"
        rf".*batch index \[2\]",
    ):
        layer(wrong)
    assert backend.calls["forward"] == calls  # refused before solving


def test_boolean_integer_and_bounds_attributes_are_checked():
    b = cp.Parameter(2, name="b", boolean=True)
    k = cp.Parameter(name="k", integer=True)
    r = cp.Parameter(2, name="r", bounds=[np.zeros(2), np.array([1.0, 2.0])])
    y = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + (b + r) @ y + k * cp.sum(y)))
    layer = FFOLayer(prob, [b, k, r], [y])
    ok = [
        torch.tensor([0.0, 1.0], dtype=F64),
        torch.tensor(3.0, dtype=F64),
        torch.tensor([1.0, 2.0], dtype=F64),
    ]
    layer(*ok)
    for i, value, name in (
        (0, [0.5, 1.0], "b violates its declared attribute boolean"),
        (1, 2.5, "k violates its declared attribute integer"),
        (2, [1.0, 2.5], "r violates its declared attribute bounds"),
    ):
        args = list(ok)
        args[i] = torch.tensor(value, dtype=F64)
        with pytest.raises(InvalidParameterError, match=f"parameter {name}"):
            layer(*args)


def test_complex_parameters_are_refused_naming_the_parameter():
    """Complex parameters are refused by name (symmetric/PSD/diag ones are supported:
    tests/test_parity.py)."""
    P = cp.Parameter((3, 3), name="P", complex=True)
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + cp.real(cp.sum(P @ y))), [y >= -1])
    with pytest.raises(ProblemError, match=r"parameter P is complex"):
        FFOLayer(prob, [P], [y])


def test_parameters_overflowing_the_data_are_refused():
    q = cp.Parameter(2, name="q")
    y = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + (1e10 * q) @ y), [y >= -1])
    backend = Faulty()
    layer = FFOLayer(prob, [q], [y], solver=backend)
    with pytest.raises(InvalidParameterError, match=r"overflow.*batch index \[1\]:"):
        layer(torch.tensor([[1.0, 1.0], [1e300, 0.0]], dtype=F64))
    many = torch.full((7, 2), 1e300, dtype=F64)  # every sample: the first five named
    with pytest.raises(InvalidParameterError, match=r"batch index \[0, 1, 2, 3, 4\] \(and more\):"):
        layer(many)
    assert backend.calls["forward"] == 0


def test_non_finite_incoming_gradient_is_refused_before_any_ghost_solve(proj):
    backend = Faulty()
    layer = FFOLayer(*proj, solver=backend)
    a, u = projection_values(3)
    a.requires_grad_(True)
    (y,) = layer(a, u)
    w = torch.ones_like(y)
    w[1, 2] = float("nan")
    with pytest.raises(
        InvalidGradientError,
        match=r"output y contains NaN or Inf at "
        r"batch index \[1\]",
    ):
        (w * y).sum().backward()
    assert backend.calls["ghost"] == 0
    assert issubclass(InvalidGradientError, FFOError)


# ========================================================================== faults ===
def _raise_on_marked(inner, g, h, e, extra):
    if marked(g):
        raise RuntimeError("solver crashed (segfault simulated)")
    return inner.solve(g, h, e, extra)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_exception_in_backend_forward_is_a_solver_error_with_batch_index(proj, n_jobs):
    layer = FFOLayer(*proj, solver=Faulty(forward=_raise_on_marked, name="crashy"), n_jobs=n_jobs)
    a, u = projection_values(4)
    with pytest.raises(
        SolverError,
        match=r"forward solve of batch index 2: backend 'crashy' "
        r"raised RuntimeError: solver crashed",
    ) as err:
        layer(mark(a, 2), u)
    assert err.value.batch_index == 2 and err.value.backend == "crashy"
    assert isinstance(err.value.__cause__, RuntimeError)
    assert not isinstance(err.value, GhostProblemError)


def test_exception_in_ghost_solve_is_a_ghost_problem_error(proj):
    layer = FFOLayer(*proj, solver=Faulty(ghost=_raise_on_marked, name="crashy"))
    a, u = projection_values(4)
    a = mark(a, 3).requires_grad_(True)
    (y,) = layer(a, u)
    with pytest.raises(
        GhostProblemError,
        match=r"batch index 3.*'crashy' raised "
        r"RuntimeError",
    ) as err:
        y.sum().backward()
    assert err.value.batch_index == 3 and err.value.backend == "crashy"
    assert isinstance(err.value.__cause__, RuntimeError)


def test_backend_solver_error_gets_the_batch_index(proj):
    def too_big(inner, g, h, e, extra):
        if marked(g):
            raise SolverError(
                "faulty: 4 variables exceed this licence's limit of 3", backend="faulty"
            )
        return inner.solve(g, h, e, extra)

    layer = FFOLayer(*proj, solver=Faulty(forward=too_big))
    a, u = projection_values(3)
    with pytest.raises(SolverError, match="forward solve of batch index 1: faulty: 4 vari") as err:
        layer(mark(a, 1), u)
    assert err.value.batch_index == 1 and err.value.backend == "faulty"


def _nan_primal(inner, g, h, e, extra):
    sol = inner.solve(g, h, e, extra)
    if marked(g):
        sol.primal = sol.primal.copy()
        sol.primal[1] = np.nan
    return sol


def _short_dual(inner, g, h, e, extra):
    sol = inner.solve(g, h, e, extra)
    if marked(g):
        sol.ineq_dual = sol.ineq_dual[:-1]
    return sol


def _not_a_solution(inner, g, h, e, extra):
    return None if marked(g) else inner.solve(g, h, e, extra)


@pytest.mark.parametrize(
    "hook,what",
    [
        (_nan_primal, "NaN or Inf in primal"),
        (
            _short_dual,
            r"ineq_dual of shape \(3,\), expected "
            r"\(4,\)",
        ),
        (_not_a_solution, "NoneType"),
    ],
    ids=["nan", "shape", "none"],
)
def test_malformed_answers_are_solver_errors_not_values(proj, hook, what):
    layer = FFOLayer(*proj, solver=Faulty(forward=hook, name="sloppy"))
    a, u = projection_values(3)
    with pytest.raises(SolverError, match=rf"batch index 1: backend 'sloppy' returned .*{what}"):
        layer(mark(a, 1), u)


def test_solution_check_finds_each_bad_array_and_accepts_huge_finite_values():
    """solution_problem sums each array first: NaN or Inf anywhere is named by its field,
    and finite values whose sums overflow are a valid answer, lists and ints as well."""
    from ffo_core.engine.solves import solution_problem

    rng = np.random.default_rng(0)
    fields = {
        "primal": rng.standard_normal(4),
        "eq_dual": np.zeros(0),
        "ineq_dual": rng.standard_normal(6),
        "slack": rng.standard_normal(6),
    }
    assert solution_problem(Solution(Status.OPTIMAL, **fields), 4, 0, 6) is None
    for name in ("primal", "ineq_dual", "slack"):
        for bad in (np.nan, np.inf, -np.inf):
            broken = dict(fields, **{name: fields[name].copy()})
            broken[name][1] = bad
            assert (
                solution_problem(Solution(Status.OPTIMAL, **broken), 4, 0, 6)
                == f"status optimal but NaN or Inf in {name}"
            )
    huge = {k: np.full(v.shape, 1e308) for k, v in fields.items()}
    assert solution_problem(Solution(Status.OPTIMAL, **huge), 4, 0, 6) is None
    listed = {k: [int(x) for x in np.round(v)] for k, v in fields.items()}
    assert solution_problem(Solution(Status.OPTIMAL, **listed), 4, 0, 6) is None


def test_time_limit_hit_is_a_solver_error(proj):
    layer = FFOLayer(*proj, time_limit=1e-9)
    a, u = projection_values(2)
    with pytest.raises(SolverError, match="batch index 0: the solver hit its time limit") as err:
        layer(a, u)
    assert err.value.status is Status.TIME_LIMIT and err.value.backend == "clarabel"


def _inaccurate_on_marked(inner, g, h, e, extra):
    sol = inner.solve(g, h, e, extra)
    if marked(g):
        sol.status = Status.OPTIMAL_INACCURATE
        sol.info.raw_status = "AlmostSolved"
    return sol


def test_inaccurate_policy_raise(proj):
    layer = FFOLayer(*proj, solver=Faulty(forward=_inaccurate_on_marked), inaccurate="raise")
    a, u = projection_values(3)
    with pytest.raises(
        SolverError, match="batch index 2: solver faulty returned an inaccurate solution"
    ) as err:
        layer(mark(a, 2), u)
    assert err.value.batch_index == 2 and err.value.status is Status.OPTIMAL_INACCURATE


def test_inaccurate_policy_warn_returns_the_solution(proj):
    layer = FFOLayer(*proj, solver=Faulty(forward=_inaccurate_on_marked))  # default: warn
    a, u = projection_values(3)
    a = mark(a, 0)
    with pytest.warns(InaccurateSolutionWarning, match="batch index 0"):
        (y,) = layer(a, u)
    assert torch.allclose(y, torch.minimum(a, u), atol=1e-7)


def test_inaccurate_policy_ignore_flags_the_status(proj):
    layer = FFOLayer(*proj, solver=Faulty(forward=_inaccurate_on_marked), inaccurate="ignore")
    a, u = projection_values(3)
    a = mark(a, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (y,) = layer(a, u)
    assert torch.allclose(y, torch.minimum(a, u), atol=1e-7)
    assert layer.last_status == [Status.OPTIMAL, Status.OPTIMAL_INACCURATE, Status.OPTIMAL]


def test_inaccurate_ghost_follows_the_policy_and_can_fall_back(proj):
    a, u = projection_values(3)
    a = mark(a, 1)
    for policy, fallback in (("raise", "raise"), ("raise", "kkt")):
        layer = FFOLayer(
            *proj,
            solver=Faulty(ghost=_inaccurate_on_marked),
            inaccurate=policy,
            ghost_fallback=fallback,
        )
        ts = [a.clone().requires_grad_(True), u]
        (y,) = layer(*ts)
        if fallback == "raise":
            with pytest.raises(GhostProblemError, match="batch index 1.*inaccurate"):
                y.sum().backward()
        else:
            y.sum().backward()
            assert [d["ghost_fallback"] for d in layer.last_diagnostics] == [None, "kkt", None]
            exact = (a < u).double()  # dy/da of the projection
            assert torch.equal(ts[0].grad[1], exact[1])  # the KKT fallback: exact
            assert float((ts[0].grad - exact).norm() / exact.norm()) <= 1e-3


# -- ghost fallback ---------------------------------------------------------------------
def _fail_big_steps(limit: float):
    """Ghost solves with ``||delta c|| > limit`` fail (NUMERICAL_ERROR); smaller succeed."""

    def hook(inner, g, h, e, extra):
        if np.linalg.norm(extra) > limit:
            return Solution(Status.NUMERICAL_ERROR, info=SolveInfo(raw_status="Unsolved"))
        return inner.solve(g, h, e, extra)

    return hook


def _always_fail(inner, g, h, e, extra):
    return Solution(Status.NUMERICAL_ERROR, info=SolveInfo(raw_status="Unsolved"))


@pytest.fixture(scope="module")
def proj_reference(proj):
    """KKT-mode gradients and the default FFO deltas of the projection problem."""
    a, u = projection_values(4, seed=5)
    _, g_ref = grads_of(FFOLayer(*proj, backward="kkt"), [a, u])
    layer = FFOLayer(*proj)
    _, _g_ffo = grads_of(layer, [a, u])
    deltas = [d["delta"] for d in layer.last_diagnostics]
    return (a, u), g_ref, deltas


def test_ghost_failure_raises_by_default(proj, proj_reference):
    (a, u), _, _ = proj_reference
    layer = FFOLayer(*proj, solver=Faulty(ghost=_always_fail))
    with pytest.raises(GhostProblemError, match=r"batch index 0.*status numerical_error"):
        grads_of(layer, [a, u])


def test_ghost_fallback_smaller_delta(proj, proj_reference):
    (a, u), g_ref, deltas = proj_reference
    w = torch.randn((4, 4), dtype=F64, generator=torch.Generator().manual_seed(3))
    # ||delta c|| of the default step per sample; fail every step above a tenth of the
    # second smallest: the two smallest succeed at delta/10, the others need delta/100
    steps = [d * float(w[i].norm()) for i, d in enumerate(deltas)]
    limit = sorted(steps)[1] / 10 * 1.001
    layer = FFOLayer(
        *proj, solver=Faulty(ghost=_fail_big_steps(limit)), ghost_fallback="smaller-delta"
    )
    _, g = grads_of(layer, [a, u])
    assert max(steps) / 10 > limit >= max(steps) / 100  # some sample needs delta/100
    for i, d in enumerate(layer.last_diagnostics):
        expected = next(deltas[i] / 10**k for k in (1, 2) if steps[i] / 10**k <= limit)
        assert d["ghost_fallback"] == "smaller-delta"
        assert math.isclose(d["fallback_delta"], expected, rel_tol=1e-9)
        assert "numerical_error" in d["ghost_error"]
    assert cosine(g, g_ref) >= 0.9999


def test_ghost_fallback_smaller_delta_exhausted(proj, proj_reference):
    (a, u), _, _deltas = proj_reference
    layer = FFOLayer(*proj, solver=Faulty(ghost=_always_fail), ghost_fallback="smaller-delta")
    with pytest.raises(
        GhostProblemError,
        match=r"batch index 0: the ghost problem failed "
        r"and so did every fallback.*delta=.*delta=",
    ):
        grads_of(layer, [a, u])


@pytest.mark.parametrize("policy", ["kkt", "smaller-delta+kkt"])
def test_ghost_fallback_kkt(proj, proj_reference, policy):
    (a, u), g_ref, _ = proj_reference
    backend = Faulty(ghost=_always_fail)
    layer = FFOLayer(*proj, solver=backend, ghost_fallback=policy)
    _, g = grads_of(layer, [a, u])
    assert [d["ghost_fallback"] for d in layer.last_diagnostics] == ["kkt"] * 4
    assert backend.calls["ghost"] == (4 if policy == "kkt" else 12)
    for x, y in zip(g, g_ref):
        assert torch.allclose(x, y, atol=1e-9)


def test_ghost_fallback_reports_when_kkt_fails_too():
    """A pure LP with a non-unique solution: the ghost is unbounded and the KKT matrix
    singular; both reasons are reported, the KKT error as ``__cause__``."""
    c = cp.Parameter(2)
    y = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(c @ y), [cp.sum(y) >= 1, y >= 0])
    layer = FFOLayer(prob, [c], [y], ghost_fallback="kkt")
    cv = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    (sol,) = layer(cv)
    with pytest.raises(GhostProblemError, match=r"unbounded.*KKT fallback.*singular") as err:
        (sol * torch.tensor([1.0, -1.0], dtype=F64)).sum().backward()
    assert isinstance(err.value.__cause__, SolverError)


def test_bad_option_values_are_config_errors(proj):
    for kw in (
        dict(ghost_fallback="retry"),
        dict(time_limit=0),
        dict(time_limit=-1.0),
        dict(time_limit=float("inf")),
        dict(time_limit="10"),
        dict(check_every=-1),
        dict(check_every=1.5),
        dict(check_threshold=2.0),
        dict(check_rel_tol=0),
        dict(n_jobs=0),
    ):
        with pytest.raises(ConfigError):
            FFOLayer(*proj, **kw)


# ====================================================================== time limit ===
def _installed(spec: str) -> bool:
    try:
        get_backend(spec)
        return True
    except FFOError:
        return False


TIME_LIMIT_CASES = [  # config, how to read the limit back from the layer's backend
    ("clarabel", lambda b: b._settings().time_limit),
    ("scs", lambda b: b.solver_settings["time_limit_secs"]),
    ("gurobi", lambda b: b.params["TimeLimit"]),
    ("mosek", lambda b: b.settings["MSK_DPAR_OPTIMIZER_MAX_TIME"]),
    ("cvxpy:OSQP", lambda b: b.settings["time_limit"]),
    ("cvxpy:SCS", lambda b: b.settings["time_limit_secs"]),
    ("cvxpy:CLARABEL", lambda b: b.settings["time_limit"]),
]


@pytest.mark.parametrize("spec,read", TIME_LIMIT_CASES, ids=[c[0] for c in TIME_LIMIT_CASES])
def test_time_limit_reaches_the_backend_without_mutating_it(proj, spec, read):
    if not _installed(spec):
        pytest.skip(f"{spec} not usable here")
    given = get_backend(spec)
    before = dict(given.settings)
    layer = FFOLayer(*proj, solver=given, time_limit=7.5)
    assert layer.backend is not given and given.settings == before
    assert read(layer.backend) == 7.5
    assert (
        FFOLayer(*proj, solver=spec, time_limit=7.5).backend.settings == layer.backend.settings
    )  # same from a config string


def test_time_limit_on_scs_stops_the_solve(proj):
    layer = FFOLayer(*proj, solver="scs:eps_abs=1e-12,eps_rel=1e-12", time_limit=1e-9)
    with pytest.raises(SolverError, match="time limit") as err:
        layer(*projection_values(1))
    assert err.value.status is Status.TIME_LIMIT


@pytest.mark.parametrize("spec", ["ecos", "cvxpy:ECOS"])
def test_backend_without_time_limit_is_a_config_error_at_construction(proj, spec):
    if not _installed(spec):
        pytest.skip(f"{spec} not usable here")
    with pytest.raises(ConfigError, match="has no time limit"):
        FFOLayer(*proj, solver=spec, time_limit=5)


def test_third_party_backend_without_with_settings_is_a_config_error(proj):
    with pytest.raises(ConfigError, match="cannot take a time limit.*with_settings"):
        FFOLayer(*proj, solver=Faulty(), time_limit=5)


def test_time_limit_is_used_by_forward_and_ghost_solves(proj):
    seen = []

    class Recording(Faulty):
        def __init__(self, limit=None):
            super().__init__()
            self.limit = limit

        def with_settings(self, time_limit):
            return Recording(time_limit)

        def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
            seen.append((extra_linear_term is not None, self.limit))
            return super().solve(g, h, e, extra_linear_term)

    given = Recording()
    layer = FFOLayer(*proj, solver=given, time_limit=3.0)
    grads_of(layer, projection_values(2))
    assert given.limit is None
    assert {kind for kind, _ in seen} == {False, True}
    assert all(limit == 3.0 for _, limit in seen)


# ===================================================================== concurrency ===
def test_one_layer_from_several_threads_matches_sequential_use():
    from problems import random_qp

    qp = random_qp(10, 6, 2, seed=4)
    layer = FFOLayer(qp.problem, qp.params, [qp.y])
    inputs = [qp.tensors(batch=3, seed=s) for s in range(8)]
    sequential = [grads_of(layer, ts) for ts in inputs]
    results: list = [None] * len(inputs)
    errors: list = []
    barrier = threading.Barrier(4)

    def worker(k: int):
        try:
            barrier.wait()
            for j in range(k, len(inputs), 4):
                results[j] = grads_of(layer, inputs[j])
        except Exception as exc:  # reported below, with the thread's index
            errors.append((k, exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (outs, grads), (outs_s, grads_s) in zip(results, sequential):
        assert torch.allclose(outs[0], outs_s[0], rtol=0, atol=1e-12)
        for g, g_s in zip(grads, grads_s):
            assert torch.allclose(g, g_s, rtol=1e-10, atol=1e-12)


def test_layer_with_attribute_checks_pickles_and_deep_copies(proj):
    """Process pools (DataLoader workers, multiprocessing) and EMA copies need these; the
    copies keep refusing bad values and give the same results."""
    import copy
    import pickle

    s = cp.Parameter(3, name="s", nonneg=True)
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + s @ y), [y >= -1])
    layer = FFOLayer(prob, [s], [y], check_every=1)
    value = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert torch.equal(other(value)[0], layer(value)[0])
        with pytest.raises(InvalidParameterError, match="nonneg"):
            other(-value)


# ==================================================================== health check ===
def test_health_check_schedule_log_and_records(proj, caplog):
    layer = FFOLayer(*proj, check_every=2)
    a, u = projection_values(3)
    with caplog.at_level(logging.INFO, logger="ffo_core"):
        for _ in range(5):
            grads_of(layer, [a, u])
    assert [r["call"] for r in layer.health_log] == [2, 4]
    for r in layer.health_log:
        assert r["sample"] == 0 and r["cosine"] >= 0.9999 and r["cosine_params"] >= 0.9999
    records = [
        r
        for r in caplog.records
        if r.name == "ffo_core" and "gradient health check" in r.getMessage()
    ]
    assert len(records) == 2 and all(r.levelno == logging.INFO for r in records)
    off = FFOLayer(*proj)
    grads_of(off, [a, u])
    assert len(off.health_log) == 0


def _corrupt_ghost(inner, g, h, e, extra):
    """A solver whose ghost solutions answer the wrong question: it reads the extra linear
    term in reverse order (a plausible 'solved' answer from an adapter that scrambles its
    input), so the difference quotient points the wrong way."""
    return inner.solve(g, h, e, None if extra is None else extra[::-1].copy())


def test_health_check_warns_when_the_gradient_is_wrong(proj, caplog):
    layer = FFOLayer(
        *proj, solver=Faulty(ghost=_corrupt_ghost), check_every=1, check_threshold=0.99
    )
    a, u = projection_values(2)
    with (
        caplog.at_level(logging.INFO, logger="ffo_core"),
        pytest.warns(GradientHealthWarning, match="below check_threshold=0.99"),
    ):
        grads_of(layer, [a, u])
    (record,) = layer.health_log
    assert record["cosine"] < 0.99
    assert any(r.levelno == logging.WARNING and r.name == "ffo_core" for r in caplog.records)


def _doubled_ghost_step(inner, g, h, e, extra):
    """A ghost solution twice as far from the forward one as it should be (the solver is
    solved with twice the step): right direction, wrong length."""
    return inner.solve(g, h, e, 2 * extra)


def test_health_check_warns_on_magnitude_errors_the_cosine_misses(proj):
    a, u = projection_values(2)
    layer = FFOLayer(*proj, solver=Faulty(ghost=_doubled_ghost_step), check_every=1)
    with pytest.warns(
        GradientHealthWarning, match="relative error 1.0.e\\+00 is above check_rel_tol=0.1"
    ):
        grads_of(layer, [a, u])
    (record,) = layer.health_log
    assert record["cosine"] >= 0.9999 and abs(record["rel_err"] - 1.0) < 1e-3
    quiet = FFOLayer(
        *proj, solver=Faulty(ghost=_doubled_ghost_step), check_every=1, check_rel_tol=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientHealthWarning)
        grads_of(quiet, [a, u])


def test_health_check_survives_a_failing_reference(proj, monkeypatch):
    import ffo_core.layers.policies as layer_module

    def broken(*args, **kwargs):
        raise SolverError("reference unavailable")

    layer = FFOLayer(*proj, check_every=1)
    monkeypatch.setattr(layer_module, "kkt_backward", broken)
    _, g = grads_of(layer, projection_values(2))
    assert all(torch.isfinite(x).all() for x in g)
    (record,) = layer.health_log
    assert record["cosine"] is None and "reference unavailable" in record["error"]


# ========================================================== property-based testing ===
#: Polyhedral families run Clarabel at its default tolerances; curved cones at 1e-10
#: (through default Clarabel the first-order gradient on curved cones was found up to 33%
#: off on an ordinary entropy problem: docs/reliability.md).
DEFAULT_CLARABEL = "clarabel"
CLARABEL_1E10 = "clarabel:tol_gap_abs=1e-10,tol_gap_rel=1e-10,tol_feas=1e-10,tol_ktratio=1e-8"
FAST = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SLOW = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: Tolerances (cosine of all parameters' gradients of the batch together, FFO vs KKT on the
#: same forward solution).  Polyhedral: tests/test_gradients.py's 0.9999.  Curved cones
#: through Clarabel at 1e-10: 0.995; tests/test_cones.py's 0.999 is stated for SCS at 1e-12
#: and "not reachable through Clarabel".  Worst cosines seen through Clarabel at 1e-10 on
#: non-degenerate instances: 0.9975 (SDP) and 0.9988 (SOCP) before commit cd3838a (Clarabel
#: reports sqrt(residual) accuracy on curved cones), 0.9997 (SOCP, 249 instances) after.
POLY_COS, CONE_COS = 0.9999, 0.995


class Family:
    """A problem structure (built once per size) and a sampler of feasible values."""

    def __init__(self, problem, params, variables, sample, solver=CLARABEL_1E10, cos_tol=CONE_COS):
        self.problem, self.params, self.variables, self.sample = problem, params, variables, sample
        self.cos_tol = cos_tol
        self.ffo = FFOLayer(problem, params, variables, solver=solver)
        self.kkt = FFOLayer(problem, params, variables, solver=solver, backward="kkt")


@cache
def qp_family(n: int, m: int, p: int) -> Family:
    """``min 1/2||F y||^2 + q'y, G y <= h, A y = b``; strictly complementary values."""
    y = cp.Variable(n)
    F, q = cp.Parameter((n, n)), cp.Parameter(n)
    G, h = cp.Parameter((m, n)), cp.Parameter(m)
    A, b = cp.Parameter((p, n)), cp.Parameter(p)
    cons = [G @ y <= h] + ([A @ y == b] if p else [])
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ y) + q @ y), cons)
    params = [F, q, G, h] + ([A, b] if p else [])

    def sample(rng, scale):
        Fv = np.eye(n) + rng.standard_normal((n, n)) / (2 * math.sqrt(n))
        y0 = scale * rng.standard_normal(n)
        Gv = rng.standard_normal((m, n))
        act = rng.random(m) < 0.5
        act[min(n - p, m) :] = False  # at most n - p active rows
        hv = Gv @ y0 + np.where(act, 0.0, scale * rng.uniform(0.2, 1.5, m))
        lam = np.where(act, rng.uniform(0.2, 1.5, m), 0.0)
        Av = rng.standard_normal((p, n))
        nu = rng.standard_normal(p)
        qv = -(Fv.T @ Fv @ y0 + Av.T @ nu + Gv.T @ lam)
        return [Fv, qv, Gv, hv] + ([Av, Av @ y0] if p else [])

    return Family(prob, params, [y], sample, solver=DEFAULT_CLARABEL, cos_tol=POLY_COS)


@cache
def lp_family(n: int, m: int) -> Family:
    """``min c'y + reg/2 ||y||^2, G y <= h`` (reg a ``nonneg`` parameter, 1e-3..1e-1):
    an LP made strongly convex by a small quadratic, strictly complementary values."""
    y = cp.Variable(n)
    c, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    reg = cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(c @ y + 0.5 * reg * cp.sum_squares(y)), [G @ y <= h])

    def sample(rng, scale):
        r = 10 ** rng.uniform(-3, -1)
        y0 = scale * rng.standard_normal(n)
        Gv = rng.standard_normal((m, n))
        act = np.zeros(m, dtype=bool)
        act[rng.permutation(m)[: rng.integers(1, min(n, m) + 1)]] = True
        hv = Gv @ y0 + np.where(act, 0.0, scale * rng.uniform(0.2, 1.5, m))
        lam = np.where(act, rng.uniform(0.2, 1.5, m), 0.0)
        return [-(r * y0 + Gv.T @ lam), Gv, hv, np.array(r)]

    return Family(prob, [c, G, h, reg], [y], sample, solver=DEFAULT_CLARABEL, cos_tol=POLY_COS)


@cache
def socp_family(n: int, k: int, d: int) -> Family:
    """``min 1/2||y||^2 + q'y, ||G_i y + h_i|| <= c_i'y + e_i, F y <= f``; cones active or
    inactive at random (multiplier on the cone's boundary), one linear row active.

    Clarabel at 1e-10: at its default tolerances many more instances are classified weakly
    active (113 of 300 against 51), and before commit cd3838a 4 of 300 gave cosine < 0.999.
    Scales 1e-2 and 1 only (see CURVED: at scale 100 the step delta is too large for the
    cones' curvature, :func:`test_known_defect_delta_too_large_on_large_socp`)."""
    y = cp.Variable(n)
    G = [cp.Parameter((d - 1, n)) for _ in range(k)]
    h = [cp.Parameter(d - 1) for _ in range(k)]
    c = [cp.Parameter(n) for _ in range(k)]
    e = [cp.Parameter() for _ in range(k)]
    q, F, f = cp.Parameter(n), cp.Parameter((2, n)), cp.Parameter(2)
    cons = [cp.norm(G[i] @ y + h[i]) <= c[i] @ y + e[i] for i in range(k)] + [F @ y <= f]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), cons)

    def sample(rng, scale):
        # at most n - 1 active cones (each pins one direction) besides the active linear
        # row: more would pin y with non-unique multipliers (LICQ fails; the gradient with
        # respect to the constraint data is then not unique and FFO and KKT legitimately
        # pick different ones -- what hypothesis found first, see docs/reliability.md)
        y0 = scale * rng.standard_normal(n)
        Gv = [rng.standard_normal((d - 1, n)) for _ in range(k)]
        hv = [scale * rng.standard_normal(d - 1) for _ in range(k)]
        cv = [0.3 * rng.standard_normal(n) for _ in range(k)]
        active = (
            rng.permutation(k) < min(k, n - 1) if rng.random() < 0.8 else np.zeros(k, dtype=bool)
        )
        active &= rng.random(k) < 0.7
        ev, force = [], np.zeros(n)
        for i in range(k):
            r = Gv[i] @ y0 + hv[i]
            nr = np.linalg.norm(r)
            if active[i]:
                ev.append(np.array(nr - cv[i] @ y0))
                force += rng.uniform(0.3, 1.5) * (Gv[i].T @ (r / nr) - cv[i])
            else:
                ev.append(np.array(nr - cv[i] @ y0 + scale * rng.uniform(0.3, 1.5)))
        Fv = rng.standard_normal((2, n))
        fv = Fv @ y0 + np.array([0.0, scale * rng.uniform(0.3, 1.5)])
        force += Fv.T @ np.array([rng.uniform(0.3, 1.5), 0.0])
        return Gv + hv + cv + ev + [-(y0 + force), Fv, fv]

    return Family(prob, G + h + c + e + [q, F, f], [y], sample)


@cache
def exp_family(kind: str, n: int) -> Family:
    """``lse``: ``min 1/2||y||^2 + q'y + log_sum_exp(F y + g)`` (3 terms);
    ``entropy``: ``min -theta'x - sum(entr(x)) + 1/2||x||^2, 1'x = 1, a'x <= b`` with the
    inequality active (stationarity constructs theta)."""
    if kind == "lse":
        y = cp.Variable(n)
        F, g, q = cp.Parameter((3, n)), cp.Parameter(3), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y + cp.log_sum_exp(F @ y + g)))

        def sample(rng, scale):
            return [
                rng.standard_normal((3, n)),
                rng.standard_normal(3),
                scale * rng.standard_normal(n),
            ]

        return Family(prob, [F, g, q], [y], sample)
    x = cp.Variable(n)
    th, a, b = cp.Parameter(n), cp.Parameter((1, n)), cp.Parameter(1)
    prob = cp.Problem(
        cp.Minimize(-th @ x - cp.sum(cp.entr(x)) + 0.5 * cp.sum_squares(x)),
        [cp.sum(x) == 1, a @ x <= b],
    )

    def sample(rng, scale):
        x0 = rng.dirichlet(np.full(n, 3.0))
        av = rng.standard_normal(n)
        nu, lam = rng.standard_normal(), rng.uniform(0.3, 1.5)
        return [np.log(x0) + 1.0 + x0 + nu + lam * av, av[None], np.array([av @ x0])]

    return Family(prob, [th, a, b], [x], sample)


@cache
def sdp_family(n: int, p: int) -> Family:
    """``min 1/2||X||_F^2 - tr(C X), X >> 0, tr(A_j X) = b_j`` with a strictly
    complementary optimum of random rank (1..n-1)."""
    X = cp.Variable((n, n))
    C = cp.Parameter((n, n))
    A = [cp.Parameter((n, n)) for _ in range(p)]
    b = cp.Parameter(p)
    prob = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(X) - cp.trace(C @ X)),
        [X >> 0] + [cp.trace(A[j] @ X) == b[j] for j in range(p)],
    )

    def sample(rng, scale):
        rank = int(rng.integers(1, n))
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        X0 = (Q[:, :rank] * scale * rng.uniform(0.5, 1.5, rank)) @ Q[:, :rank].T
        Z0 = (Q[:, rank:] * rng.uniform(0.5, 1.5, n - rank)) @ Q[:, rank:].T
        As = [(lambda M: (M + M.T) / 2)(rng.standard_normal((n, n))) for _ in range(p)]
        nu = rng.standard_normal(p)
        Cv = X0 + sum(v * Aj for v, Aj in zip(nu, As)) - Z0
        return [Cv] + As + [np.array([np.trace(Aj @ X0) for Aj in As])]

    return Family(prob, [C] + A + [b], [X], sample)


FAMILIES = {
    "qp": st.builds(
        qp_family,
        st.sampled_from([3, 5, 8]),
        st.sampled_from([2, 4, 7]),
        st.sampled_from([0, 1, 2]),
    ),
    "lp": st.builds(lp_family, st.sampled_from([3, 6]), st.sampled_from([4, 8])),
    "socp": st.builds(
        socp_family, st.sampled_from([3, 5]), st.sampled_from([1, 3]), st.sampled_from([3, 4])
    ),
    "exp": st.builds(exp_family, st.sampled_from(["lse", "entropy"]), st.sampled_from([3, 5])),
    "sdp": st.builds(sdp_family, st.sampled_from([2, 3, 4]), st.sampled_from([1, 2])),
}
#: Curved-cone families are tested at solution scales 1e-2 and 1 only: at scale 100 the
#: default delta is too large for the cones' curvature (SOCP: 30% error even on SCS at
#: 1e-11, :func:`test_known_defect_delta_too_large_on_large_socp`; SDP: cosine 0.984).
CURVED = ("socp", "exp", "sdp")
#: Outcome counts per family (what hypothesis saw), for the non-vacuity assertions.
OUTCOMES: dict[str, dict[str, int]] = {}


def _run_example(family_name: str, fam: Family, seed: int, batch: int, scale: float):
    """One example: never an untyped exception; finite values; FFO ~ KKT where both run."""
    rng = np.random.default_rng(seed)
    samples = [fam.sample(rng, scale) for _ in range(batch)]
    values = [np.stack([s[k] for s in samples]) for k in range(len(fam.params))]
    w = [torch.tensor(rng.standard_normal((batch,) + v.shape), dtype=F64) for v in fam.variables]
    counts = OUTCOMES.setdefault(
        family_name, {"ok": 0, "typed_error": 0, "no_ref": 0, "degenerate": 0}
    )

    def run(layer):
        ts = [torch.tensor(v, dtype=F64, requires_grad=True) for v in values]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InaccurateSolutionWarning)
            outs = layer(*ts)
            sum((wk * o).sum() for wk, o in zip(w, outs)).backward()
        return outs, [t.grad for t in ts]

    try:
        outs, g = run(fam.ffo)
    except FFOError as exc:  # typed: allowed, but noted
        note(f"typed error: {type(exc).__name__}: {exc}")
        counts["typed_error"] += 1
        return
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(torch.isfinite(x).all() for x in g)
    diag = fam.ffo.last_diagnostics
    try:
        _, g_ref = run(fam.kkt)
    except SolverError as exc:
        note(f"no KKT reference: {exc}")
        counts["no_ref"] += 1
        return
    if any(d.get("weak", 0) or d.get("weak_blocks", 0) for d in fam.kkt.last_diagnostics + diag):
        counts["degenerate"] += 1  # the derivative may not exist there
        return
    cos = cosine(g, g_ref)
    note(f"cosine {cos:.6f}; diagnostics {diag}")
    assert cos >= fam.cos_tol
    counts["ok"] += 1


def _property(family_name: str, profile):
    @profile
    @given(
        fam=FAMILIES[family_name],
        seed=st.integers(0, 2**32 - 1),
        batch=st.sampled_from([1, 2]),
        scale=st.sampled_from([1e-2, 1.0] if family_name in CURVED else [1e-2, 1.0, 1e2]),
    )
    def check(fam, seed, batch, scale):
        _run_example(family_name, fam, seed, batch, scale)

    return check


def _check_family(family_name: str, profile) -> None:
    OUTCOMES.pop(family_name, None)
    _property(family_name, profile)()
    counts = OUTCOMES[family_name]
    # feasible, strictly complementary by construction: most examples must really compare
    assert counts["ok"] >= 0.75 * sum(counts.values()), counts


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_random_feasible_problems_typed_errors_and_kkt_agreement(family_name):
    _check_family(family_name, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_random_feasible_problems_slow_profile(family_name):
    _check_family(family_name, SLOW)


@settings(FAST, max_examples=40)
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.integers(-6, 6),
    zero_frac=st.sampled_from([0.0, 0.3, 0.9]),
    feasible=st.booleans(),
)
def test_wild_random_data_only_typed_errors(seed, log_scale, zero_frac, feasible):
    """Random QP data with no construction of the optimum, badly scaled (each parameter by
    up to 10^+-6), with zeroed entries; ``feasible`` only makes h, b consistent with some
    point.  Infeasible, unbounded or ill-posed instances must surface as FFOError
    subclasses, and whatever succeeds is finite."""
    fam = qp_family(5, 7, 2)
    rng = np.random.default_rng(seed)
    raw = []
    for prm in fam.params:
        v = rng.standard_normal((2,) + prm.shape) * 10.0 ** (log_scale * rng.random())
        v[rng.random(v.shape) < zero_frac] = 0.0
        raw.append(v)
    if feasible:  # F, q, G, h, A, b: h, b from a point y1
        y1 = rng.standard_normal((2, 5))
        raw[3] = np.einsum("bij,bj->bi", raw[2], y1) + np.abs(raw[3])
        raw[5] = np.einsum("bij,bj->bi", raw[4], y1)
    values = [torch.tensor(v, requires_grad=True) for v in raw]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InaccurateSolutionWarning)
            (y,) = fam.ffo(*values)
            assert torch.isfinite(y).all()
            y.sum().backward()
    except FFOError as exc:
        note(f"typed error: {type(exc).__name__}: {exc}")
        counts = OUTCOMES.setdefault("wild", {})
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
        return
    assert all(torch.isfinite(v.grad).all() for v in values)
    OUTCOMES.setdefault("wild", {}).setdefault("ok", 0)
    OUTCOMES["wild"]["ok"] += 1


def test_default_delta_on_large_scale_socp():
    """Regression, found by the property test (SOCP, scale 100); fixed by capping the
    multiplier step of kept cone blocks (``max_curved_step``).  KKT agrees across Clarabel, Clarabel
    1e-10 and SCS 1e-11 to 1e-6.  FFO with the default delta (0.44 on SCS) moves the two
    kept cones' multipliers by 85% and 119% of their norms (slacks: 3e-4 of theirs, so
    ``max_curved_step`` does not trigger) and is 30% off even on SCS at 1e-11; with
    delta = 0.1 (moves 28%, 38%) it is exact (5e-11): a step problem, not solver error."""
    fam = socp_family(3, 3, 4)
    rng = np.random.default_rng(59)
    values = fam.sample(rng, 100.0)
    fam.sample(rng, 100.0)  # the example's second sample: not needed
    w = torch.tensor(rng.standard_normal((2, 3))[0])
    scs = "scs:eps_abs=1e-11,eps_rel=1e-11,max_iters=400000,cache_size=0"
    grads = {}
    for mode in ("kkt", "ffo"):
        layer = FFOLayer(fam.problem, fam.params, fam.variables, solver=scs, backward=mode)
        ts = [torch.tensor(np.asarray(v, dtype=float), requires_grad=True) for v in values]
        (y,) = layer(*ts)
        (w * y).sum().backward()
        grads[mode] = torch.cat([t.grad.flatten() for t in ts])
    rel = float((grads["ffo"] - grads["kkt"]).norm() / grads["kkt"].norm())
    assert rel <= 1e-2, rel


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_finite_check_reads_every_entry_and_survives_an_overflowing_sum(dtype):
    """The input check sums first (one pass) and looks entry by entry only when the sum is
    not finite: a NaN or Inf anywhere is refused with its batch index, and finite values
    whose sum overflows are accepted."""
    from ffo_core.layers.tensors import check_finite

    big = torch.finfo(dtype).max / 2
    check_finite("x", torch.full((2, 4), big, dtype=dtype), True)  # sum overflows: fine
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones((3, 4), dtype=dtype)
        t[2, 1] = bad
        with pytest.raises(
            InvalidParameterError,
            match=r"x contains NaN or Inf at batch "
            r"index \[2\]",
        ):
            check_finite("x", t, True)


def test_finite_check_names_the_first_five_bad_samples_and_says_when_there_are_more():
    from ffo_core.layers.tensors import check_finite

    t = torch.ones((8, 3), dtype=torch.float64)
    t[1:7, 0] = float("nan")
    with pytest.raises(
        InvalidParameterError, match=r"at batch index \[1, 2, 3, 4, 5\] \(and more\)$"
    ):
        check_finite("x", t, True)
    t[6, 0] = 1.0
    with pytest.raises(InvalidParameterError, match=r"at batch index \[1, 2, 3, 4, 5\]$"):
        check_finite("x", t, True)


def test_guarded_resolve_is_guarded_like_solve_and_falls_back_to_solve():
    """GuardedBackend.resolve turns a backend's crash in ``resolve`` into a typed error
    naming the batch index (a GhostProblemError for a ghost), refuses a malformed answer,
    and is a plain guarded solve for a backend without ``resolve``."""
    import scipy.sparse as sp

    from ffo_core.engine.solves import GuardedBackend
    from ffo_core.protocol import ConeConstraints, ConeDims, Equalities, Objective

    g = Objective(sp.identity(2, format="csc"), np.array([1.0, -1.0]))
    h = ConeConstraints(sp.csc_matrix(np.eye(2)), np.ones(2), ConeDims(nonneg=2))
    e = Equalities(sp.csc_matrix((0, 2)), np.zeros(0))
    term = np.array([0.1, 0.0])

    class Crashing(Faulty):
        def resolve(self, previous, g, h, e, extra_linear_term):
            raise RuntimeError("kept solver gone")

    class Short(Faulty):
        def resolve(self, previous, g, h, e, extra_linear_term):
            sol = self.inner.solve(g, h, e, extra_linear_term)
            sol.primal = sol.primal[:1]
            return sol

    with pytest.raises(
        GhostProblemError,
        match=r"batch index 3: backend 'crash' raised "
        r"RuntimeError: kept solver gone",
    ):
        GuardedBackend(Crashing(name="crash"), 3, ghost=True).resolve(None, g, h, e, term)
    with pytest.raises(GhostProblemError, match=r"primal of shape \(1,\), expected \(2,\)"):
        GuardedBackend(Short(name="short"), 1, ghost=True).resolve(None, g, h, e, term)
    plain = Faulty()
    sol = GuardedBackend(plain, 0, ghost=True).resolve(None, g, h, e, term)
    assert plain.calls == {"forward": 0, "ghost": 1}
    assert np.allclose(sol.primal, plain.inner.solve(g, h, e, term).primal)
