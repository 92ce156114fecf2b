"""Parameters -> problem data for a batch, and data gradients -> parameter gradients.

The compiled map is ``data = M @ [theta; 1]`` (:mod:`ffo_core.compile`).  In a batch some
parameters are shared by every sample (unbatched) and some are not.  Splitting the columns of
``M`` accordingly,

    data_i = base + M_b @ theta_b[:, i],     base = M_u @ [theta_u; 1]

costs one product with the (usually large) shared part per *call* instead of per sample, and
nothing of size ``n_data x batch`` is ever formed: each sample's data is made when it is
needed, and only the sections that batched parameters reach are copied (the others are views
of ``base``).  In the backward pass the shared parameters' gradient is the sum over samples,

    d theta_u = M_u' @ (sum_i d data_i),     d theta_b[:, i] = M_b' @ d data_i,

and both products read only the data rows their parameters reach.  The data gradients are
low rank (:class:`~ffo_core.ffo_backward.DataGradient`): on a matrix section, sample ``i``'s
gradient is ``U_i V_i'`` restricted to the pattern, with two columns per factor.  So the sum
over the batch is ``[U_1 .. U_B] [V_1 .. V_B]'`` on the pattern: one rank-``2B`` product
(a dense GEMM and a gather when the pattern is dense, a row-wise gather otherwise) instead
of ``B`` passes over the pattern.  (For the paper's setup at n = 1000, where Q and G are
shared dense parameters and only q is batched, that is one pass over 3 million entries
instead of eight, and the batched ``q`` reads no pattern at all.)

The column split depends only on which parameters are batched, so it is computed once per
layer and batching mask (:func:`split_of`).
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from .backend_base import prune
from .compile import CompiledProblem
from .protocol import ConeConstraints, Equalities

#: The data sections in the compiled order.
SECTIONS = ("P", "q", "A", "b", "G", "h")
_MATRIX = {"P", "A", "G"}

#: Entries per chunk when a pattern is evaluated by gathering (bounds temporary memory).
_CHUNK = 1 << 18


@dataclass
class _Reach:
    """The data rows some parameters reach, by section: ``local[name]`` are indices into
    the section (pattern entries for P/A/G, vector entries for q/b/h) and ``pos[name]``
    the slice of ``rows`` they fill.  For the matrix sections ``entries[name]`` says
    where the reached pattern entries sit in ``U V'``: a flat index into the dense
    product when they fill most of it (``("dense", flat)``), else their ``("rows_cols",
    rows, cols)`` (computed once per layer and batching mask)."""

    rows: np.ndarray
    local: dict
    pos: dict
    entries: dict

    @classmethod
    def of(cls, compiled: CompiledProblem, rows: np.ndarray) -> "_Reach":
        local, pos, entries = {}, {}, {}
        for name in SECTIONS:
            sec = compiled.sections[name]
            inside = np.flatnonzero((rows >= sec.start) & (rows < sec.stop))
            if not inside.size:
                continue
            local[name] = rows[inside] - sec.start
            pos[name] = slice(int(inside[0]), int(inside[-1]) + 1)   # rows are sorted
            if name in _MATRIX:
                pat = getattr(compiled, name)
                r, c = pat.indices[local[name]], pat.cols[local[name]]
                if _dense(pat.shape, r.size):
                    entries[name] = ("dense", r.astype(np.int64) * pat.shape[1] + c)
                else:
                    entries[name] = ("rows_cols", r, c)
        return cls(rows, local, pos, entries)


def _dense(shape: tuple[int, int], k: int) -> bool:
    """Evaluate ``k`` entries of a ``shape`` low-rank product through the dense product?
    When they fill at least a quarter of it and it takes at most 128 MB."""
    full = shape[0] * shape[1]
    return full <= 4 * k and full <= 1 << 24


@dataclass
class Split:
    """``M``'s columns split into shared (``u``) and batched (``b``) parameters."""

    M_u: sp.csc_matrix                 # shared parameters' columns + the constant (last)
    adj_u: sp.csr_matrix | None        # M_u[reach_u.rows, :-1]': data rows -> shared grads
    reach_u: _Reach
    M_b_rows: sp.csr_matrix | None     # M_b[reach_b.rows]: theta_b -> the rows it reaches
    adj_b: sp.csr_matrix | None        # M_b_rows'
    reach_b: _Reach | None

    @property
    def batched_sections(self) -> set:
        """Names of the data sections some batched parameter reaches (they differ per
        sample; every other section is the same for the whole batch)."""
        return set(self.reach_b.local) if self.reach_b is not None else set()


