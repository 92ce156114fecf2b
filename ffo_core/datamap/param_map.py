"""Parameters -> problem data for a batch, and data gradients -> parameter gradients.

Size: the data map and its adjoint (data gradients to parameter gradients) for every
layout are kept side by side, so that each pair can be read and checked together.

The compiled map is ``data = M @ [theta; 1]`` (:mod:`ffo_core.datamap.compile`).  In a batch some
parameters are shared by every sample (unbatched) and some are not.  Splitting the columns of
``M`` accordingly,

    data_i = base + M_b @ theta_b[:, i],     base = M_u @ [theta_u; 1]

costs one product with the (usually large) shared part per *call* instead of per sample, and
nothing of size ``n_data x batch`` is ever formed: each sample's data is made when it is
needed, and only the sections that batched parameters reach are copied (the others are views
of ``base``).  In the backward pass the shared parameters' gradient is the sum over samples,

    d theta_u = M_u' @ (sum_i d data_i),     d theta_b[:, i] = M_b' @ d data_i,

and both products read only the data rows their parameters reach.  The data gradients are
low rank (:class:`~ffo_core.engine.ffo_backward.DataGradient`): on a matrix section, sample ``i``'s
gradient is ``U_i V_i'`` restricted to the pattern, with two columns per factor.  So the sum
over the batch is ``[U_1 .. U_B] [V_1 .. V_B]'`` on the pattern: one rank-``2B`` product
(a dense GEMM and a gather when the pattern is dense, a row-wise gather otherwise) instead
of ``B`` passes over the pattern.  (For the paper's setup at n = 1000, where Q and G are
shared dense parameters and only q is batched, that is one pass over 3 million entries
instead of eight, and the batched ``q`` reads no pattern at all.)

Most shared parameters of real layers *are* their data entries: a dense matrix alone in
its constraint, a vector.  Those (:class:`_Run`) skip ``M_u`` altogether: the forward adds
their values to their data rows in place, and the backward reads their gradient off the
summed data gradient, a whole dense block computed straight in the parameter's row-major
layout (what torch stores; a column-major gradient would be copied by autograd).

The column split depends only on which parameters are batched, so it is computed once per
layer and batching mask (:func:`split_of`).  Parameter values come in and gradients go out
in the parameters' own shapes; internally ``theta`` is column-major, CVXPY's order
(:func:`~ffo_core.datamap.compile.flatten_f`).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..arrays import all_finite
from ..engine.data_gradient import low_rank_factors
from ..engine.ghost import GhostSource
from ..protocol import ConeConstraints, Equalities
from ..sparse_ops import prune, row_norms, stack_rows, upper_triangle
from .compile import CompiledProblem, flatten_f, unflatten_f

#: The data sections in the compiled order.
SECTIONS = ("P", "q", "A", "b", "G", "h")
_MATRIX = {"P", "A", "G"}

#: Entries per chunk when a pattern is evaluated by gathering (bounds temporary memory).
_CHUNK = 1 << 18
#: The batch's data on the rows batched parameters reach, ``(rows, batch)``, is kept for
#: the call when it has at most this many entries (8 MB); larger, each sample's is formed
#: when it is needed.
_KEEP_REACHED = 1 << 20


@dataclass
class _Reach:
    """The data rows some parameters reach, by section: ``local[name]`` are indices into
    the section (pattern entries for P/A/G, vector entries for q/b/h) and ``pos[name]``
    the slice of ``rows`` they fill.  For the matrix sections ``entries[name]`` says how
    to evaluate the reached pattern entries of ``U V'`` (computed once per layer and
    batching mask): ``_DenseBlock`` when they fill most of their bounding block, else
    their ``("rows_cols", rows, cols)``."""

    rows: np.ndarray
    local: dict
    pos: dict
    entries: dict

    @classmethod
    def of(cls, compiled: CompiledProblem, rows: np.ndarray) -> _Reach:
        local, pos, entries = {}, {}, {}
        for name in SECTIONS:
            sec = compiled.sections[name]
            inside = np.flatnonzero((rows >= sec.start) & (rows < sec.stop))
            if not inside.size:
                continue
            local[name] = rows[inside] - sec.start
            pos[name] = slice(int(inside[0]), int(inside[-1]) + 1)  # rows are sorted
            if name in _MATRIX:
                pat = getattr(compiled, name)
                r, c = pat.indices[local[name]], pat.cols[local[name]]
                block = _DenseBlock.of(r, c)
                entries[name] = block if block is not None else ("rows_cols", r, c)
        return cls(rows, local, pos, entries)


@dataclass
class _DenseBlock:
    """Pattern entries ``(r, c)`` that fill most of their bounding block ``rows x cols``:
    they are read from the dense product ``V[cols] U[rows]'`` (the block's transpose, so
    that its row-major storage is the block's column-major one, the order of CSC entries).
    ``flat`` indexes that storage; ``None`` when the entries are the whole block in that
    order (a learnable dense matrix): then the product *is* the answer, no gather."""

    rows: slice
    cols: slice
    flat: np.ndarray | None

    @classmethod
    def of(cls, r: np.ndarray, c: np.ndarray) -> _DenseBlock | None:
        r0, r1, c0, c1 = int(r.min()), int(r.max()) + 1, int(c.min()), int(c.max()) + 1
        if not _dense((r1 - r0, c1 - c0), r.size):
            return None
        flat = (c.astype(np.int64) - c0) * (r1 - r0) + (r - r0)
        if flat.size == (r1 - r0) * (c1 - c0) and np.array_equal(flat, np.arange(flat.size)):
            flat = None
        return cls(slice(r0, r1), slice(c0, c1), flat)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)

    def matrix(self, U: np.ndarray, V: np.ndarray) -> np.ndarray:
        """The block ``(U V')[rows, cols]``, row-major (a fresh array)."""
        return U[self.rows] @ V[self.cols].T

    def values(self, U: np.ndarray, V: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The entries' values; with ``out`` (1-D, contiguous) written there, and the
        product of a whole block straight into it (no 24 MB temporary for a 2000 x 1000
        learnable matrix)."""
        Vc, Ur = V[self.cols], U[self.rows]
        if self.flat is None and out is not None:
            np.matmul(Vc, Ur.T, out=out.reshape(Vc.shape[0], Ur.shape[0]))
            return out
        block = (Vc @ Ur.T).ravel()
        values = block if self.flat is None else block[self.flat]
        if out is not None:
            out[...] = values
        return values


def _dense(shape: tuple[int, int], k: int) -> bool:
    """Evaluate ``k`` entries of a ``shape`` low-rank product through the dense product?
    When they fill at least a quarter of it and it takes at most 128 MB."""
    full = shape[0] * shape[1]
    return full <= 4 * k and full <= 1 << 24


@dataclass(frozen=True)
class _Run:
    """A shared parameter whose columns of ``M`` are the identity onto consecutive data
    rows (a dense matrix or vector parameter that *is* its data entries, as every one of
    the paper's setup is): its ``size`` entries, column-major, are data rows ``rows``.

    The forward adds its values to those rows in place (no product with ``M``, no
    column-major copy: the transposed view is read once); the backward reads its gradient
    from the summed data gradient at positions ``pos`` of ``reach_u.rows``.  ``block``
    names the matrix section when the rows are one whole :class:`_DenseBlock` of the
    parameter's shape that no other shared parameter reaches: then its gradient is the
    product ``U[rows] V[cols]'`` computed straight in the parameter's row-major layout
    (torch would otherwise copy a column-major gradient into it: 4-5 ms for 2000 x 1000)."""

    param: int
    rows: slice
    pos: slice
    block: str | None


@dataclass
class Split:
    """``M``'s columns split into shared (``u``) and batched (``b``) parameters; the
    shared ones further into :class:`_Run` s and the rest."""

    M_u: sp.csc_matrix  # the other shared parameters' columns + the constant
    adj_u: _Adjoint | None  # M_u[reach_u.rows, :-1]': data rows -> their grads
    reach_u: _Reach  # the rows every shared parameter reaches (runs too)
    runs: tuple[_Run, ...]
    M_b_rows: sp.csr_matrix | None  # M_b[reach_b.rows]: theta_b -> the rows it reaches
    adj_b: _Adjoint | None  # M_b_rows'
    reach_b: _Reach | None

    #: what :class:`BoundData` forms from :attr:`constant_sections` (their matrices, P's
    #: triangle, ``[A; G]``, G's row norms and transpose), kept from call to call
    constants: dict = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def batched_sections(self) -> frozenset:
        """Names of the data sections some batched parameter reaches (they differ per
        sample; every other section is the same for the whole batch)."""
        return frozenset(self.reach_b.local) if self.reach_b is not None else frozenset()

    @functools.cached_property
    def constant_sections(self) -> frozenset:
        """Names of the data sections no parameter reaches: the compiled constant, the
        same data in every call (e.g. ``P``, ``A``, ``G`` when only ``q`` is learnable)."""
        reached = set(self.reach_u.local) | self.batched_sections
        return frozenset(SECTIONS) - reached


def split_of(compiled: CompiledProblem, batched: tuple[bool, ...]) -> Split:
    """The column split for a batching mask (cached on ``compiled``)."""
    cache = compiled.__dict__.setdefault("_splits", {})
    if batched in cache:
        return cache[batched]
    M = compiled.M_csc
    params = compiled.params

    def columns(ks):
        cols = [np.arange(params[k].offset, params[k].offset + params[k].size) for k in ks]
        return np.concatenate(cols).astype(np.int64) if cols else np.zeros(0, np.int64)

    shared_ks = [k for k, b in enumerate(batched) if not b]
    first_rows = {k: r for k in shared_ks if (r := _identity_rows(M[:, columns([k])])) is not None}
    rest = [k for k in shared_ks if k not in first_rows]
    shared = M[:, columns(shared_ks)].tocsr()
    rows_u = np.flatnonzero(np.diff(shared.indptr))
    reach_u = _Reach.of(compiled, rows_u)
    M_u = M[:, np.r_[columns(rest), compiled.const_col].astype(np.int64)]
    adj_u = _Adjoint(M_u[:, :-1].tocsr()[rows_u].T.tocsr()) if rest else None
    row_nnz = np.diff(shared.indptr)
    runs = []
    for k, r0 in first_rows.items():
        size = params[k].size
        p0 = int(np.searchsorted(rows_u, r0))
        pos = slice(p0, p0 + size)
        block = None
        for name, how in reach_u.entries.items():
            if (
                reach_u.pos[name] == pos
                and isinstance(how, _DenseBlock)
                and how.flat is None
                and how.shape == params[k].shape
                and np.all(row_nnz[r0 : r0 + size] == 1)
            ):  # no other parameter
                block = name
        runs.append(_Run(k, slice(r0, r0 + size), pos, block))
    cols_b = columns([k for k, b in enumerate(batched) if b])
    if cols_b.size:
        M_b = M[:, cols_b].tocsr()
        rows_b = np.flatnonzero(np.diff(M_b.indptr))
        M_b_rows = M_b[rows_b]
        split = Split(
            M_u,
            adj_u,
            reach_u,
            tuple(runs),
            M_b_rows,
            _Adjoint(M_b_rows.T.tocsr()),
            _Reach.of(compiled, rows_b),
        )
    else:
        split = Split(M_u, adj_u, reach_u, tuple(runs), None, None, None)
    cache[batched] = split
    return split


def _identity_rows(cols: sp.csc_matrix) -> int | None:
    """The first data row if column ``j`` of ``cols`` is the unit vector of data row
    ``first + j`` (every ``j``), else ``None``."""
    k = cols.shape[1]
    if k == 0 or cols.nnz != k or not np.array_equal(cols.indptr, np.arange(k + 1)):
        return None
    first = int(cols.indices[0])
    if not (np.array_equal(cols.indices, np.arange(first, first + k)) and np.all(cols.data == 1.0)):
        return None
    return first


class _Adjoint:
    """A data-rows -> parameter-entries map ``M' v``.  When it is the identity it is not
    applied at all: a batched dense parameter, or shared ones whose entries *are* their
    data entries but interleave with other entries of their section (consecutive ones are
    :class:`_Run` s and never reach an adjoint)."""

    def __init__(self, M: sp.csr_matrix) -> None:
        self.M = M
        k = M.shape[0]
        self.identity = (
            M.shape == (k, k)
            and M.nnz == k
            and np.array_equal(M.indptr, np.arange(k + 1))
            and np.array_equal(M.indices, np.arange(k))
            and bool(np.all(M.data == 1.0))
        )

    def __matmul__(self, v: np.ndarray) -> np.ndarray:
        return v if self.identity else self.M @ v


def pattern_values(rows: np.ndarray, cols: np.ndarray, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``sum_j U[rows, j] V[cols, j]``: the entries ``(rows, cols)`` of ``U V'``.

    A dense product of the entries' bounding block when they fill most of it (a learnable
    dense matrix, :class:`_DenseBlock`); otherwise row-wise gathers in chunks, never a
    dense ``U V'``.
    """
    block = _DenseBlock.of(rows, cols) if rows.size else None
    if block is not None:
        return block.values(U, V)
    return _gathered_values(rows, cols, U, V)


def _gathered_values(
    rows: np.ndarray, cols: np.ndarray, U: np.ndarray, V: np.ndarray
) -> np.ndarray:
    out = np.empty(rows.size)
    step = max(1, _CHUNK // max(1, U.shape[1]))
    for s in range(0, rows.size, step):
        r, c = rows[s : s + step], cols[s : s + step]
        out[s : s + step] = np.einsum("ij,ij->i", U[r], V[c])
    return out


def _factors(name: str, grads: list) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)`` of the summed gradient of matrix section ``name`` over ``grads``."""
    return low_rank_factors(name, [g.base for g in grads], [g.direction for g in grads])


def _vector(name: str, grad) -> np.ndarray:
    return {"q": grad.q, "b": grad.b, "h": grad.h}[name]


def gradient_on(
    compiled: CompiledProblem, reach: _Reach, grads: list, skip: frozenset = frozenset()
) -> np.ndarray:
    """``sum_i d data_i`` on the data rows of ``reach`` (in ``reach.rows`` order); the
    sections in ``skip`` are left zero (their caller forms them another way)."""
    out = np.zeros(reach.rows.size)
    low = [g for g in grads if g.low_rank]
    plain = [g for g in grads if not g.low_rank]
    for name, local in reach.local.items():
        if name in skip:
            continue
        pos = reach.pos[name]
        if name in _MATRIX:
            if low:
                U, V = _factors(name, low)
                how = reach.entries[name]
                if isinstance(how, _DenseBlock):
                    how.values(U, V, out=out[pos])
                else:
                    out[pos] = _gathered_values(how[1], how[2], U, V)
            for g in plain:
                out[pos] += getattr(g, name)[local]
        else:
            for g in grads:
                out[pos] += _vector(name, g)[local]
    return out


class BoundData:
    """Problem data of one batch: ``sample(i)`` per sample, and the adjoint map."""

    def __init__(
        self, compiled: CompiledProblem, values: list[np.ndarray], batched: list[bool], batch: int
    ) -> None:
        self.compiled, self.batch = compiled, batch
        self.batched = tuple(bool(b) for b in batched)
        self.split = split = split_of(compiled, self.batched)
        params = compiled.params
        run_of = {run.param: run for run in split.runs}
        theta_u = np.concatenate(
            [
                flatten_f(np.asarray(v)[None], 1, params[k].shape)[0]
                for k, (v, b) in enumerate(zip(values, batched))
                if not b and k not in run_of
            ]
            + [[1.0]]
        )
        if split.M_u.shape[1] > 1:
            self.base = split.M_u @ theta_u
        else:  # every shared parameter is a run: the constant column alone
            self.base = np.zeros(split.M_u.shape[0])
            self.base[split.M_u.indices] = split.M_u.data  # cheaper than a scipy product
        for k, run in run_of.items():  # base[run] += vec_F(value), in one pass
            v = np.asarray(values[k])
            rows = self.base[run.rows].reshape(v.shape[::-1])
            np.add(rows, v.T, out=rows)
        self._per_call: dict = {}
        self._lock = threading.Lock()
        self._reached_all: np.ndarray | None = None  # see overflowing_samples
        if split.M_b_rows is not None:
            self.theta_b = np.concatenate(
                [
                    flatten_f(np.asarray(v), batch, params[k].shape)
                    for k, (v, b) in enumerate(zip(values, batched))
                    if b
                ],
                axis=1,
            ).T.copy()  # (n_b, batch)
        else:
            self.theta_b = None

    def _reached(self, i: int) -> np.ndarray:
        """Sample ``i``'s data on the rows batched parameters reach."""
        if self._reached_all is not None:
            return self._reached_all[:, i]
        return self.base[self.split.reach_b.rows] + self._batched(self.theta_b[:, i])

    def _batched(self, theta: np.ndarray) -> np.ndarray:
        """``M_b_rows @ theta``; ``theta`` itself when that map is the identity (a
        batched vector or dense matrix parameter, as nearly always)."""
        return theta if self.split.adj_b.identity else self.split.M_b_rows @ theta

    def overflowing_samples(self) -> list[int]:
        """Batch indices whose data is not finite (overflow), checked without forming the
        whole batch: the shared part once, the batched part on the rows it touches (that
        part is kept for :meth:`sample` when it is small, ``_KEEP_REACHED``)."""
        if not all_finite(self.base):
            return list(range(self.batch))
        if self.theta_b is None or self.split.M_b_rows.nnz == 0:
            return []
        rows = self.split.reach_b.rows
        part = self.base[rows, None] + self._batched(self.theta_b)
        if part.size <= _KEEP_REACHED:  # kept: it saves a product per sample
            self._reached_all = part
        if all_finite(part):
            return []
        return np.flatnonzero(~np.isfinite(part).all(axis=0)).tolist()

    def data(self, i: int) -> np.ndarray:
        """Sample ``i``'s data vector (length ``n_data``), a fresh array."""
        out = self.base.copy()
        if self.theta_b is not None:
            out[self.split.reach_b.rows] = self._reached(i)
        return out

    def sample_bytes(self) -> int:
        """Rough bytes one sample holds in the first-order backward beyond what the batch
        shares: its copy of every section a batched parameter reaches, and for a matrix
        section also its pruned copy, ``[A; G]`` and the ghost's rows (about 48 bytes per
        structural entry; 8 per vector entry)."""
        cp_ = self.compiled
        size = 0
        for name in self.split.batched_sections:
            sec = cp_.sections[name]
            size += (sec.stop - sec.start) * (48 if name in ("P", "A", "G") else 8)
        return size

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
        built once per call (the same objects in every sample), and a shared ``P``'s upper
        triangle (``"P_upper"``, what most adapters hand their solver)."""
        cp_ = self.compiled
        parts = {name: self.base[sec] for name, sec in cp_.sections.items()}
        reached = self.split.batched_sections
        for name in ("P", "A", "G"):
            if name not in reached and getattr(cp_, name) is not None:
                parts[name] = self._once(
                    name + "_matrix", parts[name], getattr(cp_, name).matrix, reached=(name,)
                )
        if "P" not in reached and cp_.P is not None:  # one triangle for all solves
            parts["P_upper"] = self._once("P_upper", parts["P"], upper_triangle, reached=("P",))
        return parts

    def nonzero(self, h: ConeConstraints, e: Equalities) -> tuple[ConeConstraints, Equalities]:
        """:func:`~ffo_core.engine.ffo_backward.without_stored_zeros` of a sample's ``(h, e)``
        (from :meth:`sample`).  A matrix no batched parameter reaches is the same for
        every sample: it is pruned once per call and shared (once per layer when no
        parameter reaches it, :meth:`_once`)."""
        # the constructors: dataclasses.replace costs more, twice per sample
        return (
            ConeConstraints(self._once("G", h.G, prune), h.h, h.dims),
            Equalities(self._once("A", e.A, prune), e.b),
        )

    def ghost_source(self, h: ConeConstraints, e: Equalities) -> GhostSource:
        """:class:`~ffo_core.engine.ffo_backward.GhostSource` of a sample's ``(h, e)``: its
        matrix parts are formed once per call when no batched parameter reaches them."""
        h_nz, e_nz = self.nonzero(h, e)
        G = h_nz.G
        return GhostSource(
            h_nz,
            e_nz,
            self._once("AG", (e_nz.A, G), lambda AG: stack_rows(*AG), reached=("A", "G")),
            self._once("G_row_norms", G, row_norms, reached=("G",)),
            self._once("G_T", G, lambda M: M.T, reached=("G",)),
        )

    def _once(self, key: str, value, make, reached: tuple[str, ...] | None = None):
        """``make(value)`` for what is formed of the sections ``reached`` (default:
        ``(key,)``): per sample when a batched parameter reaches one of them; else once per
        call; and once per layer and batching mask when no parameter reaches any of them
        (:attr:`Split.constant_sections`: kept in :attr:`Split.constants`).  Racing
        threads may both form it; the first one kept is the one every caller gets."""
        sections = reached or (key,)
        if not self.split.batched_sections.isdisjoint(sections):
            return make(value)
        cache = (
            self.split.constants
            if self.split.constant_sections.issuperset(sections)
            else self._per_call
        )
        found = cache.get(key)
        if found is None:
            with self._lock:
                found = cache.get(key)
                if found is None:
                    found = cache.setdefault(key, make(value))
        return found

    def parameter_gradients(self, grads: list) -> list[np.ndarray]:
        """Per parameter (in the compiled order): an array of the parameter's shape for a
        shared parameter (summed over samples), ``(batch, *shape)`` for a batched one.
        Strides vary: a :class:`_Run` on a whole dense block comes row-major, the others
        are column-major views of one flat vector.

        ``grads[i]`` is sample ``i``'s :class:`~ffo_core.engine.ffo_backward.DataGradient`.  Only
        the data rows the parameters reach are evaluated: the shared ones as one low-rank
        sum over the batch, the batched ones per sample.
        """
        cp_, split = self.compiled, self.split
        params = cp_.params
        out: list = [None] * len(params)

        def deal(flat: np.ndarray, ks: list[int]) -> None:
            """Hand the last axis of ``flat`` out to parameters ``ks``, in order
            (``split_of`` stacked their columns that way), column-major."""
            rows, start = flat.reshape(-1, flat.shape[-1]), 0  # (batch or 1, total)
            for k in ks:
                value = unflatten_f(rows[:, start : start + params[k].size], params[k].shape)
                out[k] = value if flat.ndim == 2 else value[0]
                start += params[k].size

        shared = [k for k, b in enumerate(self.batched) if not b]
        if shared:
            blocks = {run.block: run for run in split.runs if run.block is not None}
            summed = gradient_on(cp_, split.reach_u, grads, skip=frozenset(blocks))
            run_ks = {run.param for run in split.runs}
            if split.adj_u is not None:
                deal(split.adj_u @ summed, [k for k in shared if k not in run_ks])
            for run in split.runs:
                if run.block is None:
                    deal(summed[run.pos], [run.param])
                else:
                    out[run.param] = self._block_gradient(run, grads)
        if any(self.batched):
            deal(
                np.stack([split.adj_b @ gradient_on(cp_, split.reach_b, [g]) for g in grads]),
                [k for k, b in enumerate(self.batched) if b],
            )
        return out

    def _block_gradient(self, run: _Run, grads: list) -> np.ndarray:
        """``sum_i d data_i`` on ``run``'s whole dense block, row-major: one product of
        the batch's low-rank factors, plus any explicit (not low-rank) gradients."""
        name = run.block
        how = self.split.reach_u.entries[name]
        low = [g for g in grads if g.low_rank]
        total = how.matrix(*_factors(name, low)) if low else np.zeros(how.shape)
        local = self.split.reach_u.local[name]
        for g in grads:
            if not g.low_rank:  # its block entries are column-major
                total += getattr(g, name)[local].reshape(how.shape[::-1]).T
        return total


def bind(
    compiled: CompiledProblem, values: list[np.ndarray], batched: list[bool], batch: int
) -> BoundData:
    """``values[k]``: parameter ``k``'s value, of its shape if shared or ``(batch, *shape)``
    if batched (any strides)."""
    return BoundData(compiled, values, batched, batch)


__all__ = ["BoundData", "bind", "gradient_on", "pattern_values", "split_of"]
