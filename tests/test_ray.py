"""executor="ray": a batch's solves on a local Ray runtime (2 CPUs, started once for the
module), against the local thread pool on the same solver and inputs.

The claim checked is bit-for-bit equality (``torch.equal``; the issue's bar is 1e-12):
a worker runs the same backend on the same arrays.  Also: structure is shipped once, a
sample's failure keeps its type and batch index, a killed worker neither hangs a call nor
changes its numbers, and Ctrl-C cancels a batch.
"""

from __future__ import annotations

import _thread
import copy
import importlib.util
import logging
import os
import signal
import sys
import threading
import time

import cvxpy as cp
import numpy as np
import pytest
import torch

from ffo_backends.clarabel import ClarabelBackend
from ffo_core import FFOLayer, FFOQPLayer
from ffo_core.errors import BackendUnavailable, GhostProblemError, SolverError
from ffo_core.layers.executors import Executor
from ffo_core.protocol import ConeConstraints, ConeDims, Equalities, Objective, Status

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAVE_RAY, reason="ray is not installed (pip install 'ffo[ray]'): executor='ray' untested"
)
TIGHT = "clarabel:tol_gap_abs=1e-10,tol_gap_rel=1e-10,tol_feas=1e-10"


def test_missing_ray_is_a_typed_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(BackendUnavailable, match=r"ffo\[ray\]"):
        Executor.of("ray")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray runtime with 2 CPUs for this module; shut down at its end."""
    import ray

    from ffo_core.layers import ray_executor

    # the test backends below travel by value (the workers cannot import this module)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray_executor.start_local(num_cpus=2, logging_level=logging.ERROR)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # local only
    try:
        yield ray
    finally:
        ray_executor.shutdown()
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# -- problems -------------------------------------------------------------------------------
def qp_inputs(batch=6, n=30, m=24, p=3, seed=0):
    """A batch of strictly convex QPs (batched p and h, shared Q, G, A, b), feasible at 0."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((n, n)) / np.sqrt(n)
    Q = L @ L.T + np.eye(n)
    G = rng.standard_normal((m, n))
    h = rng.uniform(0.1, 1.0, (batch, m))
    A = rng.standard_normal((p, n))
    b = np.zeros(p)
    q = 3 * rng.standard_normal((batch, n))
    return [torch.tensor(x) for x in (Q, q, G, h, A, b)]


def socp_layer(solver="clarabel", **options):
    """min q'y + 1/2 ||y||^2 s.t. ||y|| <= r, y >= -c: the cone active for most q."""
    n = 12
    y = cp.Variable(n)
    q, r, c = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(q @ y + 0.5 * cp.sum_squares(y)), [cp.norm(y, 2) <= r, y >= -c])
    return FFOLayer(prob, [q, r, c], [y], solver=solver, **options)


def socp_inputs(batch=6, seed=1):
    rng = np.random.default_rng(seed)
    q = torch.tensor(3 * rng.standard_normal((batch, 12)))
    return [q, torch.tensor(1.0), torch.full((12,), 0.4, dtype=torch.float64)]


def run(layer, inputs, weights_seed=2):
    """Output and the gradient of every input of ``sum(w * y)``."""
    ts = [t.clone().requires_grad_(True) for t in inputs]
    out = layer(*ts)
    y = out[0] if isinstance(out, tuple) else out
    w = torch.tensor(np.random.default_rng(weights_seed).standard_normal(y.shape))
    (w * y).sum().backward()
    return [y.detach()] + [t.grad for t in ts]


def assert_identical(a, b):
    for k, (x, z) in enumerate(zip(a, b)):
        assert x is not None and z is not None, k
        diff = float((x - z).abs().max()) if x.numel() else 0.0
        assert diff <= 1e-12, (k, diff)
        assert torch.equal(x, z), f"tensor {k}: equal to {diff:.1e} but not bit for bit"


# -- equality with the thread pool ------------------------------------------------------------
@needs_ray
@pytest.mark.parametrize(
    "backward,central", [("ffo", None), ("ffo", True), ("kkt", None)], ids=["ffo", "central", "kkt"]
)
def test_qp_layer_matches_threads(cluster, backward, central):
    inputs = qp_inputs()
    local = run(FFOQPLayer(TIGHT, backward=backward, central=central), inputs)
    remote = run(FFOQPLayer(TIGHT, backward=backward, central=central, executor="ray"), inputs)
    assert_identical(local, remote)


