"""Where a layer's per-sample solves run: ``executor="threads"`` (this process's thread
pool) or ``executor="ray"`` / ``"ray://HOST:PORT"`` (a Ray cluster).

An :class:`Executor` gives the runtime two things: the backend its solves call
(:meth:`Executor.backend`: the backend itself for threads; for Ray a proxy whose ``solve``
runs on the cluster and answers the same :class:`~ffo_core.protocol.Solution`) and the
runner that issues a batch's solves (:meth:`Executor.runner`: a thread pool; for Ray, one
thread per remote solve in flight).  Everything else in the runtime -- guards, fallbacks,
the backward's steps -- is the same whichever executor runs the solves.
"""

from __future__ import annotations

from typing import Any

from ..engine.solves import BatchRunner
from ..errors import ConfigError


class Executor:
    """The local thread pool (the default); base of the others."""

    spec = "threads"

    def __init__(self, n_jobs: int | None = None) -> None:
        self.n_jobs = n_jobs

    @staticmethod
    def of(spec: str | Executor, n_jobs: int | None = None) -> Executor:
        """The executor a layer's ``executor=`` names (an :class:`Executor` instance, e.g.
        a configured :class:`~ffo_core.layers.ray_executor.RayExecutor`, is used as is)."""
        if isinstance(spec, Executor):
            return spec
        if spec == "threads":
            return Executor(n_jobs)
        if isinstance(spec, str) and (spec == "ray" or spec.startswith("ray://")):
            from .ray_executor import RayExecutor

            return RayExecutor(spec, n_jobs)
        raise ConfigError(f"executor must be 'threads', 'ray' or 'ray://HOST:PORT', got {spec!r}")

    def backend(self, backend: Any) -> Any:
        """The backend the layer's solves call."""
        return backend

    def runner(self, backend: Any) -> BatchRunner:
        """How a batch's solves are issued."""
        return BatchRunner(backend, self.n_jobs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


__all__ = ["Executor"]
