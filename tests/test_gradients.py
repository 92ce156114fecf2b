"""Gradient accuracy of FFOLayer on QPs (issue 2's numbers), against independent references.

References, each computed independently of the FFO path:
* ``backward="kkt"``: exact implicit differentiation (sparse LU of the reduced KKT system),
  itself checked below against
  - cvxpylayers 1.2 with diffcp's exact ``mode="dense"`` and SCS at eps 1e-12 (not the
    default ``lsqr`` mode, which is only 1e-3..3e-2 accurate on such QPs), and
  - central finite differences of the solution map along random directions, solving with
    Clarabel at 1e-12 tolerances (step 1e-5: the map is piecewise smooth, the solver error
    ~1e-12 contributes ~1e-7 relative).
Tolerances (float64, strictly complementary instances from tests/problems.py):
  default FFO:   cosine >= 0.9999, relative error <= 1e-3  (default Clarabel tolerances)
  central=True:  relative error <= 1e-5                    (tight Clarabel)
  kkt:           relative error <= 1e-6 vs both references (tight Clarabel)
"""

import numpy as np
import pytest
import torch
from problems import NAMES, TIGHT, cosine, layer_grads, random_qp, rel_err

from ffo_core import FFOLayer

SIZES = [(10, 8, 3), (50, 30, 10), (200, 120, 40)]


def _weights(n, seed=7):
    return torch.tensor(np.random.default_rng(seed).standard_normal(n))


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"n{s[0]}")
def qp(request):
    n, m, p = request.param
    return random_qp(n, m, p, seed=n)


@pytest.mark.parametrize("batch", [None, 3], ids=["unbatched", "batch3"])
def test_ffo_default_and_central_match_kkt(qp, batch):
    n = qp.y0.size
    ts = qp.tensors(batch=batch)
    w = _weights(n)
    kkt = FFOLayer(qp.problem, qp.params, [qp.y], solver=TIGHT, backward="kkt")
    _, g_ref = layer_grads(kkt, ts, w)

    ffo = FFOLayer(qp.problem, qp.params, [qp.y])  # all defaults
    sol, g_ffo = layer_grads(ffo, ts, w)
    if batch is None:  # the known optimum
        assert np.allclose(sol.numpy(), qp.y0, atol=1e-6)
    for name, a, b in zip(NAMES, g_ffo, g_ref):
        assert cosine(a, b) >= 0.9999, name
        assert rel_err(a, b) <= 1e-3, name

    central = FFOLayer(qp.problem, qp.params, [qp.y], solver=TIGHT, central=True)
    _, g_c = layer_grads(central, ts, w)
    for name, a, b in zip(NAMES, g_c, g_ref):
        assert rel_err(a, b) <= 1e-5, name


def test_kkt_matches_cvxpylayers_dense_scs(qp):
    cvxpylayers = pytest.importorskip("cvxpylayers.torch")
    if qp.y0.size > 50:
        pytest.skip("diffcp dense mode is O(size^3); n <= 50 suffices for the cross-check")
    ts, w = qp.tensors(), _weights(qp.y0.size)
    ref_layer = cvxpylayers.CvxpyLayer(
        qp.problem,
        qp.params,
        [qp.y],
        solver_args=dict(
            mode="dense", solve_method="SCS", eps_abs=1e-12, eps_rel=1e-12, max_iters=200_000
        ),
    )
    _, g_ref = layer_grads(ref_layer, ts, w)
    kkt = FFOLayer(qp.problem, qp.params, [qp.y], solver=TIGHT, backward="kkt")
    _, g_kkt = layer_grads(kkt, ts, w)
    for name, a, b in zip(NAMES, g_kkt, g_ref):
        assert rel_err(a, b) <= 1e-6, name


def test_kkt_matches_finite_differences(qp):
    ts, w = qp.tensors(), _weights(qp.y0.size)
    kkt = FFOLayer(qp.problem, qp.params, [qp.y], solver=TIGHT, backward="kkt")
    _, grads = layer_grads(kkt, ts, w)
    rng = np.random.default_rng(11)
    eps = 1e-5

    def value(tensors):
        with torch.no_grad():
            return float(w @ kkt(*tensors)[0])

    for k, name in enumerate(NAMES):
        v = torch.tensor(rng.standard_normal(ts[k].shape))
        plus = [t + eps * v if j == k else t for j, t in enumerate(ts)]
        minus = [t - eps * v if j == k else t for j, t in enumerate(ts)]
        fd = (value(plus) - value(minus)) / (2 * eps)
        analytic = float((grads[k] * v).sum())
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), name


