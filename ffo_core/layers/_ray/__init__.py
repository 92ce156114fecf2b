"""The parts of ``executor="ray"``; :mod:`ffo_core.layers.ray_executor` is the public module
(and its docstring says how the parts work together).

* :mod:`.shipping` -- what travels and how: content keys, request messages, what goes by
  value, the bounded LRU (caller and workers both use it).
* :mod:`.worker` -- the Ray actor that solves (runs on the workers).
* :mod:`.state` -- the caller's records of an actor, a batch and a resolvable answer.
* :mod:`.pool` -- the caller's pool of actors: one solve, its retries, cancelling a batch.
* :mod:`.cluster` -- which cluster, the local runtime, the pool of each Ray job.
* :mod:`.proxy` -- :class:`~ffo_core.layers.ray_executor.RayBackend`, the backend a layer calls.
* :mod:`.errors` -- the exceptions.

Classes here are pickled by reference (their module path travels), so a Ray worker imports
this package: the workers need the same ffo installed as the caller.
"""
