"""The gradient of the loss with respect to one sample's problem data, and its low-rank form.

Every backward mode (first-order, exact KKT, Alt-Diff) ends the same way: a base point
``(y, nu, lam)`` and a direction ``(w_y, w_nu, w_lam)`` (what the solution does per unit of
the upstream gradient), and the data gradient is the derivative of the Lagrangian's data
gradient ``grad_data L`` at the base point along the direction
(:func:`lagrangian_gradient_derivative`):

    dq = w_y,   db = -w_nu,   dh = -w_lam,
    dP_ij = (w_y_i y_j + y_i w_y_j) / 2,
    dA_ij = w_nu_i y_j + nu_i w_y_j,
    dG_ij = w_lam_i y_j + lam_i w_y_j,

each matrix part on its sparsity pattern only.  Each matrix part is ``U V'`` with two
columns per factor (:func:`low_rank_factors`, the one place the formula is written), so a
sum over a batch is one rank-``2 batch`` product and nothing of size ``n x n`` is formed
unless the pattern is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..protocol import ConeConstraints, Equalities, Objective

#: For each matrix section, the index in ``(y, nu, lam)`` of the vector its rows pair with,
#: and the factor of the symmetric average (``P`` is stored full, ``y'Py/2``).
_SECTIONS = {"P": (0, 0.5), "A": (1, 1.0), "G": (2, 1.0)}


def low_rank_factors(
    name: str, bases: Sequence[tuple], directions: Sequence[tuple]
) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)`` with ``U V' = sum_k`` (sample ``k``'s gradient of matrix section
    ``name``, on every entry): for ``P``, ``A``, ``G`` with row vector ``u`` = ``y``, ``nu``,
    ``lam`` and its direction ``w_u``,

        U = f [w_u^1 .. w_u^K  u^1 .. u^K],   V = [y^1 .. y^K  w_y^1 .. w_y^K],

    ``f`` = 1/2 for ``P``, 1 otherwise.  Shapes ``(rows, 2K)`` and ``(n, 2K)``."""
    k, half = _SECTIONS[name]
    U = np.column_stack([d[k] for d in directions] + [b[k] for b in bases])
    V = np.column_stack([b[0] for b in bases] + [d[0] for d in directions])
    return (half * U if half != 1.0 else U), V


class DataGradient:
    """Gradient of the loss with respect to one sample's problem data.

    ``P``, ``A``, ``G`` are aligned with the ``.data`` arrays of the sample's CSC matrices
    (the fixed sparsity pattern); ``q``, ``b``, ``h`` are dense.

    Made by :meth:`along` (what every backward mode returns), the gradient is *low rank*
    (``base`` and ``direction`` set): the pattern arrays are formed only when first read.
    The engine never reads them: it sums the shared parameters' gradient over the batch as
    one low-rank product and evaluates the batched ones on the entries they touch
    (:mod:`ffo_core.datamap.param_map`).  Built from explicit arrays, it is a plain
    gradient (``low_rank`` False).
    """

    def __init__(
        self,
        P: np.ndarray | None,
        q: np.ndarray,
        A: np.ndarray | None,
        b: np.ndarray,
        G: np.ndarray | None,
        h: np.ndarray,
        diagnostics: dict | None = None,
    ) -> None:
        self._matrices = {"P": P, "A": A, "G": G}
        self.q, self.b, self.h = q, b, h
        self.diagnostics = diagnostics if diagnostics is not None else {}
        #: ``(y, nu, lam)`` the derivative was taken at, and the direction ``d(y, nu,
        #: lam)/d delta`` per unit of ``c`` (set by :meth:`along`).
        self.base: tuple | None = None
        self.direction: tuple | None = None
        self._patterns: dict | None = None
        #: set when the batch that made this gradient checked it (:meth:`is_finite`)
        self._finite: bool | None = None

    @classmethod
    def along(
        cls, g: Objective, h: ConeConstraints, e: Equalities, base: tuple, direction: tuple
    ) -> DataGradient:
        """The derivative of ``grad_data L`` at ``base`` along ``direction``, its matrix
        parts formed lazily."""
        y, nu, lam = (np.asarray(v, dtype=float) for v in base)
        wy, wnu, wlam = (np.asarray(v, dtype=float) for v in direction)
        grad = cls(None, wy, None, -wnu, None, -wlam)
        grad.base, grad.direction = (y, nu, lam), (wy, wnu, wlam)
        grad._patterns = {"P": g.P, "A": e.A, "G": h.G}
        return grad

    def _matrix(self, name: str) -> np.ndarray:
        value = self._matrices[name]
        if value is None:
            M = self._patterns[name] if self._patterns else None
            if M is None:
                value = np.zeros(0)
            else:
                U, V = low_rank_factors(name, [self.base], [self.direction])
                value = pattern_entries(M, U, V)
            self._matrices[name] = value
        return value

    P = property(lambda self: self._matrix("P"))
    A = property(lambda self: self._matrix("A"))
    G = property(lambda self: self._matrix("G"))

    def pattern(self, name: str):
        """The matrix (``"P"``, ``"A"`` or ``"G"``) whose sparsity pattern that part lives
        on, for a low-rank gradient; None otherwise."""
        return self._patterns.get(name) if self._patterns else None

    @property
    def low_rank(self) -> bool:
        """True when ``base``/``direction`` describe every part exactly."""
        return self.base is not None and self.direction is not None and self._patterns is not None

    def vector(self) -> np.ndarray:
        """Concatenation in the compiled data order ``[P | q | A | b | G | h]``."""
        return np.concatenate([self.P, self.q, self.A, self.b, self.G, self.h])

    def is_finite(self) -> bool:
        """True when every entry is finite (for a low-rank gradient: its factors, without
        forming the pattern arrays; an overflow of their products is caught where the
        parameter gradient is assembled)."""
        if self._finite is not None:
            return self._finite
        if self.low_rank:
            return bool(np.isfinite(np.concatenate((*self.base, *self.direction))).all())
        return all(
            np.isfinite(part).all() for part in (self.P, self.q, self.A, self.b, self.G, self.h)
        )


def pattern_entries(M: sp.csc_matrix, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``(U V')_ij`` for every stored entry ``(i, j)`` of CSC ``M``, in storage order."""
    cols = np.repeat(np.arange(M.shape[1]), np.diff(M.indptr))
    return np.einsum("ij,ij->i", U[M.indices], V[cols])


def lagrangian_gradient_derivative(
    g: Objective, h: ConeConstraints, e: Equalities, base: tuple, direction: tuple
) -> DataGradient:
    """Derivative of ``grad_data L`` at ``base = (y, nu, lam)`` along
    ``direction = (w_y, w_nu, w_lam)``, on the data's sparsity pattern (module docstring)."""
    return DataGradient.along(g, h, e, base, direction)


__all__ = [
    "DataGradient",
    "lagrangian_gradient_derivative",
    "low_rank_factors",
    "pattern_entries",
]
