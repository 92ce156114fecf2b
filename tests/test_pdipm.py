"""The ``pdipm`` backend: ffo's batched interior-point method in torch.

What each group proves (real solves throughout; the reference is Clarabel at 1e-12):

(a) single solves and ``solve_batch`` agree with Clarabel on random LPs and QPs, dense and
    sparse, with and without equalities (solution, both duals, slack, within ``DIST``);
    batches with per-sample and with shared matrices, an extra linear term, and batch vs
    per-sample agreement;
(b) absent rows (all-zero rows of ``A``/``G`` in some samples, the engine's ghost batches)
    give the problem without those rows; samples with no inequality left and ``m = 0``
    problems (equality-constrained QPs, rank-deficient ``A``, singular ``P``) are solved
    directly;
(c) infeasible and unbounded problems get INFEASIBLE/UNBOUNDED (never an optimum), alone
    and in a batch whose other samples still solve; NaN data spoil only their own sample;
(d) float32 (tensors in, float32 tensors out, ``FLOAT32_DIST`` from Clarabel), float16
    refused; settings validated; oversized batches refused before allocating;
(e) through the layers as they are (``FFOQPLayer``/``FFOLayer`` call ``solve`` per
    sample): forward equal to Clarabel's, gradients against ``backward="kkt"`` with a
    tight Clarabel and against central finite differences;
(f) the conformance suite at the defaults (slow), and a CUDA check (skipped without CUDA).

Tolerances: pdipm stops at relative residual 1e-9 (float64), so solutions and duals are
within ``DIST = 1e-6`` (relative, infinity norm) of Clarabel's on these strictly
complementary instances (measured: 1.5e-7 at worst); float32 stops at 1e-5 and is within
``FLOAT32_DIST = 1e-3`` (measured: 2.4e-4).  Gradients through the layers (``GRAD_REL =
1e-6``, relative): the first-order gradient against the exact KKT gradient of a tight
Clarabel solve (measured 2e-9; the ghost problem of a QP with a fixed active set is affine
in the step, so the one-sided difference is exact up to solver accuracy), the KKT mode
through pdipm's solution (2e-9), central finite differences of pdipm solves at tol 1e-11
(9e-9), and FFOLayer's gradients (2e-9).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from benchmarks.paper.boards import constraint_matrix
from ffo_conformance.checks import residuals
from ffo_conformance.zoo import Sample
from ffo_core import ConfigError, FFOQPLayer, SolverError, Status, get_backend
from ffo_core.errors import InvalidParameterError
from ffo_core.protocol import (
    ConeConstraints,
    ConeDims,
    Equalities,
    Objective,
    ProblemBatch,
    SparsePattern,
)

REF = "clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12,tol_ktratio=1e-10"
DIST = 1e-6
FLOAT32_DIST = 1e-3
GRAD_REL = 1e-6


@pytest.fixture(scope="module")
def pdipm():
    return get_backend("pdipm")


@pytest.fixture(scope="module")
def ref():
    return get_backend(REF)


# -- problems -------------------------------------------------------------------------------


def random_problem(rng, n, m, p, kind="qp", density=1.0):
    """Dense ``(P, q, A, b, G, h)`` with a known unique, strictly complementary optimum
    (see :func:`vectors_for`); an LP has ``n - p`` active rows: a nondegenerate vertex."""
    n_active = min(m, n - p) if kind == "lp" else min(round(0.4 * m), n - p)
    active = np.zeros(m, dtype=bool)
    active[rng.permutation(m)[:n_active]] = True
    while True:  # the active rows and A linearly independent: unique duals
        G = rng.standard_normal((m, n)) * (rng.random((m, n)) < density)
        for i in np.flatnonzero(~G.any(axis=1)):
            G[i, rng.integers(n)] = 1.0
        A = rng.standard_normal((p, n)) * (rng.random((p, n)) < max(density, 0.5))
        if np.linalg.matrix_rank(np.vstack([A, G[active]])) == p + n_active:
            break
    if kind == "lp":
        P = np.zeros((n, n))
    else:
        F = rng.standard_normal((n, n)) / np.sqrt(n)
        P = F.T @ F + 0.1 * np.eye(n)
    return (P, *vectors_for(rng, P, A, G, active))


def vectors_for(rng, P, A, G, active):
    """``(q, A, b, G, h)`` making a random ``y0`` optimal with multipliers 0.5..1.5 on the
    ``active`` rows and slacks 0.2..1 on the others (strict complementarity)."""
    m, n = G.shape
    y0 = rng.standard_normal(n)
    lam = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    h = G @ y0 + np.where(active, 0.0, rng.uniform(0.2, 1.0, m))
    q = -(P @ y0 + A.T @ rng.standard_normal(A.shape[0]) + G.T @ lam)
    return q, A, A @ y0, G, h


def protocol(P, q, A, b, G, h):
    P = None if P is None or not np.any(P) else sp.csc_matrix(P)
    return (
        Objective(P, np.asarray(q, float)),
        ConeConstraints(sp.csc_matrix(G), np.asarray(h, float), ConeDims(nonneg=len(h))),
        Equalities(sp.csc_matrix(A, shape=(len(b), len(q))), np.asarray(b, float)),
    )


def make_batch(samples, shared=()):
    """A ProblemBatch of dense samples ``(P, q, A, b, G, h)`` on the union of their
    nonzero patterns; fields named in ``shared`` are given once (leading dimension 1)."""
    B = len(samples)
    fields = {}
    patterns = {}
    for k, name in ((0, "P"), (2, "A"), (4, "G")):
        mats = [np.asarray(s[k], float) for s in samples]
        union = sp.csc_matrix(sum(np.abs(M) for M in mats) + 0.0)
        union.data[:] = 1.0
        pat = SparsePattern.of(union)
        patterns[name] = pat
        vals = np.array([M[pat.indices, pat.cols] for M in mats])
        fields[name] = vals[:1] if name in shared else vals
    for k, name in ((1, "q"), (3, "b"), (5, "h")):
        vals = np.array([np.asarray(s[k], float) for s in samples])
        fields[name] = vals[:1] if name in shared else vals
    m = samples[0][5].shape[0]
    return ProblemBatch(
        batch=B,
        P=patterns["P"] if patterns["P"].nnz else None,
        P_values=fields["P"],
        q=fields["q"],
        A=patterns["A"],
        A_values=fields["A"],
        b=fields["b"],
        G=patterns["G"],
        G_values=fields["G"],
        h=fields["h"],
        dims=ConeDims(nonneg=m),
    )


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b), initial=0.0) / (1.0 + np.max(np.abs(b), initial=0.0)))


def distance(sol, ref, rows_e=None, rows_g=None) -> float:
    """Largest relative distance of (y, nu, lam, s); ``rows_*``: the rows to compare."""
    assert sol.status == Status.OPTIMAL, (sol.status, sol.info)
    e = slice(None) if rows_e is None else rows_e
    g = slice(None) if rows_g is None else rows_g
    return max(
        rel(sol.primal, ref.primal),
        rel(np.asarray(sol.eq_dual)[e], ref.eq_dual),
        rel(np.asarray(sol.ineq_dual)[g], ref.ineq_dual),
        rel(np.asarray(sol.slack)[g], ref.slack),
    )


# -- (a) against Clarabel -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qp", "lp"])
@pytest.mark.parametrize("density", [1.0, 0.2])
@pytest.mark.parametrize("p", [0, 3])
def test_single_solve_matches_clarabel(pdipm, ref, kind, density, p):
    rng = np.random.default_rng([7, p, int(density * 10), kind == "lp"])
    for _ in range(3):
        n, m = int(rng.integers(5, 25)), int(rng.integers(3, 30))
        m = max(m, n) if kind == "lp" else m  # an LP's vertex needs n - p active rows
        prob = protocol(*random_problem(rng, n, m, p, kind, density))
        sol = pdipm.solve(*prob)
        assert sol.info.accuracy <= 1e-9 and sol.info.iterations > 0
        assert distance(sol, ref.solve(*prob)) <= DIST


@pytest.mark.parametrize("shared", [(), ("P", "A", "G"), ("P", "q", "A", "b", "G")])
def test_batch_matches_clarabel(pdipm, ref, shared):
    rng = np.random.default_rng(len(shared))
    P0, _, A0, _, G0, _ = random_problem(rng, 12, 15, 2, density=0.5)
    active = np.arange(15) < 5
    samples = []
    for k in range(5):
        P = P0 if "P" in shared else P0 + 0.1 * k * np.eye(12)
        G = G0 if "G" in shared else G0 * (1.0 + 0.1 * rng.standard_normal(G0.shape))
        A = A0 if "A" in shared else A0 * (1.0 + 0.1 * rng.standard_normal(A0.shape))
        samples.append((P, *vectors_for(rng, P, A, G, active)))
    if "q" in shared:  # the same q: a shared y0 and multipliers
        samples = [(*samples[0][:1], *vectors_for(np.random.default_rng(0), P0, A0, G0, active))]
        samples = samples * 5
        samples = [
            (s[0], s[1], s[2], s[3], s[4], s[5] + 0.1 * k * (~active))
            for k, s in enumerate(samples)
        ]
    batch = make_batch(samples, shared)
    out = pdipm.solve_batch(batch)
    assert isinstance(out.primal, np.ndarray) and out.primal.dtype == np.float64
    assert out.primal.shape == (5, 12) and out.ineq_dual.shape == (5, 15)
    for k in range(5):
        sol = out.sample(k)
        assert distance(sol, ref.solve(*batch.sample(k))) <= DIST
        assert sol.info.extra["batch_size"] == 5


def test_extra_linear_term_and_per_sample_agreement(pdipm, ref):
    rng = np.random.default_rng(3)
    extra = rng.standard_normal((4, 10))
    samples = []
    for k in range(4):  # q + extra is the constructed (strictly complementary) cost
        P, q, A, b, G, h = random_problem(rng, 10, 12, 2, density=0.6)
        samples.append((P, q - extra[k], A, b, G, h))
    batch = make_batch(samples)  # one structure: the union pattern, different values
    out = pdipm.solve_batch(batch, extra)
    for k in range(4):
        g, h, e = batch.sample(k)
        alone = pdipm.solve(g, h, e, extra[k])
        clarabel = ref.solve(Objective(g.P, g.q + extra[k]), h, e)
        assert distance(out.sample(k), clarabel) <= DIST
        assert distance(out.sample(k), alone) <= DIST


def test_repeated_calls_are_identical(pdipm):
    rng = np.random.default_rng(4)
    batch = make_batch([random_problem(rng, 8, 10, 1) for _ in range(3)])
    a, b = pdipm.solve_batch(batch), pdipm.solve_batch(batch)
    for name in ("primal", "eq_dual", "ineq_dual", "slack"):
        assert np.array_equal(getattr(a, name), getattr(b, name))


def test_sudoku_rank_deficient_equalities(pdipm, ref):
    """OptNet's 4x4 Sudoku QP: 40 equality rows of rank < 40, z >= 0."""
    A = constraint_matrix(2)
    assert np.linalg.matrix_rank(A) < A.shape[0]
    n = A.shape[1]
    rng = np.random.default_rng(5)
    q = -rng.random(n)
    prob = protocol(0.1 * np.eye(n), q, A, np.ones(A.shape[0]), -np.eye(n), np.zeros(n))
    sol, want = pdipm.solve(*prob), ref.solve(*prob)
    assert sol.status == Status.OPTIMAL
    # a degenerate vertex: the duals are not unique; the solution is, and the duals
    # must satisfy the KKT conditions
    assert rel(sol.primal, want.primal) <= DIST
    assert max(residuals(Sample(*prob, np.ones(n)), sol).values()) <= 1e-8


