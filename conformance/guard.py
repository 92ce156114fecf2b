"""Inputs must come back unchanged: a wrapper that checks every solve.

The protocol (:class:`ffo_core.protocol.Backend`) says ``solve`` must not modify its inputs:
the engine shares one ``Objective``, ``ConeConstraints`` and ``Equalities`` between a
sample's forward solve, its ghost problems and the gradient that follows, so a backend that
writes into them (an in-place scaling, a sign flip "undone" later, a ``+=`` on ``q``)
silently corrupts everything computed after it.

:class:`GuardedBackend` wraps a backend: before each ``solve``, ``resolve`` and
``solve_batch`` it copies every array it passes (``P``, ``q``, ``G``, ``h``, ``A``, ``b``:
values, indices and index pointers; ``extra_linear_term``; every array of a
``ProblemBatch``), and after the call it compares.  A difference is recorded (what changed,
where, by how much), the caller's arrays are restored from the copy -- so nothing the suite
computes later, its reference included, sees the corruption -- and :class:`InputsModified`
is raised.  The checks report it as a failure of the check that made the call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np


class InputsModified(Exception):
    """A backend wrote into the arrays it was given."""


@dataclass
class _Item:
    label: str
    # a NumPy array or a torch tensor, told apart by duck typing (``detach``)
    array: Any  # the caller's array (written back on a change)
    copy: Any


def _arrays(label: str, value) -> list[tuple[str, np.ndarray]]:
    """The NumPy arrays inside ``value`` (sparse matrices: data, indices, indptr)."""
    if value is None:
        return []
    if hasattr(value, "detach"):  # a torch tensor (device backends' solve_batch)
        return [(label, value)]
    if hasattr(value, "indptr") and hasattr(value, "data"):
        return [
            (f"{label}.data", value.data),
            (f"{label}.indices", value.indices),
            (f"{label}.indptr", value.indptr),
        ]
    if isinstance(value, np.ndarray):
        return [(label, value)]
    return []


def _problem_arrays(g, h, e, extra) -> list[tuple[str, np.ndarray]]:
    out = []
    out += _arrays("Objective.P", getattr(g, "P", None))
    out += _arrays("Objective.P_upper", getattr(g, "P_upper", None))
    out += _arrays("Objective.q", getattr(g, "q", None))
    out += _arrays("ConeConstraints.G", getattr(h, "G", None))
    out += _arrays("ConeConstraints.h", getattr(h, "h", None))
    out += _arrays("Equalities.A", getattr(e, "A", None))
    out += _arrays("Equalities.b", getattr(e, "b", None))
    out += _arrays("extra_linear_term", extra)
    return out


def _batch_arrays(batch, extra) -> list[tuple[str, np.ndarray]]:
    out = []
    for name in ("P_values", "q", "A_values", "b", "G_values", "h"):
        out += _arrays(f"ProblemBatch.{name}", getattr(batch, name, None))
    for name in ("P", "A", "G"):
        pattern = getattr(batch, name, None)
        if pattern is not None:
            for part in ("indices", "indptr", "cols"):
                out += _arrays(f"ProblemBatch.{name}.{part}", getattr(pattern, part, None))
    out += _arrays("extra_linear_term", extra)
    return out


def _copy(a):
    return a.detach().clone() if hasattr(a, "detach") else np.array(a, copy=True)


def _same(a, b) -> bool:
    if hasattr(a, "detach"):
        return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _describe(item: _Item) -> str:
    a, c = item.array, item.copy
    if hasattr(a, "detach"):
        a, c = a.detach().cpu().numpy(), c.detach().cpu().numpy()
    if a.shape != c.shape:
        return f"{item.label} changed shape {c.shape} -> {a.shape}"
    diff = np.flatnonzero(a.ravel() != c.ravel())
    if diff.size == 0:
        return f"{item.label} changed (NaN pattern)"
    k = int(diff[0])
    size = ""
    if a.dtype.kind in "fc":
        size = f", largest change {float(np.max(np.abs(a.ravel()[diff] - c.ravel()[diff]))):.3g}"
    return (
        f"{item.label} changed in {diff.size} of {a.size} entries (first at [{k}]: "
        f"{c.ravel()[k]!r} -> {a.ravel()[k]!r}{size})"
    )


class Snapshot:
    """Copies of arrays taken before a call; :meth:`verify` compares and restores."""

    def __init__(self, pairs: list[tuple[str, np.ndarray]]) -> None:
        seen: set[int] = set()
        self.items: list[_Item] = []
        for label, array in pairs:
            if id(array) in seen:
                continue
            seen.add(id(array))
            self.items.append(_Item(label, array, _copy(array)))

    def changes(self) -> list[str]:
        return [_describe(it) for it in self.items if not _same(it.array, it.copy)]

    def restore(self) -> None:
        for it in self.items:
            if not _same(it.array, it.copy):
                try:
                    if hasattr(it.array, "detach"):
                        it.array.copy_(it.copy)
                    else:
                        it.array[...] = it.copy
                except (ValueError, TypeError, RuntimeError):  # shape changed: cannot undo
                    pass


class GuardedBackend:
    """``backend`` with every call's inputs checked (see the module docstring).

    It is a backend itself (``name``, ``capabilities``, ``solve``; ``resolve`` and
    ``solve_batch`` exactly when the wrapped backend has them), so the engine and
    ``FFOLayer`` can be given it.  ``violations`` lists every change seen, by any call, in
    any thread, including those the engine wrapped into its own errors; the checks read it.
    """

    def __init__(self, backend, violations: list[str] | None = None) -> None:
        self._backend = backend
        self.violations: list[str] = [] if violations is None else violations
        self._lock = threading.Lock()

    @property
    def inner(self):
        return self._backend

    @property
    def name(self) -> str:
        return self._backend.name

    @property
    def capabilities(self):
        return self._backend.capabilities

    def _checked(self, what: str, snapshot: Snapshot, call):
        try:
            result = call()
        finally:
            changes = snapshot.changes()
            if changes:
                snapshot.restore()
        if changes:
            message = (
                f"the backend wrote into its inputs during {what}: "
                + "; ".join(changes)
                + " (the protocol requires solve to leave g, h, e and extra_linear_term "
                "unchanged: the engine reuses them for the ghost problems and the gradient)"
            )
            with self._lock:
                self.violations.append(message)
            raise InputsModified(message)
        return result

    def solve(self, g, h, e, extra_linear_term=None, *, warm_start=None):
        snap = Snapshot(_problem_arrays(g, h, e, extra_linear_term))
        return self._checked(
            "solve",
            snap,
            lambda: self._backend.solve(g, h, e, extra_linear_term, warm_start=warm_start),
        )

    def __getattr__(self, attr: str):
        if attr == "_backend":  # not set yet (copy, pickle): no recursion
            raise AttributeError(attr)
        inner = self._backend
        if attr == "resolve":
            again = inner.resolve  # AttributeError when the backend has none

            def resolve(previous, g, h, e, extra_linear_term):
                snap = Snapshot(_problem_arrays(g, h, e, extra_linear_term))
                return self._checked(
                    "resolve", snap, lambda: again(previous, g, h, e, extra_linear_term)
                )

            return resolve
        if attr == "solve_batch":
            batched = inner.solve_batch

            def solve_batch(batch, extra_linear_term=None):
                snap = Snapshot(_batch_arrays(batch, extra_linear_term))
                return self._checked("solve_batch", snap, lambda: batched(batch, extra_linear_term))

            return solve_batch
        if attr == "with_settings":
            copy = inner.with_settings

            def with_settings(**settings):
                return GuardedBackend(copy(**settings), self.violations)

            return with_settings
        return getattr(inner, attr)

    def __repr__(self) -> str:
        return f"<guarded {self._backend!r}>"
