"""MOSEK adapter (interior point; LP, SOCP, EXP, PSD), through MOSEK's Task API (``mosek.Task``).

Every protocol row, equalities included, becomes one affine expression of MOSEK's *affine
conic constraints* (ACCs), ``F x + g in D``, with ``F = -[A; G]`` and ``g = [b; h]`` (rows
permuted within blocks as below), so ``F x + g = [0; s]`` is the protocol's slack.  The data
translation is a set of pure functions (:func:`row_order`, :func:`domains`,
:func:`translate`, :func:`solution_from_mosek`) so that it is unit-tested without a licence;
only ``Task.optimize`` needs one.

Native conventions and how they map to the protocol (:mod:`ffo_core.protocol`):

* **Duals.**  MOSEK's conic dual is ``F' doty = c``, ``doty in D*`` (dual of
  ``min c'x s.t. Fx + g in D``).  With ``F = -[A; G]`` this is the protocol's stationarity
  ``q + A'nu + G'lam = 0`` with ``[nu; lam] = doty`` (rows permuted back): **no sign change**.
  Equalities are the zero domain (``rzero``, dual free).
* Nonnegative rows: ``rplus``; SOC(d): MOSEK's ``quadratic_cone`` (``x0 >= ||x1..||``),
  the same layout.
* **Exponential cone.**  MOSEK's primal exponential cone is
  ``{x: x0 >= x1 e^(x2/x1), x1 > 0}``, i.e. the protocol's ``(x, y, z)`` (``y e^(x/y) <= z``)
  in the order ``(z, y, x)``: rows of each block are permuted by :data:`EXP_CONE_ORDER`
  ``= (2, 1, 0)`` (CVXPY's ``MOSEK.EXP_CONE_ORDER``), duals permuted back (self-inverse).
* **PSD.**  MOSEK's ``svec_psd_cone`` holds the *lower* triangle column by column with the
  off-diagonals scaled by sqrt(2); the protocol holds the *upper* triangle column by column,
  same scaling.  The rows are permuted (lower ``(r, c)`` = upper ``(c, r)``), no rescaling;
  the cone is self-dual in that scaling, so duals take the same permutation back.
* **No quadratic objective** (:attr:`Capabilities.quadratic_objective` is False): MOSEK does
  not combine a quadratic objective with conic constraints, so the engine compiles
  ``1/2 y'Py`` into a second-order cone, as CVXPY does for MOSEK.  A nonzero ``P`` given
  directly raises :class:`~ffo_core.errors.SolverError`.

Licence: :meth:`MosekBackend.availability` first looks for a licence where MOSEK does
(``MOSEKLM_LICENSE_FILE``, else ``~/mosek/mosek.lic``) and, if one is named, checks a
licence out once per process; without one it returns ``(False, reason)`` naming
``MOSEKLM_LICENSE_FILE``.

Settings are MOSEK parameter names, ``MSK_DPAR_INTPNT_CO_TOL_REL_GAP`` or the short,
case-insensitive ``intpnt_co_tol_rel_gap``; ``time_limit`` (seconds) is an alias of
``MSK_DPAR_OPTIMIZER_MAX_TIME``.  Values are checked when the backend is made, on a scratch
``mosek.Task`` (no licence needed) through ``Task.putparam``, and NaN is refused (MOSEK
takes it).  MOSEK's defaults are kept: its interior-point tolerances (1e-8) already give
the accuracy the first-order backward needs.

Statuses: :data:`SOLSTA_MAP` on the interior-point solution status, refined by the
termination code (:data:`TRM_MAP`: iteration/time limit, stall) when the status is unknown.

Thread safety: each ``solve`` builds its own ``mosek.Task`` (tasks are not shared); the
adapter keeps no mutable state, so an instance may be used from many threads.  Interior
point: no warm start, no structure reuse.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ffo_core.backend_base import BackendBase, linear_cost
from ffo_core.errors import ConfigError, SolverError
from ffo_core.hookspecs import hookimpl
from ffo_core.protocol import (
    Capabilities,
    ConeConstraints,
    ConeDims,
    Equalities,
    Objective,
    Solution,
    SolveInfo,
    Status,
)

#: Protocol exponential-cone rows ``(x, y, z)`` in MOSEK's order (CVXPY's EXP_CONE_ORDER).
EXP_CONE_ORDER = (2, 1, 0)
LICENSE_ENV = "MOSEKLM_LICENSE_FILE"
ALIASES = {"time_limit": "MSK_DPAR_OPTIMIZER_MAX_TIME"}

#: MOSEK ``solsta`` member names -> protocol status.
SOLSTA_MAP = {
    "optimal": Status.OPTIMAL,
    "integer_optimal": Status.OPTIMAL,
    "prim_and_dual_feas": Status.OPTIMAL_INACCURATE,
    "prim_feas": Status.NUMERICAL_ERROR,
    "dual_feas": Status.NUMERICAL_ERROR,
    "prim_infeas_cer": Status.INFEASIBLE,
    "dual_infeas_cer": Status.UNBOUNDED,
    "prim_illposed_cer": Status.INFEASIBLE_INACCURATE,
    "dual_illposed_cer": Status.UNBOUNDED_INACCURATE,
    "unknown": Status.NUMERICAL_ERROR,
}
#: MOSEK termination codes (``rescode`` names) that explain an unknown solution status.
TRM_MAP = {
    "trm_max_iterations": Status.ITERATION_LIMIT,
    "trm_max_time": Status.TIME_LIMIT,
    "trm_server_max_time": Status.TIME_LIMIT,
    "trm_stall": Status.NUMERICAL_ERROR,
    "trm_numerical_problem": Status.NUMERICAL_ERROR,
    "trm_max_num_setbacks": Status.NUMERICAL_ERROR,
}

_LICENCE_LOCK = threading.Lock()
_LICENCE: dict[str, Any] = {}


# -- the translation: pure functions ----------------------------------------------------------
def psd_upper_to_lower(order: int) -> np.ndarray:
    """``idx`` with ``lower_svec = upper_svec[idx]`` for one ``order x order`` block."""
    return np.array(
        [r * (r + 1) // 2 + c for c in range(order) for r in range(c, order)], dtype=np.int64
    )


def row_order(p: int, dims: ConeDims) -> np.ndarray:
    """``perm`` with ``mosek_rows = protocol_rows[perm]`` for the stacked ``[A; G]``.

    Block order is kept (zero, nonneg, soc, exp, psd); inside a block, exponential rows are
    reordered by :data:`EXP_CONE_ORDER` and PSD rows from upper to lower triangle.  Both are
    permutations, so ``protocol[perm] = mosek`` inverts it.
    """
    perm = np.arange(p + dims.rows, dtype=np.int64)
    start = p + dims.nonneg + sum(dims.soc)
    for _ in range(dims.exp):
        perm[start : start + 3] = start + np.asarray(EXP_CONE_ORDER)
        start += 3
    for s in dims.psd:
        size = s * (s + 1) // 2
        perm[start : start + size] = start + psd_upper_to_lower(s)
        start += size
    return perm


def domains(p: int, dims: ConeDims) -> list[tuple[str, int]]:
    """The ACCs in row order: ``(MOSEK domain kind, number of rows)``."""
    out: list[tuple[str, int]] = []
    if p:
        out.append(("rzero", p))
    if dims.nonneg:
        out.append(("rplus", dims.nonneg))
    out += [("quadratic_cone", d) for d in dims.soc]
    out += [("primal_exp_cone", 3)] * dims.exp
    out += [("svec_psd_cone", s * (s + 1) // 2) for s in dims.psd]
    return out


@dataclass
class MosekData:
    """``min c'x  s.t.  F x + g in D`` in MOSEK's conventions."""

    c: np.ndarray
    F: sp.csr_matrix
    g: np.ndarray
    domains: list[tuple[str, int]]
    perm: np.ndarray
    n: int
    p: int


def translate(g: Objective, h: ConeConstraints, e: Equalities, extra_linear_term=None) -> MosekData:
    """Protocol data -> :class:`MosekData` (no MOSEK import, no licence)."""
    c = linear_cost(g, extra_linear_term, "mosek")
    perm = row_order(e.p, h.dims)
    F = -sp.vstack([e.A, h.G], format="csr")[perm]
    gv = np.concatenate([e.b, h.h])[perm].astype(float)
    return MosekData(c, sp.csr_matrix(F), gv, domains(e.p, h.dims), perm, g.n, e.p)


def build_task(task, data: MosekData) -> None:
    """Load :class:`MosekData` into an empty ``mosek.Task`` (needs no licence)."""
    import mosek

    n, k = data.n, data.F.shape[0]
    task.appendvars(n)
    task.putvarboundsliceconst(0, n, mosek.boundkey.fr, -np.inf, np.inf)
    task.putcslice(0, n, data.c)
    task.putobjsense(mosek.objsense.minimize)
    if k:
        task.appendafes(k)
        F = data.F.tocoo()
        task.putafefentrylist(F.row.astype(np.int64), F.col.astype(np.int32), F.data.astype(float))
        task.putafegslice(0, k, data.g)
    start = 0
    for kind, rows in data.domains:
        if kind == "rzero":
            dom = task.appendrzerodomain(rows)
        elif kind == "rplus":
            dom = task.appendrplusdomain(rows)
        elif kind == "quadratic_cone":
            dom = task.appendquadraticconedomain(rows)
        elif kind == "primal_exp_cone":
            dom = task.appendprimalexpconedomain()
        elif kind == "svec_psd_cone":
            dom = task.appendsvecpsdconedomain(rows)
        else:  # pragma: no cover - domains() only yields the kinds above
            raise ValueError(kind)
        task.appendacc(dom, np.arange(start, start + rows, dtype=np.int64), None)
        start += rows


def map_status(solsta: str, trm: str | None) -> Status:
    """MOSEK solution status and termination code (member names) -> protocol status."""
    status = SOLSTA_MAP.get(solsta, Status.NUMERICAL_ERROR)
    if solsta in ("unknown", "prim_feas", "dual_feas") and trm in TRM_MAP:
        return TRM_MAP[trm]
    return status


def solution_from_mosek(
    data: MosekData,
    h: ConeConstraints,
    status: Status,
    xx: np.ndarray | None,
    doty: np.ndarray | None,
    info: SolveInfo,
) -> Solution:
    """MOSEK's ``xx`` and ACC duals ``doty`` -> protocol :class:`Solution` (pure)."""
    if not status.has_solution or xx is None or doty is None:
        return Solution(status=status, info=info)
    y = np.asarray(xx, dtype=float)
    duals = np.empty(data.F.shape[0])
    duals[data.perm] = np.asarray(doty, dtype=float)
    slack = h.h - h.G @ y
    return Solution(
        status=status,
        primal=y,
        eq_dual=duals[: data.p],
        ineq_dual=duals[data.p :],
        slack=slack,
        info=info,
    )