# -- (b) absent rows, equality-only problems -------------------------------------------------


def test_absent_rows_solve_the_reduced_problem(pdipm, ref):
    rng = np.random.default_rng(6)
    n, m, p = 10, 12, 4
    base = random_problem(rng, n, m, p, density=0.7)
    drops = [
        ([], []),
        ([0, 3, 7], [1]),
        ([1, 2], [0, 2]),
        (list(range(m)), [3]),  # every inequality absent: an equality-constrained QP
        (list(range(m)), list(range(p))),  # nothing left: an unconstrained QP
    ]
    samples = []
    for k, (gone_g, gone_e) in enumerate(drops):
        P, q, A, b, G, h = (np.array(v) for v in base)
        q = q + 0.1 * k
        G[gone_g] = 0.0
        h[gone_g] = np.where(np.arange(len(gone_g)) % 2, 0.0, 2.0)  # h_i >= 0, some 0
        A[gone_e] = 0.0
        b[gone_e] = 0.0
        samples.append((P, q, A, b, G, h))
    batch = make_batch(samples)
    out = pdipm.solve_batch(batch)
    for k, (gone_g, gone_e) in enumerate(drops):
        keep_g = np.setdiff1d(np.arange(m), gone_g)
        keep_e = np.setdiff1d(np.arange(p), gone_e)
        P, q, A, b, G, h = samples[k]
        want = ref.solve(*protocol(P, q, A[keep_e], b[keep_e], G[keep_g], h[keep_g]))
        sol = out.sample(k)
        assert distance(sol, want, keep_e, keep_g) <= DIST
        assert np.all(sol.ineq_dual[gone_g] == 0.0)
        assert np.allclose(sol.slack[gone_g], h[gone_g])
        if len(gone_g) == m:
            assert "one KKT solve" in sol.info.raw_status