@needs_ray
@pytest.mark.parametrize("backward", ["ffo", "kkt"])
def test_cvxpy_layer_socp_matches_threads(cluster, backward):
    inputs = socp_inputs()
    local = run(socp_layer(backward=backward), inputs)
    layer = socp_layer(backward=backward, executor="ray")
    remote = run(layer, inputs)
    assert_identical(local, remote)
    if backward == "ffo":  # curved: central differences, the second solve a resolve
        assert all(d["central"] for d in layer.last_diagnostics)


@needs_ray
def test_cvxpy_layer_qp_matches_threads_and_survives_a_copy(cluster):
    n = 20
    y = cp.Variable(n)
    q = cp.Parameter(n)
    prob = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), [y >= -1, y <= 0, cp.sum(y) <= 3]
    )
    inputs = [torch.tensor(np.random.default_rng(3).standard_normal((8, n)))]
    local = run(FFOLayer(prob, [q], [y], solver=TIGHT), inputs)
    layer = FFOLayer(prob, [q], [y], solver=TIGHT, executor="ray")
    assert_identical(local, run(layer, inputs))
    assert_identical(local, run(copy.deepcopy(layer), inputs))  # proxies pickle


# -- what a call ships --------------------------------------------------------------------------
@needs_ray
def test_a_second_call_ships_no_structure(cluster):
    batch, n, m = 8, 40, 600  # every shared array over the by-value threshold but A, b
    layer = FFOQPLayer(TIGHT, executor="ray", polish=False)  # count the forward solves only
    Q, q, G, h, _, _ = qp_inputs(batch=batch, n=n, m=m)
    h = h[0]  # shared
    rng = np.random.default_rng(5)
    layer(Q, q, G, h)  # the first call ships the structure

    def call():
        before = layer.executor.stats()
        layer(Q, torch.tensor(rng.standard_normal((batch, n))), G, h)
        after = layer.executor.stats()
        caller = {k: after["caller"][k] - before["caller"][k] for k in after["caller"]}
        fetched = sum(w["fetched_bytes"] for w in after["workers"]) - sum(
            w["fetched_bytes"] for w in before["workers"]
        )
        return caller, fetched

    for _ in range(2):
        caller, fetched = call()
        assert caller["solves"] == batch
        assert caller["puts"] == 0 and caller["refs_sent"] == 0 and fetched == 0, caller
        per_sample = caller["bytes_sent"] / batch
        # by value: q (n floats) and the empty A's column pointers; Q, G, h go as keys
        assert n * 8 <= per_sample < n * 8 + 4 * (n + 1) + 64, per_sample
        assert caller["bytes_received"] == batch * 8 * (n + 2 * m)  # y, lam, s


# -- failures -------------------------------------------------------------------------------------
class PoisonedClarabel(ClarabelBackend):
    """Clarabel, except that a problem with ``q[0] == 7`` (a value well inside what the
    engine's rescaling leaves alone, so the backend sees it) raises inside ``solve``:
    ``mode`` "solver" a SolverError with a status, "python" a ValueError."""

    def setting_names(self):
        return [*super().setting_names(), "mode"]

    def _settings(self):
        kept = dict(self.settings)
        self.settings = {k: v for k, v in kept.items() if k != "mode"}
        try:
            return super()._settings()
        finally:
            self.settings = kept

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        if g.q[0] == 7.0:
            if self.settings.get("mode") == "solver":
                raise SolverError("the solver gave up", status=Status.NUMERICAL_ERROR)
            raise ValueError("bad input on purpose")
        return super().solve(g, h, e, extra_linear_term, warm_start=warm_start)


@needs_ray
@pytest.mark.parametrize("mode", ["solver", "python"])
def test_a_samples_failure_keeps_its_type_and_batch_index(cluster, mode):
    Q, q, G, h, A, b = qp_inputs()
    q[3, 0] = 7.0
    errors = []
    for executor in ("threads", "ray"):
        layer = FFOQPLayer(PoisonedClarabel(mode=mode), executor=executor)
        with pytest.raises(SolverError) as info:
            layer(Q, q, G, h, A, b)
        errors.append(info.value)
    local, remote = errors
    assert type(remote) is type(local) is SolverError
    assert remote.batch_index == local.batch_index == 3
    assert remote.status == local.status
    assert remote.backend == local.backend == "clarabel"
    assert str(remote) == str(local)
    if mode == "python":
        assert type(remote.__cause__) is ValueError
    cause = remote.__cause__ if mode == "solver" else remote.__cause__.__cause__
    assert "on the Ray worker" in str(cause)  # the remote traceback travels


