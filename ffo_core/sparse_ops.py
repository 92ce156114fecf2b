"""Small sparse-matrix operations of the engine and the adapters, on CSC matrices.

Each copies only when it must (``prune`` and ``stack_rows`` return their input when it is
already what is asked, ``stack_rows`` and ``select_rows_batch`` skip scipy for empty
results), ``select_rows_batch`` selects a whole batch's rows in one pass, and
``upper_triangle`` is one pass over a CSC matrix where ``scipy.sparse.triu`` goes through
COO: these run once or twice per sample in the backward pass, where a scipy call
costs tens of microseconds.  Results may share arrays with their inputs: never write to
them.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp


def prune(M):
    """Sparse ``M`` as canonical CSC (sorted indices, no duplicates) without stored zeros;
    a copy only when something is dropped, merged or converted (the inputs of ``solve``
    stay untouched: never write to the result).  So :func:`upper_triangle`, built on it,
    hands solvers sorted columns (SCS needs them).

    The engine sends matrices on their *structural* pattern (every entry a parameter can
    reach); a learnable matrix that is numerically sparse now (an identity, a box) would
    otherwise be factorised as dense.  Adapters call this before handing data to a solver.
    """
    if sp.isspmatrix_csc(M) and M.has_canonical_format:
        nonzero = M.data != 0  # a bool mask first: far faster than flatnonzero on the
        if nonzero.all():  # floats
            return M
        # keep the nonzero entries; a column's new start is the count of kept entries
        # before its old start (no copy of the whole matrix: a learnable 2001 x 1000 box
        # keeps 3001 of its 2 million entries)
        keep = np.flatnonzero(nonzero)
        out = sp.csc_matrix(
            (M.data[keep], M.indices[keep], np.searchsorted(keep, M.indptr)), shape=M.shape
        )
        out.has_canonical_format = True
        return out
    out = M.tocsc(copy=True)
    out.sum_duplicates()  # sorts the indices too
    out.eliminate_zeros()
    return out


def stack_rows(*blocks) -> sp.csc_matrix:
    """``[B1; B2; ...]`` as CSC; blocks without rows are skipped (no copy when only one
    block has rows and it is CSC already)."""
    full = [B for B in blocks if B.shape[0]]
    if len(full) == 1 and sp.isspmatrix_csc(full[0]):
        return full[0]
    if not full:
        return no_rows(blocks[0].shape[1])
    return sp.vstack(full, format="csc")


def upper_triangle(P) -> sp.csc_matrix:
    """The upper triangle (diagonal included) of square sparse ``P`` as CSC, stored zeros
    dropped: what Clarabel, SCS and OSQP take for the quadratic term.  One pass over a CSC
    matrix's entries (``scipy.sparse.triu`` goes through COO)."""
    P = prune(P)
    cols = np.repeat(np.arange(P.shape[1]), np.diff(P.indptr))
    keep = P.indices <= cols
    kept_before = np.zeros(P.nnz + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    return sp.csc_matrix((P.data[keep], P.indices[keep], kept_before[P.indptr]), shape=P.shape)


@functools.lru_cache(maxsize=64)
def no_rows(n: int) -> sp.csc_matrix:
    """An empty ``(0, n)`` CSC matrix, one shared object per ``n`` (never write to it)."""
    return sp.csc_matrix((0, n))


#: Entries of the ``(batch, nnz)`` work arrays :func:`select_rows_batch` forms at once;
#: larger batches are taken in slices of samples.  Each entry costs up to about 40 bytes
#: (its keep flag and running count, and when kept its two indices, value and new row),
#: so a slice holds at most about 40 MB.
SELECT_BATCH_ENTRIES = 1 << 20


def select_rows_batch(M: sp.csc_matrix, masks: np.ndarray) -> list[sp.csc_matrix]:
    """``[M[flatnonzero(mask)] for mask in masks]`` for CSC ``M`` and a
    ``(batch, M.shape[0])`` bool array: for canonical ``M`` (sorted indices, no duplicates,
    as :func:`prune` leaves it; any other ``M`` is made so first, on a copy) each result
    has exactly the arrays of scipy's ``M[rows]`` (sorted indices, ``M``'s index dtype),
    so a solver sees the same input either way; :func:`no_rows` for an empty mask (most
    ghosts keep no cone block, and a scipy call costs as much as a real selection).

    The selection of the whole batch is a few elementwise operations on ``(batch, nnz)``
    arrays -- which entries each sample keeps, their running count (the new column
    pointers) and each kept row's new position -- so per sample only the ``csc_matrix``
    constructor remains.  The results share one data and one index array per slice of the batch
    (read-only, like every result of this module)."""
    masks = np.asarray(masks, dtype=bool)
    if not M.has_canonical_format:  # the results are flagged canonical below
        M = M.copy()
        M.sum_duplicates()
    batch, rows = masks.shape
    n, nnz = M.shape[1], M.nnz
    step = max(1, SELECT_BATCH_ENTRIES // max(1, nnz))
    out: list[sp.csc_matrix] = []
    for start in range(0, batch, step):
        part = masks[start : start + step]
        keep = part[:, M.indices]  # (b, nnz): entry stays
        before = np.zeros((part.shape[0], nnz + 1), dtype=M.indptr.dtype)
        np.cumsum(keep, axis=1, out=before[:, 1:])  # kept entries before each one
        indptr = before[:, M.indptr]  # (b, n + 1) new column starts
        position = np.cumsum(part, axis=1, dtype=M.indices.dtype) - 1  # new row numbers
        sample, entry = np.nonzero(keep)  # sample by sample, in order
        data = M.data[entry]
        indices = position[sample, M.indices[entry]]
        ends = np.cumsum(indptr[:, -1])
        counts = position[:, -1] + 1 if rows else np.zeros(part.shape[0], dtype=int)
        for b in range(part.shape[0]):
            if not counts[b]:
                out.append(no_rows(n))
                continue
            lo, hi = ends[b] - indptr[b, -1], ends[b]
            A = sp.csc_matrix((data[lo:hi], indices[lo:hi], indptr[b]), shape=(int(counts[b]), n))
            A.has_canonical_format = True  # a subset of a canonical matrix
            out.append(A)
    return out


def row_norms(M: sp.csc_matrix) -> np.ndarray:
    """Euclidean norm of every row of ``M``, shape ``(M.shape[0],)``."""
    return np.sqrt(np.bincount(M.indices, weights=M.data * M.data, minlength=M.shape[0]))