def test_equality_only_problems(pdipm, ref):
    """m = 0: rank-deficient A (a repeated row), P singular but positive definite on the
    null space of A; solved by one refined KKT solve."""
    rng = np.random.default_rng(8)
    n, p = 8, 4
    A = rng.standard_normal((p, n))
    A = np.vstack([A, A[1]])  # rank deficient, consistent
    y0 = rng.standard_normal(n)
    F = rng.standard_normal((n - 2, n))
    P = F.T @ F  # rank n - 2
    prob = (P, rng.standard_normal(n), A, A @ y0, np.zeros((0, n)), np.zeros(0))
    sol = pdipm.solve(*protocol(*prob))
    want = ref.solve(*protocol(*prob))
    assert sol.status == Status.OPTIMAL and sol.info.iterations == 1
    assert rel(sol.primal, want.primal) <= DIST
    assert rel(A.T @ sol.eq_dual, A.T @ want.eq_dual) <= DIST
    # a batch of them, with one absent equality row in one sample
    samples = [
        prob,
        (
            P,
            prob[1] + 1.0,
            A * [[1], [1], [1], [0], [1]],
            A[[0, 1, 2, 2, 1]] @ y0 * [1, 1, 1, 0, 1],
            *prob[4:],
        ),
    ]
    out = pdipm.solve_batch(make_batch(samples))
    assert out.status == [Status.OPTIMAL, Status.OPTIMAL]
    P1, q1, A1, b1 = samples[1][:4]
    want1 = ref.solve(*protocol(P1, q1, A1[[0, 1, 2, 4]], b1[[0, 1, 2, 4]], *prob[4:]))
    assert rel(out.primal[1], want1.primal) <= DIST


