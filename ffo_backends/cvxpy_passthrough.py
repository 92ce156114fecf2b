"""CVXPY pass-through: any solver CVXPY can call, as a backend (``"cvxpy:OSQP"``, ...).

Size: one adapter; it writes each protocol cone as CVXPY constraints and reads every
cone's duals back, in the protocol's conventions, in one table-driven place.

For solvers without a native adapter.  Each solve writes the protocol problem
(:mod:`ffo_core.protocol`) as a small CVXPY problem and calls ``Problem.solve(solver=NAME)``:

    y = Variable(n)
    minimize   1/2 quad_form(y, psd_wrap(P)) + (q + extra)'y
    subject to A y == b                       -> nu  = dual_value            (free)
               G_l y <= h_l                   -> lam = dual_value            (>= 0)
               SOC(t, x) with (t, x) = h_k - G_k y        -> lam = [t_dual; x_dual]
               ExpCone(x, y, z) with rows of h - G y       -> lam = (x_dual, y_dual, z_dual)
               mat(h_k - G_k y) >> 0          -> lam = svec(dual_value)

**Sign and layout conventions** (all in :meth:`CvxpyBackend._duals`): CVXPY's duals use the
Lagrangian ``f + nu'(Ay - b) - lam'(h - Gy)`` with ``lam`` in the dual cone -- exactly the
protocol's, so no sign changes.  ``mat`` turns the protocol's upper-triangle, sqrt(2)-scaled
vector into a symmetric matrix (off-diagonals divided by sqrt(2)); the PSD multiplier ``Z``
comes back as a matrix and is vectorised with the same isometric ``svec`` (upper triangle,
column by column, off-diagonals times sqrt(2)), because ``<Z, mat(s)> = svec(Z)'s``.

**Cost.**  This backend is *slower* than a native adapter: CVXPY canonicalises the small
problem and runs its reduction chain on every new structure, and it adds its own overhead to
every solve (milliseconds).  To limit that, problems are cached per thread and keyed by the
exact ``P``, ``A``, ``G`` and cones, with ``q``, ``b``, ``h`` as ``cp.Parameter``s, so a solve
that changes only those vectors reuses CVXPY's cached (DPP) canonicalisation.  Use a native
adapter where there is one.

Configuration: the solver is the positional argument (``"cvxpy:OSQP"``, ``"cvxpy:HIGHS"``;
case-insensitive; a bare ``"cvxpy"`` uses :data:`DEFAULT_SOLVER`, CLARABEL).  Settings are
the chosen solver's own option names, passed to ``Problem.solve``; they are validated where
the solver's option names can be listed (:data:`OPTION_LISTERS`: OSQP, CLARABEL, SCS, ECOS,
GUROBI) and otherwise passed through (an option the solver rejects then raises
:class:`~ffo_core.errors.ConfigError` at solve time, or :class:`SolverError` when the
solver's complaint does not name the option).
CVXPY's own ``verbose`` and ``warm_start`` keywords are accepted for every solver
(``warm_start=true`` lets solvers such as OSQP and SCS reuse their factorisation and iterate
between solves of a cached problem; the default, false, gives history-independent results).
``time_limit`` (seconds) is translated to the solver's name where known (:data:`TIME_LIMIT`).

Capabilities (per instance): the cones of the chosen solver's ``SUPPORTED_CONSTRAINTS`` in
CVXPY (conic and QP interfaces together); a quadratic objective whenever CVXPY can handle one
for that solver (a QP interface, or SOC support so that CVXPY moves it into a cone).
``SolveInfo.accuracy`` is the protocol KKT residual of the returned point (``kkt_accuracy``),
since CVXPY reports no uniform residuals.  Statuses: :data:`STATUS_MAP`; CVXPY folds
iteration and time limits into ``user_limit``, reported as ``ITERATION_LIMIT``.

Values are checked when the backend is made: NaN is refused for every option, then the
options are tried on a one-variable LP (with ``verbose`` off), so an option the solver
rejects is a :class:`~ffo_core.errors.ConfigError` at once, not at the first solve.

Chatter: with ``verbose`` off, solves by solvers that print regardless (:data:`CHATTY`:
OSQP's "Polishing not needed", HiGHS's copyright banner) run with the process's stdout
descriptor sent to the null device (:func:`~ffo_core.backend_base.quiet_stdout`), and
GUROBI gets a silent environment per thread (no licence banner).

Thread safety: CVXPY problems are not thread safe, so each thread has its own cache; an
instance may be shared by threads, and pickled or copied (without its caches).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from ffo_core.accuracy import kkt_accuracy
from ffo_core.backend_base import (
    BackendBase,
    data_digest,
    quiet_stdout,
    same_sparse,
)
from ffo_core.config import bare_token_error
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

#: CVXPY status strings -> protocol status.
STATUS_MAP = {
    "optimal": Status.OPTIMAL,
    "optimal_inaccurate": Status.OPTIMAL_INACCURATE,
    "infeasible": Status.INFEASIBLE,
    "infeasible_inaccurate": Status.INFEASIBLE_INACCURATE,
    "unbounded": Status.UNBOUNDED,
    "unbounded_inaccurate": Status.UNBOUNDED_INACCURATE,
    "infeasible_or_unbounded": Status.INFEASIBLE_INACCURATE,
    "user_limit": Status.ITERATION_LIMIT,
    "solver_error": Status.NUMERICAL_ERROR,
}
#: CVXPY constraint class names -> protocol cone names.
CONE_NAMES = {
    "Zero": "zero",
    "Equality": "zero",
    "NonNeg": "nonneg",
    "Inequality": "nonneg",
    "NonPos": "nonneg",
    "SOC": "soc",
    "ExpCone": "exp",
    "PSD": "psd",
    "SvecPSD": "psd",
}
#: The protocol's generic ``time_limit`` (seconds) -> the solver's option name.
TIME_LIMIT = {
    "OSQP": "time_limit",
    "CLARABEL": "time_limit",
    "SCS": "time_limit_secs",
    "GUROBI": "TimeLimit",
    "HIGHS": "time_limit",
    "PIQP": "time_limit",
}
#: Keywords of ``Problem.solve`` itself, accepted for every solver.
CVXPY_KEYWORDS = ("verbose", "warm_start")
#: The solver used by a bare ``"cvxpy"`` (CVXPY's own default open-source conic solver; we do
#: not let CVXPY choose, because it prefers MOSEK whenever the package is installed, even
#: without a licence).
DEFAULT_SOLVER = "CLARABEL"
ADAPTER_OPTIONS = ("cache_size",)
#: Solvers that print to stdout whatever their ``verbose`` setting says.
CHATTY = frozenset({"OSQP", "HIGHS"})


def _osqp_options() -> list[str]:
    import osqp

    names = [a for a in dir(osqp.ext_builtin.OSQPSettings()) if not a.startswith("_")]
    return names + ["polish"]  # CVXPY's name for pre-1.0 'polishing'


def _clarabel_options() -> list[str]:
    import clarabel

    return [a for a in dir(clarabel.DefaultSettings()) if not a.startswith("_") and a != "default"]


def _scs_options() -> list[str]:
    from ffo_backends.scs import SCS_SETTINGS

    return list(SCS_SETTINGS) + ["use_indirect"]


def _ecos_options() -> list[str]:
    from ffo_backends.ecos import ECOS_SETTINGS

    return list(ECOS_SETTINGS)


def _gurobi_options() -> list[str]:
    import gurobipy as gp

    return [a for a in dir(gp.GRB.Param) if not a.startswith("_")] + ["env", "reoptimize"]


#: Solvers whose option names can be listed, and how.
OPTION_LISTERS: dict[str, Callable[[], list[str]]] = {
    "OSQP": _osqp_options,
    "CLARABEL": _clarabel_options,
    "SCS": _scs_options,
    "ECOS": _ecos_options,
    "GUROBI": _gurobi_options,
}
CASE_INSENSITIVE = {"GUROBI"}


def solver_capabilities(solver: str) -> Capabilities:
    """What CVXPY can do with ``solver``, from its ``SUPPORTED_CONSTRAINTS``."""
    base = CvxpyBackend.capabilities
    from cvxpy.reductions.solvers.defines import SOLVER_MAP_CONIC, SOLVER_MAP_QP

    cones: set[str] = set()
    qp = solver in SOLVER_MAP_QP
    for table in (SOLVER_MAP_CONIC, SOLVER_MAP_QP):
        if solver in table:
            for cls in table[solver].SUPPORTED_CONSTRAINTS:
                if cls.__name__ in CONE_NAMES:
                    cones.add(CONE_NAMES[cls.__name__])
    return replace(base, cones=frozenset(cones), quadratic_objective=qp or "soc" in cones)


def svec_to_mat(order: int) -> sp.csr_matrix:
    """``T`` with ``vec_F(S) = T @ svec(S)`` (protocol svec: upper triangle, column-major,
    off-diagonals times sqrt(2)); ``vec_F`` stacks the full matrix column by column."""
    rows, cols, vals = [], [], []
    k = 0
    for j in range(order):
        for i in range(j + 1):
            if i == j:
                rows.append(j * order + i)
                cols.append(k)
                vals.append(1.0)
            else:
                rows += [j * order + i, i * order + j]
                cols += [k, k]
                vals += [1 / np.sqrt(2)] * 2
            k += 1
    return sp.csr_matrix((vals, (rows, cols)), shape=(order * order, k))


def mat_to_svec(Z: np.ndarray) -> np.ndarray:
    """Protocol svec of a symmetric matrix (upper triangle, column-major, sqrt(2))."""
    order = Z.shape[0]
    out = []
    for j in range(order):
        for i in range(j + 1):
            out.append(Z[i, j] if i == j else np.sqrt(2) * 0.5 * (Z[i, j] + Z[j, i]))
    return np.asarray(out, dtype=float)


@dataclass
class _Model:
    problem: Any
    y: Any
    q: Any
    b: Any
    h: Any
    eq: Any
    ineq: Any
    socs: list
    exp: Any
    psds: list
    matrices: tuple


class CvxpyBackend(BackendBase):
    name = "cvxpy"
    package = "cvxpy"
    distribution = "cvxpy"
    #: Class-level (``ffo backends``): the union over CVXPY's solvers; each instance narrows
    #: it to its solver's cones in ``__init__``.
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp", "psd"}),
        quadratic_objective=True,
        warm_start=False,
        thread_safe=True,
    )

    _transient = ("_local",)

    def __init__(self, solver: str = DEFAULT_SOLVER, *extra: Any, **settings: Any) -> None:
        import cvxpy as cp

        if extra:
            raise bare_token_error("cvxpy", (solver, *extra), accepted=1)
        installed = [s.upper() for s in cp.installed_solvers()]
        if not isinstance(solver, str) or not solver.strip():
            raise ConfigError(
                f"cvxpy: the solver must be a name, got {solver!r}; "
                f"installed: {', '.join(installed)}"
            )
        solver = solver.strip().upper()
        if solver not in installed:
            raise ConfigError(
                f"cvxpy: solver {solver!r} is not installed for CVXPY; "
                f"installed: {', '.join(installed)}"
            )
        self.solver = solver
        self._options: list[str] | None = None
        if solver in OPTION_LISTERS:
            try:
                self._options = OPTION_LISTERS[solver]()
            except Exception:
                self._options = None
        if "time_limit" in settings and solver in TIME_LIMIT:
            settings[TIME_LIMIT[solver]] = settings.pop("time_limit")
        if solver in CASE_INSENSITIVE and self._options:
            canon = {o.lower(): o for o in self._options}
            settings = {canon.get(k.lower(), k): v for k, v in settings.items()}
        self._given = set(settings)
        super().__init__(**settings)
        self.cache_size = self._pop_cache_size(4)
        self.capabilities = solver_capabilities(solver)
        self._fresh_state()
        self._validate()

    def _fresh_state(self) -> None:
        self._local = threading.local()

    def _validate(self) -> None:
        """NaN is no option's value; then the options on a one-variable LP (see the module
        docstring)."""
        import cvxpy as cp

        for key, value in self.settings.items():
            if isinstance(value, float) and value != value:
                raise ConfigError(f"cvxpy:{self.solver} setting {key}={value!r}: must not be NaN")
            low = key.lower()
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and value < 0 and any(w in low for w in ("iter", "eps", "tol", "time")):
                raise ConfigError(f"cvxpy:{self.solver} setting {key}={value!r}: must be >= 0")
        if not self.settings or "nonneg" not in self.capabilities.cones:
            return
        x = cp.Variable(1)
        probe = cp.Problem(cp.Minimize(x[0]), [x >= 0, x <= 1])
        opts = {**self._solver_options(), "verbose": False}
        try:
            with quiet_stdout():
                probe.solve(solver=self.solver, **opts)
        except Exception as exc:
            given = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
            raise ConfigError(
                f"cvxpy:{self.solver} rejected its settings ({given}): {exc}"
            ) from exc

    def _solver_options(self) -> dict[str, Any]:
        """The options passed to ``Problem.solve``: the user's, with this adapter's defaults
        (``verbose`` and ``warm_start`` off, a silent GUROBI environment)."""
        opts = dict(self.settings)
        opts.setdefault("verbose", False)
        opts.setdefault("warm_start", False)
        if self.solver == "GUROBI" and "env" not in opts:
            env = getattr(self._local, "gurobi_env", None)
            if env is None:
                from ffo_backends.gurobi import _quiet_env

                env = self._local.gurobi_env = _quiet_env()
            opts["env"] = env
        return opts

    def setting_names(self):
        extra = list(CVXPY_KEYWORDS) + list(ADAPTER_OPTIONS)
        if self._options is None:
            # this solver's options cannot be listed: pass the given names through (the
            # solver checks them at solve time, see the module docstring)
            return extra + sorted(self._given)
        return list(self._options) + extra

    def with_settings(self, **settings: Any) -> CvxpyBackend:
        """A new backend (own problem cache) for the same solver with ``settings`` added to
        or replacing this one's; ``time_limit`` is translated where the solver's option is
        known (:data:`TIME_LIMIT`) and a :class:`ConfigError` otherwise."""
        if "time_limit" in settings and self.solver not in TIME_LIMIT:
            raise ConfigError(
                f"cvxpy:{self.solver}: no known time-limit option for this "
                f"solver (known for {', '.join(sorted(TIME_LIMIT))}); pass "
                "the solver's own option in the config string instead"
            )
        return type(self)(
            self.solver, **{**self.settings, "cache_size": self.cache_size, **settings}
        )

    def __repr__(self) -> str:
        return f"<CvxpyBackend cvxpy:{self.solver}>"

    # -- building and caching the CVXPY problem ------------------------------------------
    def _build(self, g, h, e) -> _Model:
        import cvxpy as cp

        n, dims = g.n, h.dims
        y = cp.Variable(n)
        q = cp.Parameter(n)
        objective = q @ y
        if g.is_quadratic:
            objective = objective + 0.5 * cp.quad_form(y, cp.psd_wrap(sp.csc_matrix(g.P)))
        constraints = []
        b = hp = eq = ineq = exp = None
        if e.p:
            b = cp.Parameter(e.p)
            eq = sp.csr_matrix(e.A) @ y == b
            constraints.append(eq)
        socs, psds = [], []
        if h.m:
            hp = cp.Parameter(h.m)
            G = h.G.tocsr()
            nl = dims.nonneg
            if nl:
                ineq = G[:nl] @ y <= hp[:nl]
                constraints.append(ineq)
            start = nl
            for d in dims.soc:
                s = hp[start : start + d] - G[start : start + d] @ y
                con = cp.SOC(s[0], s[1:])
                socs.append(con)
                constraints.append(con)
                start += d
            if dims.exp:
                rows = start + 3 * np.arange(dims.exp)
                s = [hp[rows + i] - G[rows + i] @ y for i in range(3)]
                exp = cp.ExpCone(*s)
                constraints.append(exp)
                start += 3 * dims.exp
            for order in dims.psd:
                size = order * (order + 1) // 2
                s = hp[start : start + size] - G[start : start + size] @ y
                M = cp.reshape(svec_to_mat(order) @ s, (order, order), order="F")
                con = M >> 0
                psds.append(con)
                constraints.append(con)
                start += size
        problem = cp.Problem(cp.Minimize(objective), constraints)
        return _Model(problem, y, q, b, hp, eq, ineq, socs, exp, psds, ())

    def _model_for(self, g, h, e) -> _Model:
        mats = [sp.csc_matrix(e.A), sp.csc_matrix(h.G)]
        if g.is_quadratic:
            mats.append(sp.csc_matrix(g.P))
        if not self.cache_size:
            return self._build(g, h, e)
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        arrays = [
            np.array([g.n, e.p, h.dims.nonneg, h.dims.exp]),
            np.array(h.dims.soc, dtype=np.int64),
            np.array(h.dims.psd, dtype=np.int64),
        ]
        for M in mats:
            arrays += [np.array(M.shape), M.data, M.indices, M.indptr]
        key = data_digest(arrays)
        hit = cache.get(key)
        if (
            hit is not None
            and len(hit.matrices) == len(mats)
            and all(same_sparse(X, Y) for X, Y in zip(hit.matrices, mats))
        ):
            cache.move_to_end(key)
            return hit
        model = self._build(g, h, e)
        model.matrices = tuple(M.copy() for M in mats)
        cache[key] = model
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return model

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
        import cvxpy as cp

        missing = self.capabilities.missing_cones(h.dims, e.p > 0)
        if missing:
            raise SolverError(
                f"cvxpy:{self.solver} does not support the {', '.join(sorted(missing))} cone(s)",
                backend=self.name,
            )
        model = self._model_for(g, h, e)
        c = np.asarray(g.q, dtype=float)
        if extra_linear_term is not None:
            c = c + extra_linear_term
        model.q.value = c
        if model.b is not None:
            model.b.value = np.asarray(e.b, dtype=float)
        if model.h is not None:
            model.h.value = np.asarray(h.h, dtype=float)
        opts = self._solver_options()
        quiet = quiet_stdout() if self.solver in CHATTY and not opts["verbose"] else _nothing()
        raw = None
        try:
            with warnings.catch_warnings(), quiet:
                warnings.simplefilter("ignore")
                model.problem.solve(solver=self.solver, **opts)
            raw = str(model.problem.status)
        except cp.error.SolverError as exc:
            raw = f"solver_error: {exc}"
        except TypeError as exc:
            raise ConfigError(f"cvxpy:{self.solver} rejected its settings: {exc}") from exc
        except Exception as exc:
            if any(key in str(exc) for key in self.settings):
                raise ConfigError(f"cvxpy:{self.solver} rejected its settings: {exc}") from exc
            raise SolverError(
                f"cvxpy:{self.solver} failed: {type(exc).__name__}: {exc}", backend=self.name
            ) from exc
        status = STATUS_MAP.get(raw.split(":")[0], Status.NUMERICAL_ERROR)
        stats = model.problem.solver_stats if raw and not raw.startswith("solver_error") else None
        info = SolveInfo(
            iterations=getattr(stats, "num_iters", None),
            solve_time=getattr(stats, "solve_time", None),
            raw_status=raw,
            extra={"solver": getattr(stats, "solver_name", self.solver)},
        )
        y = model.y.value
        if not status.has_solution or y is None:
            if status.has_solution:
                status = Status.NUMERICAL_ERROR
            return Solution(status=status, info=info)
        y = np.asarray(y, dtype=float).reshape(-1)
        try:
            nu, lam = self._duals(model, g, h, e)
        except Exception as exc:
            raise SolverError(
                f"cvxpy:{self.solver} returned no duals ({exc}); this backend "
                "needs a solver that reports dual values",
                backend=self.name,
                status=status,
            ) from exc
        slack = h.h - h.G @ y
        info.accuracy = kkt_accuracy(Objective(g.P, c), h, e, y, nu, lam, slack)
        return Solution(status=status, primal=y, eq_dual=nu, ineq_dual=lam, slack=slack, info=info)

    @staticmethod
    def _duals(model: _Model, g, h, e) -> tuple[np.ndarray, np.ndarray]:
        """CVXPY dual values -> protocol ``(nu, lam)`` (see the module docstring)."""

        def flat(v):
            if v is None:
                raise ValueError("a constraint has no dual value")
            return np.asarray(v, dtype=float).reshape(-1, order="F")

        nu = flat(model.eq.dual_value) if model.eq is not None else np.zeros(0)
        parts = []
        if model.ineq is not None:
            parts.append(flat(model.ineq.dual_value))
        for con in model.socs:
            t, x = con.dual_value
            parts.append(np.concatenate([flat(t), flat(x)]))
        if model.exp is not None:
            dx, dy, dz = (flat(v) for v in model.exp.dual_value)
            parts.append(np.column_stack([dx, dy, dz]).reshape(-1))
        for con in model.psds:
            parts.append(mat_to_svec(np.asarray(con.dual_value, dtype=float)))
        lam = np.concatenate(parts) if parts else np.zeros(0)
        if lam.shape != (h.m,) or nu.shape != (e.p,):
            raise ValueError(f"dual sizes {nu.shape}, {lam.shape} do not match ({e.p},), ({h.m},)")
        return nu, lam


@contextlib.contextmanager
def _nothing():
    yield


@hookimpl
def ffo_register_backends(register):
    register(CvxpyBackend)
