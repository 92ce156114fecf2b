"""Compile a DPP CVXPY problem, once, into an affine map from parameters to solver data.

CVXPY's DPP canonicalisation (``problem.get_problem_data``) yields tensors such that the
canonical problem data is an affine function of CVXPY's parameter vector.  We keep one
sparse matrix ``M`` of shape ``(n_data, n_theta + 1)`` with

    data = M @ [theta; 1]

where ``theta`` is the layer's inputs in the user's order, each the *full* value of a user
parameter (or, for a geometric program, of its logarithm: :attr:`CompiledProblem.feeds`)
flattened in column-major order, and ``data`` is the concatenation of the protocol's
problem data (:mod:`ffo_core.protocol`) restricted to the fixed sparsity pattern:

    [ P entries (CSC order) | q | A entries (CSC order) | b | G entries (CSC order) | h ]

so that for a batch the whole forward data is one sparse mat-mul ``M @ Theta`` and the
backward map is ``M.T @ dData``.  ``P`` is stored full (both triangles), so each stored entry
is an independent coordinate of the data and needs no doubling in the backward pass.
Where CVXPY reduces a parameter (``symmetric``, ``PSD``, ``diag``, ``sparsity``: a smaller
parameter of its upper triangle, diagonal, pattern), the selection is folded into ``M``
(:func:`~.recovery.parameter_selection`), so the layer takes and returns full tensors.
The outputs -- variables, reduced ones recovered, and dual variables -- are sparse maps
of the canonical primal and dual solutions (:class:`~.recovery.OutputMap`).

We compile with CVXPY's chain for the Clarabel target (a pure canonicalisation: no solver is
called); for backends without a quadratic objective we pass ``use_quad_obj=False`` and CVXPY
moves the quadratic term into a second-order cone.  Its data, ``A x + s = b``, ``s`` in
``Zero x NonNeg x SOC x EXP x PSD``, is the protocol's convention, the zero block being the
equalities, and its duals are CVXPY's (``constraint.dual_value``) before the inversion.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from ..errors import NotDPPError, ProblemError
from ..protocol import ConeConstraints, ConeDims, Equalities, Objective, SparsePattern
from .recovery import Feed, OutputMap, dual_recovery, parameter_selection, variable_recovery

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
    params: list[Slot]  # the map's inputs (``feeds``), columns of ``M`` in this order
    variables: list[Slot]  # the requested primal variables' canonical columns
    n_theta: int
    const_col: int
    quadratic: bool
    #: what each block of ``params`` is fed with (a user parameter, or its log)
    feeds: list[Feed] = field(default_factory=list)
    #: the user's parameters (names and shapes), in the user's order
    user_params: list[Slot] = field(default_factory=list)
    #: the layer's outputs, in the user's order (:class:`~.recovery.OutputMap`)
    outputs: list[OutputMap] = field(default_factory=list)
    gp: bool = False

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


def _dual_owners(problem: cp.Problem) -> dict:
    """``{dual variable id: its constraint}`` over the problem's constraints."""
    return {dv.id: con for con in problem.constraints for dv in con.dual_variables}


