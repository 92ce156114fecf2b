"""The batched interior-point kernel of the ``pdipm`` backend (torch, dense; see
:mod:`ffo_backends.pdipm` for the user-facing description).

Size: one algorithm (equilibration, the homogeneous embedding's Newton systems, the
predictor-corrector step, termination and certificates) whose functions share the batch's
tensors and invariants; it reads top to bottom, and split it would restate them per file.

Imported lazily by :mod:`ffo_backends.pdipm` (it imports torch at module level).  Every
function works on a whole batch: tensors have a leading batch dimension, where a leading 1
means "shared by the batch" for data (never copied ``batch`` times) and iterates are always
``(batch, ...)``.

The method is a homogeneous self-dual embedding (HSDE) of

    minimize 1/2 y'Py + q'y   s.t.  A y = b,  G y + s = h,  s >= 0,

with Mehrotra's predictor-corrector, as in Clarabel's and ECOS's interior-point methods:
variables ``(x, nu, z, s, tau, kappa)`` with

    P x + A'nu + G'z + q tau = 0
    A x - b tau = 0,   G x + s - h tau = 0
    q'x + b'nu + h'z + x'Px / tau + kappa = 0,     s, z, tau, kappa >= 0,

whose solutions give the optimum ``(x, nu, z, s) / tau`` when ``tau > 0`` and a
certificate of infeasibility (``nu, z``) or unboundedness (``x``) when ``kappa > 0``.  Each
iteration factorises one KKT system per sample (see :class:`KKT`: a Schur complement when
``P`` is diagonal, else the KKT matrix with nearly active rows kept as unknowns) and solves
it for three right-hand sides (the embedding's constant one, the affine and the combined
direction), each refined against the unregularised system.  The data are equilibrated
first (Ruiz, one scaling common to the batch, so that shared matrices stay shared).
Samples whose inequality rows are all absent are equality-constrained QPs and are solved
directly by one refined KKT solve; those that do not come out optimal go through the
embedding (which detects infeasibility and unboundedness).  Statuses are decided per
sample, and samples leave the iterations as they finish.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace

import torch

# -- status codes (mapped to ffo_core.protocol.Status by the adapter) ----------------------
RUNNING = 0
OPTIMAL = 1
OPTIMAL_INACCURATE = 2
INFEASIBLE = 3
INFEASIBLE_INACCURATE = 4
UNBOUNDED = 5
UNBOUNDED_INACCURATE = 6
ITERATION_LIMIT = 7
TIME_LIMIT = 8
NUMERICAL_ERROR = 9

#: raw status words, one per code
RAW = {
    OPTIMAL: "solved",
    OPTIMAL_INACCURATE: "solved_inaccurate",
    INFEASIBLE: "primal_infeasible",
    INFEASIBLE_INACCURATE: "primal_infeasible_inaccurate",
    UNBOUNDED: "dual_infeasible",
    UNBOUNDED_INACCURATE: "dual_infeasible_inaccurate",
    ITERATION_LIMIT: "max_iterations",
    TIME_LIMIT: "max_time",
    NUMERICAL_ERROR: "numerical_error",
}

#: the "schur" factorisation (see :class:`KKT`) is used while ``p + k <= SCHUR_ROWS * n``
SCHUR_ROWS = 2

#: a row of G with more stored nonzeros than this (or than n/8) joins the dense part of
#: G' diag(d) G (one matrix product); sparser rows are summed entry pair by entry pair
PAIR_ROW_NNZ = 32
#: iterative refinement stops at relative residual eps**REFINE_EXPONENT (3e-13 in
#: float64, 3e-6 in float32), or when a step gains less than a factor REFINE_RATIO
REFINE_EXPONENT = 0.8
REFINE_RATIO = 5.0
#: ... and, inside the iterations, at this fraction of the sample's current accuracy (an
#: early Newton direction needs no more)
REFINE_FRACTION = 1e-3
#: a Cholesky-based solve whose refined relative residual stays above eps**FALLBACK_EXPONENT
#: (1.5e-8 in float64, 3.5e-4 in float32) is redone by LU
FALLBACK_EXPONENT = 0.5
#: a data matrix at most this full is multiplied through its nonzero entries, when the
#: dense product would take more than SPARSE_MIN_WORK multiply-adds per column
SPARSE_FILL = 0.3
SPARSE_MIN_WORK = 65536
#: Ruiz equilibration: each pass's row/column norms are clipped to this range
EQ_MIN, EQ_MAX = 1e-4, 1e4
#: ... and the passes stop early once every factor is within exp(EQ_DONE) of 1
EQ_DONE = 0.05
#: fraction of the way to the boundary of the cone that a step may go
STEP_FRACTION = 0.99
#: a constant direction whose certificate ratio is below SHARPEN_BELOW (but above the
#: tolerance) gets SHARPEN_STEPS steps of inverse iteration (see sharpened_ratios)
SHARPEN_BELOW = 1e-2
SHARPEN_STEPS = 2
#: steps shorter than this count as no progress; a sample stops after this many
#: iterations without progress (tiny steps, or no halving of its best residual ratio)
SMALL_STEP = 1e-8
STALL_ITERATIONS = 8


@dataclass(frozen=True)
class Options:
    tol: float
    tol_inaccurate: float
    tol_infeas: float
    max_iter: int
    refine: int
    reg: float
    equilibrate_iter: int
    time_limit: float | None
    max_memory: float = math.inf  # bytes


class TooLarge(Exception):
    """The batch's factorisations would need more than ``Options.max_memory``."""

    def __init__(self, what: str, need: float) -> None:
        super().__init__(f"{what}: about {need / 2**30:.1f} GiB")
        self.what, self.need = what, need


def check_memory(data: Data, opts: Options) -> None:
    """Raise :class:`TooLarge` when the iterations' dense matrices (an estimate, by the
    factorisation the structure allows: see :class:`KKT`) exceed ``opts.max_memory``."""
    B, n, p, m = data.batch, data.n, data.p, data.m
    nz = (data.G != 0).any(0) if m else data.G.new_zeros(0, n, dtype=torch.bool)
    row_nnz = nz.sum(1)
    multi = int((row_nnz > 1).sum())
    diag_P = data.P is None or not bool(
        (data.P - torch.diag_embed(torch.diagonal(data.P, dim1=1, dim2=2)) != 0).any()
    )
    if diag_P and p + multi <= SCHUR_ROWS * n:
        k = p + multi
        matrices = 3 * k * k + k * n  # S, its factor, C diag(1/h)
        what = f"the {k} x {k} Schur complements of a batch of {B}"
    else:
        N = n + p + min(multi, n)
        matrices = 3 * n * n + 2 * N * N  # H, its copy, the KKT matrix and its LU factors
        what = f"the {N} x {N} KKT matrices of a batch of {B}"
    vectors = 80 * (n + m + p) + 3 * int(nz.sum())  # iterates, residuals, sparse products
    need = data.q.element_size() * B * (matrices + vectors)
    if need > opts.max_memory:
        raise TooLarge(what, need)


@dataclass
class Data:
    """A batch as dense tensors; a leading dimension of 1 is shared by the batch."""

    batch: int
    P: torch.Tensor | None  # (1|B, n, n), symmetric
    q: torch.Tensor  # (1|B, n)
    A: torch.Tensor  # (1|B, p, n)
    b: torch.Tensor  # (1|B, p)
    G: torch.Tensor  # (1|B, m, n)
    h: torch.Tensor  # (1|B, m)

    @property
    def n(self) -> int:
        return self.q.shape[1]

    @property
    def p(self) -> int:
        return self.A.shape[1]

    @property
    def m(self) -> int:
        return self.G.shape[1]

    def take(self, idx: torch.Tensor) -> Data:
        """The samples ``idx`` (shared tensors stay shared)."""
        P, q, A, b = (
            None if t is None else _take(t, idx) for t in (self.P, self.q, self.A, self.b)
        )
        return Data(int(idx.numel()), P, q, A, b, _take(self.G, idx), _take(self.h, idx))


