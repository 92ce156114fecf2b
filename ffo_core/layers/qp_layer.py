"""``FFOQPLayer``: a QP given as matrices, as a PyTorch layer — drop-in for qpth's ``QPFunction``.

Size: a third of it checks the inputs (shapes, batching, dense or sparse layouts, the
PSD test of ``Q``) so that every refusal names the argument; solving and the backward are
the shared runtime's.

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
from ..engine.data_gradient import low_rank_factors, pattern_entries
from ..engine.ghost import GhostSource
from ..errors import ConfigError, InvalidParameterError
from ..protocol import Backend, ConeConstraints, ConeDims, Equalities, Objective, Solution
from ..sparse_ops import upper_triangle
from .function import check_upstream, refuse_transforms
from .runtime import SolverLayer
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
    backend: Backend | None = None  # the call's, set by the runtime
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

    def solver_problem(self, i: int) -> tuple[Objective, ConeConstraints, Equalities]:
        """What the solver gets: :meth:`sample` (dense inputs' zeros are not stored; a
        sparse input's explicit zeros are, and adapters drop them)."""
        return self.sample(i)

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


def _empty(name: str, t) -> bool:
    """An absent argument: None, ``torch.empty(0)``, or a matrix/vector with no rows.  A
    zero-size *batch* (a leading dimension of 0 on a batched argument) is not absence:
    it is refused, since solving nothing for it would silently drop its constraints."""
    if t is None:
        return True
    if not isinstance(t, torch.Tensor) or is_sparse(t) or t.numel() != 0:
        return False
    batched_rank = 3 if name in _MATRICES else 2
    if t.dim() == batched_rank and t.shape[0] == 0:
        raise InvalidParameterError(
            f"argument {name} has a batch of size 0 (shape {tuple(t.shape)}); pass an empty "
            "tensor (torch.empty(0)) or None for no constraints, or a nonempty batch"
        )
    return True


def _inspect(tensors) -> _Call:
    """qpth's shape and batching rules, checked before anything is solved."""
    raw = dict(zip(NAMES, tensors))
    args: dict[str, _Arg] = {}
    for name, t in raw.items():
        if _empty(name, t):
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
    v = to_numpy(arg.tensor).copy()  # the backward uses the forward's values
    return v if arg.batched else v[None]


# -- gradients and checks ---------------------------------------------------------------
def _check_psd(call: _Call) -> None:
    """Refuse a dense ``Q`` that is not positive semidefinite, naming it (and the batch
    index): a Cholesky factorisation of ``(Q + Q')/2 + eps I`` per sample, ``eps`` = 1e-9
    times the largest diagonal entry (so a singular PSD ``Q``, an LP's zero, passes).  A
    sparse ``Q`` is not densified for this: its negative diagonal entries are refused
    (:func:`_matrices`) and the rest is left to the solver's status."""
    arg = call.args["Q"]
    n = call.n
    if arg.sparse is not None:
        return
    t = arg.tensor.detach().to("cpu", torch.float64)
    dense = 0.5 * (t + t.mT) if t.dim() == 3 else (0.5 * (t + t.T))[None]
    diag = dense.diagonal(dim1=-2, dim2=-1)
    eps = 1e-9 * torch.clamp(diag.abs().amax(dim=-1), min=1.0)
    eye = torch.eye(n, dtype=dense.dtype)
    _, info = torch.linalg.cholesky_ex(dense + eps[:, None, None] * eye)
    bad = torch.nonzero(info).flatten().tolist()
    if bad:
        where = f" at batch index {bad[:5]}" if arg.batched else ""
        raise InvalidParameterError(
            f"argument Q{where} is not positive semidefinite (its Cholesky factorisation "
            "fails): the QP is not convex"
        )


class FFOQPLayer(SolverLayer):
    """A batch of QPs ``min 1/2 y'Qy + p'y s.t. Gy <= h, Ay = b`` as a differentiable layer,
    with qpth's ``QPFunction`` call ``layer(Q, p, G, h, A, b) -> (batch, n)``.

    Args:
        solver: a backend or config string, e.g. ``"clarabel"``, ``"scs:eps_abs=1e-9"``.
        broadcast_grad: gradient of an argument shared by the batch: ``"sum"`` of the
            per-sample gradients (default, autograd's meaning) or their ``"mean"`` (qpth's).
        duals: also return the multipliers, ``(y, lam, nu)``: ``lam`` ``(batch, m)`` of
            ``G y <= h`` (``>= 0``) and ``nu`` ``(batch, p)`` of ``A y = b``, with the
            Lagrangian ``1/2 y'Qy + p'y + lam'(Gy - h) + nu'(Ay - b)``; gradients flow
            through them too.
        **options: ``backward``, ``delta``, ``kappa``, ``central``, ``tau_s``, ``tau_lam``,
            ``n_jobs``, ``inaccurate``, ``ghost_fallback``, ``time_limit``, ``check_every``,
            ``check_threshold``, ``check_rel_tol``: see
            :class:`~ffo_core.layers.runtime.SolverLayer` (both layers take them).

    Solves run in float64 on the CPU; the output takes the inputs' dtype (float64 if any
    is float64) and device.
    """

    def __init__(
        self,
        solver: str | Backend = "clarabel",
        *,
        broadcast_grad: str = "sum",
        duals: bool = False,
        **options,
    ) -> None:
        check_choice("broadcast_grad", broadcast_grad, BROADCAST_GRADS)
        if duals not in (True, False):
            raise ConfigError(f"duals must be True or False, got {duals!r}")
        super().__init__(solver, **options)
        self.duals = duals
        caps = self.backend.capabilities
        if caps.missing_cones(ConeDims(nonneg=1), True) or not caps.quadratic_objective:
            raise ConfigError(
                f"backend {self.backend.name!r} cannot solve QPs directly "
                "(needs a quadratic objective, zero and nonnegative cones)"
            )
        self.broadcast_grad = broadcast_grad

    def extra_repr(self) -> str:
        extra = f", broadcast_grad={self.broadcast_grad!r}" if self.broadcast_grad != "sum" else ""
        return super().extra_repr() + extra

    def prepare(self, Q, p, G=None, h=None, A=None, b=None) -> _Call:
        """Validate the arguments and build every sample's protocol data."""
        call = _inspect((Q, p, G, h, A, b))
        for name in _MATRICES:
            _matrices(call, name)
        _check_psd(call)
        call.q = _vectors(call, "p")
        call.h = _vectors(call, "h")
        call.b = _vectors(call, "b")
        return call

    def forward(self, Q, p, G=None, h=None, A=None, b=None, *, solver_args=None) -> torch.Tensor:
        """Solutions ``(batch, n)`` of the QPs (see the class docstring); ``solver_args``
        (optional) sets solver settings for this call only (:mod:`ffo_core.solver_args`)."""
        refuse_transforms((Q, p, G, h, A, b))
        backend = self.backend_for(solver_args)
        if getattr(backend.capabilities, "device", False):
            from . import device_qp

            call = _inspect((Q, p, G, h, A, b))
            if device_qp.applies(self, backend, call):
                inputs = [a.tensor if a.present else torch.empty(0) for a in call.args.values()]
                qp = device_qp.dense_qp(call)
                outs = device_qp.DeviceQPFunction.apply(self, call, qp, backend, *inputs)
                return outs if self.duals else outs[0]
        call = self.prepare(Q, p, G, h, A, b)
        inputs = [
            call.args[name].tensor if call.args[name].present else torch.empty(0) for name in NAMES
        ]
        outs = self._apply(call, *inputs, solver_args=solver_args)
        return outs if self.duals else outs[0]

    # -- the runtime's layer-specific part --------------------------------------------------
    def _outputs(self, call: _Call, sols: list[Solution]) -> tuple[torch.Tensor, ...]:
        fields = ("primal", "ineq_dual", "eq_dual") if self.duals else ("primal",)
        return tuple(
            torch.as_tensor(
                np.stack([getattr(s, f) for s in sols]).reshape(call.batch, -1),
                dtype=call.dtype,
                device=call.device,
            )
            for f in fields
        )

    def _output_names(self, call: _Call) -> list[str]:
        return ["y", "lam", "nu"] if self.duals else ["y"]

    def _upstream(self, call: _Call, grad_outputs):
        c = check_upstream("y", grad_outputs[0], True)
        if not self.duals:
            return c, None
        c_lam, c_nu = (
            check_upstream(name, g, True) if g is not None else np.zeros((call.batch, size))
            for name, g, size in zip(("lam", "nu"), grad_outputs[1:], (call.m, call.p))
        )
        if not (c_lam.any() or c_nu.any()):
            return c, None
        return c, (c_nu.reshape(call.batch, call.p), c_lam.reshape(call.batch, call.m))

    def _input_names(self, call: _Call) -> list[str]:
        return [f"argument {name}" for name in NAMES]

    def _input_gradients(self, call: _Call, grads, needs) -> tuple:
        wanted = {name: bool(flag) and call.args[name].present for name, flag in zip(NAMES, needs)}
        return tuple(self._assemble(call, name, grads) if wanted[name] else None for name in NAMES)

    def _assemble(self, call: _Call, name: str, grads) -> torch.Tensor:
        """Gradient tensor of argument ``name`` from the per-sample data gradients."""
        arg = call.args[name]
        dtype, device = arg.tensor.dtype, arg.tensor.device
        B = call.batch
        scale = 1.0 if arg.batched or self.broadcast_grad == "sum" else 1.0 / B
        if name in ("p", "h", "b"):
            v = np.stack([getattr(g, {"p": "q"}.get(name, name)) for g in grads])
            v = v if arg.batched else scale * v.sum(axis=0)
            return torch.as_tensor(v, dtype=dtype, device=device)
        section = "P" if name == "Q" else name
        if arg.sparse is not None:  # the gradient on the entries the user stored
            pos = call.positions[name]
            M = getattr(call, "P" if name == "Q" else name)[0]
            if arg.batched:
                vals = np.concatenate([getattr(g, section)[pos[i]] for i, g in enumerate(grads)])
            elif all(g.low_rank and g.pattern(section) is M for g in grads):
                # the batch's sum as one rank-2B product on the shared pattern
                Ub, Vb = low_rank_factors(
                    section, [g.base for g in grads], [g.direction for g in grads]
                )
                vals = scale * pattern_entries(M, Ub, Vb)[pos[0]]
            else:
                vals = scale * sum(getattr(g, section) for g in grads)[pos[0]]
            return arg.sparse.like(vals, dtype, device)
        if arg.batched:  # one (rows, 2) x (2, n) product per sample
            factors = [low_rank_factors(section, [g.base], [g.direction]) for g in grads]
            U = torch.as_tensor(np.stack([f[0] for f in factors]), dtype=dtype, device=device)
            V = torch.as_tensor(np.stack([f[1] for f in factors]), dtype=dtype, device=device)
            return torch.bmm(U, V.transpose(1, 2))
        Uf, Vf = low_rank_factors(section, [g.base for g in grads], [g.direction for g in grads])
        summed = (
            torch.as_tensor(Uf, dtype=dtype, device=device)
            @ torch.as_tensor(Vf, dtype=dtype, device=device).T
        )
        return summed.mul_(scale) if scale != 1.0 else summed


__all__ = ["FFOQPLayer"]