def _enum_name(member) -> str:
    """``mosek.solsta.optimal`` -> ``"optimal"`` (MOSEK enums print as ``solsta.optimal``)."""
    return str(member).rsplit(".", 1)[-1]


# -- reading MOSEK's answer (needs a task, not a licence) -----------------------------------
def read_point(task, data: MosekData) -> tuple[np.ndarray, np.ndarray]:
    """The interior-point solution's ``xx`` and the ACC duals ``doty`` (MOSEK's order)."""
    import mosek

    itr = mosek.soltype.itr
    xx = np.asarray(task.getxx(itr), dtype=float)
    doty = np.asarray(task.getaccdotys(itr), dtype=float) if data.F.shape[0] else np.zeros(0)
    return xx, doty


def read_info(task, solsta, trm) -> SolveInfo:
    """MOSEK's interior-point feasibility measures and gap as :class:`SolveInfo`."""
    import mosek

    d = mosek.dinfitem

    def dou(item):
        try:
            return float(task.getdouinf(item))
        except mosek.Error:
            return float("nan")

    pfeas, dfeas = dou(d.intpnt_primal_feas), dou(d.intpnt_dual_feas)
    pobj, dobj = dou(d.intpnt_primal_obj), dou(d.intpnt_dual_obj)
    gap = abs(pobj - dobj) / max(1.0, abs(pobj))
    parts = [v for v in (pfeas, dfeas, gap) if np.isfinite(v)]
    try:
        iters = int(task.getintinf(mosek.iinfitem.intpnt_iter))
    except mosek.Error:
        iters = None
    return SolveInfo(
        iterations=iters,
        solve_time=dou(d.optimizer_time),
        accuracy=max(parts) if parts else None,
        raw_status=f"{_enum_name(solsta)} ({_enum_name(trm)})",
        extra={"primal_feas": pfeas, "dual_feas": dfeas, "primal_obj": pobj, "dual_obj": dobj},
    )


