"""How the user's parameters enter the compiled map and how its solutions become the user's
variables and dual variables, as sparse linear maps built once per layer.

CVXPY does not always canonicalise a leaf as the user declared it.  A parameter declared
``symmetric``/``PSD``/``NSD`` becomes a smaller parameter holding its upper triangle, a
``diag`` one its diagonal, one with a ``sparsity`` pattern its listed entries; a variable
with such an attribute becomes a smaller variable (a symmetric one keeps its id with the
reduced size), one with ``nonneg``/``bounds``/... a new variable of the same size.  A dual
variable belongs to a constraint that the reductions turn into a cone constraint of the
final program (a PSD constraint into its scaled triangle, whose dual is unscaled and
symmetrised on the way back).  Every one of these maps is linear, and in every one each
entry of the result depends on at most one entry of the source, so each is recorded as a
sparse matrix by evaluating **CVXPY's own** map (``lower_value``,
``recover_value_for_leaf``, ``tri_to_full``, ``save_dual_value``) on two probes, ones and
labels ``1..k``, and checked on a third, random one (:func:`probe_matrix`).  The
conventions are therefore CVXPY's by construction:

* a ``symmetric``/``PSD``/``NSD`` parameter reads the **upper triangle** of the tensor it
  is given (as cvxpylayers does; the lower triangle is ignored), so its gradient lives on
  the upper triangle; a ``diag`` parameter reads the diagonal, a ``sparsity`` parameter
  its pattern (values elsewhere are refused by the layer's value checks);
* a symmetric variable comes back as the full symmetric matrix, and its upstream gradient
  is folded onto the upper triangle (``G + G' - diag G``);
* a dual variable has the shape and sign of CVXPY's ``constraint.dual_value``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import ProblemError, UnsupportedError


@dataclass(frozen=True)
class Feed:
    """One block of the compiled map's columns: user parameter ``user``'s value, or its
    logarithm (``log=True``: a geometric program's parameter), in the user's shape."""

    user: int
    log: bool = False


@dataclass
class OutputMap:
    """One output of the layer: ``value = matrix @ source`` (F-order flattening of
    ``shape``), where the source is the canonical primal ``y`` (``source="primal"``) or the
    duals ``[nu; lam]`` in the protocol's row order (``source="dual"``); ``exp``: the value
    is ``exp`` of that (a geometric program's variable).  ``offset``/``size``: when the
    map is the identity on ``source[offset : offset + size]`` (a plain variable)."""

    name: str
    shape: tuple[int, ...]
    source: str
    matrix: sp.csr_matrix
    exp: bool = False
    offset: int | None = None

    @property
    def size(self) -> int:
        return self.matrix.shape[0]


def probe_matrix(f, n_in: int, n_out: int, what: str) -> sp.csr_matrix:
    """The matrix of the linear map ``f: R^n_in -> R^n_out`` when each output depends on
    at most one input: read off ``f(ones)`` (coefficients) and ``f(1..n_in)`` (which
    input), then checked on a random vector (a :class:`ProblemError` naming ``what`` if the
    map is not of that kind)."""
    ones = np.asarray(f(np.ones(n_in)), dtype=float).ravel()
    labels = np.asarray(f(np.arange(1.0, n_in + 1.0)), dtype=float).ravel()
    if ones.size != n_out or labels.size != n_out:
        raise ProblemError(f"internal: {what}: CVXPY's map has {ones.size} entries, not {n_out}")
    rows = np.flatnonzero(ones)
    cols = np.rint(labels[rows] / ones[rows]).astype(np.int64) - 1
    if rows.size and (cols.min() < 0 or cols.max() >= n_in):
        raise ProblemError(f"internal: {what}: CVXPY's map is not a selection")
    matrix = sp.csr_matrix((ones[rows], (rows, cols)), shape=(n_out, n_in))
    check = np.random.default_rng(0).standard_normal(n_in)
    expected = np.asarray(f(check), dtype=float).ravel()
    if not np.allclose(matrix @ check, expected, rtol=1e-12, atol=1e-12):
        raise ProblemError(f"internal: {what}: CVXPY's map mixes entries; it cannot be read")
    return matrix


def _f_flat(value, shape) -> np.ndarray:
    value = value.toarray() if sp.issparse(value) else np.asarray(value, dtype=float)
    return np.reshape(value, shape, order="F").ravel(order="F")


# -- parameters ----------------------------------------------------------------------------
def parameter_selection(param, reduced_size: int) -> sp.csr_matrix:
    """``(reduced_size, param.size)``: CVXPY's reduced parameter from the full value
    (F-order), through CVXPY's own ``lower_value``; the identity for an unreduced one."""
    if not getattr(param, "_has_dim_reducing_attr", False):
        if reduced_size != param.size:
            raise ProblemError(
                f"internal: parameter {param.name()} has {reduced_size} canonical entries, "
                f"not {param.size}"
            )
        return sp.identity(param.size, format="csr")
    from cvxpy.reductions.cvx_attr2constr import lower_value

    shape = tuple(param.shape)

    def f(full):
        return lower_value(param, np.reshape(full, shape, order="F"))

    return probe_matrix(f, int(param.size), reduced_size, f"parameter {param.name()}")


# -- primal variables ----------------------------------------------------------------------
def variable_recovery(var, reduced_size: int) -> sp.csr_matrix:
    """``(var.size, reduced_size)``: the variable's F-order value from CVXPY's canonical
    variable, through CVXPY's own ``recover_value_for_leaf`` (no projection)."""
    from cvxpy.reductions.cvx_attr2constr import recover_value_for_leaf

    shape = tuple(var.shape)
    reduced = getattr(var, "_has_dim_reducing_attr", False)
    if not reduced:
        if reduced_size != var.size:
            raise ProblemError(
                f"internal: variable {var.name()} has {reduced_size} canonical entries, "
                f"not {var.size}"
            )
        return sp.identity(var.size, format="csr")

    def f(x):
        return _f_flat(recover_value_for_leaf(var, x, project=False), shape)

    return probe_matrix(f, reduced_size, int(var.size), f"variable {var.name()}")


# -- dual variables --------------------------------------------------------------------------
#: The user constraints whose duals are supported, by the class of the final (cone)
#: constraint they become.
_DUAL_KINDS = {
    "Zero": ("Zero", "Equality"),
    "NonNeg": ("NonNeg", "NonPos", "Inequality"),
    "SOC": ("SOC",),
    "SvecPSD": ("PSD",),
    "ExpCone": ("ExpCone",),
}


def dual_recovery(dual_var, constraint, final, solver_context, n_final: int) -> sp.csr_matrix:
    """``(dual_var.size, n_final)``: the dual variable (F-order, CVXPY's
    ``constraint.dual_value`` convention) from the dual of the ``final`` cone constraint
    ``constraint`` becomes (its ``n_final`` rows in CVXPY's order, the solver's dual on
    them), as CVXPY's inversion does it: reshape, the PSD triangle unscaled and
    symmetrised (``tri_to_full`` with the target's triangle and scaling), then the
    constraint's own ``save_dual_value`` (on a copy: the user's constraint is not
    touched)."""
    user_kind, final_kind = type(constraint).__name__, type(final).__name__
    if user_kind not in _DUAL_KINDS.get(final_kind, ()):
        raise UnsupportedError(
            f"the dual variable of constraint {constraint} ({user_kind}, canonicalised by "
            f"CVXPY as {final_kind}) cannot be a layer output; supported: duals of "
            "equality, inequality, SOC, exponential-cone and PSD constraints"
        )
    index = next(
        (k for k, dv in enumerate(constraint.dual_variables) if dv.id == dual_var.id), None
    )
    if index is None:
        raise ProblemError(f"internal: {dual_var} is not a dual variable of {constraint}")
    final_shape = tuple(final.shape)
    copy = constraint.copy()

    def f(z):
        value = z
        if final_kind == "SvecPSD":
            from cvxpy.utilities.psd_utils import tri_to_full

            n = constraint.args[0].shape[-1]
            value = tri_to_full(
                np.asarray(z, float),
                n,
                solver_context.psd_triangle_kind,
                solver_context.psd_sqrt2_scaling,
            ).reshape(constraint.args[0].shape)
        elif final_kind not in ("SOC", "ExpCone") and final_shape != ():
            value = np.reshape(z, final_shape, order="F")
        copy.save_dual_value(value)
        return _f_flat(copy.dual_variables[index].value, tuple(dual_var.shape))

    return probe_matrix(f, n_final, int(dual_var.size), f"the dual of {constraint}")


__all__ = [
    "Feed",
    "OutputMap",
    "dual_recovery",
    "parameter_selection",
    "probe_matrix",
    "variable_recovery",
]
