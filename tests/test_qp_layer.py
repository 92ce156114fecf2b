"""FFOQPLayer (issue 8): qpth's QPFunction semantics through the solver protocol.

Gradient references, each independent of the first-order path:
* central finite differences of the solution map over *every* coordinate of every
  argument (Clarabel at 1e-12 tolerances, step 1e-4: y is smooth on a fixed active set, so
  truncation ~1e-8 and solver noise ~1e-12/1e-4 relative);
* ``backward="kkt"`` (sparse LU of the reduced KKT system);
* qpth 0.0.18 (OptNet's batched PDIPM with a KKT backward), when importable;
* FFOLayer on the equivalent CVXPY problem.
Tolerances (float64, strictly complementary instances):
  default FFO:   cosine >= 0.9999, relative error <= 1e-3  (default Clarabel)
  central=True:  relative error <= 1e-5                    (tight Clarabel)
  kkt:           relative error <= 1e-6                    (tight Clarabel)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from problems import TIGHT, cosine, random_qp, rel_err

from ffo_backends.clarabel import ClarabelBackend
from ffo_core import FFOLayer, FFOQPLayer, InvalidParameterError, SolverError, available_backends
from ffo_core.errors import ConfigError

NAMES = ("Q", "p", "G", "h", "A", "b")
pytestmark = pytest.mark.filterwarnings(  # torch's own notices about its sparse API
    "ignore:Sparse CSR tensor support is in beta:UserWarning",
    "ignore:Sparse invariant checks are implicitly disabled:UserWarning",
)


def strict_qp(n, m, p, seed=0, density=1.0, batch=None, batched=("p",)):
    """``[Q, p, G, h, A, b]`` (float64 tensors) whose solution ``y0`` is known, with
    multipliers >= 0.5 on the first 40% of the rows of G and slacks >= 0.5 on the others
    (strict complementarity by construction).  ``density`` < 1 zeroes entries of G and A
    at random (each row keeps one nonzero).  With ``batch``, the arguments in ``batched``
    get a leading batch dimension, perturbed by 1e-3 (far below the margins)."""
    rng = np.random.default_rng(seed)
    F = np.eye(n) + rng.standard_normal((n, n)) / (2 * np.sqrt(n))
    Q = F.T @ F
    y0 = rng.standard_normal(n)

    def sparse_rows(k):
        M = rng.standard_normal((k, n)) * (rng.random((k, n)) < density)
        M[np.arange(k), np.arange(k) % n] = rng.uniform(1.0, 2.0, k)
        return M

    G, A = sparse_rows(m), sparse_rows(p)
    active = np.arange(m) < round(0.4 * m)
    h = G @ y0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    lam0 = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    b = A @ y0
    q = -(Q @ y0 + A.T @ rng.standard_normal(p) + G.T @ lam0)
    values = dict(Q=Q, p=q, G=G, h=h, A=A, b=b)
    if batch is not None:
        for name in batched:
            v = values[name]
            noise = 1e-3 * rng.standard_normal((batch,) + v.shape)
            if name == "Q":  # keep it symmetric
                noise = noise + np.swapaxes(noise, 1, 2)
            values[name] = v[None] + noise * (v[None] != 0)
    return [torch.tensor(values[k]) for k in NAMES], y0


def grads(layer, tensors, w):
    """Solution and gradients of ``sum(w * y)`` w.r.t. every present argument."""
    ts = [
        t.detach().clone().requires_grad_(t.numel() > 0) if t is not None else None for t in tensors
    ]
    y = layer(*ts)
    (w.to(y.dtype) * y).sum().backward()
    return y.detach(), [t.grad if t is not None else None for t in ts]


def weights(shape, seed=7):
    return torch.tensor(np.random.default_rng(seed).standard_normal(shape))


def fd_gradients(tensors, w, solver=TIGHT, step=1e-4):
    """Central differences of ``sum(w * y)`` over every entry of every argument."""
    layer = FFOQPLayer(solver=solver)
    out = []
    with torch.no_grad():
        for k, t in enumerate(tensors):
            g = torch.zeros_like(t)
            flat = g.view(-1)
            for j in range(t.numel()):
                vals = []
                for s in (step, -step):
                    pert = t.clone()
                    pert.view(-1)[j] += s
                    args = list(tensors)
                    args[k] = pert
                    vals.append(float((w * layer(*args)).sum()))
                flat[j] = (vals[0] - vals[1]) / (2 * step)
            out.append(g)
    return out


def check(got, ref, rel, cos=None, names=NAMES):
    for name, a, b in zip(names, got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= rel, (name, rel_err(a, b))
        if cos is not None:
            assert cosine(a, b) >= cos, (name, cosine(a, b))


# -- accuracy --------------------------------------------------------------------------------
def test_every_mode_matches_finite_differences_of_the_solution_map():
    ts, y0 = strict_qp(6, 7, 2, seed=11)
    w = weights(6)
    ref = fd_gradients(ts, w)
    y, g_ffo = grads(FFOQPLayer(), ts, w)
    assert y.shape == (1, 6) and np.allclose(y[0].numpy(), y0, atol=1e-6)
    check(g_ffo, ref, rel=1e-3, cos=0.9999)
    check(grads(FFOQPLayer(solver=TIGHT, central=True), ts, w)[1], ref, rel=1e-5)
    check(grads(FFOQPLayer(solver=TIGHT, backward="kkt"), ts, w)[1], ref, rel=1e-6)


@pytest.mark.parametrize("size", [(10, 12, 3), (60, 50, 15)], ids=["n10", "n60"])
@pytest.mark.parametrize(
    "batched",
    [(), ("p",), ("Q", "p", "G", "h", "A", "b")],
    ids=["unbatched", "p-batched", "all-batched"],
)
def test_ffo_and_central_match_kkt(size, batched):
    n, m, p = size
    ts, y0 = strict_qp(n, m, p, seed=n, batch=3 if batched else None, batched=batched)
    w = weights((3, n) if batched else (1, n))
    y_ref, ref = grads(FFOQPLayer(solver=TIGHT, backward="kkt"), ts, w)
    y, g = grads(FFOQPLayer(), ts, w)
    assert y.shape == ((3, n) if batched else (1, n))
    assert np.allclose(y.numpy(), y_ref.numpy(), atol=1e-6)
    if not batched:
        assert np.allclose(y[0].numpy(), y0, atol=1e-6)
    check(g, ref, rel=1e-3, cos=0.9999)
    check(grads(FFOQPLayer(solver=TIGHT, central=True), ts, w)[1], ref, rel=1e-5)


def test_unbatched_q_gradient_is_the_sum_over_the_batch():
    ts, _ = strict_qp(8, 9, 2, seed=5, batch=4, batched=("p", "h"))
    w = weights((4, 8))
    layer = FFOQPLayer(solver=TIGHT, backward="kkt")
    _, g = grads(layer, ts, w)
    per_sample = [
        grads(layer, [ts[0], ts[1][i], ts[2], ts[3][i], ts[4], ts[5]], w[i : i + 1])[1]
        for i in range(4)
    ]
    for k, name in enumerate(NAMES):
        if name in ("p", "h"):
            expect = torch.stack([s[k] for s in per_sample])
        else:
            expect = sum(s[k] for s in per_sample)
        assert torch.allclose(g[k], expect, rtol=1e-9, atol=1e-12), name
    _, g_mean = grads(FFOQPLayer(solver=TIGHT, backward="kkt", broadcast_grad="mean"), ts, w)
    assert torch.allclose(g_mean[0], g[0] / 4) and torch.allclose(g_mean[1], g[1])


# -- qpth and FFOLayer -----------------------------------------------------------------------
def test_matches_qpth():
    qpth = pytest.importorskip(
        "qpth.qp",
        reason="qpth not importable: its 0.0.18 sdist builds, but pins numpy<2 "
        "(this venv has numpy 2), so it is not installed into .venv; to run this test: "
        "pip wheel --no-deps --no-build-isolation qpth==0.0.18 && pip install --no-deps "
        "--target DIR qpth-*.whl && PYTHONPATH=DIR pytest tests/test_qp_layer.py",
    )
    ts, _ = strict_qp(10, 12, 3, seed=3, batch=3, batched=("p", "G"))
    w = weights((3, 10))
    y_q, g_q = grads(qpth.QPFunction(verbose=-1), ts, w)  # Q, h, A, b: qpth's mean
    y, g_kkt = grads(FFOQPLayer(solver=TIGHT, backward="kkt", broadcast_grad="mean"), ts, w)
    assert torch.allclose(y, y_q, atol=1e-6)
    check(g_kkt, g_q, rel=1e-5)
    _, g_ffo = grads(FFOQPLayer(broadcast_grad="mean"), ts, w)
    check(g_ffo, g_q, rel=1e-3, cos=0.9999)
    _, g_sum = grads(FFOQPLayer(solver=TIGHT, backward="kkt"), ts, w)  # autograd's sum
    assert torch.allclose(g_sum[0], 3 * g_kkt[0]) and torch.allclose(g_sum[2], g_kkt[2])
    # qpth's empty equality block
    ts2, _ = strict_qp(10, 12, 0, seed=4, batch=3, batched=("p", "G"))
    e = torch.Tensor().double()
    ts2 = ts2[:4] + [e, e]
    y_q, g_q = grads(qpth.QPFunction(verbose=-1), ts2, w)
    y, g = grads(FFOQPLayer(solver=TIGHT, backward="kkt", broadcast_grad="mean"), ts2, w)
    assert torch.allclose(y, y_q, atol=1e-6)
    check(g[:4], g_q[:4], rel=1e-5)


def test_matches_ffolayer_on_the_cvxpy_problem():
    """FFOLayer on ``min 1/2||F y||^2 + q'y`` with F a parameter; here Q = F'F in torch."""
    qp = random_qp(8, 8, 2, seed=4)
    ts = [torch.tensor(v) for v in qp.values]
    w = weights(8)
    for kw, rel in (
        (dict(solver=TIGHT, backward="kkt"), 1e-6),
        (dict(solver=TIGHT, central=True), 1e-5),
        (dict(), 1e-3),
    ):
        ref_y, ref = grads_ffolayer(FFOLayer(qp.problem, qp.params, [qp.y], **kw), ts, w)
        F = ts[0].clone().requires_grad_()
        rest = [t.clone().requires_grad_() for t in ts[1:]]
        y = FFOQPLayer(**kw)(F.T @ F, *rest)
        (w * y[0]).sum().backward()
        assert torch.allclose(y[0].detach(), ref_y, atol=1e-6)
        check([F.grad] + [t.grad for t in rest], ref, rel=rel, names=("F", "q", "G", "h", "A", "b"))


def grads_ffolayer(layer, ts, w):
    ts = [t.clone().requires_grad_() for t in ts]
    (y,) = layer(*ts)
    (w * y).sum().backward()
    return y.detach(), [t.grad for t in ts]


def test_another_backend_through_the_same_protocol():
    """Any registered QP-capable backend works (ECOS too: its adapter takes a quadratic
    objective through a second-order cone); one without a quadratic objective is refused
    up front."""
    pytest.importorskip("scs")
    ts, _ = strict_qp(10, 12, 3, seed=3, batch=2, batched=("p",))
    w = weights((2, 10))
    y_ref, ref = grads(FFOQPLayer(solver=TIGHT, backward="kkt"), ts, w)
    y, g = grads(FFOQPLayer(solver="scs:eps_abs=1e-10,eps_rel=1e-10"), ts, w)
    assert torch.allclose(y, y_ref, atol=1e-7)
    check(g, ref, rel=1e-3, cos=0.9999)
    info = available_backends().get("ecos")
    if info is not None and info.available:
        y, g = grads(FFOQPLayer(solver="ecos"), ts, w)
        assert torch.allclose(y, y_ref, atol=1e-7)
        check(g, ref, rel=1e-3, cos=0.9999)

    class LinearOnly(ClarabelBackend):
        name = "linear-only"
        capabilities = replace(ClarabelBackend.capabilities, quadratic_objective=False)

    with pytest.raises(ConfigError, match="quadratic objective"):
        FFOQPLayer(solver=LinearOnly())


# -- sparse inputs ---------------------------------------------------------------------------
def _sparse(M: torch.Tensor, layout, extra_zeros=None):
    """``M``'s nonzeros (plus explicit zeros at ``extra_zeros``) in the given layout."""
    mask = M != 0
    if extra_zeros is not None:
        mask = mask | extra_zeros
    idx = mask.nonzero().T
    coo = torch.sparse_coo_tensor(idx, M[mask], M.shape).coalesce()
    return {"coo": coo, "csr": coo.to_sparse_csr(), "csc": coo.to_sparse_csc()}[layout], mask


