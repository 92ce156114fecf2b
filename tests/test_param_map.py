"""The batch data map: shared parameters once, batched ones per sample, exact adjoint."""

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
from problems import random_qp

from ffo_core.datamap.compile import compile_problem, flatten_f, unflatten_f
from ffo_core.datamap.param_map import _Adjoint, _DenseBlock, bind, pattern_values, split_of
from ffo_core.engine import DataGradient


def _bind_flat(cp_, flat, batched, batch):
    """``bind`` of flat column-major values (``(size,)`` or ``(batch, size)``), which
    ``bind`` takes in the parameters' own shapes."""
    shaped = [
        unflatten_f(v if b else v[None], s.shape) for s, v, b in zip(cp_.params, flat, batched)
    ]
    return bind(cp_, [v if b else v[0] for v, b in zip(shaped, batched)], batched, batch)


def _flat_gradients(cp_, grads, batched, batch):
    """``parameter_gradients``' arrays (parameter-shaped) as flat column-major ones."""
    return [
        flatten_f(g, batch, s.shape) if b else flatten_f(g[None], 1, s.shape)[0]
        for s, g, b in zip(cp_.params, grads, batched)
    ]


def _two_sum_problem():
    """Parameters that are not all identity runs onto their data: ``A1 + A2`` share data
    entries, ``2 * G3`` is scaled, ``h`` and ``q`` are identity runs on vector sections."""
    n, m = 5, 4
    y = cp.Variable(n)
    A1, A2, G3 = (cp.Parameter((m, n)) for _ in range(3))
    h, q = cp.Parameter(m), cp.Parameter(n)
    prob = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), [(A1 + A2) @ y <= h, 2 * G3 @ y == 1.0]
    )
    return prob, [A1, A2, G3, h, q], y


PROBLEMS = {
    "random_qp": (
        lambda: (lambda qp: (qp.problem, qp.params, qp.y))(random_qp(7, 5, 2, seed=4)),
        ([False, True, False, True, False, True], [False] * 6),
    ),
    "two_sum": (
        _two_sum_problem,
        ([False] * 5, [True, False, False, True, False], [False, True, True, False, True]),
    ),
}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_bound_data_equals_full_product_and_its_adjoint(name):
    make, masks = PROBLEMS[name]
    prob, params, y = make()
    cp_ = compile_problem(prob, params, [y])
    rng = np.random.default_rng(0)
    batch = 3
    for batched in masks:
        values = [
            rng.standard_normal((batch, s.size) if b else s.size)
            for s, b in zip(cp_.params, batched)
        ]
        bound = _bind_flat(cp_, values, batched, batch)
        theta = np.zeros((cp_.n_theta + 1, batch))
        theta[cp_.const_col] = 1.0
        for s, v, b in zip(cp_.params, values, batched):
            theta[s.offset : s.offset + s.size] = v.T if b else v[:, None]
        full = cp_.M @ theta
        for i in range(batch):
            assert np.allclose(bound.data(i), full[:, i], rtol=1e-13, atol=1e-13)
        d = [rng.standard_normal(cp_.n_data) for _ in range(batch)]
        sec = cp_.sections
        grads = bound.parameter_gradients(
            [DataGradient(*(v[sec[k]] for k in ("P", "q", "A", "b", "G", "h"))) for v in d]
        )
        ref = cp_.M.T @ np.stack(d, axis=1)
        for s, g, b, shaped in zip(
            cp_.params, _flat_gradients(cp_, grads, batched, batch), batched, grads
        ):
            assert shaped.shape == ((batch,) if b else ()) + s.shape
            expect = ref[s.offset : s.offset + s.size]
            assert np.allclose(g, expect.T if b else expect.sum(axis=1), rtol=1e-12, atol=1e-12)


def test_runs_are_found_only_where_the_map_is_the_identity():
    """``A1 + A2`` share their data rows (runs, but no whole block of their own); ``2 G3``
    is no run; ``h`` and ``q`` are runs on vector sections."""
    prob, params, y = _two_sum_problem()
    cp_ = compile_problem(prob, params, [y])
    runs = {r.param: r for r in split_of(cp_, (False,) * 5).runs}
    assert 2 not in runs and {0, 1, 3, 4} <= set(runs)
    assert runs[0].block is None and runs[1].block is None and runs[3].block is None
    qp = random_qp(7, 5, 2, seed=4)
    cp_ = compile_problem(qp.problem, qp.params, [qp.y])
    runs = {r.param: r for r in split_of(cp_, (False,) * 6).runs}
    # F's and A's entries interleave in the equality section (CSC order of [F -I; A 0]),
    # so only G, alone in the cone section, is a whole block
    assert {cp_.params[k].name: r.block for k, r in runs.items()} == {
        "q": None,
        "G": "G",
        "h": None,
        "b": None,
    }


