"""What travels between the caller and the Ray workers, and how (both sides use it).

* **Content keys.**  An array or compressed sparse matrix of at least :data:`KEY_MIN_BYTES`
  is keyed by a 16-byte BLAKE2b of its type, shape, dtypes and bytes (:func:`_content_key`);
  smaller ones, and every other object, always go by value.
* **Messages.**  A solve request is a :class:`_Request`; a keyed object inside it is a
  :class:`_Keyed` (key, size, and its ObjectRef while the receiving worker may not hold it);
  the backend is a :class:`_Backend` (name and keyed ``(class, settings)`` payload, made by
  :class:`BackendSpec`); a problem whose objects are not the protocol's own dataclasses is
  sent :class:`_Whole`.
* **By value.**  A solution travels back without what cannot be pickled
  (:func:`_for_caller`), and a warm start travels without the caller's resolve token
  (:func:`_strip`, :data:`TOKEN_KEY`).
* **Caches.**  :class:`_LRU`, the bounded LRU both sides keep keyed objects in.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from ...engine.solves import backend_name
from ...errors import ConfigError
from ...protocol import Solution, SolveInfo

#: Arrays and matrices smaller than this (bytes) always travel by value.
KEY_MIN_BYTES = 512
#: ``info.extra`` key of the token a :class:`RayBackend` answer carries for ``resolve``.
TOKEN_KEY = "ray_resolve"


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


class _Whole(NamedTuple):
    """A problem whose objects are not the protocol's own dataclasses: sent whole."""

    objects: tuple


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


# -- caches --------------------------------------------------------------------------------------
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


# -- what goes by value ----------------------------------------------------------------------
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


def _strip(sol: Solution | None) -> Solution | None:
    """A warm start without our token (it stays in this process)."""
    if sol is None or TOKEN_KEY not in sol.info.extra:
        return sol
    extra = {k: v for k, v in sol.info.extra.items() if k != TOKEN_KEY}
    info = SolveInfo(
        sol.info.iterations, sol.info.solve_time, sol.info.accuracy, sol.info.raw_status, extra
    )
    return Solution(sol.status, sol.primal, sol.eq_dual, sol.ineq_dual, sol.slack, info)