def test_batched_gradient_is_sum_of_samples_once():
    """An unbatched parameter's gradient is the per-sample gradients summed exactly once."""
    qp = random_qp(15, 10, 4, seed=2)
    w = _weights(15)
    layer = FFOLayer(qp.problem, qp.params, [qp.y], solver=TIGHT, backward="kkt")
    single = layer_grads(layer, qp.tensors(), w)[1]
    ts = qp.tensors()
    ts[1] = ts[1].expand(4, -1).clone()  # batch q only, identical samples
    batched = layer_grads(layer, ts, w.expand(4, -1))[1]
    assert batched[1].shape == (4, 15)
    for k in (0, 2, 3, 4, 5):  # unbatched: 4 x the single gradient
        assert torch.allclose(batched[k], 4 * single[k], rtol=1e-8, atol=1e-10)
    assert torch.allclose(batched[1], single[1].expand(4, -1), rtol=1e-8, atol=1e-10)


def test_float32_inputs_give_float32_outputs_and_grads():
    qp = random_qp(12, 8, 3, seed=4)
    ts = qp.tensors(dtype=torch.float32)
    layer = FFOLayer(qp.problem, qp.params, [qp.y])
    sol, grads = layer_grads(layer, ts, _weights(12).float())
    assert sol.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    ref = FFOLayer(qp.problem, qp.params, [qp.y], backward="kkt")
    _, g_ref = layer_grads(ref, qp.tensors(), _weights(12))
    for a, b in zip(grads, g_ref):
        assert cosine(a, b) >= 0.9999


def test_gradients_only_for_inputs_that_require_them():
    qp = random_qp(10, 6, 2, seed=5)
    ts = qp.tensors()
    ts[1].requires_grad_(True)  # only q
    layer = FFOLayer(qp.problem, qp.params, [qp.y])
    (sol,) = layer(*ts)
    sol.sum().backward()
    assert ts[1].grad is not None
    assert all(t.grad is None for j, t in enumerate(ts) if j != 1)


def _compiled_sample(problem, params, variables, values):
    """``(g, h, e, c_slot)`` of one sample of ``problem`` at parameter ``values``."""
    from ffo_core.datamap.compile import compile_problem

    comp = compile_problem(problem, params, variables)
    theta = np.zeros(comp.n_theta + 1)
    theta[comp.const_col] = 1
    for slot, v in zip(comp.params, values):
        theta[slot.offset : slot.offset + slot.size] = np.asarray(v, float).ravel(order="F")
    slot = comp.variables[0]
    return (*comp.sample(comp.M @ theta), slice(slot.offset, slot.offset + slot.size))


def test_batch_backward_is_the_per_sample_backward():
    """ffo_backward_batch (three passes over the batch, its solves in any order) gives
    each sample exactly what a lone ffo_backward gives: the same gradient to the last bit
    and the same diagnostics, for polyhedral samples (one-sided, and central after a
    failed base-point check), a curved one (SOC kept: central up front), a
    sample without loss (c = 0) and two that share their matrices' GhostSource."""
    import cvxpy as cp

    from ffo_core.engine import FFOOptions, FFOSample, GhostSource, ffo_backward_batch
    from ffo_core.engine.ffo_backward import ffo_backward
    from ffo_core.registry import get_backend

    backend = get_backend("clarabel")
    qp = random_qp(10, 8, 3, seed=3)
    y = cp.Variable(4)
    a = cp.Parameter(4)
    socp = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [cp.norm(y, 2) <= 1, y >= -2])
    rng = np.random.default_rng(0)
    samples = []
    for problem, params, var, values in (
        (qp.problem, qp.params, qp.y, qp.values),
        (socp, [a], y, [np.array([2.0, -1.0, 0.5, 1.0])]),
        (qp.problem, qp.params, qp.y, qp.values),
    ):
        g, h, e, where = _compiled_sample(problem, params, [var], values)
        c = np.zeros(g.n)
        c[where] = rng.standard_normal(where.stop - where.start)
        samples.append(FFOSample(backend, g, h, e, backend.solve(g, h, e), c))
    samples.append(samples[0]._replace(c=np.zeros_like(samples[0].c)))
    # two samples that share one GhostSource (as a layer's batch with shared matrices):
    # their ghosts are selected together (build_ghosts)
    shared = GhostSource.of(samples[0].h, samples[0].e)
    samples += [samples[0]._replace(source=shared), samples[2]._replace(source=shared)]
    for options in (FFOOptions(), FFOOptions(base_check=0.0)):
        order = []

        def backwards(fn, count):  # the solves in reverse order
            for i in reversed(range(count)):
                order.append(i)
                fn(i)

        batch = ffo_backward_batch(samples, options, run=backwards)
        assert order == [5, 4, 3, 2, 1, 0]
        for s, got in zip(samples, batch):
            alone = ffo_backward(s.backend, s.g, s.h, s.e, s.sol, s.c, options, source=s.source)
            assert np.array_equal(got.vector(), alone.vector())
            assert got.diagnostics == alone.diagnostics
        assert batch[1].diagnostics["central"] and batch[1].diagnostics["kept"] > 0
        assert batch[0].diagnostics["central_fallback"] == (options.base_check == 0.0)
        assert not np.any(batch[3].vector())
        for k, j in ((4, 0), (5, 2)):  # a shared source changes nothing
            assert np.array_equal(batch[k].vector(), batch[j].vector())


