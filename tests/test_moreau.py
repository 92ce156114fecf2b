"""The ``moreau`` backend: conventions against Clarabel, batches, statuses, caches, layers.

Every comparison is against an independent solve: Clarabel at tolerance 1e-12 (``CLARABEL``),
a closed form, or the problem rebuilt without its absent rows.  Tolerances: LP/QP points
1e-6 against Clarabel at 1e-12 (measured <= 2e-7); SOC/EXP/PSD points 1e-4 against Clarabel
at 1e-10, with Moreau's IPM at 1e-9 (an interior-point point on a curved cone is only
~sqrt(tolerance) from the boundary, the reference's too; measured <= 2.5e-5).

Two defects found in cvxpylayers 1.2's Moreau path are pinned here, through the backend and
through both layers: a ``z >= 0`` constraint silently dropped, and a second layer on the
same problem solving a scrambled problem.
"""

from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp

from benchmarks.moreau import sudoku_rows
from ffo_backends.clarabel import ClarabelBackend
from ffo_backends.moreau import MoreauBackend, moreau_row_order
from ffo_core import ConfigError, get_backend
from ffo_core.errors import BackendUnavailable
from ffo_core.protocol import (
    ConeConstraints,
    ConeDims,
    Equalities,
    Objective,
    ProblemBatch,
    SparsePattern,
    Status,
)

pytestmark = pytest.mark.skipif(
    not MoreauBackend.availability()[0],
    reason=f"moreau is not importable here: {MoreauBackend.availability()[1]}",
)

CLARABEL = ClarabelBackend(
    tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10, max_iter=500
)
#: on SOC/EXP/PSD Clarabel stops at AlmostSolved at 1e-12; at 1e-10 it reaches Solved
CLARABEL_CONE = ClarabelBackend(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
TIGHT_IPM = dict(solver="ipm", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
#: on SOC/EXP/PSD Moreau stops at AlmostSolved below 1e-9
TIGHT_CONE = dict(solver="ipm", tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9)
METHODS = ("ipm", "active_set", "auto")
SQRT2 = np.sqrt(2.0)


# -- problem builders -----------------------------------------------------------------------------
def svec(S: np.ndarray) -> np.ndarray:
    """The protocol's PSD layout: upper triangle by columns, off-diagonals times sqrt(2)."""
    k = S.shape[0]
    return np.array([S[i, j] * (1.0 if i == j else SQRT2) for j in range(k) for i in range(j + 1)])


def interior_slack(rng, dims: ConeDims) -> np.ndarray:
    """A slack in K: nonneg rows half zero, SOC/EXP/PSD blocks strictly inside."""
    parts = [np.where(np.arange(dims.nonneg) % 2 == 0, 0.0, rng.uniform(0.5, 1.5, dims.nonneg))]
    for d in dims.soc:
        x = rng.standard_normal(d - 1)
        parts.append(np.r_[np.linalg.norm(x) + 0.5, x])
    parts += [np.array([-1.0, 1.0, 1.0])] * dims.exp
    for k in dims.psd:
        M = rng.standard_normal((k, k))
        parts.append(svec(M @ M.T + np.eye(k)))
    return np.concatenate(parts) if parts else np.zeros(0)


def random_pattern(rng, rows: int, cols: int, density: float = 0.6) -> SparsePattern:
    M = rng.random((rows, cols)) < density
    for i in np.flatnonzero(~M.any(axis=1)):
        M[i, rng.integers(cols)] = True
    return SparsePattern.of(sp.csc_matrix(M.astype(float)))


def random_batch(
    rng,
    batch: int,
    n: int,
    p: int,
    dims: ConeDims,
    *,
    lp: bool = False,
    shared: tuple[str, ...] = (),
    P_pattern: SparsePattern | None = None,
    A: SparsePattern | None = None,
    G: SparsePattern | None = None,
) -> ProblemBatch:
    """Feasible, bounded problems (``P`` positive definite; ``lp``: ``1e-2 I``) sharing one
    structure; the fields named in ``shared`` have a leading dimension 1."""
    A = A or random_pattern(rng, p, n)
    G = G or random_pattern(rng, dims.rows, n)
    Ppat = P_pattern or SparsePattern.of(sp.csc_matrix(np.ones((n, n))))
    k = {f: 1 if f in shared else batch for f in ("P", "q", "A", "b", "G", "h")}
    Pv = []
    for _ in range(k["P"]):
        if lp:
            M = 1e-2 * np.eye(n)
        else:
            F = rng.standard_normal((n, n)) / np.sqrt(n)
            M = F.T @ F + 0.1 * np.eye(n)
        Pv.append(M[Ppat.indices, Ppat.cols])
    Av = rng.standard_normal((k["A"], A.nnz))
    Gv = rng.standard_normal((k["G"], G.nnz))
    kk = max(k["A"], k["G"], k["b"], k["h"])
    y0 = rng.standard_normal((kk, n))
    b = np.stack([A.matrix(Av[i % k["A"]]) @ y0[i] for i in range(kk)])[: k["b"]]
    h = np.stack([G.matrix(Gv[i % k["G"]]) @ y0[i] + interior_slack(rng, dims) for i in range(kk)])
    return ProblemBatch(
        batch,
        Ppat,
        np.array(Pv),
        rng.standard_normal((k["q"], n)),
        A,
        Av,
        b,
        G,
        Gv,
        h[: k["h"]],
        dims,
    )


def close(a, b, tol: float) -> bool:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0)) <= tol


