"""Solve many independent samples with one backend, and turn bad outcomes into errors.

Samples run in a thread pool when the backend declares itself thread safe (the solvers we
wrap release the GIL while they work); ``n_jobs=1`` runs them in order.

Every way a solve can go wrong becomes a typed error naming the backend and the batch
index, never a NaN or a silently wrong value:

* a status without a solution (infeasible, unbounded, iteration/time limit, numerical
  error): :func:`check_solutions` -> :class:`SolverError`;
* an inaccurate solution: the ``inaccurate`` policy (``"warn"``, ``"raise"``, ``"ignore"``);
* an exception raised inside the backend's ``solve``, or a malformed answer (an "optimal"
  solution with NaN/Inf or missing/misshaped arrays): :class:`GuardedBackend` ->
  :class:`SolverError` (:class:`GhostProblemError` for the backward pass's ghost solves),
  the original exception as ``__cause__``.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import numpy as np

from ..errors import (
    ConfigError,
    FFOError,
    GhostProblemError,
    InaccurateSolutionWarning,
    SolverError,
)
from ..protocol import Backend, Solution, Status

T = TypeVar("T")

INACCURATE_POLICIES = ("warn", "raise", "ignore")


def backend_name(backend: Any) -> str:
    """The backend's ``name`` (its class name if it has none)."""
    name = getattr(backend, "name", None)
    return name if isinstance(name, str) and name else type(backend).__name__


def default_jobs(backend: Backend, batch: int) -> int:
    """Threads for a batch: one per core, one if the backend is not thread safe."""
    if not getattr(backend.capabilities, "thread_safe", False):
        return 1
    return max(1, min(batch, os.cpu_count() or 1))


def run_batch(fn: Callable[[int], T], batch: int, n_jobs: int) -> list[T]:
    """``[fn(0), ..., fn(batch - 1)]``, in a thread pool when ``n_jobs > 1``.

    If some calls raise, the exception of the lowest failing index is raised (after the
    pool has finished: no worker thread outlives the call).  The caller waits in short
    slices, so Ctrl-C reaches it within about :data:`WAIT_SLICE` seconds: it then cancels
    the calls not started, asks the solves in flight to stop
    (:func:`~ffo_core.backend_base.interrupt_solves`), waits for the workers and re-raises.
    """
    if n_jobs <= 1 or batch <= 1:
        return [fn(i) for i in range(batch)]
    pool = ThreadPoolExecutor(max_workers=n_jobs)
    futures = [pool.submit(fn, i) for i in range(batch)]
    try:
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=WAIT_SLICE)
    except KeyboardInterrupt:
        from ..backend_base import interrupt_solves

        for f in futures:
            f.cancel()
        interrupt_solves()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [f.result() for f in futures]


#: Seconds the caller of a thread pool waits at a time (how soon Ctrl-C reaches it).
WAIT_SLICE = 0.05


