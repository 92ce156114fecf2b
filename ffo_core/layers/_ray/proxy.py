"""The backend a layer calls under ``executor="ray"`` (:class:`RayBackend`): the wrapped
backend's ``name`` and ``capabilities``, a ``solve`` (and a ``resolve`` when the backend has
one) that runs on the pool's workers, and pickling as the executor plus the backend's
``(class, settings)`` (:func:`_rebuild_backend`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...protocol import ConeConstraints, Equalities, Objective, Solution
from .cluster import _pool
from .shipping import TOKEN_KEY, BackendSpec
from .state import _Token

if TYPE_CHECKING:
    from ..ray_executor import RayExecutor


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
        from ...engine.solves import tightened

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