def assert_same(sol, ref, tol: float, what: str = "") -> None:
    assert sol.status == Status.OPTIMAL, (what, sol.status, sol.info)
    assert ref.status == Status.OPTIMAL, (what, ref.status)
    for field in ("primal", "eq_dual", "ineq_dual", "slack"):
        got, want = getattr(sol, field), getattr(ref, field)
        err = float(np.max(np.abs(got - want), initial=0.0))
        assert err <= tol, f"{what} {field}: {err:.2e} > {tol:.0e}"


CONE_CASES = {
    "lp": (ConeDims(nonneg=6), True),
    "qp": (ConeDims(nonneg=6), False),
    "soc": (ConeDims(nonneg=2, soc=(3, 1, 4)), False),
    "exp": (ConeDims(nonneg=1, exp=2), False),
    "psd": (ConeDims(nonneg=1, psd=(3, 2)), False),
    "exp+psd": (ConeDims(nonneg=2, soc=(3,), exp=1, psd=(3,)), False),
}


# -- registry, settings, availability -------------------------------------------------------------
def test_registered_with_its_capabilities():
    be = get_backend("moreau")
    assert isinstance(be, MoreauBackend)
    assert be.capabilities.cones == {"zero", "nonneg", "soc", "exp", "psd"}
    assert be.capabilities.quadratic_objective and not be.capabilities.device


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "moreau" else real(name, *a)
    )
    ok, reason = MoreauBackend.availability()
    assert not ok and "pip install ffo[moreau]" in reason


def test_settings_are_moreaus_names_and_are_checked_at_construction():
    be = get_backend("moreau:solver=active_set,max_iter=300,primal_tol=1e-10,tol_feas=1e-9")
    assert be._top["solver"] == "active_set" and be._top["max_iter"] == 300
    assert be._active == {"primal_tol": 1e-10} and be._ipm == {"tol_feas": 1e-9}
    bad = [
        ("moreau:method=ipm", "method"),  # not a Moreau setting
        ("moreau:enable_grad=true", "enable_grad"),  # Moreau's own gradients: not offered
        ("moreau:auto_tune=true", "auto_tune"),  # timing-dependent answers: not offered
        ("moreau:yolo=true", "yolo"),  # no convergence check: not offered
        ("moreau:solver=simplex", "simplex"),
        ("moreau:max_iter=0", "max_iter"),
        ("moreau:tol_feas=-1", "tol_feas"),
        ("moreau:direct_solve_method=lu", "direct_solve_method"),
        ("moreau:iter_limit=0", "iter_limit"),
        ("moreau:device=tpu", "device"),
        ("moreau:verify_tol=0", "verify_tol"),
        ("moreau:cache_size=-1", "cache_size"),
    ]
    for spec, word in bad:
        with pytest.raises(ConfigError, match=word):
            get_backend(spec)


def test_cuda_device_without_the_cuda_build_is_a_config_error():
    import moreau

    if moreau.device_available("cuda"):
        pytest.skip("Moreau's CUDA build is installed here")
    with pytest.raises(ConfigError, match="CUDA build"):
        get_backend("moreau:device=cuda")
    with pytest.raises(BackendUnavailable):
        get_backend("moreau_typo")


def test_with_settings_sets_the_time_limit():
    be = MoreauBackend().with_settings(time_limit=5)
    assert be._top["time_limit"] == 5


