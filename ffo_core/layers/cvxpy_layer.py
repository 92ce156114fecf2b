"""``FFOLayer``: a CVXPY problem as a PyTorch layer, drop-in for cvxpylayers' ``CvxpyLayer``.

Call conventions (as CvxpyLayer): ``layer(*param_tensors)`` returns a tuple with one tensor
per entry of ``variables``.  A parameter tensor has the parameter's shape (unbatched) or one
extra leading batch dimension; unbatched parameters are broadcast over the batch, and their
gradient is the sum of the per-sample gradients.  If no parameter is batched the outputs
have no batch dimension.  Solves run in float64 on the CPU.  Outputs take torch's promotion
of the floating inputs' dtypes (float32 with float64 gives float64; float64 when no input is
floating) and the inputs' device (one device for all, e.g. CUDA: data is copied to the CPU
and results back); each parameter's gradient takes that parameter's dtype.

What happens between the call and the tensors it returns -- solves, the backward modes,
fallbacks, the health check -- is the runtime both layers share
(:mod:`ffo_core.layers.runtime`); this module maps parameters to problem data
(:mod:`ffo_core.datamap`) and solutions back to variables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..datamap.compile import CompiledProblem, compile_problem, flatten_f, unflatten_f
from ..datamap.param_map import BoundData, bind
from ..errors import InvalidParameterError, ProblemError
from ..protocol import Backend, Solution
from ..registry import available_backends
from .parameters import REDUCED_ATTRIBUTES, CallInfo, inspect_params, value_rules
from .runtime import SolverLayer, check_upstream, refuse_transforms
from .tensors import at_batch_indices


@dataclass
class _Call:
    """One call's problem data (the runtime's interface, see :mod:`.runtime`)."""

    bound: BoundData
    info: CallInfo
    sols: list[Solution] | None = None
    backend: Backend | None = None

    @property
    def batch(self) -> int:
        return self.bound.batch

    def sample(self, i: int):
        return self.bound.sample(i)

    def solver_problem(self, i: int):
        """Sample ``i`` without its stored zeros (a shared matrix is pruned once per call,
        :meth:`BoundData.nonzero`); the backward works on the structural pattern."""
        g, h, e = self.bound.sample(i)
        return (g, *self.bound.nonzero(h, e))

    def ghost_source(self, h, e):
        return self.bound.ghost_source(h, e)

    def sample_bytes(self) -> int:
        return self.bound.sample_bytes()


class FFOLayer(SolverLayer):
    """A differentiable layer whose output is the solution of a DPP CVXPY problem.

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: its ``cp.Parameter``s, in the order the layer is called with.
        variables: the ``cp.Variable``s whose optimal values the layer returns.
        solver: a backend or config string, e.g. ``"clarabel"``.
        **options: ``backward``, ``delta``, ``kappa``, ``central``, ``tau_s``, ``tau_lam``,
            ``n_jobs``, ``inaccurate``, ``ghost_fallback``, ``time_limit``, ``check_every``,
            ``check_threshold``, ``check_rel_tol``: see
            :class:`~ffo_core.layers.runtime.SolverLayer` (both layers take them).

    The problem is canonicalised once, here; a call only does sparse mat-muls and solves.
    Bad input is refused before solving (:func:`~.parameters.inspect_params`); every
    failure is an :class:`~ffo_core.errors.FFOError` subclass naming the parameter or the
    batch index (see docs/reliability.md).
    """

    def __init__(
        self, problem, parameters, variables, solver: str | Backend = "clarabel", **options
    ) -> None:
        super().__init__(solver, **options)
        parameters, variables = list(parameters), list(variables)
        for prm in parameters:
            attrs = getattr(prm, "attributes", None) or {}
            declared = [a for a in REDUCED_ATTRIBUTES if attrs.get(a)]
            if declared:
                raise ProblemError(
                    f"parameter {prm.name()} is declared with {declared[0]}=True: CVXPY "
                    "replaces such a parameter by a smaller one during canonicalisation, "
                    "so a layer cannot take its full tensor; declare it as a plain "
                    f"cp.Parameter({tuple(prm.shape)}) and pass values with the property "
                    "(e.g. L @ L.T for PSD, (M + M.T)/2 for symmetric)"
                )
        caps = self.backend.capabilities
        self.compiled: CompiledProblem = compile_problem(
            problem, parameters, variables, quadratic=caps.quadratic_objective
        )
        missing = caps.missing_cones(self.compiled.dims, self.compiled.p > 0)
        if missing:
            able = [
                n
                for n, info in available_backends().items()
                if info.capabilities
                and not info.capabilities.missing_cones(self.compiled.dims, self.compiled.p > 0)
            ]
            raise ProblemError(
                f"backend {self.backend.name!r} does not support the "
                f"{', '.join(sorted(missing))} cone(s) this problem needs; "
                f"backends that do: {', '.join(able) or 'none'}"
            )
        if self.backward_mode == "altdiff":
            from .altdiff_mode import check_polyhedral

            check_polyhedral(self.compiled.dims, "this problem's canonical form")
        self._rules = [value_rules(prm) for prm in parameters]

    def extra_repr(self) -> str:
        names = ", ".join(s.name for s in self.compiled.params)
        outs = ", ".join(s.name for s in self.compiled.variables)
        return f"parameters=({names}), variables=({outs}), {super().extra_repr()}"

    def forward(
        self, *params: torch.Tensor, solver_args: dict | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The variables' optimal values for these parameter values; ``solver_args``
        (optional) sets solver settings for this call only (:mod:`ffo_core.solver_args`)."""
        refuse_transforms(params)
        info = inspect_params(self.compiled.params, params, self._rules)
        call = _Call(self._data(params, info), info)
        return self._apply(call, *params, solver_args=solver_args)

    def _data(self, tensors, info: CallInfo) -> BoundData:
        """The batch's problem data (:mod:`ffo_core.datamap.param_map`): shared parameters
        are mapped once, each sample's data vector is formed when it is solved.  Values
        are copied: the backward uses the values of the forward, whatever happens to the
        tensors in between."""
        values = [t.detach().to("cpu", torch.float64).numpy().copy() for t in tensors]
        bound = bind(self.compiled, values, info.batched, info.size)
        bad = bound.overflowing_samples()
        if bad:
            raise InvalidParameterError(
                f"the parameters overflow the problem data (Inf){at_batch_indices(bad)}: "
                "their magnitudes are too large for float64 arithmetic"
            )
        return bound

    # -- the runtime's layer-specific part --------------------------------------------------
    def _outputs(self, call: _Call, sols: list[Solution]) -> tuple[torch.Tensor, ...]:
        X = np.stack([s.primal for s in sols])
        outs = []
        for slot in self.compiled.variables:
            value = unflatten_f(X[:, slot.offset : slot.offset + slot.size], slot.shape)
            if not call.info.any_batched:
                value = value[0]
            outs.append(
                torch.as_tensor(
                    np.ascontiguousarray(value), dtype=call.info.dtype, device=call.info.device
                )
            )
        return tuple(outs)

    def _output_names(self, call: _Call) -> list[str]:
        return [slot.name for slot in self.compiled.variables]

    def _upstream(self, call: _Call, grad_outputs):
        info = call.info
        c = np.zeros((info.size, self.compiled.n))
        for slot, g in zip(self.compiled.variables, grad_outputs):
            if g is None:
                continue
            values = check_upstream(slot.name, g, info.any_batched)
            if not info.any_batched:
                values = values[None]
            c[:, slot.offset : slot.offset + slot.size] = flatten_f(values, info.size, slot.shape)
        return c, None

    def _input_names(self, call: _Call) -> list[str]:
        return [f"parameter {slot.name}" for slot in self.compiled.params]

    def _input_gradients(self, call: _Call, grads, needs) -> tuple:
        per_param = call.bound.parameter_gradients(grads)  # M' d_data, shared ones summed
        info = call.info
        out = []
        for need, dtype, value in zip(needs, info.param_dtypes, per_param):
            # strides as they come (row-major for a dense matrix parameter): autograd
            # copies only what its parameter's layout needs
            out.append(torch.as_tensor(value, dtype=dtype, device=info.device) if need else None)
        return tuple(out)

    def _parameter_vector(self, call: _Call, data_gradient: np.ndarray) -> np.ndarray:
        keep = np.ones(self.compiled.n_theta + 1, dtype=bool)
        keep[self.compiled.const_col] = False
        return (self.compiled.M.T @ data_gradient)[keep]


__all__ = ["FFOLayer"]