def split_of(compiled: CompiledProblem, batched: tuple[bool, ...]) -> Split:
    """The column split for a batching mask (cached on ``compiled``)."""
    cache = compiled.__dict__.setdefault("_splits", {})
    if batched in cache:
        return cache[batched]
    M = compiled.M_csc
    params = compiled.params

    def columns(flags):
        cols = [np.arange(s.offset, s.offset + s.size) for s, b in zip(params, batched)
                if b == flags]
        return np.concatenate(cols).astype(np.int64) if cols else np.zeros(0, np.int64)
    cols_u = columns(False)
    M_u = M[:, np.r_[cols_u, compiled.const_col].astype(np.int64)]
    shared = M_u[:, :-1].tocsr()
    rows_u = np.flatnonzero(np.diff(shared.indptr))
    adj_u = shared[rows_u].T.tocsr() if cols_u.size else None
    cols_b = columns(True)
    if cols_b.size:
        M_b = M[:, cols_b].tocsr()
        rows_b = np.flatnonzero(np.diff(M_b.indptr))
        M_b_rows = M_b[rows_b]
        split = Split(M_u, adj_u, _Reach.of(compiled, rows_u), M_b_rows,
                      M_b_rows.T.tocsr(), _Reach.of(compiled, rows_b))
    else:
        split = Split(M_u, adj_u, _Reach.of(compiled, rows_u), None, None, None)
    cache[batched] = split
    return split


def pattern_values(rows: np.ndarray, cols: np.ndarray, U: np.ndarray,
                   V: np.ndarray) -> np.ndarray:
    """``sum_j U[rows, j] V[cols, j]``: the entries ``(rows, cols)`` of ``U V'``.

    A dense product and a gather when the entries fill most of ``U V'`` (a learnable dense
    matrix); otherwise row-wise gathers in chunks, never a dense ``U V'``.
    """
    if _dense((U.shape[0], V.shape[0]), rows.size):
        return _dense_values(rows.astype(np.int64) * V.shape[0] + cols, U, V)
    return _gathered_values(rows, cols, U, V)