# -- conventions: one problem against Clarabel ----------------------------------------------------
def test_row_order_puts_psd_before_exp_and_soc1_with_the_nonneg_rows():
    dims = ConeDims(nonneg=2, soc=(3, 1), exp=1, psd=(2,))
    perm, cones = moreau_row_order(dims)
    # protocol rows: nonneg 0-1, SOC(3) 2-4, SOC(1) 5, EXP 6-8, PSD 9-11
    assert perm.tolist() == [0, 1, 5, 2, 3, 4, 9, 10, 11, 6, 7, 8]
    assert cones == {
        "num_nonneg_cones": 3,
        "so_cone_dims": [3],
        "psd_dims": [2],
        "num_exp_cones": 1,
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CONE_CASES))
def test_solve_matches_clarabel(case, method):
    dims, lp = CONE_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    pb = random_batch(rng, 1, 7, 2, dims, lp=lp)
    g, h, e = pb.sample(0)
    curved = dims.kinds - {"nonneg"}
    settings = {**(TIGHT_CONE if curved else TIGHT_IPM), "solver": method}
    sol = MoreauBackend(**settings).solve(g, h, e)
    ref = (CLARABEL_CONE if curved else CLARABEL).solve(g, h, e)
    assert_same(sol, ref, 1e-4 if curved else 1e-6, case)
    expected = "ipm" if curved or method == "ipm" else "active_set"
    assert sol.info.extra["method"] == expected
    assert sol.info.raw_status == "Solved" and sol.info.iterations >= 0
    assert 0 <= sol.info.accuracy < (1e-4 if curved else 1e-7)


def test_default_settings_meet_the_lp_qp_tolerance():
    rng = np.random.default_rng(5)
    for lp in (True, False):
        g, h, e = random_batch(rng, 1, 8, 3, ConeDims(nonneg=8), lp=lp).sample(0)
        assert_same(MoreauBackend().solve(g, h, e), CLARABEL.solve(g, h, e), 1e-6)


def test_auto_sends_a_singular_P_to_the_ipm():
    """CVXPY's ``sum_squares(F @ y)`` puts ``1/2 t't`` on auxiliary variables: a ``P`` with
    zero diagonal entries, on which the active set is only ~1e-7 accurate."""
    rng = np.random.default_rng(4)
    g, h, e = random_batch(rng, 1, 6, 2, ConeDims(nonneg=6)).sample(0)
    P = g.P.toarray()
    P[0, :] = P[:, 0] = 0.0
    g = Objective(sp.csc_matrix(P), g.q)
    h = ConeConstraints(h.G, h.h, h.dims)
    ref = CLARABEL.solve(g, h, e)
    auto = MoreauBackend().solve(g, h, e)
    assert auto.info.extra["method"] == "ipm"
    assert_same(auto, ref, 1e-6)
    forced = MoreauBackend(solver="active_set").solve(g, h, e)
    assert forced.info.extra["method"] in ("active_set", "ipm")  # ipm when the check fails
    assert forced.info.accuracy <= 1e-6 and close(forced.primal, ref.primal, 1e-5)


def test_extra_linear_term_and_no_equalities_and_no_rows():
    rng = np.random.default_rng(6)
    g, h, e = random_batch(rng, 1, 6, 0, ConeDims(nonneg=5)).sample(0)
    c = rng.standard_normal(6)
    for method in METHODS:
        be = MoreauBackend(solver=method)
        assert_same(be.solve(g, h, e, c), CLARABEL.solve(g, h, e, c), 1e-6, method)
    # no constraint rows at all: y = -P^-1 q (the active set is never given such a problem:
    # Moreau 0.4.1's crashes the process on one)
    empty = ConeConstraints(sp.csc_matrix((0, 6)), np.zeros(0), ConeDims())
    none = Equalities(sp.csc_matrix((0, 6)), np.zeros(0))
    for method in METHODS:
        sol = MoreauBackend(solver=method).solve(g, empty, none)
        assert sol.info.extra["method"] == "ipm"
        assert close(sol.primal, -np.linalg.solve(g.P.toarray(), g.q), 1e-8)


# -- defect (a): a z >= 0 constraint must never be dropped ----------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_nonneg_only_rows_are_kept(method):
    """``min 0.05||z||^2 - p'z  s.t.  z >= 0`` (only nonnegative rows, no equality, no other
    cone: the zero-size blocks): the unconstrained optimum ``10 p`` violates ``z >= 0``, the
    answer is ``max(10 p, 0)``, and the multiplier of each row is ``max(-p, 0)``."""
    n = 6
    p = np.array([1.0, -1.0, 2.0, -2.0, 0.5, -0.5])
    g = Objective(sp.csc_matrix(0.1 * np.eye(n)), -p)
    h = ConeConstraints(sp.csc_matrix(-np.eye(n)), np.zeros(n), ConeDims(nonneg=n))
    e = Equalities(sp.csc_matrix((0, n)), np.zeros(0))
    be = MoreauBackend(solver=method)
    sol = be.solve(g, h, e)
    assert close(sol.primal, np.maximum(10 * p, 0), 1e-7)
    assert close(sol.ineq_dual, np.maximum(-p, 0), 1e-7)
    # the same through solve_batch, p per sample, everything else shared
    P = np.stack([p, -p, np.abs(p)])
    pb = ProblemBatch(
        3,
        SparsePattern.of(sp.identity(n, format="csc")),
        np.full((1, n), 0.1),
        -P,
        SparsePattern.of(sp.csc_matrix((0, n))),
        np.zeros((1, 0)),
        np.zeros((1, 0)),
        SparsePattern.of(sp.csc_matrix(-np.eye(n))),
        -np.ones((1, n)),
        np.zeros((1, n)),
        ConeDims(nonneg=n),
    )
    out = be.solve_batch(pb)
    assert close(out.primal, np.maximum(10 * P, 0), 1e-7)


