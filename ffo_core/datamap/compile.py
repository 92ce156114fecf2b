"""Compile a DPP CVXPY problem, once, into an affine map from parameters to solver data.

CVXPY's DPP canonicalisation (``problem.get_problem_data``) yields tensors such that the
canonical problem data is an affine function of the parameter vector ``theta`` (each
parameter flattened in column-major order, followed by a constant 1).  We keep one sparse
matrix ``M`` of shape ``(n_data, n_theta + 1)`` with

    data = M @ [theta; 1]

where ``data`` is the concatenation of the protocol's problem data (:mod:`ffo_core.protocol`)
restricted to the fixed sparsity pattern:

    [ P entries (CSC order) | q | A entries (CSC order) | b | G entries (CSC order) | h ]

so that for a batch the whole forward data is one sparse mat-mul ``M @ Theta`` and the
backward map is ``M.T @ dData``.  ``P`` is stored full (both triangles), so each stored entry
is an independent coordinate of the data and needs no doubling in the backward pass.

We compile with CVXPY's chain for the Clarabel target (a pure canonicalisation: no solver is
called); for backends without a quadratic objective we pass ``use_quad_obj=False`` and CVXPY
moves the quadratic term into a second-order cone.  Its data, ``A x + s = b``, ``s`` in
``Zero x NonNeg x SOC x EXP x PSD``, is the protocol's convention, the zero block being the
equalities.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from ..errors import NotDPPError, ProblemError
from ..protocol import ConeConstraints, ConeDims, Equalities, Objective, SparsePattern

CONSTANT_ID = -1  # CVXPY's id for the constant column of the parameter vector


@dataclass(frozen=True)
class Slot:
    """Where one CVXPY parameter or variable lives in a flat vector (column-major)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


def flatten_f(values: np.ndarray, batch: int, shape: tuple[int, ...]) -> np.ndarray:
    """(batch, *shape) -> (batch, size), each sample flattened column-major (CVXPY's order,
    the order of a :class:`Slot`'s entries)."""
    nd = len(shape)
    return np.transpose(values, (0, *range(nd, 0, -1))).reshape(batch, -1)