def _dense_values(flat: np.ndarray, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    return (U @ V.T).ravel()[flat]


def _gathered_values(rows: np.ndarray, cols: np.ndarray, U: np.ndarray,
                     V: np.ndarray) -> np.ndarray:
    out = np.empty(rows.size)
    step = max(1, _CHUNK // max(1, U.shape[1]))
    for s in range(0, rows.size, step):
        r, c = rows[s:s + step], cols[s:s + step]
        out[s:s + step] = np.einsum("ij,ij->i", U[r], V[c])
    return out


def _factors(name: str, grads: list) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)`` of the summed gradient of matrix section ``name`` over ``grads``."""
    ys = [g.base[0] for g in grads]
    wys = [g.direction[0] for g in grads]
    if name == "P":
        U = 0.5 * np.column_stack(wys + ys)
    else:
        k = 1 if name == "A" else 2
        U = np.column_stack([g.direction[k] for g in grads] + [g.base[k] for g in grads])
    return U, np.column_stack(ys + wys)


def _vector(name: str, grad) -> np.ndarray:
    return {"q": grad.q, "b": grad.b, "h": grad.h}[name]


def gradient_on(compiled: CompiledProblem, reach: _Reach, grads: list) -> np.ndarray:
    """``sum_i d data_i`` on the data rows of ``reach`` (in ``reach.rows`` order)."""
    out = np.zeros(reach.rows.size)
    low = [g for g in grads if g.low_rank]
    plain = [g for g in grads if not g.low_rank]
    for name, local in reach.local.items():
        pos = reach.pos[name]
        if name in _MATRIX:
            if low:
                U, V = _factors(name, low)
                how, *where = reach.entries[name]
                out[pos] += _dense_values(where[0], U, V) if how == "dense" \
                    else _gathered_values(where[0], where[1], U, V)
            for g in plain:
                out[pos] += getattr(g, name)[local]
        else:
            for g in grads:
                out[pos] += _vector(name, g)[local]
    return out


class BoundData:
    """Problem data of one batch: ``sample(i)`` per sample, and the adjoint map."""

    def __init__(self, compiled: CompiledProblem, values: list[np.ndarray],
                 batched: list[bool], batch: int) -> None:
        self.compiled, self.batch = compiled, batch
        self.batched = tuple(bool(b) for b in batched)
        self.split = split_of(compiled, self.batched)
        theta_u = np.concatenate([v.reshape(-1) for v, b in zip(values, batched) if not b]
                                 + [[1.0]])
        self.base = self.split.M_u @ theta_u
        self._nonzero: dict = {}
        self._lock = threading.Lock()
        if self.split.M_b_rows is not None:
            self.theta_b = np.concatenate([v.reshape(batch, -1)
                                           for v, b in zip(values, batched) if b],
                                          axis=1).T.copy()        # (n_b, batch)
        else:
            self.theta_b = None

    def _reached(self, i: int) -> np.ndarray:
        """Sample ``i``'s data on the rows batched parameters reach."""
        return self.base[self.split.reach_b.rows] + self.split.M_b_rows @ self.theta_b[:, i]

    def overflowing_samples(self) -> list[int]:
        """Batch indices whose data is not finite (overflow), checked without forming the
        whole batch: the shared part once, the batched part on the rows it touches."""
        if not np.all(np.isfinite(self.base)):
            return list(range(self.batch))
        if self.theta_b is None or self.split.M_b_rows.nnz == 0:
            return []
        rows = self.split.reach_b.rows
        part = self.base[rows, None] + self.split.M_b_rows @ self.theta_b
        return np.flatnonzero(~np.isfinite(part).all(axis=0)).tolist()

    def data(self, i: int) -> np.ndarray:
        """Sample ``i``'s data vector (length ``n_data``), a fresh array."""
        out = self.base.copy()
        if self.theta_b is not None:
            out[self.split.reach_b.rows] = self._reached(i)
        return out

    def sample(self, i: int):
        """Sample ``i``'s protocol objects ``(g, h, e)``
        (:meth:`CompiledProblem.sample_parts`): sections no batched parameter reaches are
        views of the shared ``base`` (solvers must not write to their inputs)."""
        cp_ = self.compiled
        parts = dict(self._shared_parts)
        if self.theta_b is not None:
            reach = self.split.reach_b
            values = self._reached(i)
            for name, local in reach.local.items():
                part = self.base[cp_.sections[name]].copy()
                part[local] = values[reach.pos[name]]
                parts[name] = part
        return cp_.sample_parts(parts)

    @functools.cached_property
    def _shared_parts(self) -> dict:
        """Every section as a view of ``base``; the matrices no batched parameter reaches
        built once per call (the same objects in every sample)."""
        cp_ = self.compiled
        parts = {name: self.base[sec] for name, sec in cp_.sections.items()}
        reached = self.split.batched_sections
        for name in ("P", "A", "G"):
            if name not in reached and getattr(cp_, name) is not None:
                parts[name] = getattr(cp_, name).matrix(parts[name])
        return parts

    def nonzero(self, h: ConeConstraints, e: Equalities
                ) -> tuple[ConeConstraints, Equalities]:
        """:func:`~ffo_core.ffo_backward.without_stored_zeros` of a sample's ``(h, e)``
        (from :meth:`sample`).  A matrix no batched parameter reaches is the same for
        every sample: it is pruned once per call and shared."""
        reached = self.split.batched_sections

        def nonzero(name, M):
            if name in reached:                  # differs per sample
                return prune(M)
            with self._lock:
                if name not in self._nonzero:
                    self._nonzero[name] = prune(M)
                return self._nonzero[name]
        return replace(h, G=nonzero("G", h.G)), replace(e, A=nonzero("A", e.A))

    def parameter_gradients(self, grads: list) -> list[np.ndarray]:
        """Per parameter (in the compiled order): ``(size,)`` for a shared parameter (summed
        over samples), ``(batch, size)`` for a batched one; flat column-major values.

        ``grads[i]`` is sample ``i``'s :class:`~ffo_core.ffo_backward.DataGradient`.  Only
        the data rows the parameters reach are evaluated: the shared ones as one low-rank
        sum over the batch, the batched ones per sample.
        """
        cp_, split = self.compiled, self.split
        out: list = [None] * len(cp_.params)
        shared = [k for k, b in enumerate(self.batched) if not b]
        if shared:
            grad_u = split.adj_u @ gradient_on(cp_, split.reach_u, grads)
            start = 0
            for k in shared:
                size = cp_.params[k].size
                out[k] = grad_u[start:start + size]
                start += size
        batched = [k for k, b in enumerate(self.batched) if b]
        if batched:
            grad_b = np.stack([split.adj_b @ gradient_on(cp_, split.reach_b, [g])
                               for g in grads])
            start = 0
            for k in batched:
                size = cp_.params[k].size
                out[k] = grad_b[:, start:start + size]
                start += size
        return out


def bind(compiled: CompiledProblem, values: list[np.ndarray], batched: list[bool],
         batch: int) -> BoundData:
    """``values[k]``: flat column-major parameter values, ``(size,)`` if shared or
    ``(batch, size)`` if batched."""
    return BoundData(compiled, values, batched, batch)


__all__ = ["BoundData", "bind", "split_of", "pattern_values", "gradient_on"]