def _check_problem(problem, parameters, variables, gp: bool) -> dict:
    """Refuse what cannot be a layer, naming it; returns :func:`_dual_owners`."""
    if not isinstance(problem, cp.Problem):
        raise ProblemError(f"expected a cvxpy.Problem, got {type(problem).__name__}")
    if gp:
        if not problem.is_dgp():
            raise ProblemError(
                "gp=True but the problem is not DGP (log-log convex as written); see "
                "https://www.cvxpy.org/tutorial/dgp/index.html"
            )
        # a decorator hides is_dgp's signature from mypy
        if not problem.is_dgp(dpp=True):  # type: ignore[call-arg]
            raise NotDPPError(
                "the problem is DGP but not DPP: its log-space data is not an affine "
                "function of the parameters' logarithms, so it cannot be a layer; see "
                "https://www.cvxpy.org/tutorial/dpp/index.html"
            )
    elif not problem.is_dcp():
        hint = "; it is log-log convex (DGP): pass gp=True" if problem.is_dgp() else ""
        raise ProblemError(f"the problem is not DCP (not convex as written){hint}")
    given = {p.id for p in parameters}
    missing = [p.name() for p in problem.parameters() if p.id not in given]
    if missing:
        raise ProblemError(
            "the layer's parameters must exactly match problem.parameters(): every "
            f"parameter of the problem must be listed; missing: {', '.join(missing)}"
        )
    extra = [p.name() for p in parameters if p.id not in {q.id for q in problem.parameters()}]
    if extra:
        raise ProblemError(
            "the layer's parameters must exactly match problem.parameters(): "
            f"`parameters` lists parameters the problem does not use: {', '.join(extra)}"
        )
    if len(given) != len(parameters):
        raise ProblemError("`parameters` lists a parameter twice")
    for prm in parameters:
        if prm.is_complex():
            raise ProblemError(
                f"parameter {prm.name()} is complex: the layer is real (split it into its "
                "real and imaginary parts, two real parameters)"
            )
    owners = _dual_owners(problem)
    known = {v.id for v in problem.variables()}
    for v in variables:
        if not isinstance(v, cp.Variable) or (v.id not in known and v.id not in owners):
            raise ProblemError(
                "`variables` must be a subset of problem.variables() and dual variables "
                f"of its constraints (constraint.dual_variables[k]); got {v!r}"
            )
    for v in problem.variables():
        if v.attributes.get("boolean") or v.attributes.get("integer"):
            raise ProblemError(
                f"variable {v.name()} is integer/boolean: a layer needs a "
                "convex (continuous) problem to differentiate"
            )
        if v.is_complex():
            raise ProblemError(
                f"variable {v.name()} is complex: the layer is real (write it as two real "
                "variables)"
            )
    if not variables:
        raise ProblemError("`variables` is empty: say which variables the layer returns")
    return owners


def _canonicalise(target: cp.Problem, quadratic: bool, canon_backend):
    """CVXPY's data for the Clarabel target, with its errors in our hierarchy."""
    if not quadratic and not target.is_dpp():
        # CVXPY admits a parametric quad_form(x, P) only into a quadratic objective
        raise NotDPPError(
            "the problem is not DPP for a backend without a quadratic objective: a "
            "parametric quad_form(x, P) needs a backend that takes one (e.g. clarabel, "
            "scs, gurobi, mosek), or write it as cp.sum_squares(L @ x) with L a "
            "parameter; see https://www.cvxpy.org/tutorial/dpp/index.html"
        )
    try:
        return target.get_problem_data(
            cp.CLARABEL,
            enforce_dpp=True,
            solver_opts={"use_quad_obj": quadratic},
            canon_backend=canon_backend,
        )
    except cp.error.DPPError as exc:
        raise NotDPPError(
            "the problem is DCP but not DPP: its data is not an affine function of the "
            "parameters, so it cannot be a layer (for example write `cp.sum_squares(Q @ y)` "
            "rather than `cp.quad_form(y, Q.T @ Q)`, and never multiply two parameters); "
            "see https://www.cvxpy.org/tutorial/dpp/index.html"
        ) from exc
    except (cp.error.SolverError, ValueError) as exc:
        raise ProblemError(f"CVXPY could not canonicalise the problem: {exc}") from exc


def _single(id_map: dict, key: int, what: str) -> int:
    ids = id_map.get(key, [key])
    if len(ids) != 1:
        raise ProblemError(f"{what} is split by CVXPY into {len(ids)} parts (complex?)")
    return int(ids[0])