# -- batches --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shared", [(), ("P", "A", "G"), ("P", "A", "b", "G", "h"), ("A",)])
def test_batch_matches_clarabel_and_solve(method, shared):
    rng = np.random.default_rng(7)
    pb = random_batch(rng, 5, 8, 3, ConeDims(nonneg=9), shared=shared)
    c = rng.standard_normal((5, 8))
    be = MoreauBackend(**{**TIGHT_IPM, "solver": method})
    out = be.solve_batch(pb, c)
    for k in range(5):
        g, h, e = pb.sample(k)
        assert_same(out.sample(k), CLARABEL.solve(g, h, e, c[k]), 1e-6, f"sample {k}")
        assert_same(out.sample(k), be.solve(g, h, e, c[k]), 1e-6, f"solve {k}")
        assert out.info[k].extra["method"] == ("ipm" if method == "ipm" else "active_set")
        assert out.info[k].extra["batch_solve_time"] >= 0


@pytest.mark.parametrize("case", ["soc", "exp", "psd", "exp+psd"])
def test_batch_of_cone_programs_matches_clarabel(case):
    dims, _ = CONE_CASES[case]
    rng = np.random.default_rng(8)
    pb = random_batch(rng, 3, 7, 1, dims, shared=("P",))
    out = MoreauBackend(**TIGHT_CONE).solve_batch(pb)
    for k in range(3):
        assert_same(out.sample(k), CLARABEL_CONE.solve(*pb.sample(k)), 1e-4, f"{case} {k}")


@pytest.mark.parametrize("method", METHODS)
def test_equality_only_batch_is_the_kkt_solution(method):
    """The engine's batched ghost problems: ``min 1/2 y'Py + q'y  s.t.  A y = b``."""
    rng = np.random.default_rng(9)
    pb = random_batch(rng, 4, 9, 4, ConeDims(), shared=("P",))
    out = MoreauBackend(solver=method).solve_batch(pb)
    for k in range(4):
        g, _, e = pb.sample(k)
        K = np.block([[g.P.toarray(), e.A.T.toarray()], [e.A.toarray(), np.zeros((4, 4))]])
        yn = np.linalg.solve(K, np.r_[-g.q, e.b])
        assert close(out.primal[k], yn[:9], 1e-9) and close(out.eq_dual[k], yn[9:], 1e-8)
        assert out.info[k].extra["method"] == ("ipm" if method == "ipm" else "active_set")


@pytest.mark.parametrize("method", METHODS)
def test_absent_rows_are_solved_as_the_problem_without_them(method):
    """Rows of ``A`` and of the nonnegative block that are all zero in some samples (with
    ``b_i = 0``, ``h_i >= 0``): each sample equals the problem with those rows removed."""
    rng = np.random.default_rng(10)
    n, p, m = 8, 3, 7
    pb = random_batch(rng, 3, n, p, ConeDims(nonneg=m), shared=("P",))
    absent_eq = {0: [1], 1: [0, 2], 2: []}
    absent_nn = {0: [0, 3], 1: [], 2: [1, 2, 5, 6]}
    A_rows, G_rows = pb.A.indices, pb.G.indices
    for k in range(3):
        pb.A_values[k, np.isin(A_rows, absent_eq[k])] = 0.0
        pb.b[k, absent_eq[k]] = 0.0
        pb.G_values[k, np.isin(G_rows, absent_nn[k])] = 0.0
        pb.h[k, absent_nn[k]] = np.abs(pb.h[k, absent_nn[k]])
    out = MoreauBackend(solver=method).solve_batch(pb)
    for k in range(3):
        g, h, e = pb.sample(k)
        keep_e = np.setdiff1d(np.arange(p), absent_eq[k])
        keep_g = np.setdiff1d(np.arange(m), absent_nn[k])
        ref = CLARABEL.solve(
            g,
            ConeConstraints(h.G[keep_g], h.h[keep_g], ConeDims(nonneg=keep_g.size)),
            Equalities(e.A[keep_e], e.b[keep_e]),
        )
        sol = out.sample(k)
        assert sol.status == Status.OPTIMAL
        assert close(sol.primal, ref.primal, 1e-6)
        assert close(sol.eq_dual[keep_e], ref.eq_dual, 1e-6)
        assert close(sol.ineq_dual[keep_g], ref.ineq_dual, 1e-6)
        assert close(sol.ineq_dual[absent_nn[k]], 0.0, 1e-6)


