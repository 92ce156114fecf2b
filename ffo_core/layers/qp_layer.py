"""``FFOQPLayer``: a QP given as matrices, as a PyTorch layer — drop-in for qpth's ``QPFunction``.

    from ffo_core import FFOQPLayer
    layer = FFOQPLayer(solver="clarabel")           # any backend or config string
    y = layer(Q, p, G, h, A, b)                     # (batch, n)

solves, for every sample of the batch, ::

    minimize 1/2 y'Q y + p'y   subject to   G y <= h,   A y = b

straight through the solver protocol (no CVXPY): ``Q`` becomes ``Objective.P`` (full
symmetric CSC), ``G, h`` a :class:`ConeConstraints` with ``ConeDims(nonneg=m)`` and ``A, b``
:class:`Equalities`.  The backward pass is the library's own: :func:`ffo_backward` (ghost
problem, finite difference of Lagrangian gradients) or, with ``backward="kkt"``,
:func:`kkt_backward`.

qpth's calling conventions, exactly:

* every argument may carry a leading batch dimension or not (``Q`` of shape ``(n, n)`` is
  shared by the batch); the output is always ``(batch, n)``, ``(1, n)`` when nothing is
  batched;
* ``A``/``b`` (and ``G``/``h``) may be empty: ``torch.empty(0)``, ``torch.Tensor()``, a
  tensor with 0 rows, or ``None``;
* the objective sees only the symmetric part of ``Q`` (``y'Qy = y' (Q+Q')/2 y``); that is
  what is solved, and the gradient w.r.t. ``Q`` is qpth's symmetric
  ``dQ = (dz y' + y dz')/2``.  ``Q`` must be positive semidefinite (a negative diagonal entry
  is rejected up front; otherwise the solver's status is checked).

Differences from qpth, on purpose:

* the gradient of an argument shared by the batch is the **sum** of the per-sample
  gradients (what autograd means by broadcasting); qpth 0.0.18 returns their mean.
  ``broadcast_grad="mean"`` reproduces qpth;
* sparse matrices: ``Q``, ``G``, ``A`` may be torch sparse COO/CSR/CSC tensors (2-D, or
  batched 3-D).  They go to the solver as CSC built from their indices and values — never a
  dense copy — and their gradient is a sparse tensor on the same pattern (explicitly stored
  zeros included; a CSC input gets a COO gradient), i.e. the gradient restricted to the
  entries the user declared free.  A *dense* matrix is a full coordinate system: its
  gradient is dense (every entry, zeros included), as in qpth; its zeros are still not sent
  to the solver.

Dense gradients are assembled from the backward's vector parts: per sample the data
gradient of a matrix block is an outer-product expression in ``(y*, dual*)`` and the
vector gradients ``(dq, db, dh)`` (see :func:`_low_rank`), so a dense ``G`` gradient is one
``(m, 2B) @ (2B, n)`` product for the whole batch, and nothing of size ``n x n`` exists
unless the user passed a dense ``n x n`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ..config import check_choice
from ..engine.active_set import classify
from ..engine.ffo_backward import (
    FFOOptions,
    FFOSample,
    GhostSource,
    backward_chunks,
    ffo_backward_batch,
)
from ..engine.kkt_backward import kkt_backward
from ..engine.solves import (
    INACCURATE_POLICIES,
    BatchRunner,
    GuardedBackend,
    check_solutions,
    with_batch_index,
)
from ..errors import ConfigError, GhostProblemError, InvalidParameterError, SolverError
from ..protocol import Backend, ConeConstraints, ConeDims, Equalities, Objective, Solution
from ..registry import get_backend
from ..sparse_ops import upper_triangle
from .tensors import (
    SparseEntries,
    check_finite,
    check_real,
    common_device,
    dense_to_csc,
    entries_to_csc,
    is_sparse,
    result_dtype,
    to_numpy,
)

BACKWARDS = ("ffo", "kkt")
BROADCAST_GRADS = ("sum", "mean")
NAMES = ("Q", "p", "G", "h", "A", "b")
_MATRICES = ("Q", "G", "A")


# -- one call's arguments ------------------------------------------------------------------
@dataclass
class _Arg:
    """One argument as given: its tensor (None when absent/empty) and how it is batched."""

    name: str
    tensor: torch.Tensor | None
    batched: bool = False
    sparse: SparseEntries | None = None

    @property
    def present(self) -> bool:
        return self.tensor is not None


@dataclass
class _Call:
    """Everything forward hands to backward: sizes, per-sample solver data, solutions."""

    args: dict[str, _Arg]
    batch: int
    n: int
    m: int
    p: int
    dtype: torch.dtype
    device: torch.device
    # per-sample solver data; lists of length 1 for arguments shared by the batch
    P: list[sp.csc_matrix | None] = field(default_factory=list)
    q: np.ndarray | None = None
    G: list[sp.csc_matrix] = field(default_factory=list)
    h: np.ndarray | None = None
    A: list[sp.csc_matrix] = field(default_factory=list)
    b: np.ndarray | None = None
    # storage position, in the solver's CSC, of every stored entry of a sparse argument
    positions: dict[str, list[np.ndarray]] = field(default_factory=dict)
    sols: list[Solution] = field(default_factory=list)
    # P[k]'s upper triangle, formed on first use and shared by every solve that uses P[k]
    P_upper: dict[int, sp.csc_matrix] = field(default_factory=dict)
    _source: GhostSource | None = None  # see ghost_source

    def _upper(self, k: int) -> sp.csc_matrix | None:
        if self.P[k] is None:
            return None
        if k not in self.P_upper:  # a race only computes it twice
            self.P_upper[k] = upper_triangle(self.P[k])
        return self.P_upper[k]

    def ghost_source(self, h: ConeConstraints, e: Equalities) -> GhostSource | None:
        """:class:`GhostSource` of a sample's ``(h, e)`` (from :meth:`sample`), its matrix
        parts formed once per call when the batch shares ``G`` and ``A``; ``None`` (formed
        per sample by the backward) when either is batched."""
        if self.args["G"].batched or self.args["A"].batched:
            return None
        if self._source is None:  # a race only computes it twice
            self._source = GhostSource.of(h, e)
        s = self._source
        return s._replace(h=ConeConstraints(s.h.G, h.h, s.h.dims), e=Equalities(s.e.A, e.b))

    def sample_bytes(self) -> int:
        """Rough bytes one sample holds in the first-order backward beyond what the batch
        shares: for each batched matrix, its pruned copy, ``[A; G]`` and the ghost's rows
        (about 36 bytes per stored entry)."""
        size = 0
        for name, mats in (("Q", self.P), ("G", self.G), ("A", self.A)):
            if self.args[name].batched and mats and mats[0] is not None:
                size += 36 * mats[0].nnz
        return size

    def sample(self, i: int) -> tuple[Objective, ConeConstraints, Equalities]:
        def pick(seq, batched):
            return seq[i] if batched else seq[0]

        a = self.args
        k = i if a["Q"].batched else 0
        return (
            Objective(self.P[k], pick(self.q, a["p"].batched), self._upper(k)),
            ConeConstraints(
                pick(self.G, a["G"].batched), pick(self.h, a["h"].batched), ConeDims(nonneg=self.m)
            ),
            Equalities(pick(self.A, a["A"].batched), pick(self.b, a["b"].batched)),
        )


def _empty(t) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.numel() == 0 and not is_sparse(t))


def _inspect(tensors) -> _Call:
    """qpth's shape and batching rules, checked before anything is solved."""
    raw = dict(zip(NAMES, tensors))
    args: dict[str, _Arg] = {}
    for name, t in raw.items():
        if _empty(t):
            if name in ("Q", "p"):
                raise InvalidParameterError(
                    f"argument {name} is required (got an empty tensor or None)"
                )
            args[name] = _Arg(name, None)
            continue
        check_real(name, t, what="argument")
        args[name] = _Arg(name, t)
    for vec in ("p", "h", "b"):
        if args[vec].present and is_sparse(args[vec].tensor):
            raise InvalidParameterError(
                f"argument {vec}: must be a dense tensor, got layout {args[vec].tensor.layout}"
            )
    for mat, vec in (("G", "h"), ("A", "b")):
        if args[mat].present != args[vec].present:
            given, missing = (mat, vec) if args[mat].present else (vec, mat)
            raise InvalidParameterError(
                f"argument {given} is given but {missing} is empty; pass both or neither"
            )

    p_t = args["p"].tensor
    if p_t.dim() not in (1, 2):
        raise InvalidParameterError(
            f"argument p: expected shape (n,) or (batch, n), got {tuple(p_t.shape)}"
        )
    n = p_t.shape[-1]
    sizes: dict[str, int] = {}
    rows = {"Q": n, "G": 0, "A": 0}
    for name, arg in args.items():
        if not arg.present:
            continue
        t = arg.tensor
        shape = tuple(t.shape)
        matrix = name in _MATRICES
        if matrix:
            ok = t.dim() in (2, 3) and shape[-1] == n and (name != "Q" or shape[-2] == n)
            k = {"Q": "n", "G": "m", "A": "p"}[name]
            want = f"({k}, n) or (batch, {k}, n)"
            if ok:
                rows[name] = shape[-2]
            arg.batched = t.dim() == 3
        else:
            mat = {"p": "Q", "h": "G", "b": "A"}[name]
            length = n if name == "p" else rows[mat]
            ok = t.dim() in (1, 2) and shape[-1] == length
            want = f"({length},) or (batch, {length})"
            arg.batched = t.dim() == 2
        if not ok:
            raise InvalidParameterError(
                f"argument {name}: expected shape {want} with n = {n} (from p), got {shape}"
            )
        if arg.batched:
            sizes[name] = shape[0]
        check_finite(name, t, arg.batched, what="argument")
    if len(set(sizes.values())) > 1:
        raise InvalidParameterError(f"inconsistent batch sizes: {sizes}")
    batch = next(iter(sizes.values()), 1)
    if batch == 0:
        raise InvalidParameterError("batch size is 0")
    present = [a.tensor for a in args.values() if a.present]
    for name in _MATRICES:
        arg = args[name]
        if arg.present and is_sparse(arg.tensor):
            arg.sparse = SparseEntries.of(arg.tensor, f"argument {name}")
    return _Call(
        args,
        batch,
        n,
        rows["G"],
        rows["A"],
        result_dtype(present),
        common_device(present, "arguments"),
    )


