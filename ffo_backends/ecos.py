"""ECOS adapter (interior point; LP, QP, SOCP, EXP; no PSD): ``ecos.solve``.

Size: one adapter; ECOS has no quadratic objective, so a good part of it is the epigraph
rewrite of a QP and its inverse on the answer, beside the conversions and status map.

Native conventions and how they map to the protocol (:mod:`ffo_core.protocol`) -- applied in
one place, :func:`ecos_data` on the way in and :meth:`EcosBackend._to_protocol` on the way out:

* ECOS solves ``min c'x  s.t.  Ax = b (dual y),  Gx + s = h, s in K (dual z)`` with
  ``c + A'y + G'z = 0`` and ``z in K*``: the protocol's form exactly, so ``nu = y``,
  ``lam = z``, ``slack = s`` with **no sign change**.  Equalities go to ECOS's ``A, b``
  (``A`` is passed as ``None`` when there are none: ECOS rejects an empty ``A``).
* **Quadratic objectives through an epigraph.**  ECOS has no quadratic objective; the adapter
  takes one anyway (:attr:`Capabilities.quadratic_objective` is True) and solves
  ``min q'y + t`` with the rotated second-order cone ``||F y||^2 <= 2 t`` (``F'F = P``,
  :class:`~ffo_core.backend_base.QuadraticEpigraph`, balanced by ``sigma``), appended after
  the problem's own SOC blocks.  The multipliers of the problem's own rows are the QP's (the
  cone's multiplier contributes ``P y`` to stationarity), so nothing is converted; ``t`` and
  the cone's rows are dropped from the answer.  ``F`` comes from
  :func:`~ffo_core.backend_base.psd_factor` (``sqrt`` of a diagonal, a dense Cholesky or
  eigendecomposition per connected block of ``P``), cached per ``P`` (a forward solve and its
  ghosts share one); a ``P`` that is not positive semidefinite raises
  :class:`~ffo_core.errors.SolverError` naming ``P``.
* **Exponential cone order.**  ECOS's cone is ``{(x, y, z): z e^(x/z) <= y, z > 0}`` -- the
  protocol's (CVXPY/SCS/Clarabel) ``(x, y, z)`` with ``y`` and ``z`` swapped -- so the rows
  of each 3-row block are permuted by :data:`EXP_CONE_ORDER` ``= (0, 2, 1)`` (CVXPY's
  ``ECOS.EXP_CONE_ORDER``) on the way in, and ``z``, ``s`` by the same (self-inverse)
  permutation on the way out.
* SOC is ``(t, x)``, ``||x|| <= t`` in both.  ECOS has no PSD cone.

Settings are ECOS's keyword names (:data:`ECOS_SETTINGS`: ``feastol``, ``abstol``,
``reltol``, their ``*_inacc`` variants, ``max_iters``, ``nitref``, ``verbose``), checked by
value when the backend is made.  ECOS has no time limit, so ``time_limit`` is not accepted.
Defaults (:data:`DEFAULTS`): ``feastol = 1e-9``, ``abstol = reltol = 1e-12`` instead of
ECOS's 1e-8, ``max_iters = 200`` instead of 100.  Through the epigraph a QP's point and
multipliers are only about ``sqrt(gap)`` accurate (the cone's multiplier lines up with its
slack only at the optimum), so the gap is closed much further than the residuals; a solve
that stalls on its way there is accepted as optimal when its best point reaches ECOS's
usual standard (residuals below ``feastol``, gap below :data:`ACCEPT_GAP`).  An answer less
accurate than :data:`EPIGRAPH_TARGET` is solved again with the cone rebalanced
(``EcosBackend._solve_quadratic``), and an equality-constrained QP (every polyhedral ghost
problem) is refined with ECOS itself (``EcosBackend._refine``).  docs/backends.md has the
accuracy and the cost.

Accuracy.  ECOS's own residuals are relative to the norms of its iterates and, for a QP,
describe the epigraph problem; ``SolveInfo.accuracy`` is the larger of them and the
protocol's KKT residual of the returned point
(:func:`ffo_core.accuracy.kkt_accuracy`), which is what the engine sizes its step by.

Statuses (:data:`STATUS_MAP`): ECOS's ``exitFlag``; ``+10`` marks "close to" results
(``OPTIMAL_INACCURATE`` etc.), ``-1`` is the iteration limit.  An infeasible or unbounded
verdict is confirmed at ECOS's own ``abstol = reltol = 1e-8`` (:data:`VERDICT_TOLERANCES`:
ECOS computes its infeasibility measures only where the cost exceeds ``reltol``, and at
1e-12 rounding passed for a certificate), and "unbounded" with a positive definite ``P``
(impossible) is a numerical error.

Ctrl-C.  ECOS installs its own SIGINT handler while it solves and, when interrupted, stops
with ``-4`` -- unless its current point meets its *reduced* tolerances (``*_inacc``), in which
case it reports "close to optimal" and the interrupt is lost.  So, unless the user sets an
``*_inacc`` tolerance, the adapter passes the full tolerances as the reduced ones (an
interrupted ECOS then always says ``-4``, raised here as ``KeyboardInterrupt``) and applies
ECOS's reduced-accuracy test itself to a solve that stalls (``-1``/``-2``: the best
iterate's residuals against ECOS's default reduced tolerances, :data:`REDUCED`), which gives
what ECOS would have said; a stall that leaves no usable point (``-3``, ``-7``) is solved
again with ECOS's own reduced tolerances.  The solve runs under
:func:`~ffo_core.backend_base.native_solve`, which puts back the SIGINT handler ECOS leaves
installed on some early exits.

Thread safety: every ``solve`` is a separate ``ecos.solve`` call on fresh arrays; the only
state kept is a small cache of factors of ``P`` (a pure function of ``P``, under a lock), so
results never depend on call history.  ECOS is an interior-point method: no warm start, no
structure reuse.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import ClassVar, cast

import numpy as np
import scipy.sparse as sp

from ffo_core.accuracy import kkt_accuracy
from ffo_core.backend_base import (
    BackendBase,
    QuadraticEpigraph,
    check_bool,
    check_number,
    data_digest,
    interrupted,
    linear_cost,
    native_solve,
    note_scaling,
    psd_factor,
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

#: Keyword settings of ``ecos.solve`` for continuous problems.
ECOS_SETTINGS = (
    "feastol",
    "abstol",
    "reltol",
    "feastol_inacc",
    "abstol_inacc",
    "reltol_inacc",
    "max_iters",
    "nitref",
    "verbose",
)

#: This adapter's defaults where they differ from ECOS's (the user's settings replace them):
#: the duality gap is closed to 1e-12 because a QP's multipliers line up with the epigraph
#: cone's only to about the square root of the gap (see the module docstring).
DEFAULTS = {"feastol": 1e-9, "abstol": 1e-12, "reltol": 1e-12, "max_iters": 200}
#: A solve that stalls before its tolerances is still OPTIMAL when its best point has a gap
#: below this (and residuals below ``feastol``): the gap ECOS itself calls optimal by default
#: is 1e-8.
ACCEPT_GAP = 1e-9
#: Tolerances an infeasible/unbounded verdict is confirmed at (ECOS's own defaults), unless
#: the user sets ``abstol`` or ``reltol``.
VERDICT_TOLERANCES = {"abstol": 1e-8, "reltol": 1e-8}
#: ECOS's own reduced ("close to") tolerances, applied by the adapter (see the module
#: docstring) unless the user sets ``*_inacc``.
REDUCED = {"feastol_inacc": 1e-4, "abstol_inacc": 5e-5, "reltol_inacc": 5e-5}
#: Full tolerance each reduced one stands for.
_FULL_OF = {"feastol_inacc": "feastol", "abstol_inacc": "abstol", "reltol_inacc": "reltol"}
#: Protocol KKT residual below which an epigraph solve is not repeated with a better
#: balanced cone, and how many solves one QP may take (see ``_solve_quadratic``).
EPIGRAPH_TARGET = 1e-7
EPIGRAPH_SOLVES = 3
#: Refinement steps of an equality-constrained QP, and the KKT residual at which they stop
#: (see ``EcosBackend._refine``).
REFINE_STEPS = 2
REFINE_TARGET = 1e-11
#: Factors of ``P`` kept per backend (keyed by ``P``'s exact data).
FACTOR_CACHE = 8

#: Protocol exponential-cone rows ``(x, y, z)`` as ECOS wants them (CVXPY's EXP_CONE_ORDER).
EXP_CONE_ORDER = (0, 2, 1)

#: ECOS ``exitFlag`` -> protocol status.
STATUS_MAP = {
    0: Status.OPTIMAL,  # ECOS_OPTIMAL
    1: Status.INFEASIBLE,  # ECOS_PINF: certificate of primal infeasibility
    2: Status.UNBOUNDED,  # ECOS_DINF: certificate of dual infeasibility
    10: Status.OPTIMAL_INACCURATE,  # ECOS_INACC_OFFSET + ECOS_OPTIMAL
    11: Status.INFEASIBLE_INACCURATE,
    12: Status.UNBOUNDED_INACCURATE,
    -1: Status.ITERATION_LIMIT,  # ECOS_MAXIT
    -2: Status.NUMERICAL_ERROR,  # ECOS_NUMERICS: search direction unreliable
    -3: Status.NUMERICAL_ERROR,  # ECOS_OUTCONE: s or z left the cone
    -4: Status.NUMERICAL_ERROR,  # ECOS_SIGINT: raised as KeyboardInterrupt
    -7: Status.NUMERICAL_ERROR,  # ECOS_FATAL
}


def ecos_row_order(dims: ConeDims) -> np.ndarray:
    """``perm`` with ``ecos_rows = protocol_rows[perm]`` for ``G`` (self-inverse)."""
    perm = np.arange(dims.rows, dtype=np.int64)
    start = dims.nonneg + sum(dims.soc)
    for k in range(dims.exp):
        block = start + 3 * k
        perm[block : block + 3] = block + np.asarray(EXP_CONE_ORDER)
    return perm


def ecos_dims(dims: ConeDims) -> dict:
    """ECOS's cone dictionary."""
    return {"l": int(dims.nonneg), "q": [int(k) for k in dims.soc], "e": int(dims.exp)}