def _lowrank_grads(cp_, batch, rng):
    """Random low-rank data gradients (as the backward passes make them) on ``cp_``'s
    pattern, with their explicit pattern arrays as the reference."""
    grads = []
    for _ in range(batch):
        data = rng.standard_normal(cp_.n_data)
        g, h, e = cp_.sample(data)
        base = (rng.standard_normal(cp_.n), rng.standard_normal(cp_.p), rng.standard_normal(cp_.m))
        direction = tuple(rng.standard_normal(v.shape) for v in base)
        grads.append(DataGradient.along(g, h, e, base, direction))
    return grads


@pytest.mark.parametrize("explicit", [False, True])
def test_low_rank_sum_equals_the_explicit_pattern_sum(explicit):
    """The shared parameters' gradient assembled as one rank-2B product (dense and
    gathered paths, and a whole block computed row-major) equals M' applied to the sum of
    the explicit pattern arrays; with ``explicit`` one sample's gradient is given as those
    arrays (as the KKT fallback gives it), which is added to the product."""
    qp = random_qp(9, 6, 3, seed=7)
    cp_ = compile_problem(qp.problem, qp.params, [qp.y])
    rng = np.random.default_rng(1)
    batch = 4
    sec = cp_.sections
    for batched in ([False] * 6, [False, True, False, True, False, True]):
        values = [
            rng.standard_normal((batch, s.size) if b else s.size)
            for s, b in zip(cp_.params, batched)
        ]
        bound = _bind_flat(cp_, values, batched, batch)
        grads = _lowrank_grads(cp_, batch, rng)
        assert all(g.low_rank for g in grads)
        if explicit:
            v = grads[1].vector()
            grads[1] = DataGradient(*(v[sec[k]] for k in ("P", "q", "A", "b", "G", "h")))
            assert not grads[1].low_rank
        ref = cp_.M.T @ np.stack([g.vector() for g in grads], axis=1)
        got = bound.parameter_gradients(grads)
        if not batched[2]:  # G: a whole block, its gradient comes row-major
            assert got[2].flags.c_contiguous and got[2].shape == cp_.params[2].shape
        for s, gv, b in zip(cp_.params, _flat_gradients(cp_, got, batched, batch), batched):
            expect = ref[s.offset : s.offset + s.size]
            assert np.allclose(gv, expect.T if b else expect.sum(axis=1), rtol=1e-12, atol=1e-12)


def test_pattern_values_paths_agree():
    rng = np.random.default_rng(2)
    U, V = rng.standard_normal((30, 5)), rng.standard_normal((20, 5))
    dense = U @ V.T
    for k in (600, 40):  # nearly full pattern (GEMM path), sparse (gathers)
        flat = rng.choice(600, size=k, replace=False)
        r, c = flat // 20, flat % 20
        assert np.allclose(pattern_values(r, c, U, V), dense[r, c], rtol=1e-14, atol=1e-14)