class ThreadChoice:
    """Pool or one thread for one phase of a layer (forward solves, backward ghosts),
    chosen by measurement when the user did not fix ``n_jobs``.

    A thread pool only pays when the solver releases the GIL for most of its work.
    Clarabel releases it while it iterates but not while it sets up, and a ghost problem
    is mostly set-up, so on the DFL QP the pool slows the backward down while it speeds
    the forward up (docs/benchmarks.md).  So the first ``2 * probes`` calls alternate
    between the pool and one thread; later calls use whichever has the lower time per
    sample among its last ``probes`` calls (the minimum: a busy machine only ever adds
    time).  Every ``reprobe_every``-th call runs the other
    setting once more, so a choice made during a noisy spell, or before the batch size or
    the problem changed, is revisited in a long training run.  Memory is ``probes`` floats
    per setting.  Results never depend on the choice (samples are independent); only the
    time does.
    """

    def __init__(self, probes: int = 2, reprobe_every: int = 64) -> None:
        self.probes = probes
        self.reprobe_every = reprobe_every
        self.times: dict[int, list[float]] = {}
        self.calls = 0
        self._lock = threading.Lock()

    def __getstate__(self):  # a lock cannot be copied or pickled
        return {
            "probes": self.probes,
            "reprobe_every": self.reprobe_every,
            "times": {k: list(v) for k, v in self.times.items()},
            "calls": self.calls,
        }

    def __setstate__(self, state) -> None:
        self.__dict__.update({"reprobe_every": 64, "calls": 0, **state})
        self._lock = threading.Lock()

    def choose(self, n_jobs: int) -> int:
        """Threads for the next call, given the pool size ``n_jobs``."""
        if n_jobs <= 1:
            return 1
        with self._lock:
            pool, one = self.times.get(n_jobs, []), self.times.get(1, [])
            if len(pool) < self.probes or len(one) < self.probes:
                return n_jobs if len(pool) <= len(one) else 1
            best = 1 if min(one) < min(pool) else n_jobs
            self.calls += 1
            if self.reprobe_every and self.calls % self.reprobe_every == 0:
                return n_jobs if best == 1 else 1
            return best

    def run(self, fn: Callable[[int], T], batch: int, n_jobs: int) -> list[T]:
        """:func:`run_batch` with the chosen thread count, timed."""
        jobs = self.choose(min(n_jobs, batch))
        start = time.perf_counter()
        out = run_batch(fn, batch, jobs)
        if batch > 1 and n_jobs > 1:
            with self._lock:  # the last `probes` times per setting, no more
                recent = self.times.setdefault(jobs, [])
                recent.append((time.perf_counter() - start) / batch)
                del recent[: -self.probes]
        return out


class BatchRunner:
    """How a layer runs its per-sample work (the forward solves, the backward's ghosts).

    ``n_jobs`` threads, or with ``None`` one per core (one if the backend is not thread
    safe, :func:`default_jobs`) with a measured pool-or-one-thread choice per phase
    (:class:`ThreadChoice`)."""

    PHASES = ("forward", "backward")

    def __init__(self, backend: Backend, n_jobs: int | None = None) -> None:
        if n_jobs is not None and (
            not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs < 1
        ):
            raise ConfigError(f"n_jobs must be a positive int or None, got {n_jobs!r}")
        self.backend, self.n_jobs = backend, n_jobs
        self._choices = {phase: ThreadChoice() for phase in self.PHASES}

    def jobs(self, batch: int) -> int:
        """The pool size for a batch of ``batch`` samples."""
        return self.n_jobs if self.n_jobs is not None else default_jobs(self.backend, batch)

    def run(self, phase: str, fn: Callable[[int], T], batch: int) -> list[T]:
        """``[fn(0), ..., fn(batch - 1)]`` for ``phase`` (one of :attr:`PHASES`)."""
        return self._choices[phase].run(fn, batch, self.jobs(batch))


_ARRAYS = ("primal", "eq_dual", "ineq_dual", "slack")


def solution_problem(
    sol: Any, n: int | None = None, p: int | None = None, m: int | None = None
) -> str | None:
    """What is wrong with a backend's answer, or ``None`` if it is a usable protocol
    :class:`Solution`: a ``Status``; when the status has a solution, all four arrays
    present, 1-D of the expected sizes (where given) and finite."""
    status = getattr(sol, "status", None)
    if not isinstance(status, Status):
        return (
            f"an answer of type {type(sol).__name__} whose status {status!r} is not a "
            "protocol Status"
        )
    if not status.has_solution:
        return None
    sizes = {"primal": n, "eq_dual": p, "ineq_dual": m, "slack": m}
    arrays = []
    for field in _ARRAYS:
        value = getattr(sol, field, None)
        if value is None:
            return f"status {status.value} but no {field}"
        if type(value) is np.ndarray and value.dtype == np.float64:
            arr = value  # what adapters return: no copy
        else:
            try:
                arr = np.asarray(value, dtype=float)
            except (TypeError, ValueError):
                return f"status {status.value} but a non-numeric {field}"
        want = sizes[field]
        if arr.ndim != 1 or (want is not None and arr.shape[0] != want):
            return (
                f"status {status.value} but {field} of shape {arr.shape}, expected "
                f"({'?' if want is None else want},)"
            )
        arrays.append(arr)
    if np.isfinite(np.concatenate(arrays)).all():  # one check of the four joined;
        return None  # only when it fails, find which array
    for field, arr in zip(_ARRAYS, arrays):
        if not np.all(np.isfinite(arr)):
            return f"status {status.value} but NaN or Inf in {field}"
    return None


