"""``FFOLayer``: a CVXPY problem as a PyTorch layer, drop-in for ``cvxpylayers``' ``CvxpyLayer``.

Call conventions (as CvxpyLayer): ``layer(*param_tensors)`` returns a tuple with one tensor
per entry of ``variables``.  A parameter tensor has the parameter's shape (unbatched) or one
extra leading batch dimension; unbatched parameters are broadcast over the batch, and their
gradient is the sum of the per-sample gradients.  If no parameter is batched the outputs
have no batch dimension.  Solves run in float64 on the CPU.  Outputs take torch's promotion
of the floating inputs' dtypes (float32 with float64 gives float64; float64 when no input is
floating) and the inputs' device (one device for all, e.g. CUDA: data is copied to the CPU
and results back); each parameter's gradient takes that parameter's dtype.

Reliability (docs/reliability.md): bad input is refused before anything is solved with an
:class:`~ffo_core.errors.InvalidParameterError` naming the parameter; every failure of a
solve is a :class:`~ffo_core.errors.SolverError` naming the backend and the batch index;
options ``inaccurate``, ``ghost_fallback``, ``time_limit`` and ``check_every`` set the
policies.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..arrays import all_finite
from ..config import check_choice
from ..datamap.compile import CompiledProblem, Slot, compile_problem, flatten_f, unflatten_f
from ..datamap.param_map import BoundData, bind
from ..engine.ffo_backward import (
    DataGradient,
    FFOOptions,
    FFOSample,
    backward_chunks,
    ffo_backward,
    ffo_backward_batch,
)
from ..engine.kkt_backward import kkt_backward
from ..engine.solves import (
    INACCURATE_POLICIES,
    BatchRunner,
    GuardedBackend,
    backend_name,
    check_solutions,
    with_batch_index,
)
from ..errors import (
    ConfigError,
    GhostProblemError,
    GradientHealthWarning,
    InvalidGradientError,
    InvalidParameterError,
    ProblemError,
    SolverError,
)
from ..protocol import Backend, Solution, Status
from ..registry import available_backends, get_backend
from .tensors import at_batch_indices, bad_batch_indices, check_finite

BACKWARDS = ("ffo", "kkt")
#: ``ghost_fallback`` policies (see :class:`FFOLayer`).
GHOST_FALLBACKS = ("raise", "smaller-delta", "kkt", "smaller-delta+kkt")
#: Entries kept in ``FFOLayer.health_log`` (the oldest are dropped).
HEALTH_LOG_SIZE = 1000

logger = logging.getLogger("ffo_core")


@dataclass
class _Batch:
    size: int
    batched: list[bool]
    any_batched: bool
    dtype: torch.dtype  # dtype of the outputs
    device: torch.device
    param_dtypes: list[torch.dtype]


@dataclass(frozen=True)
class _ValueRule:
    """A declared CVXPY attribute that constrains a parameter's values (``nonneg=True``...).

    Plain data (the layer stays picklable); :meth:`bad` marks the entries of a tensor
    (batched or not) that violate it.
    """

    kind: str  # nonneg, pos, nonpos, neg, boolean, ...
    text: str  # e.g. "nonneg=True (values >= 0)"
    mask: np.ndarray | None = None  # boolean/integer: the constrained entries
    lo: np.ndarray | None = None  # bounds
    hi: np.ndarray | None = None

    def bad(self, t: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind == "nonneg":
            return t < 0
        if kind == "pos":
            return t <= 0
        if kind == "nonpos":
            return t > 0
        if kind == "neg":
            return t >= 0
        if kind in ("boolean", "integer"):
            wrong = (t != 0) & (t != 1) if kind == "boolean" else t != torch.round(t)
            return wrong & torch.as_tensor(self.mask, device=t.device)
        out = torch.zeros(t.shape, dtype=torch.bool, device=t.device)  # bounds
        if self.lo is not None:
            out |= t < torch.as_tensor(self.lo, device=t.device)
        if self.hi is not None:
            out |= t > torch.as_tensor(self.hi, device=t.device)
        return out


#: Attributes whose parameters CVXPY replaces by a smaller one during canonicalisation (the
#: layer cannot map the user's tensor onto it), or that are complex.
_REDUCED_ATTRIBUTES = (
    "PSD",
    "NSD",
    "symmetric",
    "diag",
    "hermitian",
    "complex",
    "imag",
    "sparsity",
)
_SIGNS = {"nonneg": ">= 0", "pos": "> 0", "nonpos": "<= 0", "neg": "< 0"}


def _index_mask(shape: tuple[int, ...], idx) -> np.ndarray:
    """Boolean mask of the entries CVXPY's ``boolean_idx``/``integer_idx`` name."""
    if shape == ():
        return np.array(True)
    mask = np.zeros(shape, dtype=bool)
    if isinstance(idx, list):
        for ix in idx:
            mask[tuple(ix) if isinstance(ix, (tuple, list)) else ix] = True
    else:
        mask[idx] = True
    return mask


