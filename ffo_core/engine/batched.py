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
    M = sp.csc_matrix(M)
    if not M.has_canonical_format:
        M = M.copy()
        M.sum_duplicates()
    return M


def _matrices(mats: Sequence, shape: tuple[int, int]) -> tuple[SparsePattern, np.ndarray]:
    """One pattern for ``mats`` (one per sample) and the values on it, ``(B or 1, nnz)``."""
    if all(M is mats[0] for M in mats):
        M = _canonical(mats[0]) if mats[0] is not None else sp.csc_matrix(shape)
        return SparsePattern.of(M), M.data[None].astype(float)
    canon = [_canonical(M) if M is not None else sp.csc_matrix(shape) for M in mats]
    keys = [np.repeat(np.arange(shape[1]), np.diff(M.indptr)) * shape[0] + M.indices for M in canon]
    union = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    cols, rows = np.divmod(union, shape[0]) if shape[0] else (union, union)
    pattern = SparsePattern.from_rows_cols(rows, cols, shape)
    values = np.zeros((len(canon), union.size))
    for k, (M, key) in enumerate(zip(canon, keys)):
        values[k, np.searchsorted(union, key)] = M.data
    return pattern, values


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
    pass through (a one-sided difference), or None for the exact right-hand sides."""
    g0, h0, e0 = samples[0]
    n, p, dims = g0.n, e0.p, h0.dims
    nn = dims.nonneg
    if all(e.A is e0.A and h.G is h0.G for _, h, e in samples):  # shared: stacked once
        stacked = [sp.vstack([e0.A, h0.G[:nn]], format="csc")] * len(samples)
    else:
        stacked = [sp.vstack([e.A, h.G[:nn]], format="csc") for _, h, e in samples]
    if all(h.G is h0.G for _, h, _ in samples):
        cones = [h0.G[nn:]] * len(samples)
    else:
        cones = [h.G[nn:] for _, h, _ in samples]
    E, E_values = _matrices(stacked, (p + nn, n))
    K, K_values = _matrices(cones, (h0.m - nn, n))
    B = len(samples)
    row_of_E = E.indices
    keep_eq = np.ones((B, p + nn), dtype=bool)
    keep_eq[:, p:] = np.array([a.locked[:nn] for a in actives])
    E_values = np.where(keep_eq[:, row_of_E], E_values, 0.0)  # absent rows: zeros
    kept = np.array([a.kept[nn:] for a in actives])
    K_values = np.where(kept[:, K.indices], K_values, 0.0) if K.nnz else np.zeros((B, 0))
    rhs_eq = np.zeros((B, p + nn))
    rhs_cone = np.zeros((B, h0.m - nn))
    for k, ((_, h, e), y) in enumerate(zip(samples, through)):
        exact = np.concatenate([e.b, h.h[:nn]])
        rhs_eq[k] = exact if y is None else stacked[k] @ y
        rhs_cone[k] = h.h[nn:]
        for kind, size, rows in block_slices(dims):
            local = slice(rows.start - nn, rows.stop - nn)
            if not kept[k, local].any():
                rhs_cone[k, local] = _interior(kind, size)
        if c_dual is not None and c_dual[k] is not None:
            c_nu, c_lam = c_dual[k]
            rhs_eq[k] -= steps[k] * np.concatenate([c_nu, c_lam[:nn]])
            rhs_cone[k] -= steps[k] * np.where(kept[k], c_lam[nn:], 0.0)
    rhs_eq = np.where(keep_eq, rhs_eq, 0.0)
    P, P_values = (None, np.zeros((1, 0)))
    if g0.P is not None:
        P, P_values = _matrices([g.P for g, _, _ in samples], (n, n))
    batch = ProblemBatch(
        B, P, P_values, _vectors([g.q for g, _, _ in samples]), E, E_values, rhs_eq, K,
        K_values, rhs_cone, ConeDims(0, dims.soc, dims.exp, dims.psd),
    )  # fmt: skip
    extra = np.array([s * np.asarray(ck, dtype=float) for s, ck in zip(steps, c)])
    return batch, extra


def ghost_answers(
    answers: Sequence[Solution], samples: Sequence[Sample], actives: Sequence[ActiveSet]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(y, nu, lam)`` of every ghost of :func:`ghost_batch`, full size: the locked rows'
    multipliers from their equality rows, the kept blocks' from their cone rows, 0 for
    every row a sample dropped."""
    out = []
    for sol, (_, h, e), active in zip(answers, samples, actives):
        nn, p = h.dims.nonneg, e.p
        lam = np.zeros(h.m)
        lam[:nn] = np.where(active.locked[:nn], sol.eq_dual[p:], 0.0)
        lam[nn:] = np.where(active.kept[nn:], sol.ineq_dual, 0.0)
        out.append((sol.primal, sol.eq_dual[:p], lam))
    return out


def solve_problems(
    backend, batch: ProblemBatch, extra=None, *, ghost: bool = False
) -> list[Solution]:
    """``backend.solve_batch(batch, extra)`` as per-sample Solutions, guarded like the
    per-sample path: an exception in the backend, or an answer of the wrong form, is a
    :class:`SolverError` (:class:`GhostProblemError` for ghosts) naming the batch index (the
    first failing one, or every sample when the whole call failed)."""
    error = GhostProblemError if ghost else SolverError
    name = backend_name(backend)
    what = "backward (ghost) solve" if ghost else "forward solve"
    try:
        answer: BatchSolution = backend.solve_batch(batch, extra)
    except FFOError:
        raise
    except Exception as exc:
        raise error(
            f"{what} of the whole batch: backend {name!r} raised {type(exc).__name__}: {exc}",
            backend=name,
        ) from exc
    if len(answer.status) != batch.batch:
        raise error(
            f"{what}: backend {name!r} answered {len(answer.status)} samples for a batch of "
            f"{batch.batch}",
            backend=name,
        )
    sols = []
    for k in range(batch.batch):
        sol = answer.sample(k)
        bad = solution_problem(sol, batch.n, batch.p, batch.m)
        if bad is not None:
            raise error(
                f"{what} of batch index {k}: backend {name!r} returned {bad}",
                batch_index=k,
                backend=name,
            )
        sols.append(sol)
    return sols


__all__ = [
    "batch_solver",
    "ghost_answers",
    "ghost_batch",
    "problem_batch",
    "solve_problems",
]