def check_solutions(
    solutions: Sequence[Solution], backend: Backend, inaccurate: str = "warn", what: str = "forward"
) -> None:
    """Raise :class:`SolverError` naming the first sample without a usable solution.

    ``solutions`` come from :class:`GuardedBackend`, which has already refused malformed
    answers (:func:`solution_problem`); this applies the status and ``inaccurate``
    policies."""
    name = backend_name(backend)
    for i, sol in enumerate(solutions):
        if not sol.status.has_solution:
            meaning = {
                Status.INFEASIBLE: "the problem is infeasible",
                Status.INFEASIBLE_INACCURATE: "the problem is (probably) infeasible",
                Status.UNBOUNDED: "the problem is unbounded",
                Status.UNBOUNDED_INACCURATE: "the problem is (probably) unbounded",
                Status.ITERATION_LIMIT: "the solver hit its iteration limit",
                Status.TIME_LIMIT: "the solver hit its time limit",
            }.get(sol.status, "the solver failed")
            raise SolverError(
                f"{what} solve of batch index {i}: {meaning} (status {sol.status.value}, "
                f"solver {name}: {sol.info.raw_status})",
                status=sol.status,
                batch_index=i,
                backend=name,
            )
        if sol.status is Status.OPTIMAL_INACCURATE and inaccurate != "ignore":
            message = (
                f"{what} solve of batch index {i}: solver {name} returned an "
                f"inaccurate solution ({sol.info.raw_status})"
            )
            if inaccurate == "raise":
                raise SolverError(message, status=sol.status, batch_index=i, backend=name)
            warnings.warn(message, InaccurateSolutionWarning, stacklevel=3)


def tightened(backend: Backend) -> Backend:
    """``backend`` configured for a more accurate solve, for the small ghost problems of
    curved cones (where an interior-point point is only ~sqrt(tolerance) accurate and the
    finite difference divides its error by delta): the backend's own ``tightened()`` when
    it has one (the wrappers of the engine re-wrap), else its ``tight_settings`` (a class
    attribute: setting name -> value) applied through ``with_settings`` to the settings
    the user did not give, else the backend itself."""
    own = getattr(backend, "tightened", None)
    if callable(own):
        return own()
    table = getattr(backend, "tight_settings", None)
    copy = getattr(backend, "with_settings", None)
    if not table or not callable(copy):
        return backend
    given = getattr(backend, "settings", {}) or {}
    extra = {k: v for k, v in table.items() if k not in given}
    return copy(**extra) if extra else backend


def with_batch_index(exc: SolverError, i: int) -> SolverError:
    """``exc`` naming batch index ``i`` (its message too, as ``backward pass, batch index
    i: ...``, unless it names one already); returned for ``raise``."""
    exc.batch_index = i
    text = exc.args[0] if exc.args else str(exc)
    if "batch index" not in text:
        exc.args = (f"backward pass, batch index {i}: {text}",)
    return exc