def ecos_data(g: Objective, h: ConeConstraints, e: Equalities, extra_linear_term=None):
    """``(c, G, h, dims, A, b, perm)`` in ECOS's conventions (``A``, ``b`` None if ``p = 0``)."""
    if h.dims.psd:
        raise SolverError("ecos has no PSD cone", backend="ecos")
    c = linear_cost(g, extra_linear_term, "ecos")
    perm = ecos_row_order(h.dims)
    G = sp.csc_matrix(h.G.tocsr()[perm] if h.dims.exp else h.G, dtype=float)
    hh = np.ascontiguousarray(h.h[perm], dtype=float)
    A = b = None
    if e.p:
        A = sp.csc_matrix(e.A, dtype=float)
        b = np.ascontiguousarray(e.b, dtype=float)
    return c, G, hh, ecos_dims(h.dims), A, b, perm


class EcosBackend(BackendBase):
    name = "ecos"
    package = "ecos"
    distribution = "ecos"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp"}),
        quadratic_objective=True,
        warm_start=False,
        thread_safe=True,
    )

    #: cvxpylayers' common ``solver_args`` keys and this solver's settings for them
    #: (:mod:`ffo_core.solver_args`)
    solver_arg_names: ClassVar[dict] = {
        "eps": ("abstol", "reltol", "feastol"),
        "eps_abs": "abstol",
        "eps_rel": "reltol",
    }
    _transient = ("_factors", "_factor_lock")

    def __init__(self, *args, **settings) -> None:
        super().__init__(*args, **settings)
        for key, value in self.settings.items():
            if key == "verbose":
                check_bool(self.name, key, value)
            elif key in ("max_iters", "nitref"):
                check_number(self.name, key, value, integer=True)
            else:
                check_number(self.name, key, value, positive=True)
        self.options = {"verbose": False, **DEFAULTS, **self.settings}
        self._own_reduced = not any(k in self.settings for k in REDUCED)
        self._verdict_check = not any(k in self.settings for k in VERDICT_TOLERANCES)
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._factors: OrderedDict = OrderedDict()
        self._factor_lock = threading.Lock()

    def setting_names(self):
        return ECOS_SETTINGS

    def with_settings(self, **settings) -> EcosBackend:
        """A new backend with ``settings`` added to or replacing this one's.  ECOS has no
        time limit: ``time_limit`` is a :class:`ConfigError` (bound the work with
        ``max_iters`` instead)."""
        if "time_limit" in settings:
            raise ConfigError(
                "ECOS has no time limit; bound its work with max_iters "
                '(e.g. "ecos:max_iters=50") or choose another backend'
            )
        # BackendBase.with_settings returns type(self)(...): an EcosBackend here
        return cast(EcosBackend, super().with_settings(**settings))

    # -- the epigraph of a quadratic objective -------------------------------------------
    def _factor(self, P):
        """``F`` with ``F'F = P`` (:func:`psd_factor`), cached by ``P``'s exact data."""
        P = sp.csc_matrix(P)
        key = data_digest([np.array(P.shape), P.indptr, P.indices, P.data])
        with self._factor_lock:
            hit = self._factors.get(key)
            if hit is not None:
                self._factors.move_to_end(key)
                return hit
        F = psd_factor(P, backend=self.name)
        with self._factor_lock:
            self._factors[key] = F
            while len(self._factors) > FACTOR_CACHE:
                self._factors.popitem(last=False)
        return F

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
        if h.dims.psd:
            raise SolverError("ecos has no PSD cone", backend=self.name)
        if not g.is_quadratic:
            sol = _with_kkt(
                self._solve_linear(g, h, e, extra_linear_term), g, h, e, extra_linear_term
            )
        else:
            sol = self._solve_quadratic(g, h, e, extra_linear_term)
            if h.m == 0 and sol.status.has_solution:  # every polyhedral ghost problem
                sol = self._refine(sol, g, h, e, extra_linear_term)
        return note_scaling(sol, g, h, e)

    def _solve_quadratic(self, g, h, e, extra_linear_term) -> Solution:
        """Through the epigraph (:class:`QuadraticEpigraph`), first with ``sigma = 1``.  An
        answer that is not optimal with a protocol KKT residual below
        :data:`EPIGRAPH_TARGET` is solved again with the cone rebalanced, ``sigma =
        sqrt(t)`` (with no point to read ``t`` from, :meth:`QuadraticEpigraph.balance`),
        then ``3 sqrt(t)`` (the last digits an interior-point method reaches vary with the
        scaling), at most :data:`EPIGRAPH_SOLVES` solves in all, skipping a ``sigma``
        within 25% of one tried; the best answer is kept.  Measured on the conformance zoo
        and its ghost problems, 1 solve in most cases, 2-3 on ghosts with ``t`` far from
        1."""
        F = self._factor(g.P)
        best = None
        tried: list[float] = []
        queue: list[float] = [1.0]
        while queue and len(tried) < EPIGRAPH_SOLVES:
            sigma = queue.pop(0)
            if any(abs(math.log(sigma / x)) < 0.22 for x in tried):
                continue
            tried.append(sigma)
            epi = QuadraticEpigraph(g, h, e, F, sigma)
            q, G, hh, dims, A = epi.lift(g, extra_linear_term)
            lifted = self._solve_linear(
                Objective(None, q), ConeConstraints(G, hh, dims), Equalities(A, e.b), None
            )
            sol = lifted
            if lifted.status.has_solution:
                y, lam, slack = epi.restrict(lifted.primal, lifted.ineq_dual, lifted.slack)
                sol = Solution(lifted.status, y, lifted.eq_dual, lam, slack, lifted.info)
                _with_kkt(sol, g, h, e, extra_linear_term)
                good = sol.status is Status.OPTIMAL and sol.info.accuracy <= EPIGRAPH_TARGET
                if not good:
                    root = math.sqrt(max(0.5 * float(y @ (g.P @ y)), 1e-6))
                    queue = [root, 3.0 * root]
            elif lifted.status in (Status.INFEASIBLE, Status.ITERATION_LIMIT) or (
                lifted.status is Status.UNBOUNDED and F.shape[0] < g.n
            ):
                queue = []  # a certificate, or the user's bound on the work
            else:  # a stall, or "unbounded" with P positive definite (impossible)
                root = QuadraticEpigraph.balance(F, q[:-1])
                queue = [root, math.sqrt(root)]
            sol.info.extra["sigma"] = epi.sigma
            if best is None or _rank(sol) < _rank(best):
                best = sol
            if _rank(best)[0] == 0 and best.info.accuracy <= EPIGRAPH_TARGET:
                break
        best.info.extra["epigraph_solves"] = len(tried)
        if F.shape[0] == g.n and best.status in (Status.UNBOUNDED, Status.UNBOUNDED_INACCURATE):
            best.status = Status.NUMERICAL_ERROR  # P is positive definite: cannot be unbounded
            best.info.raw_status = (
                f"{best.info.raw_status}; P is positive definite, so the problem is not "
                "unbounded: ECOS failed on its epigraph"
            )
        return best

    def _refine(self, sol: Solution, g, h, e, extra_linear_term) -> Solution:
        """Iterative refinement of an equality-constrained QP's answer with ECOS itself:
        the correction ``(dy, dnu)`` solves the same QP with the residuals as data,
        ``min 1/2 dy'P dy + r_d'dy  s.t.  A dy = r_p`` (``r_d = Py + q + A'nu``,
        ``r_p = b - Ay``), whose answer is small, so its relative accuracy becomes absolute
        accuracy of the sum.  At most :data:`REFINE_STEPS` corrections, each kept only if
        it lowers the KKT residual, none once it is below :data:`REFINE_TARGET`.
        Measured on ghost problems of the conformance zoo
        (equality-only, ``P`` spanning 1e-7..43): distance to the exact solution
        5.5e-8 -> 7.7e-12 -> 7.1e-14."""
        q = g.q if extra_linear_term is None else g.q + extra_linear_term
        for _ in range(REFINE_STEPS):
            if sol.info.accuracy <= REFINE_TARGET:
                break
            r_d = g.P @ sol.primal + q + e.A.T @ sol.eq_dual
            r_p = e.b - e.A @ sol.primal
            fix = self._solve_quadratic(Objective(g.P, r_d), h, Equalities(e.A, r_p), None)
            if not fix.status.has_solution:
                break
            better = Solution(
                sol.status,
                sol.primal + fix.primal,
                sol.eq_dual + fix.eq_dual,
                sol.ineq_dual,
                sol.slack,
                sol.info,
            )
            acc = kkt_accuracy(
                g,
                h,
                e,
                better.primal,
                better.eq_dual,
                better.ineq_dual,
                better.slack,
                extra_linear_term,
            )
            if not acc < sol.info.accuracy:
                break
            sol = better
            sol.info.accuracy = acc
            sol.info.extra["kkt_accuracy"] = acc
            sol.info.extra["refinements"] = sol.info.extra.get("refinements", 0) + 1
            if sol.status is Status.OPTIMAL_INACCURATE and acc <= EPIGRAPH_TARGET:
                sol.status = Status.OPTIMAL
        return sol

    def _solve_linear(self, g, h, e, extra_linear_term) -> Solution:
        """One ECOS solve of a problem without a quadratic objective."""
        c, G, hh, dims, A, b, perm = ecos_data(g, h, e, extra_linear_term)
        n, p, m = g.n, e.p, h.m
        drop_eq = False
        if A is not None and A.nnz == 0:
            # ECOS rejects an all-zero A: the rows read 0 = b.
            if np.any(b != 0):
                return Solution(
                    status=Status.INFEASIBLE,
                    info=SolveInfo(raw_status="0 = b with b != 0 (checked before calling ECOS)"),
                )
            A = b = None
            drop_eq = True
        args = (c, G if m else None, hh if m else None, dims, A, b)
        opts = dict(self.options)
        if self._own_reduced:  # see the module docstring (Ctrl-C)
            opts.update({k: opts[full] for k, full in _FULL_OF.items()})
        res, flag = self._verdict(args, opts)
        if flag in (1, 2, 11, 12) and self._verdict_check:
            # ECOS only computes its infeasibility measures once cost or gap exceeds reltol:
            # a tiny reltol lets rounding pass for a certificate, so a verdict is confirmed
            # at ECOS's own tolerances (measured: an infeasible SOCP of the conformance zoo
            # is "dual infeasible" at reltol 1e-12, "primal infeasible" at 1e-9)
            res, flag = self._verdict(args, {**opts, **VERDICT_TOLERANCES})
        return self._to_protocol(res, flag, n, p, m, perm, drop_eq)

    def _verdict(self, args, opts) -> tuple[dict, int]:
        """ECOS's answer and the exit flag the adapter reads it as (see the module
        docstring, Ctrl-C): with the reduced tolerances set to the full ones, ECOS's
        "close to" (``+10``) means the full tolerances were met; a stall or an iteration
        limit (``-2``, ``-1``) is judged by :func:`_reduced_verdict`; a stall with no usable
        point (``-3``, ``-7``) is solved again with ECOS's own reduced tolerances."""
        res = self._call(args, opts)
        flag = int(res["info"]["exitFlag"])
        if not self._own_reduced:
            return res, flag
        if flag in (10, 11, 12):
            return res, flag - 10
        if flag in (-1, -2):
            return res, _reduced_verdict(res["info"], flag, self.options)
        if flag in (-3, -7):
            res = self._call(args, {k: v for k, v in opts.items() if k not in REDUCED})
            flag = int(res["info"]["exitFlag"])
            if flag == 10:
                flag = _reduced_verdict(res["info"], -2, self.options)
        return res, flag

    def _call(self, args, opts) -> dict:
        import ecos

        try:
            with native_solve():
                res = ecos.solve(*args, **opts)
        except TypeError as exc:
            raise ConfigError(
                f"ecos rejected its settings: {exc}; valid settings: {', '.join(ECOS_SETTINGS)}"
            ) from exc
        except ValueError as exc:
            raise SolverError(
                f"ecos could not solve the problem: {exc}", backend=self.name
            ) from exc
        if int(res["info"]["exitFlag"]) == -4:  # ECOS_SIGINT
            raise interrupted(self.name, "SIGINT")
        return res

    @staticmethod
    def _to_protocol(res: dict, flag: int, n, p, m, perm, drop_eq) -> Solution:
        raw = res["info"]
        status = STATUS_MAP.get(flag, Status.NUMERICAL_ERROR)
        relgap = raw.get("relgap")
        gap = raw.get("gap")
        gaps = [abs(v) for v in (gap, relgap) if v is not None and np.isfinite(v)]
        parts = [raw.get("pres"), raw.get("dres"), min(gaps) if gaps else None]
        parts = [float(v) for v in parts if v is not None and np.isfinite(v)]
        timing = raw.get("timing", {})
        word = raw.get("infostring", "")
        if flag != int(raw["exitFlag"]):
            word = f"{word}; reduced accuracy reached ({STATUS_MAP[flag].value})"
        info = SolveInfo(
            iterations=int(raw.get("iter", 0)),
            solve_time=float(timing.get("runtime", 0.0)),
            accuracy=max(parts) if parts else None,
            raw_status=f"{flag}: {word}",
            extra={
                "pres": raw.get("pres"),
                "dres": raw.get("dres"),
                "gap": gap,
                "relgap": relgap,
                "exitFlag": int(raw["exitFlag"]),
            },
        )
        if not status.has_solution:
            return Solution(status=status, info=info)
        z = np.asarray(res["z"], dtype=float)
        s = np.asarray(res["s"], dtype=float)
        lam = np.empty(m)
        slack = np.empty(m)
        lam[perm] = z
        slack[perm] = s
        nu = np.zeros(p) if drop_eq else np.asarray(res["y"], dtype=float)
        return Solution(
            status=status,
            primal=np.asarray(res["x"], dtype=float),
            eq_dual=nu,
            ineq_dual=lam,
            slack=slack,
            info=info,
        )


