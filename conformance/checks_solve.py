"""The checks of the backend's solves, one function per check: ``status``, ``solution``,
``warm-start``, ``resolve``, ``deterministic`` and ``threads``.  Each takes an
:class:`~ffo_conformance.instance.InstanceRun` and returns its metrics, or ``(metrics,
reason)``; a ``limit`` instance's status check is :mod:`ffo_conformance.checks_limits`'s."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ffo_core.engine.ffo_backward import FFOOptions, ffo_backward
from ffo_core.protocol import Objective, Solution, Status

from . import tolerances as T
from .checks_limits import check_limit
from .instance import InstanceRun
from .measures import check_shapes, distances, inf_norm, keep_worst, rel_diff, status_word
from .results import Fail, Metric, Skip


def check_status(run: InstanceRun) -> list[Metric]:
    inst = run.inst
    if inst.kind == "limit":
        return check_limit(run)
    sols = run.solutions()
    words = ", ".join(sorted({status_word(s) for s in sols}))
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


def check_warm_start(run: InstanceRun) -> list[Metric]:
    if not run.backend.capabilities.warm_start:
        raise Skip("capabilities.warm_start is False")
    tol = run.profile
    sols = run.usable_solutions()
    metrics: dict[str, Metric] = {}
    iters = []
    for i, (smp, cold) in enumerate(zip(run.inst.samples, sols)):
        rng = np.random.default_rng(i)
        bump = T.WARM_START_PERTURBATION * (1 + inf_norm(smp.g.q)) * rng.standard_normal(smp.g.n)
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
                keep_worst(metrics, f"{k}_vs_cold", v, tol.distance)
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
        size = T.WARM_START_PERTURBATION * (1 + inf_norm(smp.g.q))
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
                keep_worst(metrics, f"{k}_{label}", v, tol.distance)
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