class GuardedBackend:
    """A backend seen through a guard: ``solve`` returns a well-formed protocol
    :class:`Solution` or raises a typed error naming the backend and ``batch_index``.

    * An exception raised inside the backend's ``solve`` that is not one of ours becomes a
      :class:`SolverError` (``ghost=True``: :class:`GhostProblemError`) with the original as
      ``__cause__``.  A :class:`SolverError` of the backend's own gets the batch index (and,
      for a ghost solve, is re-raised as a :class:`GhostProblemError`); other ``FFOError``\\ s
      (a :class:`ConfigError` found at solve time) pass unchanged.
    * A malformed answer (:func:`solution_problem`) is an error of the same class.
    * ``ghost=True`` also applies the ``inaccurate`` policy to the ghost solve (the forward
      pass applies it in :func:`check_solutions`).  A status without a solution is returned
      as it is: the caller decides (the forward pass in :func:`check_solutions`, the ghost
      in :func:`ffo_core.engine.ffo_backward.solve_ghost`, which explains the usual causes).

    Everything else (``name``, ``capabilities``, settings) is the wrapped backend's.
    """

    def __init__(
        self,
        backend: Backend,
        batch_index: int | None = None,
        *,
        ghost: bool = False,
        inaccurate: str = "ignore",
    ) -> None:
        self._backend = backend
        self.batch_index = batch_index
        self.ghost = ghost
        self.inaccurate = inaccurate
        self.name = backend_name(backend)
        self.capabilities = backend.capabilities

    def __getattr__(self, attr: str):
        if attr == "_backend":  # not set yet (copy, pickle): no recursion
            raise AttributeError(attr)
        return getattr(self._backend, attr)

    def tightened(self) -> GuardedBackend:
        """This guard around :func:`tightened` of the wrapped backend."""
        return GuardedBackend(
            tightened(self._backend), self.batch_index, ghost=self.ghost, inaccurate=self.inaccurate
        )

    def _where(self) -> str:
        what = "backward (ghost) solve" if self.ghost else "forward solve"
        return what if self.batch_index is None else f"{what} of batch index {self.batch_index}"

    def solve(self, g, h, e, *args, **kwargs) -> Solution:
        return self._guarded(lambda: self._backend.solve(g, h, e, *args, **kwargs), g, h, e)

    def resolve(self, previous, g, h, e, extra_linear_term) -> Solution:
        """The backend's ``resolve`` (:mod:`ffo_core.protocol`, optional), guarded like
        :meth:`solve`; a plain ``solve`` when the backend has none."""
        again = getattr(self._backend, "resolve", None)
        if again is None:
            return self.solve(g, h, e, extra_linear_term)
        return self._guarded(lambda: again(previous, g, h, e, extra_linear_term), g, h, e)

    def _guarded(self, call: Callable[[], Any], g, h, e) -> Solution:
        error = GhostProblemError if self.ghost else SolverError
        try:
            sol = call()
        except GhostProblemError as exc:
            if exc.batch_index is None:
                exc.batch_index = self.batch_index
            raise
        except SolverError as exc:
            if self.ghost:
                raise GhostProblemError(
                    f"{self._where()}: {exc}",
                    status=exc.status,
                    batch_index=self.batch_index,
                    backend=exc.backend or self.name,
                ) from exc
            if exc.batch_index is None:
                exc.batch_index = self.batch_index
                exc.args = (f"{self._where()}: {exc.args[0] if exc.args else exc}",)
            exc.backend = exc.backend or self.name
            raise
        except FFOError:
            raise
        except Exception as exc:
            raise error(
                f"{self._where()}: backend {self.name!r} raised {type(exc).__name__}: {exc}",
                batch_index=self.batch_index,
                backend=self.name,
            ) from exc
        bad = solution_problem(sol, g.n, e.p, h.m)
        if bad is not None:
            raise error(
                f"{self._where()}: backend {self.name!r} returned {bad}",
                status=getattr(sol, "status", None),
                batch_index=self.batch_index,
                backend=self.name,
            )
        refused = self.refuse_inaccurate(sol.status, sol.info.raw_status, stacklevel=4)
        if refused is not None:
            raise refused
        return sol

    def refuse_inaccurate(
        self,
        status: Status,
        raw_status: str | None = None,
        *,
        name: str | None = None,
        stacklevel: int = 3,
    ) -> GhostProblemError | None:
        """The ``inaccurate`` policy applied to a ghost solve's ``status`` (a forward solve
        is checked by :func:`check_solutions`): "warn" warns here, "raise" returns the
        :class:`GhostProblemError` for the caller to raise or record; None otherwise.
        ``name``: the backend that answered, when it is not this guard's (a batch)."""
        if not self.ghost or status is not Status.OPTIMAL_INACCURATE or self.inaccurate == "ignore":
            return None
        name = name or self.name
        raw = f" ({raw_status})" if raw_status else ""
        message = f"{self._where()}: backend {name!r} returned an inaccurate solution{raw}"
        if self.inaccurate == "raise":
            return GhostProblemError(
                message, status=status, batch_index=self.batch_index, backend=name
            )
        warnings.warn(message, InaccurateSolutionWarning, stacklevel=stacklevel)
        return None
