"""A batch's solves in one call, for backends with the protocol's optional ``solve_batch``.

The per-sample path hands a backend one problem at a time; a batched backend (``moreau``,
``pdipm``, a plugin's) solves a whole :class:`~ffo_core.protocol.ProblemBatch` -- problems
sharing one sparsity structure -- in one vectorised call.  This module builds those
batches and reads their answers back:

* :func:`problem_batch`: the forward problems of a batch.  Matrices the samples share (the
  same object) travel once, with a leading dimension of 1; others on the union of their
  patterns, one row of values per sample.
* :func:`ghost_batch`: the ghost problems of a batch (step 3 of
  :mod:`.ffo_backward`) through *one* structure although every sample has its own active
  set.  The equality rows are ``[A; G_nonneg]``; a nonnegative row a sample does not lock
  is *absent* there (its coefficients and right-hand side zero, as the protocol allows);
  every curved cone block stays a cone, and a block a sample drops holds zeros with an
  interior point of the cone on its right-hand side, so it constrains nothing.  Its
  answer, read back by :func:`ghost_answers`, is the compact ghost's answer.
* :func:`solve_problems`: a batch through ``solve_batch`` with the guards of the
  per-sample path: every malformed answer or exception is a typed error naming the batch
  index.

The polish (:mod:`.polish`) uses the ghost batch at ``delta = 0`` with the exact
right-hand sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ..errors import FFOError, GhostProblemError, SolverError
from ..protocol import (
    BatchSolution,
    ConeConstraints,
    ConeDims,
    Equalities,
    Objective,
    ProblemBatch,
    Solution,
    SparsePattern,
    Status,
)
from .active_set import ActiveSet, block_slices
from .solves import backend_name, solution_problem

Sample = tuple[Objective, ConeConstraints, Equalities]


def batch_solver(backend):
    """The object whose ``solve_batch`` a batch goes to -- the backend under the engine's
    wrappers (guards, scaling), which are per sample -- or None when it has none."""
    inner = backend
    for _ in range(8):
        if callable(getattr(type(inner), "solve_batch", None)):
            return inner
        nxt = inner.__dict__.get("_backend") if hasattr(inner, "__dict__") else None
        if nxt is None:
            return None
        inner = nxt
    return None


def _canonical(M) -> sp.csc_matrix:
    if isinstance(M, sp.csc_matrix) and M.has_canonical_format:
        return M
    M = sp.csc_matrix(M)
    if not M.has_canonical_format:
        M = M.copy()
        M.sum_duplicates()
    return M


def _pattern(M: sp.csc_matrix) -> SparsePattern:
    """The pattern of canonical CSC ``M`` (:meth:`SparsePattern.of` without its copy)."""
    cols = np.repeat(np.arange(M.shape[1], dtype=np.int32), np.diff(M.indptr))
    return SparsePattern(
        tuple(M.shape), M.indices.astype(np.int32), M.indptr.astype(np.int64), cols
    )


def _matrices(mats: Sequence, shape: tuple[int, int]) -> tuple[SparsePattern, np.ndarray]:
    """One pattern for ``mats`` (one per sample) and the values on it, ``(B or 1, nnz)``."""
    if all(M is mats[0] for M in mats):
        M = _canonical(mats[0]) if mats[0] is not None else sp.csc_matrix(shape)
        return _pattern(M), M.data[None].astype(float)
    canon = [_canonical(M) if M is not None else sp.csc_matrix(shape) for M in mats]
    first = canon[0]
    if all(
        M.nnz == first.nnz
        and np.array_equal(M.indptr, first.indptr)
        and np.array_equal(M.indices, first.indices)
        for M in canon[1:]
    ):  # one pattern already (a batched input whose samples store the same entries)
        return _pattern(first), np.array([M.data for M in canon], dtype=float)
    keys = [np.repeat(np.arange(shape[1]), np.diff(M.indptr)) * shape[0] + M.indices for M in canon]
    union = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    cols, rows = np.divmod(union, shape[0]) if shape[0] else (union, union)
    pattern = SparsePattern.from_rows_cols(rows, cols, shape)
    values = np.zeros((len(canon), union.size))
    for k, (M, key) in enumerate(zip(canon, keys)):
        values[k, np.searchsorted(union, key)] = M.data
    return pattern, values


def _stacked(
    top: tuple[SparsePattern, np.ndarray], bottom: tuple[SparsePattern, np.ndarray]
) -> tuple[SparsePattern, np.ndarray]:
    """The pattern and values of ``[top; bottom]`` (each from :func:`_matrices`), canonical
    CSC: within a column the top's entries (in order) before the bottom's."""
    (T, Tv), (D, Dv) = top, bottom
    rows = np.concatenate([T.indices.astype(np.int64), D.indices.astype(np.int64) + T.shape[0]])
    cols = np.concatenate([T.cols, D.cols])
    order = np.argsort(cols, kind="stable")
    shape = (T.shape[0] + D.shape[0], T.shape[1])
    pattern = SparsePattern.from_rows_cols(rows[order], cols[order], shape)
    batch = max(Tv.shape[0], Dv.shape[0])
    values = np.concatenate(
        [np.broadcast_to(Tv, (batch, T.nnz)), np.broadcast_to(Dv, (batch, D.nnz))], axis=1
    )
    return pattern, values[:, order]


def _vectors(rows: Sequence[np.ndarray]) -> np.ndarray:
    if all(r is rows[0] for r in rows):
        return np.asarray(rows[0], dtype=float)[None]
    return np.array([np.asarray(r, dtype=float) for r in rows])


def problem_batch(samples: Sequence[Sample]) -> ProblemBatch:
    """The forward problems ``samples`` (``(g, h, e)`` each, one structure) as a batch."""
    g0, h0, e0 = samples[0]
    n, p, m = g0.n, e0.p, h0.m
    has_P = any(g.P is not None for g, _, _ in samples)
    P, P_values = (
        _matrices([g.P for g, _, _ in samples], (n, n)) if has_P else (None, np.zeros((1, 0)))
    )
    A, A_values = _matrices([e.A for _, _, e in samples], (p, n))
    G, G_values = _matrices([h.G for _, h, _ in samples], (m, n))
    return ProblemBatch(
        len(samples), P, P_values, _vectors([g.q for g, _, _ in samples]), A, A_values,
        _vectors([e.b for _, _, e in samples]), G, G_values,
        _vectors([h.h for _, h, _ in samples]), h0.dims,
    )  # fmt: skip


def _interior(kind: str, size: int) -> np.ndarray:
    """A point strictly inside one cone block (protocol layouts)."""
    if kind == "soc":
        return np.r_[1.0, np.zeros(size - 1)]
    if kind == "exp":
        return np.array([-1.0, 1.0, 1.0])  # 1 * e^(-1/1) < 1
    out = np.zeros(size * (size + 1) // 2)  # svec of the identity
    out[[j * (j + 1) // 2 + j for j in range(size)]] = 1.0
    return out


def ghost_batch(
    samples: Sequence[Sample],
    actives: Sequence[ActiveSet],
    through: Sequence[np.ndarray | None],
    steps: Sequence[float],
    c: Sequence[np.ndarray],
    c_dual: Sequence[tuple | None] | None = None,
) -> tuple[ProblemBatch, np.ndarray]:
    """The ghosts of ``samples`` at ``delta = steps[k]`` as one batch (module docstring) and
    its extra linear terms ``(B, n)``.  ``through[k]``: the forward point the equality rows
    pass through (a one-sided difference), or None for the exact right-hand sides.  The
    per-sample form of :func:`ghost_batch_arrays`."""
    n = samples[0][0].n
    exact = np.array([y is None for y in through], dtype=bool)
    Y = np.array([np.zeros(n) if y is None else np.asarray(y, dtype=float) for y in through])
    duals = None
    if c_dual is not None and any(d is not None for d in c_dual):
        p, m = samples[0][2].p, samples[0][1].m
        duals = (
            np.array([np.zeros(p) if d is None else d[0] for d in c_dual], dtype=float),
            np.array([np.zeros(m) if d is None else d[1] for d in c_dual], dtype=float),
        )
    return ghost_batch_arrays(
        samples, np.array([a.locked for a in actives]), np.array([a.kept for a in actives]),
        Y, exact, np.asarray(steps, dtype=float),
        np.array([np.asarray(ck, dtype=float) for ck in c]), duals,
    )  # fmt: skip


def pattern_products(pattern: SparsePattern, values: np.ndarray, X: np.ndarray, transpose=False):
    """``M_k x_k`` (``M_k' x_k`` with ``transpose``) for every sample ``k``: ``M_k`` the
    matrix with ``pattern`` and values ``values[k]`` (one row: shared by the batch), ``x_k``
    the row ``X[k]``; shape ``(B, rows)`` (``(B, cols)``)."""
    rows, cols = (pattern.cols, pattern.indices) if transpose else (pattern.indices, pattern.cols)
    size = pattern.shape[1] if transpose else pattern.shape[0]
    if values.shape[0] == 1:
        M = sp.csc_matrix((values[0], pattern.indices, pattern.indptr), shape=pattern.shape)
        return np.asarray((M.T if transpose else M) @ X.T).T
    gather = sp.csr_matrix(
        (np.ones(pattern.nnz), (np.arange(pattern.nnz), rows)), shape=(pattern.nnz, size)
    )
    return np.asarray((values * X[:, cols]) @ gather)


def ghost_batch_arrays(
    samples: Sequence[Sample],
    locked: np.ndarray,
    kept: np.ndarray,
    Y: np.ndarray,
    exact: np.ndarray,
    steps: np.ndarray,
    C: np.ndarray,
    c_dual: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[ProblemBatch, np.ndarray]:
    """:func:`ghost_batch` with the batch's masks and vectors as arrays: ``locked``,
    ``kept`` ``(B, m)`` (the active sets), ``Y`` ``(B, n)`` the points the equality rows pass
    through except where ``exact`` ``(B,)`` (the exact right-hand sides), ``steps``
    ``(B,)``, ``C`` ``(B, n)``, ``c_dual`` ``(C_nu (B, p), C_lam (B, m))`` or None.  The
    right-hand sides are elementwise operations and one product per matrix over the batch."""
    g0, h0, e0 = samples[0]
    n, p, dims = g0.n, e0.p, h0.dims
    nn, m = dims.nonneg, h0.m
    B = len(samples)
    Gs = [h.G for _, h, _ in samples]
    shared_G = all(G is Gs[0] for G in Gs)
    if nn == m:
        G_nn = Gs
    else:
        G_nn = [Gs[0][:nn]] * B if shared_G else [G[:nn] for G in Gs]
    E, E_full = _stacked(_matrices([e.A for _, _, e in samples], (p, n)), _matrices(G_nn, (nn, n)))
    if nn == m:
        empty = np.zeros(0, dtype=np.int32)
        K = SparsePattern((0, n), empty, np.zeros(n + 1, dtype=np.int64), empty)
        K_values = np.zeros((1, 0))
    else:
        K, K_values = _matrices([Gs[0][nn:]] * B if shared_G else [G[nn:] for G in Gs], (m - nn, n))
    keep_eq = np.ones((B, p + nn), dtype=bool)
    keep_eq[:, p:] = locked[:, :nn]
    E_values = np.where(keep_eq[:, E.indices], E_full, 0.0)  # absent rows: zeros
    kept = kept[:, nn:]
    K_values = np.where(kept[:, K.indices], K_values, 0.0) if K.nnz else np.zeros((B, 0))
    H = _vectors([h.h for _, h, _ in samples])  # (B or 1, m)
    b = _vectors([e.b for _, _, e in samples])
    rhs_eq = np.concatenate(
        [np.broadcast_to(b, (B, p)), np.broadcast_to(H[:, :nn], (B, nn))], axis=1
    )
    if not exact.all():
        moved = ~exact
        rhs_eq[moved] = pattern_products(E, E_full, Y)[moved] if p + nn else 0.0
    rhs_cone = np.broadcast_to(H[:, nn:], (B, h0.m - nn)).copy()
    for kind, size, rows in block_slices(dims):
        local = slice(rows.start - nn, rows.stop - nn)
        rhs_cone[~kept[:, local].any(axis=1), local] = _interior(kind, size)
    if c_dual is not None:
        C_nu, C_lam = c_dual
        rhs_eq -= steps[:, None] * np.concatenate([C_nu, C_lam[:, :nn]], axis=1)
        rhs_cone -= steps[:, None] * np.where(kept, C_lam[:, nn:], 0.0)
    rhs_eq = np.where(keep_eq, rhs_eq, 0.0)
    P, P_values = (None, np.zeros((1, 0)))
    if g0.P is not None:
        P, P_values = _matrices([g.P for g, _, _ in samples], (n, n))
    batch = ProblemBatch(
        B, P, P_values, _vectors([g.q for g, _, _ in samples]), E, E_values, rhs_eq, K,
        K_values, rhs_cone, ConeDims(0, dims.soc, dims.exp, dims.psd),
    )  # fmt: skip
    return batch, steps[:, None] * C


def ghost_answers(
    answers: Sequence[Solution], samples: Sequence[Sample], actives: Sequence[ActiveSet]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """``(y, nu, lam)`` of every ghost of :func:`ghost_batch`, full size: the locked rows'
    multipliers from their equality rows, the kept blocks' from their cone rows, 0 for
    every row a sample dropped; None for a sample whose status has no solution."""
    out: list = []
    for sol, (_, h, e), active in zip(answers, samples, actives):
        if not sol.status.has_solution:
            out.append(None)
            continue
        nn, p = h.dims.nonneg, e.p
        lam = np.zeros(h.m)
        lam[:nn] = np.where(active.locked[:nn], sol.eq_dual[p:], 0.0)
        lam[nn:] = np.where(active.kept[nn:], sol.ineq_dual, 0.0)
        out.append((sol.primal, sol.eq_dual[:p], lam))
    return out


def inaccurate_ghost(guard, status: Status, name: str) -> GhostProblemError | None:
    """The ``inaccurate`` policy of a sample's guard
    (:meth:`~.solves.GuardedBackend.refuse_inaccurate`) applied to its batched ghost's
    ``status``, ``name`` the batched backend; None for a bare backend (no policy)."""
    refuse = getattr(guard, "refuse_inaccurate", None)
    return None if refuse is None else refuse(status, name=name, stacklevel=5)


class BatchAnswers(NamedTuple):
    """A ``solve_batch`` answer as NumPy arrays (:func:`solve_arrays`): ``solved`` ``(B,)``
    the samples whose status has a solution (their rows of the arrays are well formed and
    finite; the other rows are not to be read), ``status`` one per sample."""

    status: list[Status]
    solved: np.ndarray
    primal: np.ndarray
    eq_dual: np.ndarray
    ineq_dual: np.ndarray
    slack: np.ndarray


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def solve_arrays(backend, batch: ProblemBatch, extra=None, *, ghost: bool = False) -> BatchAnswers:
    """:func:`solve_problems` without the per-sample Solutions: the answer's arrays, checked
    over the batch at once (shapes, finiteness of every solved row).  The same errors: an
    exception in the backend or an answer of the wrong form is a :class:`SolverError`
    (:class:`GhostProblemError` for ghosts), naming the first failing batch index."""
    answer = _call_batch(backend, batch, extra, ghost)
    status = list(answer.status)
    solved = np.array([isinstance(st, Status) and st.has_solution for st in status], dtype=bool)
    arrays = []
    try:
        for field, size in (("primal", batch.n), ("eq_dual", batch.p),
                            ("ineq_dual", batch.m), ("slack", batch.m)):  # fmt: skip
            arr = _numpy(getattr(answer, field))
            if arr.shape != (batch.batch, size):
                raise ValueError(field)
            arrays.append(arr)
    except (TypeError, ValueError, AttributeError):
        arrays = []
    finite = np.all([np.isfinite(a).all(axis=1) for a in arrays], axis=0) if arrays else None
    if (
        finite is None
        or not all(isinstance(st, Status) for st in status)
        or not (finite[solved].all())
    ):  # a malformed answer: find the first sample and say what is wrong with it
        _check_samples(backend, batch, answer, ghost)
        if finite is None:  # the samples read alone, but the stacked arrays do not
            error = GhostProblemError if ghost else SolverError
            raise error(
                f"{_what(ghost)}: backend {backend_name(backend)!r} answered arrays that "
                f"are not of shape (batch, size)",
                backend=backend_name(backend),
            )
    return BatchAnswers(status, solved, *arrays)


def _what(ghost: bool) -> str:
    return "backward (ghost) solve" if ghost else "forward solve"


def _call_batch(backend, batch: ProblemBatch, extra, ghost: bool) -> BatchSolution:
    error = GhostProblemError if ghost else SolverError
    name = backend_name(backend)
    try:
        answer: BatchSolution = backend.solve_batch(batch, extra)
    except FFOError:
        raise
    except Exception as exc:
        raise error(
            f"{_what(ghost)} of the whole batch: backend {name!r} raised "
            f"{type(exc).__name__}: {exc}",
            backend=name,
        ) from exc
    if len(answer.status) != batch.batch:
        raise error(
            f"{_what(ghost)}: backend {name!r} answered {len(answer.status)} samples for a "
            f"batch of {batch.batch}",
            backend=name,
        )
    return answer


def _check_samples(backend, batch: ProblemBatch, answer: BatchSolution, ghost: bool):
    """Every sample of ``answer`` as a Solution, the first malformed one an error."""
    error = GhostProblemError if ghost else SolverError
    name = backend_name(backend)
    sols = []
    for k in range(batch.batch):
        try:
            sol = answer.sample(k)
        except Exception as exc:  # a malformed answer, named below
            raise error(
                f"{_what(ghost)} of batch index {k}: backend {name!r} returned an answer "
                f"that cannot be read ({type(exc).__name__}: {exc})",
                batch_index=k,
                backend=name,
            ) from exc
        bad = solution_problem(sol, batch.n, batch.p, batch.m)
        if bad is not None:
            raise error(
                f"{_what(ghost)} of batch index {k}: backend {name!r} returned {bad}",
                batch_index=k,
                backend=name,
            )
        sols.append(sol)
    return sols


def failed_ghost(exc: GhostProblemError, delta: float, backend=None) -> GhostProblemError:
    """``exc`` with the step that failed and, when the sample's backend is a per-sample
    guard, its batch index (as the per-sample path raises it)."""
    if exc.delta is None:
        exc.delta = delta
        exc.args = (f"{exc.args[0] if exc.args else exc} (delta={delta:.3g})",)
    index = getattr(backend, "batch_index", None)
    if getattr(exc, "batch_index", None) is None and index is not None:
        exc.batch_index = index
    return exc


def solve_problems(
    backend, batch: ProblemBatch, extra=None, *, ghost: bool = False
) -> list[Solution]:
    """``backend.solve_batch(batch, extra)`` as per-sample Solutions, guarded like the
    per-sample path: an exception in the backend, or an answer of the wrong form, is a
    :class:`SolverError` (:class:`GhostProblemError` for ghosts) naming the batch index (the
    first failing one, or every sample when the whole call failed)."""
    return _check_samples(backend, batch, _call_batch(backend, batch, extra, ghost), ghost)


__all__ = [
    "BatchAnswers",
    "batch_solver",
    "failed_ghost",
    "ghost_answers",
    "ghost_batch",
    "ghost_batch_arrays",
    "pattern_products",
    "problem_batch",
    "solve_arrays",
    "solve_problems",
]
