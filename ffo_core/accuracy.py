"""The accuracy a backend reports (``SolveInfo.accuracy``), computed from its answer.

The engine sizes the FFO's finite-difference step and its active-set thresholds from
``SolveInfo.accuracy``, so it must be the truth, in *relative* units.  Many solvers report
absolute residuals, or residuals of their own scaled problem; an adapter for one of those
calls :func:`kkt_accuracy` on the point it returns, in protocol conventions
(:mod:`ffo_core.protocol`)::

    from ffo_core.accuracy import kkt_accuracy

    info.accuracy = kkt_accuracy(g, h, e, y, nu, lam, s, extra_linear_term)

It is the largest of (all norms are infinity norms, ``q~ = q + extra_linear_term``)

* primal: ``||Ay - b|| / (1 + max(||b||, ||Ay||))`` and
  ``||Gy + s - h|| / (1 + max(||h||, ||Gy||, ||s||))``;
* dual: ``||Py + q~ + A'nu + G'lam|| / (1 + max(||q~||, ||Py||, ||A'nu||, ||G'lam||))``;
* complementarity: ``(sum |s_i lam_i| over nonnegative rows + sum |s_k'lam_k| over cone
  blocks) / (1 + |1/2 y'Py + q~'y|)``;
* cone membership: how far ``s`` lies outside ``K`` and ``lam`` outside ``K*``, over
  ``1 + ||s||`` and ``1 + ||lam||`` (nonnegative, SOC, EXP and PSD blocks);

and at least ``floor`` (a solver is never exact).  These are the measures the conformance
suite judges answers by (its own, independent implementation is
``ffo_conformance.checks.residuals``), so a backend reporting this number reports what the
suite measures.  Cost: a few sparse products and, per PSD block, one small eigenvalue
decomposition -- negligible next to a solve.
"""

from __future__ import annotations

import math

import numpy as np

from .protocol import ConeConstraints, Equalities, Objective, Solution

__all__ = ["kkt_accuracy", "solution_accuracy"]

_SQRT2 = math.sqrt(2.0)


def _inf(v) -> float:
    return float(np.max(np.abs(v), initial=0.0))


def _smat(v: np.ndarray, k: int) -> np.ndarray:
    """The symmetric ``k x k`` matrix of the protocol's svec (upper triangle by columns,
    off-diagonals times sqrt(2))."""
    S = np.zeros((k, k))
    rows, cols = np.triu_indices(k)
    order = np.lexsort((rows, cols))  # column by column
    rows, cols = rows[order], cols[order]
    vals = np.where(rows == cols, v, v / _SQRT2)
    S[rows, cols] = vals
    S[cols, rows] = vals
    return S


def _exp_outside(v: np.ndarray, dual: bool) -> float:
    x, y, z = (float(t) for t in v)
    if dual:  # K_exp* = cl{(u, v, w): u < 0, -u e^(v/u) <= e w}
        if x < -1e-300 and z > 1e-300:
            return max(0.0, -y + x + x * math.log(z / (-x)))
        return max(0.0, x) + max(0.0, -y, -z)
    worst = max(0.0, -y, -z)
    if y > 1e-300 and z > 1e-300:
        return max(worst, x - y * math.log(z / y))
    return max(worst, x)


def _outside(vec: np.ndarray, h: ConeConstraints, dual: bool) -> float:
    """Largest violation of ``vec in K`` (``K*`` when ``dual``); SOC and PSD are self-dual."""
    d = h.dims
    worst = float(np.max(-vec[: d.nonneg], initial=0.0))
    start = d.nonneg
    for size in d.soc:
        block = vec[start : start + size]
        worst = max(worst, float(np.linalg.norm(block[1:]) - block[0]))
        start += size
    for _ in range(d.exp):
        worst = max(worst, _exp_outside(vec[start : start + 3], dual))
        start += 3
    for k in d.psd:
        rows = k * (k + 1) // 2
        worst = max(worst, float(-np.linalg.eigvalsh(_smat(vec[start : start + rows], k))[0]))
        start += rows
    return max(worst, 0.0)


def _complementarity(s: np.ndarray, lam: np.ndarray, h: ConeConstraints) -> float:
    nn = h.dims.nonneg
    return float(np.sum(np.abs(s[:nn] * lam[:nn]))) + abs(float(s[nn:] @ lam[nn:]))


def kkt_accuracy(
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    y,
    nu,
    lam,
    s,
    extra_linear_term=None,
    floor: float = 1e-15,
) -> float:
    """The relative KKT residual of ``(y, nu, lam, s)`` for the problem ``(g, h, e)`` with
    ``extra_linear_term`` added to ``q`` (see the module docstring): what to report as
    ``SolveInfo.accuracy``.  Arrays are 1-D, in protocol conventions and signs."""
    y, nu = np.asarray(y, dtype=float), np.asarray(nu, dtype=float)
    lam, s = np.asarray(lam, dtype=float), np.asarray(s, dtype=float)
    q = g.q if extra_linear_term is None else g.q + np.asarray(extra_linear_term, dtype=float)
    Py = g.P @ y if g.P is not None else np.zeros_like(y)
    Atnu, Gtlam = e.A.T @ nu, h.G.T @ lam
    dual = _inf(Py + q + Atnu + Gtlam) / (1 + max(_inf(q), _inf(Py), _inf(Atnu), _inf(Gtlam)))
    Ay, Gy = e.A @ y, h.G @ y
    primal = 0.0
    if e.p:
        primal = _inf(Ay - e.b) / (1 + max(_inf(e.b), _inf(Ay)))
    if h.m:
        primal = max(primal, _inf(Gy + s - h.h) / (1 + max(_inf(h.h), _inf(Gy), _inf(s))))
    objective = 0.5 * float(y @ Py) + float(q @ y)
    gap = _complementarity(s, lam, h) / (1 + abs(objective)) if h.m else 0.0
    cone = 0.0
    if h.m:
        cone = max(
            _outside(s, h, dual=False) / (1 + _inf(s)),
            _outside(lam, h, dual=True) / (1 + _inf(lam)),
        )
    value = max(primal, dual, gap, cone, floor)
    return value if math.isfinite(value) else math.inf


def solution_accuracy(
    g: Objective,
    h: ConeConstraints,
    e: Equalities,
    sol: Solution,
    extra_linear_term=None,
    floor: float = 1e-15,
) -> float | None:
    """:func:`kkt_accuracy` of a :class:`~ffo_core.protocol.Solution` (None when it has no
    point: a status without a solution)."""
    if sol.primal is None or sol.eq_dual is None or sol.ineq_dual is None or sol.slack is None:
        return None
    return kkt_accuracy(
        g, h, e, sol.primal, sol.eq_dual, sol.ineq_dual, sol.slack, extra_linear_term, floor
    )
