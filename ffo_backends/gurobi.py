"""GUROBI adapter (LP, QP, SOCP; no EXP, no PSD), through gurobipy's matrix API.

Size: one adapter; its length is the documented conventions, the status map and settings as
data, and the reading of duals with and without crossover, all in the one place they apply.

Native conventions and how they map to the protocol (:mod:`ffo_core.protocol`) -- built in
:meth:`GurobiBackend._build` and read back in :meth:`GurobiBackend._to_protocol`:

* Variables ``y`` are free (``lb = -inf``).  Objective ``1/2 y'Py + q'y`` is set with
  ``Model.setMObjective(Q, c, 0)`` where GUROBI's ``y'Qy`` term takes ``Q = P/2``.
* ``A y = b`` and the nonnegative rows ``G_l y <= h_l`` are linear constraints
  (``addMConstr``).  Each second-order cone block ``h_k - G_k y in SOC`` gets auxiliary
  variables ``w_k`` (``w_k0 >= 0``), the linear coupling rows ``G_k y + w_k = h_k`` and the
  quadratic constraint ``||w_k1..||^2 - w_k0^2 <= 0`` (``addMQConstr``), which GUROBI
  recognises as a second-order cone.  This is what CVXPY's GUROBI interface does.
* **Dual signs.**  GUROBI's ``Pi`` satisfies ``c - A'Pi = reduced costs`` for a minimisation
  (``Pi <= 0`` on ``<=`` rows), the opposite sign of the protocol's Lagrangian
  ``L = f + nu'(Ay - b) + lam'(Gy - h)``.  So ``nu = -Pi(eq)``, ``lam_l = -Pi(ineq)``, and
  the SOC multipliers are ``lam_k = -Pi(coupling rows of block k)`` (the dual of ``w_k in
  SOC``, by stationarity in ``w``).  ``QCPDual=1`` is set whenever the model has a cone:
  without it GUROBI computes no duals at all for a QCP.  ``QCPi`` (the multiplier of the
  quadratic form) is not needed.  Slacks are ``s = h - G y``.
* **SOC multipliers**, two readings: the coupling rows' ``-Pi``, and a reconstruction from
  ``QCPi`` and the reduced costs of ``w_k`` (:meth:`GurobiBackend._soc_duals`, in the cone
  and complementary by construction).  GUROBI's barrier for QCPs stops without crossover and
  either reading may be the less accurate one (measured on the conformance zoo: the
  reconstruction's stationarity residual 1.3e-2 on a scaled instance where ``-Pi``'s is
  8e-8, and the other way round elsewhere), so the adapter keeps the one with the smaller
  protocol KKT residual (stationarity, cone membership, complementarity).
* Statuses: :data:`STATUS_MAP`.  ``INF_OR_UNBD`` (presolve saw one of the two) and a
  ``NUMERIC`` stop without a point (the barrier without its homogeneous form cannot tell an
  unbounded QP) are resolved by optimising once more from scratch with
  ``DualReductions=0`` and ``BarHomogeneous=1`` (those the user did not set); this costs a
  second solve only on problems without an optimum.  ``SUBOPTIMAL`` is surfaced as
  ``OPTIMAL_INACCURATE``.  ``INTERRUPTED`` (Ctrl-C, which GUROBI catches while it
  optimises) is raised as ``KeyboardInterrupt``.
* **Convexity**: ``NonConvex=0`` by default, so a quadratic objective that is not positive
  semidefinite is refused at once (GUROBI error 10020) with a
  :class:`~ffo_core.errors.SolverError` naming ``P``, instead of GUROBI's global nonconvex
  search (minutes at n = 40).

Settings are GUROBI parameter names (``Threads``, ``FeasibilityTol``, ``BarConvTol``,
``BarQCPConvTol``, ``Method``, ...), matched case-insensitively against ``GRB.Param`` as
GUROBI itself does, values checked on a scratch model when the backend is made;
``time_limit`` (seconds) is an alias of ``TimeLimit``.  Defaults (:data:`DEFAULTS`):
``OutputFlag=0``, ``NonConvex=0``; for a model without a cone (:data:`LINEAR_DEFAULTS`)
``BarConvTol=1e-12`` (GUROBI: 1e-8; the barrier's point for a QP is then far enough from the
rows near a kink for the engine to tell which are active: a portfolio layer's gradient
4.5e-2 off at one training step at 1e-8 and 1e-10, 4.4e-10 at 1e-12, for 10% more time);
for a model with a second-order cone
(:data:`SOC_DEFAULTS`) ``BarQCPConvTol=1e-10``, ``NumericFocus=3``, ``ScaleFlag=0``
(GUROBI's own settings leave SOC multipliers 1e-4 off and SOCP gradients 10-25% off;
docs/backends.md has the accuracy and the cost).  The user's settings replace them.  One
adapter option is not a GUROBI parameter: ``cache_size`` (below).

Licence.  :meth:`GurobiBackend.availability` starts an environment (which checks the
licence: missing or expired is reported with GUROBI's message) and probes whether the licence
is the size-limited one bundled with the pip package (at most 2000 variables and 2000 linear
constraints, and at most 200 variables once the model has any quadratic term -- a QP
objective or an SOC).  With that licence, the instance's ``capabilities`` carry
``max_variables=2000, max_constraints=2000``, and a model over the limits raises
:class:`~ffo_core.errors.SolverError` naming the limit (checked before calling GUROBI, and
GUROBI's own error 10010 is translated the same way), never a crash.

Structure reuse, warm start, thread safety.  GUROBI environments and models must not be used
from two threads at once, so the adapter keeps **one environment per thread**
(``threading.local``) and, per thread, a small LRU of ``cache_size`` (default 4; 0 disables)
built models keyed by the exact ``P``, ``A``, ``G`` and cones: a solve that differs only in
``q``, ``b``, ``h`` updates the objective and right-hand sides of the cached model.  The
model is reset (``Model.reset``) before it is optimised again, so it starts from scratch
and not from the basis of whatever that thread solved before: on a degenerate LP a restart
from another basis can end at another optimal vertex or other multipliers, which made
gradients depend on thread scheduling and call history.  ``warm_start`` (a protocol
:class:`Solution` of matching sizes) is passed as ``PStart``/``DStart`` (protocol duals
negated); GUROBI uses it for simplex only.  An instance may be shared by threads, and
pickled or copied (its environments and models are not: the copy makes its own).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from ffo_core.accuracy import kkt_accuracy
from ffo_core.backend_base import (
    BackendBase,
    data_digest,
    interrupt_generation,
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
    Equalities,
    Objective,
    Solution,
    SolveInfo,
    Status,
)

#: Limits of the size-limited licence bundled with the pip package.
SIZE_LIMIT_VARIABLES = 2000
SIZE_LIMIT_CONSTRAINTS = 2000
SIZE_LIMIT_QUADRATIC_VARIABLES = 200
#: GUROBI error codes we translate.
ERROR_SIZE_LIMIT = 10010
ERROR_NOT_PSD = 10020  # "Q matrix is not positive semi-definite (PSD)"
ERROR_NOT_PSD_QCP = 10021  # a quadratic constraint that is not PSD
ALIASES = {"time_limit": "TimeLimit"}
ADAPTER_OPTIONS = ("cache_size",)
#: This adapter's parameter defaults (see the module docstring); the user's settings win.
DEFAULTS = {"OutputFlag": 0, "NonConvex": 0}
#: ... for a model without a cone (an LP or a QP: GUROBI's barrier with crossover)
LINEAR_DEFAULTS = {"BarConvTol": 1e-12}
#: ... and those for a model with a second-order cone (a QCP for GUROBI), whose barrier
#: stops without crossover: measured on the conformance zoo's SOCPs (seeds 0-3), the worst
#: KKT residual is 2e-6 at GUROBI's defaults with BarQCPConvTol=1e-10, 1e-6 with
#: NumericFocus=3 added, 4e-8 with ScaleFlag=0 added too.
SOC_DEFAULTS = {"BarQCPConvTol": 1e-10, "NumericFocus": 3, "ScaleFlag": 0}
#: Parameters of the second optimisation that resolves INF_OR_UNBD / NUMERIC without a point.
RESOLVE_PARAMS = {"DualReductions": 0, "BarHomogeneous": 1}

#: GUROBI ``Model.Status`` codes (``GRB.Status``) -> protocol status.
STATUS_MAP = {
    1: Status.NUMERICAL_ERROR,  # LOADED (not solved)
    2: Status.OPTIMAL,  # OPTIMAL
    3: Status.INFEASIBLE,  # INFEASIBLE
    4: Status.INFEASIBLE_INACCURATE,  # INF_OR_UNBD (only if the re-solve is undecided)
    5: Status.UNBOUNDED,  # UNBOUNDED
    6: Status.NUMERICAL_ERROR,  # CUTOFF
    7: Status.ITERATION_LIMIT,  # ITERATION_LIMIT
    8: Status.ITERATION_LIMIT,  # NODE_LIMIT
    9: Status.TIME_LIMIT,  # TIME_LIMIT
    10: Status.ITERATION_LIMIT,  # SOLUTION_LIMIT
    11: Status.NUMERICAL_ERROR,  # INTERRUPTED: raised as KeyboardInterrupt
    12: Status.NUMERICAL_ERROR,  # NUMERIC
    13: Status.OPTIMAL_INACCURATE,  # SUBOPTIMAL
    14: Status.NUMERICAL_ERROR,  # INPROGRESS
    15: Status.NUMERICAL_ERROR,  # USER_OBJ_LIMIT
    16: Status.TIME_LIMIT,  # WORK_LIMIT (deterministic time)
    17: Status.NUMERICAL_ERROR,  # MEM_LIMIT
}
STATUS_NAMES = {
    1: "LOADED",
    2: "OPTIMAL",
    3: "INFEASIBLE",
    4: "INF_OR_UNBD",
    5: "UNBOUNDED",
    6: "CUTOFF",
    7: "ITERATION_LIMIT",
    8: "NODE_LIMIT",
    9: "TIME_LIMIT",
    10: "SOLUTION_LIMIT",
    11: "INTERRUPTED",
    12: "NUMERIC",
    13: "SUBOPTIMAL",
    14: "INPROGRESS",
    15: "USER_OBJ_LIMIT",
    16: "WORK_LIMIT",
    17: "MEM_LIMIT",
}
#: Solution-quality attributes read into ``SolveInfo.accuracy`` (those GUROBI can compute).
QUALITY_ATTRS = ("ConstrVio", "DualVio", "ComplVio")

_LICENCE_LOCK = threading.Lock()
_LICENCE: dict[str, Any] = {}


def _quiet_env():
    import gurobipy as gp

    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)
    env.start()
    return env


def licence_status() -> dict[str, Any]:
    """``{"ok": bool, "reason": str, "size_limited": bool}``, probed once per process."""
    with _LICENCE_LOCK:
        if _LICENCE:
            return dict(_LICENCE)
        import gurobipy as gp

        try:
            env = _quiet_env()
        except gp.GurobiError as exc:
            _LICENCE.update(
                ok=False,
                size_limited=False,
                reason=f"no usable GUROBI licence (error {exc.errno}: {exc})",
            )
            return dict(_LICENCE)
        limited = False
        model = None
        try:
            model = gp.Model(env=env)
            model.addMVar(SIZE_LIMIT_VARIABLES + 1)
            model.optimize()
        except gp.GurobiError as exc:
            limited = exc.errno == ERROR_SIZE_LIMIT
        finally:
            if model is not None:
                model.dispose()
            env.dispose()
        reason = (
            (
                f"size-limited licence: at most {SIZE_LIMIT_VARIABLES} variables and "
                f"{SIZE_LIMIT_CONSTRAINTS} linear constraints ({SIZE_LIMIT_QUADRATIC_VARIABLES}"
                " variables with a quadratic objective or a cone)"
            )
            if limited
            else ""
        )
        _LICENCE.update(ok=True, size_limited=limited, reason=reason)
        return dict(_LICENCE)


@dataclasses.dataclass
class _Built:
    """A GUROBI model of one structure, and the handles to update it."""

    model: Any
    x: Any
    w: Any  # SOC auxiliaries (or None)
    eq: Any  # MConstr of A y = b (or None)
    ineq: Any  # MConstr of G_l y <= h_l (or None)
    coupling: Any  # MConstr of G_soc y + w = h_soc (or None)
    quadratic: bool
    matrices: tuple


class GurobiBackend(BackendBase):
    name = "gurobi"
    package = "gurobipy"
    distribution = "gurobipy"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc"}),
        quadratic_objective=True,
        warm_start=True,
        needs_license=True,
        thread_safe=True,
    )

    #: cvxpylayers' common ``solver_args`` keys and this solver's settings for them
    #: (:mod:`ffo_core.solver_args`)
    solver_arg_names: ClassVar[dict] = {
        "eps": ("BarConvTol", "FeasibilityTol", "OptimalityTol"),
        "max_iters": "BarIterLimit",
        "verbose": "OutputFlag",
    }

    _transient = ("_local",)

    def __init__(self, *args: Any, **settings: Any) -> None:
        import gurobipy as gp

        if args:
            super().__init__(*args)  # refuses them, naming them
        canon = {name.lower(): name for name in self._param_names()}
        fixed: dict[str, Any] = {}
        for key, value in settings.items():
            key = ALIASES.get(key, key)
            fixed[canon.get(key.lower(), key)] = value
        super().__init__(**fixed)
        self.cache_size = self._pop_cache_size(4)
        self.params = {**DEFAULTS, **self.settings}
        # validate values once, on a scratch model, so a bad value is a ConfigError here
        lic = licence_status()
        if lic["ok"]:
            env = _quiet_env()
            model = gp.Model(env=env)
            try:
                for key, value in self.params.items():
                    try:
                        model.setParam(key, value)
                    except gp.GurobiError as exc:
                        raise ConfigError(f"gurobi parameter {key}={value!r}: {exc}") from exc
            finally:
                model.dispose()
                env.dispose()
            if lic["size_limited"]:
                self.capabilities = dataclasses.replace(
                    type(self).capabilities,
                    max_variables=SIZE_LIMIT_VARIABLES,
                    max_constraints=SIZE_LIMIT_CONSTRAINTS,
                )
        self.size_limited = bool(lic.get("size_limited"))
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._local = threading.local()

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        ok, reason = super().availability()
        if not ok:
            return ok, reason
        lic = licence_status()
        return bool(lic["ok"]), lic["reason"]

    @staticmethod
    def _param_names() -> list[str]:
        import gurobipy as gp

        return [a for a in dir(gp.GRB.Param) if not a.startswith("_")]

    def setting_names(self):
        return list(self._param_names()) + list(ALIASES) + list(ADAPTER_OPTIONS)

    # -- per-thread environment and model cache ------------------------------------------
    def _env(self):
        env = getattr(self._local, "env", None)
        if env is None:
            env = self._local.env = _quiet_env()
            self._local.cache = OrderedDict()
        return env

    def _size_check(self, n_vars: int, n_lin: int, quadratic: bool) -> None:
        if not self.size_limited:
            return
        if (
            n_vars > SIZE_LIMIT_VARIABLES
            or n_lin > SIZE_LIMIT_CONSTRAINTS
            or (quadratic and n_vars > SIZE_LIMIT_QUADRATIC_VARIABLES)
        ):
            raise SolverError(self._size_message(n_vars, n_lin, quadratic), backend=self.name)

    @staticmethod
    def _size_message(n_vars, n_lin, quadratic, detail="") -> str:
        kind = "with quadratic terms " if quadratic else ""
        return (
            f"gurobi: the model {kind}has {n_vars} variables and {n_lin} linear "
            f"constraints, over the size-limited GUROBI licence's limit of "
            f"{SIZE_LIMIT_VARIABLES} variables and {SIZE_LIMIT_CONSTRAINTS} linear "
            f"constraints ({SIZE_LIMIT_QUADRATIC_VARIABLES} variables once the model has "
            f"a quadratic objective or a cone); install a full licence "
            f"(https://gurobi.com/unrestricted){detail}"
        )

    def _build(self, P, A, b, Gl, hl, Gs, hs, soc, n) -> _Built:
        import gurobipy as gp

        GRB = gp.GRB
        model = gp.Model(env=self._env())
        for key, value in self.params.items():
            model.setParam(key, value)
        x = model.addMVar(n, lb=-GRB.INFINITY, ub=GRB.INFINITY, name="y")
        w = eq = ineq = coupling = None
        if A.shape[0]:
            eq = model.addMConstr(A, x, GRB.EQUAL, b)
        if Gl.shape[0]:
            ineq = model.addMConstr(Gl, x, GRB.LESS_EQUAL, hl)
        if soc:
            rows = int(sum(soc))
            heads = np.concatenate([[0], np.cumsum(soc)[:-1]]).astype(int)
            lb = np.full(rows, -GRB.INFINITY)
            lb[heads] = 0.0
            w = model.addMVar(rows, lb=lb, ub=GRB.INFINITY, name="w")
            coupling = model.addMConstr(
                sp.hstack([Gs, sp.eye(rows)], format="csr"), None, GRB.EQUAL, hs
            )
            for head, d in zip(heads, soc):
                Q = sp.diags(np.r_[-1.0, np.ones(d - 1)], format="csr")
                block = w[int(head) : int(head) + int(d)]
                # gurobipy's stub lacks addMQConstr's rhs parameter and types Q as an
                # ndarray; the compiled method takes (Q, c, sense, rhs, xQ_L, xQ_R) with
                # Q "a NumPy ndarray or SciPy.sparse matrix" (its signature and docstring)
                model.addMQConstr(Q, None, GRB.LESS_EQUAL, 0.0, block, block)  # type: ignore[call-overload]
            model.setParam("QCPDual", 1)
        for key, value in (SOC_DEFAULTS if soc else LINEAR_DEFAULTS).items():
            if key not in self.settings:
                model.setParam(key, value)
        quadratic = P is not None
        if quadratic:
            model.setMObjective(0.5 * P, np.zeros(n), 0.0, x, x, x, GRB.MINIMIZE)
        return _Built(model, x, w, eq, ineq, coupling, quadratic or bool(soc), ())

    def _model_for(self, g, h, e, c) -> _Built:
        n, dims = g.n, h.dims
        P = None
        if g.is_quadratic:
            P = sp.csr_matrix(g.P)
        A = sp.csr_matrix(e.A)
        G = h.G.tocsr()
        nl, soc = dims.nonneg, tuple(dims.soc)
        Gl, Gs = G[:nl], G[nl : nl + sum(soc)]
        hl, hs = h.h[:nl], h.h[nl : nl + sum(soc)]
        n_vars = n + int(sum(soc))
        n_lin = e.p + h.m
        self._size_check(n_vars, n_lin, P is not None or bool(soc))
        self._env()
        cache: OrderedDict = self._local.cache
        mats = (A, G) if P is None else (A, G, P)
        key = None
        if self.cache_size:
            arrays = [np.array(dims.soc, dtype=np.int64), np.array([nl, n, e.p])]
            for M in mats:
                arrays += [M.data, M.indices, M.indptr]
            key = (data_digest(arrays), P is None)
            hit = cache.get(key)
            if (
                hit is not None
                and len(hit.matrices) == len(mats)
                and all(same_sparse(X, Y) for X, Y in zip(hit.matrices, mats))
            ):
                cache.move_to_end(key)
                self._load_vectors(hit, c, e.b, hl, hs)
                return hit
        built = self._build(P, A, e.b, Gl, hl, Gs, hs, soc, n)
        self._load_vectors(built, c, e.b, hl, hs)
        if key is not None:
            built.matrices = tuple(M.copy() for M in mats)
            cache[key] = built
            while len(cache) > self.cache_size:
                _, old = cache.popitem(last=False)
                old.model.dispose()
        return built

    @staticmethod
    def _load_vectors(built: _Built, c, b, hl, hs) -> None:
        built.x.Obj = c
        if built.eq is not None:
            built.eq.RHS = b
        if built.ineq is not None:
            built.ineq.RHS = hl
        if built.coupling is not None:
            built.coupling.RHS = hs

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
        import gurobipy as gp

        missing = self.capabilities.missing_cones(h.dims, e.p > 0)
        if missing:
            raise SolverError(
                f"gurobi does not support the {', '.join(sorted(missing))} cone(s)",
                backend=self.name,
            )
        since = interrupt_generation()
        c = np.asarray(g.q, dtype=float)
        if extra_linear_term is not None:
            c = c + extra_linear_term
        built = self._model_for(g, h, e, c)
        model = built.model
        try:
            model.reset(0)  # from scratch, not from another problem's basis (see above)
            self._warm(built, warm_start, g, h, e)
            code = self._optimize(model, since)
            if code == gp.GRB.INF_OR_UNBD or (code == gp.GRB.NUMERIC and model.SolCount == 0):
                code = self._resolve_verdict(model, since)
        except gp.GurobiError as exc:
            self._forget(built)
            if exc.errno == ERROR_SIZE_LIMIT:
                n_vars = g.n + int(sum(h.dims.soc))
                raise SolverError(
                    self._size_message(n_vars, e.p + h.m, built.quadratic, f"; GUROBI said: {exc}"),
                    backend=self.name,
                ) from exc
            if exc.errno in (ERROR_NOT_PSD, ERROR_NOT_PSD_QCP):
                raise SolverError(
                    "gurobi: the quadratic objective's P (GUROBI's Q) is not positive "
                    "semidefinite: the problem is not convex (GUROBI error "
                    f"{exc.errno}: {exc}); NonConvex=2 makes GUROBI search it globally, "
                    "but without multipliers the layer cannot differentiate it",
                    backend=self.name,
                ) from exc
            raise SolverError(f"gurobi error {exc.errno}: {exc}", backend=self.name) from exc
        if code == gp.GRB.INTERRUPTED:
            self._forget(built)
            raise interrupted(self.name, "INTERRUPTED")
        sol = self._to_protocol(built, code, Objective(g.P, c), h, e)
        return note_scaling(sol, g, h, e)

    @staticmethod
    def _optimize(model, since: int | None = None) -> int:
        """``model.optimize()``, stoppable by
        :func:`~ffo_core.backend_base.interrupt_solves`."""
        with native_solve(model.terminate, since=since):
            model.optimize()
        return int(model.Status)

    def _resolve_verdict(self, model, since: int | None = None) -> int:
        """Optimise once more with :data:`RESOLVE_PARAMS` (those the user did not set) and
        put the parameters back; returns the new status."""
        changed = {k: v for k, v in RESOLVE_PARAMS.items() if k not in self.params}
        if not changed:
            return int(model.Status)
        before = {k: model.getParamInfo(k)[2] for k in changed}
        try:
            for k, v in changed.items():
                model.setParam(k, v)
            model.reset(0)
            return self._optimize(model, since)
        finally:
            for k, v in before.items():
                model.setParam(k, v)

    def _forget(self, built: _Built) -> None:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            return
        for key, value in list(cache.items()):
            if value is built:
                del cache[key]
        try:
            built.model.dispose()
        except Exception:
            pass

    @staticmethod
    def _warm(built: _Built, ws: Solution | None, g, h, e) -> None:
        """Protocol solution -> ``PStart``/``DStart`` (duals negated); ignored if sizes differ."""
        import gurobipy as gp

        if (
            ws is None
            or ws.primal is None
            or ws.primal.shape != (g.n,)
            or ws.eq_dual is None
            or ws.eq_dual.shape != (e.p,)
            or ws.ineq_dual is None
            or ws.ineq_dual.shape != (h.m,)
        ):
            # clear a start left over from a previous solve of a cached model
            built.x.PStart = np.full(g.n, gp.GRB.UNDEFINED)
            if built.w is not None:
                built.w.PStart = np.full(built.w.shape[0], gp.GRB.UNDEFINED)
            for con in (built.eq, built.ineq, built.coupling):
                if con is not None:
                    con.DStart = np.full(con.shape[0], gp.GRB.UNDEFINED)
            return
        nl, rows = h.dims.nonneg, int(sum(h.dims.soc))
        built.x.PStart = ws.primal
        if built.w is not None and ws.slack is not None:
            built.w.PStart = ws.slack[nl : nl + rows]
        if built.eq is not None:
            built.eq.DStart = -ws.eq_dual
        if built.ineq is not None:
            built.ineq.DStart = -ws.ineq_dual[:nl]
        if built.coupling is not None:
            built.coupling.DStart = -ws.ineq_dual[nl : nl + rows]

    @staticmethod
    def _soc_duals(built: _Built, soc) -> np.ndarray:
        """Protocol multipliers of the SOC blocks from GUROBI's ``QCPi`` and ``RC``.

        Stationarity of GUROBI's Lagrangian in ``w_k`` gives
        ``-Pi_k = RC_k + 2 mu_k (w_k0, -w_k1..)`` with ``mu_k = -QCPi_k >= 0``, and the
        protocol's ``lam_k = -Pi_k``.  We evaluate the right-hand side: it lies in the SOC
        and is complementary to ``w_k`` by construction (``RC`` is nonzero only for
        ``w_k0`` at its bound 0, the cone's apex), whereas the coupling rows' ``Pi`` after
        GUROBI's postsolve can violate both by ~1e-5.
        """
        if built.w is None:
            return np.zeros(0)
        model = built.model
        qcpi = np.asarray(model.getAttr("QCPi", model.getQConstrs()), dtype=float)
        w = np.asarray(built.w.X, dtype=float)
        rc = np.asarray(built.w.RC, dtype=float)
        lam = np.empty_like(w)
        start = 0
        for k, d in enumerate(soc):
            wk = w[start : start + d]
            lam[start : start + d] = -2.0 * qcpi[k] * np.r_[wk[0], -wk[1:]] + rc[start : start + d]
            start += d
        return lam

    def _to_protocol(self, built: _Built, code: int, g, h, e) -> Solution:
        """GUROBI's answer in protocol terms; ``g.q`` includes the extra linear term."""
        model = built.model
        status = STATUS_MAP.get(code, Status.NUMERICAL_ERROR)
        sol_count = int(model.SolCount)
        if code == 12 and sol_count:  # NUMERIC with a point: inaccurate, not lost
            status = Status.OPTIMAL_INACCURATE
        quality = []
        for attr in QUALITY_ATTRS:
            try:
                quality.append(float(model.getAttr(attr)))
            except Exception:
                pass
        tol = max(float(model.Params.FeasibilityTol), float(model.Params.OptimalityTol))
        if built.quadratic:
            tol = max(
                tol,
                float(
                    model.Params.BarQCPConvTol if built.w is not None else model.Params.BarConvTol
                ),
            )
        accuracy = max(quality) if quality else tol
        iters = int(model.BarIterCount) if model.BarIterCount > 0 else int(model.IterCount)
        info = SolveInfo(
            iterations=iters,
            solve_time=float(model.Runtime),
            accuracy=accuracy,
            raw_status=STATUS_NAMES.get(code, str(code)),
            extra={"quality": dict(zip(QUALITY_ATTRS, quality)), "tolerance": tol},
        )
        if not status.has_solution or sol_count == 0:
            if status.has_solution:
                status = Status.NUMERICAL_ERROR
            return Solution(status=status, info=info)
        y = np.asarray(built.x.X, dtype=float)
        try:
            nu = -np.asarray(built.eq.Pi, dtype=float) if built.eq is not None else np.zeros(0)
            lam_l = (
                -np.asarray(built.ineq.Pi, dtype=float) if built.ineq is not None else np.zeros(0)
            )
            lam_s = self._soc_duals(built, h.dims.soc)
            pi_s = (
                -np.asarray(built.coupling.Pi, dtype=float)
                if built.coupling is not None
                else np.zeros(0)
            )
        except Exception as exc:  # duals unavailable (e.g. QCPDual switched off)
            if code != 2:  # a stop short of OPTIMAL with a point but no multipliers
                info.raw_status = f"{info.raw_status} without dual values ({exc})"
                return Solution(status=Status.NUMERICAL_ERROR, info=info)
            raise SolverError(
                f"gurobi returned no dual values ({exc}); duals are required", backend=self.name
            ) from exc
        slack = h.h - h.G @ y
        lam = np.concatenate([lam_l, lam_s])
        if lam_s.size:  # the better of the two readings of the SOC multipliers
            other = np.concatenate([lam_l, pi_s])
            mine = kkt_accuracy(g, h, e, y, nu, lam, slack)
            theirs = kkt_accuracy(g, h, e, y, nu, other, slack)
            info.extra["soc_duals"] = "QCPi" if mine <= theirs else "Pi"
            if theirs < mine:
                lam = other
        # GUROBI's quality attributes describe its presolved model; its QCP duals are often
        # less accurate after postsolve than they say.  The engine's thresholds must see the
        # real error, so fold in the protocol's own KKT residuals (two sparse mat-vecs).
        kkt = kkt_accuracy(g, h, e, y, nu, lam, slack)
        info.accuracy = max(accuracy, kkt)
        info.extra["kkt_accuracy"] = kkt
        return Solution(status=status, primal=y, eq_dual=nu, ineq_dual=lam, slack=slack, info=info)


@hookimpl
def ffo_register_backends(register):
    register(GurobiBackend)
