"""The caller's pool of Ray actors, one per Ray job (:class:`_Pool`): starting them, choosing
one, what a request ships, a solve and its retries, its reply, cancelling a batch.

Conventions: ``self.lock`` guards slots, registry and counters, never held while waiting on
Ray; an object of ``KEY_MIN_BYTES`` or more goes by key from its second sighting on, with its
ObjectRef until the slot holds it (``_Slot.known``, cleared with a lost actor's generation);
every wait polls every :data:`POLL_SECONDS`.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from ...errors import BackendUnavailable
from ...protocol import ConeConstraints, Equalities, Objective, Solution, SolveInfo
from .errors import RayWorkerError, _Cancelled, _RemoteTraceback
from .shipping import (
    _LRU,
    TOKEN_KEY,
    BackendSpec,
    _Backend,
    _content_key,
    _keyable,
    _Keyed,
    _nbytes,
    _Request,
    _strip,
    _Whole,
)
from .state import _CURRENT, _Run, _Slot, _Token
from .worker import _actor_class

logger = logging.getLogger("ffo_core")

#: How often (seconds) a waiting caller thread looks for a cancelled batch.
POLL_SECONDS = 0.2


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
