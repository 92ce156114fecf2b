"""ProblemBatches built from the zoo, for the ``solve-batch`` check.

A batched zoo instance has samples of one shape (``n``, ``p``, cone dims) whose matrices
have different sparsity; a :class:`~ffo_core.protocol.ProblemBatch` needs one pattern per
matrix, so each matrix gets the union of the samples' patterns, with explicit zeros where a
sample has no entry.  Four batches per instance (:func:`batches`):

``samples``  the instance's own samples, every field per sample (leading dimension batch);
``shared``   sample 0 repeated: ``P``, ``q``, ``A``, ``b`` and ``G`` given once (leading
             dimension 1), ``h`` per sample (its nonnegative rows relaxed), and a
             per-sample ``extra_linear_term``;
``shared-rhs`` sample 0 repeated: everything given once but ``q``, perturbed per sample;
``absent``   the samples with *absent rows* (the protocol's definition: an all-zero row of
             ``A`` with ``b_i = 0``, or of ``G``'s nonnegative block with ``h_i >= 0``), at
             different rows in different samples.  In a pure linear instance
             only inactive inequality rows are made absent (removing an active row of a
             vertex would make the LP unbounded); with a quadratic term an equality row and
             an active row too, which moves the optimum.

Every sample ``k`` of ``solve_batch``'s answer is compared with ``solve(*batch.sample(k),
extra_linear_term[k])`` -- the protocol's definition of a right answer -- except the duals
of absent rows, which the protocol leaves unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ffo_core.protocol import ProblemBatch, SparsePattern

from .zoo import Sample

#: Relative size of the perturbations of ``q`` and ``h`` and of the extra linear term.
PERTURBATION = 1e-2


@dataclass
class BatchCase:
    """One batch: the ProblemBatch, its extra linear term, and per sample the rows whose
    duals are not compared (absent rows: ``eq`` indices into ``A``, ``ineq`` into ``G``)."""

    label: str
    batch: ProblemBatch
    extra: np.ndarray | None
    absent_eq: list[np.ndarray]
    absent_ineq: list[np.ndarray]


def union_pattern(mats: list[sp.csc_matrix | None], shape) -> SparsePattern:
    """The union of the matrices' patterns (stored entries; None counts as empty)."""
    total = sp.csc_matrix(shape)
    for M in mats:
        if M is not None:
            ones = sp.csc_matrix(M, copy=True)
            ones.data = np.ones_like(ones.data)
            total = total + ones
    total = sp.csc_matrix(total)
    total.sum_duplicates()
    total.sort_indices()
    return SparsePattern.of(total)


def values_on(pattern: SparsePattern, M: sp.csc_matrix | None) -> np.ndarray:
    """``M``'s entries at the pattern's positions (0 where ``M`` has none)."""
    if M is None or pattern.nnz == 0:
        return np.zeros(pattern.nnz)
    rows = pattern.indices.astype(np.int64)
    cols = pattern.cols.astype(np.int64)
    return np.asarray(sp.csr_matrix(M)[rows, cols]).ravel().astype(float)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.vstack([np.asarray(r, float)[None, :] for r in rows]))


def make_batch(
    samples: list[Sample],
    *,
    P=None,
    q=None,
    A=None,
    b=None,
    G=None,
    h=None,
    share: frozenset[str] = frozenset(),
) -> ProblemBatch:
    """A ProblemBatch of ``samples`` (all of one shape); any of ``P, q, A, b, G, h`` may be
    given per sample (a list) to override the samples' own; fields in ``share`` are sample
    0's, given once (leading dimension 1)."""
    s0 = samples[0]
    n, p, m, dims = s0.g.n, s0.e.p, s0.h.m, s0.h.dims
    Ps = P if P is not None else [s.g.P for s in samples]
    qs = q if q is not None else [s.g.q for s in samples]
    As = A if A is not None else [s.e.A for s in samples]
    bs = b if b is not None else [s.e.b for s in samples]
    Gs = G if G is not None else [s.h.G for s in samples]
    hs = h if h is not None else [s.h.h for s in samples]

    def pick(name, items):
        return items[:1] if name in share else items

    Ps, qs, As, bs, Gs, hs = (
        pick("P", Ps),
        pick("q", qs),
        pick("A", As),
        pick("b", bs),
        pick("G", Gs),
        pick("h", hs),
    )
    P_pattern = None
    P_values = np.zeros((1, 0))
    if any(M is not None and M.nnz for M in Ps):
        P_pattern = union_pattern(Ps, (n, n))
        P_values = _stack([values_on(P_pattern, M) for M in Ps])
    A_pattern = union_pattern(As, (p, n))
    G_pattern = union_pattern(Gs, (m, n))
    return ProblemBatch(
        batch=len(samples),
        P=P_pattern,
        P_values=P_values,
        q=_stack(qs),
        A=A_pattern,
        A_values=_stack([values_on(A_pattern, M) for M in As]),
        b=_stack(bs) if p else np.zeros((len(bs), 0)),
        G=G_pattern,
        G_values=_stack([values_on(G_pattern, M) for M in Gs]),
        h=_stack(hs) if m else np.zeros((len(hs), 0)),
        dims=dims,
    )


