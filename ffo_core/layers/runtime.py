"""The runtime both layers share: options, guarded solves, the backward modes, the
fallback policy, the gradient health check, chunking and the ``torch.autograd.Function``.

A layer (:class:`~ffo_core.layers.cvxpy_layer.FFOLayer`,
:class:`~ffo_core.layers.qp_layer.FFOQPLayer`) derives from :class:`SolverLayer` and only
says how its inputs become problem data and how solutions and data gradients become
tensors (the four methods marked "layer-specific" below).  Everything else -- what is
solved, in which threads, what happens when a solve fails, how the backward is checked --
is here, once, so both layers behave identically.

The per-call problem data is an object with this interface (duck-typed):

* ``batch``: the number of samples;
* ``sample(i) -> (Objective, ConeConstraints, Equalities)``: sample ``i``'s data on the
  structural pattern (what gradients are taken on);
* ``solver_problem(i)``: the same data as the solver gets it (stored zeros dropped);
* ``ghost_source(h, e)``: a :class:`~ffo_core.engine.ghost.GhostSource` shared by the
  samples whose matrices are the same, or None;
* ``sample_bytes()``: rough bytes one sample holds during the backward (for chunking);
* ``sols``: the forward solutions, and ``backend``: the backend of the call (the layer's,
  or its copy configured by the call's ``solver_args``), both set by the runtime.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from typing import Any

import numpy as np
import torch

from ..config import check_choice
from ..engine.batch_backward import applies as polyhedral_applies
from ..engine.batched import batch_solver, problem_batch, solve_problems
from ..engine.data_gradient import DataGradient
from ..engine.ffo_backward import FFOOptions
from ..engine.kkt_backward import kkt_backward
from ..engine.polish import polish, polish_batch
from ..engine.scaling import ScaledBackend
from ..engine.schedule import FFOSample, ffo_backward_batch
from ..engine.solves import (
    INACCURATE_POLICIES,
    GuardedBackend,
    backend_name,
    check_solutions,
    with_batch_index,
)
from ..errors import (
    ConfigError,
    SolverError,
)
from ..protocol import Backend, Solution, Status
from ..registry import get_backend
from ..solver_args import with_solver_args
from .executors import Executor
from .function import _LayerFunction
from .policies import FailurePolicies

BACKWARDS = ("ffo", "kkt", "altdiff")
#: ``ghost_fallback`` policies (see :class:`SolverLayer`).
GHOST_FALLBACKS = ("raise", "smaller-delta", "kkt", "smaller-delta+kkt")
#: Entries kept in ``health_log`` (the oldest are dropped).
HEALTH_LOG_SIZE = 1000
#: Per-sample data (bytes, as the problem data estimates it: ``sample_bytes()``) that a
#: first-order backward keeps alive at once; a batch is staged in chunks of at most this.
BACKWARD_CHUNK_BYTES = 256 << 20

logger = logging.getLogger("ffo_core")


def backward_chunks(batch: int, sample_bytes: int) -> list[range]:
    """The batch indices in chunks that hold at most :data:`BACKWARD_CHUNK_BYTES` of
    per-sample data (``sample_bytes`` each; at least one sample per chunk)."""
    step = max(1, BACKWARD_CHUNK_BYTES // max(1, sample_bytes))
    return [range(start, min(start + step, batch)) for start in range(0, batch, step)]


def _is_number(x) -> bool:
    return (
        isinstance(x, (int, float, np.integer, np.floating))
        and not isinstance(x, bool)
        and math.isfinite(float(x))
    )


def with_time_limit(backend: Backend, seconds: float) -> Backend:
    """A copy of ``backend`` with a per-solve time limit; ``backend`` is not modified."""
    name = backend_name(backend)
    copy = getattr(backend, "with_settings", None)
    if not callable(copy):
        raise ConfigError(
            f"time_limit={seconds:g}: backend {name!r} cannot take a time limit: it has no "
            "with_settings(**settings) method returning a copy with new settings "
            "(see docs/reliability.md); set the limit in its own settings instead"
        )
    try:
        limited = copy(time_limit=seconds)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(
            f"time_limit={seconds:g}: backend {name!r} has no time limit: {exc}"
        ) from exc
    if limited is backend:
        raise ConfigError(
            f"time_limit: backend {name!r}'s with_settings() returned the "
            "backend itself; it must return a copy"
        )
    return limited


class SolverLayer(FailurePolicies, torch.nn.Module):
    """What :class:`~ffo_core.FFOLayer` and :class:`~ffo_core.FFOQPLayer` share.

    Args (keyword, after ``solver``; both layers take all of them):
        solver: a backend or config string, e.g. ``"clarabel"``,
            ``"clarabel:tol_gap_abs=1e-10,tol_gap_rel=1e-10"``.
        backward: ``"ffo"`` (first-order, default), ``"kkt"`` (exact implicit
            differentiation; it factorises the reduced KKT matrix) or ``"altdiff"``
            (Alt-Diff: ADMM continued from the forward point and differentiated in reverse
            mode; polyhedral problems; dense data, docs/altdiff.md), with
            ``altdiff_tol`` (relative, default 1e-8; looser gives the truncated variant)
            and ``altdiff_max_iter`` (default 100000).
        delta, kappa, central, tau_s, tau_lam: see
            :class:`ffo_core.engine.ffo_backward.FFOOptions` (validated here).
        n_jobs: threads for per-sample solves (default: one per core if the backend is
            thread safe, with a measured pool-or-one-thread choice per phase).
        inaccurate: what to do with an inaccurate solve (forward or ghost): ``"warn"``
            (default, an :class:`~ffo_core.engine.solves.InaccurateSolutionWarning`),
            ``"raise"`` (a :class:`SolverError`; :class:`GhostProblemError` for a ghost) or
            ``"ignore"``.  ``last_status`` holds every sample's status of the last forward.
        ghost_fallback: what to do when a sample's ghost problem fails (a bad status, an
            exception in the backend, a malformed or non-finite answer): ``"raise"``
            (default), ``"smaller-delta"`` (retry with delta/10, then delta/100), ``"kkt"``
            (that sample's exact KKT gradient) or ``"smaller-delta+kkt"``.  Which one was
            used is ``last_diagnostics[i]["ghost_fallback"]``.
        time_limit: seconds per solve (forward and ghost), through the backend's
            ``with_settings(time_limit=...)`` copy (the backend given is not modified).
        check_every: gradient health check: every ``check_every``-th backward call (0 or
            None: never) compares the first-order gradient of one sample (the first with a
            nonzero upstream gradient) with the exact KKT gradient, logs it (logger
            ``"ffo_core"``), appends it to ``health_log`` and warns
            (:class:`~ffo_core.errors.GradientHealthWarning`) below ``check_threshold``
            (cosine, default 0.99) or above ``check_rel_tol`` (relative error, default 0.1;
            None: cosine only).
        solver_args: solver settings as a dict (:mod:`ffo_core.solver_args`: the backend's
            own names, or common cvxpylayers keys such as ``eps``, ``max_iters``,
            ``verbose`` that it translates); a call's ``solver_args=`` adds to these for
            that call only.
        polish: refine an optimal forward solution of a polyhedral problem (LP/QP) that
            the solver left short of exact (a pair undecided near a kink, or a reported
            accuracy worse than 1e-10) by solving the equality-constrained problem of its
            active set and correcting the set until the answer is primal and dual feasible
            (:mod:`ffo_core.engine.polish`; default True).  A solution the solver flags
            inaccurate is left to the ``inaccurate`` policy.  ``last_polish`` says what
            happened per sample.
        executor: where a batch's solves (forward and ghost) run: ``"threads"`` (default:
            this process's thread pool, ``n_jobs``), ``"ray"`` (the Ray cluster the process
            is connected to, or a local runtime started for it) or ``"ray://HOST:PORT"``
            (:mod:`ffo_core.layers.executors`).

    ``last_diagnostics`` holds, after a backward pass, per-sample details (delta, sizes of
    the active set, weakly active rows, fallback).  One layer may be called from several
    threads at once; ``last_*`` then describe the most recent call of any thread.
    """

    def __init__(
        self,
        solver: str | Backend = "clarabel",
        *,
        backward: str = "ffo",
        delta: float | None = None,
        kappa: float | None = None,
        central: bool | None = None,
        tau_s: float | None = None,
        tau_lam: float | None = None,
        n_jobs: int | None = None,
        inaccurate: str = "warn",
        ghost_fallback: str = "raise",
        time_limit: float | None = None,
        check_every: int | None = None,
        check_threshold: float = 0.99,
        check_rel_tol: float | None = 0.1,
        solver_args: dict | None = None,
        executor: str = "threads",
        polish: bool = True,
        altdiff_tol: float = 1e-8,
        altdiff_max_iter: int = 100_000,
    ) -> None:
        super().__init__()
        check_choice("backward", backward, BACKWARDS)
        check_choice("inaccurate", inaccurate, INACCURATE_POLICIES)
        check_choice("ghost_fallback", ghost_fallback, GHOST_FALLBACKS)
        check_every = 0 if check_every is None else check_every
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 0:
            raise ConfigError(f"check_every must be a nonnegative int or None, got {check_every!r}")
        if not _is_number(check_threshold) or not -1.0 <= check_threshold <= 1.0:
            raise ConfigError(
                f"check_threshold must be a number in [-1, 1], got {check_threshold!r}"
            )
        if check_rel_tol is not None and (not _is_number(check_rel_tol) or check_rel_tol <= 0):
            raise ConfigError(
                f"check_rel_tol must be a positive number or None, got {check_rel_tol!r}"
            )
        if time_limit is not None and (not _is_number(time_limit) or time_limit <= 0):
            raise ConfigError(
                f"time_limit must be a positive number of seconds or None, got {time_limit!r}"
            )
        self.options = FFOOptions(
            delta=delta, kappa=kappa, central=central, tau_s=tau_s, tau_lam=tau_lam
        )
        backend = with_solver_args(get_backend(solver), solver_args)
        if time_limit is not None:
            backend = with_time_limit(backend, float(time_limit))
        self.backend = backend
        self.solver_args = dict(solver_args or {})
        self._call_backends: dict = {}  # per-call solver_args -> configured copy
        self.backward_mode = backward
        if not _is_number(altdiff_tol) or altdiff_tol <= 0:
            raise ConfigError(f"altdiff_tol must be a positive number, got {altdiff_tol!r}")
        if not isinstance(altdiff_max_iter, int) or altdiff_max_iter < 1:
            raise ConfigError(f"altdiff_max_iter must be a positive int, got {altdiff_max_iter!r}")
        self.altdiff_tol, self.altdiff_max_iter = float(altdiff_tol), altdiff_max_iter
        if polish not in (True, False):
            raise ConfigError(f"polish must be True or False, got {polish!r}")
        self.polish = polish
        self.last_polish: list[str] = []
        self.executor = Executor.of(executor, n_jobs)
        self._runner = self.executor.runner(self.backend)
        self.inaccurate = inaccurate
        self.ghost_fallback = ghost_fallback
        self.time_limit = None if time_limit is None else float(time_limit)
        self.check_every = check_every
        self.check_threshold = float(check_threshold)
        self.check_rel_tol = None if check_rel_tol is None else float(check_rel_tol)
        self.health_log: deque[dict] = deque(maxlen=HEALTH_LOG_SIZE)
        self.last_diagnostics: list[dict] = []
        self.last_status: list[Status] = []
        self._lock = threading.Lock()
        self._backward_calls = 0

    def extra_repr(self) -> str:
        parts = [f"solver={self.backend.name!r}", f"backward={self.backward_mode!r}"]
        if self.backward_mode == "ffo":
            changed = {
                k: v for k, v in vars(self.options).items()
                if v != getattr(FFOOptions(), k)
            }  # fmt: skip
            parts += [f"{k}={v!r}" for k, v in changed.items()]
        return ", ".join(parts)

    # -- layer-specific: how inputs and outputs map to problem data ----------------------
    def _outputs(self, problems, sols: list[Solution]) -> tuple[torch.Tensor, ...]:
        """The output tensors of the solutions."""
        raise NotImplementedError

    def _output_names(self, problems) -> list[str]:
        """One name per output, for messages."""
        raise NotImplementedError

    def _upstream(self, problems, grad_outputs) -> tuple[np.ndarray, Any]:
        """``(c, c_dual)``: the upstream gradient per sample, ``c`` of shape ``(batch, n)``
        on the primal variable and ``c_dual = (c_nu (batch, p), c_lam (batch, m))`` on the
        duals (None when no output is a dual).  The gradients are finite (checked)."""
        raise NotImplementedError

    def _input_gradients(self, problems, grads: list[DataGradient], needs) -> tuple:
        """The gradient tensor of every input (None where ``needs[k]`` is False)."""
        raise NotImplementedError

    def _input_names(self, problems) -> list[str]:
        """One name per input, for messages."""
        raise NotImplementedError

    def _parameter_vector(self, problems, data_gradient: np.ndarray) -> np.ndarray:
        """A data gradient (the compiled data order) in the inputs' coordinates, for the
        health check's second cosine (default: the data itself)."""
        return data_gradient

    # -- the forward ----------------------------------------------------------------------
    def solve_all(self, problems) -> list[Solution]:
        """Solve every sample (guarded: every failure is a typed error naming the sample),
        polish polyhedral solutions, and apply the status and ``inaccurate`` policies.  A
        backend with ``solve_batch`` gets the whole batch in one call (and each polish
        round in one more)."""
        backend = problems.backend
        batched = batch_solver(backend)
        if batched is not None:
            sols = self._solve_batched(problems, batched)
        else:
            outcomes = ["off"] * problems.batch

            def one(i: int) -> Solution:
                guard = GuardedBackend(backend, i)
                g, h, e = problems.solver_problem(i)
                sol = guard.solve(g, h, e)
                if self.polish and sol.status is Status.OPTIMAL and h.dims.nonneg:
                    source = problems.ghost_source(*problems.sample(i)[1:])
                    done = polish(
                        guard, g, h, e, sol, tau_s=self.options.tau_s,
                        tau_lam=self.options.tau_lam, source=source,
                    )  # fmt: skip
                    sol, outcomes[i] = done.sol, done.outcome
                return sol

            sols = self._runner.run("forward", one, problems.batch)
            self.last_polish = outcomes
        self.last_status = [s.status for s in sols]
        check_solutions(sols, backend, self.inaccurate)
        return sols

    def _solve_batched(self, problems, batched) -> list[Solution]:
        """The forward of a batched backend: one ``solve_batch``, then the polish of the
        optimal samples, a round at a time (:func:`~ffo_core.engine.polish.polish_batch`)."""
        samples = [problems.solver_problem(i) for i in range(problems.batch)]
        sols = solve_problems(batched, problem_batch(samples))
        self.last_polish = ["off"] * problems.batch
        if self.polish and samples[0][1].dims.nonneg:
            ks = [k for k, s in enumerate(sols) if s.status is Status.OPTIMAL]
            done = polish_batch(
                batched, [samples[k] for k in ks], [sols[k] for k in ks],
                tau_s=self.options.tau_s, tau_lam=self.options.tau_lam,
            )  # fmt: skip
            for k, d in zip(ks, done):
                sols[k], self.last_polish[k] = d.sol, d.outcome
        return sols

    def backend_for(self, solver_args: dict | None = None):
        """The backend a call's solves go to: the layer's, or a copy configured by the
        call's ``solver_args`` (made once per distinct setting and kept), as the executor
        runs it (:meth:`Executor.backend`: the backend itself, or a remote proxy)."""
        key: Any = ()
        if solver_args:
            try:
                key = tuple(sorted(solver_args.items()))
                hash(key)
            except (AttributeError, TypeError):
                return self.executor.backend(with_solver_args(self.backend, solver_args))
        found = self._call_backends.get(key)
        if found is None:
            if len(self._call_backends) >= 16:  # a few settings alternate; more is a loop
                self._call_backends.clear()
            configured = with_solver_args(self.backend, solver_args)
            found = self._call_backends.setdefault(key, self.executor.backend(configured))
        return found

    def _apply(self, problems, *tensors, solver_args: dict | None = None):
        """Run the autograd function on validated problem data.  The call's solves see
        badly scaled problems rescaled (:mod:`ffo_core.engine.scaling`)."""
        problems.backend = ScaledBackend(self.backend_for(solver_args))
        return _LayerFunction.apply(self, problems, *tensors)

    # -- the backward ---------------------------------------------------------------------
    def data_gradients(self, problems, sols: list[Solution], c: np.ndarray, c_dual=None):
        """Per-sample gradient of ``c[i]'y_i (+ c_dual parts)`` with respect to the data:
        the KKT mode sample by sample, the first-order mode staged over chunks of the batch
        (:func:`~ffo_core.engine.schedule.ffo_backward_batch`), then the fallback policy and
        the health check."""

        def dual(i: int):
            return None if c_dual is None else (c_dual[0][i], c_dual[1][i])

        if self.backward_mode == "kkt":

            def one(i: int) -> DataGradient:
                g, h, e = problems.sample(i)
                try:
                    grad = kkt_backward(g, h, e, sols[i], c[i], self.options, c_dual=dual(i))
                except SolverError as exc:
                    raise with_batch_index(exc, i)  # noqa: B904  (exc itself, cause kept)
                if not grad.is_finite():
                    raise with_batch_index(
                        SolverError(
                            "backward='kkt': the gradient is not finite",
                            backend=problems.backend.name,
                        ),
                        i,
                    )
                return grad

            grads = self._runner.run("backward", one, problems.batch)
        elif self.backward_mode == "altdiff":
            from .altdiff_mode import altdiff_gradients  # torch work, loaded when asked

            samples = [problems.sample(i) for i in range(problems.batch)]
            grads = altdiff_gradients(
                samples, sols, c, c_dual, self.altdiff_tol, self.altdiff_max_iter
            )
        else:
            grads = []
            for indices in backward_chunks(problems.batch, problems.sample_bytes()):
                grads += self._ffo_chunk(problems, sols, c, dual, indices)
        self.last_diagnostics = [g.diagnostics for g in grads]
        with self._lock:
            self._backward_calls += 1
            call = self._backward_calls
        if self.check_every and self.backward_mode == "ffo" and call % self.check_every == 0:
            self._health_check(call, problems, sols, c, dual, grads)
        return grads

    def _ffo_chunk(self, problems, sols, c, dual, indices: range) -> list[DataGradient]:
        """First-order data gradients of the samples ``indices``, staged over the chunk,
        then the fallback policy for each sample whose ghost failed."""
        samples = []
        for i in indices:
            g, h, e = problems.sample(i)
            guard = GuardedBackend(problems.backend, i, ghost=True, inaccurate=self.inaccurate)
            samples.append(FFOSample(guard, g, h, e, sols[i], c[i], None, dual(i)))
        batched = batch_solver(problems.backend)
        if batched is None or not polyhedral_applies(samples):  # array path: no source
            samples = [s._replace(source=problems.ghost_source(s.h, s.e)) for s in samples]
        results = ffo_backward_batch(
            samples,
            self.options,
            run=lambda fn, k: self._runner.run("backward", fn, k),
            batched=batched,
        )
        grads = []
        for i, s, grad in zip(indices, samples, results):
            if isinstance(grad, DataGradient):
                grad = self._finite(i, grad)
            if isinstance(grad, DataGradient):
                grad.diagnostics["ghost_fallback"] = None
            else:
                try:
                    grad = self._ffo_fallback(i, s, grad)
                except SolverError as exc:
                    raise with_batch_index(exc, i)  # noqa: B904  (exc itself, cause kept)
            grads.append(grad)
        return grads

    # -- copies and pickles -----------------------------------------------------------------
    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_lock", None)  # locks cannot be copied or pickled
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()


__all__ = ["BACKWARD_CHUNK_BYTES", "GHOST_FALLBACKS", "SolverLayer", "backward_chunks"]