def _reduced_verdict(info: dict, flag: int, options: dict) -> int:
    """The verdict on the best point of a solve that stalled (``-2``) or ran out of
    iterations (``-1``): ``0`` (optimal) when its residuals are below ``feastol`` and its gap
    below :data:`ACCEPT_GAP` (absolute or relative), else ECOS's own reduced-accuracy test
    (its ``checkExitConditions`` with the ``*_inacc`` tolerances of :data:`REDUCED`): ``10``
    (close to optimal), ``12``/``11`` (close to unbounded/infeasible), else ``flag``
    unchanged.  An iteration limit stays one unless the point is optimal."""

    def val(key):
        v = info.get(key)
        return float(v) if v is not None and np.isfinite(v) else np.inf

    feastol = float(options["feastol"])
    gap_ok = max(float(options["abstol"]), ACCEPT_GAP)
    rel_ok = max(float(options["reltol"]), ACCEPT_GAP)
    feasible = val("pres") < feastol and val("dres") < feastol
    if feasible and (val("gap") < gap_ok or val("relgap") < rel_ok):
        return 0
    if flag == -1:
        return flag
    feas, abstol, reltol = (REDUCED[k] for k in ("feastol_inacc", "abstol_inacc", "reltol_inacc"))
    close = val("gap") < abstol or val("relgap") < reltol
    if val("pres") < feas and val("dres") < feas and close:
        return 10
    if val("dinfres") < feas:
        return 12
    if val("pinfres") < feas:
        return 11
    return flag


def _with_kkt(sol: Solution, g, h, e, extra_linear_term) -> Solution:
    """``sol`` with ``info.accuracy`` raised to its protocol KKT residual (see the module
    docstring: Accuracy)."""
    if sol.status.has_solution:
        q = g.q if extra_linear_term is None else g.q + extra_linear_term
        kkt = kkt_accuracy(
            Objective(g.P, q), h, e, sol.primal, sol.eq_dual, sol.ineq_dual, sol.slack
        )
        sol.info.extra["kkt_accuracy"] = kkt
        sol.info.accuracy = max(sol.info.accuracy or 0.0, kkt)
    return sol


def _rank(sol: Solution) -> tuple:
    """Order of preference between two answers to one problem (smaller is better)."""
    order = (Status.OPTIMAL, Status.OPTIMAL_INACCURATE)
    first = order.index(sol.status) if sol.status in order else len(order)
    return first, sol.info.accuracy if sol.info.accuracy is not None else np.inf


@hookimpl
def ffo_register_backends(register):
    register(EcosBackend)