@pytest.mark.parametrize("layout", ["coo", "csr", "csc"])
def test_sparse_inputs_give_the_dense_gradient_on_their_pattern(layout):
    ts, _ = strict_qp(12, 14, 4, seed=2, density=0.3, batch=2, batched=("p",))
    w = weights((2, 12))
    rng = np.random.default_rng(0)
    zeros = torch.tensor(rng.random((14, 12)) < 0.1)  # explicit zeros in G's pattern
    Q_upper = 2 * torch.triu(ts[0], 1) + torch.diag(torch.diag(ts[0]))
    # y'Qy only sees (Q + Q')/2: this upper triangle stands for the symmetric ts[0]
    Qs, Qmask = _sparse(Q_upper, layout)
    Gs, Gmask = _sparse(ts[2], layout, extra_zeros=zeros)
    As, Amask = _sparse(ts[4], layout)
    assert zeros[ts[2] == 0].any()
    for kw, rel in (
        (dict(), 1e-6),
        (dict(solver=TIGHT, central=True), 1e-6),
        (dict(solver=TIGHT, backward="kkt"), 1e-9),
    ):
        y_d, g_d = grads(FFOQPLayer(**kw), ts, w)
        y_s, g_s = grads(FFOQPLayer(**kw), [Qs, ts[1], Gs, ts[3], As, ts[5]], w)
        assert torch.allclose(y_s, y_d, atol=1e-8)
        expect_layout = torch.sparse_coo if layout == "csc" else Qs.layout
        for name, g, M, mask in (
            ("Q", g_s[0], g_d[0], Qmask),
            ("G", g_s[2], g_d[2], Gmask),
            ("A", g_s[4], g_d[4], Amask),
        ):
            assert g.layout == expect_layout, name
            dense = g.to_dense()  # test-side only, to compare
            assert torch.all(dense[~mask] == 0), name
            assert rel_err(dense[mask], M[mask]) <= rel, (name, kw)
        # gradients on explicit zeros of the pattern are there (and not zero)
        assert g_s[2].to_dense()[zeros & (ts[2] == 0)].abs().max() > 0
        for k in (1, 3, 5):
            assert rel_err(g_s[k], g_d[k]) <= rel, (NAMES[k], kw)