def unflatten_f(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`flatten_f`: (batch, size) -> (batch, *shape), a view."""
    nd = len(shape)
    return flat.reshape((flat.shape[0],) + shape[::-1]).transpose((0, *range(nd, 0, -1)))


@dataclass
class CompiledProblem:
    """Everything the layer needs from CVXPY, computed once per layer."""

    M: sp.csr_matrix  # (n_data, n_theta + 1), last column: constant
    n: int  # canonical variables
    P: SparsePattern | None
    A: SparsePattern  # equalities (p, n)
    G: SparsePattern  # cone rows (m, n)
    dims: ConeDims
    params: list[Slot]  # user parameters, in the user's order
    variables: list[Slot]  # user variables, in the user's order
    n_theta: int
    const_col: int
    quadratic: bool

    def __post_init__(self) -> None:
        sizes = [
            self.P.nnz if self.P else 0,
            self.n,
            self.A.nnz,
            self.A.shape[0],
            self.G.nnz,
            self.G.shape[0],
        ]
        bounds = np.cumsum([0] + sizes)
        names = ("P", "q", "A", "b", "G", "h")
        self.sections = {k: slice(bounds[i], bounds[i + 1]) for i, k in enumerate(names)}
        self.n_data = int(bounds[-1])

    @functools.cached_property
    def M_csc(self) -> sp.csc_matrix:
        """``M`` in CSC form, for slicing its columns by parameter."""
        return self.M.tocsc()

    @property
    def p(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.G.shape[0]

    def sample(self, data: np.ndarray) -> tuple[Objective, ConeConstraints, Equalities]:
        """Protocol objects for one sample's data vector (a column of ``M @ Theta``)."""
        return self.sample_parts({name: data[sec] for name, sec in self.sections.items()})

    def sample_parts(self, parts: dict) -> tuple[Objective, ConeConstraints, Equalities]:
        """Protocol objects from the data's sections (``parts["G"]``: ``G``'s values in
        CSC order, or the matrix itself; arrays are used as they are, not copied;
        ``parts["P_upper"]``, optional: ``P``'s upper triangle, see :class:`Objective`)."""

        def matrix(name):
            value = parts[name]
            return value if sp.issparse(value) else getattr(self, name).matrix(value)

        P = matrix("P") if self.P is not None else None
        return (
            Objective(P, parts["q"], parts.get("P_upper")),
            ConeConstraints(matrix("G"), parts["h"], self.dims),
            Equalities(matrix("A"), parts["b"]),
        )


def _protocol_row_order(dims: ConeDims) -> np.ndarray:
    """For each cone row in protocol order (nonneg, SOC, EXP, PSD), its row in CVXPY's
    order (nonneg, SOC, PSD, EXP)."""
    head = dims.nonneg + sum(dims.soc)
    psd = sum(s * (s + 1) // 2 for s in dims.psd)
    exp = 3 * dims.exp
    return np.r_[np.arange(head), head + psd + np.arange(exp), head + np.arange(psd)]


def _structural_rows(T: sp.csr_matrix) -> np.ndarray:
    return np.flatnonzero(np.diff(T.indptr))


def _check_problem(problem, parameters, variables) -> None:
    if not isinstance(problem, cp.Problem):
        raise ProblemError(f"expected a cvxpy.Problem, got {type(problem).__name__}")
    if not problem.is_dcp():
        raise ProblemError("the problem is not DCP (not convex as written)")
    given = {p.id for p in parameters}
    missing = [p.name() for p in problem.parameters() if p.id not in given]
    if missing:
        raise ProblemError(
            f"every parameter of the problem must be listed in `parameters`; "
            f"missing: {', '.join(missing)}"
        )
    extra = [p.name() for p in parameters if p.id not in {q.id for q in problem.parameters()}]
    if extra:
        raise ProblemError(
            f"`parameters` lists parameters the problem does not use: {', '.join(extra)}"
        )
    if len(given) != len(parameters):
        raise ProblemError("`parameters` lists a parameter twice")
    known = {v.id for v in problem.variables()}
    for v in variables:
        if not isinstance(v, cp.Variable) or v.id not in known:
            raise ProblemError(f"`variables` must be variables of the problem; got {v!r}")
    for v in problem.variables():
        if v.attributes.get("boolean") or v.attributes.get("integer"):
            raise ProblemError(
                f"variable {v.name()} is integer/boolean: a layer needs a "
                "convex (continuous) problem to differentiate"
            )
    if not variables:
        raise ProblemError("`variables` is empty: say which variables the layer returns")


def compile_problem(
    problem: cp.Problem, parameters, variables, *, quadratic: bool = True
) -> CompiledProblem:
    """Canonicalise ``problem`` once; ``quadratic=False`` moves ``P`` into an SOC."""
    parameters, variables = list(parameters), list(variables)
    _check_problem(problem, parameters, variables)
    try:
        data, _, _ = problem.get_problem_data(
            cp.CLARABEL, enforce_dpp=True, solver_opts={"use_quad_obj": quadratic}
        )
    except cp.error.DPPError as exc:
        raise NotDPPError(
            "the problem is DCP but not DPP: its data is not an affine function of the "
            "parameters, so it cannot be a layer (for example write `cp.sum_squares(Q @ y)` "
            "rather than `cp.quad_form(y, Q.T @ Q)`, and never multiply two parameters); "
            "see https://www.cvxpy.org/tutorial/dpp/index.html"
        ) from exc
    except cp.error.SolverError as exc:
        raise ProblemError(f"CVXPY could not canonicalise the problem: {exc}") from exc
    pp = data["param_prob"]
    cd = pp.cone_dims
    if getattr(cd, "p3d", None) or getattr(cd, "pnd", None):
        raise ProblemError("power cones are not supported by the protocol yet")
    n = int(pp.x.size)
    n_rows = int(pp.constr_size)
    p, m = int(cd.zero), n_rows - int(cd.zero)
    dims = ConeDims(
        nonneg=int(cd.nonneg),
        soc=tuple(int(k) for k in cd.soc),
        exp=int(cd.exp),
        psd=tuple(int(k) for k in cd.psd),
    )
    if dims.rows != m:
        raise ProblemError(f"internal: cone sizes {dims} do not add up to {m} rows")

    blocks = []
    # P: tensor rows index the full (n, n) matrix column-major; CSC order = row order.
    P_pattern = None
    if pp.P is not None and quadratic:
        TP = sp.csr_matrix(pp.P)
        TP.eliminate_zeros()
        rP = _structural_rows(TP)
        P_pattern = SparsePattern.from_rows_cols(rP % n, rP // n, (n, n))
        blocks.append(TP[rP])
    # q: first n rows of the objective tensor (the last row is the constant offset).
    Tq = sp.csr_matrix(pp.q)
    blocks.append(Tq[:n])
    # [A | b] of the Clarabel-formatted program, stored negated: solver A = -tensor.
    TA = sp.csr_matrix(pp.A)
    TA.eliminate_zeros()
    rA = _structural_rows(TA)
    rA = rA[rA < n * n_rows]  # entries of the matrix part, CSC order
    rows, cols = rA % n_rows, rA // n_rows
    offset = TA[n * n_rows : (n + 1) * n_rows]  # b (all rows, zero ones too)
    eq, cone = rows < p, rows >= p
    A_pattern = SparsePattern.from_rows_cols(rows[eq], cols[eq], (p, n))
    # CVXPY orders the cone rows nonneg, SOC, PSD, EXP; the protocol's order is nonneg,
    # SOC, EXP, PSD: move each row to its protocol position and re-sort into CSC order.
    old_of_new = _protocol_row_order(dims)
    new_of_old = np.argsort(old_of_new)
    g_rows, g_cols = new_of_old[rows[cone] - p], cols[cone]
    order = np.lexsort((g_rows, g_cols))
    G_pattern = SparsePattern.from_rows_cols(g_rows[order], g_cols[order], (m, n))
    h_rows = offset[p:][old_of_new]
    blocks += [-TA[rA[eq]], offset[:p], -TA[rA[cone][order]], h_rows]
    M = sp.vstack(blocks, format="csr")

    n_theta = int(pp.total_param_size)
    const_col = int(pp.param_id_to_col[CONSTANT_ID])
    params = []
    for prm in parameters:
        if prm.id not in pp.param_id_to_col:
            raise ProblemError(
                f"parameter {prm.name()} has an attribute (symmetric, PSD, diag, sparsity) "
                "that CVXPY reduces to a smaller parameter; declare it without the "
                "attribute and add the constraint explicitly"
            )
        params.append(
            Slot(prm.name(), tuple(prm.shape), int(pp.param_id_to_col[prm.id]), int(prm.size))
        )
    var_slots = []
    for v in variables:
        if v.id not in pp.var_id_to_col:
            raise ProblemError(
                f"variable {v.name()} was replaced by CVXPY during canonicalisation "
                "(attributes such as symmetric/PSD/diag); declare it without the attribute"
            )
        var_slots.append(Slot(v.name(), tuple(v.shape), int(pp.var_id_to_col[v.id]), int(v.size)))
    return CompiledProblem(
        M=M,
        n=n,
        P=P_pattern,
        A=A_pattern,
        G=G_pattern,
        dims=dims,
        params=params,
        variables=var_slots,
        n_theta=n_theta,
        const_col=const_col,
        quadratic=P_pattern is not None,
    )
