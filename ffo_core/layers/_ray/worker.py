"""The Ray actor that solves problems for the caller (:class:`_Worker`, and the Ray actor
class made over it by :func:`_actor_class`).

It runs on a Ray worker process, one problem at a time, and answers each request with a
tagged tuple (``"ok"``, ``"missing"``, ``"error"`` or ``"cancelled"``: see
:meth:`_Worker.solve`): a backend's exception comes back in an ``"error"`` reply, pickled
with its traceback, not raised.  It rebuilds backends from their ``(class, settings)``
(checking ``availability()`` there), caches the keyed objects it was sent (:mod:`.shipping`)
and keeps recent solver set-ups for ``resolve``.
"""

from __future__ import annotations

import itertools
import os
import threading
import traceback
from typing import Any

from ...errors import BackendUnavailable
from ...protocol import ConeConstraints, Equalities, Objective, Solution
from .shipping import _LRU, _Backend, _for_caller, _Keyed, _nbytes, _Request, _Whole


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