def test_batched_sparse_and_values_with_grad():
    ts, _ = strict_qp(10, 12, 3, seed=8, density=0.4, batch=3, batched=("p", "G"))
    w = weights((3, 10))
    layer = FFOQPLayer(solver=TIGHT, backward="kkt")
    y_d, g_d = grads(layer, ts, w)
    G = ts[2]
    mask = G != 0
    idx = mask.nonzero().T  # per-sample patterns
    vals = G[mask].clone().requires_grad_()
    Gs = torch.sparse_coo_tensor(idx, vals, G.shape)  # non-leaf, built from values
    y = layer(ts[0], ts[1], Gs, *ts[3:])
    (w * y).sum().backward()
    assert torch.allclose(y.detach(), y_d, atol=1e-8)
    assert rel_err(vals.grad, g_d[2][mask]) <= 1e-9
    Gcsr = G.to_sparse_csr().requires_grad_()  # batched CSR, same nnz per sample
    y, g = grads(layer, [ts[0], ts[1], Gcsr, *ts[3:]], w)
    assert g[2].layout == torch.sparse_csr and torch.allclose(y, y_d, atol=1e-8)
    assert torch.equal(g[2].col_indices(), Gcsr.col_indices())
    assert rel_err(g[2].to_dense()[mask], g_d[2][mask]) <= 1e-9