def test_more_equalities_than_unknowns(pdipm, monkeypatch):
    """The ghost problem of the Sudoku QP at its vertex: the 64 one-hot rows and the 48
    zero entries locked as equalities, 112 rows of rank 64 in 64 unknowns.  The Schur
    complement (112 x 112) is singular there; the solve must still give the vertex and
    multipliers that satisfy stationarity, by the Schur path (no LU fallback)."""
    import ffo_backends._pdipm_kernel as kernel

    board = np.array([[0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2], [3, 2, 1, 0]])
    z = np.zeros((4, 4, 4))
    for r in range(4):
        for c in range(4):
            z[r, c, board[r, c]] = 1.0
    z = z.ravel()
    A1 = constraint_matrix(2)
    locked = np.eye(64)[z == 0]
    A = np.vstack([A1, locked])
    b = np.r_[np.ones(A1.shape[0]), np.zeros(len(locked))]
    assert A.shape == (112, 64) and np.linalg.matrix_rank(A) == 64
    lu_calls = []
    original = kernel.KKT._factor_lu

    def counted(self, *args):
        lu_calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(kernel.KKT, "_factor_lu", counted)
    rng = np.random.default_rng(11)
    P = 0.1 * np.eye(64)
    for _ in range(3):
        q = -rng.random(64)
        sol = pdipm.solve(*protocol(P, q, A, b, np.zeros((0, 64)), np.zeros(0)))
        assert sol.status == Status.OPTIMAL
        assert np.abs(sol.primal - z).max() <= 1e-10
        assert np.abs(P @ sol.primal + q + A.T @ sol.eq_dual).max() <= 1e-9
    assert not lu_calls