def _value_rules(param) -> list[_ValueRule]:
    """The value constraints a ``cp.Parameter``'s declared attributes impose."""
    attrs = getattr(param, "attributes", {}) or {}
    rules = [
        _ValueRule(attr, f"{attr}=True (values {text})")
        for attr, text in _SIGNS.items()
        if attrs.get(attr)
    ]
    shape = tuple(param.shape)
    for attr, text in (("boolean", "values 0 or 1"), ("integer", "integer values")):
        if attrs.get(attr):
            mask = _index_mask(shape, getattr(param, f"{attr}_idx", None))
            rules.append(_ValueRule(attr, f"{attr} ({text})", mask=mask))
    bounds = attrs.get("bounds")
    if bounds is not None:
        lo, hi = (None if b is None else np.asarray(b, dtype=float) for b in bounds)
        rules.append(
            _ValueRule("bounds", "bounds (values within the declared bounds)", lo=lo, hi=hi)
        )
    return rules


def _inspect_params(
    slots: list[Slot], tensors, rules: list[list[_ValueRule]] | None = None
) -> _Batch:
    """Validate types, devices, shapes, finiteness, declared attributes and batch sizes
    before anything is solved; every error names the parameter.

    dtype policy: floating (float16/bfloat16/float32/float64) and int32/int64 tensors are
    accepted and solved in float64; the outputs take torch's promotion of the floating
    inputs' dtypes (float32 with float64 -> float64; float64 when none is floating); each
    parameter's gradient takes that parameter's own dtype.  Complex, bool and other integer
    dtypes are refused.  Device policy: all parameters on one device; data is copied to the
    CPU for the solver and outputs/gradients are returned on that device; the ``meta``
    device (no data) is refused.
    """
    if len(tensors) != len(slots):
        raise InvalidParameterError(
            f"the layer takes {len(slots)} parameter tensors "
            f"({', '.join(s.name for s in slots)}), got {len(tensors)}"
        )
    for slot, t in zip(slots, tensors):
        if not isinstance(t, torch.Tensor):
            raise InvalidParameterError(
                f"parameter {slot.name}: expected a torch.Tensor, got {type(t).__name__}"
            )
        if t.layout != torch.strided:
            raise InvalidParameterError(
                f"parameter {slot.name}: {t.layout} tensors are not "
                "supported by FFOLayer; pass a dense tensor "
                "(.to_dense()) or use FFOQPLayer for sparse data"
            )
        if t.is_complex():
            raise InvalidParameterError(
                f"parameter {slot.name}: dtype {t.dtype} is complex; the layer is real "
                "(pass the real and imaginary parts as two real parameters)"
            )
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise InvalidParameterError(
                f"parameter {slot.name}: dtype {t.dtype} is not a real number type"
            )
        if t.device.type == "meta":
            raise InvalidParameterError(
                f"parameter {slot.name} is on the meta device and has no values to solve with"
            )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        where = ", ".join(f"{s.name}: {t.device}" for s, t in zip(slots, tensors))
        raise InvalidParameterError(
            f"parameters are on different devices ({where}); move them to one device"
        )
    sizes, batched = {}, []
    for k, (slot, t) in enumerate(zip(slots, tensors)):
        shape = tuple(t.shape)
        if shape == slot.shape:
            batched.append(False)
        elif len(shape) == len(slot.shape) + 1 and shape[1:] == slot.shape:
            batched.append(True)
            sizes[slot.name] = shape[0]
        else:
            raise InvalidParameterError(
                f"parameter {slot.name}: expected shape {slot.shape} or "
                f"(batch, {', '.join(map(str, slot.shape))}), got {shape}"
            )
        values = t.detach()
        check_finite(slot.name, values, batched[-1])  # one pass, no mask when finite
        for rule in rules[k] if rules else ():
            bad = rule.bad(values)
            if bool(bad.any()):
                first = values[bad].flatten()[0].item()
                raise InvalidParameterError(
                    f"parameter {slot.name} violates its declared attribute {rule.text}"
                    f"{bad_batch_indices(bad, batched[-1])} (e.g. {first:g})"
                )
    if len(set(sizes.values())) > 1:
        raise InvalidParameterError(f"inconsistent batch sizes: {sizes}")
    batch = next(iter(sizes.values()), 1)
    if batch == 0:
        raise InvalidParameterError("batch size is 0")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = functools.reduce(torch.promote_types, floats) if floats else torch.float64
    return _Batch(
        batch,
        batched,
        bool(sizes),
        dtype,
        devices.pop() if devices else torch.device("cpu"),
        [t.dtype for t in tensors],
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b / (na * nb))