def test_pattern_values_dense_blocks():
    """Entries read from the dense product of their bounding block: a whole block in CSC
    (column-major) order is the product itself (no gather); an offset, partial or
    shuffled set of entries is gathered from it."""
    rng = np.random.default_rng(5)
    U, V = rng.standard_normal((30, 4)), rng.standard_normal((20, 4))
    dense = U @ V.T
    cc, rr = np.meshgrid(np.arange(3, 15), np.arange(5, 25), indexing="ij")
    r, c = rr.ravel(), cc.ravel()  # rows 5..24, cols 3..14, CSC order
    whole = _DenseBlock.of(r, c)
    assert whole is not None and whole.flat is None
    assert np.array_equal(pattern_values(r, c, U, V), dense[r, c])
    out = np.full(r.size + 2, np.nan)
    whole.values(U, V, out=out[1:-1])  # written in place, neighbours kept
    assert np.allclose(out[1:-1], dense[r, c], rtol=1e-14, atol=1e-14)
    assert np.isnan(out[0]) and np.isnan(out[-1])
    keep = np.sort(rng.choice(r.size, size=r.size * 3 // 4, replace=False))
    perm = rng.permutation(r.size)
    for rs, cs in ((r[keep], c[keep]), (r[perm], c[perm])):
        block = _DenseBlock.of(rs, cs)
        assert block is not None and block.flat is not None
        assert np.allclose(pattern_values(rs, cs, U, V), dense[rs, cs], rtol=1e-14, atol=1e-14)
        out = np.empty(rs.size)
        block.values(U, V, out=out)
        assert np.allclose(out, dense[rs, cs], rtol=1e-14, atol=1e-14)


def test_adjoint_skips_only_the_identity():
    v = np.arange(5.0)
    assert _Adjoint(sp.identity(5, format="csr")) @ v is v
    for M in (
        2.0 * sp.identity(5, format="csr"),  # scaled
        sp.csr_matrix(np.eye(5)[[1, 0, 2, 3, 4]]),  # permuted
        sp.csr_matrix(np.eye(5)[:4]),
    ):  # not square
        adj = _Adjoint(M)
        assert not adj.identity
        assert np.array_equal(adj @ v, M @ v)


@pytest.mark.parametrize("keep", [True, False])
def test_sample_views_equal_the_full_data(keep, monkeypatch):
    """Per-sample protocol objects equal the full data map, whether the batch's reached
    rows are kept from the overflow check (small batches) or formed per sample."""
    import ffo_core.datamap.param_map as param_map

    if not keep:
        monkeypatch.setattr(param_map, "_KEEP_REACHED", 0)
    qp = random_qp(7, 5, 2, seed=4)
    cp_ = compile_problem(qp.problem, qp.params, [qp.y])
    rng = np.random.default_rng(3)
    batched = [True, False, False, True, False, False]
    values = [
        rng.standard_normal((2, s.size) if b else s.size) for s, b in zip(cp_.params, batched)
    ]
    bound = _bind_flat(cp_, values, batched, 2)
    assert bound.overflowing_samples() == []
    assert (bound._reached_all is not None) == keep
    for i in range(2):
        ref = cp_.sample(bound.data(i))
        got = bound.sample(i)
        for a, b in zip(ref, got):
            for x, y in zip(vars(a).values(), vars(b).values()):
                if hasattr(x, "toarray"):
                    assert np.array_equal(x.toarray(), y.toarray())
                elif isinstance(x, np.ndarray):
                    assert np.array_equal(x, y)


def test_pattern_matrices_are_flagged_canonical_only_when_they_are():
    """A compiled pattern (sorted rows within each column, no duplicates) hands out
    matrices flagged canonical, so nothing rescans their indices; any other is left to
    scipy's own check."""
    from ffo_core.datamap.compile import SparsePattern

    good = SparsePattern.from_rows_cols([0, 2, 1, 0, 1], [0, 0, 1, 2, 2], (3, 3))
    assert good.canonical and good.matrix(np.arange(5.0)).has_canonical_format
    for rows in ([2, 0, 1, 0, 1], [0, 0, 1, 0, 1]):  # unsorted; duplicated
        bad = SparsePattern.from_rows_cols(rows, [0, 0, 1, 2, 2], (3, 3))
        assert not bad.canonical and not bad.matrix(np.arange(5.0)).has_canonical_format


def test_constant_sections_are_formed_once_per_layer_and_the_others_each_call():
    """What is formed of data no parameter reaches (matrices, P's triangle, ``[A; G]``,
    G's row norms and transpose) is kept from call to call, the very same objects; a
    section a shared parameter reaches is formed again in every call, from its values."""
    n, m = 4, 3
    y = cp.Variable(n)
    q, G = cp.Parameter(n), cp.Parameter((m, n))
    fixed = cp.Problem(cp.Minimize(cp.sum_squares(y) + q @ y), [y >= -1, cp.sum(y) == 1])
    learnt = cp.Problem(cp.Minimize(cp.sum_squares(y) + q @ y), [G @ y <= 1, y >= -1])
    rng = np.random.default_rng(1)
    cp_fixed = compile_problem(fixed, [q], [y])
    first, second = (bind(cp_fixed, [rng.standard_normal(n)], [False], 1) for _ in range(2))
    assert split_of(cp_fixed, (False,)).constant_sections == {"P", "A", "b", "G", "h"}
    (g1, h1, e1), (g2, h2, e2) = first.sample(0), second.sample(0)
    assert not np.array_equal(g1.q, g2.q)
    assert h1.G is h2.G and e1.A is e2.A and g1.P_upper is g2.P_upper
    s1, s2 = first.ghost_source(h1, e1), second.ghost_source(h2, e2)
    assert all(a is b for a, b in zip(s1[2:], s2[2:]))  # [A; G], norms, G'
    cp_learnt = compile_problem(learnt, [q, G], [y])
    values = [[rng.standard_normal(n), rng.standard_normal((m, n))] for _ in range(2)]
    first, second = (bind(cp_learnt, v, [False, False], 1) for v in values)
    (_, h1, e1), (_, h2, e2) = first.sample(0), second.sample(0)
    assert h1.G is not h2.G
    for values_k, h in zip(values, (h1, h2)):
        np.testing.assert_array_equal(h.G.toarray()[:m], values_k[1])
    s1, s2 = first.ghost_source(h1, e1), second.ghost_source(h2, e2)
    assert s1.stacked is not s2.stacked and not np.array_equal(s1.G_row_norms, s2.G_row_norms)
