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
class SparsePattern:
    """Fixed CSC sparsity pattern of one data matrix; values come per sample."""

    shape: tuple[int, int]
    indices: np.ndarray  # row index of each stored entry (CSC order)
    indptr: np.ndarray
    cols: np.ndarray  # column index of each stored entry

    @classmethod
    def from_rows_cols(cls, rows, cols, shape) -> SparsePattern:
        """Entries must already be sorted in CSC order (by column, then row)."""
        indptr = np.zeros(shape[1] + 1, dtype=np.int64)
        np.add.at(indptr, np.asarray(cols, dtype=np.int64) + 1, 1)
        return cls(
            tuple(shape),
            np.asarray(rows, dtype=np.int32),
            np.cumsum(indptr),
            np.asarray(cols, dtype=np.int32),
        )

    @property
    def nnz(self) -> int:
        return self.indices.shape[0]

    @functools.cached_property
    def canonical(self) -> bool:
        """Rows strictly increasing within every column (sorted, no duplicates)."""
        step = np.diff(self.indices.astype(np.int64))
        starts = self.indptr[1:-1]
        inner = np.ones(step.size, dtype=bool)
        inner[starts[(starts > 0) & (starts <= step.size)] - 1] = False  # column breaks
        return bool(np.all(step[inner] > 0))

    @classmethod
    def of(cls, M) -> SparsePattern:
        """The pattern of sparse ``M`` (canonical CSC first: sorted, no duplicates; stored
        zeros stay, they are entries of the pattern)."""
        M = sp.csc_matrix(M, copy=True)
        M.sum_duplicates()
        cols = np.repeat(np.arange(M.shape[1], dtype=np.int32), np.diff(M.indptr))
        return cls(tuple(M.shape), M.indices.astype(np.int32), M.indptr.astype(np.int64), cols)

    def matrix(self, values: np.ndarray) -> sp.csc_matrix:
        """The CSC matrix with these entry values (arrays shared, not copied); flagged
        canonical when the pattern is, so scipy and :func:`~ffo_core.sparse_ops.prune`
        do not scan the indices again (3 million of them for the paper's n = 1000)."""
        M = sp.csc_matrix((values, self.indices, self.indptr), shape=self.shape)
        if self.canonical:
            M.has_canonical_format = True
        return M


@dataclass
class ProblemBatch:
    """``batch`` problems of the protocol's form that share one sparsity structure (what a
    layer's batch is): the optional backend method ``solve_batch`` takes one.

    Every matrix is a :class:`SparsePattern` (CSC, shared by the batch) and a values array
    with one row per sample, aligned with the pattern's entries (``values[k]`` is sample
    ``k``'s ``.data``); vectors are ``(batch, size)``.  A leading dimension of 1 instead of
    ``batch`` means "the same for every sample" (a shared matrix or vector is not copied
    ``batch`` times).  ``P`` is the full symmetric pattern (both triangles) or ``None``.

    ==========  ==========================  =======================================
    field       shape                       meaning
    ==========  ==========================  =======================================
    P_values    (batch or 1, P.nnz)         ``P``'s entries
    q           (batch or 1, n)             linear cost
    A_values    (batch or 1, A.nnz)         equality matrix ``A`` (``p x n``)
    b           (batch or 1, p)             equality right-hand side
    G_values    (batch or 1, G.nnz)         cone constraint matrix ``G`` (``m x n``)
    h           (batch or 1, m)             cone right-hand side
    ==========  ==========================  =======================================

    Arrays are NumPy float64; a *device* backend (``Capabilities.device``) may also be given
    torch tensors, all on one device and of one floating dtype, and then answers in
    tensors on that device and dtype.

    Absent rows.  Within one batch a row of ``A`` or of ``G``'s nonnegative block may be all
    zeros in some samples (``b_i = 0`` for an equality, ``h_i >= 0`` for an inequality): the
    row is then absent from that sample.  This is how the engine sends a batch of ghost
    problems whose active sets differ through one structure.  A backend must solve such a
    sample as the problem without the row; the dual it returns for an absent row is not
    read (an equality's multiplier is not unique there).
    """

    batch: int
    P: SparsePattern | None
    P_values: Any
    q: Any
    A: SparsePattern
    A_values: Any
    b: Any
    G: SparsePattern
    G_values: Any
    h: Any
    dims: ConeDims

    @property
    def n(self) -> int:
        return self.A.shape[1]

    @property
    def p(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.G.shape[0]

    def sample(self, i: int) -> tuple[Objective, ConeConstraints, Equalities]:
        """Sample ``i`` as the protocol objects of ``solve`` (NumPy; the reference a
        ``solve_batch`` must agree with).  Absent rows are kept, as zero rows."""

        def row(values, k: int):
            values = values[0 if values.shape[0] == 1 else k]
            if hasattr(values, "detach"):  # a torch tensor
                values = values.detach().cpu().double().numpy()
            return np.asarray(values, dtype=float)

        P = None if self.P is None else self.P.matrix(row(self.P_values, i))
        return (
            Objective(P, row(self.q, i)),
            ConeConstraints(self.G.matrix(row(self.G_values, i)), row(self.h, i), self.dims),
            Equalities(self.A.matrix(row(self.A_values, i)), row(self.b, i)),
        )


@dataclass
class BatchSolution:
    """What ``solve_batch`` returns: every sample's answer in protocol conventions, stacked.

    ``primal`` ``(batch, n)``, ``eq_dual`` ``(batch, p)``, ``ineq_dual`` ``(batch, m)``,
    ``slack`` ``(batch, m)``: NumPy float64, or torch tensors (device backends given
    tensors).  ``status[k]`` and ``info[k]`` are sample ``k``'s; the rows of a sample whose
    status has no solution are not read (NaN is fine).
    """

    status: list[Status]
    primal: Any
    eq_dual: Any
    ineq_dual: Any
    slack: Any
    info: list[SolveInfo]

    def sample(self, k: int) -> Solution:
        """Sample ``k`` as a :class:`Solution` (NumPy float64 arrays)."""

        def row(values):
            values = values[k]
            if hasattr(values, "detach"):
                values = values.detach().cpu().double().numpy()
            return np.asarray(values, dtype=float)

        if not self.status[k].has_solution:
            return Solution(status=self.status[k], info=self.info[k])
        return Solution(
            self.status[k],
            row(self.primal),
            row(self.eq_dual),
            row(self.ineq_dual),
            row(self.slack),
            self.info[k],
        )


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
    #: a device backend: ``solve_batch`` also takes torch tensors (CPU or CUDA) and answers
    #: on their device, so the layers keep the data there (no round trip through NumPy)
    device: bool = False

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

        solve_batch(batch: ProblemBatch, extra_linear_term=None) -> BatchSolution

    every sample of a :class:`ProblemBatch` (problems sharing one sparsity structure) in one
    call; ``extra_linear_term`` is ``(batch, n)`` or None.  Sample ``k`` of the answer must
    be what ``solve`` gives for ``batch.sample(k)`` (with ``extra_linear_term[k]``), to
    solver accuracy.  The engine prefers it, when present, for the forward solves and the
    ghost solves of a batch (docs/plugins.md); the conformance suite checks it against
    ``solve``.
    """

    # read-only members: a class attribute, an instance attribute or a property (a
    # wrapper's) all qualify
    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term: np.ndarray | None = None,
        *,
        warm_start: Solution | None = None,
    ) -> Solution: ...
