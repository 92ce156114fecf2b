"""The ``solve-batch`` check: every sample of the optional ``solve_batch``'s answer against
``solve`` of that sample, on the batches of :mod:`ffo_conformance.batch`."""

from __future__ import annotations

import dataclasses

import numpy as np

from ffo_core.protocol import Objective, Solution

from .batch import BatchCase, batches
from .instance import InstanceRun
from .measures import keep_worst, rel_diff, residuals, status_word
from .results import Fail, Metric, Skip
from .zoo import Sample


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
                    f"({answer.info[k].raw_status!r}), solve says {status_word(want)}"
                )
            if not want.status.has_solution:
                continue
            got = answer.sample(k)
            keep_eq = np.setdiff1d(np.arange(B.p), case.absent_eq[k])
            keep_in = np.setdiff1d(np.arange(B.m), case.absent_ineq[k])
            keep_worst(metrics, "dist_primal", rel_diff(got.primal, want.primal), tol.distance)
            keep_worst(metrics, "dist_slack", rel_diff(got.slack, want.slack), tol.distance)
            keep_worst(
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
                keep_worst(metrics, key, res[key], tol.residual)
    out = list(metrics.values())
    out.append(Metric("batches", 0.0, 0.0, text="batches: " + ", ".join(labels)))
    return out