@pytest.mark.parametrize(
    "case, expect",
    [("inconsistent", Status.INFEASIBLE), ("unbounded", Status.UNBOUNDED)],
)
def test_equality_only_infeasible_or_unbounded(pdipm, case, expect):
    rng = np.random.default_rng(9)
    n = 6
    A = rng.standard_normal((2, n))
    if case == "inconsistent":
        A, b = np.vstack([A, A[0]]), np.array([1.0, 2.0, 3.0])  # row 0 twice, b differs
        P = np.eye(n)
    else:
        b, P = np.zeros(2), np.diag([1.0] * (n - 1) + [0.0])  # free along e_n ...
        A[:, -1] = 0.0
    q = rng.standard_normal(n)
    q[-1] = -1.0  # ... with a slope there
    sol = pdipm.solve(*protocol(P, q, A, b, np.zeros((0, n)), np.zeros(0)))
    assert sol.status == expect, sol.info
    assert sol.primal is None


# -- (c) infeasible, unbounded, broken samples -----------------------------------------------


def status_problems(rng):
    n = 5
    y0 = rng.standard_normal(n)
    G1 = rng.standard_normal((3, n))
    a = rng.standard_normal(n)
    lp_inf = (
        np.zeros((n, n)),
        -(np.vstack([G1, a, -a]).T @ rng.uniform(0.5, 1, 5)),
        np.zeros((0, n)),
        np.zeros(0),
        np.vstack([G1, a, -a]),
        np.concatenate([G1 @ y0 + 1, [-1.0, -1.0]]),
    )
    q = np.abs(rng.standard_normal(n))
    q[1] = -1.0
    lp_unb = (np.zeros((n, n)), q, np.zeros((0, n)), np.zeros(0), -np.eye(n), np.zeros(n))
    Aq = np.zeros((1, n))
    Aq[0, :2] = 1.0
    qp_inf = (np.eye(n), rng.standard_normal(n), Aq, np.array([2.0]), np.eye(n)[:2], np.zeros(2))
    P = np.diag([1.0] * (n - 1) + [0.0])
    qu = rng.standard_normal(n)
    qu[-1] = -1.0
    Gu = np.hstack([rng.standard_normal((3, n - 1)), np.zeros((3, 1))])
    qp_unb = (P, qu, Aq, np.zeros(1), Gu, np.ones(3))
    return {
        "lp_infeasible": (lp_inf, Status.INFEASIBLE),
        "lp_unbounded": (lp_unb, Status.UNBOUNDED),
        "qp_infeasible": (qp_inf, Status.INFEASIBLE),
        "qp_unbounded": (qp_unb, Status.UNBOUNDED),
    }


@pytest.mark.parametrize("name", ["lp_infeasible", "lp_unbounded", "qp_infeasible", "qp_unbounded"])
def test_infeasible_and_unbounded(pdipm, ref, name):
    prob, expect = status_problems(np.random.default_rng(10))[name]
    assert ref.solve(*protocol(*prob)).status == expect  # the instance is what it says
    sol = pdipm.solve(*protocol(*prob))
    assert sol.status == expect, sol.info
    assert sol.primal is None and sol.info.raw_status in ("primal_infeasible", "dual_infeasible")


