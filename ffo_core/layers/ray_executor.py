"""``executor="ray"``: a batch's solves (forward and ghost) on a Ray cluster.

Install with ``pip install 'ffo[ray]'``; Ray is imported only when a layer asks for it.

How it works (``docs/scaling.md`` has the measurements):

* **Workers.**  A pool of Ray actors (:class:`_Worker`, one CPU each, spread over the
  nodes; by default one per CPU of the cluster) is started on first use and shared by every
  layer of the process.  Each actor solves one problem at a time with the same backend
  class and settings as the layer, built on the worker from ``(class, settings)``; the
  backend's ``availability()`` (package, licence) is checked *there*, and a worker that
  cannot run it says so by name (:class:`~ffo_core.errors.BackendUnavailable`) while the
  other workers carry on.
* **The proxy.**  :meth:`RayExecutor.backend` returns a :class:`RayBackend`: same ``name``
  and ``capabilities`` as the layer's backend, picklable, whose ``solve`` ships one
  problem to an actor and blocks on the answer (``resolve`` too, when the backend has one).
  :meth:`RayExecutor.runner` issues a batch's solves from enough threads (by default two
  per actor) to keep every actor busy.
* **What a call ships.**  Every array or matrix of a problem is keyed by a content hash
  (BLAKE2b, 16 bytes).  One seen a second time (a matrix the batch shares, the same data in
  a later call) is put once in Ray's object store and cached on each worker that needs it
  (a bounded LRU); later calls send its 16-byte key.  What goes by value is per-sample data
  only: vectors and matrices no other solve has used (a batched ``q``, a ghost problem's
  own rows), the extra linear term, and back the solution.  ``resolve`` (a ghost's second
  solve) goes to the actor that holds the first solve's set-up and sends the new term only.
* **Exactness.**  A worker runs the same backend on the same arrays (pickled exactly), so
  a solve's answer is bit for bit the local one, whatever the scheduling.  A ``resolve``
  whose set-up is gone (evicted, worker lost) is replayed from the first solve of its chain
  on any worker (same solves in the same order: same answer).
* **Failures.**  A backend's exception comes back as the same exception type with its
  attributes (a :class:`~ffo_core.errors.SolverError` keeps its status, and the guard
  adds the batch index as for a local solve), the remote traceback as ``__cause__``.  A
  worker lost mid-solve (killed, crashed, its node gone) is retried on another worker
  (``retries`` times); after that the call raises :class:`RayWorkerError` naming the batch
  index.  Every wait polls, so nothing hangs on a dead worker.
* **Ctrl-C.**  A ``KeyboardInterrupt`` (or any error) in the caller cancels the batch: tasks
  not yet started are cancelled (Ray's ``cancel``, and a message to every actor so that
  tasks already queued there are skipped), and the caller gets the exception within about
  :data:`POLL_SECONDS`; solves already running finish on their worker and are discarded.

Which cluster: the one this process is connected to (``ray.init(...)`` by the user);
otherwise ``executor="ray://HOST:PORT"`` connects there (Ray Client), ``"ray"`` connects
to ``RAY_ADDRESS`` when that is set, and else starts a runtime on this machine only
(:func:`start_local`).  :func:`shutdown` stops the workers (and the local runtime if this
module started it).

Layout: this module holds the public part (:class:`RayExecutor`, :class:`RayRunner`,
:data:`DEFAULTS`) and re-exports the rest from the private package
:mod:`ffo_core.layers._ray` (its docstring lists the modules: what is shipped, the worker,
the pool, the cluster, the proxy, the errors).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..engine.solves import BatchRunner
from ..errors import ConfigError

# The parts; a name imported as itself is only re-exported (every name this module defined
# before its parts moved to ._ray stays importable from here).
from ._ray import cluster as _cluster
from ._ray import worker as _worker
from ._ray.cluster import _EXTRA as _EXTRA
from ._ray.cluster import _LOOPBACK_ENV as _LOOPBACK_ENV
from ._ray.cluster import _POOLS as _POOLS
from ._ray.cluster import _POOLS_LOCK as _POOLS_LOCK
from ._ray.cluster import _connect as _connect
from ._ray.cluster import _import_ray, _pool, shutdown, start_local
from ._ray.cluster import _session as _session
from ._ray.errors import RayWorkerError
from ._ray.errors import _Cancelled as _Cancelled
from ._ray.errors import _RemoteTraceback as _RemoteTraceback
from ._ray.pool import POLL_SECONDS
from ._ray.pool import _Pool as _Pool
from ._ray.pool import logger as logger
from ._ray.proxy import RayBackend, _ResolvingRayBackend
from ._ray.proxy import _rebuild_backend as _rebuild_backend
from ._ray.shipping import _LRU as _LRU
from ._ray.shipping import KEY_MIN_BYTES as KEY_MIN_BYTES
from ._ray.shipping import TOKEN_KEY as TOKEN_KEY
from ._ray.shipping import BackendSpec
from ._ray.shipping import _Backend as _Backend
from ._ray.shipping import _content_key as _content_key
from ._ray.shipping import _for_caller as _for_caller
from ._ray.shipping import _keyable as _keyable
from ._ray.shipping import _Keyed as _Keyed
from ._ray.shipping import _nbytes as _nbytes
from ._ray.shipping import _Request as _Request
from ._ray.shipping import _shippable as _shippable
from ._ray.shipping import _strip as _strip
from ._ray.shipping import _Whole as _Whole
from ._ray.state import _CURRENT, _Run
from ._ray.state import _Slot as _Slot
from ._ray.state import _Token as _Token
from ._ray.worker import _actor_class as _actor_class
from ._ray.worker import _Worker as _Worker
from .executors import Executor

T = TypeVar("T")

# The public classes defined in the private package say they live here, as does the
# function a pickled RayBackend names: tracebacks, reprs and pickles name this module, which
# stays put when the private package is reorganised.
for _public in (RayWorkerError, BackendSpec, RayBackend, _rebuild_backend):
    _public.__module__ = __name__
del _public


def __getattr__(name: str) -> Any:
    """The private package's module state that is rebound (``_ACTOR``, ``_STARTED_LOCAL``),
    read live."""
    if name == "_ACTOR":
        return _worker._ACTOR
    if name == "_STARTED_LOCAL":
        return _cluster._STARTED_LOCAL
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RayRunner(BatchRunner):
    """Issues a batch's solves from ``jobs(batch)`` threads (default: two per worker, so a
    worker never waits for its next problem), always in parallel (no thread-count probing:
    the work is on the workers).  An exception in the caller -- a failed sample, a
    ``KeyboardInterrupt`` -- cancels the batch's outstanding tasks before it propagates;
    the lowest failing batch index's exception is the one raised, as with threads."""

    def __init__(self, backend, executor: RayExecutor) -> None:
        super().__init__(backend, executor.n_jobs)
        self.executor = executor

    def jobs(self, batch: int) -> int:
        if self.n_jobs is not None:
            return max(1, min(self.n_jobs, batch))
        pool = _pool(self.executor)
        return max(1, min(batch, 2 * len(pool.slots)))

    def run(self, phase: str, fn: Callable[[int], T], batch: int) -> list[T]:
        if batch <= 0:
            return []
        pool = _pool(self.executor)
        run = _Run(phase)

        def one(i: int) -> T:
            _CURRENT.run, _CURRENT.index = run, i
            try:
                return fn(i)
            finally:
                _CURRENT.run = _CURRENT.index = None

        threads = ThreadPoolExecutor(self.jobs(batch), thread_name_prefix="ffo-ray")
        futures = [threads.submit(one, i) for i in range(batch)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.cancel(run)
            raise
        finally:
            threads.shutdown(wait=True, cancel_futures=True)


DEFAULTS = {
    "actors": None,  # one per CPU of the cluster
    "retries": 2,
    "cache_bytes": 1 << 30,  # structure kept in the object store by this process
    "worker_cache_bytes": 1 << 30,  # structure cached by each worker
    "kept": 32,  # set-ups each worker keeps for resolve
    "start_timeout": 120.0,
}


class RayExecutor(Executor):
    """``executor="ray"`` / ``"ray://HOST:PORT"`` (module docstring).

    Args:
        spec: ``"ray"`` or ``"ray://HOST:PORT"``.
        n_jobs: solves in flight at once (caller threads; default two per worker).
        actors: workers to start (default: one per CPU of the cluster; shared by every
            layer of the process, so the largest request wins).
        retries: tries on another worker when a worker is lost mid-solve (default 2).
        cache_bytes, worker_cache_bytes: bounds of the structure kept in the object store
            by this process and cached by each worker (default 1 GiB each).
        kept: solver set-ups each worker keeps for ``resolve`` (default 32).
        start_timeout: seconds to wait for workers to start (default 120).
    """

    def __init__(self, spec: str = "ray", n_jobs: int | None = None, **options: Any) -> None:
        if not (spec == "ray" or (isinstance(spec, str) and spec.startswith("ray://"))):
            raise ConfigError(f"RayExecutor spec must be 'ray' or 'ray://HOST:PORT', got {spec!r}")
        if spec.startswith("ray://") and len(spec) <= len("ray://"):
            raise ConfigError("executor='ray://HOST:PORT' needs a host and port")
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ConfigError(
                f"unknown RayExecutor option(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}"
            )
        if n_jobs is not None and (
            not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs < 1
        ):
            raise ConfigError(f"n_jobs must be a positive int or None, got {n_jobs!r}")
        _import_ray()
        super().__init__(n_jobs)
        self.spec = spec
        self.options = {**DEFAULTS, **options}
        self._bound: _Pool | None = None  # the pool it last used (see _pool)

    def __getstate__(self):
        return {**self.__dict__, "_bound": None}

    def backend(self, backend: Any) -> RayBackend:
        if isinstance(backend, RayBackend):
            return backend
        cls = _ResolvingRayBackend if callable(getattr(backend, "resolve", None)) else RayBackend
        return cls(self, backend)

    def runner(self, backend: Any) -> RayRunner:
        return RayRunner(backend, self)

    def stats(self, workers: bool = True) -> dict:
        """Counters of this process's pool (caller side: solves, retries, bytes sent by
        value and received, keys sent, structure put in the object store) and, with
        ``workers=True``, each worker's (solves, cache hits, fetches and bytes fetched,
        kept set-ups, replays, cancelled tasks skipped)."""
        return _pool(self).stats(workers)

    def workers(self) -> list[dict]:
        """Each worker's ``pid``, ``ip`` and ``node_id``."""
        return [dict(s.info) for s in _pool(self).slots]

    def __repr__(self) -> str:
        return f"RayExecutor({self.spec!r})"


__all__ = [
    "POLL_SECONDS",
    "BackendSpec",
    "RayBackend",
    "RayExecutor",
    "RayRunner",
    "RayWorkerError",
    "shutdown",
    "start_local",
]