def read_solution(task, data: MosekData, h: ConeConstraints, trm) -> Solution:
    """After ``task.optimize()`` returned ``trm``: the protocol :class:`Solution`."""
    import mosek

    solsta = task.getsolsta(mosek.soltype.itr)
    status = map_status(_enum_name(solsta), _enum_name(trm))
    info = read_info(task, solsta, trm)
    xx = doty = None
    if status.has_solution:
        xx, doty = read_point(task, data)
    return solution_from_mosek(data, h, status, xx, doty, info)


# -- licence ----------------------------------------------------------------------------------
def licence_location() -> str | None:
    """Where MOSEK will look for a licence, if anywhere is named/exists; else None."""
    named = os.environ.get(LICENSE_ENV, "").strip()
    if named:
        return named
    default = Path.home() / "mosek" / "mosek.lic"
    return str(default) if default.is_file() else None


def licence_status() -> tuple[bool, str]:
    """``(ok, reason)``: a licence could be checked out (probed once per process)."""
    with _LICENCE_LOCK:
        if _LICENCE:
            return _LICENCE["ok"], _LICENCE["reason"]
        where = licence_location()
        if where is None:
            ok, reason = (
                False,
                (
                    f"no MOSEK licence found: set {LICENSE_ENV} to a licence "
                    f"file (or port@server), or put one at ~/mosek/mosek.lic"
                ),
            )
        else:
            import mosek

            try:
                with mosek.Env() as env:
                    env.checkoutlicense(mosek.feature.pts)
                ok, reason = True, ""
            except mosek.Error as exc:
                ok, reason = (
                    False,
                    (f"MOSEK licence at {where} ({LICENSE_ENV}) could not be checked out: {exc}"),
                )
        _LICENCE.update(ok=ok, reason=reason)
        return ok, reason