def test_bad_samples_do_not_spoil_the_batch(pdipm, ref):
    """An infeasible, a NaN and a trivially infeasible (zero row, h_i < 0) sample among
    good ones, one structure: only those three fail, each with its own status."""
    rng = np.random.default_rng(11)
    n, m = 6, 8
    good = random_problem(rng, n, m, 1)
    samples = [tuple(np.array(v) for v in good) for _ in range(5)]
    P, q, A, b, G, h = samples[1]
    G1 = np.vstack([G[:4], -G[:4]])  # g'y <= -10 and -g'y <= -10: infeasible
    samples[1] = (P, q, A, b, G1, np.full(m, -10.0))
    samples[2] = (P, q, A, b, G, np.where(np.arange(m) == 2, np.nan, h))
    G3 = G.copy()
    G3[5] = 0.0
    h3 = h.copy()
    h3[5] = -1.0
    samples[3] = (P, q, A, b, G3, h3)
    for k in (0, 4):
        samples[k] = (P, q + k, A, b, G, h)
    batch = make_batch(samples)
    out = pdipm.solve_batch(batch)
    assert out.status[1] == Status.INFEASIBLE
    assert out.status[2] == Status.NUMERICAL_ERROR and "NaN" in out.info[2].raw_status
    assert out.status[3] == Status.INFEASIBLE and "zero row" in out.info[3].raw_status
    for k in (0, 4):
        assert distance(out.sample(k), ref.solve(*batch.sample(k))) <= DIST
    assert np.isnan(out.primal[1]).all()


# -- (d) dtypes, devices, settings, sizes ----------------------------------------------------


