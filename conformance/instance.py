"""The state the checks of one instance share (:class:`InstanceRun`): the trusted reference
solutions, the backend's solutions, KKT reference gradients, the solution check's measures
and the layer runs, each computed on first use and cached (a failure too: it is re-raised
for every check that needs it).

Every call to the backend goes through :class:`ffo_conformance.guard.GuardedBackend`: a
backend that writes into its inputs fails the check that made the call, and the suite's own
reference works on copies of the samples made before any backend saw them.
"""

from __future__ import annotations

import copy

import numpy as np

from ffo_core.errors import FFOError
from ffo_core.protocol import Solution

from . import tolerances as T
from .guard import GuardedBackend
from .measures import check_shapes, distances, dual_hint, keep_worst, residuals
from .reference import ReferenceSolver, kkt_reference
from .results import Fail, Metric, ReferenceUnavailable, Skip
from .zoo import Instance, Sample


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


def _solution_metrics(run: InstanceRun) -> tuple[list[Metric], str]:
    tol = run.profile
    sols = run.usable_solutions()
    refs = run.ref_solutions()
    metrics: dict[str, Metric] = {}
    hint = ""
    for smp, sol, ref in zip(run.pristine, sols, refs):
        res = residuals(smp, sol)
        for k, v in res.items():
            keep_worst(metrics, k, v, tol.residual)
        for k, v in distances(sol, ref).items():
            keep_worst(metrics, k, v, tol.distance)
        if not hint and res["dual_res"] > tol.residual:
            hint = dual_hint(smp, sol, tol.residual)
    return list(metrics.values()), hint