def test_batch_backward_hands_back_a_failed_ghost_and_goes_on():
    """A sample whose ghost solve fails holds its GhostProblemError (with the failing
    delta); the other samples still get their gradients."""
    from ffo_core.engine import FFOOptions, FFOSample, ffo_backward_batch
    from ffo_core.errors import GhostProblemError
    from ffo_core.protocol import Solution, Status
    from ffo_core.registry import get_backend

    backend = get_backend("clarabel")

    class Refuses:  # every ghost is "infeasible"
        name, capabilities = backend.name, backend.capabilities

        def solve(self, *args, **kwargs):
            return Solution(Status.INFEASIBLE)

    qp = random_qp(10, 8, 3, seed=4)
    g, h, e, where = _compiled_sample(qp.problem, qp.params, [qp.y], qp.values)
    c = np.zeros(g.n)
    c[where] = 1.0
    sol = backend.solve(g, h, e)
    good = FFOSample(backend, g, h, e, sol, c)
    out = ffo_backward_batch([good, good._replace(backend=Refuses()), good], FFOOptions())
    assert isinstance(out[1], GhostProblemError) and out[1].delta > 0
    assert "delta=" in str(out[1])
    assert np.array_equal(out[0].vector(), out[2].vector()) and np.any(out[0].vector())


def test_layer_gradient_does_not_depend_on_the_backward_chunk_size(monkeypatch):
    """The layer stages its backward in chunks of BACKWARD_CHUNK_BYTES of per-sample data;
    one sample per chunk gives the same gradients as the whole batch at once."""
    import ffo_core.layers.runtime as ffo_mod

    qp = random_qp(10, 8, 3, seed=5)
    rng = np.random.default_rng(2)
    ts = qp.tensors(batch=5)
    ts[2] = ts[2] + torch.tensor(1e-3 * rng.standard_normal(ts[2].shape))  # batched G
    w = _weights(10)
    layer = FFOLayer(qp.problem, qp.params, [qp.y], n_jobs=1)
    _, whole = layer_grads(layer, ts, w)
    monkeypatch.setattr(ffo_mod, "BACKWARD_CHUNK_BYTES", 1)
    _, single = layer_grads(layer, ts, w)
    for name, a, b in zip(NAMES, whole, single):
        assert torch.equal(a, b), name


def test_second_solve_of_a_ghost_goes_through_resolve():
    """With central differences each ghost is solved twice; the second solve hands the
    backend the first's Solution (``resolve``), through the layer's guard, and the
    gradient still matches the KKT mode; a backend without ``resolve`` gets two plain
    solves and the same gradient to solver accuracy."""
    from ffo_core.registry import get_backend

    class Counting:
        def __init__(self, with_resolve: bool):
            self.inner = get_backend("clarabel")
            self.name, self.capabilities = "counting", self.inner.capabilities
            self.calls = {"solve": 0, "ghost": 0, "resolve": 0}
            if with_resolve:
                self.resolve = self._resolve

        def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
            self.calls["ghost" if extra_linear_term is not None else "solve"] += 1
            return self.inner.solve(g, h, e, extra_linear_term)

        def _resolve(self, previous, g, h, e, extra_linear_term):
            self.calls["resolve"] += 1
            return self.inner.resolve(previous, g, h, e, extra_linear_term)

    qp = random_qp(10, 8, 3, seed=6)
    ts = qp.tensors(batch=3)
    w = _weights(10)
    _, ref = layer_grads(
        FFOLayer(qp.problem, qp.params, [qp.y], solver=TIGHT, backward="kkt"), ts, w
    )
    got = {}
    for with_resolve in (True, False):
        backend = Counting(with_resolve)
        layer = FFOLayer(
            qp.problem, qp.params, [qp.y], solver=backend, central=True, n_jobs=1, polish=False
        )  # the forward's polish solves are not what is counted here
        _, got[with_resolve] = layer_grads(layer, ts, w)
        assert backend.calls == (
            {"solve": 3, "ghost": 3, "resolve": 3}
            if with_resolve
            else {"solve": 3, "ghost": 6, "resolve": 0}
        )
    for name, a, b, c in zip(NAMES, got[True], got[False], ref):
        assert rel_err(a, c) <= 1e-5, name
        assert rel_err(a, b) <= 1e-8, name


def test_backward_chunks_cover_the_batch_within_the_byte_budget(monkeypatch):
    """backward_chunks splits a batch into consecutive ranges of at most
    BACKWARD_CHUNK_BYTES // sample_bytes samples (at least one each), covering it once."""
    import ffo_core.layers.runtime as ffo_mod
    from ffo_core.layers.runtime import backward_chunks

    monkeypatch.setattr(ffo_mod, "BACKWARD_CHUNK_BYTES", 100)
    assert backward_chunks(7, 30) == [range(0, 3), range(3, 6), range(6, 7)]
    assert backward_chunks(4, 0) == [range(0, 4)]  # nothing batched: one chunk
    assert backward_chunks(3, 500) == [range(0, 1), range(1, 2), range(2, 3)]
    assert backward_chunks(0, 30) == []
