"""What the checks measure, computed from the problem data and the returned vectors only.

Residuals of a returned ``Solution`` (all relative, infinity norms):

* ``primal_res``  = max( ||Ay - b|| / (1 + max(||b||, ||Ay||)),
                         ||Gy + s - h|| / (1 + max(||h||, ||Gy||, ||s||)) )
* ``dual_res``    = ||Py + q + A'nu + G'lam|| / (1 + max(||q||, ||Py||, ||A'nu||, ||G'lam||))
  (a flipped or scaled multiplier shows up here first)
* ``cone_res``    = max( dist-like violation of s in K / (1 + ||s||),
                         violation of lam in K* / (1 + ||lam||) )   (see ffo_conformance.cones)
* ``complementarity`` = (sum_i |s_i lam_i| over nonnegative rows + sum_k |s_k'lam_k| over
  cone blocks) / (1 + |1/2 y'Py + q'y|)
* ``dist_primal`` = ||y - y_ref|| / (1 + ||y_ref||), ``dist_dual`` the same for nu and lam.

Gradients are compared per block of the data (``P, q, A, b, G, h``; protocol instances) or
per parameter (layer instances): ``rel[X] = ||g_X - r_X|| / max(||r_X||, floor)`` with
``floor = GRAD_BLOCK_FLOOR * ||r||``, and ``cos[X]`` (only where ``||r_X|| >= floor``).

Also here: the worst value of a metric over samples (:func:`keep_worst`), the status as
reported (:func:`status_word`) and the guess at a dual sign or scale bug (:func:`dual_hint`).
"""

from __future__ import annotations

import math

import numpy as np

from ffo_core.protocol import Solution

from . import cones
from . import tolerances as T
from .results import Fail, Metric
from .zoo import Sample

#: The data blocks a protocol instance's gradient is compared by.
BLOCKS = ("P", "q", "A", "b", "G", "h")


def inf_norm(v) -> float:
    """``||v||_inf`` (0 for an empty array)."""
    v = np.asarray(v, dtype=float)
    return float(np.max(np.abs(v), initial=0.0))


def rel_diff(a, b) -> float:
    """``||a - b||_inf / (1 + ||b||_inf)``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return math.inf
    return inf_norm(a - b) / (1.0 + inf_norm(b))


def check_shapes(sample: Sample, sol: Solution) -> None:
    """Raise :class:`~ffo_conformance.results.Fail` unless every vector of ``sol`` is there,
    finite and of the sample's size."""
    g, h, e = sample.g, sample.h, sample.e
    want = {"primal": g.n, "eq_dual": e.p, "ineq_dual": h.m, "slack": h.m}
    for name, size in want.items():
        v = getattr(sol, name)
        if v is None:
            raise Fail(f"Solution.{name} is None although the status is {sol.status.value}")
        v = np.asarray(v)
        if v.shape != (size,):
            raise Fail(f"Solution.{name} has shape {v.shape}, expected ({size},)")
        if not np.all(np.isfinite(v)):
            raise Fail(f"Solution.{name} contains NaN or Inf")


def residuals(sample: Sample, sol: Solution) -> dict[str, float]:
    """The residuals of the module docstring."""
    g, h, e = sample.g, sample.h, sample.e
    y, nu = np.asarray(sol.primal, float), np.asarray(sol.eq_dual, float)
    lam, s = np.asarray(sol.ineq_dual, float), np.asarray(sol.slack, float)
    Py = g.P @ y if g.P is not None else np.zeros_like(y)
    Atnu, Gtl = e.A.T @ nu, h.G.T @ lam
    dual = inf_norm(Py + g.q + Atnu + Gtl) / (
        1 + max(inf_norm(g.q), inf_norm(Py), inf_norm(Atnu), inf_norm(Gtl))
    )
    Ay, Gy = e.A @ y, h.G @ y
    p_eq = inf_norm(Ay - e.b) / (1 + max(inf_norm(e.b), inf_norm(Ay))) if e.p else 0.0
    p_in = (
        inf_norm(Gy + s - h.h) / (1 + max(inf_norm(h.h), inf_norm(Gy), inf_norm(s))) if h.m else 0.0
    )
    cone = max(
        cones.violation(s, h.dims) / (1 + inf_norm(s)),
        cones.violation(lam, h.dims, dual=True) / (1 + inf_norm(lam)),
    )
    obj = 0.5 * float(y @ Py) + float(g.q @ y)
    compl = cones.complementarity(s, lam, h.dims) / (1 + abs(obj))
    return {
        "primal_res": max(p_eq, p_in),
        "dual_res": dual,
        "cone_res": cone,
        "complementarity": compl,
    }