def test_ffo_path_factorises_nothing_and_densifies_no_sparse_input(monkeypatch):
    ts, _ = strict_qp(12, 14, 4, seed=9, density=0.3, batch=2, batched=("p",))
    sparse_args = [ts[0].to_sparse(), ts[1], ts[2].to_sparse_csr(), ts[3], ts[4].to_sparse(), ts[5]]
    w = weights((2, 12))
    _, ref = grads(FFOQPLayer(), sparse_args, w)

    def forbidden(*a, **k):
        raise AssertionError("forbidden call in the FFO path")

    for mod, attr in (
        (scipy.sparse.linalg, "splu"),
        (scipy.sparse.linalg, "spsolve"),
        (scipy.sparse.linalg, "factorized"),
        (np.linalg, "solve"),
        (np.linalg, "inv"),
        (torch.linalg, "solve"),
    ):
        monkeypatch.setattr(mod, attr, forbidden)
    for cls in (scipy.sparse.csc_matrix, scipy.sparse.csr_matrix, scipy.sparse.coo_matrix):
        monkeypatch.setattr(cls, "toarray", forbidden)
        monkeypatch.setattr(cls, "todense", forbidden)
    monkeypatch.setattr(torch.Tensor, "to_dense", forbidden)
    _, g = grads(FFOQPLayer(), sparse_args, w)
    monkeypatch.undo()
    for a, b in zip(g, ref):
        assert torch.equal(a.to_dense(), b.to_dense())
    with pytest.raises(AssertionError):  # the patch does bite on the KKT path
        monkeypatch.setattr(scipy.sparse.linalg, "splu", forbidden)
        grads(FFOQPLayer(backward="kkt"), sparse_args, w)


