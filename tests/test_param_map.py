"""The batch data map: shared parameters once, batched ones per sample, exact adjoint."""
import numpy as np
import scipy.sparse as sp

from ffo_core.compile import compile_problem
from ffo_core.ffo_backward import DataGradient
from ffo_core.param_map import _Adjoint, _DenseBlock, bind, pattern_values
from problems import random_qp


def test_bound_data_equals_full_product_and_its_adjoint():
    qp = random_qp(7, 5, 2, seed=4)
    cp_ = compile_problem(qp.problem, qp.params, [qp.y])
    rng = np.random.default_rng(0)
    batch, batched = 3, [False, True, False, True, False, True]
    values = [rng.standard_normal((batch, s.size) if b else s.size)
              for s, b in zip(cp_.params, batched)]
    bound = bind(cp_, values, batched, batch)
    theta = np.zeros((cp_.n_theta + 1, batch))
    theta[cp_.const_col] = 1.0
    for s, v, b in zip(cp_.params, values, batched):
        theta[s.offset:s.offset + s.size] = v.T if b else v[:, None]
    full = cp_.M @ theta
    for i in range(batch):
        assert np.allclose(bound.data(i), full[:, i], rtol=1e-13, atol=1e-13)
    d = [rng.standard_normal(cp_.n_data) for _ in range(batch)]
    sec = cp_.sections
    grads = bound.parameter_gradients(
        [DataGradient(*(v[sec[k]] for k in ("P", "q", "A", "b", "G", "h"))) for v in d])
    ref = cp_.M.T @ np.stack(d, axis=1)
    for s, g, b in zip(cp_.params, grads, batched):
        expect = ref[s.offset:s.offset + s.size]
        assert np.allclose(g, expect.T if b else expect.sum(axis=1), rtol=1e-12, atol=1e-12)


def _lowrank_grads(cp_, batch, rng):
    """Random low-rank data gradients (as the backward passes make them) on ``cp_``'s
    pattern, with their explicit pattern arrays as the reference."""
    grads = []
    for _ in range(batch):
        data = rng.standard_normal(cp_.n_data)
        g, h, e = cp_.sample(data)
        base = (rng.standard_normal(cp_.n), rng.standard_normal(cp_.p),
                rng.standard_normal(cp_.m))
        direction = tuple(rng.standard_normal(v.shape) for v in base)
        grads.append(DataGradient.along(g, h, e, base, direction))
    return grads


def test_low_rank_sum_equals_the_explicit_pattern_sum():
    """The shared parameters' gradient assembled as one rank-2B product (dense and
    gathered paths) equals M' applied to the sum of the explicit pattern arrays."""
    qp = random_qp(9, 6, 3, seed=7)
    cp_ = compile_problem(qp.problem, qp.params, [qp.y])
    rng = np.random.default_rng(1)
    batch = 4
    for batched in ([False] * 6, [False, True, False, True, False, True]):
        values = [rng.standard_normal((batch, s.size) if b else s.size)
                  for s, b in zip(cp_.params, batched)]
        bound = bind(cp_, values, batched, batch)
        grads = _lowrank_grads(cp_, batch, rng)
        assert all(g.low_rank for g in grads)
        ref = cp_.M.T @ np.stack([g.vector() for g in grads], axis=1)
        got = bound.parameter_gradients(grads)
        for s, gv, b in zip(cp_.params, got, batched):
            expect = ref[s.offset:s.offset + s.size]
            assert np.allclose(gv, expect.T if b else expect.sum(axis=1), rtol=1e-12,
                               atol=1e-12)


def test_pattern_values_paths_agree():
    rng = np.random.default_rng(2)
    U, V = rng.standard_normal((30, 5)), rng.standard_normal((20, 5))
    dense = U @ V.T
    for k in (600, 40):              # nearly full pattern (GEMM path), sparse (gathers)
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
    r, c = rr.ravel(), cc.ravel()                     # rows 5..24, cols 3..14, CSC order
    whole = _DenseBlock.of(r, c)
    assert whole is not None and whole.flat is None
    assert np.array_equal(pattern_values(r, c, U, V), dense[r, c])
    out = np.full(r.size + 2, np.nan)
    whole.values(U, V, out=out[1:-1])                 # written in place, neighbours kept
    assert np.allclose(out[1:-1], dense[r, c], rtol=1e-14, atol=1e-14)
    assert np.isnan(out[0]) and np.isnan(out[-1])
    keep = np.sort(rng.choice(r.size, size=r.size * 3 // 4, replace=False))
    perm = rng.permutation(r.size)
    for rs, cs in ((r[keep], c[keep]), (r[perm], c[perm])):
        block = _DenseBlock.of(rs, cs)
        assert block is not None and block.flat is not None
        assert np.allclose(pattern_values(rs, cs, U, V), dense[rs, cs], rtol=1e-14,
                           atol=1e-14)
        out = np.empty(rs.size)
        block.values(U, V, out=out)
        assert np.allclose(out, dense[rs, cs], rtol=1e-14, atol=1e-14)


def test_adjoint_skips_only_the_identity():
    v = np.arange(5.0)
    assert _Adjoint(sp.identity(5, format="csr")) @ v is v
    for M in (2.0 * sp.identity(5, format="csr"),                 # scaled
              sp.csr_matrix(np.eye(5)[[1, 0, 2, 3, 4]]),          # permuted
              sp.csr_matrix(np.eye(5)[:4])):                      # not square
        adj = _Adjoint(M)
        assert not adj.identity
        assert np.array_equal(adj @ v, M @ v)


def test_sample_views_equal_the_full_data():
    qp = random_qp(7, 5, 2, seed=4)
    cp_ = compile_problem(qp.problem, qp.params, [qp.y])
    rng = np.random.default_rng(3)
    batched = [True, False, False, True, False, False]
    values = [rng.standard_normal((2, s.size) if b else s.size)
              for s, b in zip(cp_.params, batched)]
    bound = bind(cp_, values, batched, 2)
    for i in range(2):
        ref = cp_.sample(bound.data(i))
        got = bound.sample(i)
        for a, b in zip(ref, got):
            for x, y in zip(vars(a).values(), vars(b).values()):
                if hasattr(x, "toarray"):
                    assert np.array_equal(x.toarray(), y.toarray())
                elif isinstance(x, np.ndarray):
                    assert np.array_equal(x, y)