def compile_problem(
    problem: cp.Problem,
    parameters,
    variables,
    *,
    quadratic: bool = True,
    gp: bool = False,
    canon_backend: str | None = None,
) -> CompiledProblem:
    """Canonicalise ``problem`` once; ``quadratic=False`` moves ``P`` into an SOC.

    ``variables`` may hold the problem's variables and dual variables of its constraints
    (``constraint.dual_variables[k]``).  ``gp=True``: a log-log convex (DGP) problem,
    reduced by CVXPY's ``Dgp2Dcp``; its parameters enter as their logarithms (the feeds
    say which) and its variables come back as ``exp`` of the log-space solution.
    ``canon_backend`` is passed to CVXPY."""
    parameters, variables = list(parameters), list(variables)
    owners = _check_problem(problem, parameters, variables, gp)
    index_of = {p.id: k for k, p in enumerate(parameters)}
    target, var_ids, con_ids = problem, {}, {}
    if gp:
        from cvxpy.reductions.dgp2dcp.dgp2dcp import Dgp2Dcp

        dgp = Dgp2Dcp(problem)
        target, _ = dgp.apply(problem)
        logs = {new.id: index_of[orig.id] for orig, new in dgp.canon_methods._parameters.items()}
        feeds, leaves = [], []
        for prm in target.parameters():
            if prm.id in logs:
                feeds.append(Feed(logs[prm.id], log=True))
            elif prm.id in index_of:
                feeds.append(Feed(index_of[prm.id]))
            else:
                raise ProblemError(f"internal: DGP parameter {prm.name()} has no origin")
            leaves.append(prm)
        var_ids = {k: v[0] for k, v in dgp.var_id_map.items()}
        con_ids = dict(dgp.cons_id_map)
    else:
        feeds = [Feed(k) for k in range(len(parameters))]
        leaves = parameters
    data, chain, _ = _canonicalise(target, quadratic, canon_backend)
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
    M_cvx = sp.vstack(blocks, format="csr")

    # the columns in the layer's order: each feed's full value (F-order), then the constant
    param_ids = chain.compose_param_id_map()
    final_params = {prm.id: prm for prm in pp.parameters}
    n_cvx = int(pp.total_param_size)
    fold_rows, fold_cols, fold_vals, params = [], [], [], []
    start = 0
    for feed, leaf in zip(feeds, leaves):
        user = parameters[feed.user]
        name = f"log({user.name()})" if feed.log else user.name()
        fid = _single(param_ids, leaf.id, f"parameter {user.name()}")
        if fid in pp.param_id_to_col:  # else no data depends on it: zero columns
            L = parameter_selection(leaf, int(final_params[fid].size)).tocoo()
            fold_rows.append(int(pp.param_id_to_col[fid]) + L.row)
            fold_cols.append(start + L.col)
            fold_vals.append(L.data)
        params.append(Slot(name, tuple(user.shape), start, int(user.size)))
        start += int(user.size)
    n_theta = start
    fold_rows.append([int(pp.param_id_to_col[CONSTANT_ID])])
    fold_cols.append([n_theta])
    fold_vals.append([1.0])
    fold = sp.csr_matrix(
        (np.concatenate(fold_vals), (np.concatenate(fold_rows), np.concatenate(fold_cols))),
        shape=(n_cvx + 1, n_theta + 1),
    )
    M = (M_cvx @ fold).tocsr()
    M.sort_indices()

    # the outputs: primal variables and dual variables
    var_map = chain.compose_var_id_map()
    final_vars = {v.id: v for v in pp.variables}
    target_vars = {v.id: v for v in target.variables()}
    con_map = chain.compose_constr_id_map()
    con_rows, row = {}, 0
    for con in pp.constraints:
        con_rows[con.id] = (con, row)
        row += int(con.size)
    dual_pos = np.r_[np.arange(p), p + new_of_old].astype(np.int64)  # CVXPY row -> [nu; lam]
    context = next(
        (r.solver_context for r in chain.reductions if type(r).__name__ == "ExactCone2Cone"),
        None,
    )
    outputs, var_slots = [], []
    for v in variables:
        if v.id in owners:
            con = owners[v.id]
            fid = con_map.get(con_ids.get(con.id, con.id), con_ids.get(con.id, con.id))
            if fid not in con_rows:
                raise ProblemError(
                    f"internal: constraint {con} has no rows in CVXPY's canonical program"
                )
            final, r0 = con_rows[fid]
            D = dual_recovery(v, con, final, context, int(final.size)).tocoo()
            matrix = sp.csr_matrix(
                (D.data, (D.row, dual_pos[r0 + D.col])), shape=(int(v.size), p + m)
            )
            outputs.append(OutputMap(v.name(), tuple(v.shape), "dual", matrix))
            continue
        vid = var_ids.get(v.id, v.id)
        fid = _single(var_map, vid, f"variable {v.name()}")
        if fid not in pp.var_id_to_col:
            raise ProblemError(f"variable {v.name()} has no entries in CVXPY's canonical program")
        col, size = int(pp.var_id_to_col[fid]), int(final_vars[fid].size)
        R = variable_recovery(target_vars[vid], size).tocoo()
        matrix = sp.csr_matrix((R.data, (R.row, col + R.col)), shape=(int(v.size), n))
        plain = size == v.size and not getattr(target_vars[vid], "_has_dim_reducing_attr", False)
        outputs.append(
            OutputMap(
                v.name(), tuple(v.shape), "primal", matrix, exp=gp, offset=col if plain else None
            )
        )
        var_slots.append(Slot(v.name(), tuple(v.shape), col, size))
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
        const_col=n_theta,
        quadratic=P_pattern is not None,
        feeds=feeds,
        user_params=[Slot(prm.name(), tuple(prm.shape), 0, int(prm.size)) for prm in parameters],
        outputs=outputs,
        gp=gp,
    )