class MosekBackend(BackendBase):
    name = "mosek"
    package = "mosek"
    distribution = "Mosek"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp", "psd"}),
        quadratic_objective=False,
        warm_start=False,
        needs_license=True,
        thread_safe=True,
    )

    def __init__(self, *args: Any, **settings: Any) -> None:
        canon = {}
        for full in self._param_names():
            canon[full.lower()] = full
            canon[full[9:].lower()] = full  # strip "MSK_DPAR_"
        fixed = {}
        for key, value in settings.items():
            key = ALIASES.get(key, key)
            fixed[canon.get(key.lower(), key)] = value
        super().__init__(*args, **fixed)
        for key, value in self.settings.items():
            if isinstance(value, float) and value != value:
                raise ConfigError(f"mosek parameter {key}={value!r}: must not be NaN")
        import mosek

        with mosek.Task() as task:  # MOSEK checks names and values; no licence needed
            self._apply_settings(task)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        ok, reason = super().availability()
        if not ok:
            return ok, reason
        return licence_status()

    @staticmethod
    def _param_names() -> list[str]:
        import mosek

        names = []
        for prefix, enum in (
            ("MSK_DPAR_", mosek.dparam),
            ("MSK_IPAR_", mosek.iparam),
            ("MSK_SPAR_", mosek.sparam),
        ):
            names += [prefix + _enum_name(m).upper() for m in enum.members()]
        return names

    def setting_names(self):
        return self._param_names() + list(ALIASES)

    def _apply_settings(self, task) -> None:
        import mosek

        for key, value in self.settings.items():
            if isinstance(value, bool):
                value = "MSK_ON" if value else "MSK_OFF"
            try:
                task.putparam(key, str(value))
            except mosek.Error as exc:
                raise ConfigError(f"mosek parameter {key}={value!r}: {exc}") from exc

    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term=None,
        *,
        warm_start=None,
    ) -> Solution:
        import mosek

        data = translate(g, h, e, extra_linear_term)
        with mosek.Task() as task:
            build_task(task, data)
            self._apply_settings(task)
            try:
                trm = task.optimize()
            except mosek.Error as exc:
                if "licen" in str(exc).lower():
                    raise SolverError(
                        f"mosek: no usable licence ({exc}); set {LICENSE_ENV}", backend=self.name
                    ) from exc
                raise SolverError(f"mosek error: {exc}", backend=self.name) from exc
            return read_solution(task, data, h, trm)


@hookimpl
def ffo_register_backends(register):
    register(MosekBackend)
