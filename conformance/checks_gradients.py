"""The gradient checks, ``grad-ffo`` (the default FFO options) and ``grad-central`` (central
differences forced): the FFO backward through the backend against KKT implicit
differentiation of the trusted reference, per data block (protocol instances) or per
parameter (layer instances); and, where one fails, the advice printed with it: the solution
check fails too, ``extra_linear_term`` is mishandled, or what the same FFO through the
trusted solver gives (``engine_limited`` when it fails about as badly)."""

from __future__ import annotations

import numpy as np

from ffo_core.engine.ffo_backward import FFOOptions, ffo_backward
from ffo_core.protocol import Objective

from . import tolerances as T
from .checks_solve import check_solution
from .guard import InputsModified
from .instance import InstanceRun, copy_sample
from .measures import (
    compare_gradients,
    distances,
    grad_blocks,
    inf_norm,
    keep_worst,
    status_word,
)
from .results import Fail, Metric
from .zoo import Sample, constructed


def _gradient_metrics(pairs, rel_tol: float, cos_tol: float) -> list[Metric]:
    metrics: dict[str, Metric] = {}
    for test, ref in pairs:
        for name, (rel, cos) in compare_gradients(test, ref).items():
            keep_worst(metrics, f"rel[{name}]", rel, rel_tol)
            keep_worst(metrics, f"cos[{name}]", cos, cos_tol, "min")
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
        pairs.append((grad_blocks(grad), grad_blocks(ref)))
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
        t = T.WARM_START_PERTURBATION * (1 + inf_norm(smp.g.q)) * rng.standard_normal(smp.g.n)
        try:
            with_term = run.backend.solve(smp.g, smp.h, smp.e, t)
            shifted = run.backend.solve(Objective(smp.g.P, smp.g.q + t), smp.h, smp.e)
        except Exception:
            return ""
        if with_term.status != shifted.status:
            return (
                f"solve(g, h, e, extra_linear_term=t) ended {status_word(with_term)} but "
                f"the same problem with q + t ended {status_word(shifted)}: the backend "
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