def distances(sol: Solution, ref: Solution) -> dict[str, float]:
    """``dist_primal`` and ``dist_dual`` of the module docstring."""
    return {
        "dist_primal": rel_diff(sol.primal, ref.primal),
        "dist_dual": max(
            rel_diff(sol.eq_dual, ref.eq_dual), rel_diff(sol.ineq_dual, ref.ineq_dual)
        ),
    }


def compare_gradients(
    test: dict[str, np.ndarray], ref: dict[str, np.ndarray]
) -> dict[str, tuple[float, float | None]]:
    """Per block ``(rel, cos)``; ``cos`` None where the reference block is ~0."""
    total = math.sqrt(sum(float(np.sum(np.square(r))) for r in ref.values()))
    floor = max(T.GRAD_BLOCK_FLOOR * total, 1e-300)
    out: dict[str, tuple[float, float | None]] = {}
    for name, r in ref.items():
        r = np.asarray(r, float).ravel()
        t = np.asarray(test[name], float).ravel()
        if r.size == 0:
            continue
        if t.shape != r.shape:
            out[name] = (math.inf, None)
            continue
        nr, nt = float(np.linalg.norm(r)), float(np.linalg.norm(t))
        rel = float(np.linalg.norm(t - r)) / max(nr, floor)
        cos = None
        if nr >= floor:
            cos = float(t @ r) / (nr * nt) if nt > 0 else 0.0
        out[name] = (rel, cos)
    return out


def grad_blocks(grad) -> dict[str, np.ndarray]:
    """A protocol gradient's data blocks by name (:data:`BLOCKS`)."""
    return {k: getattr(grad, k) for k in BLOCKS}


def keep_worst(
    metrics: dict[str, Metric], name: str, value: float | None, tol: float, kind: str = "max"
) -> None:
    """Keep the worst value of a metric over samples."""
    if value is None:
        return
    old = metrics.get(name)
    if (
        old is None
        or (kind == "max" and not value <= old.value)
        or (kind == "min" and not value >= old.value)
    ):
        metrics[name] = Metric(name, value, tol, kind)


def status_word(sol: Solution) -> str:
    """``optimal`` or ``iteration_limit ('MaxIterations')``: the protocol's status and the
    solver's own word (``SolveInfo.raw_status``) where the adapter reports one."""
    raw = getattr(sol.info, "raw_status", None)
    return f"{sol.status.value} ({raw!r})" if raw not in (None, "") else sol.status.value


def dual_hint(smp: Sample, sol: Solution, tol: float) -> str:
    """Where the dual residual fails, a guess at the adapter bug: the first simple change of
    the returned duals (a sign, a factor 2) that makes ``dual_res`` and ``cone_res`` pass."""
    lam, nu = np.asarray(sol.ineq_dual, float), np.asarray(sol.eq_dual, float)
    tries = [
        ("ineq_dual negated", -lam, nu),
        ("eq_dual negated", lam, -nu),
        ("both duals negated", -lam, -nu),
        ("duals twice too large", lam / 2, nu / 2),
        ("duals half too small", 2 * lam, 2 * nu),
    ]
    for label, lam_t, nu_t in tries:
        trial = Solution(sol.status, sol.primal, nu_t, lam_t, sol.slack, sol.info)
        res = residuals(smp, trial)
        if res["dual_res"] <= tol and res["cone_res"] <= tol:
            return (
                f"{label}? (so changed, the dual residual would be {res['dual_res']:.1e}; "
                "protocol: P y + q + A'nu + G'lam = 0 with lam in K*)"
            )
    return ""
