"""What the caller keeps about the workers and its batches: an actor as the pool sees it
(:class:`_Slot`), one batch in flight (:class:`_Run`, and :data:`_CURRENT`, which tells a
caller thread its batch and sample), and the handle an answer carries for ``resolve``
(:class:`_Token`, which never leaves this process)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .shipping import _content_key


@dataclass
class _Slot:
    """One actor as the caller sees it."""

    index: int
    actor: Any
    info: dict
    in_flight: int = 0
    generation: int = 0  # bumped when the actor is lost (its caches are gone)
    known: set = field(default_factory=set)  # keys sent to this generation
    unable: dict = field(default_factory=dict)  # backend key -> why it cannot run here


class _Token:
    """What a :class:`RayBackend` answer carries for ``resolve``: where its set-up is kept,
    the problem objects it belongs to, and the chain of terms to replay it elsewhere."""

    __slots__ = ("chain", "generation", "kept_id", "objects", "pool", "slot", "warm_start")

    def __init__(self, pool, slot, generation, kept_id, objects, chain, warm_start) -> None:
        self.pool, self.slot, self.generation, self.kept_id = pool, slot, generation, kept_id
        self.objects, self.chain, self.warm_start = objects, chain, warm_start

    def __reduce__(self):  # a token is only meaningful in the process that made it
        return (type(None), ())


class _Run:
    """One batch issued by :class:`RayRunner`: its id, cancel flag, outstanding tasks and
    the content keys of the objects it has hashed (each once per run)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.batch_id = os.urandom(12)
        self.cancelled = threading.Event()
        self.lock = threading.Lock()
        self.outstanding: dict = {}  # ObjectRef -> slot
        self.memo: dict[int, tuple[Any, bytes]] = {}  # id(obj) -> (obj, key)
        self.slots: set = set()

    def key(self, obj) -> bytes:
        found = self.memo.get(id(obj))
        if found is not None and found[0] is obj:
            return found[1]
        key = _content_key(obj)
        self.memo[id(obj)] = (obj, key)
        return key


_CURRENT = threading.local()  # .run: the _Run of this thread's batch; .index: its sample