# -- tensors -> protocol data --------------------------------------------------------------
def _symmetric(rows, cols, values, n) -> tuple[sp.csc_matrix, np.ndarray]:
    """``(Q + Q')/2`` on the union of the patterns of ``Q`` and ``Q'`` (explicit zeros kept),
    and the storage position in it of each of ``Q``'s entries."""
    P, pos = entries_to_csc(
        np.concatenate([rows, cols]),
        np.concatenate([cols, rows]),
        0.5 * np.concatenate([values, values]),
        (n, n),
    )
    return P, pos[: rows.shape[0]]


def _matrices(call: _Call, name: str) -> None:
    """Per-sample CSC of matrix argument ``name`` (one when shared by the batch)."""
    arg = call.args[name]
    shape = {"Q": (call.n, call.n), "G": (call.m, call.n), "A": (call.p, call.n)}[name]
    if not arg.present:
        setattr(
            call, name if name != "Q" else "P", [None] if name == "Q" else [sp.csc_matrix(shape)]
        )
        return
    out, positions = [], []
    for i in range(call.batch if arg.batched else 1):
        if arg.sparse is not None:
            r, c, v = arg.sparse.sample(i)
            M, pos = _symmetric(r, c, v, call.n) if name == "Q" else entries_to_csc(r, c, v, shape)
            positions.append(pos)
        else:
            M = dense_to_csc(arg.tensor[i] if arg.batched else arg.tensor)
            if name == "Q":  # its zeros are no coordinates of the solve
                M = (0.5 * (M + M.T)).tocsc()
                M.sort_indices()
        if name == "Q":
            diag = M.diagonal()
            if diag.size and diag.min() < 0:
                where = f" at batch index {i}" if arg.batched else ""
                raise InvalidParameterError(
                    f"argument Q{where} is not positive semidefinite: diagonal entry "
                    f"{int(np.argmin(diag))} is {diag.min():.3g}"
                )
        out.append(M)
    setattr(call, "P" if name == "Q" else name, out)
    if positions:
        call.positions[name] = positions