class GhostPoisonedClarabel(ClarabelBackend):
    """Clarabel whose ghost solves (those with an extra linear term) fail for a term
    whose first entry is nonzero (only sample 2 of the test has one)."""

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        if extra_linear_term is not None and extra_linear_term[0] != 0.0:
            raise SolverError("ghost refused on purpose", status=Status.NUMERICAL_ERROR)
        return super().solve(g, h, e, extra_linear_term, warm_start=warm_start)

    def resolve(self, previous, g, h, e, extra_linear_term):
        return self.solve(g, h, e, extra_linear_term)


@needs_ray
def test_a_ghost_failure_is_a_ghost_error_with_its_index(cluster):
    inputs = qp_inputs()
    errors = []
    for executor in ("threads", "ray"):
        layer = FFOQPLayer(GhostPoisonedClarabel(), executor=executor)
        q = inputs[1].clone().requires_grad_(True)
        y = layer(inputs[0], q, *inputs[2:])
        c = torch.zeros_like(y)
        c[:, 1] = 1.0
        c[2, 0] = 1.0  # only sample 2's ghost has a term with a nonzero first entry
        with pytest.raises(GhostProblemError) as info:
            y.backward(c)
        errors.append(info.value)
    local, remote = errors
    assert type(remote) is type(local) is GhostProblemError
    assert remote.batch_index == local.batch_index == 2
    assert str(remote) == str(local)


def _in_ray_worker() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


class WorkerlessClarabel(ClarabelBackend):
    """Clarabel that cannot run on a Ray worker (as GUROBI without a licence there)."""

    @classmethod
    def availability(cls):
        if _in_ray_worker():
            return False, "no licence on this machine (test)"
        return super().availability()


@needs_ray
def test_a_backend_unavailable_on_the_workers_says_so_by_name(cluster):
    Q, q, G, h, A, b = qp_inputs()
    layer = FFOQPLayer(WorkerlessClarabel(), executor="ray")
    with pytest.raises(BackendUnavailable, match=r"'clarabel' cannot run on Ray worker") as info:
        layer(Q, q, G, h, A, b)
    assert "no licence on this machine (test)" in str(info.value)


