"""The first-order backward of a polyhedral batch as array operations
(:mod:`ffo_core.engine.batch_backward`) against the per-sample bookkeeping.

Every batch here goes through three paths with the same forward solutions:

* ``fast``: :func:`~ffo_core.engine.schedule.ffo_backward_batch` with the batched backend
  (the vectorised path);
* ``steps``: the same call with the vectorised path switched off -- the per-sample steps of
  :mod:`ffo_core.engine.ffo_backward` (``plan``, ``finish``, ``DataGradient.along``) around
  the same ``solve_batch`` calls, so the ghost problems are the same and the two agree to
  rounding: relative 1e-12 on every part of the data gradient and on the diagnostics;
* ``alone``: :func:`~ffo_core.engine.ffo_backward.ffo_backward` per sample through the
  backend's own ``solve`` (the compact ghost, a different problem for the solver): the
  ghosts of these problems are equality-constrained QPs that both backends solve to their
  accuracy (measured: agreement <= 1e-9 relative), so the tolerance there is 1e-7.

Plus an independent reference: the box QP ``min 1/2||y||^2 + q'y, -1 <= y <= 1`` has
``y = clip(-q)``, so ``dL/dq = -w`` where the bound is inactive and 0 where it is active.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from ffo_core import get_backend
from ffo_core.engine import batch_backward, schedule
from ffo_core.engine.batched import problem_batch, solve_problems
from ffo_core.engine.ffo_backward import FFOOptions, ffo_backward
from ffo_core.engine.schedule import FFOSample, ffo_backward_batch
from ffo_core.errors import GhostProblemError
from ffo_core.protocol import ConeConstraints, ConeDims, Equalities, Objective, Status

BACKENDS = ("moreau", "pdipm")
#: fast against steps: the same ghost problems, the bookkeeping's rounding only
STEPS_TOL = 1e-12
#: fast against a lone ffo_backward: another problem for the solver (module docstring)
ALONE_TOL = 1e-7


@pytest.fixture(params=BACKENDS)
def backend(request):
    try:
        return get_backend(request.param)
    except Exception as exc:  # an optional solver missing here
        pytest.skip(f"{request.param} unavailable: {exc}")


def _problem(rng, n, m, p, lp=False):
    """A strictly complementary QP (LP with ``lp``: a vertex) with known optimum."""
    y0 = rng.standard_normal(n)
    if lp:  # bounds -1 <= y <= 1 (m = 2n), p equalities, the rest at a bound
        G = sp.csc_matrix(np.vstack([np.eye(n), -np.eye(n)]))
        y0 = np.where(np.arange(n) < p, rng.uniform(-0.5, 0.5, n), np.sign(y0))
        h = np.ones(2 * n)
        slack = h - G @ y0
        lam0 = np.where(slack < 1e-12, rng.uniform(0.5, 1.5, 2 * n), 0.0)
        P = None
        Pq = np.zeros(n)
    else:
        G = sp.csc_matrix(rng.standard_normal((m, n)) * (rng.random((m, n)) < 0.7))
        active = np.arange(m) < m // 3
        h = G @ y0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
        lam0 = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
        F = np.eye(n) + rng.standard_normal((n, n)) / (2 * np.sqrt(n))
        P = sp.csc_matrix(F.T @ F)
        Pq = P @ y0
    A = sp.csc_matrix(rng.standard_normal((p, n)))
    nu0 = rng.standard_normal(p)
    q = -(Pq + A.T @ nu0 + G.T @ lam0)
    return P, q, G, h, A, A @ y0


def _samples(backend, B=6, n=8, m=10, p=2, shared=True, lp=False, dual=False, seed=0):
    """A batch of FFOSamples solved by ``backend.solve_batch`` (``shared``: one ``P``,
    ``G``, ``A`` object for the batch, as a layer's unbatched matrices)."""
    rng = np.random.default_rng(seed)
    first = _problem(rng, n, m, p, lp)
    data = []
    for _ in range(B):
        P, q, G, h, A, b = first if shared else _problem(rng, n, m, p, lp)
        if shared:
            q = q + 0.1 * rng.standard_normal(n)  # another point on the same matrices
            b = b + 0.05 * rng.standard_normal(p)
        data.append(
            (Objective(P, q), ConeConstraints(G, h, ConeDims(nonneg=G.shape[0])), Equalities(A, b))
        )
    sols = solve_problems(backend, problem_batch(data))
    assert all(s.status is Status.OPTIMAL for s in sols)
    out = []
    for (g, h, e), sol in zip(data, sols):
        c = rng.standard_normal(g.n)
        c_dual = (rng.standard_normal(e.p), rng.standard_normal(h.m)) if dual else None
        out.append(FFOSample(backend, g, h, e, sol, c, c_dual=c_dual))
    return out


def _steps(samples, options, backend, monkeypatch):
    """The batch through the per-sample bookkeeping (the vectorised path off)."""
    with monkeypatch.context() as mp:
        mp.setattr(schedule, "polyhedral_applies", lambda s: False)
        return ffo_backward_batch(samples, options, batched=backend)


def _close(a, b, tol):
    scale = max(np.linalg.norm(b), 1e-300)
    return np.linalg.norm(a - b) <= tol * scale


def _agree(got, want, tol, diagnostics=True):
    assert type(got) is type(want)
    if isinstance(want, GhostProblemError):
        assert (got.delta, got.status) == (want.delta, want.status)
        return
    if not diagnostics:  # another solve of the ghost: relative to the whole gradient
        assert _close(got.vector(), want.vector(), tol)
        return
    for part in ("P", "q", "A", "b", "G", "h"):  # each part relative to itself
        assert _close(getattr(got, part), getattr(want, part), tol), part
    assert got.diagnostics.keys() == want.diagnostics.keys()
    for key, value in want.diagnostics.items():
        if isinstance(value, float) and not isinstance(value, bool):
            assert abs(got.diagnostics[key] - value) <= tol * abs(value), key
        else:
            assert got.diagnostics[key] == value, key


CASES = {
    "qp-shared": dict(shared=True),
    "qp-batched": dict(shared=False),
    "lp-shared": dict(shared=True, lp=True, m=0),
    "lp-batched": dict(shared=False, lp=True, m=0),
    "qp-duals": dict(shared=True, dual=True),
    "qp-batched-duals": dict(shared=False, dual=True),
    "qp-no-equalities": dict(shared=True, p=0),
}
OPTIONS = {
    "default": FFOOptions(),
    "central": FFOOptions(central=True),
    "delta": FFOOptions(delta=1e-3, tau_s=1e-7, tau_lam=1e-7),
    "kappa": FFOOptions(kappa=0.1),
    "always-central": FFOOptions(base_check=0.0),
    "no-check": FFOOptions(base_check=None),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("opt", OPTIONS)
def test_fast_path_is_the_per_sample_steps(backend, case, opt, monkeypatch):
    """The vectorised path gives every sample what the per-sample steps give it (the same
    ghosts solved), to 1e-12, diagnostics included, for one zero-gradient sample too."""
    kw = dict(CASES[case])
    if kw.get("lp"):
        kw["m"] = 2 * 8
    samples = _samples(backend, **kw)
    samples[2] = samples[2]._replace(
        c=np.zeros_like(samples[2].c),
        c_dual=None if samples[2].c_dual is None else tuple(map(np.zeros_like, samples[2].c_dual)),
    )
    assert batch_backward.applies(samples)
    options = OPTIONS[opt]
    fast = ffo_backward_batch(samples, options, batched=backend)
    steps = _steps(samples, options, backend, monkeypatch)
    for got, want in zip(fast, steps):
        _agree(got, want, STEPS_TOL)
    assert not np.any(fast[2].vector()) and fast[2].diagnostics == {}
    assert any(np.any(g.vector()) for g in fast)
    if opt == "central":
        assert all(g.diagnostics["central"] for k, g in enumerate(fast) if k != 2)


@pytest.mark.parametrize("case", ["qp-shared", "qp-batched-duals", "lp-batched"])
@pytest.mark.parametrize("opt", ["default", "central"])
def test_fast_path_is_a_lone_ffo_backward(backend, case, opt):
    """Against :func:`ffo_backward` sample by sample (the backend's ``solve`` on the
    compact ghost): the same gradient to the solvers' accuracy, the same active sets."""
    kw = dict(CASES[case])
    if kw.get("lp"):
        kw["m"] = 2 * 8
    samples = _samples(backend, **kw)
    options = OPTIONS[opt]
    fast = ffo_backward_batch(samples, options, batched=backend)
    for s, got in zip(samples, fast):
        alone = ffo_backward(s.backend, s.g, s.h, s.e, s.sol, s.c, options, c_dual=s.c_dual)
        _agree(got, alone, ALONE_TOL, diagnostics=False)
        for key in ("locked", "weak", "central", "central_fallback"):
            assert got.diagnostics[key] == alone.diagnostics[key], key
        assert abs(got.diagnostics["delta"] - alone.diagnostics["delta"]) <= 1e-12 * abs(
            alone.diagnostics["delta"]
        )


def test_base_point_fallback_sample(backend, monkeypatch):
    """A sample whose forward point leaves a large multiplier on a row the ghost drops
    fails the base-point check: it alone gets the ``-delta`` solve (central fallback),
    in both paths alike."""
    samples = _samples(backend, shared=False, seed=3)
    s = samples[1]
    row = int(np.argmax(s.sol.slack))  # clearly inactive: dropped from the ghost
    lam = s.sol.ineq_dual.copy()
    lam[row] = 0.1
    from dataclasses import replace

    samples[1] = s._replace(sol=replace(s.sol, ineq_dual=lam))
    options = FFOOptions()
    fast = ffo_backward_batch(samples, options, batched=backend)
    steps = _steps(samples, options, backend, monkeypatch)
    for got, want in zip(fast, steps):
        _agree(got, want, STEPS_TOL)
    flags = [g.diagnostics["central_fallback"] for g in fast]
    assert flags == [k == 1 for k in range(len(samples))]
    assert fast[1].diagnostics["central"] and fast[1].diagnostics["base_error"] > 1e-3


class _Failing:
    """``backend`` whose ``solve_batch`` answers ``status`` for batch index ``bad`` of its
    first call (the ghosts at +delta)."""

    def __init__(self, backend, bad, status=Status.NUMERICAL_ERROR):
        self._inner, self.bad, self.status, self.calls = backend, bad, status, 0
        self.name = backend.name

    def solve(self, *args, **kwargs):
        return self._inner.solve(*args, **kwargs)

    def solve_batch(self, batch, extra=None):
        out = self._inner.solve_batch(batch, extra)
        self.calls += 1
        if self.calls == 1:
            out.status = list(out.status)
            out.status[self.bad] = self.status
        return out


def test_failed_ghost_is_that_samples_error(backend, monkeypatch):
    """A ghost that fails in the batch is its sample's GhostProblemError with its delta
    and batch index (the guard's); the other samples' gradients are unaffected."""
    from ffo_core.engine.solves import GuardedBackend

    samples = _samples(backend)
    samples = [s._replace(backend=GuardedBackend(backend, 10 + k)) for k, s in enumerate(samples)]
    options = FFOOptions()
    fast = ffo_backward_batch(samples, options, batched=_Failing(backend, 3))
    steps = _steps(samples, options, _Failing(backend, 3), monkeypatch)
    assert isinstance(fast[3], GhostProblemError) and fast[3].batch_index == 13
    assert "delta=" in str(fast[3]) and fast[3].status is Status.NUMERICAL_ERROR
    for got, want in zip(fast, steps):
        _agree(got, want, STEPS_TOL)


@pytest.mark.parametrize("vectorised", [True, False])
def test_inaccurate_ghost_follows_the_guards_policy(backend, vectorised, monkeypatch):
    """A batched ghost answered OPTIMAL_INACCURATE meets its sample's ``inaccurate`` policy
    as a per-sample guard applies it: "raise" makes it that sample's GhostProblemError,
    "warn" warns and keeps the gradient, "ignore" keeps it silently."""
    import warnings

    from ffo_core.engine.solves import GuardedBackend
    from ffo_core.errors import InaccurateSolutionWarning

    if not vectorised:
        monkeypatch.setattr(schedule, "polyhedral_applies", lambda s: False)
    base = _samples(backend)
    options = FFOOptions()
    clean = ffo_backward_batch(base, options, batched=backend)
    for policy in ("raise", "warn", "ignore"):
        samples = [
            s._replace(backend=GuardedBackend(backend, 10 + k, ghost=True, inaccurate=policy))
            for k, s in enumerate(base)
        ]
        faulty = _Failing(backend, 2, Status.OPTIMAL_INACCURATE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ffo_backward_batch(samples, options, batched=faulty)
        warned = [w for w in caught if issubclass(w.category, InaccurateSolutionWarning)]
        if policy == "raise":
            assert isinstance(got[2], GhostProblemError) and got[2].batch_index == 12
            assert got[2].status is Status.OPTIMAL_INACCURATE and "inaccurate" in str(got[2])
        else:
            _agree(got[2], clean[2], STEPS_TOL)
        assert len(warned) == (1 if policy == "warn" else 0)
        assert all("batch index 12" in str(w.message) for w in warned)
        for k in (0, 1, 3, 4, 5):
            _agree(got[k], clean[k], STEPS_TOL)


def test_box_qp_closed_form(backend):
    """``min 1/2||y||^2 + q'y, -1 <= y <= 1``: ``y = clip(-q)``, so the gradient of
    ``w'y`` is ``dq_i = -w_i`` where the bound is inactive and 0 where it is active (and
    ``dh`` is ``w`` on the active rows' sign); the vectorised path against it."""
    rng = np.random.default_rng(5)
    B, n = 16, 12
    G = sp.csc_matrix(np.vstack([np.eye(n), -np.eye(n)]))
    h = ConeConstraints(G, np.ones(2 * n), ConeDims(nonneg=2 * n))
    e = Equalities(sp.csc_matrix((0, n)), np.zeros(0))
    P = sp.identity(n, format="csc")
    Q = rng.uniform(-2, 2, (B, n))
    W = rng.standard_normal((B, n))
    data = [(Objective(P, q), h, e) for q in Q]
    sols = solve_problems(backend, problem_batch(data))
    samples = [FFOSample(backend, *d, sol, w) for d, sol, w in zip(data, sols, W)]
    assert batch_backward.applies(samples)
    grads = ffo_backward_batch(samples, FFOOptions(), batched=backend)
    inactive = np.abs(Q) < 1
    Y = np.array([s.primal for s in sols])
    assert np.abs(Y - np.clip(-Q, -1, 1)).max() <= 1e-7
    dq = np.array([g.q for g in grads])
    assert np.abs(dq - np.where(inactive, -W, 0.0)).max() <= 1e-7 * np.abs(W).max()
    # y_i = 1 on row i (upper bound active when q_i < -1): dy_i/dh_i = 1
    dh = np.array([g.h for g in grads])
    upper = np.where(Q < -1, W, 0.0)
    lower = np.where(Q > 1, -W, 0.0)
    assert np.abs(dh - np.concatenate([upper, lower], axis=1)).max() <= 1e-7 * np.abs(W).max()


def test_curved_cones_keep_the_per_sample_bookkeeping():
    """SOC blocks (and a rescaled solve) are not this path's: :func:`applies` is False."""
    from ffo_core.protocol import Solution, SolveInfo

    g = Objective(None, np.ones(3))
    h = ConeConstraints(sp.csc_matrix(np.eye(3)), np.ones(3), ConeDims(soc=(3,)))
    e = Equalities(sp.csc_matrix((0, 3)), np.zeros(0))
    sol = Solution(Status.OPTIMAL, np.zeros(3), np.zeros(0), np.zeros(3), np.ones(3))
    assert not batch_backward.applies([FFOSample(None, g, h, e, sol, np.ones(3))])
    h = ConeConstraints(sp.csc_matrix(np.eye(3)), np.ones(3), ConeDims(nonneg=3))
    assert batch_backward.applies([FFOSample(None, g, h, e, sol, np.ones(3))])
    scaled = Solution(
        Status.OPTIMAL, np.zeros(3), np.zeros(0), np.zeros(3), np.ones(3),
        SolveInfo(extra={"scaling": object()}),
    )  # fmt: skip
    assert not batch_backward.applies([FFOSample(None, g, h, e, scaled, np.ones(3))])


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_layer_sparse_shared_matrices_sum_as_one_product(backend, monkeypatch):
    """Through ``FFOQPLayer`` with sparse ``Q``, ``G``, ``A`` shared by the batch: the
    gradient of each (the batch's sum, one rank-2B product on the pattern) equals the
    per-sample bookkeeping's to 1e-12, and the dense inputs' gradient on the pattern."""
    import torch

    from ffo_core import FFOQPLayer
    from ffo_core.layers import runtime

    rng = np.random.default_rng(11)
    B, n, m, p = 6, 10, 12, 2
    P, _, G, h, A, b = _problem(rng, n, m, p)
    q = torch.tensor(rng.standard_normal((B, n)))
    W = torch.tensor(rng.standard_normal((B, n)))

    def coo(M):
        M = sp.coo_matrix(M)
        idx = torch.tensor(np.vstack([M.row, M.col]), dtype=torch.long)
        return torch.sparse_coo_tensor(idx, torch.tensor(M.data), M.shape).coalesce()

    dense = [torch.tensor(M.toarray()) for M in (P, G, A)]
    h_t, b_t = torch.tensor(h + 0.5), torch.tensor(b)

    def run(mats):
        leaves = [M.clone().requires_grad_() for M in mats]
        Q_, G_, A_ = leaves
        y = FFOQPLayer(backend.name, n_jobs=1)(Q_, q, G_, h_t, A_, b_t)
        (y * W).sum().backward()
        return [M.grad.to_dense() if M.grad.is_sparse else M.grad for M in leaves]

    fast = run([coo(M) for M in (P, G, A)])
    with monkeypatch.context() as mp:
        mp.setattr(schedule, "polyhedral_applies", lambda s: False)
        mp.setattr(runtime, "polyhedral_applies", lambda s: False)
        steps = run([coo(M) for M in (P, G, A)])
    full = run(dense)
    for got, want, ref, M in zip(fast, steps, full, (P, G, A)):
        mask = torch.tensor(M.toarray() != 0)
        assert torch.all(got[~mask] == 0)
        assert _close(got.numpy(), want.numpy(), STEPS_TOL)
        assert _close(got[mask].numpy(), ref[mask].numpy(), 1e-9)