@dataclass
class Result:
    """Per-sample answers in the protocol's conventions (unscaled)."""

    status: torch.Tensor  # (B,) int64 codes
    iterations: torch.Tensor  # (B,) int64
    accuracy: torch.Tensor  # (B,) float
    y: torch.Tensor  # (B, n)
    nu: torch.Tensor  # (B, p)
    lam: torch.Tensor  # (B, m)
    s: torch.Tensor  # (B, m)
    notes: dict  # sample -> text added to its raw status


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t if t.shape[0] == 1 else t.index_select(0, idx)


def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


def _amax(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Infinity norm along ``dim`` (0 for an empty dimension)."""
    if t.shape[dim] == 0:
        shape = list(t.shape)
        del shape[dim]
        return t.new_zeros(shape)
    return t.abs().amax(dim)


# -- products with possibly shared matrices -------------------------------------------------


def mm(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M X`` for ``M`` (1|B, r, c), ``X`` (B, c, k) -> (B, r, k); a shared ``M`` is one
    matrix product for the whole batch."""
    B, c, k = X.shape
    if M.shape[0] == 1:
        r = M.shape[1]
        return (X.transpose(1, 2).reshape(B * k, c) @ M[0].T).reshape(B, k, r).transpose(1, 2)
    return torch.bmm(M, X)


def mtm(M: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``M' Y`` for ``M`` (1|B, r, c), ``Y`` (B, r, k) -> (B, c, k)."""
    B, r, k = Y.shape
    if M.shape[0] == 1:
        c = M.shape[2]
        return (Y.transpose(1, 2).reshape(B * k, r) @ M[0]).reshape(B, k, c).transpose(1, 2)
    return torch.bmm(M.transpose(1, 2), Y)


def mv(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M x`` for ``M`` (1|B, r, c), ``x`` (B, c) -> (B, r)."""
    if M.shape[0] == 1:
        return x @ M[0].T
    return torch.bmm(M, x.unsqueeze(2)).squeeze(2)


def mtv(M: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``M' y`` for ``M`` (1|B, r, c), ``y`` (B, r) -> (B, c)."""
    if M.shape[0] == 1:
        return y @ M[0]
    return torch.bmm(y.unsqueeze(1), M).squeeze(1)


@dataclass
class Op:
    """A data matrix ``(1|B, r, c)`` for products with batches of vectors: by matrix
    products when it is dense; when at most a fraction :data:`SPARSE_FILL` of it is filled
    (bounds, one-hot constraints), by one sparse product with the block-diagonal matrix of
    the batch's samples (torch CSR, built on first use)."""

    M: torch.Tensor
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    vals: torch.Tensor | None = None  # (1|B, nnz) over the union of the batch's nonzeros
    _blocks: tuple | None = None  # (batch, S, S') block-diagonal sparse matrices

    @classmethod
    def of(cls, M: torch.Tensor) -> Op:
        r, c = M.shape[1], M.shape[2]
        nz = (M != 0).any(0)
        if r * c == 0 or int(nz.sum()) > SPARSE_FILL * r * c:
            return cls(M)
        rows, cols = torch.nonzero(nz, as_tuple=True)
        return cls(M, rows, cols, M[:, rows, cols])

    def take(self, idx: torch.Tensor) -> Op:
        vals = None if self.vals is None else _take(self.vals, idx)
        return Op(_take(self.M, idx), self.rows, self.cols, vals)

    def _block(self, batch: int, transpose: bool) -> torch.Tensor:
        if self._blocks is None or self._blocks[0] != batch:
            r, c = self.M.shape[1], self.M.shape[2]
            dev = self.vals.device
            k = torch.arange(batch, device=dev)[:, None]
            rows = (self.rows[None] + r * k).flatten()
            cols = (self.cols[None] + c * k).flatten()
            vals = self.vals.expand(batch, -1).flatten()
            blocks = []
            for i, j, shape in (
                (rows, cols, (batch * r, batch * c)),
                (cols, rows, (batch * c, batch * r)),
            ):
                coo = torch.sparse_coo_tensor(
                    torch.stack([i, j]), vals, shape, check_invariants=False
                ).coalesce()
                with warnings.catch_warnings():  # "sparse CSR support is in beta"
                    warnings.simplefilter("ignore", UserWarning)
                    blocks.append(coo.to_sparse_csr())
            self._blocks = (batch, *blocks)
        return self._blocks[2 if transpose else 1]

    def _sparse(self, X: torch.Tensor, transpose: bool) -> torch.Tensor:
        B, _, k = X.shape
        out = self.M.shape[2 if transpose else 1]
        if self.rows.numel() == 0:
            return X.new_zeros(B, out, k)
        S = self._block(B, transpose)
        return (S @ X.reshape(-1, k)).reshape(B, out, k)

    def _use_sparse(self, batch: int) -> bool:
        return self.rows is not None and batch * self.M.shape[1] * self.M.shape[2] > SPARSE_MIN_WORK

    def mm(self, X: torch.Tensor) -> torch.Tensor:
        """``M X``, ``X`` (B, c, k) -> (B, r, k)."""
        return self._sparse(X, False) if self._use_sparse(X.shape[0]) else mm(self.M, X)

    def mtm(self, Y: torch.Tensor) -> torch.Tensor:
        """``M' Y``, ``Y`` (B, r, k) -> (B, c, k)."""
        return self._sparse(Y, True) if self._use_sparse(Y.shape[0]) else mtm(self.M, Y)

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_sparse(x.shape[0]):
            return self._sparse(x[:, :, None], False)[:, :, 0]
        return mv(self.M, x)

    def mtv(self, y: torch.Tensor) -> torch.Tensor:
        if self._use_sparse(y.shape[0]):
            return self._sparse(y[:, :, None], True)[:, :, 0]
        return mtv(self.M, y)


# -- equilibration ---------------------------------------------------------------------------


@dataclass
class Scaled:
    """The equilibrated problem ``P^ = c D P D``, ``q^ = c D q``, ``A^ = Ea A D``,
    ``b^ = Ea b``, ``G^ = Eg G D``, ``h^ = Eg h`` (``D``, ``Ea``, ``Eg`` positive diagonal,
    ``c > 0``; common to the batch), with what the iterations need about it."""

    batch: int
    P: torch.Tensor | None
    q: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    D: torch.Tensor  # (n,)
    Ea: torch.Tensor  # (p,)
    Eg: torch.Tensor  # (m,)
    c: torch.Tensor  # 0-dim
    mg: torch.Tensor  # (1|B, m) 1.0 on present inequality rows, 0.0 on absent ones
    qn: torch.Tensor  # (1|B,) ||q||_inf of the unscaled data
    bn: torch.Tensor
    hn: torch.Tensor
    gtdg: GtDG
    Pdiag: torch.Tensor | None  # (1|B, n) P's diagonal when P is diagonal (or zero), else None
    Pop: Op | None  # P, A, G for products
    Aop: Op
    Gop: Op
    multi_rows: torch.Tensor  # rows of G with more than one nonzero
    C: torch.Tensor  # (1|B, p + k, n): [A; G[multi_rows]]
    Cop: Op
    schur_ok: bool  # p + k <= SCHUR_ROWS n: "schur" is the cheaper one (if P is diagonal)

    @property
    def n(self) -> int:
        return self.q.shape[1]

    @property
    def p(self) -> int:
        return self.A.shape[1]

    @property
    def m(self) -> int:
        return self.G.shape[1]

    def take(self, idx: torch.Tensor) -> Scaled:
        return replace(
            self,
            batch=int(idx.numel()),
            P=None if self.P is None else _take(self.P, idx),
            Pdiag=None if self.Pdiag is None else _take(self.Pdiag, idx),
            Pop=None if self.Pop is None else self.Pop.take(idx),
            Aop=self.Aop.take(idx),
            Gop=self.Gop.take(idx),
            C=_take(self.C, idx),
            Cop=self.Cop.take(idx),
            q=_take(self.q, idx),
            A=_take(self.A, idx),
            b=_take(self.b, idx),
            G=_take(self.G, idx),
            h=_take(self.h, idx),
            mg=_take(self.mg, idx),
            qn=_take(self.qn, idx),
            bn=_take(self.bn, idx),
            hn=_take(self.hn, idx),
            gtdg=self.gtdg.take(idx),
        )


def equilibrate(data: Data, mg: torch.Tensor, iters: int) -> Scaled:
    """Ruiz equilibration of ``[P A' G'; A 0 0; G 0 0]`` (infinity norms, ``iters``
    passes; the norms are maxima over the batch, so one scaling serves every sample), then
    a cost scaling ``c`` (Clarabel's: one over the larger of ``P``'s mean column norm and
    ``||q||_inf``)."""
    P, A, G = data.P, data.A, data.G
    n, p, m = data.n, data.p, data.m
    ref = data.q
    D = ref.new_ones(n)
    Ea = ref.new_ones(p)
    Eg = ref.new_ones(m)

    def factor(norms: torch.Tensor) -> torch.Tensor:
        return torch.where(norms > 0, 1.0 / norms.clamp(EQ_MIN, EQ_MAX).sqrt(), 1.0)

    for _ in range(iters):
        cols = ref.new_zeros(n)
        if P is not None:
            cols = torch.maximum(cols, P.abs().amax(dim=(0, 1)))
        if p:
            cols = torch.maximum(cols, A.abs().amax(dim=(0, 1)))
        if m:
            cols = torch.maximum(cols, G.abs().amax(dim=(0, 1)))
        dc = factor(cols)
        da = factor(A.abs().amax(dim=(0, 2))) if p else Ea
        dg = factor(G.abs().amax(dim=(0, 2))) if m else Eg
        worst = torch.cat([dc, da, dg]).log().abs().amax() if n + p + m else 0.0
        if float(worst) < EQ_DONE:  # every norm within a few percent of 1: done
            break
        if P is not None:
            P = P * dc[:, None] * dc[None, :]
        if p:
            A = A * da[:, None] * dc[None, :]
        if m:
            G = G * dg[:, None] * dc[None, :]
        D = D * dc
        if p:
            Ea = Ea * da
        if m:
            Eg = Eg * dg
    q = data.q * D
    scale = _amax(q).amax()
    if P is not None:
        scale = torch.maximum(scale, P.abs().amax(dim=1).mean(dim=1).amax())
    c = 1.0 / scale.clamp(EQ_MIN, EQ_MAX)
    if P is not None:
        P = c * P
    if P is None:
        Pdiag = q.new_zeros(1, n)
    else:
        Pdiag = torch.diagonal(P, dim1=1, dim2=2)
        off = P - torch.diag_embed(Pdiag)
        Pdiag = Pdiag if not bool((off != 0).any()) else None
    gtdg = GtDG.of(G)
    multi_rows = torch.nonzero(gtdg.multi).flatten()
    if A.shape[0] != G.shape[0] and p and m:
        C = torch.cat([_per_sample(A, data.batch), _per_sample(G[:, multi_rows], data.batch)], 1)
    else:
        C = torch.cat([A, G[:, multi_rows]], 1)
    return Scaled(
        batch=data.batch,
        P=P,
        q=c * q,
        A=A,
        b=data.b * Ea,
        G=G,
        h=data.h * Eg,
        D=D,
        Ea=Ea,
        Eg=Eg,
        c=c,
        mg=mg,
        qn=_amax(data.q),
        bn=_amax(data.b),
        hn=_amax(data.h * mg),
        gtdg=gtdg,
        Pdiag=Pdiag,
        Pop=None if P is None else Op.of(P),
        Aop=Op.of(A),
        Gop=Op.of(G),
        multi_rows=multi_rows,
        C=C,
        Cop=Op.of(C),
        schur_ok=C.shape[1] <= SCHUR_ROWS * n,
    )


# -- G' diag(d) G ---------------------------------------------------------------------------


@dataclass
class GtDG:
    """``G' diag(d) G`` for a fixed ``G``: rows with few nonzeros (in any sample) summed
    by entry pairs into a flat ``(n*n)`` accumulator, the others by one matrix product."""

    n: int
    pair_rows: torch.Tensor  # (npairs,) row of each entry pair
    pair_pos: torch.Tensor  # (npairs,) flat position i*n + j in the n x n result
    pair_vals: torch.Tensor  # (1|B, npairs) G[r, i] * G[r, j]
    dense_rows: torch.Tensor  # (md,) rows handled by the matrix product
    Gd: torch.Tensor  # (1|B, md, n)
    multi: torch.Tensor  # (m,) bool: rows with more than one nonzero (in some sample)
    diagonal: bool  # no such row: G' diag(d) G is diagonal

    @classmethod
    def of(cls, G: torch.Tensor) -> GtDG:
        n, m = G.shape[2], G.shape[1]
        dev = G.device
        nz = (G != 0).any(dim=0)  # (m, n)
        counts = nz.sum(dim=1)
        limit = max(4, min(PAIR_ROW_NNZ, n // 8))
        sparse = counts <= limit
        dense_rows = torch.nonzero(~sparse & (counts > 0)).flatten()
        rows, cols = torch.nonzero(nz & sparse[:, None], as_tuple=True)  # row-major order
        if rows.numel():
            cnt = counts[rows]  # entries in each entry's row
            first = torch.cumsum(counts * sparse, 0) - counts * sparse  # row start in `rows`
            k1 = torch.repeat_interleave(torch.arange(rows.numel(), device=dev), cnt)
            seg = torch.cumsum(cnt, 0) - cnt
            within = torch.arange(k1.numel(), device=dev) - torch.repeat_interleave(seg, cnt)
            k2 = first[rows[k1]] + within
            pair_rows = rows[k1]
            pair_pos = cols[k1] * n + cols[k2]
            flat = G.reshape(G.shape[0], m * n)
            vals = flat[:, rows * n + cols]
            pair_vals = vals[:, k1] * vals[:, k2]
        else:
            pair_rows = pair_pos = torch.zeros(0, dtype=torch.long, device=dev)
            pair_vals = G.new_zeros(G.shape[0], 0)
        multi = counts > 1
        return cls(
            n,
            pair_rows,
            pair_pos,
            pair_vals,
            dense_rows,
            G[:, dense_rows, :],
            multi,
            not bool(multi.any()),
        )

    def take(self, idx: torch.Tensor) -> GtDG:
        return replace(self, pair_vals=_take(self.pair_vals, idx), Gd=_take(self.Gd, idx))

    def diag(self, d: torch.Tensor) -> torch.Tensor:
        """The diagonal of ``G' diag(d) G`` (``(B, n)``) when it is :attr:`diagonal`."""
        out = d.new_zeros(d.shape[0], self.n)
        if self.pair_rows.numel():
            out.index_add_(1, self.pair_pos // (self.n + 1), d[:, self.pair_rows] * self.pair_vals)
        return out

    def add_to(self, H: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``H + G' diag(d) G`` (``H`` (B, n, n), modified in place and returned)."""
        B, n = H.shape[0], self.n
        if self.pair_rows.numel():
            flat = H.view(B, n * n)
            flat.index_add_(1, self.pair_pos, d[:, self.pair_rows] * self.pair_vals)
        if self.dense_rows.numel():
            dd = d[:, self.dense_rows]
            Gd = self.Gd
            if Gd.shape[0] == 1:
                H += (Gd[0].T * dd[:, None, :]) @ Gd[0]
            else:
                H += torch.bmm(Gd.transpose(1, 2) * dd[:, None, :], Gd)
        return H


# -- the KKT system --------------------------------------------------------------------------


def _chol_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(L L')^{-1} r`` by two triangular solves (faster than ``cholesky_solve`` on the
    CPU for small batched matrices)."""
    y = torch.linalg.solve_triangular(L, r, upper=False)
    return torch.linalg.solve_triangular(L.transpose(1, 2), y, upper=True)


class KKT:
    """One factorisation of the KKT system of the scaled batch ``sc`` at the point with
    inequality weights ``d = z/s`` and ``W = s/z`` (both 0 on absent rows):

        P dx + A'dnu + G'dz = rx,   A dx = re,   G dx - W dz = rg   (present rows; dz = 0
                                                                     on absent ones)

    Two factorisations, the cheaper one where it applies:

    ``"schur"``, when ``P`` is diagonal and the rows of ``G`` with more than one nonzero
    ("multi" rows, ``k``) and the equalities are at most ``SCHUR_ROWS * n``: bound rows are
    eliminated into the diagonal ``H = P + G_B' diag(d_B) G_B``, the others stay as unknowns, and
    ``C = [A; G_M]`` gives the positive definite ``(p + k) x (p + k)``

        S = C (H + rho I)^-1 C' + diag(rho, W_M + rho),

    factorised by Cholesky (nothing at all when ``p + k = 0``).  With ``p + k > n`` (a ghost
    problem at a degenerate vertex: more locked rows than unknowns) ``C`` has more rows than
    columns and only ``rho`` makes ``S`` definite; the refinement against ``rho = 0`` below
    recovers the accuracy, and a solve it cannot refine goes to the LU factorisation.  Up
    to ``p + k = 2n`` the Schur complement is still the cheaper factorisation (its order is
    at most ``2n`` against the KKT matrix's ``3n``).  Keeping ``G_M``'s
    multipliers as unknowns means a nearly active row's ``dz`` (small ``W``) is never a
    tiny difference times a huge ``d``; a bound row's elimination is a diagonal scaling,
    harmless.

    ``"lu"`` (and ``"chol"``) otherwise: rows are eliminated except multi rows with
    ``d > theta`` (nearly active), kept as unknowns for the same reason (``k`` at most per
    sample, padded):

        [H + rho I   A'         G_K'          ]      H = P + G_E' diag(d_E) G_E
        [A          -rho I      0             ]
        [G_K         0         -(W_K + rho) I ]

    factorised by LU with partial pivoting, or by Cholesky of its first block when it is
    the whole matrix (``p = k = 0``).

    Every solve is refined in the full space against ``rho = 0``; a Cholesky
    factorisation that fails, or a refined solve that stays inaccurate, hands the solve
    to the LU factorisation of the same system."""

    def __init__(
        self, sc: Scaled, d, W, opts: Options, force_lu: bool = False, prox: float = 0.0
    ) -> None:
        B, n, p, m = d.shape[0], sc.n, sc.p, sc.m
        reg = self.reg = opts.reg
        self.sc, self.d, self.W, self.opts, self.prox = sc, d, W, opts, prox
        self.k, self.dE = 0, d
        self.fallback: KKT | None = None
        if sc.Pdiag is not None and sc.schur_ok and not force_lu:
            single = sc.mg * ~sc.gtdg.multi if m else sc.mg
            self.dE = d * single if m else d
            hd = sc.Pdiag + sc.gtdg.diag(self.dE) if m else sc.Pdiag.expand(B, n)
            self.hd = hd + (reg + prox)
            self.mode = "schur"
            kc = sc.C.shape[1]
            if kc == 0:
                return
            C = sc.C
            Ct = C[0].T if C.shape[0] == 1 else C.transpose(1, 2)
            S = torch.matmul(C * (1.0 / self.hd)[:, None, :], Ct)
            diag = S.diagonal(dim1=1, dim2=2)
            diag[:, :p] += reg
            if kc > p:
                present = _per_sample(sc.mg, B)[:, sc.multi_rows] > 0
                WM = W[:, sc.multi_rows]
                diag[:, p:] += torch.where(present, WM + reg, 1.0)
            L, info = torch.linalg.cholesky_ex(S)
            if bool((info == 0).all()):
                self.chol = L
                return
            force_lu = True
        self._factor_lu(B, n, p, m, reg, force_lu)

    def _factor_lu(self, B, n, p, m, reg, lu_only):
        sc, d, W = self.sc, self.d, self.W
        self.dE = d
        if m:
            theta = torch.finfo(d.dtype).eps ** -0.25
            kept = (d > theta) & sc.gtdg.multi
            k = int(kept.sum(1).max())
            if k:
                order = torch.argsort(kept.to(torch.int32), dim=1, descending=True, stable=True)
                self.order = order[:, :k]
                self.valid = kept.gather(1, self.order)
                self.dE = torch.where(kept, 0.0, d)
                self.k = k
        k = self.k
        if sc.P is not None:
            H = _per_sample(sc.P, B).clone(memory_format=torch.contiguous_format)
        else:
            H = d.new_zeros(B, n, n)
        H = sc.gtdg.add_to(H, self.dE)
        H.diagonal(dim1=1, dim2=2).add_(reg + self.prox)
        if p == 0 and k == 0 and not lu_only:
            L, info = torch.linalg.cholesky_ex(H)
            if bool((info == 0).all()):
                self.mode, self.chol = "chol", L
                return
        N = n + p + k
        K = d.new_empty(B, N, N)
        K[:, :n, :n] = H
        if p:
            A = _per_sample(sc.A, B)
            K[:, :n, n : n + p] = A.transpose(1, 2)
            K[:, n : n + p, :n] = A
            K[:, n : n + p, n:] = 0.0
            K[:, n : n + p, n : n + p].diagonal(dim1=1, dim2=2).fill_(-reg)
        if k:
            G = sc.G
            if G.shape[0] == 1:
                GK = G[0][self.order]
            else:
                GK = torch.gather(G, 1, self.order[:, :, None].expand(B, k, n))
            GK = GK * self.valid[:, :, None]
            K[:, n + p :, :n] = GK
            K[:, :n, n + p :] = GK.transpose(1, 2)
            K[:, n + p :, n:] = 0.0
            WK = W.gather(1, self.order)
            K[:, n + p :, n + p :].diagonal(dim1=1, dim2=2).copy_(
                torch.where(self.valid, -(WK + reg), -1.0)
            )
        LU, piv, _ = torch.linalg.lu_factor_ex(K)
        self.mode, self.lu = "lu", (LU, piv)

    def _core(self, rx, re, rg):
        """The regularised solve (no refinement); right-hand sides with ``c`` columns."""
        sc, n, p = self.sc, self.sc.n, self.sc.p
        r1 = rx + sc.Gop.mtm(self.dE[:, :, None] * rg) if sc.m else rx
        if self.mode == "schur":
            hd = self.hd[:, :, None]
            if sc.C.shape[1] == 0:
                dx, dnu, w = r1 / hd, re, None
            else:
                r2 = torch.cat([re, rg[:, sc.multi_rows]], dim=1) if sc.C.shape[1] > p else re
                w = _chol_solve(self.chol, sc.Cop.mm(r1 / hd) - r2)
                dx = (r1 - sc.Cop.mtm(w)) / hd
                dnu = w[:, :p]
            dz = self.dE[:, :, None] * (sc.Gop.mm(dx) - rg) if sc.m else rg
            if w is not None and sc.C.shape[1] > p:
                present = (_per_sample(sc.mg, dz.shape[0])[:, sc.multi_rows] > 0)[:, :, None]
                dz[:, sc.multi_rows] = torch.where(present, w[:, p:], 0.0)
            return dx, dnu, dz
        dzK = None
        if self.mode == "chol":
            dx, dnu = _chol_solve(self.chol, r1), re[:, :0]
        else:
            parts = [r1, re]
            if self.k:
                cols = rg.shape[2]
                idx = self.order[:, :, None].expand(-1, -1, cols)
                parts.append(torch.gather(rg, 1, idx) * self.valid[:, :, None])
            sol = torch.linalg.lu_solve(*self.lu, torch.cat(parts, dim=1))
            dx, dnu, dzK = sol[:, :n], sol[:, n : n + p], sol[:, n + p :]
        dz = self.dE[:, :, None] * (sc.Gop.mm(dx) - rg)
        if dzK is not None and self.k:
            dz.scatter_add_(1, idx, dzK * self.valid[:, :, None])
        return dx, dnu, dz

    def _residual(self, rx, re, rg, dx, dnu, dz):
        sc = self.sc
        res_x = rx - sc.Aop.mtm(dnu) - sc.Gop.mtm(dz)
        if self.prox:
            res_x = res_x - self.prox * dx
        if sc.Pop is not None:
            res_x = res_x - sc.Pop.mm(dx)
        res_e = re - sc.Aop.mm(dx)
        res_g = (rg - sc.Gop.mm(dx) + self.W[:, :, None] * dz) * sc.mg[:, :, None]
        err = torch.stack([_amax(res_x, 1), _amax(res_e, 1), _amax(res_g, 1)]).amax(0)
        return (res_x, res_e, res_g), err

    def solve(self, rx: torch.Tensor, re: torch.Tensor, rg: torch.Tensor, target=None):
        """``(dx, dnu, dz)`` for right-hand sides with ``c`` columns: ``rx`` (B, n, c),
        ``re`` (B, p, c), ``rg`` (B, m, c) (0 on absent rows).  ``target`` ``(B,)``: the
        relative residual each sample needs (refinement stops there; default: as
        accurate as refinement gets)."""
        if self.fallback is not None:
            return self.fallback.solve(rx, re, rg, target)
        eps = torch.finfo(rx.dtype).eps
        floor = eps**REFINE_EXPONENT
        if target is not None:
            floor = target.clamp(min=floor)[:, None]
        sol, err = self._refined(rx, re, rg, floor)
        if self.mode != "lu" and bool(
            (err > torch.clamp(torch.as_tensor(floor), min=eps**FALLBACK_EXPONENT)).any()
        ):
            self.fallback = KKT(self.sc, self.d, self.W, self.opts, True, self.prox)
            return self.fallback.solve(rx, re, rg, target)
        return sol

    def _refined(self, rx, re, rg, floor):
        sol = self._core(rx, re, rg)
        scale = 1.0 + torch.stack([_amax(rx, 1), _amax(re, 1), _amax(rg, 1)]).amax(0)
        res, err = self._residual(rx, re, rg, *sol)
        err = err / scale
        for _ in range(self.opts.refine):
            if bool((err <= floor).all()):
                break
            corr = self._core(*res)
            cand = tuple(a + b for a, b in zip(sol, corr))
            cres, cerr = self._residual(rx, re, rg, *cand)
            cerr = cerr / scale
            better = cerr < err  # (B, c): keep the better of the two, per column
            keep = better[:, None, :]
            sol = tuple(torch.where(keep, a, b) for a, b in zip(cand, sol))
            if not bool((cerr * REFINE_RATIO < err).any()):  # too little left to gain
                err = torch.minimum(err, cerr)
                break
            res = tuple(torch.where(keep, a, b) for a, b in zip(cres, res))
            err = torch.where(better, cerr, err)
        return sol, err


# -- the iterations --------------------------------------------------------------------------


@dataclass
class State:
    x: torch.Tensor
    nu: torch.Tensor
    z: torch.Tensor
    s: torch.Tensor
    tau: torch.Tensor
    kappa: torch.Tensor

    def take(self, idx: torch.Tensor) -> State:
        return State(*(t.index_select(0, idx) for t in self.fields()))

    def put(self, idx: torch.Tensor, other: State) -> None:
        for mine, theirs in zip(self.fields(), other.fields()):
            mine.index_copy_(0, idx, theirs)

    def fields(self):
        return (self.x, self.nu, self.z, self.s, self.tau, self.kappa)


@dataclass
class Measures:
    rx: torch.Tensor
    re: torch.Tensor
    rg: torch.Tensor
    rtau: torch.Tensor
    Px: torch.Tensor
    mu: torch.Tensor
    accuracy: torch.Tensor  # max of the relative residuals and gaps, unscaled
    infeas: torch.Tensor  # ||A'nu + G'z|| / -(b'nu + h'z) (inf unless b'nu + h'z < 0)
    unbdd: torch.Tensor  # max(||Px||, ||Ax||, ||(Gx)+||) / -q'x (inf unless q'x < 0)


def measure(sc: Scaled, st: State) -> Measures:
    """Residuals of the embedding, the unscaled relative residuals of ``st / tau``, and the
    certificate ratios (in the equilibrated space, where the data are of order 1)."""
    x, nu, z, s, tau, kappa = st.fields()
    mg = sc.mg
    Px = sc.Pop.mv(x) if sc.Pop is not None else torch.zeros_like(x)
    Ax, Gx = sc.Aop.mv(x), sc.Gop.mv(x)
    Atnu, Gtz = sc.Aop.mtv(nu), sc.Gop.mtv(z)
    q_x = (sc.q * x).sum(1)
    xPx = (x * Px).sum(1)
    bz = (sc.b * nu).sum(1) + (sc.h * z).sum(1)
    rx = Px + Atnu + Gtz + sc.q * tau[:, None]
    re = Ax - sc.b * tau[:, None]
    rg = (Gx + s - sc.h * tau[:, None]) * mg
    rtau = q_x + bz + xPx / tau + kappa
    sz = (s * z * mg).sum(1)
    mu = (sz + tau * kappa) / (mg.sum(1) + 1.0)

    # unscaled relative residuals (the conformance suite's measures)
    c, t = sc.c, tau[:, None]
    cD = c * sc.D * t
    dual = _amax(rx / cD) / (
        1.0
        + torch.stack(
            [sc.qn.expand_as(q_x), _amax(Px / cD), _amax(Atnu / cD), _amax(Gtz / cD)]
        ).amax(0)
    )
    Et = sc.Ea * t
    prim_e = _amax(re / Et) / (1.0 + torch.maximum(sc.bn.expand_as(q_x), _amax(Ax / Et)))
    Gt = sc.Eg * t
    prim_g = _amax(rg / Gt) / (
        1.0 + torch.stack([sc.hn.expand_as(q_x), _amax(Gx * mg / Gt), _amax(s * mg / Gt)]).amax(0)
    )
    pobj = (0.5 * xPx / tau**2 + q_x / tau) / c
    comp = (sz / tau**2 / c) / (1.0 + pobj.abs())
    gap = ((xPx / tau**2 + (q_x + bz) / tau) / c).abs() / (1.0 + pobj.abs())
    accuracy = torch.stack([dual, prim_e, prim_g, comp, gap]).amax(0)
    accuracy = torch.where(torch.isnan(accuracy), torch.inf, accuracy)

    infeas, unbdd = ratios(sc, q_x, bz, Px, Ax, Gx, Atnu + Gtz)
    return Measures(rx, re, rg, rtau, Px, mu, accuracy, infeas, unbdd)


def ratios(sc: Scaled, q_x, bz, Px, Ax, Gx, AGtz):
    """The certificate ratios of a direction ``x`` and a dual direction ``(nu, z)``
    (``z >= 0``): ``||A'nu + G'z|| / -(b'nu + h'z)`` and
    ``max(||Px||, ||Ax||, ||(Gx)+||) / -q'x`` (inf where the denominator is not positive).
    Homogeneous, so any candidate may be tested; a ratio ``r`` means every primal
    (resp. dual) feasible point has norm at least ``1/r``."""
    inf = torch.full_like(q_x, torch.inf)
    infeas = torch.where(bz < 0, _amax(AGtz) / -bz, inf)
    worst = torch.stack([_amax(Px), _amax(Ax), _amax((Gx * sc.mg).clamp(min=0))]).amax(0)
    unbdd = torch.where(q_x < 0, worst / -q_x, inf)
    return infeas, unbdd


def direction_ratios(sc: Scaled, x1, nu1, z1):
    """:func:`ratios` of the embedding's constant direction ``(x1, nu1, z1)``, the KKT
    solution for ``(-q, b, h)``: where the KKT matrix is (nearly) singular it is (nearly)
    a certificate, long before the iterates show one (a direction that no constraint and
    no curvature bounds, an inconsistent pair of equalities)."""
    z1 = z1.clamp(min=0) * sc.mg
    Px = sc.Pop.mv(x1) if sc.Pop is not None else torch.zeros_like(x1)
    return ratios(
        sc,
        (sc.q * x1).sum(1),
        (sc.b * nu1).sum(1) + (sc.h * z1).sum(1),
        Px,
        sc.Aop.mv(x1),
        sc.Gop.mv(x1),
        sc.Aop.mtv(nu1) + sc.Gop.mtv(z1),
    )


def sharpened_ratios(sc: Scaled, kkt: KKT, x1, nu1, z1, tol_infeas: float):
    """:func:`direction_ratios` of ``(x1, nu1, z1)``, and where one of them is promising
    but not yet small enough, of the result of :data:`SHARPEN_STEPS` steps of inverse
    iteration with the regularised KKT matrix (either sign): the regularisation caps a
    singular direction's growth at ``1/rho`` per solve, and each step multiplies what
    lies along the (near) null space of the KKT matrix (a direction no constraint and no
    curvature bounds, an inconsistent set of equalities) by ``1/rho`` against the rest."""
    infeas, unbdd = direction_ratios(sc, x1, nu1, z1)
    best = torch.minimum(infeas, unbdd)
    promising = (best > tol_infeas) & (best < SHARPEN_BELOW)
    if not bool(promising.any()):
        return infeas, unbdd
    X = [v[:, :, None] for v in (x1, nu1, z1 * sc.mg)]
    for _ in range(SHARPEN_STEPS):
        X = list(kkt._core(*X))
        X[2] = X[2] * sc.mg[:, :, None]
        size = torch.stack([_amax(v, 1)[:, 0] for v in X]).amax(0).clamp(min=1e-300)
        X = [v / size[:, None, None] for v in X]
    x, nu, z = (v[:, :, 0] for v in X)
    for sign in (1.0, -1.0):
        i2, u2 = direction_ratios(sc, sign * x, sign * nu, sign * z)
        infeas = torch.where(promising, torch.minimum(infeas, i2), infeas)
        unbdd = torch.where(promising, torch.minimum(unbdd, u2), unbdd)
    return infeas, unbdd


def classify(ms: Measures, tol: float, tol_infeas: float, fallback: int) -> torch.Tensor:
    """Status codes from the measures: optimal / infeasible / unbounded at the given
    tolerances, else ``fallback``."""
    code = torch.full_like(ms.accuracy, fallback, dtype=torch.long)
    code = torch.where(ms.unbdd <= tol_infeas, UNBOUNDED, code)
    code = torch.where(ms.infeas <= tol_infeas, INFEASIBLE, code)
    return torch.where(ms.accuracy <= tol, OPTIMAL, code)


def stop_codes(ms: Measures, opts: Options, fallback: int) -> torch.Tensor:
    """Codes of samples stopped before convergence: the inaccurate statuses at the reduced
    tolerance, else ``fallback``."""
    code = classify(ms, opts.tol_inaccurate, opts.tol_inaccurate, fallback)
    exact = classify(ms, opts.tol, opts.tol_infeas, fallback)
    inexact = {OPTIMAL: OPTIMAL_INACCURATE, INFEASIBLE: INFEASIBLE_INACCURATE}
    inexact[UNBOUNDED] = UNBOUNDED_INACCURATE
    for exact_code, loose in inexact.items():
        code = torch.where((code == exact_code) & (exact != exact_code), loose, code)
    return code


def _boundary_step(v: torch.Tensor, dv: torch.Tensor, mask=None) -> torch.Tensor:
    """Largest ``a`` with ``v + a dv >= 0`` (rows where ``mask`` is 0 ignored); inf if none
    decreases."""
    neg = dv < 0
    if mask is not None:
        neg = neg & (mask > 0)
    ratio = torch.where(neg, -v / torch.where(neg, dv, -1.0), torch.inf)
    return (
        ratio.amin(1)
        if ratio.dim() == 2 and ratio.shape[1]
        else ratio.new_full(ratio.shape[:1], torch.inf)
    )


def _step_length(st: State, dz, ds, dtau, dkappa, mg) -> torch.Tensor:
    a = torch.minimum(_boundary_step(st.s, ds, mg), _boundary_step(st.z, dz, mg))
    a = torch.minimum(
        a, torch.where(dtau < 0, -st.tau / torch.where(dtau < 0, dtau, -1.0), torch.inf)
    )
    a = torch.minimum(
        a, torch.where(dkappa < 0, -st.kappa / torch.where(dkappa < 0, dkappa, -1.0), torch.inf)
    )
    return a


def initial_point(sc: Scaled, opts: Options) -> State:
    """The least-squares start: the KKT solution with ``W = I`` and a proximal term,
    ``(P + I) x + A'nu + G'z = -q, A x = b, G x - z = h`` (Clarabel's start for QPs,
    plus ``I``: without it a direction that no constraint and no curvature bounds puts
    ``x`` at ``1 / rho``), then ``s = -z``, and ``s``, ``z`` shifted into the positive
    orthant; ``tau = kappa = 1``."""
    B, mg = sc.batch, sc.mg
    ones = _per_sample(mg, B).clone(memory_format=torch.contiguous_format)
    kkt = KKT(sc, ones, ones, opts, prox=1.0)
    rx = -_per_sample(sc.q, B)[:, :, None]
    re = _per_sample(sc.b, B)[:, :, None]
    rg = (sc.h * mg).expand(B, -1)[:, :, None]
    x, nu, z = (v[:, :, 0] for v in kkt.solve(rx, re, rg))
    s = -z
    root = math.sqrt(torch.finfo(x.dtype).eps)

    def shift(v):
        if not sc.m:
            return v
        low = torch.where(mg > 0, v, torch.inf).amin(1)
        return v + torch.where(low < root, 1.0 - low, 0.0)[:, None]

    s = torch.where(mg > 0, shift(s), 1.0)
    z = torch.where(mg > 0, shift(z), 0.0)
    one = x.new_ones(B)
    return State(x, nu, z, s, one, one.clone())


def newton_step(sc: Scaled, st: State, ms: Measures, opts: Options):
    """One predictor-corrector step of the embedding; returns the step direction and
    its length (``(B,)``; NaN where the step is not finite)."""
    x, _, z, s, tau, kappa = st.fields()
    B, mg = x.shape[0], sc.mg
    zsafe = torch.where(mg > 0, z, 1.0)
    d = mg * z / s
    W = mg * s / zsafe
    kkt = KKT(sc, d, W, opts)

    # the constant direction (tau's coefficient) and the affine direction, together
    q, b, h = _per_sample(sc.q, B), _per_sample(sc.b, B), _per_sample(sc.h, B)
    rx = torch.stack([-q, -ms.rx], dim=2)
    re = torch.stack([b, -ms.re], dim=2)
    rg = torch.stack([h * mg, (s - ms.rg) * mg], dim=2)
    target = (REFINE_FRACTION * ms.accuracy).clamp(max=REFINE_FRACTION)
    dx, dnu, dz = kkt.solve(rx, re, rg, target)
    x1, nu1, z1 = dx[:, :, 0], dnu[:, :, 0], dz[:, :, 0]
    certificates = sharpened_ratios(sc, kkt, x1, nu1, z1, opts.tol_infeas)

    xi = x / tau[:, None]
    v = xi - x1
    Pv = sc.Pop.mv(v) if sc.Pop is not None else torch.zeros_like(v)
    den = -(kappa / tau + (v * Pv).sum(1) + (z1 * z1 * W).sum(1))
    qP = q + 2.0 * ms.Px / tau[:, None]

    def combine(x2, nu2, z2, rhs_tau, rc, rctau):
        num = rhs_tau - (qP * x2).sum(1) - (b * nu2).sum(1) - (h * z2).sum(1)
        dtau = num / den
        DX = x2 + dtau[:, None] * x1
        DN = nu2 + dtau[:, None] * nu1
        DZ = (z2 + dtau[:, None] * z1) * mg
        DS = -(rc + s * DZ) / zsafe * mg
        DK = -(rctau + kappa * dtau) / tau
        return DX, DN, DZ, DS, dtau, DK

    # predictor
    aff = combine(dx[:, :, 1], dnu[:, :, 1], dz[:, :, 1], -ms.rtau + kappa, s * z * mg, tau * kappa)
    _, _, dz_a, ds_a, dtau_a, dk_a = aff
    a_aff = _step_length(st, dz_a, ds_a, dtau_a, dk_a, mg).clamp(max=1.0)
    sigma = (1.0 - a_aff) ** 3
    eta = 1.0 - sigma
    smu = sigma * ms.mu

    # corrector
    rc = (s * z - smu[:, None] + ds_a * dz_a) * mg
    rctau = tau * kappa - smu + dtau_a * dk_a
    e = eta[:, None]
    rg = (-e * ms.rg + rc / zsafe) * mg
    dx, dnu, dz = kkt.solve(
        (-e * ms.rx)[:, :, None], (-e * ms.re)[:, :, None], rg[:, :, None], target
    )
    step = combine(dx[:, :, 0], dnu[:, :, 0], dz[:, :, 0], -eta * ms.rtau + rctau / tau, rc, rctau)
    alpha = STEP_FRACTION * _step_length(st, step[2], step[3], step[4], step[5], mg)
    alpha = alpha.clamp(max=1.0)
    finite = torch.isfinite(alpha)
    for v in step:
        finite &= torch.isfinite(v).all(1) if v.dim() > 1 else torch.isfinite(v)
    return step, torch.where(finite, alpha, torch.nan), certificates


def ipm(sc: Scaled, opts: Options, start: float):
    """The embedding's iterations on every sample of ``sc``; returns codes, iteration
    counts, accuracies and the point to answer with (per sample, the iterate of best
    accuracy).  The bookkeeping is local to the running samples and written out when
    samples finish."""
    B = sc.batch
    dev, dt = sc.q.device, sc.q.dtype
    cur = initial_point(sc, opts)
    # outputs, per sample of sc
    code = torch.zeros(B, dtype=torch.long, device=dev)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    accuracy = torch.full((B,), torch.inf, dtype=dt, device=dev)
    answer = State(*(t.clone() for t in cur.fields()))
    # per running sample
    idx, loc = torch.arange(B, device=dev), sc
    best = State(*(t.clone() for t in cur.fields()))
    inf = torch.full((B,), torch.inf, dtype=dt, device=dev)
    best_acc, best_score, best_mu = inf, inf.clone(), inf.clone()
    zero = torch.zeros(B, dtype=torch.long, device=dev)
    since, stall, count = zero, zero.clone(), zero.clone()
    decided = torch.full((B,), RUNNING, dtype=torch.long, device=dev)  # by the last step
    failed = torch.zeros(B, dtype=torch.bool, device=dev)
    mu0 = None
    for it in range(opts.max_iter + 1):
        ms = measure(loc, cur)
        improved = ms.accuracy < best_acc
        if bool(improved.any()):
            best = State(
                *(
                    torch.where(improved[:, None] if b.dim() > 1 else improved, c, b)
                    for b, c in zip(best.fields(), cur.fields())
                )
            )
            best_acc = torch.minimum(best_acc, ms.accuracy)
        score = torch.stack(
            [ms.accuracy / opts.tol, ms.infeas / opts.tol_infeas, ms.unbdd / opts.tol_infeas]
        ).amin(0)
        if mu0 is None:
            mu0 = ms.mu * torch.finfo(dt).eps
        # progress: the best residual ratio halves, or mu does (down to eps mu_0)
        progress = (score < 0.5 * best_score) | ((ms.mu < 0.5 * best_mu) & (ms.mu > mu0))
        best_score = torch.minimum(best_score, score)
        best_mu = torch.minimum(best_mu, ms.mu)
        since = torch.where(progress, 0, since + 1)

        new = classify(ms, opts.tol, opts.tol_infeas, RUNNING)
        new = torch.where((new == RUNNING) & (best_acc <= opts.tol), OPTIMAL, new)
        new = torch.where(new == RUNNING, decided, new)  # a certificate from the last step
        out_of_time = opts.time_limit is not None and time.perf_counter() - start > opts.time_limit
        if it == opts.max_iter or out_of_time:
            fallback = TIME_LIMIT if out_of_time else ITERATION_LIMIT
            new = torch.where(new == RUNNING, _stop(ms, best_acc, opts, fallback), new)
        stuck = (new == RUNNING) & (failed | (since >= STALL_ITERATIONS))
        if bool(stuck.any()):
            new = torch.where(stuck, _stop(ms, best_acc, opts, NUMERICAL_ERROR), new)
        done = new != RUNNING
        if bool(done.any()):
            sel = torch.nonzero(done).flatten()
            out = idx[sel]
            code[out] = new[sel]
            iters[out] = count[sel]
            accuracy[out] = best_acc[sel]
            answer.put(out, best.take(sel))
            if bool(done.all()):
                break
            keep = torch.nonzero(~done).flatten()
            idx, loc, cur, best = idx[keep], loc.take(keep), cur.take(keep), best.take(keep)
            ms = Measures(*(v.index_select(0, keep) for v in vars(ms).values()))
            best_acc, best_score, best_mu, mu0 = (
                t[keep] for t in (best_acc, best_score, best_mu, mu0)
            )
            since, stall, count = since[keep], stall[keep], count[keep]
        step, alpha, (dir_inf, dir_unb) = newton_step(loc, cur, ms, opts)
        bad = torch.isnan(alpha)
        a = torch.where(bad, 0.0, alpha)
        a1 = a[:, None]
        DX, DN, DZ, DS, DT, DK = (torch.nan_to_num(v) for v in step)
        cur = State(
            cur.x + a1 * DX,
            cur.nu + a1 * DN,
            cur.z + a1 * DZ,
            cur.s + a1 * DS,
            cur.tau + a * DT,
            cur.kappa + a * DK,
        )
        count = count + 1
        decided = torch.where(dir_unb <= opts.tol_infeas, UNBOUNDED, RUNNING)
        decided = torch.where(dir_inf <= opts.tol_infeas, INFEASIBLE, decided)
        stall = torch.where(a < SMALL_STEP, stall + 1, 0)
        # judged at the next measure: on the point before a failed step (bad), or the last
        failed = bad | (stall >= STALL_ITERATIONS)
    return code, iters, accuracy, answer


def _stop(ms: Measures, best_acc: torch.Tensor, opts: Options, fallback: int) -> torch.Tensor:
    """Codes of samples stopped before convergence: OPTIMAL(_INACCURATE) by the best
    accuracy reached, else a certificate at the reduced tolerance, else ``fallback``."""
    code = stop_codes(ms, opts, fallback)
    code = torch.where(
        (code == OPTIMAL) | (code == OPTIMAL_INACCURATE) | (best_acc <= opts.tol_inaccurate),
        torch.where(best_acc <= opts.tol, OPTIMAL, OPTIMAL_INACCURATE),
        code,
    )
    return code


def unscale(sc: Scaled, st: State):
    """``(y, nu, lam, s)`` of the protocol from the embedding's point (divided by tau)."""
    t = st.tau[:, None]
    y = sc.D * st.x / t
    nu = sc.Ea * st.nu / (sc.c * t)
    lam = sc.Eg * st.z / (sc.c * t) * sc.mg
    return y, nu, lam, st.s / (sc.Eg * t)


def direct(sc: Scaled, opts: Options):
    """Equality-constrained QPs (no present inequality row): one refined KKT solve of
    ``P y + q + A'nu = 0, A y = b``; returns codes (OPTIMAL or RUNNING: not solved here),
    accuracies and the state (tau = 1)."""
    B = sc.batch
    d = sc.q.new_zeros(B, sc.m)
    kkt = KKT(sc, d, d, opts)
    rx = -_per_sample(sc.q, B)[:, :, None]
    re = _per_sample(sc.b, B)[:, :, None]
    x, nu, _ = (v[:, :, 0] for v in kkt.solve(rx, re, d[:, :, None]))
    one = x.new_ones(B)
    st = State(x, nu, torch.zeros_like(d), torch.ones_like(d), one, torch.zeros_like(one))
    ms = measure(sc, st)
    code = torch.where(ms.accuracy <= opts.tol, OPTIMAL, RUNNING)
    return code, ms.accuracy, st


def run(data: Data, opts: Options) -> Result:
    """Solve every sample of ``data`` (see the module docstring)."""
    start = time.perf_counter()
    check_memory(data, opts)
    B, n, p, m = data.batch, data.n, data.p, data.m
    q = data.q
    dev, dt = q.device, q.dtype
    nan = torch.nan
    out = Result(
        status=torch.zeros(B, dtype=torch.long, device=dev),
        iterations=torch.zeros(B, dtype=torch.long, device=dev),
        accuracy=torch.full((B,), torch.inf, dtype=dt, device=dev),
        y=torch.full((B, n), nan, dtype=dt, device=dev),
        nu=torch.full((B, p), nan, dtype=dt, device=dev),
        lam=torch.full((B, m), nan, dtype=dt, device=dev),
        s=torch.full((B, m), nan, dtype=dt, device=dev),
        notes={},
    )

    def per_sample(flags: torch.Tensor) -> torch.Tensor:
        return flags.expand(B) if flags.shape[0] == 1 else flags

    finite = torch.ones(B, dtype=torch.bool, device=dev)
    for t in (data.P, data.q, data.A, data.b, data.G, data.h):
        if t is not None and t[0].numel():
            finite &= per_sample(torch.isfinite(t).flatten(1).all(1))
    present_e = (data.A != 0).any(2)  # (1|B, p)
    present_g = (data.G != 0).any(2)  # (1|B, m)
    none = torch.zeros_like(finite)
    bad_e = per_sample((~present_e & (data.b != 0)).any(1)) if p else none
    bad_g = per_sample((~present_g & (data.h < 0)).any(1)) if m else none
    out.status[~finite] = NUMERICAL_ERROR
    for k in torch.nonzero(~finite).flatten().tolist():
        out.notes[k] = "NaN or Inf in the data"
    trivial = finite & (bad_e | bad_g)
    out.status[trivial] = INFEASIBLE
    out.accuracy[trivial] = 0.0
    for k in torch.nonzero(trivial).flatten().tolist():
        out.notes[k] = (
            "an all-zero row with a nonzero right-hand side (0 = b_i != 0 or 0 <= h_i < 0)"
        )
    todo = finite & ~trivial
    has_ineq = per_sample(present_g.any(1)) if m else none
    mg_all = present_g.to(dt)

    def scaled_subset(idx: torch.Tensor) -> Scaled:
        sub = data if idx.numel() == B else data.take(idx)
        return equilibrate(sub, _take(mg_all, idx) if m else mg_all, opts.equilibrate_iter)

    def store(idx, code, iters, acc, sc, st):
        out.status[idx] = code
        out.iterations[idx] = iters
        out.accuracy[idx] = acc
        ok = (code == OPTIMAL) | (code == OPTIMAL_INACCURATE)
        if bool(ok.any()):
            y, nu, lam, s = unscale(sc, st)
            slack_absent = _per_sample(data.h, B)[idx] if m else s
            s = torch.where(_per_sample(sc.mg, idx.numel()) > 0, s, slack_absent)
            okc = ok[:, None]
            out.y[idx] = torch.where(okc, y, nan)
            out.nu[idx] = torch.where(okc, nu, nan)
            out.lam[idx] = torch.where(okc, lam, nan)
            out.s[idx] = torch.where(okc, s, nan)

    eq_idx = torch.nonzero(todo & ~has_ineq).flatten()
    ipm_idx = torch.nonzero(todo & has_ineq).flatten()
    if eq_idx.numel():
        sc = scaled_subset(eq_idx)
        code, acc, st = direct(sc, opts)
        solved = code == OPTIMAL
        if bool(solved.any()):
            keep = torch.nonzero(solved).flatten()
            whole = keep.numel() == eq_idx.numel()  # every sample: no copy
            store(
                eq_idx[keep],
                code[keep],
                torch.ones_like(keep),
                acc[keep],
                sc if whole else sc.take(keep),
                st if whole else st.take(keep),
            )
            for k in eq_idx[keep].tolist():
                out.notes[k] = "equality-constrained: one KKT solve"
        ipm_idx = torch.cat([ipm_idx, eq_idx[~solved]]).sort().values
    if ipm_idx.numel():
        sc = scaled_subset(ipm_idx)
        code, iters, acc, st = ipm(sc, opts, start)
        store(ipm_idx, code, iters, acc, sc, st)
    return out