# -- resolve: kept on its worker, or replayed --------------------------------------------------
@needs_ray
def test_resolve_kept_or_replayed_is_the_local_resolve(cluster):
    """The ghost's second solve: on the worker that kept the first one's set-up, or (that
    worker lost) the chain replayed on any worker -- either way the local answer."""
    import scipy.sparse as sp

    from ffo_core.layers.ray_executor import TOKEN_KEY, RayExecutor

    rng = np.random.default_rng(7)
    n = 15  # min 1/2 ||y||^2 + q'y  s.t.  ||y|| <= 1 (active: ||q|| > 1)
    g = Objective(sp.csc_matrix(np.eye(n)), 3 * rng.standard_normal(n))
    G = sp.csc_matrix(np.vstack([np.zeros(n), -np.eye(n)]))
    h = ConeConstraints(G, np.r_[1.0, np.zeros(n)], ConeDims(soc=(n + 1,)))
    e = Equalities(sp.csc_matrix((0, n)), np.zeros(0))
    t1, t2, t3 = (1e-3 * rng.standard_normal(n) for _ in range(3))
    local = ClarabelBackend()
    s1 = local.solve(g, h, e, t1)
    s2 = local.resolve(s1, g, h, e, t2)
    s3 = local.resolve(s2, g, h, e, t3)
    executor = RayExecutor()
    proxy = executor.backend(ClarabelBackend())
    before = executor.stats()["workers"]
    r1 = proxy.solve(g, h, e, t1)
    r2 = proxy.resolve(r1, g, h, e, t2)  # kept on its worker
    r2.info.extra[TOKEN_KEY].generation = -1  # as if that worker were lost: replay
    r3 = proxy.resolve(r2, g, h, e, t3)
    after = executor.stats()["workers"]
    assert sum(w["kept_hits"] for w in after) - sum(w["kept_hits"] for w in before) == 1
    assert sum(w["replays"] for w in after) - sum(w["replays"] for w in before) == 1
    assert not np.array_equal(s1.primal, s2.primal)  # the terms move the solution
    for a, b in ((s1, r1), (s2, r2), (s3, r3)):
        for field in ("primal", "eq_dual", "ineq_dual", "slack"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field


# -- a killed worker, Ctrl-C ---------------------------------------------------------------------
class SlowClarabel(ClarabelBackend):
    """Clarabel that takes ``delay`` seconds more per solve (a heavy problem, cheaply)."""

    def setting_names(self):
        return [*super().setting_names(), "delay"]

    def _settings(self):
        kept = dict(self.settings)
        self.settings = {k: v for k, v in kept.items() if k != "delay"}
        try:
            return super()._settings()
        finally:
            self.settings = kept

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        time.sleep(self.settings.get("delay", 0.0))
        return super().solve(g, h, e, extra_linear_term, warm_start=warm_start)


@needs_ray
def test_a_killed_worker_neither_hangs_nor_changes_the_numbers(cluster):
    inputs = qp_inputs(batch=24)
    local = run(FFOQPLayer(TIGHT), inputs)
    layer = FFOQPLayer(SlowClarabel(delay=0.1, **_tight()), executor="ray")
    victim = layer.executor.workers()[0]["pid"]
    before = layer.executor.stats(workers=False)["caller"]
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = layer.executor.stats(workers=False)["caller"]["solves"] - before["solves"]
            if done >= 4:  # mid-batch: some solves done, most still to go
                os.kill(victim, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    start = time.monotonic()
    remote = run(layer, inputs)
    elapsed = time.monotonic() - start
    thread.join()
    assert killed.is_set()
    assert_identical(local, remote)
    after = layer.executor.stats(workers=False)["caller"]
    assert after["retries"] > before["retries"]  # the lost solves were sent again
    assert elapsed < 60
    assert victim not in [w["pid"] for w in layer.executor.stats()["workers"]]  # restarted


def _tight():
    return {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}


@needs_ray
def test_ctrl_c_cancels_the_batch(cluster):
    Q, q, G, h, A, b = qp_inputs(batch=40)
    layer = FFOQPLayer(SlowClarabel(delay=0.1), executor="ray")
    layer(Q, q[:2], G, h[:2], A, b)  # workers started and warm
    before = sum(w["solves"] for w in layer.executor.stats()["workers"])
    timer = threading.Timer(0.5, _thread.interrupt_main)
    start = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        layer(Q, q, G, h, A, b)
    reached = time.monotonic() - start
    timer.join()
    assert reached < 0.5 + 1.5  # the caller hears of it within about a poll
    time.sleep(0.5)  # what was running finishes; what was queued is skipped
    stats = layer.executor.stats()["workers"]
    ran = sum(w["solves"] for w in stats) - before
    assert ran < 20, ran  # 40 solves of 0.1 s on 2 workers take 2 s; it ran ~0.5 s
    y = layer(Q, q[:3], G, h[:3], A, b)  # usable again
    assert torch.equal(y, FFOQPLayer(SlowClarabel(delay=0.0))(Q, q[:3], G, h[:3], A, b))


class FatalClarabel(ClarabelBackend):
    """Clarabel whose process dies on a problem with ``q[0] == 7`` (a sample that
    kills its worker every time, as one that runs it out of memory)."""

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        if g.q[0] == 7.0 and _in_ray_worker():
            os._exit(1)
        return super().solve(g, h, e, extra_linear_term, warm_start=warm_start)


@needs_ray
def test_a_sample_that_kills_every_worker_is_a_typed_error_naming_it(cluster):
    from ffo_core.layers.ray_executor import RayWorkerError

    Q, q, G, h, A, b = qp_inputs()
    q[4, 0] = 7.0
    layer = FFOQPLayer(FatalClarabel(), executor="ray")
    start = time.monotonic()
    with pytest.raises(RayWorkerError, match="forward solve of batch index 4") as info:
        layer(Q, q, G, h, A, b)
    assert info.value.batch_index == 4 and info.value.phase == "forward"
    assert time.monotonic() - start < 60
    q[4, 0] = 0.5
    assert torch.equal(layer(Q, q, G, h, A, b), FFOQPLayer("clarabel")(Q, q, G, h, A, b))


@needs_ray
@pytest.mark.slow
def test_a_process_without_ray_gets_a_local_runtime_on_loopback():
    """executor="ray" in a process that never called ray.init: a runtime on this machine
    only (127.0.0.1) is started and used; after the user restarts Ray the layer starts new
    workers; ffo's shutdown() stops the runtime it started."""
    import subprocess

    script = """
import numpy as np, torch, ray
from ffo_core import FFOQPLayer
from ffo_core.layers import ray_executor
Q = torch.eye(5, dtype=torch.float64)
p = torch.tensor(np.random.default_rng(0).standard_normal((4, 5)))
G, h = -torch.eye(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
layer = FFOQPLayer("clarabel", executor="ray")
y = layer(Q, p, G, h)
assert torch.equal(y, FFOQPLayer("clarabel")(Q, p, G, h))
nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
ray.shutdown()  # the user restarts Ray: the layer's workers are gone with it
ray_executor.start_local(num_cpus=1)
assert torch.equal(layer(Q, p, G, h), y)
print(nodes)
ray_executor.shutdown()
print(ray.is_initialized())
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-3:-1] == ["['127.0.0.1']", "False"], out.stdout
