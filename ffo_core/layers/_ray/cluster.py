"""Which Ray cluster, and the pool of each: importing Ray (:func:`_import_ray`), connecting
(:func:`_connect`: the user's ``ray.init``, ``ray://HOST:PORT``, ``RAY_ADDRESS``, or a runtime
on this machine only, :func:`start_local`), the pool of the current Ray job
(:func:`_pool`, rebuilt after a new ``ray.init``), and :func:`shutdown`."""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from ...errors import BackendUnavailable
from .pool import _Pool

if TYPE_CHECKING:
    from ..ray_executor import RayExecutor

_EXTRA = "pip install 'ffo[ray]'"
#: Ray's switch for single-machine runtimes (what it uses on macOS and Windows).
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