def _zero_rows(M: sp.csc_matrix, rows) -> sp.csc_matrix:
    """``M`` with ``rows`` set to zero, keeping them as stored zeros (the pattern stays)."""
    M = sp.csc_matrix(M, copy=True)
    mask = np.isin(M.indices, np.asarray(list(rows), dtype=np.int64))
    M.data[mask] = 0.0
    return M


def batches(samples: list[Sample], seed: int = 0) -> list[BatchCase]:
    """The four batches of the module docstring for one instance's samples."""
    rng = np.random.default_rng(seed)
    count, s0 = len(samples), samples[0]
    n, p, dims = s0.g.n, s0.e.p, s0.h.dims
    nonneg = dims.nonneg
    none = [np.zeros(0, dtype=int) for _ in range(count)]
    out = [BatchCase("samples", make_batch(samples), None, none, none)]

    # sample 0 repeated: all but h shared (h's nonneg rows relaxed per sample), extra term
    scale_q = PERTURBATION * (1 + float(np.max(np.abs(s0.g.q), initial=0.0)))
    hs = []
    for _ in range(count):
        h = s0.h.h.copy()
        h[:nonneg] += PERTURBATION * (1 + np.abs(h[:nonneg])) * rng.uniform(0, 1, nonneg)
        hs.append(h)
    extra = scale_q * rng.standard_normal((count, n))
    shared = make_batch([s0] * count, h=hs, share=frozenset({"P", "q", "A", "b", "G"}))
    out.append(BatchCase("shared", shared, extra, none, none))
    # sample 0 repeated: all but q shared (a small tilt keeps a vertex optimal)
    qs = [s0.g.q + scale_q * rng.standard_normal(n) for _ in range(count)]
    rhs = make_batch([s0] * count, q=qs, share=frozenset({"P", "A", "b", "G", "h"}))
    out.append(BatchCase("shared-rhs", rhs, None, none, none))

    # absent rows, at different rows in different samples
    linear = all(s.g.P is None or s.g.P.nnz == 0 for s in samples)
    As, bs, Gs, hs = [], [], [], []
    absent_eq, absent_ineq = [], []
    for k, smp in enumerate(samples):
        truth = smp.truth or {}
        slack = truth.get("s", smp.h.h - smp.h.G @ np.zeros(n))
        inactive = [i for i in range(nonneg) if slack[i] > 1e-6]
        active = [i for i in range(nonneg) if slack[i] <= 1e-6]
        gone_ineq: list[int] = []
        if inactive:
            gone_ineq.append(inactive[k % len(inactive)])
        if not linear and active and k % 2 == 1:
            gone_ineq.append(active[k % len(active)])
        gone_eq = [k % p] if (not linear and p and k % 2 == 0) else []
        A = _zero_rows(smp.e.A, gone_eq)
        b = smp.e.b.copy()
        b[gone_eq] = 0.0
        G = _zero_rows(smp.h.G, gone_ineq)
        h = smp.h.h.copy()
        for j, i in enumerate(gone_ineq):
            h[i] = 0.0 if j % 2 == 0 else 1.5  # both "h_i >= 0" cases
        As.append(A)
        bs.append(b)
        Gs.append(G)
        hs.append(h)
        absent_eq.append(np.asarray(gone_eq, dtype=int))
        absent_ineq.append(np.asarray(gone_ineq, dtype=int))
    absent = make_batch(samples, A=As, b=bs, G=Gs, h=hs)
    out.append(BatchCase("absent", absent, None, absent_eq, absent_ineq))
    return out