# -- qpth's conventions ----------------------------------------------------------------------
def test_empty_equalities_in_every_form_and_no_inequalities():
    ts, _ = strict_qp(8, 10, 1, seed=6, batch=2, batched=("p", "h"))
    w = weights((2, 8))
    layer = FFOQPLayer(solver=TIGHT, backward="kkt")
    ref_y, ref = grads(layer, ts[:4] + [None, None], w)
    n = 8
    for A, b in (
        (torch.empty(0), torch.empty(0)),
        (torch.Tensor(), torch.Tensor()),
        (torch.zeros(0, n), torch.zeros(0)),
        (torch.zeros(2, 0, n), torch.zeros(2, 0)),
    ):
        y, g = grads(layer, ts[:4] + [A.double(), b.double()], w)
        assert torch.equal(y, ref_y)
        check(g[:4], ref[:4], rel=1e-12)
        assert g[4] is None and g[5] is None
    # equality constraints only (G, h empty): y = argmin 1/2 y'Qy + p'y s.t. Ay = b
    y, g = grads(layer, [ts[0], ts[1], None, None, ts[4], ts[5]], w)
    Q, p, A, b = (t.numpy() for t in (ts[0], ts[1], ts[4], ts[5]))
    K = np.block([[Q, A.T], [A, np.zeros((1, 1))]])
    for i in range(2):
        expect = np.linalg.solve(K, np.r_[-p[i], b])[:n]
        assert np.allclose(y[i].numpy(), expect, atol=1e-8)
    assert g[2] is None and g[0].shape == (n, n)


def test_batch_of_one_and_shapes():
    ts, _ = strict_qp(8, 9, 2, seed=1)
    w = weights((1, 8))
    layer = FFOQPLayer(solver=TIGHT, backward="kkt")
    y1, g1 = grads(layer, ts, w)
    one = [t[None] for t in ts]  # every argument batched, batch 1
    y2, g2 = grads(layer, one, w)
    assert y1.shape == y2.shape == (1, 8) and torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert b.shape == (1,) + a.shape and torch.allclose(a, b[0])


def test_float32():
    ts, _ = strict_qp(10, 12, 3, seed=12, batch=2, batched=("p",))
    w = weights((2, 10))
    y64, g64 = grads(FFOQPLayer(), ts, w)
    y32, g32 = grads(FFOQPLayer(), [t.float() for t in ts], w.float())
    assert y32.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g32)
    assert torch.allclose(y32.double(), y64, atol=1e-5)
    check([g.double() for g in g32], g64, rel=1e-4)