def _vectors(call: _Call, name: str) -> np.ndarray:
    arg = call.args[name]
    if not arg.present:
        return np.zeros((1, 0))
    v = to_numpy(arg.tensor)
    return v if arg.batched else v[None]


# -- gradients: protocol data -> tensors ---------------------------------------------------
def _low_rank(
    name: str, y: np.ndarray, dq: np.ndarray, a: np.ndarray | None, dual0: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(U, V)`` with ``U @ V.T`` the data gradient of block ``name`` on *every*
    entry, from the quantities the backward pass returned.

    :func:`ffo_backward` (like :func:`kkt_backward`) returns the exact derivative of the
    bilinear ``grad_data L`` at a base point ``(y0, dual0)`` along the differenced
    primal-dual direction ``(w_y, w_dual)``.  Its vector parts *are* that direction,
    ``dq = w_y`` and ``dh = -w_lam`` (``db = -w_nu``), so with ``a = -dh`` (or ``-db``)

        dG = a y0' + dual0 dq'            dA likewise with nu
        dQ = (dq y0' + y0 dq') / 2

    which on ``G``'s pattern is exactly what the backward computed there.  The base point
    is ``DataGradient.base`` when the backward reports it (the forward solution with duals
    off the ghost rows zeroed for the one-sided difference, the midpoint of the two ghost
    solutions for the central one), else the forward solution.
    """
    if name == "Q":
        return 0.5 * np.stack([dq, y], axis=1), np.stack([y, dq], axis=1)
    return np.stack([a, dual0], axis=1), np.stack([y, dq], axis=1)


@dataclass
class _Record:
    """What one sample's backward leaves for the assembly of the input gradients."""

    vectors: dict[str, np.ndarray]  # dq, dh, db
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # dense matrices: (U, V)
    pattern: dict[str, np.ndarray]  # sparse matrices: values on the CSC data
    diagnostics: dict


class FFOQPLayer(torch.nn.Module):
    """A batch of QPs ``min 1/2 y'Qy + p'y s.t. Gy <= h, Ay = b`` as a differentiable layer,
    with qpth's ``QPFunction`` call ``layer(Q, p, G, h, A, b) -> (batch, n)``.

    Args:
        solver: a backend or config string, e.g. ``"clarabel"``,
            ``"clarabel:tol_gap_abs=1e-10,tol_gap_rel=1e-10"``, ``"scs:eps_abs=1e-9"``.
        backward: ``"ffo"`` (first-order, default) or ``"kkt"`` (exact implicit
            differentiation; factorises the reduced KKT matrix).
        delta, kappa, central, tau_s, tau_lam: see :class:`ffo_core.engine.ffo_backward.FFOOptions`.
        n_jobs: threads for per-sample solves (default: one per core if the backend is
            thread safe).
        inaccurate: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` an inaccurate solve.
        broadcast_grad: gradient of an argument shared by the batch: ``"sum"`` of the
            per-sample gradients (default, autograd's meaning) or their ``"mean"`` (qpth's).

    Solves run in float64 on the CPU; the output takes the inputs' dtype (float64 if any
    is float64) and device.  ``last_diagnostics`` holds per-sample details of the last
    backward pass (delta, active-set sizes).
    """

    def __init__(
        self,
        solver: str | Backend = "clarabel",
        *,
        backward: str = "ffo",
        delta: float | None = None,
        kappa: float | None = None,
        central: bool | None = None,
        tau_s: float | None = None,
        tau_lam: float | None = None,
        n_jobs: int | None = None,
        inaccurate: str = "warn",
        broadcast_grad: str = "sum",
    ) -> None:
        super().__init__()
        check_choice("backward", backward, BACKWARDS)
        check_choice("inaccurate", inaccurate, INACCURATE_POLICIES)
        check_choice("broadcast_grad", broadcast_grad, BROADCAST_GRADS)
        self.backend = get_backend(solver)
        missing = self.backend.capabilities.missing_cones(ConeDims(nonneg=1), True)
        if missing or not self.backend.capabilities.quadratic_objective:
            raise ConfigError(
                f"backend {self.backend.name!r} cannot solve QPs directly "
                "(needs a quadratic objective, zero and nonnegative cones)"
            )
        self.backward_mode = backward
        self.options = FFOOptions(
            delta=delta, kappa=kappa, central=central, tau_s=tau_s, tau_lam=tau_lam
        )
        self._runner = BatchRunner(self.backend, n_jobs)
        self.inaccurate = inaccurate
        self.broadcast_grad = broadcast_grad
        self.last_diagnostics: list[dict] = []

    def extra_repr(self) -> str:
        return (
            f"solver={self.backend.name!r}, backward={self.backward_mode!r}, "
            f"central={self.options.central}"
        )

    # -- forward, in NumPy --------------------------------------------------------------
    def prepare(self, Q, p, G=None, h=None, A=None, b=None) -> _Call:
        """Validate the arguments and build every sample's protocol data."""
        call = _inspect((Q, p, G, h, A, b))
        for name in _MATRICES:
            _matrices(call, name)
        call.q = _vectors(call, "p")
        call.h = _vectors(call, "h")
        call.b = _vectors(call, "b")
        return call

    def solve(self, call: _Call) -> list[Solution]:
        """Solve every sample and check the statuses (SolverError names the batch index)."""
        sols = self._runner.run(
            "forward", lambda i: GuardedBackend(self.backend, i).solve(*call.sample(i)), call.batch
        )
        check_solutions(sols, self.backend, self.inaccurate)
        call.sols = sols
        return sols

    # -- backward, in NumPy -------------------------------------------------------------
    def _grads(self, call: _Call, c: np.ndarray) -> list:
        """Every sample's data gradient: the KKT mode sample by sample, the first-order
        mode staged over chunks of the batch (:func:`ffo_backward_batch`, as
        :meth:`ffo_core.layers.cvxpy_layer.FFOLayer.data_gradients`)."""
        if self.backward_mode == "kkt":

            def one(i: int):
                g, h, e = call.sample(i)
                try:
                    return kkt_backward(g, h, e, call.sols[i], c[i], self.options)
                except SolverError as exc:
                    raise with_batch_index(exc, i)  # noqa: B904  (exc itself, its cause kept)

            return self._runner.run("backward", one, call.batch)
        grads: list = []
        for indices in backward_chunks(call.batch, call.sample_bytes()):
            samples = []
            for i in indices:
                g, h, e = call.sample(i)
                guard = GuardedBackend(self.backend, i, ghost=True, inaccurate=self.inaccurate)
                samples.append(
                    FFOSample(guard, g, h, e, call.sols[i], c[i], call.ghost_source(h, e))
                )
            out = ffo_backward_batch(
                samples, self.options, run=lambda fn, k: self._runner.run("backward", fn, k)
            )
            for i, grad in zip(indices, out):
                if isinstance(grad, GhostProblemError):
                    raise with_batch_index(grad, i)
                grads.append(grad)
        return grads

    def _record(self, call: _Call, i: int, grad, needs: dict) -> _Record:
        """What sample ``i``'s data gradient ``grad`` gives the assembly of the inputs'."""
        sol = call.sols[i]
        if grad.base is not None:  # the point the backward differentiated at
            y, nu0, lam0 = grad.base
        else:
            _, h, _ = call.sample(i)
            active = classify(
                sol, h.dims, tau_s=self.options.tau_s, tau_lam=self.options.tau_lam, rhs=h.h
            )
            y, nu0 = sol.primal, sol.eq_dual
            lam0 = np.where(active.ghost_rows, sol.ineq_dual, 0.0)
        rec = _Record({"p": grad.q, "h": grad.h, "b": grad.b}, {}, {}, grad.diagnostics)
        blocks = {"Q": ("P", None, None), "G": ("G", grad.h, lam0), "A": ("A", grad.b, nu0)}
        for name, (part, drhs, dual0) in blocks.items():
            if not needs[name]:
                continue
            if call.args[name].sparse is not None:
                rec.pattern[name] = getattr(grad, part)  # formed only when needed
                continue
            a = None if drhs is None else -drhs
            rec.factors[name] = _low_rank(name, y, grad.q, a, dual0)
        return rec

    def _assemble(self, call: _Call, name: str, records: list[_Record]) -> torch.Tensor:
        """Gradient tensor of argument ``name`` from the per-sample records."""
        arg = call.args[name]
        t = arg.tensor
        dtype, device = t.dtype, t.device
        B = call.batch
        scale = 1.0 if arg.batched or self.broadcast_grad == "sum" else 1.0 / B
        if name in ("p", "h", "b"):
            v = np.stack([r.vectors[name] for r in records])
            v = v if arg.batched else scale * v.sum(axis=0)
            return torch.as_tensor(v, dtype=dtype, device=device)
        if arg.sparse is not None:
            pos = call.positions[name]
            if arg.batched:
                vals = np.concatenate([r.pattern[name][pos[i]] for i, r in enumerate(records)])
            else:
                total = records[0].pattern[name].copy()
                for r in records[1:]:
                    total += r.pattern[name]
                vals = scale * total[pos[0]]
            return arg.sparse.like(vals, dtype, device)
        U = torch.as_tensor(
            np.stack([r.factors[name][0] for r in records]), dtype=dtype, device=device
        )
        V = torch.as_tensor(
            np.stack([r.factors[name][1] for r in records]), dtype=dtype, device=device
        )
        if arg.batched:
            return torch.bmm(U, V.transpose(1, 2))
        k = U.shape[-1]
        U = U.permute(1, 0, 2).reshape(U.shape[1], B * k)
        V = V.permute(1, 0, 2).reshape(V.shape[1], B * k)
        out = U @ V.T
        return out.mul_(scale) if scale != 1.0 else out

    def gradients(self, call: _Call, c: np.ndarray, needs: dict) -> dict[str, torch.Tensor]:
        """Input gradients of ``sum_i c[i]'y_i`` for the arguments with ``needs[name]``."""
        records = [
            self._record(call, i, grad, needs) for i, grad in enumerate(self._grads(call, c))
        ]
        self.last_diagnostics = [r.diagnostics for r in records]
        return {name: self._assemble(call, name, records) for name in NAMES if needs[name]}

    def forward(self, Q, p, G=None, h=None, A=None, b=None) -> torch.Tensor:
        """Solutions ``(batch, n)`` of the QPs (see the class docstring)."""
        call = self.prepare(Q, p, G, h, A, b)
        inputs = [
            call.args[name].tensor if call.args[name].present else torch.empty(0) for name in NAMES
        ]
        return _QPFunction.apply(self, call, *inputs)


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: FFOQPLayer, call: _Call, *inputs):
        sols = layer.solve(call)
        Y = np.stack([s.primal for s in sols])
        ctx.layer, ctx.call = layer, call
        return torch.as_tensor(Y, dtype=call.dtype, device=call.device)

    @staticmethod
    def backward(ctx, grad_y):
        layer, call = ctx.layer, ctx.call
        flags = ctx.needs_input_grad[2:]
        needs = {name: bool(flag) and call.args[name].present for name, flag in zip(NAMES, flags)}
        if not any(needs.values()):
            return (None, None) + (None,) * len(NAMES)
        c = grad_y.detach().to("cpu", torch.float64).numpy()
        grads = layer.gradients(call, c, needs)
        return (None, None) + tuple(grads.get(name) for name in NAMES)


__all__ = ["FFOQPLayer"]
