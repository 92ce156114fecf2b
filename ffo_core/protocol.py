"""The solver protocol: the only language the engine speaks to a solver.

Every problem the engine sends to a backend, forward or ghost, is one sample of

    minimize    1/2 y'P y + q'y + extra_linear_term'y
    subject to  A y  = b                  (Equalities;     dual nu, free)
                G y + s = h,  s in K      (ConeConstraints; dual lam in K*)

    K = R+^l  x  SOC(d_1) x ... x SOC(d_k)  x  EXP^m  x  PSD(s_1) x ...   (in that order)

with Lagrangian ``L = 1/2 y'Py + q'y + nu'(Ay - b) + lam'(Gy - h)`` and KKT conditions

    P y + q + A'nu + G'lam = 0,   A y = b,   G y + s = h,   s in K,  lam in K*,  s'lam = 0.

Conventions (every adapter converts its solver's native conventions to these):

* ``P`` is the *full symmetric* matrix (both triangles stored), ``scipy.sparse`` CSC,
  shape ``(n, n)``; ``None`` means zero.  Adapters that want a triangle take it.
* ``A`` (shape ``(p, n)``) and ``G`` (shape ``(m, n)``) are CSC; ``b``, ``h`` are 1-D.
* Duals: ``eq_dual`` (nu) is free; ``ineq_dual`` (lam) lies in the dual cone K*, so for the
  nonnegative block ``lam >= 0``; ``slack`` is ``s = h - G y`` in K.
* SOC(d) is ``{(t, x) in R x R^(d-1): ||x||_2 <= t}``.
* EXP is CVXPY/SCS/Clarabel's ``cl{(x, y, z): y e^(x/y) <= z, y > 0}``, 3 rows per cone.
* PSD(s) holds a symmetric ``s x s`` matrix as its upper triangle stacked column by
  column, ``(0,0), (0,1), (1,1), (0,2), ...``, off-diagonal entries multiplied by sqrt(2)
  (the isometric "svec"; Clarabel's native layout), ``s(s+1)/2`` rows per cone.
* All arrays are float64.

A backend is any object with ``name``, ``capabilities`` and ``solve``; it is found by the
registry through the ``ffo`` entry-point group (see :mod:`ffo_core.hookspecs`).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from .sparse_ops import upper_triangle

__all__ = [
    "CONES",
    "Backend",
    "Capabilities",
    "ConeConstraints",
    "ConeDims",
    "Equalities",
    "Objective",
    "Solution",
    "SolveInfo",
    "Status",
]

#: Names of the cones of the protocol, in the order their rows appear in ``G``.
#: ``"zero"`` is the cone of the :class:`Equalities` block.
CONES = ("zero", "nonneg", "soc", "exp", "psd")


class Status(enum.Enum):
    """Outcome of a solve, common to every backend."""

    OPTIMAL = "optimal"
    OPTIMAL_INACCURATE = "optimal_inaccurate"
    INFEASIBLE = "infeasible"
    INFEASIBLE_INACCURATE = "infeasible_inaccurate"
    UNBOUNDED = "unbounded"
    UNBOUNDED_INACCURATE = "unbounded_inaccurate"
    ITERATION_LIMIT = "iteration_limit"
    TIME_LIMIT = "time_limit"
    NUMERICAL_ERROR = "numerical_error"

    @property
    def has_solution(self) -> bool:
        """True when ``Solution.primal`` holds a (possibly inaccurate) optimum."""
        return self in (Status.OPTIMAL, Status.OPTIMAL_INACCURATE)


@dataclass(frozen=True)
class ConeDims:
    """Sizes of the cone blocks of ``G``: ``nonneg`` rows, then SOC, EXP, PSD blocks."""

    nonneg: int = 0
    soc: tuple[int, ...] = ()
    exp: int = 0  # number of 3-dimensional exponential cones
    psd: tuple[int, ...] = ()  # matrix orders s; each block has s(s+1)/2 rows

    @property
    def rows(self) -> int:
        """Total number of rows of ``G`` these cones occupy."""
        return self.nonneg + sum(self.soc) + 3 * self.exp + sum(s * (s + 1) // 2 for s in self.psd)

    @functools.cached_property
    def kinds(self) -> frozenset[str]:
        """The cone names (from :data:`CONES`) with at least one row (formed once: every
        solve asks)."""
        present = {
            "nonneg": self.nonneg > 0,
            "soc": bool(self.soc),
            "exp": self.exp > 0,
            "psd": bool(self.psd),
        }
        return frozenset(k for k, v in present.items() if v)


@dataclass
class Objective:
    """``1/2 y'P y + q'y``; ``P`` full symmetric CSC ``(n, n)`` or ``None`` (zero).

    ``P_upper``: ``P``'s upper triangle (diagonal included, stored zeros dropped) when the
    caller has it already; the engine passes one triangle for a ``P`` shared by the whole
    batch.  Adapters read it through :meth:`upper`, which forms and keeps it on first use.
    Treat an Objective as immutable: build a new one rather than write into ``P``.
    """

    P: sp.csc_matrix | None
    q: np.ndarray
    P_upper: sp.csc_matrix | None = field(default=None, repr=False, compare=False)

    @property
    def n(self) -> int:
        return self.q.shape[0]

    def upper(self) -> sp.csc_matrix:
        """``P``'s upper triangle as CSC without stored zeros (all zeros when ``P`` is
        None): the quadratic term Clarabel, SCS and OSQP take.  Formed once per Objective
        (a forward solve and its ghost share it)."""
        if self.P_upper is None:
            self.P_upper = (
                upper_triangle(self.P) if self.P is not None else sp.csc_matrix((self.n, self.n))
            )
        return self.P_upper

    @property
    def is_quadratic(self) -> bool:
        """True when ``P`` has a nonzero entry (stored zeros do not count)."""
        return self.P is not None and self.P.nnz > 0 and bool(np.any(self.P.data))


@dataclass
class ConeConstraints:
    """``G y + s = h``, ``s in K(dims)``; ``G`` CSC ``(m, n)``, ``h`` shape ``(m,)``."""

    G: sp.csc_matrix
    h: np.ndarray
    dims: ConeDims

    @property
    def m(self) -> int:
        return self.h.shape[0]


@dataclass
class Equalities:
    """``A y = b``; ``A`` CSC ``(p, n)``, ``b`` shape ``(p,)``; ``p`` may be 0."""

    A: sp.csc_matrix
    b: np.ndarray

    @property
    def p(self) -> int:
        return self.b.shape[0]


@dataclass
class SolveInfo:
    """What the solver says about its own work.

    ``accuracy`` is the solver's estimate of how far the returned point is from exact
    (the largest of its final primal/dual residuals and gap, relative units as the
    solver reports them); when the solver reports none, its tolerance setting.  The
    engine derives its active-set thresholds from it.
    """

    iterations: int | None = None
    solve_time: float | None = None  # seconds, as the solver measured it
    accuracy: float | None = None
    raw_status: str | None = None  # the solver's own status word
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Solution:
    """One solve's answer in protocol conventions (see the module docstring)."""

    status: Status
    primal: np.ndarray | None = None  # y, shape (n,)
    eq_dual: np.ndarray | None = None  # nu, shape (p,)
    ineq_dual: np.ndarray | None = None  # lam, shape (m,), in K*
    slack: np.ndarray | None = None  # s = h - G y, shape (m,), in K
    info: SolveInfo = field(default_factory=SolveInfo)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the engine reads this instead of asking which solver it is.

    ``cones`` uses the names of :data:`CONES`.  ``max_variables``/``max_constraints``
    are hard size limits (a size-limited licence); ``None`` means unlimited.
    """

    cones: frozenset[str] = frozenset({"zero", "nonneg"})
    quadratic_objective: bool = True
    warm_start: bool = False
    needs_license: bool = False
    max_variables: int | None = None
    max_constraints: int | None = None
    thread_safe: bool = True

    def missing_cones(self, dims: ConeDims, has_equalities: bool = False) -> set[str]:
        """Cones the problem uses that this backend does not support."""
        needed = set(dims.kinds) | ({"zero"} if has_equalities else set())
        return needed - set(self.cones)


@runtime_checkable
class Backend(Protocol):
    """What a solver adapter implements.  ``solve`` must not modify its inputs.

    Optional (not part of this Protocol's checks; the engine looks it up with ``getattr``):

        resolve(previous: Solution | None, g, h, e, extra_linear_term) -> Solution

    the answer ``solve(g, h, e, extra_linear_term)`` gives, to solver accuracy, for a
    backend that can reuse what it set up for ``previous``: the engine passes the Solution
    of the same ``(g, h, e)`` objects at another extra linear term (the second solve of one
    ghost problem, in the same thread).  It must fall back to a fresh solve whenever
    ``previous`` is not its own answer to those objects.  The Clarabel adapter keeps its
    solver in ``previous.info.extra`` and updates ``q``.
    """

    name: str
    capabilities: Capabilities

    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term: np.ndarray | None = None,
        *,
        warm_start: Solution | None = None,
    ) -> Solution: ...
