"""SCS adapter (operator splitting; LP, QP, SOC, EXP, PSD), through SCS's native ``scs.SCS``.

Size: one adapter; SCS's row order, its PSD scaling and its status quirks are stated and
converted here, next to each other.

Native conventions and how they map to the protocol (:mod:`ffo_core.protocol`) -- all of
them are applied in one place, :func:`scs_row_order` and :meth:`ScsBackend._to_protocol`:

* SCS solves ``min 1/2 x'Px + c'x  s.t.  Ax + s = b, s in K`` with ``P`` given as its upper
  triangle and returns ``y`` with ``Px + c + A'y = 0``, ``y in K*``.  We stack
  ``[A_eq; G]`` with a zero cone (``z``) first, so ``y = [nu; lam]`` and ``s = [0; s]``:
  **no sign change** for duals or slacks.
* **Cone order.**  SCS orders its cones ``z, l, q, s (PSD), ep (exp)`` -- PSD blocks come
  *before* the exponential cones -- while the protocol orders ``zero, nonneg, soc, exp, psd``.
  The rows of the exponential and PSD blocks are therefore permuted on the way in (``A``,
  ``b``) and back on the way out (``y``, ``s``).
* **PSD vectorisation.**  SCS stores a symmetric matrix as its *lower* triangle stacked column
  by column, ``(0,0), (1,0), (2,0), ..., (1,1), (2,1), ...``; the protocol (Clarabel's layout)
  uses the *upper* triangle column by column, ``(0,0), (0,1), (1,1), (0,2), ...``.  Both scale
  off-diagonal entries by sqrt(2), so the conversion is a pure row permutation (the lower
  entry ``(r, c)`` is the upper entry ``(c, r)``), with no rescaling.
* The exponential cone is the same set in both (``y e^(x/y) <= z``), rows ``(x, y, z)``.

Settings are SCS's own names (:data:`SCS_SETTINGS`: ``eps_abs``, ``eps_rel``, ``max_iters``,
``time_limit_secs``, ``linear_solver``, ...); ``time_limit`` (seconds, the protocol's generic
name) is accepted as an alias of ``time_limit_secs``.  ``verbose`` defaults to False.
:meth:`ScsBackend.with_settings` returns a configured copy (``FFOLayer(time_limit=...)``).
One adapter option is not an SCS setting: ``cache_size`` (default 0: off; e.g. 4 to reuse
workspaces), see below.  Values are checked when the backend is made (types, NaN, signs,
then SCS's own validation of a one-row problem), so ``"scs:eps_abs=abc"`` is a
:class:`~ffo_core.errors.ConfigError` naming ``eps_abs`` before any solve.

Defaults (:data:`DEFAULTS`): ``eps_abs = eps_rel = 1e-9`` instead of SCS's ``1e-4``.  The
first-order backward differences two solutions ``delta`` apart, so a forward point accurate
to SCS's own ``1e-4`` gives gradients off by 1e-3..1e-1 (and fails the conformance suite);
at 1e-9 the gradients agree with the exact ones to about 1e-6.  The cost is iterations:
docs/backends.md has the measured times.  Settings given by the user replace these.

Ctrl-C: SCS installs its own SIGINT handler while it sets up and while it iterates; a
solve it stops that way ("interrupted") raises ``KeyboardInterrupt`` here.  A Ctrl-C that
lands while SCS sets up a problem is swallowed by SCS (its set-up does not report it) and
only the next one counts; the adapter runs SCS under
:func:`~ffo_core.backend_base.native_solve`, so that concurrent solves in several threads
cannot leave SCS's handler installed once they are over.

Statuses (:data:`STATUS_MAP`): SCS reports ``solved (inaccurate - reached max_iters)`` when it
stops at its iteration or time limit, even after a handful of iterations.  That point is only
SCS's best guess, so we report :attr:`Status.ITERATION_LIMIT` / :attr:`Status.TIME_LIMIT`
(the point is still attached to the :class:`Solution` for inspection), never an optimum.

Structure reuse and warm start.  When two solves share ``P``, ``A``, ``G`` and the cones and
differ only in ``b``, ``h``, ``q`` (or the extra linear term) -- the common training case in
which only a linear term is a parameter -- the adapter reuses the SCS workspace (and its
factorisation) through ``solver.update(b=..., c=...)``.  Workspaces are cached **per thread**
(``threading.local``), keyed by the exact matrix data, in a small LRU of ``cache_size``
entries; the key is checked by value, so a hit is never a different problem.  A reused
workspace keeps SCS's adapted internal scale from its previous solve, so results may differ
from a fresh solve at the level of the tolerance (measured: ~1e-8 at eps 1e-9, which the
first-order backward amplifies by 1/delta), so the cache is **off by default**, keeping
repeated calls bit-for-bit deterministic; turn it on with ``"scs:cache_size=4"`` when
speed matters more (measured: 7.3 -> 3.4 ms per solve).  ``warm_start`` (a protocol
:class:`Solution` of the same sizes) is passed to SCS as its ``x``/``y``/``s`` warm start;
without one, every solve starts cold, so results do not depend on call history.

Thread safety: an instance may be used from several threads at once; each thread has its own
cache of SCS workspaces (an SCS workspace must not be shared between threads), and the
settings are read-only after construction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from ffo_core.backend_base import (
    BackendBase,
    check_bool,
    check_number,
    data_digest,
    interrupted,
    native_solve,
    note_scaling,
    same_sparse,
)
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

#: SCS 3.x settings (``ScsSettings`` fields, plus the Python-level ``linear_solver``; SCS's
#: own ``warm_start`` flag is driven by the ``warm_start`` argument of :meth:`solve`).  A name
#: listed here that the installed SCS does not know is reported as a ConfigError at solve time.
SCS_SETTINGS = (
    "normalize",
    "scale",
    "adaptive_scale",
    "rho_x",
    "max_iters",
    "eps_abs",
    "eps_rel",
    "eps_infeas",
    "alpha",
    "time_limit_secs",
    "verbose",
    "acceleration_lookback",
    "acceleration_interval",
    "write_data_filename",
    "log_csv_filename",
    "linear_solver",
    # present in recent SCS 3.x builds
    "acceleration_type_1",
    "acceleration_relaxation",
    "acceleration_regularization",
    "adaptive_diag_scale",
)
#: How each SCS setting's value is checked at construction: ``(kind, minimum, strictly)``
#: with kind ``"float"``, ``"int"``, ``"bool"``, ``"str"``; SCS then validates the whole set.
SETTING_KINDS = {
    "normalize": ("bool", None, False),
    "scale": ("float", 0.0, True),
    "adaptive_scale": ("bool", None, False),
    "rho_x": ("float", 0.0, True),
    "max_iters": ("int", 1, False),
    "eps_abs": ("float", 0.0, False),
    "eps_rel": ("float", 0.0, False),
    "eps_infeas": ("float", 0.0, False),
    "alpha": ("float", 0.0, True),
    "time_limit_secs": ("float", 0.0, False),
    "verbose": ("int", 0, False),
    "acceleration_lookback": ("int", None, False),
    "acceleration_interval": ("int", 1, False),
    "write_data_filename": ("str", None, False),
    "log_csv_filename": ("str", None, False),
    "acceleration_type_1": ("bool", None, False),
    "acceleration_relaxation": ("float", None, False),
    "acceleration_regularization": ("float", 0.0, False),
    "adaptive_diag_scale": ("bool", None, False),
}
#: This adapter's defaults where they differ from SCS's (see the module docstring); the
#: user's settings replace them.
DEFAULTS = {"eps_abs": 1e-8, "eps_rel": 1e-8}
#: Protocol-level aliases -> SCS names.
ALIASES = {"time_limit": "time_limit_secs"}
#: Options of this adapter that are not SCS settings.
ADAPTER_OPTIONS = ("cache_size",)

#: SCS ``status_val`` -> protocol status.  Limits are refined by :data:`LIMIT_STATUS`.
STATUS_MAP = {
    1: Status.OPTIMAL,  # solved
    2: Status.OPTIMAL_INACCURATE,  # solved (inaccurate - ...)
    -1: Status.UNBOUNDED,
    -6: Status.UNBOUNDED_INACCURATE,
    -2: Status.INFEASIBLE,
    -7: Status.INFEASIBLE_INACCURATE,
    -3: Status.NUMERICAL_ERROR,  # indeterminate
    -4: Status.NUMERICAL_ERROR,  # failed
    -5: Status.NUMERICAL_ERROR,  # interrupted (SIGINT): raised as KeyboardInterrupt
    0: Status.NUMERICAL_ERROR,  # unfinished
}
#: An inaccurate "solved" (or an undecided) status that SCS reached by hitting a limit is
#: reported as the limit: (substring of SCS's status word, protocol status).
LIMIT_STATUS = (("max_iters", Status.ITERATION_LIMIT), ("time_limit", Status.TIME_LIMIT))
_LIMITABLE = {2, -3, 0, -5}  # status_vals that a limit turns into *_LIMIT


# -- conventions: pure functions ----------------------------------------------------------
def psd_upper_to_lower(order: int) -> np.ndarray:
    """``idx`` such that ``lower_svec = upper_svec[idx]`` for one ``order x order`` block.

    Upper column-major position of ``(i, j)``, ``i <= j``, is ``j(j+1)/2 + i``; SCS's lower
    column-major order visits ``(r, c)``, ``r >= c``, column by column, i.e. the upper entry
    ``(c, r)``.  Both layouts scale off-diagonals by sqrt(2), so no rescaling is needed.
    """
    return np.array(
        [r * (r + 1) // 2 + c for c in range(order) for r in range(c, order)], dtype=np.int64
    )


def scs_row_order(p: int, dims: ConeDims) -> np.ndarray:
    """``perm`` with ``scs_rows = protocol_rows[perm]`` for the stacked ``[A_eq; G]``.

    Protocol rows: ``zero(p), nonneg, soc, exp, psd``; SCS rows: ``z, l, q, s (psd), ep``,
    each PSD block re-vectorised from upper to lower triangle.  ``perm`` is a permutation,
    so ``protocol[perm] = scs`` inverts it.
    """
    head = p + dims.nonneg + sum(dims.soc)
    exp_start = head
    psd_start = exp_start + 3 * dims.exp
    parts = [np.arange(head, dtype=np.int64)]
    start = psd_start
    for s in dims.psd:
        parts.append(start + psd_upper_to_lower(s))
        start += s * (s + 1) // 2
    parts.append(np.arange(exp_start, psd_start, dtype=np.int64))
    return np.concatenate(parts)


def scs_cones(p: int, dims: ConeDims) -> dict[str, Any]:
    """SCS's cone dictionary (SCS >= 3 names)."""
    cone: dict[str, Any] = {}
    if p:
        cone["z"] = int(p)
    if dims.nonneg:
        cone["l"] = int(dims.nonneg)
    if dims.soc:
        cone["q"] = [int(k) for k in dims.soc]
    if dims.psd:
        cone["s"] = [int(k) for k in dims.psd]
    if dims.exp:
        cone["ep"] = int(dims.exp)
    return cone


