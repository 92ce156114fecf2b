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
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import pickle
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
import scipy.sparse as sp

from ..engine.solves import BatchRunner, backend_name
from ..errors import BackendUnavailable, ConfigError, FFOError
from ..protocol import ConeConstraints, Equalities, Objective, Solution, SolveInfo
from .executors import Executor

T = TypeVar("T")

logger = logging.getLogger("ffo_core")

#: How often (seconds) a waiting caller thread looks for a cancelled batch.
POLL_SECONDS = 0.2
#: Arrays and matrices smaller than this (bytes) always travel by value.
KEY_MIN_BYTES = 512
#: ``info.extra`` key of the token a :class:`RayBackend` answer carries for ``resolve``.
TOKEN_KEY = "ray_resolve"

_EXTRA = "pip install 'ffo[ray]'"


def _import_ray():
    """The ``ray`` module, or :class:`BackendUnavailable` naming the extra."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable(
            f"executor='ray' needs the Ray package, which is not installed here ({exc}); "
            f"install it with {_EXTRA}"
        ) from exc
    return ray


class RayWorkerError(FFOError):
    """A solve could not be completed on the Ray cluster: its worker was lost on every
    try (killed, crashed, out of memory, node gone), or no worker could start.

    Attributes:
        batch_index: the sample whose solve failed (None outside a batch).
        phase: ``"forward"`` or ``"backward"`` (None outside a batch).
    """

    def __init__(self, message: str, *, batch_index=None, phase=None):
        super().__init__(message)
        self.batch_index = batch_index
        self.phase = phase


class _RemoteTraceback(Exception):
    """The traceback of an exception raised on a Ray worker (set as its ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n--- on the Ray worker ---\n{self.tb}"


class _Keyed(NamedTuple):
    """An object sent by its content key; ``ref`` (an ObjectRef to it) travels with the
    key until the receiving worker is known to hold it."""

    key: bytes
    nbytes: int
    ref: Any = None


class _Backend(NamedTuple):
    """The backend of a request: its name and pickled ``(class, settings)`` (or the
    pickled object), by key."""

    name: str
    item: _Keyed


class _Request(NamedTuple):
    batch_id: bytes | None
    backend: _Backend
    parts: tuple | None  # (P, P_upper, q, G, h, dims, A, b), or None for a kept resolve
    term: np.ndarray | None
    warm_start: Solution | None
    kept_id: int | None  # resolve the set-up this worker kept under this id
    chain: tuple | None  # replay: the terms of the earlier solves of a resolve chain


# -- content keys ---------------------------------------------------------------------------
def _nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if sp.issparse(obj) and hasattr(obj, "indptr"):
        return obj.data.nbytes + obj.indices.nbytes + obj.indptr.nbytes
    return 0


def _content_key(obj) -> bytes:
    """16-byte BLAKE2b of an array's or compressed sparse matrix's type, shape, dtypes and
    bytes (equal keys: the same data for a solver; scipy's format flags are left out: they
    are facts about the data, set when first computed)."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(obj, np.ndarray):
        arrays = [obj]
        digest.update(b"nd")
    else:
        digest.update(f"{type(obj).__name__}{obj.shape}".encode())
        arrays = [obj.data, obj.indices, obj.indptr]
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.data if a.size else b"")
    return digest.digest()


def _keyable(obj) -> bool:
    return _nbytes(obj) >= KEY_MIN_BYTES and (
        isinstance(obj, np.ndarray) or (sp.issparse(obj) and hasattr(obj, "indptr"))
    )


# -- the worker ------------------------------------------------------------------------------
class _LRU:
    """An LRU dict bounded by a total size (bytes) or count."""

    def __init__(self, limit: int, size: Callable[[Any], int] = lambda v: 1) -> None:
        self.limit, self.size, self.total = limit, size, 0
        self.items: OrderedDict = OrderedDict()

    def get(self, key, default=None):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return default

    def pop(self, key, default=None):
        if key not in self.items:
            return default
        value = self.items.pop(key)
        self.total -= self.size(value)
        return value

    def put(self, key, value) -> None:
        self.pop(key)
        self.items[key] = value
        self.total += self.size(value)
        while self.total > self.limit and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.total -= self.size(old)

    def __len__(self) -> int:
        return len(self.items)


def _shippable(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, np.number, np.ndarray)):
        return True
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _for_caller(sol: Solution) -> Solution:
    """``sol`` without the ``info.extra`` entries that cannot travel (a kept solver)."""
    extra = sol.info.extra
    if not extra or all(_shippable(v) for v in extra.values()):
        return sol
    info = SolveInfo(
        sol.info.iterations,
        sol.info.solve_time,
        sol.info.accuracy,
        sol.info.raw_status,
        {k: v for k, v in extra.items() if _shippable(v)},
    )
    return Solution(sol.status, sol.primal, sol.eq_dual, sol.ineq_dual, sol.slack, info)


class _Worker:
    """A Ray actor that solves problems for :class:`RayBackend` (one at a time).

    Keeps, in bounded LRUs: the structure it was sent (by content key, up to
    ``cache_bytes``), the backends built from their ``(class, settings)``, and the last
    ``kept`` solves of a backend with ``resolve`` (for the ghost's second solve)."""

    def __init__(self, cache_bytes: int, kept: int) -> None:
        self.cache = _LRU(cache_bytes, size=lambda v: v[1])
        self.backends: dict = {}
        self.kept = _LRU(kept)
        self.ids = itertools.count(1)
        self.cancelled = _LRU(1024)
        self.control = threading.Lock()  # cancel() runs in its own thread
        self.counts = dict.fromkeys(
            (
                "solves", "hits", "fetches", "fetched_bytes", "inline_bytes", "kept_hits",
                "replays", "cancelled", "missing", "errors",
            ),
            0,
        )  # fmt: skip

    def hello(self) -> dict:
        import ray

        return {
            "pid": os.getpid(),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def stats(self) -> dict:
        return {
            **self.counts,
            "cached": len(self.cache),
            "cached_bytes": self.cache.total,
            "kept": len(self.kept),
            "pid": os.getpid(),
        }

    def cancel(self, batch_id: bytes) -> None:
        with self.control:
            self.cancelled.put(batch_id, True)

    def _where(self) -> str:
        import ray

        return f"Ray worker {ray.util.get_node_ip_address()} (pid {os.getpid()})"

    def _get(self, item, missing: list) -> Any:
        """An item's value: itself, or a keyed object from the cache or the object store."""
        if not isinstance(item, _Keyed):
            self.counts["inline_bytes"] += _nbytes(item)
            return item
        found = self.cache.get(item.key)
        if found is not None:
            self.counts["hits"] += 1
            return found[0]
        if item.ref is None:
            missing.append(item.key)
            return None
        import ray

        value = ray.get(item.ref[0])
        self.counts["fetches"] += 1
        self.counts["fetched_bytes"] += item.nbytes
        self.cache.put(item.key, (value, max(item.nbytes, 1)))
        return value

    def _backend(self, spec: _Backend, payload: bytes):
        found = self.backends.get(spec.item.key)
        if found is not None:
            return found
        import ray.cloudpickle as cloudpickle

        try:
            made = cloudpickle.loads(payload)
        except Exception as exc:
            raise BackendUnavailable(
                f"backend {spec.name!r} cannot be loaded on {self._where()}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        cls, settings = made if isinstance(made, tuple) else (type(made), None)
        check = getattr(cls, "availability", None)
        if callable(check):
            ok, reason = check()
            if not ok:
                raise BackendUnavailable(
                    f"backend {spec.name!r} cannot run on {self._where()}: {reason}"
                )
        backend = cls(**settings) if settings is not None else made
        if len(self.backends) >= 16:  # a few settings alternate; more is a loop
            self.backends.clear()
        self.backends[spec.item.key] = backend
        return backend

    def solve(self, req: _Request):
        """``("ok", Solution, kept_id)``, ``("missing", keys, kept_missing)``,
        ``("error", pickled exception or None, type name, message, traceback)`` or
        ``("cancelled",)``."""
        if req.batch_id is not None:
            with self.control:
                skip = self.cancelled.get(req.batch_id)
        else:
            skip = False
        if skip:
            self.counts["cancelled"] += 1
            return ("cancelled",)
        try:
            return self._solve(req)
        except Exception as exc:
            self.counts["errors"] += 1
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            try:
                import ray.cloudpickle as cloudpickle

                blob = cloudpickle.dumps(exc)
            except Exception:
                blob = None
            return ("error", blob, type(exc).__name__, str(exc), tb)

    def _solve(self, req: _Request):
        missing: list = []
        payload = self._get(req.backend.item, missing)
        parts = None if req.parts is None else [self._get(p, missing) for p in req.parts]
        if missing:
            self.counts["missing"] += 1
            return ("missing", missing, False)
        backend = self._backend(req.backend, payload)
        if req.kept_id is not None:
            entry = self.kept.pop(req.kept_id)
            if entry is None:
                self.counts["missing"] += 1
                return ("missing", [], True)
            self.counts["kept_hits"] += 1
            previous, g, h, e = entry
            sol = backend.resolve(previous, g, h, e, req.term)
        else:
            P, P_upper, q, G, hv, dims, A, b = parts
            if isinstance(P, _Whole):  # objects of other types than the protocol's
                g, h, e = P.objects
            else:
                g = Objective(P, q, P_upper)
                h, e = ConeConstraints(G, hv, dims), Equalities(A, b)
            if req.chain is not None:  # a resolve whose set-up is not here: replay it
                self.counts["replays"] += 1
                first, *rest = req.chain
                sol = self._fresh(backend, g, h, e, first, req.warm_start)
                for term in rest:
                    sol = backend.resolve(sol, g, h, e, term)
                sol = backend.resolve(sol, g, h, e, req.term)
            else:
                sol = self._fresh(backend, g, h, e, req.term, req.warm_start)
        self.counts["solves"] += 1
        kept_id = None
        if callable(getattr(backend, "resolve", None)):
            kept_id = next(self.ids)
            self.kept.put(kept_id, (sol, g, h, e))
        return ("ok", _for_caller(sol), kept_id)

    @staticmethod
    def _fresh(backend, g, h, e, term, warm_start) -> Solution:
        if warm_start is None:
            return backend.solve(g, h, e, term)
        return backend.solve(g, h, e, term, warm_start=warm_start)


class _Whole(NamedTuple):
    """A problem whose objects are not the protocol's own dataclasses: sent whole."""

    objects: tuple


# -- the caller's side ---------------------------------------------------------------------
@dataclass
class _Slot:
    """One actor as the caller sees it."""

    index: int
    actor: Any
    info: dict
    in_flight: int = 0
    generation: int = 0  # bumped when the actor is lost (its caches are gone)
    known: set = field(default_factory=set)  # keys sent to this generation
    unable: dict = field(default_factory=dict)  # backend key -> why it cannot run here


class _Token:
    """What a :class:`RayBackend` answer carries for ``resolve``: where its set-up is kept,
    the problem objects it belongs to, and the chain of terms to replay it elsewhere."""

    __slots__ = ("chain", "generation", "kept_id", "objects", "pool", "slot", "warm_start")

    def __init__(self, pool, slot, generation, kept_id, objects, chain, warm_start) -> None:
        self.pool, self.slot, self.generation, self.kept_id = pool, slot, generation, kept_id
        self.objects, self.chain, self.warm_start = objects, chain, warm_start

    def __reduce__(self):  # a token is only meaningful in the process that made it
        return (type(None), ())


class _Run:
    """One batch issued by :class:`RayRunner`: its id, cancel flag, outstanding tasks and
    the content keys of the objects it has hashed (each once per run)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.batch_id = os.urandom(12)
        self.cancelled = threading.Event()
        self.lock = threading.Lock()
        self.outstanding: dict = {}  # ObjectRef -> slot
        self.memo: dict[int, tuple[Any, bytes]] = {}  # id(obj) -> (obj, key)
        self.slots: set = set()

    def key(self, obj) -> bytes:
        found = self.memo.get(id(obj))
        if found is not None and found[0] is obj:
            return found[1]
        key = _content_key(obj)
        self.memo[id(obj)] = (obj, key)
        return key


_CURRENT = threading.local()  # .run: the _Run of this thread's batch; .index: its sample


class _Cancelled(BaseException):
    """This thread's batch was cancelled (the caller raises the original exception)."""


class _Pool:
    """The actors of one Ray job (shared by every layer of the process), the structure put
    in the object store, and the caller-side counters."""

    def __init__(self, ray, job_id: str, options: dict) -> None:
        self.ray, self.job_id, self.options = ray, job_id, dict(options)
        self.lock = threading.Lock()
        self.slots: list[_Slot] = []
        self.registry = _LRU(options["cache_bytes"], size=lambda v: v[1])  # key->(ref, n)
        self.seen = _LRU(1 << 16)  # key -> times seen by value
        self.counts = dict.fromkeys(
            (
                "calls", "solves", "retries", "missing_rounds", "bytes_sent",
                "bytes_received", "keys_sent", "refs_sent", "puts", "put_bytes",
            ),
            0,
        )  # fmt: skip
        self._lost = tuple(
            getattr(ray.exceptions, name)
            for name in (
                "RayActorError", "WorkerCrashedError", "ObjectLostError", "NodeDiedError",
                "LocalRayletDiedError", "ObjectFetchTimedOutError",
            )
            if hasattr(ray.exceptions, name)
        )  # fmt: skip
        self._actor_class = _actor_class()
        self.grow(options["actors"])

    # -- actors ----------------------------------------------------------------------------
    def grow(self, actors: int | None) -> None:
        """Start actors until there are ``actors`` (default: one per CPU of the cluster)."""
        ray = self.ray
        want = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        with self.lock:
            if len(self.slots) >= want:
                return
            new = [
                self._actor_class.options(scheduling_strategy="SPREAD").remote(
                    self.options["worker_cache_bytes"], self.options["kept"]
                )
                for _ in range(want - len(self.slots))
            ]
        hello = {a.hello.remote(): a for a in new}
        ready, pending = ray.wait(
            list(hello), num_returns=len(hello), timeout=self.options["start_timeout"]
        )
        for ref in pending:
            ray.kill(hello[ref])
        with self.lock:
            for ref in ready:
                self.slots.append(_Slot(len(self.slots), hello[ref], ray.get(ref)))
            started = len(self.slots)
        if pending:
            logger.warning(
                "executor='ray': %d of %d workers did not start within %g s (the cluster "
                "has %s CPUs, %s free); going on with %d",
                len(pending), len(hello), self.options["start_timeout"],
                ray.cluster_resources().get("CPU"), ray.available_resources().get("CPU"),
                started,
            )  # fmt: skip
        if not started:
            raise RayWorkerError(
                f"executor='ray': no Ray worker could start within "
                f"{self.options['start_timeout']:g} s (each needs 1 CPU; the cluster has "
                f"{ray.cluster_resources().get('CPU')} CPUs, "
                f"{ray.available_resources().get('CPU')} free)"
            )

    def _pick(self, backend_key: bytes, exclude=()) -> _Slot | None:
        with self.lock:
            usable = [
                s for s in self.slots if backend_key not in s.unable and s.index not in exclude
            ]
            if not usable:
                usable = [s for s in self.slots if backend_key not in s.unable]
            if not usable:
                return None
            slot = min(usable, key=lambda s: (s.in_flight, s.index))
            slot.in_flight += 1
            return slot

    # -- shipping --------------------------------------------------------------------------
    def _item(self, obj, run: _Run | None, slot: _Slot, sent: list):
        """How ``obj`` travels to ``slot``: by value, or keyed (with its ObjectRef when
        ``slot`` may not hold it)."""
        if not _keyable(obj):
            sent[0] += _nbytes(obj)
            return obj
        key = run.key(obj) if run is not None else _content_key(obj)
        nbytes = _nbytes(obj)
        with self.lock:
            entry = self.registry.get(key)
            if entry is None:
                seen = (self.seen.get(key) or 0) + 1
                self.seen.put(key, seen)
                if seen < 2:  # the first sighting: by value
                    sent[0] += nbytes
                    return obj
        if entry is None:
            ref = self.ray.put(obj)
            with self.lock:
                entry = self.registry.get(key)
                if entry is None:
                    entry = (ref, nbytes)
                    self.registry.put(key, entry)
                    self.counts["puts"] += 1
                    self.counts["put_bytes"] += nbytes
        sent[1] += 1
        with self.lock:
            if key in slot.known:
                return _Keyed(key, nbytes)
            slot.known.add(key)
            self.counts["refs_sent"] += 1
        return _Keyed(key, nbytes, [entry[0]])

    def _backend_item(self, spec: BackendSpec, slot: _Slot) -> _Backend:
        with self.lock:
            entry = self.registry.get(spec.key)
        if entry is None:
            ref = self.ray.put(spec.payload)
            with self.lock:
                entry = self.registry.get(spec.key)
                if entry is None:
                    entry = (ref, len(spec.payload))
                    self.registry.put(spec.key, entry)
        with self.lock:
            known = spec.key in slot.known
            slot.known.add(spec.key)
        return _Backend(spec.name, _Keyed(spec.key, entry[1], None if known else [entry[0]]))

    def _parts(self, g, h, e, run, slot, sent) -> tuple:
        if type(g) is Objective and type(h) is ConeConstraints and type(e) is Equalities:
            item = lambda x: self._item(x, run, slot, sent)  # noqa: E731
            P_upper = g.P_upper
            return (
                item(g.P), item(P_upper) if P_upper is not None else None, item(g.q),
                item(h.G), item(h.h), h.dims, item(e.A), item(e.b),
            )  # fmt: skip
        sent[0] += sum(_nbytes(x) for x in (g.P, g.q, h.G, h.h, e.A, e.b))
        return (_Whole((g, h, e)), None, None, None, None, None, None, None)

    # -- one solve -------------------------------------------------------------------------
    def call(self, spec: BackendSpec, g, h, e, term, warm_start, token: _Token | None):
        """Solve one problem on an actor; retry on another when the actor is lost."""
        run: _Run | None = getattr(_CURRENT, "run", None)
        index = getattr(_CURRENT, "index", None)
        tries, rounds, lost = 0, 0, []
        exclude: set[int] = set()
        use_kept = token is not None and token.pool is self
        while True:
            if run is not None and run.cancelled.is_set():
                raise _Cancelled()
            kept = (
                use_kept
                and token.slot not in exclude
                and self.slots[token.slot].generation == token.generation
            )
            if kept:
                slot = self.slots[token.slot]
                with self.lock:
                    slot.in_flight += 1
            else:
                slot = self._pick(spec.key, exclude)
                if slot is None:
                    raise BackendUnavailable(
                        f"backend {spec.name!r} cannot run on any Ray worker: "
                        + "; ".join(sorted({s.unable.get(spec.key, "?") for s in self.slots}))
                    )
            generation = slot.generation
            try:
                reply = self._once(spec, slot, g, h, e, term, warm_start, token, kept, run)
            except self._lost as exc:
                self._lose(slot, generation)
                tries += 1
                lost.append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
                exclude.add(slot.index)
                if tries > self.options["retries"]:
                    where = "" if index is None else f" of batch index {index}"
                    phase = run.phase if run is not None else None
                    raise RayWorkerError(
                        f"{phase or 'a'} solve{where}: the Ray worker running it was lost "
                        f"{tries} times ({'; '.join(lost)}); a solve that kills its worker "
                        "every time (out of memory?) cannot be finished on this cluster",
                        batch_index=index,
                        phase=phase,
                    ) from exc
                with self.lock:
                    self.counts["retries"] += 1
                continue
            finally:
                with self.lock:
                    slot.in_flight -= 1
            kind = reply[0]
            if kind == "ok":
                with self.lock:
                    self.counts["solves"] += 1
                return self._answer(reply, slot, generation, g, h, e, token, term, warm_start)
            if kind == "cancelled":
                raise _Cancelled()
            if kind == "missing":  # evicted or restarted: send the refs (or the chain)
                rounds += 1
                with self.lock:
                    self.counts["missing_rounds"] += 1
                    slot.known.difference_update(reply[1])
                if reply[2]:
                    use_kept = False
                if rounds > 8:
                    raise RayWorkerError(
                        f"a solve{'' if index is None else f' of batch index {index}'}: "
                        "the Ray worker kept losing the structure it was sent (its cache "
                        "is too small for one problem: raise worker_cache_bytes)",
                        batch_index=index,
                        phase=None if run is None else run.phase,
                    )
                continue
            if not self._raise(reply, slot, spec):
                exclude.add(slot.index)  # it cannot run this backend; others may

    def _once(self, spec, slot, g, h, e, term, warm_start, token, kept, run):
        """One request to ``slot`` and its reply (waits in polls of POLL_SECONDS)."""
        sent = [0, 0]  # bytes by value, keys
        backend = self._backend_item(spec, slot)
        if kept:
            parts, chain = None, None
        else:
            parts = self._parts(g, h, e, run, slot, sent)
            chain = None if token is None else tuple(token.chain)
            warm_start = token.warm_start if token is not None else warm_start
        if term is not None:
            sent[0] += term.nbytes
        req = _Request(
            None if run is None else run.batch_id,
            backend,
            parts,
            term,
            _strip(warm_start),
            token.kept_id if kept else None,
            chain,
        )
        ray = self.ray
        ref = slot.actor.solve.remote(req)
        with self.lock:
            self.counts["calls"] += 1
            self.counts["bytes_sent"] += sent[0]
            self.counts["keys_sent"] += sent[1]
        if run is not None:
            with run.lock:
                run.outstanding[ref] = slot
                run.slots.add(slot.index)
        try:
            while True:
                try:
                    return ray.get(ref, timeout=POLL_SECONDS)
                except ray.exceptions.GetTimeoutError:
                    if run is not None and run.cancelled.is_set():
                        raise _Cancelled() from None
        except (KeyboardInterrupt, _Cancelled):
            ray.cancel(ref)
            raise
        finally:
            if run is not None:
                with run.lock:
                    run.outstanding.pop(ref, None)

    def _lose(self, slot: _Slot, generation: int) -> None:
        with self.lock:
            if slot.generation == generation:
                slot.generation += 1
                slot.known.clear()

    def _answer(self, reply, slot, generation, g, h, e, token, term, warm_start) -> Solution:
        _, sol, kept_id = reply
        arrays = (sol.primal, sol.eq_dual, sol.ineq_dual, sol.slack)
        with self.lock:
            self.counts["bytes_received"] += sum(_nbytes(a) for a in arrays if a is not None)
        primal, eq_dual, ineq_dual, slack = (
            a if a is None or not isinstance(a, np.ndarray) or a.flags.writeable else a.copy()
            for a in arrays
        )
        extra = dict(sol.info.extra)
        if kept_id is not None:
            if token is not None:
                chain, first_warm = (*token.chain, term), token.warm_start
            else:
                chain, first_warm = (term,), warm_start
            extra[TOKEN_KEY] = _Token(
                self, slot.index, generation, kept_id, (g, h, e), chain, first_warm
            )
        info = SolveInfo(
            sol.info.iterations, sol.info.solve_time, sol.info.accuracy,
            sol.info.raw_status, extra,
        )  # fmt: skip
        return Solution(sol.status, primal, eq_dual, ineq_dual, slack, info)

    def _raise(self, reply, slot: _Slot, spec: BackendSpec) -> bool:
        """Raise the exception of an ``"error"`` reply; False (no raise) when it says the
        worker cannot run the backend and another worker may."""
        _, blob, type_name, message, tb = reply
        exc: BaseException | None = None
        if blob is not None:
            try:
                import ray.cloudpickle as cloudpickle

                exc = cloudpickle.loads(blob)
            except Exception:
                exc = None
        if exc is None:
            exc = RuntimeError(f"{type_name}: {message}")
        if isinstance(exc, BackendUnavailable):
            with self.lock:
                slot.unable[spec.key] = str(exc)
                elsewhere = any(spec.key not in s.unable for s in self.slots)
            if elsewhere:
                return False
        exc.__cause__ = _RemoteTraceback(tb)
        raise exc

    # -- batches ---------------------------------------------------------------------------
    def cancel(self, run: _Run) -> None:
        """Cancel a batch: flag it, cancel its outstanding tasks and tell the actors it
        reached to skip what they have queued of it."""
        run.cancelled.set()
        with run.lock:
            refs, reached = list(run.outstanding), list(run.slots)
        for index in reached:
            try:
                self.slots[index].actor.cancel.remote(run.batch_id)
            except Exception:  # a lost actor: nothing queued there
                pass
        for ref in refs:
            try:
                self.ray.cancel(ref)
            except Exception:
                pass

    def stats(self, workers: bool = True) -> dict:
        """Caller-side counters, and each worker's (``workers=True``)."""
        with self.lock:
            out: dict = {"caller": dict(self.counts), "actors": len(self.slots)}
            slots = list(self.slots)
        if workers:
            refs = [s.actor.stats.remote() for s in slots]
            got = []
            for ref in refs:
                try:
                    got.append(self.ray.get(ref, timeout=30))
                except Exception as exc:
                    got.append({"error": f"{type(exc).__name__}: {exc}"})
            out["workers"] = got
        return out

    def kill(self) -> None:
        for s in self.slots:
            try:
                self.ray.kill(s.actor)
            except Exception:
                pass
        self.slots = []
        self.registry = _LRU(0)


def _strip(sol: Solution | None) -> Solution | None:
    """A warm start without our token (it stays in this process)."""
    if sol is None or TOKEN_KEY not in sol.info.extra:
        return sol
    extra = {k: v for k, v in sol.info.extra.items() if k != TOKEN_KEY}
    info = SolveInfo(
        sol.info.iterations, sol.info.solve_time, sol.info.accuracy, sol.info.raw_status, extra
    )
    return Solution(sol.status, sol.primal, sol.eq_dual, sol.ineq_dual, sol.slack, info)


_ACTOR = None


def _actor_class():
    """The Ray actor class over :class:`_Worker` (made once): one CPU, restarted when its
    process dies, no automatic task retries (the caller retries elsewhere), and its
    control methods in their own thread (a cancel or a stats request is served while a
    solve runs)."""
    global _ACTOR
    if _ACTOR is None:
        import ray

        class FFOSolveWorker(_Worker):
            @ray.method(concurrency_group="control")
            def hello(self) -> dict:
                return _Worker.hello(self)

            @ray.method(concurrency_group="control")
            def cancel(self, batch_id: bytes) -> None:
                _Worker.cancel(self, batch_id)

            @ray.method(concurrency_group="control")
            def stats(self) -> dict:
                return _Worker.stats(self)

        _ACTOR = ray.remote(
            num_cpus=1, max_restarts=-1, max_task_retries=0, concurrency_groups={"control": 1}
        )(FFOSolveWorker)
    return _ACTOR


# -- pools per Ray job -----------------------------------------------------------------------
_POOLS: dict[str, _Pool] = {}
_POOLS_LOCK = threading.Lock()
_STARTED_LOCAL = False


def start_local(num_cpus: int | None = None, **init: Any):
    """Start a Ray runtime on this machine only (every Ray process listening on 127.0.0.1,
    as Ray does on macOS and Windows), quietly: no dashboard, worker output not forwarded,
    usage stats off unless ``RAY_USAGE_STATS_ENABLED`` says otherwise.  ``num_cpus``:
    the CPUs it offers (default: all); ``init``: more ``ray.init`` arguments.  Returns the
    ``ray`` module.  :func:`shutdown` stops it."""
    global _STARTED_LOCAL
    ray = _import_ray()
    from ray._private import ray_constants

    saved_env = {k: os.environ.get(k) for k in (_LOOPBACK_ENV, "RAY_USAGE_STATS_ENABLED")}
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ[_LOOPBACK_ENV] = "0"  # read by the workers Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # and by this process's ray.init
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            **{"logging_level": logging.WARNING, **init},
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _STARTED_LOCAL = True
    return ray


#: Ray's switch for single-machine runtimes (what it uses on macOS and Windows).
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _connect(spec: str):
    """``ray``, connected (module docstring: which cluster)."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    if spec.startswith("ray://"):
        ray.init(address=spec, log_to_driver=False, logging_level=logging.WARNING)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False, logging_level=logging.WARNING)
    else:
        start_local()
    return ray


def _session(ray) -> str:
    """What identifies this process's connection: the job and the driver's node (a new
    local runtime numbers its jobs from 1 again, but its node is new)."""
    context = ray.get_runtime_context()
    return f"{context.get_job_id()}@{context.get_node_id()}"


def _pool(executor: RayExecutor) -> _Pool:
    """The pool an executor's solves go to (connecting and starting workers on first use)."""
    bound = executor._bound
    if (
        bound is not None
        and _POOLS.get(bound.job_id) is bound
        and bound.ray.is_initialized()
        and _session(bound.ray) == bound.job_id
    ):
        return bound
    with _POOLS_LOCK:
        ray = _connect(executor.spec)
        job = _session(ray)
        pool = _POOLS.get(job)
        if pool is None:
            for old in _POOLS.values():  # a previous ray.init: its actors are gone
                old.slots = []
            _POOLS.clear()
            pool = _POOLS[job] = _Pool(ray, job, executor.options)
        else:
            pool.grow(executor.options["actors"])
        executor._bound = pool
    return pool


def shutdown() -> None:
    """Stop the workers of every pool, and the local Ray runtime if this module started
    it (a runtime the user started is left running)."""
    global _STARTED_LOCAL
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.kill()
        _POOLS.clear()
        if _STARTED_LOCAL:
            import ray

            ray.shutdown()
            _STARTED_LOCAL = False


# -- the public pieces -----------------------------------------------------------------------
class BackendSpec(NamedTuple):
    """A backend as it travels: its name, the pickled ``(class, settings)`` (a
    :class:`~ffo_core.backend_base.BackendBase` is rebuilt from its settings; another
    backend is pickled whole) and that payload's content key."""

    name: str
    payload: bytes
    key: bytes

    @classmethod
    def of(cls, backend) -> BackendSpec:
        import ray.cloudpickle as cloudpickle

        name = backend_name(backend)
        config = getattr(backend, "_config", None)
        what = (type(backend), dict(config)) if isinstance(config, dict) else backend
        try:
            payload = cloudpickle.dumps(what)
        except Exception as exc:
            raise ConfigError(
                f"executor='ray': backend {name!r} cannot be sent to Ray workers: it is not "
                f"picklable ({type(exc).__name__}: {exc}); derive it from "
                "ffo_core.backend_base.BackendBase (it is then rebuilt on each worker from "
                "its class and settings) or make it picklable"
            ) from exc
        return cls(name, payload, hashlib.blake2b(payload, digest_size=16).digest())


class RayBackend:
    """The backend a layer's solves call under ``executor="ray"``: ``solve`` runs on a
    worker of the Ray cluster and answers the protocol :class:`Solution` the wrapped
    backend (``local``) gives for the same problem, bit for bit.  ``name`` and
    ``capabilities`` are the wrapped backend's.  Picklable (it pickles as the executor and
    the backend's class and settings)."""

    def __init__(self, executor: RayExecutor, backend) -> None:
        self.executor = executor
        self.local = backend
        self.spec = BackendSpec.of(backend)
        self.name = self.spec.name
        self.capabilities = backend.capabilities

    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term: np.ndarray | None = None,
        *,
        warm_start: Solution | None = None,
    ) -> Solution:
        return self._call(g, h, e, extra_linear_term, warm_start, None)

    def _call(self, g, h, e, term, warm_start, token) -> Solution:
        return _pool(self.executor).call(self.spec, g, h, e, term, warm_start, token)

    def tightened(self) -> RayBackend:
        """This proxy over the wrapped backend's tightened copy
        (:func:`ffo_core.engine.solves.tightened`: the settings of curved ghosts), so a
        ghost is solved on a worker exactly as in the thread pool."""
        from ..engine.solves import tightened

        tight = tightened(self.local)
        return self if tight is self.local else type(self)(self.executor, tight)

    def __reduce__(self):
        return (_rebuild_backend, (self.executor, self.spec.payload))

    def __repr__(self) -> str:
        return f"<RayBackend {self.local!r}>"


class _ResolvingRayBackend(RayBackend):
    """A :class:`RayBackend` over a backend with the protocol's optional ``resolve``."""

    def resolve(
        self,
        previous: Solution | None,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term: np.ndarray,
    ) -> Solution:
        """The wrapped backend's ``resolve`` on the worker that holds ``previous``'s
        set-up (sending the new term only); a replay of ``previous``'s chain of solves on
        another worker when that set-up is gone; a plain :meth:`solve` when ``previous``
        is not this proxy's answer to these same problem objects."""
        token = None if previous is None else previous.info.extra.get(TOKEN_KEY)
        if (
            not isinstance(token, _Token)
            or token.objects[0] is not g
            or token.objects[1] is not h
            or token.objects[2] is not e
        ):
            return self.solve(g, h, e, extra_linear_term)
        return self._call(g, h, e, extra_linear_term, None, token)


def _rebuild_backend(executor, payload):
    import ray.cloudpickle as cloudpickle

    made = cloudpickle.loads(payload)
    backend = made[0](**made[1]) if isinstance(made, tuple) else made
    return executor.backend(backend)


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
