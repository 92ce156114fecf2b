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

Gradients are compared per block of the data (``P, q, A, b, G, h``; protocol instances) or
per parameter (layer instances): ``rel[X] = ||g_X - r_X|| / max(||r_X||, floor)`` with
``floor = GRAD_BLOCK_FLOOR * ||r||``, and ``cos[X]`` (only where ``||r_X|| >= floor``).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ffo_core.engine import FFOOptions
from ffo_core.engine.ffo_backward import ffo_backward
from ffo_core.errors import FFOError
from ffo_core.protocol import Objective, Solution, Status

from . import cones
from . import tolerances as T
from .reference import ReferenceSolver, kkt_reference
from .zoo import Instance, Sample

#: Check names, in report order.
CHECKS = (
    "status",
    "solution",
    "grad-ffo",
    "grad-central",
    "warm-start",
    "resolve",
    "deterministic",
    "threads",
)

APPLICABLE = {
    "optimal": CHECKS,
    "status": ("status",),
    "layer": ("solution", "grad-ffo", "grad-central"),
}

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
        value = self.value
        if value is not None and not math.isfinite(value):
            value = str(value)  # JSON has no inf/nan
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
    out = {}
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


class InstanceRun:
    """Lazily computed, cached: reference solutions, the backend's solutions, KKT gradients."""

    def __init__(self, inst: Instance, backend, reference: ReferenceSolver) -> None:
        self.inst = inst
        self.backend = backend
        self.reference = reference
        self.profile = T.PROFILES[inst.profile]
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
            for i, smp in enumerate(self.inst.samples):
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
            for smp, ref in zip(self.inst.samples, refs):
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
        for i, (smp, sol) in enumerate(zip(self.inst.samples, sols)):
            if not sol.status.has_solution:
                raise Fail(
                    f"sample {i}: the backend returned status {sol.status.value} "
                    f"({sol.info.raw_status}) on a problem with an optimum"
                )
            check_shapes(smp, sol)
        return sols

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


def check_status(run: InstanceRun) -> list[Metric]:
    inst = run.inst
    sols = run.solutions()
    words = [s.status.value for s in sols]
    if inst.kind == "status":
        bad = sum(s.status not in inst.expect for s in sols)
        want = "/".join(sorted(x.value for x in inst.expect))
        return [
            Metric("status", float(bad), 0.0, text=f"{','.join(sorted(set(words)))} (want {want})")
        ]
    accepted = (
        {Status.OPTIMAL} if inst.profile == "well" else {Status.OPTIMAL, Status.OPTIMAL_INACCURATE}
    )
    bad = sum(s.status not in accepted for s in sols)
    return [
        Metric(
            "status",
            float(bad),
            0.0,
            text=f"{','.join(sorted(set(words)))} (want "
            f"{'/'.join(sorted(x.value for x in accepted))})",
        )
    ]


def check_solution(run: InstanceRun) -> list[Metric]:
    tol = run.profile
    if run.inst.kind == "layer":
        ref_out, _ = run.layer_result("ref")
        out, _ = run.layer_result("ffo")
        d = max(rel_diff(o, r) for o, r in zip(out, ref_out))
        return [Metric("dist_primal", d, tol.distance)]
    sols = run.usable_solutions()
    refs = run.ref_solutions()
    metrics: dict[str, Metric] = {}
    for smp, sol, ref in zip(run.inst.samples, sols, refs):
        for k, v in residuals(smp, sol).items():
            _worst(metrics, k, v, tol.residual)
        for k, v in distances(sol, ref).items():
            _worst(metrics, k, v, tol.distance)
    return list(metrics.values())


def _gradient_metrics(pairs, rel_tol: float, cos_tol: float) -> list[Metric]:
    metrics: dict[str, Metric] = {}
    for test, ref in pairs:
        for name, (rel, cos) in compare_gradients(test, ref).items():
            _worst(metrics, f"rel[{name}]", rel, rel_tol)
            _worst(metrics, f"cos[{name}]", cos, cos_tol, "min")
    return sorted(metrics.values(), key=lambda m: (m.name.startswith("cos"), m.name))


def _ffo_pairs(run: InstanceRun, backend, sols, central: bool, deltas=None):
    """``[(ffo gradient, kkt gradient)]`` per sample, and the steps the FFO used.

    ``central=False`` checks the *default* options (``central=None``: one-sided where the
    ghost is polyhedral, central where it keeps curved cones), ``True`` forces central.
    """
    refs = run.kkt()
    pairs, used = [], []
    for i, (smp, sol, ref) in enumerate(zip(run.inst.samples, sols, refs)):
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
            pairs, _ = _ffo_pairs(run, run.reference, run.ref_solutions(), central, deltas)
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
            "tolerances, or report its accuracy more honestly)"
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
    return metrics, baseline_note(run, central, rel_tol, cos_tol, metrics, deltas)


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
            "is False (its layers compile P into a SOC: see the layer instances)"
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
    "deterministic": check_deterministic,
    "threads": check_threads,
}


def run_check(run: InstanceRun, check: str) -> CheckResult:
    """Run one check of one instance; never raises (errors become ``outcome="error"``)."""
    inst = run.inst
    result = CheckResult(inst.name, inst.group, check, "pass", profile=inst.profile)
    start = time.perf_counter()
    try:
        reason = capability_skip(inst, run.backend)
        if reason:
            raise Skip(reason)
        out = _FUNCS[check](run)
        if isinstance(out, tuple):  # (metrics, (note, engine_limited))
            out, (result.reason, result.engine_limited) = out
        result.metrics = out
        if not all(m.ok for m in result.metrics):
            result.outcome = "fail"
    except Skip as exc:
        result.outcome, result.reason = "skip", str(exc)
    except Fail as exc:
        result.outcome, result.reason = "fail", str(exc)
    except ReferenceUnavailable as exc:
        result.outcome, result.reason = "error", f"reference: {exc}"
    except Exception as exc:  # a backend that raises fails the check, with the error
        result.outcome, result.reason = "error", f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result