def map_status(status_val: int, status_word: str) -> Status:
    """SCS status -> protocol status (see :data:`STATUS_MAP`, :data:`LIMIT_STATUS`)."""
    status = STATUS_MAP.get(int(status_val), Status.NUMERICAL_ERROR)
    if int(status_val) in _LIMITABLE:
        for needle, limit in LIMIT_STATUS:
            if needle in status_word:
                return limit
    return status


class ScsBackend(BackendBase):
    name = "scs"
    package = "scs"
    distribution = "scs"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp", "psd"}),
        quadratic_objective=True,
        warm_start=True,
        thread_safe=True,
    )

    #: cvxpylayers' common ``solver_args`` keys and this solver's settings for them
    #: (:mod:`ffo_core.solver_args`)
    solver_arg_names: ClassVar[dict] = {"eps": ("eps_abs", "eps_rel")}

    _transient = ("_local",)

    def __init__(self, *args: Any, **settings: Any) -> None:
        settings = {ALIASES.get(k, k): v for k, v in settings.items()}
        super().__init__(*args, **settings)
        self.cache_size = self._pop_cache_size(0)
        self.solver_settings = {"verbose": False, **DEFAULTS, **self.settings}
        self._validate()
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._local = threading.local()

    def setting_names(self):
        return SCS_SETTINGS + tuple(ALIASES) + ADAPTER_OPTIONS

    def _validate(self) -> None:
        """Types, NaN and signs per :data:`SETTING_KINDS`, then SCS's own validation of a
        one-row problem with these settings (no file is written, nothing is printed)."""
        for key, value in self.settings.items():
            kind, low, strict = SETTING_KINDS.get(key, (None, None, False))
            if key == "verbose" and isinstance(value, bool):
                continue
            if kind == "bool":
                check_bool(self.name, key, value)
            elif kind in ("int", "float"):
                check_number(
                    self.name, key, value, integer=kind == "int", minimum=low, positive=strict
                )
            elif kind == "str" and not isinstance(value, str):
                raise ConfigError(f"scs setting {key}={value!r}: must be a string")
        if "linear_solver" in self.settings:
            import scs

            solver = self.settings["linear_solver"]
            known = [m.value for m in scs.LinearSolver]
            if not isinstance(solver, (str, scs.LinearSolver)) or (
                isinstance(solver, str) and solver not in known
            ):
                raise ConfigError(
                    f"scs setting linear_solver={solver!r}: must be one of {', '.join(known)}"
                )
        probe = {
            k: v
            for k, v in self.solver_settings.items()
            if k not in ("write_data_filename", "log_csv_filename")
        }
        probe["verbose"] = False
        data = {"A": sp.csc_matrix(np.ones((1, 1))), "b": np.ones(1), "c": np.zeros(1)}
        try:
            self._make_solver(data, {"l": 1}, probe)
        except SolverError as exc:
            raise ConfigError(f"scs rejected its settings: {exc}") from exc

    # -- solver objects, cached per thread --------------------------------------------------
    def _cache(self) -> OrderedDict:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        return cache

    def _make_solver(self, data: dict, cone: dict, settings: dict | None = None):
        import scs

        settings = self.solver_settings if settings is None else settings
        try:
            # SCS pops "linear_solver" from the dict it is given: pass a copy.
            with native_solve():  # SCS listens for SIGINT while it sets up
                return scs.SCS(data, cone, **dict(settings))
        except ImportError as exc:
            raise ConfigError(
                f"scs setting linear_solver={settings.get('linear_solver')!r}: that linear "
                f"solver is not available in this SCS build ({exc})"
            ) from exc
        except TypeError as exc:
            raise ConfigError(
                f"scs rejected its settings: {exc}; "
                f"valid settings: {', '.join(sorted(self.setting_names()))}"
            ) from exc
        except ValueError as exc:
            if "must be" in str(exc) or "setting" in str(exc).lower():
                raise ConfigError(f"scs setting: {exc}") from exc
            raise SolverError(
                f"scs could not set up the problem: {exc}", backend=self.name
            ) from exc

    def _solver_for(self, P, A, b, c, cone):
        """An SCS object holding ``(P, A, cone)`` with ``b``, ``c`` loaded; reused if cached."""
        if self.cache_size == 0:
            return self._make_solver({"P": P, "A": A, "b": b, "c": c}, cone)
        mats = [A.data, A.indices, A.indptr, np.array(A.shape)]
        if P is not None:
            mats += [P.data, P.indices, P.indptr]
        key = (data_digest(mats), tuple(sorted((k, str(v)) for k, v in cone.items())))
        cache = self._cache()
        entry = cache.get(key)
        if entry is not None and self._same(entry[1], P, A):
            cache.move_to_end(key)
            entry[0].update(b=b, c=c)
            return entry[0]
        solver = self._make_solver({"P": P, "A": A, "b": b, "c": c}, cone)
        cache[key] = (solver, (None if P is None else P.copy(), A.copy()))
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return solver

    @staticmethod
    def _same(stored, P, A) -> bool:
        P0, A0 = stored
        if (P0 is None) != (P is None):
            return False
        return same_sparse(A0, A) and (P is None or same_sparse(P0, P))

    # -- the solve ----------------------------------------------------------------------------
    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term=None,
        *,
        warm_start=None,
    ) -> Solution:
        n, p, m = g.n, e.p, h.m
        perm = scs_row_order(p, h.dims)
        A = sp.vstack([e.A, h.G], format="csc")[perm]
        b = np.concatenate([e.b, h.h])[perm]
        cone = scs_cones(p, h.dims)
        dummy = p + m == 0
        if dummy:
            # SCS needs at least one row: add 0'x + s = 1, s >= 0 (never active, dual 0).
            A, b, cone = sp.csc_matrix((1, n)), np.ones(1), {"l": 1}
        A = sp.csc_matrix(A)
        A.sort_indices()
        P = None
        if g.P is not None and g.P.nnz:
            P = g.upper()
        c = np.asarray(g.q, dtype=float)
        if extra_linear_term is not None:
            c = c + extra_linear_term
        solver = self._solver_for(
            P, A, np.ascontiguousarray(b, dtype=float), np.ascontiguousarray(c, dtype=float), cone
        )
        ws = self._warm(warm_start, n, p, m, perm) if not dummy else None
        with native_solve():
            if ws is None:
                res = solver.solve(warm_start=False)
            else:
                res = solver.solve(True, *ws)
        if int(res["info"]["status_val"]) == -5:  # SCS caught SIGINT
            self._drop(solver)
            raise interrupted(self.name, "SIGINT")
        sol = self._to_protocol(res, n, p, m, perm, dummy)
        return note_scaling(sol, g, h, e)

    def _drop(self, solver) -> None:
        """Forget a cached workspace (after an interrupted solve)."""
        cache = getattr(self._local, "cache", None)
        if cache:
            for key in [k for k, v in cache.items() if v[0] is solver]:
                del cache[key]

    @staticmethod
    def _warm(warm_start: Solution | None, n, p, m, perm):
        """A protocol solution as SCS's ``(x, y, s)``; None if absent or of other sizes."""
        if warm_start is None or warm_start.primal is None:
            return None
        ws = warm_start
        if (
            ws.primal.shape != (n,)
            or ws.eq_dual is None
            or ws.eq_dual.shape != (p,)
            or ws.ineq_dual is None
            or ws.ineq_dual.shape != (m,)
            or ws.slack is None
            or ws.slack.shape != (m,)
        ):
            return None
        y = np.concatenate([ws.eq_dual, ws.ineq_dual])[perm]
        s = np.concatenate([np.zeros(p), ws.slack])[perm]
        return (
            np.array(ws.primal, dtype=float),
            np.ascontiguousarray(y, dtype=float),
            np.ascontiguousarray(s, dtype=float),
        )

    def _to_protocol(self, res: dict, n, p, m, perm, dummy) -> Solution:
        info_raw = res["info"]
        word = str(info_raw.get("status", ""))
        status = map_status(info_raw["status_val"], word)
        pobj = float(info_raw.get("pobj", np.nan))
        gap = (
            float(info_raw.get("gap", np.nan)) / max(1.0, abs(pobj))
            if np.isfinite(pobj)
            else np.nan
        )
        acc = max(
            float(info_raw.get("res_pri", np.nan)), float(info_raw.get("res_dual", np.nan)), gap
        )
        info = SolveInfo(
            iterations=int(info_raw.get("iter", 0)),
            solve_time=(info_raw.get("solve_time", 0.0) + info_raw.get("setup_time", 0.0)) / 1e3,
            accuracy=float(acc) if np.isfinite(acc) else None,
            raw_status=word,
            extra={
                "status_val": int(info_raw["status_val"]),
                "res_pri": info_raw.get("res_pri"),
                "res_dual": info_raw.get("res_dual"),
                "gap": info_raw.get("gap"),
            },
        )
        x = np.asarray(res["x"], dtype=float)
        if status in (
            Status.INFEASIBLE,
            Status.INFEASIBLE_INACCURATE,
            Status.UNBOUNDED,
            Status.UNBOUNDED_INACCURATE,
            Status.NUMERICAL_ERROR,
        ) or not np.all(np.isfinite(x)):
            return Solution(status=status, info=info)
        if dummy:
            y_all = np.zeros(0)
            s_all = np.zeros(0)
        else:
            y_all = np.empty(p + m)
            s_all = np.empty(p + m)
            y_all[perm] = res["y"]
            s_all[perm] = res["s"]
        return Solution(
            status=status,
            primal=x,
            eq_dual=y_all[:p],
            ineq_dual=y_all[p:],
            slack=s_all[p:],
            info=info,
        )


@hookimpl
def ffo_register_backends(register):
    register(ScsBackend)