# -- defect (b): structures, entry orders and caches ----------------------------------------------
def test_structures_in_a_row_on_one_instance_never_share_a_compiled_solver():
    """Three structures of the same sizes and nnz -- two patterns, and the first pattern with
    its entries in another order (rows reversed within each column, values to match) --
    solved in turn by one instance: each answer is Clarabel's, and the first structure's
    answer is bit-for-bit what it was."""
    rng = np.random.default_rng(11)
    n, p, m = 8, 2, 8
    dims = ConeDims(nonneg=m)
    A = random_pattern(rng, p, n)
    G1 = random_pattern(rng, m, n, 0.5)
    G2 = SparsePattern.of(sp.csc_matrix(np.flipud(G1.matrix(np.ones(G1.nnz)).toarray())))
    X = random_batch(rng, 4, n, p, dims, A=A, G=G1)
    Y = random_batch(rng, 4, n, p, dims, A=A, G=G2)
    assert G1.nnz == G2.nnz and not np.array_equal(G1.indices, G2.indices)
    # X again, with each column's entries stored in reverse order (a non-canonical pattern)
    order = np.concatenate(
        [np.arange(G1.indptr[j], G1.indptr[j + 1])[::-1] for j in range(n)]
    ).astype(np.int64)
    G1r = SparsePattern(G1.shape, G1.indices[order], G1.indptr, G1.cols[order])
    Xr = ProblemBatch(**{**X.__dict__, "G": G1r, "G_values": X.G_values[:, order]})
    for method in ("ipm", "active_set"):
        be = MoreauBackend(solver=method)
        first = be.solve_batch(X)
        for pb in (Y, Xr, X):
            out = be.solve_batch(pb)
            for k in range(4):
                assert_same(out.sample(k), CLARABEL.solve(*pb.sample(k)), 1e-6, method)
        assert np.array_equal(out.primal, first.primal)
        assert np.array_equal(out.ineq_dual, first.ineq_dual)


def test_duplicate_entries_and_a_one_sided_P_pattern():
    """Patterns outside the canonical case: ``G`` with an entry stored twice (values add,
    as in scipy) and ``P`` with a stored zero in its upper triangle only."""
    rng = np.random.default_rng(22)
    n, m = 5, 6
    pb = random_batch(rng, 3, n, 1, ConeDims(nonneg=m), shared=("P",))
    # G: repeat the first stored entry, splitting its value in two
    G = pb.G
    dup = SparsePattern(
        G.shape,
        np.r_[G.indices[:1], G.indices],
        G.indptr + np.r_[0, np.ones(n, dtype=np.int64)],
        np.r_[G.cols[:1], G.cols],
    )
    Gv = np.c_[0.5 * pb.G_values[:, :1], pb.G_values]
    Gv[:, 1] *= 0.5
    # P: diagonal, plus (0, 1) stored as an explicit zero, (1, 0) not stored
    Pm = sp.csc_matrix(np.diag(rng.uniform(1.0, 2.0, n)))
    rows, cols = np.r_[Pm.indices, 0], np.r_[np.arange(n), 1]
    Pvals = np.r_[Pm.data, 0.0]
    order = np.lexsort((rows, cols))
    Ppat = SparsePattern.from_rows_cols(rows[order], cols[order], (n, n))
    odd = ProblemBatch(**{**pb.__dict__, "G": dup, "G_values": Gv, "P": Ppat})
    odd.P_values = Pvals[order][None, :]
    for method in METHODS:
        out = MoreauBackend(**{**TIGHT_IPM, "solver": method}).solve_batch(odd)
        for k in range(3):
            assert_same(out.sample(k), CLARABEL.solve(*odd.sample(k)), 1e-6, method)


@pytest.mark.parametrize("method", ["ipm", "active_set"])
def test_answers_do_not_depend_on_what_ran_before(method):
    rng = np.random.default_rng(12)
    X = random_batch(rng, 6, 8, 2, ConeDims(nonneg=8), shared=("P", "A", "G"))
    Y = random_batch(rng, 6, 8, 2, ConeDims(nonneg=8), shared=("P", "A", "G"))
    Y = ProblemBatch(**{**Y.__dict__, "A": X.A, "G": X.G})  # X's structure, Y's values
    Y.A_values, Y.G_values = X.A_values * 1.5, X.G_values * 0.5
    fresh = MoreauBackend(solver=method, cache_size=0).solve_batch(X)
    be = MoreauBackend(solver=method)
    first = be.solve_batch(X)
    be.solve_batch(Y)
    again = be.solve_batch(X)
    for out in (first, again):
        for f in ("primal", "eq_dual", "ineq_dual", "slack"):
            assert np.array_equal(getattr(out, f), getattr(fresh, f)), f