def _with_time_limit(backend: Backend, seconds: float) -> Backend:
    """A copy of ``backend`` with a per-solve time limit; ``backend`` is not modified."""
    name = backend_name(backend)
    copy = getattr(backend, "with_settings", None)
    if not callable(copy):
        raise ConfigError(
            f"time_limit={seconds:g}: backend {name!r} cannot take a time limit: it has no "
            "with_settings(**settings) method returning a copy with new settings "
            "(see docs/reliability.md); set the limit in its own settings instead"
        )
    try:
        limited = copy(time_limit=seconds)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(
            f"time_limit={seconds:g}: backend {name!r} has no time limit: {exc}"
        ) from exc
    if limited is backend:
        raise ConfigError(
            f"time_limit: backend {name!r}'s with_settings() returned the "
            "backend itself; it must return a copy"
        )
    return limited


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
        delta, kappa, central, tau_s, tau_lam: see :class:`ffo_core.engine.ffo_backward.FFOOptions`
            (``central=None``, the default, is central exactly when the ghost keeps a
            curved cone block).
        n_jobs: threads for per-sample solves (default: one per core if the backend is
            thread safe).
        inaccurate: what to do with an inaccurate solve (forward or ghost): ``"warn"``
            (default, an :class:`~ffo_core.engine.solves.InaccurateSolutionWarning`), ``"raise"``
            (a :class:`SolverError`; :class:`GhostProblemError` for a ghost) or ``"ignore"``.
            ``last_status`` holds every sample's status of the last forward pass.
        ghost_fallback: what to do when a sample's ghost problem fails
            (:class:`GhostProblemError`: a bad status, an exception in the backend, a
            malformed or non-finite answer): ``"raise"`` (default), ``"smaller-delta"``
            (retry with delta/10, then delta/100), ``"kkt"`` (that sample's exact KKT
            gradient) or ``"smaller-delta+kkt"`` (both, in that order).  Which one was used
            is ``last_diagnostics[i]["ghost_fallback"]``.
        time_limit: seconds per solve (forward and ghost), passed to the backend through
            its ``with_settings(time_limit=...)`` copy (the backend given is not modified);
            a backend without a time limit is a :class:`ConfigError` here.  A solve that
            runs out of time is a :class:`SolverError` with status ``time_limit``.
        check_every: gradient health check: every ``check_every``-th backward call (0 or
            None: never) compares the first-order gradient of one sample (the first with a
            nonzero upstream gradient) with the exact KKT gradient, logs the cosine
            similarity (logger ``"ffo_core"``), appends it to ``health_log`` and warns
            (:class:`~ffo_core.errors.GradientHealthWarning`) below ``check_threshold``.
        check_threshold: cosine similarity below which the health check warns (0.99).
        check_rel_tol: relative error ``||g_ffo - g_kkt|| / ||g_kkt||`` above which the
            health check also warns (default 0.1; None: cosine only).  A gradient can point
            the right way with the wrong length (found: cosine 0.994 at 74% error).

    The problem is canonicalised once, here; a call only does sparse mat-muls and solves.
    Bad input is refused before solving (:func:`_inspect_params`); every failure is an
    :class:`~ffo_core.errors.FFOError` subclass naming the parameter or the batch index
    (see docs/reliability.md).  ``last_diagnostics`` holds, after a backward pass,
    per-sample details (delta, sizes of the active set, weakly active rows, fallback).
    One layer may be called from several threads at once; ``last_*`` then describe the
    most recent call of any thread.
    """

    def __init__(
        self,
        problem,
        parameters,
        variables,
        solver: str | Backend = "clarabel",
        *,
        backward: str = "ffo",
        delta: float | None = None,
        kappa: float | None = None,
        central: bool | None = None,
        tau_s: float | None = None,
        tau_lam: float | None = None,
        n_jobs: int | None = None,
        inaccurate: str = "warn",
        ghost_fallback: str = "raise",
        time_limit: float | None = None,
        check_every: int | None = None,
        check_threshold: float = 0.99,
        check_rel_tol: float | None = 0.1,
    ) -> None:
        super().__init__()
        check_choice("backward", backward, BACKWARDS)
        check_choice("inaccurate", inaccurate, INACCURATE_POLICIES)
        check_choice("ghost_fallback", ghost_fallback, GHOST_FALLBACKS)
        check_every = 0 if check_every is None else check_every
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 0:
            raise ConfigError(f"check_every must be a nonnegative int or None, got {check_every!r}")
        if not _is_number(check_threshold) or not -1.0 <= check_threshold <= 1.0:
            raise ConfigError(
                f"check_threshold must be a number in [-1, 1], got {check_threshold!r}"
            )
        if check_rel_tol is not None and (not _is_number(check_rel_tol) or check_rel_tol <= 0):
            raise ConfigError(
                f"check_rel_tol must be a positive number or None, got {check_rel_tol!r}"
            )
        if time_limit is not None and (not _is_number(time_limit) or not 0 < time_limit < math.inf):
            raise ConfigError(
                f"time_limit must be a positive number of seconds or None, got {time_limit!r}"
            )
        parameters, variables = list(parameters), list(variables)
        for prm in parameters:
            attrs = getattr(prm, "attributes", None) or {}
            declared = [a for a in _REDUCED_ATTRIBUTES if attrs.get(a)]
            if declared:
                raise ProblemError(
                    f"parameter {prm.name()} is declared with {declared[0]}=True: CVXPY "
                    "replaces such a parameter by a smaller one during canonicalisation, "
                    "so a layer cannot take its full tensor; declare it as a plain "
                    f"cp.Parameter({tuple(prm.shape)}) and pass values with the property "
                    "(e.g. L @ L.T for PSD, (M + M.T)/2 for symmetric)"
                )
        backend = get_backend(solver)
        if time_limit is not None:
            backend = _with_time_limit(backend, float(time_limit))
        self.backend = backend
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
        self._rules = [_value_rules(prm) for prm in parameters]
        self.backward_mode = backward
        self.options = FFOOptions(
            delta=delta, kappa=kappa, central=central, tau_s=tau_s, tau_lam=tau_lam
        )
        self._runner = BatchRunner(self.backend, n_jobs)
        self.inaccurate = inaccurate
        self.ghost_fallback = ghost_fallback
        self.time_limit = None if time_limit is None else float(time_limit)
        self.check_every = check_every
        self.check_threshold = float(check_threshold)
        self.check_rel_tol = None if check_rel_tol is None else float(check_rel_tol)
        self.health_log: deque[dict] = deque(maxlen=HEALTH_LOG_SIZE)
        self.last_diagnostics: list[dict] = []
        self.last_status: list[Status] = []
        self._lock = threading.Lock()
        self._backward_calls = 0

    # -- the forward computation, in NumPy ------------------------------------------------
    def _data(self, tensors, info: _Batch) -> BoundData:
        """The batch's problem data (:mod:`ffo_core.datamap.param_map`): shared parameters are
        mapped once, each sample's data vector is formed when it is solved."""
        cp_ = self.compiled
        values = [t.detach().to("cpu", torch.float64).numpy() for t in tensors]
        bound = bind(cp_, values, info.batched, info.size)
        bad = bound.overflowing_samples()
        if bad:
            raise InvalidParameterError(
                f"the parameters overflow the problem data (Inf){at_batch_indices(bad)}: "
                "their magnitudes are too large for float64 arithmetic"
            )
        return bound

    def solve_numpy(self, bound: BoundData) -> list[Solution]:
        """Solve every sample of ``bound`` (from :meth:`_data`) and check the statuses.

        The solver gets each sample's matrices without their stored zeros (a shared
        matrix is pruned once per call, :meth:`BoundData.nonzero`); the backward pass
        works on the structural pattern."""

        def one(i: int) -> Solution:
            g, h, e = bound.sample(i)
            return GuardedBackend(self.backend, i).solve(g, *bound.nonzero(h, e))

        sols = self._runner.run("forward", one, bound.batch)
        self.last_status = [s.status for s in sols]
        check_solutions(sols, self.backend, self.inaccurate)
        return sols

    # -- the backward computation, in NumPy -----------------------------------------------
    def _finite(self, i: int, grad: DataGradient) -> DataGradient | GhostProblemError:
        """``grad``, or the error that says it is not finite (a ghost solution too far
        from the forward one for its delta), for the ``ghost_fallback`` policy."""
        if grad.is_finite():
            return grad
        delta = grad.diagnostics["delta"]
        exc = GhostProblemError(
            f"the first-order gradient is not finite (the ghost "
            f"solution is too far from the forward one for this "
            f"delta) (delta={delta:.3g})",
            batch_index=i,
            backend=self.backend.name,
        )
        exc.delta = delta
        return exc

    def _ffo_once(self, i: int, s: FFOSample, options: FFOOptions) -> DataGradient:
        grad = self._finite(
            i, ffo_backward(s.backend, s.g, s.h, s.e, s.sol, s.c, options, source=s.source)
        )
        if isinstance(grad, GhostProblemError):
            raise grad
        return grad

    def _ffo_fallback(self, i: int, s: FFOSample, first: GhostProblemError) -> DataGradient:
        """Sample ``i`` (``s``) after its ghost failed with ``first``: the
        ``ghost_fallback`` policy."""
        if self.ghost_fallback == "raise":
            raise first
        g, h, e, sol, c = s.g, s.h, s.e, s.sol, s.c
        tried = [f"delta chosen by default: {first}"]
        last: SolverError = first
        if self.ghost_fallback.startswith("smaller-delta"):
            # from the step that failed (it may have been shrunk for a curved cone)
            for k in (1, 2):
                delta = first.delta / 10.0**k
                try:
                    grad = self._ffo_once(i, s, replace(self.options, delta=delta))
                except GhostProblemError as exc:
                    tried.append(f"delta={delta:.3g}: {_short(exc)}")
                    last = exc
                    continue
                grad.diagnostics.update(
                    ghost_fallback="smaller-delta", fallback_delta=delta, ghost_error=str(first)
                )
                logger.info(
                    "batch index %d: ghost problem failed (%s); smaller delta %.3g succeeded",
                    i,
                    first,
                    delta,
                )
                return grad
        if self.ghost_fallback.endswith("kkt"):
            try:
                grad = kkt_backward(g, h, e, sol, c, self.options)
            except SolverError as exc:
                tried.append(f"KKT fallback: {exc}")
                raise GhostProblemError(
                    f"batch index {i}: the ghost problem failed and so did every fallback "
                    f"({'; '.join(tried)})",
                    status=first.status,
                    batch_index=i,
                    backend=self.backend.name,
                ) from exc
            grad.diagnostics.update(ghost_fallback="kkt", ghost_error=str(first))
            logger.info(
                "batch index %d: ghost problem failed (%s); used the KKT gradient", i, first
            )
            return grad
        raise GhostProblemError(
            f"batch index {i}: the ghost problem failed and so did every fallback "
            f"({'; '.join(tried)})",
            status=last.status,
            batch_index=i,
            backend=self.backend.name,
        ) from last

    def _ffo_chunk(
        self, bound: BoundData, sols: list[Solution], c: np.ndarray, indices: range
    ) -> list[DataGradient]:
        """First-order data gradients of the samples ``indices``, staged over the chunk
        (:func:`ffo_backward_batch`; its ghost solves in this layer's thread pool), then
        the fallback policy for each sample whose ghost failed."""
        samples = []
        for i in indices:
            g, h, e = bound.sample(i)
            guard = GuardedBackend(self.backend, i, ghost=True, inaccurate=self.inaccurate)
            samples.append(FFOSample(guard, g, h, e, sols[i], c[i], bound.ghost_source(h, e)))
        results = ffo_backward_batch(
            samples, self.options, run=lambda fn, k: self._runner.run("backward", fn, k)
        )
        grads = []
        for i, s, grad in zip(indices, samples, results):
            if isinstance(grad, DataGradient):
                grad = self._finite(i, grad)
            if isinstance(grad, DataGradient):
                grad.diagnostics["ghost_fallback"] = None
            else:
                try:
                    grad = self._ffo_fallback(i, s, grad)
                except SolverError as exc:
                    raise with_batch_index(exc, i)  # noqa: B904  (exc itself, its cause kept)
            grads.append(grad)
        return grads

    def data_gradients(
        self, bound: BoundData, sols: list[Solution], c: np.ndarray
    ) -> list[DataGradient]:
        """Per-sample gradient of ``c[i]'y_i`` w.r.t. the data.

        The first-order mode stages the batch (:func:`ffo_backward_batch`) in chunks that
        keep at most ``BACKWARD_CHUNK_BYTES`` of per-sample data alive at once (every
        sample's data and ghost problem live until its chunk is done): the whole batch
        unless batched parameters reach large matrices."""
        if self.backward_mode == "kkt":

            def one(i: int) -> DataGradient:
                g, h, e = bound.sample(i)
                try:
                    grad = kkt_backward(g, h, e, sols[i], c[i], self.options)
                except SolverError as exc:
                    raise with_batch_index(exc, i)  # noqa: B904  (exc itself, its cause kept)
                if not grad.is_finite():
                    raise with_batch_index(
                        SolverError(
                            "backward='kkt': the gradient is not finite", backend=self.backend.name
                        ),
                        i,
                    )
                return grad

            grads = self._runner.run("backward", one, bound.batch)
        else:
            grads = []
            for indices in backward_chunks(bound.batch, bound.sample_bytes()):
                grads += self._ffo_chunk(bound, sols, c, indices)
        self.last_diagnostics = [g.diagnostics for g in grads]
        with self._lock:
            self._backward_calls += 1
            call = self._backward_calls
        if self.check_every and self.backward_mode == "ffo" and call % self.check_every == 0:
            self._health_check(call, bound, sols, c, grads)
        return grads

    def _health_check(
        self,
        call: int,
        bound: BoundData,
        sols: list[Solution],
        c: np.ndarray,
        grads: list[DataGradient],
    ) -> None:
        """Compare sample ``i``'s first-order data gradient with the exact KKT one."""
        nonzero = np.flatnonzero(np.any(c != 0, axis=1))
        i = int(nonzero[0]) if nonzero.size else 0
        record: dict[str, Any] = {
            "call": call,
            "sample": i,
            "ghost_fallback": grads[i].diagnostics.get("ghost_fallback"),
        }
        g, h, e = bound.sample(i)
        try:
            ref = kkt_backward(g, h, e, sols[i], c[i], self.options).vector()
        except SolverError as exc:
            record.update(cosine=None, cosine_params=None, rel_err=None, error=str(exc))
            self.health_log.append(record)
            logger.warning(
                "gradient health check, backward call %d: no KKT reference for batch index %d (%s)",
                call,
                i,
                exc,
            )
            return
        mine = grads[i].vector()
        keep = np.ones(self.compiled.n_theta + 1, dtype=bool)
        keep[self.compiled.const_col] = False
        MT = self.compiled.M.T
        cos = _cosine(mine, ref)
        cos_params = _cosine((MT @ mine)[keep], (MT @ ref)[keep])
        norm = float(np.linalg.norm(ref))
        rel = float(np.linalg.norm(mine - ref) / norm) if norm > 0 else float(np.linalg.norm(mine))
        record.update(cosine=cos, cosine_params=cos_params, rel_err=rel)
        self.health_log.append(record)
        problems = []
        if cos < self.check_threshold:
            problems.append(
                f"cosine similarity {cos:.6f} is below check_threshold={self.check_threshold}"
            )
        if self.check_rel_tol is not None and rel > self.check_rel_tol:
            problems.append(f"relative error {rel:.2e} is above check_rel_tol={self.check_rel_tol}")
        if problems:
            message = (
                f"gradient health check, backward call {call}, batch index {i}: "
                f"first-order vs KKT gradient: {' and '.join(problems)} (cosine "
                f"{cos:.6f}, relative error {rel:.2e}); consider tighter solver "
                "tolerances, central=True, a smaller kappa, or backward='kkt'"
            )
            logger.warning(message)
            warnings.warn(message, GradientHealthWarning, stacklevel=2)
        else:
            logger.info(
                "gradient health check, backward call %d, batch index %d: cosine "
                "%.6f (params %.6f), relative error %.2e",
                call,
                i,
                cos,
                cos_params,
                rel,
            )

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_lock", None)  # locks cannot be copied or pickled
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def forward(self, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        info = _inspect_params(self.compiled.params, params, self._rules)
        return _FFOFunction.apply(self, info, *params)


def _short(exc: SolverError) -> str:
    """A failure in a few words (the status), for lists of retries."""
    return f"status {exc.status.value}" if exc.status is not None else str(exc)[:200]


def _is_number(x) -> bool:
    return (
        isinstance(x, (int, float, np.integer, np.floating))
        and not isinstance(x, bool)
        and math.isfinite(float(x))
    )


class _FFOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: FFOLayer, info: _Batch, *params):
        cp_ = layer.compiled
        bound = layer._data(params, info)
        sols = layer.solve_numpy(bound)
        X = np.stack([s.primal for s in sols])
        outs = []
        for slot in cp_.variables:
            value = unflatten_f(X[:, slot.offset : slot.offset + slot.size], slot.shape)
            if not info.any_batched:
                value = value[0]
            outs.append(
                torch.as_tensor(np.ascontiguousarray(value), dtype=info.dtype, device=info.device)
            )
        ctx.layer, ctx.info, ctx.bound, ctx.sols = layer, info, bound, sols
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
            g = g.detach()
            values = g.to("cpu", torch.float64).numpy()
            if not all_finite(values):  # 5 us; torch.isfinite and all took 70
                raise InvalidGradientError(
                    f"the gradient flowing into the layer's output {slot.name} contains NaN "
                    f"or Inf{bad_batch_indices(~torch.isfinite(g), info.any_batched)}; it "
                    "comes from the loss or a later layer, and the layer refuses to "
                    "propagate it"
                )
            g = values
            if not info.any_batched:
                g = g[None]
            c[:, slot.offset : slot.offset + slot.size] = flatten_f(g, info.size, slot.shape)
        d_data = layer.data_gradients(ctx.bound, ctx.sols, c)
        per_param = ctx.bound.parameter_gradients(d_data)  # M' d_data, shared ones summed
        grads = []
        for slot, batched, need, dtype, value in zip(
            cp_.params, info.batched, needs, info.param_dtypes, per_param
        ):
            if not need:
                grads.append(None)
                continue
            if not all_finite(value):
                rows = value.reshape(value.shape[0] if batched else 1, -1)
                bad = np.flatnonzero(~np.isfinite(rows).all(axis=1)).tolist()
                where = f"batch index {bad[:5]}" if batched else "summed over the batch"
                raise SolverError(
                    f"the gradient of parameter {slot.name} overflows (Inf) ({where})",
                    batch_index=bad[0] if batched else None,
                    backend=layer.backend.name,
                )
            # strides as they come (row-major for a dense matrix parameter, see
            # param_map's runs): autograd copies only what its parameter's layout needs
            grads.append(torch.as_tensor(value, dtype=dtype, device=info.device))
        return (None, None) + tuple(grads)
