"""Solve many independent samples with one backend, and turn bad statuses into errors.

Samples run in a thread pool when the backend declares itself thread safe (the solvers we
wrap release the GIL while they work); ``n_jobs=1`` runs them in order.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from .errors import SolverError
from .protocol import Backend, Solution, Status

T = TypeVar("T")

INACCURATE_POLICIES = ("warn", "raise", "ignore")


class InaccurateSolutionWarning(UserWarning):
    """A solver returned a solution it flags as inaccurate (``Status.OPTIMAL_INACCURATE``)."""


def default_jobs(backend: Backend, batch: int) -> int:
    """Threads for a batch: one per core, one if the backend is not thread safe."""
    if not getattr(backend.capabilities, "thread_safe", False):
        return 1
    return max(1, min(batch, os.cpu_count() or 1))


def run_batch(fn: Callable[[int], T], batch: int, n_jobs: int) -> list[T]:
    """``[fn(0), ..., fn(batch - 1)]``, in a thread pool when ``n_jobs > 1``."""
    if n_jobs <= 1 or batch <= 1:
        return [fn(i) for i in range(batch)]
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        return list(pool.map(fn, range(batch)))


def check_solutions(solutions: Sequence[Solution], backend: Backend,
                    inaccurate: str = "warn", what: str = "forward") -> None:
    """Raise :class:`SolverError` naming the first sample without a usable solution."""
    name = getattr(backend, "name", type(backend).__name__)
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
                status=sol.status, batch_index=i, backend=name)
        if sol.status is Status.OPTIMAL_INACCURATE and inaccurate != "ignore":
            message = (f"{what} solve of batch index {i}: solver {name} returned an "
                       f"inaccurate solution ({sol.info.raw_status})")
            if inaccurate == "raise":
                raise SolverError(message, status=sol.status, batch_index=i, backend=name)
            warnings.warn(message, InaccurateSolutionWarning, stacklevel=3)