def test_threads_share_an_instance_but_not_its_compiled_solvers():
    rng = np.random.default_rng(13)
    batches = [random_batch(rng, 4, 8, 2, ConeDims(nonneg=8)) for _ in range(4)]
    be = MoreauBackend(solver="ipm")
    sequential = [be.solve_batch(pb).primal for pb in batches]
    barrier = threading.Barrier(4)

    def job(i):
        barrier.wait()
        return [be.solve_batch(batches[(i + j) % 4]).primal for j in range(4)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, range(4)))
    for i, res in enumerate(results):
        for j, primal in enumerate(res):
            assert np.array_equal(primal, sequential[(i + j) % 4])


# -- statuses and the active-set check ------------------------------------------------------------
def _infeasible(n=5):
    g = Objective(sp.csc_matrix(np.eye(n)), np.ones(n))
    G = sp.csc_matrix(np.vstack([np.ones((1, n)), -np.ones((1, n))]))
    return g, ConeConstraints(G, np.array([-1.0, -1.0]), ConeDims(nonneg=2)), _no_eq(n)


def _unbounded(n=5, quadratic=True):
    P = sp.csc_matrix(np.diag([1.0, 1.0] + [0.0] * (n - 2))) if quadratic else None
    g = Objective(P, -np.ones(n))
    h = ConeConstraints(sp.csc_matrix(-np.eye(n)), np.zeros(n), ConeDims(nonneg=n))
    return g, h, _no_eq(n)


def _no_eq(n):
    return Equalities(sp.csc_matrix((0, n)), np.zeros(0))


@pytest.mark.parametrize("method", METHODS)
def test_infeasible_and_unbounded_statuses(method):
    """Moreau 0.4.1's active set reports ``Solved`` with ``x = 1e6`` on these unbounded
    problems: the adapter's check sends them to the IPM, which says DualInfeasible."""
    be = MoreauBackend(solver=method)
    assert be.solve(*_infeasible()).status == Status.INFEASIBLE
    for quadratic in (True, False):
        sol = be.solve(*_unbounded(quadratic=quadratic))
        assert sol.status == Status.UNBOUNDED and sol.primal is None
        assert sol.info.raw_status == "DualInfeasible" and sol.info.extra["method"] == "ipm"


def test_a_batch_reports_each_samples_status():
    n = 5
    g, h, e = _unbounded(n)
    q = np.stack([-np.ones(n), np.ones(n), -np.ones(n)])  # sample 1 bounded: y = 0
    pb = ProblemBatch(
        3,
        SparsePattern.of(g.P),
        g.P.data[None],
        q,
        SparsePattern.of(e.A),
        np.zeros((1, 0)),
        np.zeros((1, 0)),
        SparsePattern.of(h.G),
        h.G.data[None],
        np.zeros((1, n)),
        h.dims,
    )
    for method in ("active_set", "ipm"):
        out = MoreauBackend(solver=method).solve_batch(pb)
        assert out.status == [Status.UNBOUNDED, Status.OPTIMAL, Status.UNBOUNDED]
        assert close(out.sample(1).primal, 0.0, 1e-7)
        assert out.info[1].extra["method"] == method


def test_active_set_answers_above_verify_tol_are_solved_again_by_the_ipm():
    rng = np.random.default_rng(14)
    pb = random_batch(rng, 3, 8, 2, ConeDims(nonneg=8))
    plain = MoreauBackend(solver="active_set").solve_batch(pb)
    assert all(i.extra["method"] == "active_set" for i in plain.info)
    strict = MoreauBackend(solver="active_set", verify_tol=1e-300).solve_batch(pb)
    assert all(i.extra["method"] == "ipm" for i in strict.info)
    for k in range(3):
        assert_same(strict.sample(k), CLARABEL.solve(*pb.sample(k)), 1e-6)


