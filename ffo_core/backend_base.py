"""A small base class that adapters may derive from (they need not: the protocol is duck-typed).

It gives an adapter the registry-facing class methods (``availability``, ``version``), keeps
the config-string settings, and validates them against the names the adapter declares, so
that each adapter only writes its conversions, its status map and its ``solve``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError, SolverError
from .protocol import Capabilities, ConeConstraints, Equalities, Objective
from .sparse_ops import prune, stack_rows, upper_triangle  # noqa: F401  (re-exported: adapters import them from here)


def linear_cost(g: Objective, extra_linear_term, backend: str) -> np.ndarray:
    """``q + extra_linear_term`` (a fresh float array) for a backend without a quadratic
    objective; a nonzero ``P`` is refused with :class:`SolverError` (the engine compiles
    ``1/2 y'Py`` into a second-order cone for such backends, so one means a caller bug)."""
    if g.is_quadratic:
        raise SolverError(
            f"{backend} has no quadratic objective (Capabilities.quadratic_objective="
            "False): the engine compiles 1/2 y'Py into a second-order cone for it; this "
            "solve was given a nonzero P",
            backend=backend,
        )
    c = np.array(g.q, dtype=float)
    return c if extra_linear_term is None else c + extra_linear_term


def data_digest(arrays) -> bytes:
    """A 16-byte hash of arrays' dtypes, shapes and bytes: the key of a structure cache
    (adapters confirm a hit with :func:`same_sparse`, so a collision is never a wrong
    answer)."""
    digest = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return digest.digest()


def same_sparse(X, Y) -> bool:
    """True when two compressed sparse matrices are identical (pattern and values)."""
    return (
        X.shape == Y.shape
        and np.array_equal(X.indptr, Y.indptr)
        and np.array_equal(X.indices, Y.indices)
        and np.array_equal(X.data, Y.data)
    )


def kkt_residual(g: Objective, h: ConeConstraints, e: Equalities, y, nu, lam, s) -> float:
    """Relative primal, stationarity and complementarity residual of a point, in protocol
    terms: what an adapter can report as ``SolveInfo.accuracy`` when its solver's own
    figures are not in the protocol's units (checks the nonnegative block's sign only)."""
    Py = g.P @ y if g.P is not None else np.zeros_like(y)
    grad = Py + g.q + e.A.T @ nu + h.G.T @ lam
    scale = max(
        1.0, float(np.max(np.abs(g.q), initial=0.0)), float(np.max(np.abs(Py), initial=0.0))
    )
    stat = float(np.max(np.abs(grad), initial=0.0)) / scale
    bscale = max(
        1.0, float(np.max(np.abs(e.b), initial=0.0)), float(np.max(np.abs(h.h), initial=0.0))
    )
    prim = float(np.max(np.abs(e.A @ y - e.b), initial=0.0))
    if h.dims.nonneg:
        prim = max(prim, float(np.max(-s[: h.dims.nonneg], initial=0.0)))
    obj = abs(float(0.5 * y @ Py + g.q @ y))
    comp = abs(float(s @ lam)) / max(1.0, obj)
    return max(stat, prim / bscale, comp)


class BackendBase:
    """Common plumbing of first-party adapters.

    Subclasses set ``name``, ``capabilities``, ``package`` (the import name of the solver,
    imported lazily by the subclass inside ``solve``) and ``distribution`` (its PyPI name),
    and implement :meth:`setting_names` and ``solve``.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    package: ClassVar[str] = ""
    distribution: ClassVar[str] = ""

    def __init__(self, **settings: Any) -> None:
        valid = set(self.setting_names())
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)} for backend {self.name!r}; "
                f"valid settings: {', '.join(sorted(valid))}"
            )
        self.settings: dict[str, Any] = dict(settings)
        self._config: dict[str, Any] = dict(settings)  # as given, adapter options included

    def _pop_cache_size(self, default: int) -> int:
        """Take the adapter option ``cache_size`` (structures cached per thread, 0 = off)
        out of ``settings`` and check it."""
        cache_size = self.settings.pop("cache_size", default)
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ConfigError(
                f"{self.name}: cache_size must be a nonnegative int, got {cache_size!r}"
            )
        return cache_size

    def with_settings(self, **settings: Any) -> BackendBase:
        """A new backend of the same kind with ``settings`` added to (or replacing) this
        one's; this one is unchanged (its caches are not shared).  ``FFOLayer(time_limit=)``
        calls ``with_settings(time_limit=seconds)``: adapters map ``time_limit`` to their
        solver's own name, and one without a time limit raises :class:`ConfigError`."""
        return type(self)(**{**self._config, **settings})

    # -- registry-facing class methods -------------------------------------------------
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """``(True, "")`` if the backend can run here, else ``(False, reason)``."""
        if cls.package and importlib.util.find_spec(cls.package) is None:
            return False, (
                f"Python package {cls.package!r} is not installed "
                f"(pip install {cls.distribution or cls.package})"
            )
        return True, ""

    @classmethod
    def version(cls) -> str | None:
        """Version of the underlying solver package, or ``None`` if not installed."""
        try:
            return importlib.metadata.version(cls.distribution or cls.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    # -- for subclasses ------------------------------------------------------------------
    def setting_names(self) -> Iterable[str]:
        """The solver's own parameter names accepted in the config string."""
        return ()

    def check_size(self, g: Objective, h: ConeConstraints, e: Equalities) -> None:
        """Raise :class:`SolverError` when the problem exceeds a declared size limit."""
        caps = self.capabilities
        if caps.max_variables is not None and g.n > caps.max_variables:
            raise SolverError(
                f"{self.name}: {g.n} variables exceed this installation's limit of "
                f"{caps.max_variables}",
                backend=self.name,
            )
        rows = h.m + e.p
        if caps.max_constraints is not None and rows > caps.max_constraints:
            raise SolverError(
                f"{self.name}: {rows} constraints exceed this installation's limit of "
                f"{caps.max_constraints}",
                backend=self.name,
            )

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.settings.items())
        return f"<{type(self).__name__} {self.name}{':' + opts if opts else ''}>"