def tensor_batch(batch: ProblemBatch, dtype, device="cpu") -> ProblemBatch:
    def t(v):
        return None if v is None else torch.as_tensor(v, dtype=dtype, device=device)

    return ProblemBatch(
        batch.batch,
        batch.P,
        t(batch.P_values),
        t(batch.q),
        batch.A,
        t(batch.A_values),
        t(batch.b),
        batch.G,
        t(batch.G_values),
        t(batch.h),
        batch.dims,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensors_in_tensors_out(pdipm, ref, dtype):
    rng = np.random.default_rng(12)
    samples = [random_problem(rng, 10, 12, 2, density=0.6) for _ in range(4)]
    batch = make_batch(samples, shared=("P",))
    out = pdipm.solve_batch(tensor_batch(batch, dtype), torch.zeros(4, 10, dtype=dtype))
    for name in ("primal", "eq_dual", "ineq_dual", "slack"):
        v = getattr(out, name)
        assert isinstance(v, torch.Tensor) and v.dtype == dtype and v.device.type == "cpu"
    tol = DIST if dtype == torch.float64 else FLOAT32_DIST
    for k in range(4):
        sol = out.sample(k)
        assert distance(sol, ref.solve(*batch.sample(k))) <= tol
        want = 1e-9 if dtype == torch.float64 else 1e-5
        assert sol.info.accuracy <= want


def test_float16_and_mixed_dtypes_refused(pdipm):
    rng = np.random.default_rng(13)
    batch = make_batch([random_problem(rng, 4, 3, 0)])
    with pytest.raises(InvalidParameterError, match="float16"):
        pdipm.solve_batch(tensor_batch(batch, torch.float16))
    mixed = tensor_batch(batch, torch.float32)
    mixed.q = mixed.q.double()
    with pytest.raises(InvalidParameterError, match="one device and one dtype"):
        pdipm.solve_batch(mixed)


def test_settings(ref):
    backend = get_backend("pdipm:tol=1e-10,max_iter=50,refine=2,time_limit=5")
    assert backend.settings == {"tol": 1e-10, "max_iter": 50, "refine": 2, "time_limit": 5}
    for spec, word in [
        ("pdipm:tolerance=1e-9", "unknown setting"),
        ("pdipm:tol=-1", "tol"),
        ("pdipm:tol=abc", "tol"),
        ("pdipm:max_iter=0", "max_iter"),
        ("pdipm:max_iter=2.5", "max_iter"),
        ("pdipm:refine=true", "refine"),
        ("pdipm:max_memory_gb=0", "max_memory_gb"),
    ]:
        with pytest.raises(ConfigError, match=word):
            get_backend(spec)
    rng = np.random.default_rng(14)
    prob = protocol(*random_problem(rng, 15, 20, 2))
    assert get_backend("pdipm:max_iter=2").solve(*prob).status == Status.ITERATION_LIMIT
    loose = get_backend("pdipm:tol=1e-4").solve(*prob)
    tight = get_backend("pdipm:tol=1e-11").solve(*prob)
    assert loose.info.accuracy <= 1e-4 and tight.info.accuracy <= 1e-11
    assert loose.info.iterations < tight.info.iterations
    for spec in ("pdipm:equilibrate_iter=0", "pdipm:refine=0"):  # the options switch off
        assert get_backend(spec).solve(*prob).status.has_solution
    assert get_backend("pdipm").with_settings(time_limit=1e-9).solve(*prob).status in (
        Status.TIME_LIMIT,
        Status.OPTIMAL_INACCURATE,
    )


def test_oversized_batches_and_other_cones_refused(pdipm):
    n = 20000
    batch = ProblemBatch(
        100,
        None,
        None,
        np.zeros((100, n)),
        SparsePattern.of(sp.csc_matrix((0, n))),
        np.zeros((1, 0)),
        np.zeros((1, 0)),
        SparsePattern.of(sp.eye(n, format="csc")),
        np.ones((1, n)),
        np.ones((1, n)),
        ConeDims(nonneg=n),
    )
    with pytest.raises(SolverError, match="max_memory_gb"):
        pdipm.solve_batch(batch)  # the dense data alone: 3 x 3.2 GB
    # data that fit, factorisations that do not: a dense shared P, a batch of 50
    n, B = 1000, 50
    dense = SparsePattern.of(sp.csc_matrix(np.ones((n, n))))
    batch = ProblemBatch(
        B,
        dense,
        np.full((1, dense.nnz), 1e-3) + np.eye(n)[dense.indices, dense.cols][None],
        np.zeros((B, n)),
        SparsePattern.of(sp.csc_matrix((0, n))),
        np.zeros((1, 0)),
        np.zeros((1, 0)),
        SparsePattern.of(sp.eye(n, format="csc")),
        np.ones((1, n)),
        np.ones((1, n)),
        ConeDims(nonneg=n),
    )
    with pytest.raises(SolverError, match="KKT matrices of a batch of 50.*max_memory_gb=1"):
        get_backend("pdipm:max_memory_gb=1").solve_batch(batch)
    g = Objective(None, np.ones(3))
    h = ConeConstraints(sp.csc_matrix(-np.eye(3)), np.zeros(3), ConeDims(soc=(3,)))
    with pytest.raises(SolverError, match="zero and nonnegative"):
        pdipm.solve(g, h, Equalities(sp.csc_matrix((0, 3)), np.zeros(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_results_stay_on_the_device(pdipm, ref, dtype):
    rng = np.random.default_rng(15)
    samples = [random_problem(rng, 12, 16, 3, density=0.5) for _ in range(6)]
    batch = make_batch(samples, shared=("G",))
    out = pdipm.solve_batch(tensor_batch(batch, dtype, "cuda"))
    for name in ("primal", "eq_dual", "ineq_dual", "slack"):
        v = getattr(out, name)
        assert v.device.type == "cuda" and v.dtype == dtype
    tol = DIST if dtype == torch.float64 else FLOAT32_DIST
    for k in range(6):
        assert distance(out.sample(k), ref.solve(*batch.sample(k))) <= tol


# -- (e) through the layers ------------------------------------------------------------------


def qp_layer_data(rng, batch, n=8, m=10, p=2):
    P, q, A, b, G, h = random_problem(rng, n, m, p)
    Q = torch.tensor(P, requires_grad=True)
    qs = torch.tensor(q + 0.3 * rng.standard_normal((batch, n)), requires_grad=True)
    Gt = torch.tensor(G, requires_grad=True)
    ht = torch.tensor(h, requires_grad=True)
    At = torch.tensor(A, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    return [Q, qs, Gt, ht, At, bt]


def layer_grads(layer, inputs, weight):
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = layer(*xs)
    (y * weight).sum().backward()
    return y.detach(), [x.grad for x in xs]


def test_qp_layer_forward_and_gradients(ref):
    rng = np.random.default_rng(16)
    inputs = qp_layer_data(rng, batch=3)
    weight = torch.tensor(rng.standard_normal((3, 8)))
    y, grads = layer_grads(FFOQPLayer(solver="pdipm"), inputs, weight)
    y_ref, grads_ref = layer_grads(FFOQPLayer(solver=REF, backward="kkt"), inputs, weight)
    assert rel(y, y_ref) <= DIST
    for g, r in zip(grads, grads_ref):
        cos = float((g * r).sum() / (g.norm() * r.norm()))
        assert cos >= 0.999999 and rel(g, r) <= GRAD_REL, (cos, rel(g, r))
    # and the exact KKT gradient through pdipm's own solution
    _, grads_kkt = layer_grads(FFOQPLayer(solver="pdipm", backward="kkt"), inputs, weight)
    for g, r in zip(grads_kkt, grads_ref):
        assert rel(g, r) <= GRAD_REL


def test_qp_layer_finite_differences():
    """d(w'y)/dq and d(w'y)/dh by central differences of pdipm solves (tol 1e-11)."""
    rng = np.random.default_rng(17)
    inputs = qp_layer_data(rng, batch=1)
    weight = torch.tensor(rng.standard_normal((1, 8)))
    tight = FFOQPLayer(solver="pdipm:tol=1e-11")
    _, grads = layer_grads(FFOQPLayer(solver="pdipm"), inputs, weight)
    eps = 1e-6
    for slot in (1, 3):
        fd = torch.zeros_like(inputs[slot])
        flat = fd.view(-1)
        for j in range(flat.numel()):
            vals = []
            for sign in (1, -1):
                xs = [t.detach().clone() for t in inputs]
                xs[slot].view(-1)[j] += sign * eps
                vals.append(float((tight(*xs) * weight).sum()))
            flat[j] = (vals[0] - vals[1]) / (2 * eps)
        assert rel(grads[slot], fd) <= GRAD_REL, slot


def test_ffolayer_with_pdipm(ref):
    cp = pytest.importorskip("cvxpy")
    from ffo_core import FFOLayer

    n, m = 6, 8
    rng = np.random.default_rng(18)
    G0 = rng.standard_normal((m, n))
    q_p, h_p = cp.Parameter(n), cp.Parameter(m)
    y = cp.Variable(n)
    prob = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(y) + q_p @ y), [G0 @ y <= h_p, cp.sum(y) == 1]
    )
    q = torch.tensor(rng.standard_normal((2, n)), requires_grad=True)
    h = torch.tensor(np.abs(rng.standard_normal(m)) * 0.2, requires_grad=True)
    outs = {}
    for name, kw in [("pdipm", {"solver": "pdipm"}), ("ref", {"solver": REF, "backward": "kkt"})]:
        layer = FFOLayer(prob, [q_p, h_p], [y], **kw)
        qq, hh = q.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
        (sol,) = layer(qq, hh)
        (sol * torch.arange(n)).sum().backward()
        outs[name] = (sol.detach(), qq.grad, hh.grad)
    assert rel(outs["pdipm"][0], outs["ref"][0]) <= DIST
    for g, r in zip(outs["pdipm"][1:], outs["ref"][1:]):
        assert rel(g, r) <= GRAD_REL


# -- (f) the conformance suite -----------------------------------------------------------------


@pytest.mark.slow
def test_conformance_at_defaults():
    from ffo_conformance import run_suite

    report = run_suite("pdipm")
    assert report.passed, report.text()
    assert report.count("pass") >= 80
    assert math.isfinite(report.count("fail")) and report.count("fail") == 0