# -- errors ----------------------------------------------------------------------------------
def test_invalid_arguments_are_named():
    ts, _ = strict_qp(6, 7, 2, seed=0, batch=3, batched=("p", "h"))
    layer = FFOQPLayer()

    def bad(k, value, match):
        args = list(ts)
        args[k] = value
        with pytest.raises(InvalidParameterError, match=match):
            layer(*args)

    h_nan = ts[3].clone()
    h_nan[1, 2] = float("nan")
    bad(3, h_nan, r"h contains NaN or Inf at batch index \[1\]")
    G_inf = ts[2].to_sparse()
    G_inf.values()[0] = float("inf")
    bad(2, G_inf, "G contains NaN or Inf")
    bad(2, ts[2][:, :5], "argument G: expected shape")
    bad(3, ts[3][:, :6], "argument h: expected shape")
    bad(3, ts[3][:2], "inconsistent batch sizes")
    bad(0, ts[0][:5], "argument Q: expected shape")
    bad(5, None, "A is given but b is empty")
    bad(0, -torch.eye(6, dtype=torch.float64), "Q is not positive semidefinite")
    bad(1, ts[1].to_sparse(), "argument p: must be a dense tensor")
    bad(0, "Q", "argument Q: expected a torch.Tensor")
    bad(1, torch.empty(0), "argument p is required")
    with pytest.raises(ConfigError):
        FFOQPLayer(backward="exact")
    with pytest.raises(ConfigError):
        FFOQPLayer(broadcast_grad="avg")


def test_infeasible_sample_names_its_batch_index():
    ts, _ = strict_qp(6, 7, 2, seed=0, batch=3, batched=("p", "h"))
    G = torch.cat(
        [ts[2], torch.eye(6, dtype=torch.float64)[:1], -torch.eye(6, dtype=torch.float64)[:1]]
    )
    h = torch.cat([ts[3], torch.full((3, 2), 10.0, dtype=torch.float64)], dim=1)
    h[2, -2:] = torch.tensor([-1.0, -1.0])  # y_0 <= -1 and y_0 >= 1
    with pytest.raises(SolverError, match="batch index 2") as info:
        FFOQPLayer()(ts[0], ts[1], G, h, ts[4], ts[5])
    assert info.value.batch_index == 2


class _Crashing:
    """Clarabel whose forward (``ghost=False``) or ghost solves raise a foreign error."""

    def __init__(self, ghost: bool):
        from ffo_core import get_backend

        self.inner, self.ghost = get_backend("clarabel"), ghost
        self.name, self.capabilities = "crashing", self.inner.capabilities

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        if (extra_linear_term is not None) == self.ghost:
            raise RuntimeError("segfault-ish")
        return self.inner.solve(g, h, e, extra_linear_term)


@pytest.mark.parametrize("ghost", [False, True])
def test_solver_crashes_become_typed_errors_with_the_batch_index(ghost):
    """FFOQPLayer sees its solver through the same guard as FFOLayer."""
    from ffo_core.errors import GhostProblemError

    ts, _ = strict_qp(6, 7, 2, seed=0, batch=3, batched=("p",))
    ts = [t.requires_grad_(True) for t in ts]
    layer = FFOQPLayer(_Crashing(ghost))
    expected = GhostProblemError if ghost else SolverError
    with pytest.raises(expected, match="batch index 0") as info:
        layer(*ts).sum().backward()
    assert isinstance(info.value.__cause__, RuntimeError)


def test_shared_ghost_parts_and_backward_chunks_change_no_gradient(monkeypatch):
    """The backward forms G's and A's ghost parts once per call when the batch shares them
    and stages the batch in chunks (BACKWARD_CHUNK_BYTES); neither changes a gradient:
    shared G and A against the same values repeated per sample (parts formed per sample),
    and one sample per chunk against the whole batch."""
    import ffo_core.layers.runtime as ffo_mod

    shared, _ = strict_qp(12, 9, 3, seed=11, batch=4, batched=("p", "h"))
    repeated = list(shared)
    for k in (2, 4):  # G and A, batched copies
        repeated[k] = shared[k].expand(4, *shared[k].shape).clone()
    w = weights((4, 12))
    layer = FFOQPLayer()
    _, g_shared = grads(layer, shared, w)
    _, g_rep = grads(layer, repeated, w)
    for k, name in enumerate(NAMES):
        if k in (2, 4):
            assert torch.allclose(g_rep[k].sum(0), g_shared[k], rtol=1e-12, atol=1e-14), name
        else:
            assert torch.equal(g_rep[k], g_shared[k]), name
    monkeypatch.setattr(ffo_mod, "BACKWARD_CHUNK_BYTES", 1)
    for tensors, whole in ((shared, g_shared), (repeated, g_rep)):
        _, chunked = grads(layer, tensors, w)
        for name, a, b in zip(NAMES, chunked, whole):
            assert torch.equal(a, b), name