def test_an_ipm_breakdown_on_a_qp_is_tried_by_the_active_set():
    """A Sudoku QP on which Moreau 0.4.1's IPM stops at InsufficientProgress (1 of the
    benchmark's 1024 samples): the active set's answer passes the check and is reported."""
    n = 64
    p = np.random.default_rng(0).random((1024, n))[1020]
    g = Objective(sp.csc_matrix(0.1 * np.eye(n)), -p)
    h = ConeConstraints(sp.csc_matrix(-np.eye(n)), np.zeros(n), ConeDims(nonneg=n))
    e = Equalities(sp.csc_matrix(sudoku_rows()), np.ones(40))
    sol = MoreauBackend(solver="ipm").solve(g, h, e)
    assert sol.info.extra["first_try"].startswith("ipm InsufficientProgress")
    assert sol.info.extra["method"] == "active_set" and sol.status == Status.OPTIMAL
    # the Sudoku QP is degenerate (more active rows than variables): its duals are not
    # unique, so the point is compared, and the duals through the KKT residual
    assert close(sol.primal, CLARABEL.solve(g, h, e).primal, 1e-6)
    assert sol.info.accuracy < 1e-9


def test_iteration_limit_is_reported_not_an_optimum():
    rng = np.random.default_rng(15)
    g, h, e = random_batch(rng, 1, 8, 2, ConeDims(nonneg=8, soc=(3,))).sample(0)
    sol = MoreauBackend(max_iter=1).solve(g, h, e)
    assert sol.status == Status.ITERATION_LIMIT and sol.primal is None


# -- torch tensors and devices --------------------------------------------------------------------
def test_torch_tensors_come_back_as_tensors_of_their_dtype():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    pb = random_batch(rng, 3, 6, 2, ConeDims(nonneg=6), shared=("P", "G"))
    ref = MoreauBackend().solve_batch(pb)
    fields = ("P_values", "q", "A_values", "b", "G_values", "h")
    as_t = ProblemBatch(**{**pb.__dict__, **{f: torch.tensor(getattr(pb, f)) for f in fields}})
    out = MoreauBackend().solve_batch(as_t)
    assert isinstance(out.primal, torch.Tensor) and out.primal.dtype == torch.float64
    assert np.array_equal(out.primal.numpy(), ref.primal)
    as_32 = ProblemBatch(
        **{**pb.__dict__, **{f: torch.tensor(getattr(pb, f)).float() for f in fields}}
    )
    out32 = MoreauBackend().solve_batch(as_32)
    assert out32.primal.dtype == torch.float32 and out32.slack.dtype == torch.float32
    assert close(out32.primal.double().numpy(), ref.primal, 1e-5)


def test_cuda_device_matches_the_cpu():
    torch = pytest.importorskip("torch")
    import moreau

    if not (moreau.device_available("cuda") and torch.cuda.is_available()):
        pytest.skip("no CUDA device with Moreau's CUDA build here (pip install moreau[cuda])")
    rng = np.random.default_rng(17)
    pb = random_batch(rng, 16, 12, 3, ConeDims(nonneg=12, soc=(3,)), shared=("P",))
    cpu = MoreauBackend(**TIGHT_IPM).solve_batch(pb)
    gpu = MoreauBackend(**TIGHT_IPM, device="cuda").solve_batch(pb)
    for k in range(16):
        assert_same(gpu.sample(k), cpu.sample(k), 1e-5, f"sample {k}")


# -- both layers: the two cvxpylayers defects -----------------------------------------------------
@pytest.mark.parametrize("form", ["z >= 0", "-I z <= 0", "0 <= z <= 1"])
def test_ffolayer_keeps_z_nonneg(form):
    """cvxpylayers 1.2 with ``solver="MOREAU"`` drops constraint rows whose data are
    constant with a zero right-hand side (all three forms here) and returns the
    unconstrained ``10 p``.  Through FFOLayer on Moreau: ``clip(10 p, 0, upper)``, and the
    gradient ``10 w`` where the bound is not active."""
    import cvxpy as cp
    import torch

    from ffo_core import FFOLayer

    n = 6
    p = cp.Parameter(n)
    z = cp.Variable(n)
    cons = {
        "z >= 0": [z >= 0],
        "-I z <= 0": [-np.eye(n) @ z <= np.zeros(n)],
        "0 <= z <= 1": [z >= 0, z <= 1],
    }[form]
    upper = 1.0 if form == "0 <= z <= 1" else np.inf
    prob = cp.Problem(cp.Minimize(0.05 * cp.sum_squares(z) - p @ z), cons)
    pv = torch.tensor(
        [[0.05, -1.0, 2.0, -2.0, 0.03, -0.5], [-1.0, 0.07, -2.0, 2.0, -0.5, 0.5]],
        dtype=torch.float64,
        requires_grad=True,
    )
    w = torch.arange(1.0, 7.0, dtype=torch.float64)
    free = ((10 * pv > 0) & (10 * pv < upper)).detach()
    for solver in ("moreau", "moreau:solver=active_set", "moreau:solver=ipm"):
        layer = FFOLayer(prob, [p], [z], solver=solver)
        (out,) = layer(pv)
        assert torch.allclose(out, torch.clamp(10 * pv, 0, upper).detach(), atol=1e-7), solver
        (grad,) = torch.autograd.grad((w * out).sum(), [pv])
        assert torch.allclose(grad, 10 * w * free, atol=1e-5), solver


