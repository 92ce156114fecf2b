"""``FFOLayer``: a CVXPY problem as a PyTorch layer, drop-in for ``cvxpylayers``' ``CvxpyLayer``.

Call conventions (as CvxpyLayer): ``layer(*param_tensors)`` returns a tuple with one tensor
per entry of ``variables``.  A parameter tensor has the parameter's shape (unbatched) or one
extra leading batch dimension; unbatched parameters are broadcast over the batch, and their
gradient is the sum of the per-sample gradients.  If no parameter is batched the outputs
have no batch dimension.  Outputs take the dtype (float32 or float64) and device of the
inputs; solves run in float64 on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batch import INACCURATE_POLICIES, check_solutions, default_jobs, run_batch
from .compile import CompiledProblem, Slot, compile_problem
from .errors import ConfigError, InvalidParameterError, ProblemError, SolverError
from .ffo_backward import FFOOptions, ffo_backward
from .kkt_backward import kkt_backward
from .protocol import Backend, Solution
from .registry import available_backends, get_backend

BACKWARDS = ("ffo", "kkt")


def _flatten_f(values: np.ndarray, batch: int, shape: tuple[int, ...]) -> np.ndarray:
    """(batch, *shape) -> (batch, size), each sample flattened column-major (CVXPY's order)."""
    nd = len(shape)
    return np.transpose(values, (0, *range(nd, 0, -1))).reshape(batch, -1)


def _unflatten_f(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_flatten_f`: (batch, size) -> (batch, *shape)."""
    nd = len(shape)
    return flat.reshape((flat.shape[0],) + shape[::-1]).transpose((0, *range(nd, 0, -1)))


@dataclass
class _Batch:
    size: int
    batched: list[bool]
    any_batched: bool
    dtype: torch.dtype          # dtype of the outputs
    device: torch.device
    param_dtypes: list[torch.dtype]


def _inspect_params(slots: list[Slot], tensors) -> _Batch:
    """Validate shapes, finiteness and batch sizes before anything is solved."""
    if len(tensors) != len(slots):
        raise InvalidParameterError(
            f"the layer takes {len(slots)} parameter tensors "
            f"({', '.join(s.name for s in slots)}), got {len(tensors)}")
    sizes, batched = {}, []
    for slot, t in zip(slots, tensors):
        if not isinstance(t, torch.Tensor):
            raise InvalidParameterError(f"parameter {slot.name}: expected a torch.Tensor, "
                                        f"got {type(t).__name__}")
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise InvalidParameterError(f"parameter {slot.name}: dtype {t.dtype} is not "
                                        "a real number type")
        shape = tuple(t.shape)
        if shape == slot.shape:
            batched.append(False)
        elif len(shape) == len(slot.shape) + 1 and shape[1:] == slot.shape:
            batched.append(True)
            sizes[slot.name] = shape[0]
        else:
            raise InvalidParameterError(
                f"parameter {slot.name}: expected shape {slot.shape} or "
                f"(batch, {', '.join(map(str, slot.shape))}), got {shape}")
        finite = torch.isfinite(t.detach())
        if not bool(finite.all()):
            where = ""
            if batched[-1]:
                bad = (~finite).reshape(shape[0], -1).any(dim=1).nonzero().flatten()
                where = f" at batch index {bad[:5].tolist()}"
            raise InvalidParameterError(f"parameter {slot.name} contains NaN or Inf{where}")
    if len(set(sizes.values())) > 1:
        raise InvalidParameterError(f"inconsistent batch sizes: {sizes}")
    batch = next(iter(sizes.values()), 1)
    if batch == 0:
        raise InvalidParameterError("batch size is 0")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = torch.float64 if torch.float64 in floats or not floats else floats[0]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise InvalidParameterError(f"parameters are on different devices: {devices}")
    return _Batch(batch, batched, bool(sizes), dtype,
                  devices.pop() if devices else torch.device("cpu"),
                  [t.dtype for t in tensors])


class FFOLayer(torch.nn.Module):
    """A differentiable layer whose output is the solution of a DPP CVXPY problem.

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: its ``cp.Parameter``s, in the order the layer is called with.
        variables: the ``cp.Variable``s whose optimal values the layer returns.
        solver: a backend or config string, e.g. ``"clarabel"``,
            ``"clarabel:tol_gap_abs=1e-10,tol_gap_rel=1e-10"``.
        backward: ``"ffo"`` (first-order, default) or ``"kkt"`` (exact implicit
            differentiation, factorises the reduced KKT matrix).
        delta, kappa, central, tau_s, tau_lam: see :class:`ffo_core.ffo_backward.FFOOptions`.
        n_jobs: threads for per-sample solves (default: one per core if the backend is
            thread safe).
        inaccurate: what to do with an inaccurate solve: ``"warn"`` (default),
            ``"raise"`` (a :class:`SolverError`) or ``"ignore"``.

    The problem is canonicalised once, here; a call only does sparse mat-muls and solves.
    ``last_diagnostics`` holds, after a backward pass, per-sample details (delta, sizes of
    the active set, weakly active rows).
    """

    def __init__(self, problem, parameters, variables, solver: str | Backend = "clarabel", *,
                 backward: str = "ffo", delta: float | None = None,
                 kappa: float | None = None, central: bool = False,
                 tau_s: float | None = None, tau_lam: float | None = None,
                 n_jobs: int | None = None, inaccurate: str = "warn") -> None:
        super().__init__()
        if backward not in BACKWARDS:
            raise ConfigError(f"backward must be one of {BACKWARDS}, got {backward!r}")
        if inaccurate not in INACCURATE_POLICIES:
            raise ConfigError(f"inaccurate must be one of {INACCURATE_POLICIES}, "
                              f"got {inaccurate!r}")
        self.backend = get_backend(solver)
        caps = self.backend.capabilities
        self.compiled: CompiledProblem = compile_problem(
            problem, parameters, variables, quadratic=caps.quadratic_objective)
        missing = caps.missing_cones(self.compiled.dims, self.compiled.p > 0)
        if missing:
            able = [n for n, info in available_backends().items() if info.capabilities
                    and not info.capabilities.missing_cones(self.compiled.dims,
                                                            self.compiled.p > 0)]
            raise ProblemError(f"backend {self.backend.name!r} does not support the "
                               f"{', '.join(sorted(missing))} cone(s) this problem needs; "
                               f"backends that do: {', '.join(able) or 'none'}")
        self.backward_mode = backward
        self.options = FFOOptions(delta=delta, kappa=kappa, central=central, tau_s=tau_s,
                                  tau_lam=tau_lam)
        self.n_jobs = n_jobs
        self.inaccurate = inaccurate
        self.last_diagnostics: list[dict] = []

    # -- the forward computation, in NumPy ------------------------------------------------
    def _data(self, tensors, info: _Batch) -> np.ndarray:
        """Problem data of every sample, one sparse mat-mul: returns (batch, n_data)."""
        cp_ = self.compiled
        theta = np.zeros((cp_.n_theta + 1, info.size))
        theta[cp_.const_col] = 1.0
        for slot, t, batched in zip(cp_.params, tensors, info.batched):
            values = t.detach().to("cpu", torch.float64).numpy()
            if batched:
                theta[slot.offset:slot.offset + slot.size] = \
                    _flatten_f(values, info.size, slot.shape).T
            else:
                theta[slot.offset:slot.offset + slot.size] = \
                    _flatten_f(values[None], 1, slot.shape).T
        return np.ascontiguousarray((cp_.M @ theta).T)

    def _jobs(self, batch: int) -> int:
        return self.n_jobs if self.n_jobs is not None else default_jobs(self.backend, batch)

    def solve_numpy(self, data: np.ndarray) -> list[Solution]:
        """Solve every row of ``data`` (from :meth:`_data`) and check the statuses."""
        cp_ = self.compiled
        sols = run_batch(lambda i: self.backend.solve(*cp_.sample(data[i])),
                         data.shape[0], self._jobs(data.shape[0]))
        check_solutions(sols, self.backend, self.inaccurate)
        return sols

    def data_gradients(self, data: np.ndarray, sols: list[Solution],
                       c: np.ndarray) -> np.ndarray:
        """Per-sample gradient of ``c[i]'y_i`` w.r.t. the data: returns (n_data, batch)."""
        cp_ = self.compiled

        def one(i: int):
            g, h, e = cp_.sample(data[i])
            try:
                if self.backward_mode == "kkt":
                    return kkt_backward(g, h, e, sols[i], c[i], self.options)
                return ffo_backward(self.backend, g, h, e, sols[i], c[i], self.options)
            except SolverError as exc:
                exc.batch_index = i
                exc.args = (f"backward pass, batch index {i}: {exc.args[0]}",)
                raise
        grads = run_batch(one, data.shape[0], self._jobs(data.shape[0]))
        self.last_diagnostics = [g.diagnostics for g in grads]
        return np.stack([g.vector() for g in grads], axis=1)

    def forward(self, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        info = _inspect_params(self.compiled.params, params)
        return _FFOFunction.apply(self, info, *params)


class _FFOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: FFOLayer, info: _Batch, *params):
        cp_ = layer.compiled
        data = layer._data(params, info)
        sols = layer.solve_numpy(data)
        X = np.stack([s.primal for s in sols])
        outs = []
        for slot in cp_.variables:
            value = _unflatten_f(X[:, slot.offset:slot.offset + slot.size], slot.shape)
            if not info.any_batched:
                value = value[0]
            outs.append(torch.as_tensor(np.ascontiguousarray(value),
                                        dtype=info.dtype, device=info.device))
        ctx.layer, ctx.info, ctx.data, ctx.sols = layer, info, data, sols
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        layer, info = ctx.layer, ctx.info
        cp_ = layer.compiled
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None, None) + (None,) * len(needs)
        c = np.zeros((info.size, cp_.n))
        for slot, g in zip(cp_.variables, grad_outputs):
            if g is None:
                continue
            g = g.detach().to("cpu", torch.float64).numpy()
            if not info.any_batched:
                g = g[None]
            c[:, slot.offset:slot.offset + slot.size] = _flatten_f(g, info.size, slot.shape)
        d_data = layer.data_gradients(ctx.data, ctx.sols, c)
        d_theta = cp_.M.T @ d_data                       # (n_theta + 1, batch)
        grads = []
        for slot, batched, need, dtype in zip(cp_.params, info.batched, needs,
                                              info.param_dtypes):
            if not need:
                grads.append(None)
                continue
            flat = d_theta[slot.offset:slot.offset + slot.size].T
            value = _unflatten_f(np.ascontiguousarray(flat), slot.shape)
            value = value if batched else value.sum(axis=0)
            grads.append(torch.as_tensor(np.ascontiguousarray(value), dtype=dtype,
                                         device=info.device))
        return (None, None) + tuple(grads)
