"""The checks, and the measures they report.

Residuals of a returned ``Solution`` (all relative, infinity norms, computed here from the
problem data and the returned vectors only):

* ``primal_res``  = max( ||Ay - b|| / (1 + max(||b||, ||Ay||)),
                         ||Gy + s - h|| / (1 + max(||h||, ||Gy||, ||s||)) )
* ``dual_res``    = ||Py + q + A'nu + G'lam|| / (1 + max(||q||, ||Py||, ||A'nu||, ||G'lam||))
  (a flipped or scaled multiplier shows up here first)
* ``cone_res``    = max( dist-like violation of s in K / (1 + ||s||),
                         violation of lam in K* / (1 + ||lam||) )   (see ffo_conformance.cones)
* ``complementarity`` = (sum_i |s_i lam_i| over nonnegative rows + sum_k |s_k'lam_k| over
  cone blocks) / (1 + |1/2 y'Py + q'y|)
* ``dist_primal`` = ||y - y_ref|| / (1 + ||y_ref||), ``dist_dual`` the same for nu and lam.

Every call to the backend goes through :class:`ffo_conformance.guard.GuardedBackend`: a
backend that writes into its inputs fails the check that made the call, and the suite's own
reference works on copies of the samples made before any backend saw them.

Gradients are compared per block of the data (``P, q, A, b, G, h``; protocol instances) or
per parameter (layer instances): ``rel[X] = ||g_X - r_X|| / max(||r_X||, floor)`` with
``floor = GRAD_BLOCK_FLOOR * ||r||``, and ``cos[X]`` (only where ``||r_X|| >= floor``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ffo_core.config import SolverConfig, parse_config
from ffo_core.engine.ffo_backward import FFOOptions, ffo_backward
from ffo_core.errors import ConfigError, FFOError
from ffo_core.protocol import Objective, Solution, Status
from ffo_core.registry import get_backend

from . import cones
from . import tolerances as T
from .guard import GuardedBackend, InputsModified
from .reference import ReferenceSolver, kkt_reference
from .zoo import EXPECT_LIMIT, ITERATION_LIMIT, TIME_LIMIT, Instance, Sample, constructed

#: Check names, in report order.
CHECKS = (
    "status",
    "solution",
    "grad-ffo",
    "grad-central",
    "warm-start",
    "resolve",
    "solve-batch",
    "deterministic",
    "threads",
)

#: The checks each kind of instance (:attr:`ffo_conformance.zoo.Instance.kind`) can run;
#: ``solve-batch`` runs on optimal instances with several samples only (:func:`applies`).
APPLICABLE = {
    "optimal": CHECKS,
    "status": ("status",),
    "limit": ("status",),
    "layer": ("solution", "grad-ffo", "grad-central"),
}

#: Setting names the ``limit`` instances look for (in ``setting_names()`` where the backend
#: lists its settings, else tried in turn): the iteration limits of Clarabel, OSQP, SCS, ECOS,
#: GUROBI, MOSEK and common spellings.  A backend may name its own with a class attribute
#: ``iteration_limit_setting`` (a string or a tuple of strings).  Time limits use the
#: protocol's generic ``time_limit`` (seconds), through ``with_settings``.
ITERATION_LIMIT_NAMES = (
    "max_iter",
    "max_iters",
    "maxiter",
    "max_iterations",
    "iteration_limit",
    "IterationLimit",
    "BarIterLimit",
    "MSK_IPAR_INTPNT_MAX_ITERATIONS",
    "MSK_IPAR_SIM_MAX_ITERATIONS",
)


def applies(inst: Instance, check: str) -> bool:
    """Whether ``check`` is meaningful for ``inst`` (else '·' in the table)."""
    if check not in APPLICABLE[inst.kind]:
        return False
    return check != "solve-batch" or len(inst.samples) > 1


BLOCKS = ("P", "q", "A", "b", "G", "h")


# -- results ------------------------------------------------------------------------------


@dataclass
class Metric:
    """One measured number against its tolerance (``kind="min"``: a lower bound)."""

    name: str
    value: float | None
    tol: float
    kind: str = "max"
    text: str | None = None

    @property
    def ok(self) -> bool:
        if self.value is None or not math.isfinite(self.value):
            return False
        return self.value <= self.tol if self.kind == "max" else self.value >= self.tol

    @property
    def badness(self) -> float:
        """How close to (or beyond) the tolerance: 1 at the tolerance, larger is worse."""
        if self.value is None or not math.isfinite(self.value):
            return math.inf
        if self.kind == "max":
            return self.value / self.tol if self.tol > 0 else (0.0 if self.value <= 0 else math.inf)
        return (1.0 - self.value) / max(1.0 - self.tol, 1e-300)

    def display(self) -> str:
        if self.text is not None:
            return self.text
        if self.value is None or not math.isfinite(self.value):
            return f"{self.name}={self.value}"
        if self.kind == "min":
            return f"{self.name} {self.value:.6f} (>= {self.tol:g})"
        return f"{self.name} {self.value:.1e} (<= {self.tol:.0e})"

    def to_dict(self) -> dict:
        value: float | str | None = self.value
        if self.value is not None and not math.isfinite(self.value):
            value = str(self.value)  # JSON has no inf/nan
        return {
            "name": self.name,
            "value": value,
            "tol": self.tol,
            "kind": self.kind,
            "ok": self.ok,
            **({"text": self.text} if self.text else {}),
        }


@dataclass
class CheckResult:
    instance: str
    group: str
    check: str
    outcome: str  # "pass", "fail", "error", "skip"
    metrics: list[Metric] = field(default_factory=list)
    reason: str = ""
    profile: str = ""
    seconds: float = 0.0
    #: a gradient failure that the same FFO through the trusted reference solver shares:
    #: an ffo_core limitation on this instance rather than the backend's fault
    engine_limited: bool = False

    @property
    def failed(self) -> bool:
        return self.outcome in ("fail", "error")

    def worst(self) -> Metric | None:
        if not self.metrics:
            return None
        return max(self.metrics, key=lambda m: (not m.ok, m.badness))

    def describe(self) -> str:
        head = f"{self.instance} [{self.check}] {self.outcome.upper()}"
        if self.reason:
            head += f": {self.reason}"
        bad = [m for m in self.metrics if not m.ok]
        shown = bad or self.metrics
        if shown:
            head += "\n    " + "; ".join(m.display() for m in shown[:12])
        return head

    def to_dict(self) -> dict:
        return {
            "instance": self.instance,
            "group": self.group,
            "check": self.check,
            "outcome": self.outcome,
            "profile": self.profile,
            "reason": self.reason,
            "engine_limited": self.engine_limited,
            "seconds": round(self.seconds, 4),
            "metrics": [m.to_dict() for m in self.metrics],
        }


class Skip(Exception):
    """The check does not apply to this backend (reason = the capability that excludes it)."""


class Fail(Exception):
    """The check failed for a reason that is not a number (wrong shape, missing field)."""


class ReferenceUnavailable(Exception):
    """The trusted reference could not be computed for this instance."""


# -- measures -----------------------------------------------------------------------------


def _inf(v) -> float:
    v = np.asarray(v, dtype=float)
    return float(np.max(np.abs(v), initial=0.0))


def rel_diff(a, b) -> float:
    """``||a - b||_inf / (1 + ||b||_inf)``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return math.inf
    return _inf(a - b) / (1.0 + _inf(b))


