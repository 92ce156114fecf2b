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

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..datamap.compile import CompiledProblem, compile_problem, flatten_f, unflatten_f
from ..datamap.param_map import BoundData, bind
from ..errors import InvalidParameterError, ProblemError
from ..protocol import Backend, Solution
from ..registry import available_backends
from .function import check_upstream, refuse_transforms
from .parameters import CallInfo, inspect_params, value_rules
from .runtime import SolverLayer
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
        problem: a DPP ``cvxpy.Problem`` (a DGP one with ``gp=True``).
        parameters: its ``cp.Parameter``s, in the order the layer is called with.
        variables: what the layer returns, in this order: variables of the problem and
            dual variables of its constraints (``constraint.dual_variables[k]``, in the
            shape and sign of CVXPY's ``constraint.dual_value``; equality, inequality,
            SOC, exponential-cone and PSD constraints).
        solver: a backend or config string, e.g. ``"clarabel"``.
        gp: the problem is log-log convex (DGP): CVXPY's ``Dgp2Dcp`` reduces it to a
            convex one in the logarithms of its variables; parameters and outputs stay in
            the original space (a parameter that enters as its logarithm must be
            positive); gradients follow by the chain rule.
        canon_backend: CVXPY's canonicalisation backend (``"SCIPY"``, ``"CPP"``...; None:
            CVXPY's choice), used once, here.
        **options: ``backward``, ``delta``, ``kappa``, ``central``, ``tau_s``, ``tau_lam``,
            ``n_jobs``, ``inaccurate``, ``ghost_fallback``, ``time_limit``, ``check_every``,
            ``check_threshold``, ``check_rel_tol``, ``solver_args``, ``executor``: see
            :class:`~ffo_core.layers.runtime.SolverLayer` (both layers take them).

    Every attribute CVXPY accepts on a variable or parameter works (``nonneg``,
    ``bounds``, ``symmetric``, ``PSD``, ``NSD``, ``diag``, ``sparsity``, scalars, n-d
    shapes): a ``symmetric``/``PSD``/``NSD`` parameter reads the upper triangle of its
    tensor (as cvxpylayers does) and its gradient lives there; a symmetric variable comes
    back as the full matrix (:mod:`ffo_core.datamap.recovery`).  Integer, boolean and
    complex leaves are refused by name.

    The problem is canonicalised once, here; a call only does sparse mat-muls and solves.
    Bad input is refused before solving (:func:`~.parameters.inspect_params`); every
    failure is an :class:`~ffo_core.errors.FFOError` subclass naming the parameter or the
    batch index (see docs/reliability.md).
    """

    def __init__(
        self,
        problem,
        parameters,
        variables,
        solver: str | Backend = "clarabel",
        *,
        gp: bool = False,
        canon_backend: str | None = None,
        **options,
    ) -> None:
        super().__init__(solver, **options)
        parameters, variables = list(parameters), list(variables)
        caps = self.backend.capabilities
        self.compiled: CompiledProblem = compile_problem(
            problem,
            parameters,
            variables,
            quadratic=caps.quadratic_objective,
            gp=bool(gp),
            canon_backend=canon_backend,
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
        feeds = self.compiled.feeds
        self._plain_feeds = [f.user for f in feeds] == list(range(len(parameters))) and not any(
            f.log for f in feeds
        )
        self._duals = any(o.source == "dual" for o in self.compiled.outputs)

    def extra_repr(self) -> str:
        names = ", ".join(s.name for s in self.compiled.user_params)
        outs = ", ".join(o.name for o in self.compiled.outputs)
        gp = ", gp=True" if self.compiled.gp else ""
        return f"parameters=({names}), variables=({outs}){gp}, {super().extra_repr()}"

    def forward(
        self, *params: torch.Tensor, solver_args: dict | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The outputs' optimal values for these parameter values; ``solver_args``
        (optional) sets solver settings for this call only (:mod:`ffo_core.solver_args`)."""
        refuse_transforms(params)
        compiled = self.compiled
        info = inspect_params(compiled.user_params, params, self._rules)
        if self._plain_feeds:
            inputs = params
        else:  # a geometric program: parameters that enter as logarithms
            inputs = tuple(
                torch.log(params[f.user]) if f.log else params[f.user] for f in compiled.feeds
            )
            info = replace(
                info,
                batched=[info.batched[f.user] for f in compiled.feeds],
                param_dtypes=[t.dtype for t in inputs],
            )
        call = _Call(self._data(inputs, info), info)
        outs = self._apply(call, *inputs, solver_args=solver_args)
        if compiled.gp:
            outs = tuple(torch.exp(o) if om.exp else o for o, om in zip(outs, compiled.outputs))
        return outs

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
        compiled, info = self.compiled, call.info
        Y = np.stack([s.primal for s in sols])
        Z = None
        if self._duals:
            Z = np.stack(
                [
                    np.concatenate([_dual(s.eq_dual, compiled.p), _dual(s.ineq_dual, compiled.m)])
                    for s in sols
                ]
            )
        outs = []
        for om in compiled.outputs:
            source = Y if om.source == "primal" else Z
            if om.offset is not None:
                flat = source[:, om.offset : om.offset + om.size]
            else:
                flat = (om.matrix @ source.T).T
            value = unflatten_f(np.asarray(flat), om.shape)
            if not info.any_batched:
                value = value[0]
            outs.append(
                torch.as_tensor(np.array(value, order="C"), dtype=info.dtype, device=info.device)
            )
        return tuple(outs)

    def _output_names(self, call: _Call) -> list[str]:
        return [o.name for o in self.compiled.outputs]

    def _upstream(self, call: _Call, grad_outputs):
        compiled, info = self.compiled, call.info
        c = np.zeros((info.size, compiled.n))
        c_dual = None
        for om, g in zip(compiled.outputs, grad_outputs):
            if g is None:
                continue
            values = check_upstream(om.name, g, info.any_batched)
            if not info.any_batched:
                values = values[None]
            flat = flatten_f(values, info.size, om.shape)
            if om.source == "dual":
                if c_dual is None:
                    c_dual = np.zeros((info.size, compiled.p + compiled.m))
                c_dual += (om.matrix.T @ flat.T).T
            elif om.offset is not None:
                c[:, om.offset : om.offset + om.size] += flat
            else:
                c += (om.matrix.T @ flat.T).T
        if c_dual is None:
            return c, None
        return c, (c_dual[:, : compiled.p], c_dual[:, compiled.p :])

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


def _dual(value, size: int) -> np.ndarray:
    """A solution's dual block (``size`` zeros when the backend gave none for 0 rows)."""
    if value is None:
        if size:
            raise ProblemError("internal: the backend returned no duals")
        return np.zeros(0)
    return np.asarray(value, dtype=float)


__all__ = ["FFOLayer"]