def test_qp_layer_keeps_z_nonneg_on_the_sudoku_qp():
    """OptNet's Sudoku QP ``min 0.05||z||^2 - p'z  s.t.  A z = 1, z >= 0`` through
    FFOQPLayer: Moreau's answers and gradients equal Clarabel's (tight, exact KKT mode)."""
    import torch

    from ffo_core import FFOQPLayer

    A = torch.tensor(sudoku_rows())
    n, B = 64, 3
    Q = 0.1 * torch.eye(n, dtype=torch.float64)
    G, h = -torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    b = torch.ones(A.shape[0], dtype=torch.float64)
    p = torch.tensor(np.random.default_rng(18).random((B, n)), requires_grad=True)
    w = torch.tensor(np.random.default_rng(19).standard_normal((B, n)))

    def run(layer):
        z = layer(Q, -p, G, h, A, b)
        (grad,) = torch.autograd.grad((w * z).sum(), [p])
        return z.detach(), grad

    z_ref, g_ref = run(FFOQPLayer(solver=CLARABEL, backward="kkt"))
    assert (z_ref.min() > -1e-8) and (z_ref < 1e-6).sum() > 0  # z >= 0 is active somewhere
    for solver in ("moreau", "moreau:solver=active_set"):
        z, grad = run(FFOQPLayer(solver=solver))
        assert torch.allclose(z, z_ref, atol=1e-6), solver
        assert float((grad - g_ref).norm() / g_ref.norm()) < 1e-4, solver


def test_two_ffolayers_on_one_problem_with_different_parameter_orders():
    """cvxpylayers 1.2 with ``solver="MOREAU"`` solves a scrambled problem in the second
    layer.  Here both layers, called alternately, give Clarabel's answers and gradients."""
    import cvxpy as cp
    import torch

    from ffo_core import FFOLayer

    n, m = 5, 3
    rng = np.random.default_rng(20)
    Q, q = cp.Parameter((n, n)), cp.Parameter(n)
    G, h = cp.Parameter((m, n)), cp.Parameter(m)
    z = cp.Variable(n)
    prob = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(Q @ z) + q @ z), [G @ z <= h, cp.sum(z) == 1]
    )
    vals = {
        "Q": np.eye(n) + 0.1 * rng.standard_normal((n, n)),
        "q": rng.standard_normal(n),
        "G": rng.standard_normal((m, n)),
        "h": rng.random(m),
    }
    w = torch.tensor(rng.standard_normal(n))

    def run(layer, order):
        ts = {k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}
        (out,) = layer(*[ts[k] for k in order])
        (w * out).sum().backward()
        return out.detach(), {k: t.grad for k, t in ts.items()}

    first, second = ["Q", "q", "G", "h"], ["G", "h", "Q", "q"]
    ref_out, ref_grad = run(
        FFOLayer(prob, [Q, q, G, h], [z], solver=CLARABEL, backward="kkt"), first
    )
    L1 = FFOLayer(prob, [Q, q, G, h], [z], solver="moreau")
    L2 = FFOLayer(prob, [G, h, Q, q], [z], solver="moreau")
    for layer, order in ((L1, first), (L2, second), (L1, first), (L2, second)):
        out, grad = run(layer, order)
        assert torch.allclose(out, ref_out, atol=1e-6)
        for k in vals:
            err = float((grad[k] - ref_grad[k]).norm() / ref_grad[k].norm())
            assert err < 1e-3, (order, k, err)


def test_qp_layer_structures_in_a_row():
    """One FFOQPLayer on Moreau given three structures in turn (two sparsity patterns of
    ``G`` with the same sizes and nnz, then the first again): every answer is Clarabel's."""
    import torch

    from ffo_core import FFOQPLayer

    rng = np.random.default_rng(21)
    n, m = 6, 6
    Q = torch.tensor(np.eye(n) + 0.1 * np.ones((n, n)))
    p = torch.tensor(rng.standard_normal((2, n)))
    mask1 = np.triu(np.ones((m, n)))
    mask2 = np.tril(np.ones((m, n)))
    Gd = rng.standard_normal((m, n))
    h = torch.tensor(rng.random(m))
    ours, ref = FFOQPLayer(solver="moreau"), FFOQPLayer(solver=CLARABEL)
    for mask in (mask1, mask2, mask1):
        G = torch.tensor(Gd * mask).to_sparse()
        assert torch.allclose(ours(Q, p, G, h), ref(Q, p, G, h), atol=1e-6)
