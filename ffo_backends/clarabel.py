"""Clarabel adapter (interior point; LP, QP, SOC, EXP, PSD), through ``clarabel.DefaultSolver``.

Native conventions and how they map to the protocol (:mod:`ffo_core.protocol`):

* Clarabel solves ``min 1/2 x'Px + q'x  s.t.  Ax + s = b, s in K`` with ``P`` given as its
  upper triangle, and returns ``z`` with ``Px + q + A'z = 0``, ``z in K*``.  We stack
  ``[A_eq; G]`` with a zero cone first, so ``z = [nu; lam]`` and ``s = [0; s]`` with no sign
  change.
* Entries that are stored but zero (a parameter that is currently 0, e.g. the off-diagonal
  of a learnable matrix initialised to the identity) are dropped before the solve: the
  solver sees the numerical sparsity, the engine keeps the structural pattern for gradients.
* Clarabel's ``ExponentialConeT`` and ``PSDTriangleConeT`` (upper triangle, column-major,
  sqrt(2)-scaled) are the protocol's layouts already.

Settings are Clarabel's ``DefaultSettings`` attribute names (``tol_gap_abs``, ``max_iter``,
``time_limit`` in seconds, ...).  Defaults (:data:`DEFAULTS`): ``verbose`` False and
``tol_gap_abs = tol_gap_rel = 1e-12`` (Clarabel: 1e-8); every other setting is Clarabel's
own.  An interior-point method leaves a row near a kink with a slack and a multiplier
both about ``sqrt(gap)``, where the engine cannot tell whether it is active: measured on the
DFL QP (n = 1000, batch 8, seeds 0-4) the gradient is 1.1e-1 off at Clarabel's 1e-8 gap,
6.2e-2 at 1e-10 and 1.1e-7 at 1e-12, for the same time per training step (the last
iterations are cheap).  A solve that stops ``AlmostSolved`` on the way is ``OPTIMAL`` when
it meets Clarabel's own default tolerances.  Values are checked when the backend is made
(type, sign, NaN, and Clarabel's own validation of a settings object), so
``"clarabel:max_iter=-5"`` is a :class:`~ffo_core.errors.ConfigError` naming ``max_iter``.
:meth:`ClarabelBackend.with_settings` returns a configured copy (how
``FFOLayer(time_limit=...)`` sets the limit).

Ctrl-C.  Clarabel installs no SIGINT handler: Python's stays in place and
``KeyboardInterrupt`` surfaces when Clarabel hands control back, at the end of the solve.
For a problem large enough that one solve can take long (:data:`CALLBACK_NNZ` stored
entries or more), the adapter registers a termination callback (Clarabel calls it once per
iteration) that stops the solve when asked: called from the main thread, the solve runs in
a helper thread while the main thread waits, so Ctrl-C raises there at once and stops the
solve within one iteration (a ``KeyboardInterrupt`` raised inside the callback itself
would be printed and dropped by Clarabel's binding); in a worker thread,
:func:`ffo_core.backend_base.interrupt_solves` stops it.  Smaller problems go without (the
callback's per-iteration cost is then a visible share of the solve) and are interrupted
at the end of their solve.

Badly scaled data: when a solve ends infeasible, unbounded, at its iteration limit or in a
numerical error and the data has entries of 1e8 or more, or entries spanning nine orders of
magnitude (:func:`~ffo_core.backend_base.note_scaling`), ``SolveInfo.raw_status`` says so:
measured, an LP with a box and a cost of 1e10 is "DualInfeasible" in Clarabel.

Thread safety: every ``solve`` builds its own ``DefaultSolver``; the adapter keeps no
mutable state, so one instance may be used from many threads.  Clarabel is an interior
point method: it has no warm start.

Structure reuse (:meth:`ClarabelBackend.resolve`, the protocol's optional second solve of
one problem): a ghost solve (one with an ``extra_linear_term``) keeps its ``DefaultSolver``
in its Solution's ``info.extra``, and ``resolve`` with that Solution and the same problem
objects updates ``q`` instead of setting up again.  The engine asks for it only for the
second solve of one sample's ghost (central differences, a shrunk curved step), in the
thread of the first, so a sample's answer never depends on what another sample solved; it
differs from a fresh solve's by what Clarabel's kept equilibration changes (1e-14..3e-12 on
the DFL ghosts; up to the solver's tolerance in general).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np

from ffo_core.backend_base import (
    BackendBase,
    check_bool,
    check_number,
    interrupt_generation,
    interrupted,
    native_solve,
    note_scaling,
    prune,
    stack_rows,
)
from ffo_core.errors import ConfigError
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

if TYPE_CHECKING:  # imported lazily at run time
    import clarabel

#: Clarabel's ``SolverStatus`` names -> protocol status.
STATUS_MAP = {
    "Solved": Status.OPTIMAL,
    "AlmostSolved": Status.OPTIMAL_INACCURATE,
    "PrimalInfeasible": Status.INFEASIBLE,
    "AlmostPrimalInfeasible": Status.INFEASIBLE_INACCURATE,
    "DualInfeasible": Status.UNBOUNDED,
    "AlmostDualInfeasible": Status.UNBOUNDED_INACCURATE,
    "MaxIterations": Status.ITERATION_LIMIT,
    "MaxTime": Status.TIME_LIMIT,
    "NumericalError": Status.NUMERICAL_ERROR,
    "InsufficientProgress": Status.NUMERICAL_ERROR,
    "CallbackTerminated": Status.NUMERICAL_ERROR,
    "Unsolved": Status.NUMERICAL_ERROR,
}


#: This adapter's defaults where they differ from Clarabel's (see the module docstring);
#: the user's settings replace them.
DEFAULTS = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12}
#: Clarabel's own default tolerances: an ``AlmostSolved`` point that meets them is optimal.
ACCEPT = 1e-8

#: Stored entries of ``P`` and ``[A; G]`` from which a solve gets a termination callback
#: (Ctrl-C within one iteration); see the module docstring.
CALLBACK_NNZ = 100_000


class ClarabelBackend(BackendBase):
    name = "clarabel"
    package = "clarabel"
    distribution = "clarabel"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp", "psd"}),
        quadratic_objective=True,
        warm_start=False,
        thread_safe=True,
    )

    #: cvxpylayers' common ``solver_args`` keys and this solver's settings for them
    #: (:mod:`ffo_core.solver_args`)
    solver_arg_names: ClassVar[dict] = {
        "eps": ("tol_gap_abs", "tol_gap_rel", "tol_feas"),
        "eps_abs": "tol_gap_abs",
        "eps_rel": "tol_gap_rel",
        "max_iters": "max_iter",
    }

    #: A ghost problem on curved cones is solved with these (unless the user set them):
    #: its point is only ~sqrt(tolerance) accurate on the cone (ffo_core.engine.solves);
    #: the gap is at 1e-12 already (DEFAULTS), the feasibility tolerance joins it.
    tight_settings: ClassVar[dict] = {"tol_feas": 1e-12}

    def __init__(self, *args, **settings) -> None:
        super().__init__(*args, **settings)
        self._own_gap = not any(k in self.settings for k in DEFAULTS)
        self._validate()

    def setting_names(self):
        import clarabel

        return [
            a for a in dir(clarabel.DefaultSettings()) if not a.startswith("_") and a != "default"
        ]

    def _validate(self) -> None:
        """Check every value against the type of Clarabel's default for it (numbers also
        for NaN and sign), then let Clarabel validate a settings object of them."""
        import clarabel
        import scipy.sparse as sp

        defaults = clarabel.DefaultSettings()
        for key, value in self.settings.items():
            if not hasattr(defaults, key):  # a subclass's own option: its business
                continue
            default = getattr(defaults, key)
            if isinstance(default, bool):
                check_bool(self.name, key, value)
            elif isinstance(default, int):
                check_number(self.name, key, value, integer=True)
            elif isinstance(default, float):
                check_number(self.name, key, value, allow_inf=key == "time_limit")
            elif isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f"clarabel setting {key}={value!r}: must be a string")
        settings = self._settings()
        try:  # Clarabel checks its settings when a solver is made
            clarabel.DefaultSolver(
                sp.csc_matrix((1, 1)),
                np.zeros(1),
                sp.csc_matrix(np.ones((1, 1))),
                np.ones(1),
                [clarabel.NonnegativeConeT(1)],
                settings,
            )
        except Exception as exc:
            raise ConfigError(f"clarabel rejected its settings: {exc}") from exc

    def _settings(self):
        import clarabel

        settings = clarabel.DefaultSettings()
        settings.verbose = False
        for key, value in {**DEFAULTS, **self.settings}.items():
            try:
                setattr(settings, key, value)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ConfigError(f"clarabel setting {key}={value!r}: {exc}") from exc
        return settings

    @staticmethod
    def _cones(e: Equalities, h: ConeConstraints):
        import clarabel

        d = h.dims
        cones = []
        if e.p:
            cones.append(clarabel.ZeroConeT(e.p))
        if d.nonneg:
            cones.append(clarabel.NonnegativeConeT(d.nonneg))
        cones += [clarabel.SecondOrderConeT(k) for k in d.soc]
        cones += [clarabel.ExponentialConeT() for _ in range(d.exp)]
        cones += [clarabel.PSDTriangleConeT(s) for s in d.psd]
        return cones

    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term=None,
        *,
        warm_start=None,
    ) -> Solution:
        import clarabel

        since = interrupt_generation()
        P = g.upper()
        q = g.q if extra_linear_term is None else g.q + extra_linear_term
        A = stack_rows(prune(e.A), prune(h.G))
        b = np.concatenate([e.b, h.h])
        solver = clarabel.DefaultSolver(P, q, A, b, self._cones(e, h), self._settings())
        kept = _Kept(solver, g, h, e) if extra_linear_term is not None else None
        return self._answer(self._run(solver, P.nnz + A.nnz, since), g, h, e, kept)

    def _run(self, solver, nnz: int, since: int | None = None):
        """``solver.solve()``, with a termination callback on a large problem (Ctrl-C within
        one iteration, see the module docstring)."""
        if nnz < CALLBACK_NNZ:
            return solver.solve()
        stop = threading.Event()
        solver.set_termination_callback(lambda _info: stop.is_set())
        with native_solve(stop.set, installs_handler=False, since=since):
            if threading.current_thread() is threading.main_thread():
                res = _solve_in_helper(solver, stop)
            else:
                res = solver.solve()
        solver.unset_termination_callback()
        if str(res.status) == "CallbackTerminated":
            raise interrupted(self.name, "interrupt_solves")
        return res

    def resolve(
        self,
        previous: Solution | None,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term: np.ndarray,
    ) -> Solution:
        """``solve(g, h, e, extra_linear_term)``, reusing the set-up of ``previous`` when it
        is this adapter's answer to a solve of these same ``(g, h, e)`` objects with
        another extra linear term (the engine's second solve of one ghost problem): only
        ``q`` changes, so Clarabel's ``update(q=...)`` replaces a new ``DefaultSolver``
        (its set-up and symbolic factorisation are skipped; the solutions equal a fresh
        solve's to 1e-14..3e-12).  Anything else is a fresh :meth:`solve`."""
        kept = previous.info.extra.get(_KEPT) if previous is not None else None
        if not (
            isinstance(kept, _Kept)
            and kept.g is g
            and kept.h is h
            and kept.e is e
            and kept.solver.is_data_update_allowed()
        ):
            return self.solve(g, h, e, extra_linear_term)
        since = interrupt_generation()
        kept.solver.update(q=g.q + extra_linear_term)
        nnz = g.upper().nnz + e.A.nnz + h.G.nnz
        return self._answer(self._run(kept.solver, nnz, since), g, h, e, kept)

    def _answer(
        self, res, g: Objective, h: ConeConstraints, e: Equalities, kept: _Kept | None
    ) -> Solution:
        """Clarabel's result as a protocol Solution; ``kept`` goes into ``info.extra`` (a
        ghost solve's solver, for :meth:`resolve`).  ``AlmostSolved`` on the way to this
        adapter's tight gap is ``OPTIMAL`` when the point meets Clarabel's own default
        tolerances (:data:`ACCEPT`), unless the user set the gap tolerances."""
        raw = str(res.status)
        status = STATUS_MAP.get(raw, Status.NUMERICAL_ERROR)
        gap_abs = abs(res.obj_val - res.obj_val_dual)
        gap = gap_abs / max(1.0, abs(res.obj_val))
        if raw == "AlmostSolved" and self._own_gap:
            gap_rel = gap_abs / max(min(abs(res.obj_val), abs(res.obj_val_dual)), 1e-300)
            feasible = max(res.r_prim, res.r_dual) <= ACCEPT
            if feasible and min(gap_abs, gap_rel) <= ACCEPT:
                status = Status.OPTIMAL
                raw = f"{raw} (meets Clarabel's default tolerances {ACCEPT:g})"
        accuracy = float(max(res.r_prim, res.r_dual, gap)) if math.isfinite(gap) else None
        if accuracy is not None and h.dims.kinds - {"nonneg"}:
            # on curved cones the point is only ~sqrt(residual) accurate (measured on 12
            # SOC/EXP/PSD instances: true error <= sqrt of the reported figure)
            accuracy = float(np.sqrt(accuracy))
        info = SolveInfo(
            iterations=int(res.iterations),
            solve_time=float(res.solve_time),
            accuracy=accuracy,
            raw_status=raw,
            extra={} if kept is None else {_KEPT: kept},
        )
        if not status.has_solution:
            return note_scaling(Solution(status=status, info=info), g, h, e)
        z = _floats(res.z, e.p + h.m)
        return Solution(
            status=status,
            primal=_floats(res.x, g.n),
            eq_dual=z[: e.p],
            ineq_dual=z[e.p :],
            slack=_floats(res.s[e.p :], h.m),
            info=info,
        )


#: ``SolveInfo.extra`` key of a ghost solve's kept solver (see ``ClarabelBackend.resolve``).
_KEPT = "clarabel_solver"


class _Kept(NamedTuple):
    """A solver kept with the exact problem objects it was set up for.  It lives as long
    as the Solution that holds it: the engine drops a ghost's after its last solve."""

    solver: clarabel.DefaultSolver
    g: Objective
    h: ConeConstraints
    e: Equalities


def _solve_in_helper(solver, stop: threading.Event):
    """``solver.solve()`` in a helper thread while the main thread waits for it.

    Python runs signal handlers in the main thread only, between bytecodes: raised inside
    Clarabel's termination callback, a ``KeyboardInterrupt`` is printed and dropped by the
    binding, and while the main thread is inside Clarabel none is raised at all.  Waiting
    in ``Thread.join`` instead, the main thread gets the ``KeyboardInterrupt`` at once; it
    sets ``stop``, which the callback returns to Clarabel at its next iteration, waits for
    the helper and re-raises."""
    box: dict = {}

    def work() -> None:
        try:
            box["res"] = solver.solve()
        except BaseException as exc:  # handed to the caller below
            box["exc"] = exc

    helper = threading.Thread(target=work, name="clarabel-solve", daemon=True)
    helper.start()
    try:
        while helper.is_alive():  # a join with a timeout: handlers run between the waits
            helper.join(0.05)
    except KeyboardInterrupt:
        stop.set()
        helper.join()
        raise
    if "exc" in box:
        raise box["exc"]
    return box["res"]


def _floats(values, size: int) -> np.ndarray:
    """A solution vector (Clarabel returns Python lists) as a float array: ``fromiter``
    is the cheaper conversion of a list of floats."""
    return np.fromiter(values, dtype=float, count=size)


@hookimpl
def ffo_register_backends(register):
    register(ClarabelBackend)
