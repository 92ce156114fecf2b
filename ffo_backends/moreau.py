"""Moreau adapter (batched interior point and active-set QP; LP, QP, SOC, EXP, PSD).

Size: one adapter.  Half of it is this docstring (Moreau's conventions and the failure
modes the adapter guards against); the code is the conversions, the compiled-solver cache
and the answer checks, which share the per-structure maps.

`Moreau <https://pypi.org/project/moreau/>`_ (Apache-2.0, no licence key) is a conic solver
built for batches: ``moreau.CompiledSolver`` solves many problems that share one sparsity
structure in one call (the layer's case), with an interior-point method (IPM) and, for
LP/QP, a dual active-set method.  Install it with ``pip install ffo[moreau]`` (its CPU
build, ``moreau-cpu``).

* ``solve`` (one problem) goes through ``moreau.Solver``; ``solve_batch`` (the protocol's
  optional batched method, :class:`~ffo_core.protocol.ProblemBatch`) through
  ``moreau.CompiledSolver``, one call for the whole batch.

Native conventions and how they map to the protocol (:mod:`ffo_core.protocol`); all of them
are applied in one place, :class:`MoreauForm`:

* Moreau solves ``min 1/2 x'Px + q'x  s.t.  Ax + s = b, s in K`` with ``P`` given as the
  *full symmetric* matrix in CSR and returns ``z`` with ``Px + q + A'z = 0``, ``z in K*``
  (Clarabel's conventions).  We stack ``[A_eq; G]`` with a zero cone first, so
  ``z = [nu; lam]`` and ``s = [0; s]``: **no sign change** for duals or slacks.
* **Cone order.**  Moreau orders its cones ``zero, nonneg, SOC, PSD, EXP`` -- PSD blocks
  *before* the exponential cones -- while the protocol orders ``zero, nonneg, SOC, EXP,
  PSD``; Moreau's SOC needs dimension >= 2, and a protocol ``SOC(1)`` (``t >= 0``) is a
  nonnegative row.  The rows of ``G`` are therefore permuted on the way in (``G``, ``h``)
  and back on the way out (``lam``, ``s``): SOC(1) rows join the nonnegative block, then
  the SOC blocks, the PSD blocks and the EXP blocks, each in protocol order.
* **PSD layout.**  Moreau's ``PSDTriangleConeT`` is Clarabel's: upper triangle column by
  column, off-diagonals times sqrt(2) -- the protocol's layout, no conversion.  The
  exponential cone is the same set, rows ``(x, y, z)``.
* **CSC -> CSR.**  The protocol's matrices are CSC; Moreau's are CSR.  The CSR patterns
  of ``P`` and of the stacked ``[A; G]`` and the map from the protocol's entry order to
  Moreau's are formed once per structure (:class:`MoreauForm`), and values are permuted
  with that map (a sparse product; exact, no rounding).  ``P`` is passed as
  ``(P + P')/2`` on the union of its pattern and its transpose, which equals ``P`` bit for
  bit when ``P`` is symmetric and satisfies Moreau's symmetry check always.  Stored zeros
  stay in the structure (an *absent row* of a :class:`ProblemBatch` is a row of zeros).

Settings are Moreau's own names (``moreau.Settings``, ``IPMSettings``,
``ActiveSetSettings`` fields), flat in the config string, e.g.
``"moreau:solver=active_set,primal_tol=1e-10"`` or ``"moreau:solver=ipm,tol_gap_abs=1e-10"``:

==========================  ==============================================================
``solver``                  ``"auto"`` (default), ``"ipm"`` or ``"active_set"``; ``auto``
                            is Moreau's own default rule -- the active set for QPs with
                            zero and nonnegative cones only, ``n <= 500`` and
                            ``0 < rows <= max(500, 2n)``, the IPM otherwise -- with
                            Moreau's ``P != 0`` sharpened to "every diagonal entry of
                            ``P`` positive" (see below)
``max_iter``                iteration limit (IPM iterations; the active set's limit too)
``time_limit``              seconds (for a batch: the whole batch)
``device``, ``device_id``   ``"cpu"`` (default) or ``"cuda"`` (needs Moreau's CUDA build,
                            ``pip install moreau[cuda]``, Python >= 3.12)
``verbose``                 Moreau's log (default False)
IPM                         ``tol_gap_abs``, ``tol_gap_rel``, ``tol_feas``,
                            ``tol_infeas_abs``, ``tol_infeas_rel``, ``tol_ktratio``,
                            ``max_step_fraction``, ``equilibrate_enable``,
                            ``direct_solve_method``, ``reduced_tol_*``, ...
                            (:data:`IPM_SETTINGS`)
active set                  ``primal_tol``, ``dual_tol``, ``zero_tol``, ``pivot_tol``,
                            ``progress_tol``, ``fval_bound``, ``iter_limit``, ``cycle_tol``
                            (:data:`ACTIVE_SET_SETTINGS`)
==========================  ==============================================================

Every setting is checked when the backend is made (:class:`~ffo_core.errors.ConfigError`
naming the setting and Moreau's own complaint).  Moreau's gradient settings (``enable_grad``,
``diff_*``), ``auto_tune`` (which times configurations on the first solve and so makes
answers depend on timing) and ``yolo`` (a fixed number of iterations with no convergence
check) are not accepted.  Adapter options, not Moreau settings: ``cache_size`` (compiled
solvers kept per thread, default 8; 0 = build one per call) and ``verify_tol`` (default
1e-6, see below).

Defaults and what they cost.  ``solver=auto`` passes ``ffo conformance moreau``, as do
``ipm`` and ``active_set``.  The IPM (tolerances 1e-8) handles every cone and reports
infeasibility and unboundedness; its LP/QP points are ~1e-8..1e-9 from exact.  The active
set solves a QP with positive definite ``P`` exactly up to rounding (~1e-13 on the
conformance zoo) and the engine's equality-constrained ghost problems in one iteration,
and is the faster of the two on QPs with few active bounds (the Sudoku QP), but its cost
grows with the number of active constraints, so on a box QP with many active bounds the
IPM is several times faster (``benchmarks/moreau.py`` and ``docs/backends.md`` have the
figures; choose ``solver=ipm`` for such problems).  With a singular
``P`` (CVXPY writes ``sum_squares(F @ y)`` as ``1/2 t't`` on auxiliary variables
``t = F y``, so ``P`` has zero diagonal entries) its answers are only ~1e-7 accurate, hence
the sharpened ``auto`` rule, which sends those problems to the IPM.  Moreau 0.4.1's active
set also (measured):

* reports ``Solved`` with ``x = 1e6`` on an *unbounded* QP, and ``NumericalError`` on
  inconsistent equalities;
* crashes the process on a problem with no constraint rows at all.

So the adapter never gives it a problem without rows, and **checks every active-set answer**:
a ``Solved`` sample whose KKT residual (below) exceeds ``verify_tol``, and every other
active-set status, is solved again by the IPM, whose answer and status are reported.
Conversely an IPM breakdown (``NumericalError``, ``InsufficientProgress``; measured: 1 of
1024 Sudoku samples) on an LP/QP sample is tried once more by the active set, whose answer
is kept only when it passes the same check.  ``info.extra["method"]`` says which method
answered, ``info.extra["first_try"]`` what the first one said.  Cones other than zero and
nonnegative always go to the IPM, whatever ``solver`` says.

Statuses (:data:`STATUS_MAP`, by Moreau's ``SolverStatus`` name): ``Solved`` -> OPTIMAL,
``AlmostSolved`` -> OPTIMAL_INACCURATE, ``PrimalInfeasible`` -> INFEASIBLE,
``DualInfeasible`` -> UNBOUNDED (and their ``Almost`` forms to the ``_INACCURATE``
statuses), ``MaxIterations`` -> ITERATION_LIMIT, ``MaxTime`` -> TIME_LIMIT, anything else
-> NUMERICAL_ERROR.  An answer with a NaN or Inf is NUMERICAL_ERROR whatever the status.

``SolveInfo.accuracy`` is measured, not taken from a setting: the largest of the relative
stationarity residual ``|Py + q + A'nu + G'lam|``, the primal residual ``|[A; G]y + s -
[b; h]|`` and the sign violations of ``s`` and ``lam`` on the nonnegative rows, and the
relative complementarity ``|s'lam|`` (the measure of
:func:`ffo_core.backend_base.kkt_residual`, computed for the whole batch at once); with SOC,
EXP or PSD blocks its square root (an interior-point point is only ~sqrt(residual) from the
curved boundary; the Clarabel adapter does the same).  ``iterations`` and ``raw_status``
are Moreau's, per sample; a batched sample's ``solve_time`` is None and
``info.extra["batch_solve_time"]`` holds Moreau's time for the whole batch (seconds).

Structure reuse, determinism and threads.  ``solve`` builds a fresh ``moreau.Solver`` per
call.  ``solve_batch`` keeps, per thread (``threading.local``), an LRU of ``cache_size``
compiled solvers keyed by a hash of the structure -- ``n``, the exact CSC pattern arrays
(shape, ``indptr``, ``indices``) of ``P``, ``A`` and ``G``, the cone sizes -- plus the
method and the batch size, and a hit is confirmed by comparing the stored pattern arrays
themselves, so a compiled solver is only ever reused for the same structure with the same
entry order (two structures that differ only in the order of their entries are two keys).
Every call sets the values of ``P`` and ``A`` anew and solves from a cold start (no warm
start is passed), so a sample's answer does not depend on what ran before (tests check that
answers are bit-for-bit equal whatever was solved in between).  An instance may be used from
several threads at once; compiled solvers are never shared between threads (Moreau's are not
thread-safe).  Moreau solves a batch with its own thread pool (rayon).

Torch tensors.  ``Capabilities.device`` is False: with the CPU build, the layers keep the
data in NumPy for this backend.  ``solve_batch`` still accepts torch tensors (any device):
they are copied to NumPy float64, solved, and the answer comes back as tensors of the
input's dtype and device.  ``device=cuda`` runs Moreau's CUDA build through the same NumPy
interface; it is not exercised by this project's CPU test machines (the CUDA build needs
Python >= 3.12).
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from ffo_backends.clarabel import STATUS_MAP as CLARABEL_STATUS_MAP
from ffo_core.backend_base import BackendBase, data_digest
from ffo_core.errors import ConfigError, SolverError
from ffo_core.hookspecs import hookimpl
from ffo_core.protocol import (
    BatchSolution,
    Capabilities,
    ConeConstraints,
    ConeDims,
    Equalities,
    Objective,
    ProblemBatch,
    Solution,
    SolveInfo,
    SparsePattern,
    Status,
)

#: Moreau ``SolverStatus`` names -> protocol status: Moreau's ``SolverStatus`` has
#: Clarabel's names, word for word, so the map is the Clarabel adapter's.
STATUS_MAP = CLARABEL_STATUS_MAP

#: ``moreau.Settings`` fields accepted in the config string.
TOP_SETTINGS = ("solver", "device", "device_id", "max_iter", "time_limit", "verbose")
#: ``moreau.IPMSettings`` fields accepted in the config string.
IPM_SETTINGS = (
    "tol_gap_abs",
    "tol_gap_rel",
    "tol_feas",
    "tol_infeas_abs",
    "tol_infeas_rel",
    "tol_ktratio",
    "max_step_fraction",
    "equilibrate_enable",
    "direct_solve_method",
    "cudss_ir_steps",
    "cudss_pivot_enable",
    "max_lu_nnz",
    "reduced_tol_gap_abs",
    "reduced_tol_gap_rel",
    "reduced_tol_feas",
    "reduced_tol_infeas_abs",
    "reduced_tol_infeas_rel",
    "reduced_tol_ktratio",
    "chordal_decomposition_enable",
    "chordal_decomposition_merge_method",
)
#: ``moreau.ActiveSetSettings`` fields accepted in the config string.
ACTIVE_SET_SETTINGS = (
    "primal_tol",
    "dual_tol",
    "zero_tol",
    "pivot_tol",
    "progress_tol",
    "fval_bound",
    "iter_limit",
    "cycle_tol",
)
#: Options of this adapter that are not Moreau settings.
ADAPTER_OPTIONS = ("cache_size", "verify_tol")
#: This adapter's defaults (where they differ from Moreau's own).
DEFAULTS: dict[str, Any] = {"solver": "auto", "device": "cpu", "verbose": False}
#: Compiled solvers kept per thread by default.
DEFAULT_CACHE_SIZE = 8
#: Largest KKT residual at which an active-set ``Solved`` answer is accepted as it is.
DEFAULT_VERIFY_TOL = 1e-6

_IPM = "ipm"
_ACTIVE_SET = "active_set"
#: IPM statuses of a breakdown (not a verdict, not a limit): an LP/QP sample that ends so
#: is tried once more by the active set
_IPM_BREAKDOWN = frozenset({"NumericalError", "InsufficientProgress"})


# -- conventions: one structure in Moreau's form ------------------------------------------
def moreau_row_order(dims: ConeDims) -> tuple[np.ndarray, dict[str, Any]]:
    """``perm`` with ``moreau_G_rows = protocol_G_rows[perm]``, and the cone sizes of that
    order (``moreau.Cones`` keyword arguments, without the zero cone).

    Moreau's order is nonneg, SOC, PSD, EXP; a protocol ``SOC(1)`` block joins the
    nonnegative rows (Moreau's SOC needs dimension >= 2)."""
    nonneg = list(range(dims.nonneg))
    soc_rows: list[int] = []
    soc_dims: list[int] = []
    start = dims.nonneg
    for d in dims.soc:
        if d == 1:
            nonneg.append(start)
        else:
            soc_rows.extend(range(start, start + d))
            soc_dims.append(d)
        start += d
    exp_rows = list(range(start, start + 3 * dims.exp))
    start += 3 * dims.exp
    psd_rows = list(range(start, dims.rows))
    perm = np.array(nonneg + soc_rows + psd_rows + exp_rows, dtype=np.int64)
    cones = {
        "num_nonneg_cones": len(nonneg),
        "so_cone_dims": soc_dims,
        "psd_dims": list(dims.psd),
        "num_exp_cones": dims.exp,
    }
    return perm, cones


class ValueMap:
    """Protocol entry values -> Moreau's CSR entry values, for ``(k, nnz_in)`` arrays.

    The usual case is a gather (``values[:, take]``; for ``P``, the mean of the entry and
    its mirror, ``(values[:, take] + values[:, mirror]) / 2``, which is the entry itself
    bit for bit when the two are equal); patterns with duplicate entries, or a ``P``
    pattern that is not structurally symmetric, take a sparse ``nnz_out x nnz_in`` matrix.
    """

    def __init__(self, nnz_out: int, take=None, mirror=None, matrix=None) -> None:
        self.nnz_out, self.take, self.mirror, self.matrix = nnz_out, take, mirror, matrix

    def __call__(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        if self.nnz_out == 0:
            return np.zeros((values.shape[0], 0))
        if self.matrix is not None:
            return np.ascontiguousarray((self.matrix @ values.T).T)
        out = values[:, self.take]
        if self.mirror is not None:
            out = 0.5 * (out + values[:, self.mirror])
        return out


def _csr_pattern(keys: np.ndarray, n_rows: int, n_cols: int):
    """``(indptr, indices, rows)`` of the CSR pattern with sorted unique ``keys``
    (``row * n_cols + col``)."""
    rows = keys // max(n_cols, 1)
    indices = (keys % max(n_cols, 1)).astype(np.int64)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr), indices, rows.astype(np.int64)


def csr_map(rows, cols, shape, mirror: bool = False):
    """The CSR pattern of the entries ``(rows[k], cols[k])`` (input entry ``k``), and the
    :class:`ValueMap` from input values to its entry values; with ``mirror`` (a square
    ``P``), the pattern of ``P`` and ``P'`` together and the values of ``(P + P')/2``."""
    n_rows, n_cols = shape
    width = max(n_cols, 1)
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    keys = rows * width + cols
    nnz_in = keys.size
    order = np.argsort(keys, kind="stable")
    unique = nnz_in == 0 or bool(np.all(np.diff(keys[order]) > 0))
    if unique and not mirror:
        return (*_csr_pattern(keys[order], n_rows, n_cols), ValueMap(nnz_in, take=order))
    if unique:
        tkeys = cols * width + rows
        torder = np.argsort(tkeys, kind="stable")
        if np.array_equal(keys[order], tkeys[torder]):  # structurally symmetric
            return (
                *_csr_pattern(keys[order], n_rows, n_cols),
                ValueMap(nnz_in, take=order, mirror=torder),
            )
    # general: duplicates summed; with mirror, the union with the transpose
    src = np.arange(nnz_in)
    weights = np.ones(nnz_in)
    if mirror:
        keys = np.concatenate([keys, cols * width + rows])
        src = np.concatenate([src, src])
        weights = np.full(2 * nnz_in, 0.5)
    out_keys, out_idx = np.unique(keys, return_inverse=True)
    M = sp.csr_matrix((weights, (out_idx.ravel(), src)), shape=(out_keys.size, nnz_in), dtype=float)
    M.sum_duplicates()
    return (*_csr_pattern(out_keys, n_rows, n_cols), ValueMap(out_keys.size, matrix=M))


class MoreauForm:
    """One protocol structure (``n``; CSC patterns of ``P``, ``A``, ``G``; cones) in
    Moreau's form: CSR patterns of the symmetrised ``P`` and of ``[A; G[perm]]``, the maps
    from protocol entry values to Moreau's, Moreau's cones, and what the batched KKT
    residual needs.  Immutable once built; shared by the compiled solvers of the structure.
    """

    def __init__(
        self,
        n: int,
        P: SparsePattern | None,
        A: SparsePattern,
        G: SparsePattern,
        dims: ConeDims,
    ) -> None:
        p, m = A.shape[0], G.shape[0]
        if dims.rows != m:
            raise SolverError(
                f"moreau: the cone sizes {dims} cover {dims.rows} rows but G has {m}",
                backend="moreau",
            )
        self.n, self.p, self.m, self.rows = n, p, m, p + m
        self.dims = dims
        self.perm, cones = moreau_row_order(dims)
        self.inv = np.empty(m, dtype=np.int64)
        self.inv[self.perm] = np.arange(m, dtype=np.int64)
        self.cones_kwargs = {"num_zero_cones": p, **cones}
        #: Moreau rows (of the stack) in the nonnegative cone
        self.nonneg_rows = np.arange(p, p + cones["num_nonneg_cones"], dtype=np.int64)
        #: Moreau rows in any cone other than the zero cone
        self.cone_rows = slice(p, p + m)
        self.curved = bool(cones["so_cone_dims"] or dims.psd or dims.exp)
        self.qp_cones = not self.curved

        # P: (P + P')/2 on the union of P's pattern and its transpose
        self.nnzP_in = 0 if P is None else P.nnz
        if P is None or P.nnz == 0:
            self.P_indptr = np.zeros(n + 1, dtype=np.int64)
            self.P_indices = np.zeros(0, dtype=np.int64)
            self.P_rows = np.zeros(0, dtype=np.int64)
            self.P_map = ValueMap(0)
        else:
            self.P_indptr, self.P_indices, self.P_rows, self.P_map = csr_map(
                P.indices, P.cols, (n, n), mirror=True
            )
        #: position of each diagonal entry in Moreau's P values (None: one is missing)
        diag = np.flatnonzero(self.P_rows == self.P_indices)
        self.P_diag = diag if diag.size == n and n > 0 else None
        # [A; G[perm]]: protocol G row i is Moreau stack row p + inv[i]
        self.nnzA_in, self.nnzG_in = A.nnz, G.nnz
        rows = np.concatenate([A.indices.astype(np.int64), p + self.inv[G.indices]])
        cols = np.concatenate([A.cols.astype(np.int64), G.cols.astype(np.int64)])
        self.A_indptr, self.A_indices, self.A_rows, self.A_map = csr_map(rows, cols, (self.rows, n))

    @property
    def nnzP(self) -> int:
        return self.P_indices.size

    @property
    def nnzA(self) -> int:
        return self.A_indices.size

    def cones(self):
        import moreau

        return moreau.Cones(**self.cones_kwargs)

    # -- values ----------------------------------------------------------------------------
    def P_values(self, P_values) -> np.ndarray:
        """Moreau's ``P`` values, ``(k, nnzP)``, from the protocol's ``(k, P.nnz)``."""
        if P_values is None or self.nnzP == 0:
            return np.zeros((1, self.nnzP))
        return self.P_map(P_values)

    def A_values(self, A_values, G_values) -> np.ndarray:
        """Moreau's stacked ``[A; G[perm]]`` values, ``(k, nnzA)``."""
        k = max(A_values.shape[0], G_values.shape[0])
        both = np.concatenate(
            [_rows(A_values, k, self.nnzA_in), _rows(G_values, k, self.nnzG_in)], axis=1
        )
        return self.A_map(both)

    def rhs(self, b, h) -> np.ndarray:
        """Moreau's ``[b; h[perm]]``, ``(k, rows)``."""
        k = max(b.shape[0], h.shape[0])
        return np.concatenate([_rows(b, k, self.p), _rows(h, k, self.m)[:, self.perm]], axis=1)

    def to_protocol(self, z: np.ndarray, s: np.ndarray):
        """``(nu, lam, slack)`` from Moreau's ``z`` and ``s`` (``(batch, rows)``)."""
        nu = z[:, : self.p]
        lam = z[:, self.p :][:, self.inv]
        slack = s[:, self.p :][:, self.inv]
        return nu, lam, slack

    def matrices(self, Pv: np.ndarray, Av: np.ndarray):
        """One sample's ``P`` and ``A`` as scipy CSR (Moreau's form)."""
        P = sp.csr_matrix((Pv, self.P_indices, self.P_indptr), shape=(self.n, self.n))
        A = sp.csr_matrix((Av, self.A_indices, self.A_indptr), shape=(self.rows, self.n))
        return P, A

    # -- the batched KKT residual ----------------------------------------------------------
    def residual(self, Pv, Av, q, b, x, z, s) -> np.ndarray:
        """Relative KKT residual of each sample, ``(batch,)``, in Moreau's form (equal to
        the protocol's: the conversion is a permutation of rows): see the module docstring.
        ``Pv``, ``Av`` may have a leading dimension 1 (shared)."""
        Px = _segment_sum(Pv * x[:, self.P_indices], self.P_rows, self.n)
        Ax = _segment_sum(Av * x[:, self.A_indices], self.A_rows, self.rows)
        ATz = _segment_sum(Av * z[:, self.A_rows], self.A_indices, self.n)
        with np.errstate(invalid="ignore", over="ignore"):
            scale = np.maximum(1.0, np.maximum(_amax(q), _amax(Px)))
            stat = _amax(Px + q + ATz) / scale
            prim = _amax(Ax + s - b)
            nn = self.nonneg_rows
            if nn.size:
                prim = np.maximum(prim, np.max(-s[:, nn], axis=1, initial=0.0))
            prim = prim / np.maximum(1.0, _amax(b))
            dual = np.max(-z[:, nn], axis=1, initial=0.0) / np.maximum(1.0, _amax(z))
            obj = np.abs(0.5 * np.sum(x * Px, axis=1) + np.sum(q * x, axis=1))
            cr = self.cone_rows
            comp = np.abs(np.sum(s[:, cr] * z[:, cr], axis=1)) / np.maximum(1.0, obj)
            res = np.maximum(np.maximum(stat, prim), np.maximum(dual, comp))
        finite = (
            np.isfinite(x).all(axis=1) & np.isfinite(z).all(axis=1) & np.isfinite(s).all(axis=1)
        )
        return np.where(finite & np.isfinite(res), res, np.inf)


def _segment_sum(prod: np.ndarray, targets: np.ndarray, size: int) -> np.ndarray:
    """``out[b, t] = sum of prod[b, k] over k with targets[k] == t``, ``(batch, size)``."""
    batch = prod.shape[0]
    if prod.shape[1] == 0:
        return np.zeros((batch, size))
    idx = (np.arange(batch)[:, None] * size + targets[None, :]).ravel()
    return np.bincount(idx, weights=prod.ravel(), minlength=batch * size).reshape(batch, size)


def _rows(values: np.ndarray, k: int, size: int) -> np.ndarray:
    """``values`` (``(1 or k, size)``) as ``(k, size)`` (a broadcast view when shared)."""
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[None, :]
    if values.shape[1] != size:
        raise SolverError(
            f"moreau: an array of width {values.shape[1]} where {size} was expected",
            backend="moreau",
        )
    return values if values.shape[0] == k else np.broadcast_to(values, (k, size))


def _amax(a) -> np.ndarray:
    """Row-wise max of ``|a|`` (0 for empty rows)."""
    return np.max(np.abs(a), axis=1, initial=0.0)


def _is_tensor(x) -> bool:
    return hasattr(x, "detach") and hasattr(x, "device")


def _numpy(x, rows: int | None = None) -> np.ndarray | None:
    """A ProblemBatch field as a 2-D float64 NumPy array (torch tensors copied to CPU)."""
    if x is None:
        return None
    if _is_tensor(x):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    return x


def _structure_key(batch: ProblemBatch) -> tuple:
    """What identifies a structure: sizes, cones, and the exact pattern arrays."""
    pats = [pat for pat in (batch.P, batch.A, batch.G) if pat is not None]
    arrays = []
    for pat in pats:
        arrays += [np.asarray(pat.shape), pat.indptr, pat.indices]
    return (batch.n, batch.P is None, batch.dims, data_digest(arrays))


def _same_patterns(a: ProblemBatch, b: tuple) -> bool:
    """True when ``a``'s patterns equal the stored ones ``b`` (shapes and arrays)."""

    def same(x: SparsePattern | None, y: SparsePattern | None) -> bool:
        if x is None or y is None:
            return x is None and y is None
        return (
            tuple(x.shape) == tuple(y.shape)
            and np.array_equal(x.indptr, y.indptr)
            and np.array_equal(x.indices, y.indices)
        )

    return same(a.P, b[0]) and same(a.A, b[1]) and same(a.G, b[2])


def _pattern_copies(batch: ProblemBatch) -> tuple:
    """Private copies of a batch's patterns (what a cache entry is confirmed against: a
    caller writing into its arrays later cannot make a stale entry look like a hit)."""

    def copy(pat: SparsePattern | None):
        if pat is None:
            return None
        return SparsePattern(
            (pat.shape[0], pat.shape[1]), pat.indices.copy(), pat.indptr.copy(), pat.cols.copy()
        )

    return copy(batch.P), copy(batch.A), copy(batch.G)


def _pattern_values(M, shape) -> tuple[SparsePattern, np.ndarray]:
    """A sparse matrix as its canonical CSC pattern and values (duplicates summed, stored
    zeros kept), ``values`` shaped ``(1, nnz)``; the caller's arrays are not written."""
    M = sp.csc_matrix(M)
    if tuple(M.shape) != tuple(shape):
        raise SolverError(
            f"moreau: a matrix of shape {M.shape}, expected {shape}", backend="moreau"
        )
    if not M.has_canonical_format:
        M = M.copy()
        M.sum_duplicates()
    cols = np.repeat(np.arange(shape[1], dtype=np.int32), np.diff(M.indptr))
    pat = SparsePattern(tuple(shape), M.indices.astype(np.int32), M.indptr.astype(np.int64), cols)
    return pat, np.asarray(M.data, dtype=float)[None, :]


class MoreauBackend(BackendBase):
    name = "moreau"
    package = "moreau"
    distribution = "moreau"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp", "psd"}),
        quadratic_objective=True,
        warm_start=False,
        thread_safe=True,
        device=False,
    )

    #: cvxpylayers' common ``solver_args`` keys and this solver's settings for them
    #: (:mod:`ffo_core.solver_args`)
    solver_arg_names: ClassVar[dict] = {
        "eps": ("tol_gap_abs", "tol_gap_rel", "tol_feas"),
        "tol": ("tol_gap_abs", "tol_gap_rel", "tol_feas"),  # cvxpylayers' MOREAU key
        "max_iters": "max_iter",
    }

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.cache_size = self._pop_cache_size(DEFAULT_CACHE_SIZE)
        verify = self.settings.pop("verify_tol", DEFAULT_VERIFY_TOL)
        if isinstance(verify, bool) or not isinstance(verify, (int, float)) or not verify > 0:
            raise ConfigError(f"moreau: verify_tol must be a positive number, got {verify!r}")
        self.verify_tol = float(verify)
        given = {**DEFAULTS, **self.settings}
        self._top = {k: given[k] for k in TOP_SETTINGS if k in given}
        self._ipm = {k: given[k] for k in IPM_SETTINGS if k in given}
        self._active = {k: given[k] for k in ACTIVE_SET_SETTINGS if k in given}
        self._check_settings()
        self._local = threading.local()

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        for package in ("moreau", "moreau_cpu"):
            if importlib.util.find_spec(package) is None:
                return False, (
                    f"Python package {package!r} is not installed (pip install ffo[moreau])"
                )
        return True, ""

    def setting_names(self):
        return TOP_SETTINGS + IPM_SETTINGS + ACTIVE_SET_SETTINGS + ADAPTER_OPTIONS

    # -- settings --------------------------------------------------------------------------
    def _check_settings(self) -> None:
        """Build Moreau's settings objects once, so that a bad value is a ConfigError now
        (pydantic names the field and the rule), not at the first solve."""
        import moreau

        solver = self._top.get("solver")
        if str(solver).lower() not in ("auto", _IPM, _ACTIVE_SET):
            raise ConfigError(
                f"moreau setting solver={solver!r}: must be one of 'ipm', 'active_set', 'auto'"
            )
        self._top["solver"] = str(solver).lower()
        for make, values in (
            (moreau.Settings, {k: v for k, v in self._top.items() if k != "solver"}),
            (moreau.IPMSettings, self._ipm),
            (moreau.ActiveSetSettings, self._active),
        ):
            try:
                make(**values)
            except Exception as exc:  # pydantic.ValidationError (a ValueError)
                raise ConfigError(f"moreau settings {values}: {exc}") from exc
        device = self._top.get("device", "cpu")
        if device == "cuda" and not moreau.device_available("cuda"):
            raise ConfigError(
                "moreau setting device='cuda': Moreau's CUDA build is not available here "
                f"({moreau.device_error('cuda') or 'not installed'}; pip install "
                "moreau[cuda], Python >= 3.12)"
            )

    def _settings(self, method: str, batch_size: int):
        """``moreau.Settings`` for one method and batch size."""
        import moreau

        top = {k: v for k, v in self._top.items() if k != "solver"}
        if method == _ACTIVE_SET:
            top["device"] = "cpu"  # Moreau's active set is CPU-only
        return moreau.Settings(
            **top,
            solver=method,
            batch_size=batch_size,
            enable_grad=False,
            auto_tune=False,
            ipm_settings=moreau.IPMSettings(**self._ipm) if method == _IPM else None,
            active_set_settings=(
                moreau.ActiveSetSettings(**self._active) if method == _ACTIVE_SET else None
            ),
        )

    def _method(self, form: MoreauForm, Pv: np.ndarray) -> str:
        """The method that solves a structure: the IPM for cones other than zero and
        nonnegative and for problems without rows (Moreau's active set crashes on those);
        otherwise ``solver``'s choice, ``auto`` by Moreau's own rule with ``P != 0``
        sharpened to "every diagonal entry of ``P`` positive in every sample" (the active
        set is only ~1e-7 accurate on a singular ``P``, e.g. CVXPY's ``sum_squares(F @ y)``,
        which puts ``1/2 t't`` on auxiliary variables ``t = F y``)."""
        choice = self._top["solver"]
        if not form.qp_cones or form.rows == 0 or choice == _IPM:
            return _IPM
        if choice == _ACTIVE_SET:
            return _ACTIVE_SET
        quadratic = form.P_diag is not None and bool(np.all(Pv[:, form.P_diag] > 0))
        small = form.n <= 500 and form.rows <= max(500, 2 * form.n)
        cuda = self._top.get("device") == "cuda"
        return _ACTIVE_SET if quadratic and small and not cuda else _IPM

    # -- one problem -----------------------------------------------------------------------
    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term=None,
        *,
        warm_start=None,
    ) -> Solution:
        n = g.n
        Ppat, Pv = (None, None) if g.P is None else _pattern_values(g.P, (n, n))
        Apat, Av = _pattern_values(e.A, (e.p, n))
        Gpat, Gv = _pattern_values(h.G, (h.m, n))
        form = MoreauForm(n, Ppat, Apat, Gpat, h.dims)
        q = np.asarray(g.q, dtype=float)[None, :]
        if extra_linear_term is not None:
            q = q + np.asarray(extra_linear_term, dtype=float)[None, :]
        mP = form.P_values(Pv)
        mA = form.A_values(Av, Gv)
        mb = form.rhs(np.asarray(e.b, dtype=float)[None, :], np.asarray(h.h, dtype=float)[None, :])
        method = self._method(form, mP)
        x, z, s, raw, iters, seconds = self._solve_one(form, method, mP[0], mA[0], q[0], mb[0])
        out = self._finish(
            form, method, mP, mA, q, mb, x[None], z[None], s[None], [raw], [iters], None
        )
        if out.info[0].extra["method"] == method:
            out.info[0].solve_time = seconds
        return out.sample(0) if out.status[0].has_solution else _no_solution(out, 0)

    def _solve_one(self, form: MoreauForm, method: str, Pv, Av, q, b):
        """One problem through ``moreau.Solver``: ``x, z, s, raw status, iterations,
        solve time``."""
        import moreau

        P, A = form.matrices(Pv, Av)
        with _moreau_errors():
            solver = moreau.Solver(P, q, A, b, form.cones(), self._settings(method, 1))
            sol = solver.solve()
        info = solver.info
        return (
            np.array(sol.x, dtype=float),
            np.array(sol.z, dtype=float),
            np.array(sol.s, dtype=float),
            str(info.status),
            int(info.iterations),
            float(info.solve_time),
        )

    # -- a batch ---------------------------------------------------------------------------
    def solve_batch(self, batch: ProblemBatch, extra_linear_term=None) -> BatchSolution:
        """Every sample of ``batch`` in one ``moreau.CompiledSolver`` call (see the module
        docstring for the conversion, the cache and the active-set check).  Torch tensors
        in, torch tensors out (the input's dtype and device)."""
        tensor_like = next(
            (
                v
                for v in (batch.q, batch.P_values, batch.A_values, batch.G_values, batch.b)
                if _is_tensor(v)
            ),
            None,
        )
        B = int(batch.batch)
        if B <= 0:
            raise SolverError(f"moreau: a batch of {B} problems", backend="moreau")
        form = self._form(batch)
        q = _rows(_numpy(batch.q), B, batch.n)
        if extra_linear_term is not None:
            q = q + _rows(_numpy(extra_linear_term), B, batch.n)
        mP = form.P_values(None if batch.P is None else _numpy(batch.P_values))
        mA = form.A_values(_numpy(batch.A_values), _numpy(batch.G_values))
        mb = _rows(form.rhs(_numpy(batch.b), _numpy(batch.h)), B, form.rows)
        method = self._method(form, mP)
        if mP.shape[0] != mA.shape[0]:  # Moreau wants both shared or both per sample
            k = max(mP.shape[0], mA.shape[0])
            mP, mA = _rows(mP, k, form.nnzP), _rows(mA, k, form.nnzA)
        shared = mA.shape[0] == 1
        with _moreau_errors():
            solver = self._compiled(batch, form, method, B)
            solver.setup(
                mP[0] if shared else np.ascontiguousarray(mP),
                mA[0] if shared else np.ascontiguousarray(mA),
            )
            sol = solver.solve(np.ascontiguousarray(q), np.ascontiguousarray(mb))
        info = solver.info
        raw = [str(st) for st in info.status]
        iters = np.atleast_1d(np.asarray(info.iterations)).astype(int).tolist()
        if len(iters) == 1 and B > 1:
            iters = iters * B
        out = self._finish(
            form,
            method,
            mP,
            mA,
            q,
            mb,
            np.array(sol.x, dtype=float).reshape(B, form.n),
            np.array(sol.z, dtype=float).reshape(B, form.rows),
            np.array(sol.s, dtype=float).reshape(B, form.rows),
            raw,
            iters,
            float(info.solve_time),
        )
        return out if tensor_like is None else _as_tensors(out, tensor_like)

    def _cache(self) -> OrderedDict:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        return cache

    def _form(self, batch: ProblemBatch) -> MoreauForm:
        """The structure's :class:`MoreauForm`, from this thread's cache when the exact
        patterns were seen before."""
        key = ("form", *_structure_key(batch))
        cache = self._cache()
        hit = cache.get(key)
        if hit is not None and _same_patterns(batch, hit[0]):
            cache.move_to_end(key)
            return hit[1]
        form = MoreauForm(batch.n, batch.P, batch.A, batch.G, batch.dims)
        self._keep(key, (_pattern_copies(batch), form))
        return form

    def _compiled(self, batch: ProblemBatch, form: MoreauForm, method: str, B: int):
        """A ``moreau.CompiledSolver`` for this structure, method and batch size: this
        thread's cached one when the exact patterns match, else a new one."""
        import moreau

        key = ("solver", *_structure_key(batch), method, B)
        cache = self._cache()
        hit = cache.get(key)
        if hit is not None and _same_patterns(batch, hit[0]):
            cache.move_to_end(key)
            return hit[1]
        solver = moreau.CompiledSolver(
            n=form.n,
            m=form.rows,
            P_row_offsets=form.P_indptr,
            P_col_indices=form.P_indices,
            A_row_offsets=form.A_indptr,
            A_col_indices=form.A_indices,
            cones=form.cones(),
            settings=self._settings(method, B),
        )
        self._keep(key, (_pattern_copies(batch), solver))
        return solver

    def _keep(self, key, value) -> None:
        if self.cache_size <= 0:
            return
        cache = self._cache()
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > 2 * self.cache_size:  # a form and a solver per structure
            cache.popitem(last=False)

    # -- answers ---------------------------------------------------------------------------
    def _finish(
        self, form, method, mP, mA, q, mb, x, z, s, raw, iters, batch_time
    ) -> BatchSolution:
        """Moreau's batch answer in protocol terms: statuses mapped, accuracy measured,
        active-set answers checked (and solved again by the IPM where the check fails), and
        IPM breakdowns on LP/QP samples tried once more by the active set (kept only when
        that answer passes the check)."""
        B = x.shape[0]
        res = form.residual(mP, mA, q, mb, x, z, s)
        methods = [method] * B
        first_try: dict[int, str] = {}

        def retry(k: int, other: str) -> None:
            Pk, Ak = mP[0 if mP.shape[0] == 1 else k], mA[0 if mA.shape[0] == 1 else k]
            xk, zk, sk, rk, ik, _ = self._solve_one(form, other, Pk, Ak, q[k], mb[k])
            rk_res = form.residual(
                Pk[None], Ak[None], q[k : k + 1], mb[k : k + 1], xk[None], zk[None], sk[None]
            )[0]
            if other == _ACTIVE_SET and not (rk == "Solved" and rk_res <= self.verify_tol):
                return  # the active set did no better: keep the IPM's answer and status
            first_try[k] = f"{methods[k]} {raw[k]} (residual {res[k]:.1e})"
            x[k], z[k], s[k], raw[k], iters[k], methods[k], res[k] = (
                xk,
                zk,
                sk,
                rk,
                ik,
                other,
                rk_res,
            )

        for k in range(B):
            if method == _ACTIVE_SET and not (raw[k] == "Solved" and res[k] <= self.verify_tol):
                retry(k, _IPM)
            elif method == _IPM and raw[k] in _IPM_BREAKDOWN and form.qp_cones and form.rows:
                retry(k, _ACTIVE_SET)
        status = [STATUS_MAP.get(r, Status.NUMERICAL_ERROR) for r in raw]
        infos = []
        for k in range(B):
            finite = bool(np.isfinite(res[k]))
            if status[k].has_solution and not finite:
                status[k] = Status.NUMERICAL_ERROR
            acc = float(res[k]) if finite else None
            if acc is not None and form.curved:
                acc = float(np.sqrt(acc))
            extra: dict[str, Any] = {"method": methods[k]}
            if k in first_try:
                extra["first_try"] = first_try[k]
            if batch_time is not None:
                extra["batch_solve_time"] = batch_time
            infos.append(
                SolveInfo(
                    iterations=int(iters[k]),
                    solve_time=None,
                    accuracy=acc,
                    raw_status=raw[k],
                    extra=extra,
                )
            )
        nu, lam, slack = form.to_protocol(z, s)
        return BatchSolution(status, x, nu, lam, slack, infos)


@contextlib.contextmanager
def _moreau_errors():
    """Moreau's own complaints (``ValueError``/``RuntimeError`` from its input checks or a
    device) as :class:`SolverError` naming them."""
    try:
        yield
    except (ValueError, RuntimeError) as exc:
        raise SolverError(f"moreau: {type(exc).__name__}: {exc}", backend="moreau") from exc


def _no_solution(out: BatchSolution, k: int) -> Solution:
    return Solution(status=out.status[k], info=out.info[k])


def _as_tensors(out: BatchSolution, like) -> BatchSolution:
    """``out`` with its arrays as torch tensors of ``like``'s dtype and device."""
    import torch

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a)).to(dtype=like.dtype, device=like.device)

    return BatchSolution(
        out.status, t(out.primal), t(out.eq_dual), t(out.ineq_dual), t(out.slack), out.info
    )


@hookimpl
def ffo_register_backends(register):
    register(MoreauBackend)