def check_shapes(sample: Sample, sol: Solution) -> None:
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
    dual = _inf(Py + g.q + Atnu + Gtl) / (1 + max(_inf(g.q), _inf(Py), _inf(Atnu), _inf(Gtl)))
    Ay, Gy = e.A @ y, h.G @ y
    p_eq = _inf(Ay - e.b) / (1 + max(_inf(e.b), _inf(Ay))) if e.p else 0.0
    p_in = _inf(Gy + s - h.h) / (1 + max(_inf(h.h), _inf(Gy), _inf(s))) if h.m else 0.0
    cone = max(
        cones.violation(s, h.dims) / (1 + _inf(s)),
        cones.violation(lam, h.dims, dual=True) / (1 + _inf(lam)),
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


def _grad_blocks(grad) -> dict[str, np.ndarray]:
    return {k: getattr(grad, k) for k in BLOCKS}


def _worst(
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


# -- per-instance state, shared by the checks of one instance -----------------------------


def copy_sample(smp: Sample) -> Sample:
    """A deep copy (the reference's own, which no backend ever sees)."""
    return copy.deepcopy(smp)


class InstanceRun:
    """Lazily computed, cached: reference solutions, the backend's solutions, KKT gradients.

    ``backend`` is wrapped in a :class:`~ffo_conformance.guard.GuardedBackend` unless it is
    one already; ``spec`` is the config string the backend was made from (None for an
    instance), used to make a copy with other settings when it has no ``with_settings``.
    The reference and every measure use ``pristine``, deep copies of the samples taken
    before the backend saw them.
    """

    def __init__(
        self, inst: Instance, backend, reference: ReferenceSolver, spec: str | None = None
    ) -> None:
        self.inst = inst
        self.backend = backend if isinstance(backend, GuardedBackend) else GuardedBackend(backend)
        self.reference = reference
        self.spec = spec
        self.profile = T.PROFILES[inst.profile]
        self.pristine = [copy_sample(s) for s in inst.samples]
        self._cache: dict = {}

    def _cached(self, key, fn):
        if key not in self._cache:
            try:
                self._cache[key] = (True, fn())
            except Exception as exc:  # re-raised for every check that needs it
                self._cache[key] = (False, exc)
        ok, value = self._cache[key]
        if not ok:
            raise value
        return value

    # protocol instances ------------------------------------------------------------
    def ref_solutions(self) -> list[Solution]:
        def compute():
            out = []
            for i, smp in enumerate(self.pristine):
                sol = self.reference.solve(smp.g, smp.h, smp.e)
                if not sol.status.has_solution:
                    raise ReferenceUnavailable(
                        f"reference solve of sample {i} ended {sol.status.value}"
                    )
                res = residuals(smp, sol)
                worst = max(res.values())
                if worst > T.REFERENCE_RESIDUAL:
                    raise ReferenceUnavailable(
                        f"reference solve of sample {i} reached only residual {worst:.1e} "
                        f"(> {T.REFERENCE_RESIDUAL:.0e}): {res}"
                    )
                out.append(sol)
            return out

        return self._cached("ref", compute)

    def solutions(self) -> list[Solution]:
        return self._cached(
            "sols", lambda: [self.backend.solve(s.g, s.h, s.e) for s in self.inst.samples]
        )

    def kkt(self) -> list:
        def compute():
            refs = self.ref_solutions()
            out = []
            for smp, ref in zip(self.pristine, refs):
                try:
                    out.append(kkt_reference(smp.g, smp.h, smp.e, ref, smp.c))
                except (FFOError, ValueError, RuntimeError, NotImplementedError) as exc:
                    raise ReferenceUnavailable(
                        f"KKT reference gradient unavailable ({type(exc).__name__}: {exc})"
                    ) from exc
            return out

        return self._cached("kkt", compute)

    def usable_solutions(self) -> list[Solution]:
        sols = self.solutions()
        for i, (smp, sol) in enumerate(zip(self.pristine, sols)):
            if not sol.status.has_solution:
                raise Fail(
                    f"sample {i}: the backend returned status {sol.status.value} "
                    f"(its solver said {sol.info.raw_status!r}) on a problem with an optimum"
                )
            check_shapes(smp, sol)
        return sols

    def solution_metrics(self) -> tuple[list[Metric], str]:
        """The solution check's measures (cached: the gradient checks' advice reads them)."""
        return self._cached("solution_metrics", lambda: _solution_metrics(self))

    # layer instances ---------------------------------------------------------------
    def layer_result(self, which: str):
        """``(outputs, grads)`` of the layer run with ``which`` in ref/ffo/central."""
        return self._cached(("layer", which), lambda: self._run_layer(which))

    def _run_layer(self, which: str):
        import torch

        from ffo_core import FFOLayer, ProblemError

        case = self.inst.layer
        problem, params, variables = case.build()
        if which == "ref":
            layer = FFOLayer(
                problem,
                params,
                variables,
                solver=self.reference,
                backward="kkt",
                inaccurate="ignore",
            )
        elif which.startswith("base-"):  # the same FFO through the trusted solver
            layer = FFOLayer(
                problem,
                params,
                variables,
                solver=self.reference,
                central=True if which == "base-central" else None,
                inaccurate="ignore",
            )
        else:
            try:
                layer = FFOLayer(
                    problem,
                    params,
                    variables,
                    solver=self.backend,
                    central=True if which == "central" else None,
                    inaccurate="ignore",
                )
            except ProblemError as exc:
                if "does not support" in str(exc):
                    raise Skip(str(exc)) from exc
                raise
        tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in case.values]
        outs = layer(*tensors)
        values = [o.detach().numpy().copy() for o in outs]
        loss = sum((torch.as_tensor(w) * o).sum() for w, o in zip(case.weights, outs))
        try:
            loss.backward()
        except FFOError as exc:
            # kept, not raised: the forward outputs stay usable by the solution check
            if which == "ref":
                return values, ReferenceUnavailable(
                    f"KKT reference gradient unavailable ({type(exc).__name__}: {exc})"
                )
            return values, exc
        names = [p.name() for p in params]
        grads = {
            n: (t.grad.numpy().copy() if t.grad is not None else np.zeros(t.shape))
            for n, t in zip(names, tensors)
        }
        return values, grads

    def layer_grads(self, which: str) -> dict[str, np.ndarray]:
        _, grads = self.layer_result(which)
        if isinstance(grads, BaseException):
            raise grads
        return grads


# -- the checks ---------------------------------------------------------------------------


def _status_word(sol: Solution) -> str:
    """``optimal`` or ``iteration_limit ('MaxIterations')``: the protocol's status and the
    solver's own word (``SolveInfo.raw_status``) where the adapter reports one."""
    raw = getattr(sol.info, "raw_status", None)
    return f"{sol.status.value} ({raw!r})" if raw not in (None, "") else sol.status.value


def check_status(run: InstanceRun) -> list[Metric]:
    inst = run.inst
    if inst.kind == "limit":
        return check_limit(run)
    sols = run.solutions()
    words = ", ".join(sorted({_status_word(s) for s in sols}))
    if inst.kind == "status":
        bad = sum(s.status not in inst.expect for s in sols)
        want = "/".join(sorted(x.value for x in inst.expect))
        return [Metric("status", float(bad), 0.0, text=f"{words} (want {want})")]
    accepted = (
        {Status.OPTIMAL} if inst.profile == "well" else {Status.OPTIMAL, Status.OPTIMAL_INACCURATE}
    )
    bad = sum(s.status not in accepted for s in sols)
    want = "/".join(sorted(x.value for x in accepted))
    return [Metric("status", float(bad), 0.0, text=f"{words} (want {want})")]


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


def _solution_metrics(run: InstanceRun) -> tuple[list[Metric], str]:
    tol = run.profile
    sols = run.usable_solutions()
    refs = run.ref_solutions()
    metrics: dict[str, Metric] = {}
    hint = ""
    for smp, sol, ref in zip(run.pristine, sols, refs):
        res = residuals(smp, sol)
        for k, v in res.items():
            _worst(metrics, k, v, tol.residual)
        for k, v in distances(sol, ref).items():
            _worst(metrics, k, v, tol.distance)
        if not hint and res["dual_res"] > tol.residual:
            hint = dual_hint(smp, sol, tol.residual)
    return list(metrics.values()), hint


def check_solution(run: InstanceRun):
    tol = run.profile
    if run.inst.kind == "layer":
        ref_out, _ = run.layer_result("ref")
        out, _ = run.layer_result("ffo")
        d = max(rel_diff(o, r) for o, r in zip(out, ref_out))
        return [Metric("dist_primal", d, tol.distance)]
    metrics, hint = run.solution_metrics()
    if hint and not all(m.ok for m in metrics):
        return metrics, hint
    return metrics


# -- limits ----------------------------------------------------------------------------------


def configure(run: InstanceRun, **settings):
    """The run's backend with ``settings`` added: its ``with_settings`` copy, else the
    backend its config string gives with the settings appended; guarded like the original.
    Raises :class:`Skip` when neither is possible or the backend refuses the settings."""
    what = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    backend = run.backend
    copy_ = getattr(backend, "with_settings", None)
    try:
        if copy_ is not None:
            return copy_(**settings)
        if isinstance(run.spec, str):
            cfg = parse_config(run.spec)
            made = get_backend(SolverConfig(cfg.name, cfg.args, {**cfg.settings, **settings}))
            return GuardedBackend(made, backend.violations)
    except (ConfigError, TypeError) as exc:
        raise Skip(f"the backend does not take {what}: {exc}") from exc
    raise Skip(
        f"cannot set {what}: the backend has no with_settings(**settings) and was not "
        "given as a config string"
    )


def iteration_limit_setting(run: InstanceRun) -> str:
    """The name of the backend's iteration limit (see :data:`ITERATION_LIMIT_NAMES`)."""
    inner = run.backend.inner
    hint = getattr(inner, "iteration_limit_setting", None)
    if isinstance(hint, str):
        return hint
    if isinstance(hint, (tuple, list)) and hint:
        return hint[0]
    lister = getattr(inner, "setting_names", None)
    if lister is not None:
        try:
            names = {str(n) for n in lister()}
        except Exception:
            names = set()
        if names:
            lower = {n.lower(): n for n in names}
            for want in ITERATION_LIMIT_NAMES:
                if want in names:
                    return want
                if want.lower() in lower:
                    return lower[want.lower()]
            raise Skip(
                "none of the backend's setting_names() is a known iteration limit "
                f"({', '.join(ITERATION_LIMIT_NAMES)}); name yours with the class attribute "
                "iteration_limit_setting"
            )
    for want in ITERATION_LIMIT_NAMES:  # no list of names: the first one accepted
        try:
            configure(run, **{want: ITERATION_LIMIT})
        except Skip:
            continue
        return want
    raise Skip(
        "the backend accepts none of the known iteration-limit settings "
        f"({', '.join(ITERATION_LIMIT_NAMES)}); name yours with the class attribute "
        "iteration_limit_setting"
    )


def limited_backend(run: InstanceRun):
    """``(backend, what)``: the run's backend under the instance's iteration or time limit."""
    if run.inst.limit == "time":
        return configure(run, time_limit=TIME_LIMIT), f"time_limit={TIME_LIMIT:g} s"
    name = iteration_limit_setting(run)
    settings = {name: ITERATION_LIMIT}
    extra = getattr(run.backend.inner, "iteration_limit_setting", None)
    if isinstance(extra, (tuple, list)):
        settings = {n: ITERATION_LIMIT for n in extra}
    elif name in ("IterationLimit", "BarIterLimit"):  # GUROBI: simplex and barrier
        settings = {"IterationLimit": ITERATION_LIMIT, "BarIterLimit": ITERATION_LIMIT}
    return configure(run, **settings), ", ".join(f"{k}={v}" for k, v in settings.items())


def check_limit(run: InstanceRun):
    """A ``limit`` instance: solved under a tiny iteration or time limit, the backend must
    report the limit (``ITERATION_LIMIT``/``TIME_LIMIT``), or return a point that really is
    the optimum (a solver may finish within the limit).  An "optimal" answer that is not
    the optimum is how a limit mapped to ``OPTIMAL`` shows; any other status would blame
    the user's problem for the solver's stop."""
    backend, what = limited_backend(run)
    tol = run.profile
    words, bad, notes = [], 0, []
    for i, (smp, clean) in enumerate(zip(run.inst.samples, run.pristine)):
        sol = backend.solve(smp.g, smp.h, smp.e)
        words.append(_status_word(sol))
        if sol.status in EXPECT_LIMIT:
            continue
        if sol.status.has_solution:
            try:
                check_shapes(clean, sol)
                ref = run.ref_solutions()[i]
                measures = {**residuals(clean, sol), **distances(sol, ref)}
            except Fail as exc:
                bad += 1
                notes.append(f"sample {i}: {exc}")
                continue
            over = {
                k: v / (tol.distance if k.startswith("dist") else tol.residual)
                for k, v in measures.items()
            }
            if all(x <= 1 for x in over.values()):
                notes.append(f"sample {i}: finished within the limit (point verified)")
                continue
            worst = max(over, key=over.get)
            limit = tol.distance if worst.startswith("dist") else tol.residual
            bad += 1
            notes.append(
                f"sample {i}: reported {_status_word(sol)} after a stop forced by {what}, "
                f"but the point is not the optimum ({worst} {measures[worst]:.1e} > "
                f"{limit:.0e}): a limit stop reported as an optimum"
            )
            continue
        bad += 1
        notes.append(
            f"sample {i}: reported {_status_word(sol)} for a stop forced by {what} on a "
            "problem with an optimum (map the solver's limit status to ITERATION_LIMIT or "
            "TIME_LIMIT)"
        )
    want = "/".join(sorted(x.value for x in EXPECT_LIMIT))
    metric = Metric(
        "status",
        float(bad),
        0.0,
        text=f"{', '.join(sorted(set(words)))} under {what} (want {want}, or the verified optimum)",
    )
    return [metric], "; ".join(notes)


# -- gradients -----------------------------------------------------------------------------


def _gradient_metrics(pairs, rel_tol: float, cos_tol: float) -> list[Metric]:
    metrics: dict[str, Metric] = {}
    for test, ref in pairs:
        for name, (rel, cos) in compare_gradients(test, ref).items():
            _worst(metrics, f"rel[{name}]", rel, rel_tol)
            _worst(metrics, f"cos[{name}]", cos, cos_tol, "min")
    return sorted(metrics.values(), key=lambda m: (m.name.startswith("cos"), m.name))


def _ffo_pairs(run: InstanceRun, backend, sols, central: bool, deltas=None, samples=None):
    """``[(ffo gradient, kkt gradient)]`` per sample, and the steps the FFO used.

    ``central=False`` checks the *default* options (``central=None``: one-sided where the
    ghost is polyhedral, central where it keeps curved cones), ``True`` forces central.
    ``samples``: the problems handed to ``backend`` (default: the backend's copies).
    """
    refs = run.kkt()
    samples = run.inst.samples if samples is None else samples
    pairs, used = [], []
    for i, (smp, sol, ref) in enumerate(zip(samples, sols, refs)):
        options = FFOOptions(
            central=True if central else None, delta=None if deltas is None else deltas[i]
        )
        grad = ffo_backward(backend, smp.g, smp.h, smp.e, sol, smp.c, options)
        pairs.append((_grad_blocks(grad), _grad_blocks(ref)))
        used.append(grad.diagnostics.get("delta") if grad.diagnostics else None)
    return pairs, used


def baseline_note(
    run: InstanceRun,
    central: bool,
    rel_tol: float,
    cos_tol: float,
    measured: list[Metric],
    deltas=None,
) -> tuple[str, bool]:
    """Where a gradient check fails, say whose fault it probably is: rerun the same FFO
    backward, with the same steps ``deltas`` where known, with the trusted reference solver
    as the backend and judge it the same way.
    The failure is ``engine_limited`` only if the baseline fails too *and* every measure
    the backend fails is explained by the baseline's same measure: at most
    ``ENGINE_ATTRIBUTION_FACTOR`` times as bad (in units of the tolerance).
    Returns ``(note, engine_limited)``."""
    try:
        if run.inst.kind == "layer":
            pairs = [
                (run.layer_grads("base-central" if central else "base-ffo"), run.layer_grads("ref"))
            ]
        else:
            if deltas is not None and any(d is None for d in deltas):
                deltas = None
            pairs, _ = _ffo_pairs(
                run, run.reference, run.ref_solutions(), central, deltas, run.pristine
            )
        metrics = _gradient_metrics(pairs, rel_tol, cos_tol)
    except Exception as exc:
        return f"baseline unavailable ({type(exc).__name__}: {exc})", False
    worst = max(metrics, key=lambda m: (not m.ok, m.badness)) if metrics else None
    shown = worst.display() if worst else "-"
    if all(m.ok for m in metrics):
        return (
            "baseline: the same FFO backward (same step) through the trusted reference "
            f"solver passes (worst {shown}), so this backend's solutions are not accurate "
            "enough for the step that its reported SolveInfo.accuracy gave (tighten its "
            "tolerances, or report its accuracy more honestly"
            f"{accuracy_note(run)})"
        ), False
    base = {m.name: m for m in metrics}
    unexplained = [
        m.name
        for m in measured
        if not m.ok
        and (
            m.name not in base
            or base[m.name].ok
            or m.badness > T.ENGINE_ATTRIBUTION_FACTOR * base[m.name].badness
        )
    ]
    if not unexplained:
        return (
            "baseline: the same FFO backward (same step) through the trusted reference "
            f"solver fails too, about as badly (worst {shown}): a limitation of ffo_core's "
            "FFO on this instance rather than of this backend"
        ), True
    return (
        "baseline: the same FFO backward (same step) through the trusted reference "
        f"solver fails too (worst {shown}), but not in {', '.join(unexplained)} where "
        "this backend fails: the backend makes it worse"
    ), False


def accuracy_note(run: InstanceRun) -> str:
    """``; it reported accuracy <= 1e-12, measured residual 3e-07 ...`` for protocol
    instances (what the gradient's step was sized from against what its solutions are)."""
    if run.inst.kind == "layer":
        return ""
    try:
        sols = run.usable_solutions()
        reported = [s.info.accuracy for s in sols if s.info.accuracy is not None]
        metrics, _ = run.solution_metrics()
    except Exception:
        return ""
    res = max((m.value for m in metrics if not m.name.startswith("dist")), default=None)
    dist = max((m.value for m in metrics if m.name.startswith("dist")), default=None)
    said = f"at most {max(reported):.1e}" if reported else "none"
    parts = [f"; its reported SolveInfo.accuracy: {said}"]
    if res is not None:
        parts.append(f"measured residual {res:.1e}")
    if dist is not None:
        parts.append(f"distance to the reference {dist:.1e}")
    return ", ".join(parts)


def _probe_sample() -> Sample:
    """A small pure LP with a unique vertex, for instances the probe cannot use directly."""
    return constructed(np.random.default_rng(20), n=4, p=1, nonneg="AAAII", objective="linear")


def extra_term_problem(run: InstanceRun) -> str:
    """Empty if ``solve(g, h, e, t)`` agrees with ``solve`` of the problem with ``q + t``
    (the ghost problems carry their perturbation in ``extra_linear_term``), else what
    differs."""
    if run.inst.kind == "layer":
        caps = run.backend.capabilities
        if "nonneg" not in caps.cones:
            return ""
        samples = [_probe_sample()]
        tol = T.PROFILES["well"]
    else:
        samples = run.pristine[:2]
        tol = run.profile
    for i, clean in enumerate(samples):
        smp = copy_sample(clean)
        rng = np.random.default_rng(300 + i)
        t = T.WARM_START_PERTURBATION * (1 + _inf(smp.g.q)) * rng.standard_normal(smp.g.n)
        try:
            with_term = run.backend.solve(smp.g, smp.h, smp.e, t)
            shifted = run.backend.solve(Objective(smp.g.P, smp.g.q + t), smp.h, smp.e)
        except Exception:
            return ""
        if with_term.status != shifted.status:
            return (
                f"solve(g, h, e, extra_linear_term=t) ended {_status_word(with_term)} but "
                f"the same problem with q + t ended {_status_word(shifted)}: the backend "
                "mishandles extra_linear_term"
            )
        if not with_term.status.has_solution:
            return ""
        d = distances(with_term, shifted)
        worst = max(d, key=d.get)
        if d[worst] > tol.distance:
            return (
                "the backend mishandles extra_linear_term: solve(g, h, e, t) differs from "
                f"solve of the problem with q + t ({worst} {d[worst]:.1e} > "
                f"{tol.distance:.0e}); the FFO's ghost problems carry their perturbation "
                "there: add it to q (with a + sign), in solve and in resolve"
            )
    return ""


def solution_problem(run: InstanceRun) -> str:
    """Empty if the solution check passes on this instance, else its worst failure."""
    try:
        if run.inst.kind == "layer":
            metrics = check_solution(run)
        else:
            metrics, _ = run.solution_metrics()
    except (Fail, InputsModified) as exc:
        return str(exc)
    except Exception:
        return ""
    bad = [m for m in metrics if not m.ok]
    if not bad:
        return ""
    worst = max(bad, key=lambda m: m.badness)
    return worst.display()


def gradient_advice(run, central, rel_tol, cos_tol, metrics, deltas) -> tuple[str, bool]:
    """The reason printed with a failing gradient check, most specific first: the solution
    check fails on the same instance; the extra linear term is mishandled; else what the
    baseline (:func:`baseline_note`) says."""
    bad_solution = solution_problem(run)
    if bad_solution:
        return (
            f"the solution check fails on this instance too ({bad_solution}): the gradient "
            "is computed from those solutions, fix them first"
        ), False
    bad_term = extra_term_problem(run)
    if bad_term:
        return bad_term, False
    return baseline_note(run, central, rel_tol, cos_tol, metrics, deltas)


def check_gradient(run: InstanceRun, central: bool):
    tol = run.profile
    rel_tol = tol.grad_rel_central if central else tol.grad_rel_ffo
    cos_tol = tol.grad_cos_central if central else tol.grad_cos_ffo
    if run.inst.kind == "layer":
        ref = run.layer_grads("ref")
        test = run.layer_grads("central" if central else "ffo")
        metrics = _gradient_metrics([(test, ref)], rel_tol, cos_tol)
        deltas = None
    else:
        pairs, deltas = _ffo_pairs(run, run.backend, run.usable_solutions(), central)
        metrics = _gradient_metrics(pairs, rel_tol, cos_tol)
    if all(m.ok for m in metrics):
        return metrics
    return metrics, gradient_advice(run, central, rel_tol, cos_tol, metrics, deltas)


def check_warm_start(run: InstanceRun) -> list[Metric]:
    if not run.backend.capabilities.warm_start:
        raise Skip("capabilities.warm_start is False")
    tol = run.profile
    sols = run.usable_solutions()
    metrics: dict[str, Metric] = {}
    iters = []
    for i, (smp, cold) in enumerate(zip(run.inst.samples, sols)):
        rng = np.random.default_rng(i)
        bump = T.WARM_START_PERTURBATION * (1 + _inf(smp.g.q)) * rng.standard_normal(smp.g.n)
        near = run.backend.solve(Objective(smp.g.P, smp.g.q + bump), smp.h, smp.e)
        seeds = [("own", cold)] + ([("nearby", near)] if near.status.has_solution else [])
        for label, seed in seeds:
            warm = run.backend.solve(smp.g, smp.h, smp.e, warm_start=seed)
            if not warm.status.has_solution:
                raise Fail(
                    f"sample {i}: warm start from the {label} solution ended {warm.status.value}"
                )
            check_shapes(smp, warm)
            for k, v in distances(warm, cold).items():
                _worst(metrics, f"{k}_vs_cold", v, tol.distance)
            iters.append((cold.info.iterations, warm.info.iterations))
    out = list(metrics.values())
    if iters:
        out.append(
            Metric(
                "iterations",
                0.0,
                0.0,
                text="cold/warm iterations " + ", ".join(f"{a}/{b}" for a, b in iters[:4]),
            )
        )
    return out


def check_resolve(run: InstanceRun) -> list[Metric]:
    """The optional ``resolve`` (:mod:`ffo_core.protocol`): handed its own answer at one
    extra linear term and the same objects, it must give the fresh solve at another term;
    handed ``None``, or an answer to other (equal but distinct) objects, it must not reuse
    anything stale either.  Each compared with a fresh ``solve`` at the profile's distance."""
    again = getattr(run.backend, "resolve", None)
    if again is None:
        raise Skip(
            "the backend has no resolve (optional: structure reuse for a second "
            "solve of one problem)"
        )
    tol = run.profile
    run.usable_solutions()
    metrics: dict[str, Metric] = {}
    for i, smp in enumerate(run.inst.samples):
        rng = np.random.default_rng(100 + i)
        size = T.WARM_START_PERTURBATION * (1 + _inf(smp.g.q))
        first_term, term = (size * rng.standard_normal(smp.g.n) for _ in range(2))
        first = run.backend.solve(smp.g, smp.h, smp.e, first_term)
        fresh = run.backend.solve(smp.g, smp.h, smp.e, term)
        if not (first.status.has_solution and fresh.status.has_solution):
            raise Fail(
                f"sample {i}: a solve with an extra linear term ended "
                f"{first.status.value}/{fresh.status.value}"
            )
        copies = (
            Objective(smp.g.P, smp.g.q.copy()),
            type(smp.h)(smp.h.G.copy(), smp.h.h.copy(), smp.h.dims),
            type(smp.e)(smp.e.A.copy(), smp.e.b.copy()),
        )
        cases = [
            ("own", first, (smp.g, smp.h, smp.e), fresh),
            ("none", None, (smp.g, smp.h, smp.e), fresh),
            ("copies", first, copies, fresh),
        ]
        if smp.g.P is not None and smp.g.P.nnz:  # other data: a stale set-up shows
            changed = (Objective(2.0 * smp.g.P, smp.g.q), smp.h, smp.e)
            cases.append(("changed_P", first, changed, run.backend.solve(*changed, term)))
        for label, previous, problem, want in cases:
            got = again(previous, *problem, term)
            if not (got.status.has_solution and want.status.has_solution):
                raise Fail(
                    f"sample {i}: resolve ({label}) ended {got.status.value}, the "
                    f"fresh solve {want.status.value}"
                )
            check_shapes(smp, got)
            for k, v in distances(got, want).items():
                _worst(metrics, f"{k}_{label}", v, tol.distance)
    return list(metrics.values())


def _same(a: Solution, b: Solution) -> float:
    if a.status != b.status:
        return math.inf
    if not a.status.has_solution:
        return 0.0
    return max(
        rel_diff(a.primal, b.primal),
        rel_diff(a.eq_dual, b.eq_dual),
        rel_diff(a.ineq_dual, b.ineq_dual),
        rel_diff(a.slack, b.slack),
    )


def check_deterministic(run: InstanceRun) -> list[Metric]:
    sols = run.solutions()
    worst = 0.0
    for smp, first in zip(run.inst.samples, sols):
        for _ in range(T.REPEATS - 1):
            worst = max(worst, _same(run.backend.solve(smp.g, smp.h, smp.e), first))
    return [Metric("max_rel_diff", worst, T.DETERMINISM)]


def check_threads(run: InstanceRun) -> list[Metric]:
    if not getattr(run.backend.capabilities, "thread_safe", False):
        raise Skip("capabilities.thread_safe is False")
    samples = run.inst.samples
    options = FFOOptions()

    def job(i: int):
        smp = samples[i]
        sol = run.backend.solve(smp.g, smp.h, smp.e)
        grad = None
        if sol.status.has_solution:
            grad = ffo_backward(run.backend, smp.g, smp.h, smp.e, sol, smp.c, options)
        return sol, grad

    def spread(results, order):
        sol_diff = grad_diff = 0.0
        for i, (sol, grad) in zip(order, results):
            ref_sol, ref_grad = sequential[i]
            sol_diff = max(sol_diff, _same(sol, ref_sol))
            if grad is not None and ref_grad is not None:
                grad_diff = max(grad_diff, rel_diff(grad.vector(), ref_grad.vector()))
        return sol_diff, grad_diff

    indices = list(range(len(samples)))
    sequential = [job(i) for i in indices]
    # the solver's own sequential repeat spread: races must show up above it
    base_sol, base_grad = spread([job(i) for i in indices], indices)
    count = max(T.THREADS * T.THREAD_REPEATS, len(samples) * T.THREAD_REPEATS)
    order = [k % len(samples) for k in range(count)]
    with ThreadPoolExecutor(max_workers=T.THREADS) as pool:
        concurrent = list(pool.map(job, order))
    sol_diff, grad_diff = spread(concurrent, order)
    return [
        Metric(
            "solution_rel_diff", sol_diff, max(T.DETERMINISM, T.THREAD_SPREAD_FACTOR * base_sol)
        ),
        Metric(
            "gradient_rel_diff", grad_diff, max(T.DETERMINISM, T.THREAD_SPREAD_FACTOR * base_grad)
        ),
    ]


def _batch_rows(value, k: int):
    """Row ``k`` of a BatchSolution field as float64 NumPy (tensors converted)."""
    row = value[k]
    if hasattr(row, "detach"):
        row = row.detach().cpu().double().numpy()
    return np.asarray(row, dtype=float)


def _as_tensors(batch):
    """The batch with every values array as a CPU float64 torch tensor (device backends)."""
    import torch

    fields = {
        name: torch.as_tensor(np.asarray(getattr(batch, name)), dtype=torch.float64)
        for name in ("P_values", "q", "A_values", "b", "G_values", "h")
    }
    return dataclasses.replace(batch, **fields)


def check_solve_batch(run: InstanceRun) -> list[Metric]:
    """The optional ``solve_batch`` (:mod:`ffo_core.protocol`): every sample of its answer
    must be what ``solve`` gives for ``batch.sample(k)`` (with ``extra_linear_term[k]``),
    on the batches of :func:`ffo_conformance.batch.batches` (own samples; shared values
    given once; a per-sample extra linear term; absent rows).  Measured: the distance of
    each sample to the per-sample solve (primal, slack, and the duals of the rows that are
    not absent) and the residuals of the batch's answer; statuses must agree."""
    from .batch import BatchCase, batches

    batched = getattr(run.backend, "solve_batch", None)
    if batched is None:
        raise Skip(
            "the backend has no solve_batch (optional: every sample of a ProblemBatch in one call)"
        )
    tol = run.profile
    metrics: dict[str, Metric] = {}
    cases = batches(run.pristine, seed=7)
    labels = [c.label for c in cases]
    if getattr(run.backend.capabilities, "device", False):
        try:
            first = cases[0]
            cases.append(
                BatchCase(
                    "samples-as-torch",
                    _as_tensors(first.batch),
                    None,
                    first.absent_eq,
                    first.absent_ineq,
                )
            )
            labels.append("samples-as-torch")
        except ImportError:
            pass
    for case in cases:
        B = case.batch
        answer = batched(B, case.extra)
        what = f"batch '{case.label}'"
        if len(answer.status) != B.batch:
            raise Fail(f"{what}: {len(answer.status)} statuses for {B.batch} samples")
        for name, size in (("primal", B.n), ("eq_dual", B.p), ("ineq_dual", B.m), ("slack", B.m)):
            shape = tuple(getattr(answer, name).shape)
            if shape != (B.batch, size):
                raise Fail(
                    f"{what}: BatchSolution.{name} has shape {shape}, expected ({B.batch}, {size})"
                )
        for k in range(B.batch):
            g, h, e = B.sample(k)
            term = None if case.extra is None else np.asarray(case.extra[k], float)
            want = run.backend.solve(g, h, e, term)
            got_status = answer.status[k]
            if got_status != want.status:
                raise Fail(
                    f"{what}, sample {k}: solve_batch says {got_status.value} "
                    f"({answer.info[k].raw_status!r}), solve says {_status_word(want)}"
                )
            if not want.status.has_solution:
                continue
            got = answer.sample(k)
            keep_eq = np.setdiff1d(np.arange(B.p), case.absent_eq[k])
            keep_in = np.setdiff1d(np.arange(B.m), case.absent_ineq[k])
            _worst(metrics, "dist_primal", rel_diff(got.primal, want.primal), tol.distance)
            _worst(metrics, "dist_slack", rel_diff(got.slack, want.slack), tol.distance)
            _worst(
                metrics,
                "dist_dual",
                max(
                    rel_diff(got.eq_dual[keep_eq], want.eq_dual[keep_eq]),
                    rel_diff(got.ineq_dual[keep_in], want.ineq_dual[keep_in]),
                ),
                tol.distance,
            )
            # the batch's own answer, judged on its sample (absent rows' duals zeroed)
            nu, lam = got.eq_dual.copy(), got.ineq_dual.copy()
            nu[case.absent_eq[k]] = 0.0
            lam[case.absent_ineq[k]] = 0.0
            q = g.q if term is None else g.q + term
            smp = Sample(Objective(g.P, q), h, e, np.zeros(g.n))
            res = residuals(smp, Solution(got.status, got.primal, nu, lam, got.slack))
            for key in ("primal_res", "dual_res", "cone_res"):
                _worst(metrics, key, res[key], tol.residual)
    out = list(metrics.values())
    out.append(Metric("batches", 0.0, 0.0, text="batches: " + ", ".join(labels)))
    return out


def capability_skip(inst: Instance, backend) -> str | None:
    """Why the backend's declared capabilities exclude this instance (None: they do not)."""
    caps = backend.capabilities
    if inst.kind == "layer":
        return None  # FFOLayer itself decides (it compiles for the backend)
    missing = caps.missing_cones(inst.dims, inst.has_equalities)
    if missing:
        return (
            f"capabilities.cones lacks {', '.join(sorted(missing))} "
            f"(has {', '.join(sorted(caps.cones))})"
        )
    if inst.quadratic and not caps.quadratic_objective:
        return (
            "the instance has a quadratic objective and capabilities.quadratic_objective "
            "is False (its layers compile P into a SOC: see the layer instances; the "
            "pure linear instances, tag 'linear', are this backend's)"
        )
    n, rows = inst.size
    if caps.max_variables is not None and n > caps.max_variables:
        return f"{n} variables exceed capabilities.max_variables={caps.max_variables}"
    if caps.max_constraints is not None and rows > caps.max_constraints:
        return f"{rows} rows exceed capabilities.max_constraints={caps.max_constraints}"
    return None


_FUNCS = {
    "status": check_status,
    "solution": check_solution,
    "grad-ffo": lambda run: check_gradient(run, central=False),
    "grad-central": lambda run: check_gradient(run, central=True),
    "warm-start": check_warm_start,
    "resolve": check_resolve,
    "solve-batch": check_solve_batch,
    "deterministic": check_deterministic,
    "threads": check_threads,
}


def run_check(run: InstanceRun, check: str) -> CheckResult:
    """Run one check of one instance; never raises (errors become ``outcome="error"``).

    A check returns its metrics, or ``(metrics, reason)``, or ``(metrics, (reason,
    engine_limited))``.  Whatever happened, a write into the inputs seen during the check
    makes it a failure that says so."""
    inst = run.inst
    result = CheckResult(inst.name, inst.group, check, "pass", profile=inst.profile)
    start = time.perf_counter()
    seen = len(run.backend.violations)
    try:
        reason = capability_skip(inst, run.backend)
        if reason:
            raise Skip(reason)
        out = _FUNCS[check](run)
        if isinstance(out, tuple):
            out, note = out
            if isinstance(note, tuple):  # (reason, engine_limited)
                result.reason, result.engine_limited = note
            else:
                result.reason = note
        result.metrics = out
        if not all(m.ok for m in result.metrics):
            result.outcome = "fail"
        elif result.outcome == "pass" and check != "status":
            result.reason = ""  # notes explain failures only
    except Skip as exc:
        result.outcome, result.reason = "skip", str(exc)
    except (Fail, InputsModified) as exc:
        result.outcome, result.reason = "fail", str(exc)
    except ReferenceUnavailable as exc:
        result.outcome, result.reason = "error", f"reference: {exc}"
    except Exception as exc:  # a backend that raises fails the check, with the error
        result.outcome, result.reason = "error", f"{type(exc).__name__}: {exc}"
    new = run.backend.violations[seen:]
    if new:
        result.outcome, result.engine_limited = "fail", False
        result.reason = new[0] + (f" (and {len(new) - 1} more such writes)" if len(new) > 1 else "")
    result.seconds = time.perf_counter() - start
    return result
