"""``pdipm``: ffo's own batched primal-dual interior-point method for LPs and QPs, in torch.

It solves, for every sample of a batch at once,

    minimize 1/2 y'Py + q'y   subject to   A y = b  (dual nu, free),
                                           G y + s = h,  s >= 0  (dual lam >= 0)

in the protocol's conventions (``P y + q + A'nu + G'lam = 0``, ``s = h - G y``; zero and
nonnegative cones only), vectorised over the batch in PyTorch, on the CPU or on a CUDA
device, in float64 or float32.  It is a *device* backend: ``solve_batch`` takes the
:class:`~ffo_core.protocol.ProblemBatch` of a layer with NumPy arrays (computes in float64
on the CPU, answers NumPy) or torch tensors (computes on their device, in their dtype,
answers tensors there).  ``solve`` (one NumPy problem) runs the same kernel with batch 1.
It needs nothing but torch.

Method (``ffo_backends/_pdipm_kernel.py``).  A homogeneous self-dual embedding with
Mehrotra's predictor-corrector (the structure of Clarabel's and ECOS's methods; batched
KKT solves as in qpth's PDIPM), so infeasible and unbounded problems end with a
certificate rather than a stall:

* one scaling of the data per batch (Ruiz equilibration of the KKT matrix plus a cost
  scaling), so shared matrices stay shared;
* per iteration and sample one factorisation of the KKT system, solved for three
  right-hand sides, each refined against the unregularised system: when ``P`` is diagonal
  (bound rows of ``G``, one nonzero each, are folded into that diagonal) a Cholesky
  factorisation of the ``(p + k) x (p + k)`` Schur complement of the equalities and the
  ``k`` other rows of ``G`` (OptNet's Sudoku: 40 x 40; a box QP with a budget row:
  1 x 1); otherwise Cholesky of ``P + G' diag(lam/s) G + rho I`` (no equalities) or LU
  with partial pivoting of ``[P + G_E' diag(lam/s) G_E + rho I, A', G_K'; A, -rho I, 0;
  G_K, 0, -diag(s/lam)]``, where the nearly active rows ``G_K`` stay unknowns instead of
  being eliminated (their multipliers would otherwise be tiny differences times huge
  weights); a Cholesky solve that fails or stays inaccurate is redone by LU.
  Rank-deficient equalities, a singular ``P`` and rows that are all zeros are fine;
* sparse data matrices (bounds, one-hot rows) are multiplied through their nonzeros;
* *absent rows* (an all-zero row of ``A`` with ``b_i = 0``, of ``G`` with ``h_i >= 0``, in
  some samples of a batch: how the engine batches ghost problems with different active
  sets) are dropped from that sample (``lam_i = 0``, ``s_i = h_i``; an absent equality's
  ``nu_i`` is 0).  An all-zero row with ``b_i != 0`` or ``h_i < 0`` makes that sample
  INFEASIBLE at once;
* a sample with no inequality row left (``m = 0``, or all rows absent: the engine's ghost
  problems) is an equality-constrained QP, solved by one refined KKT solve; if that does
  not reach the tolerance (a singular, inconsistent or unbounded system) the sample goes
  through the embedding, which classifies it;
* samples stop one by one (converged, certified, stalled), and the iterations go on with
  the others only: one bad sample does not spoil or slow down the rest.

Statuses and accuracy.  ``OPTIMAL`` when the largest of the unscaled relative residuals

    ||A y - b|| / (1 + max(||b||, ||A y||)),   ||G y + s - h|| / (1 + max(||h||, ||G y||, ||s||)),
    ||P y + q + A'nu + G'lam|| / (1 + max(||q||, ||P y||, ||A'nu||, ||G'lam||)),
    s'lam / (1 + |f|),   |f - dual objective| / (1 + |f|)        (infinity norms, f = objective)

is at most ``tol``; that number is ``SolveInfo.accuracy``.  ``INFEASIBLE`` when the
embedding's ``(nu, lam)`` (or its constant Newton direction's) satisfies
``||A'nu + G'lam|| <= tol_infeas * -(b'nu + h'lam)``, ``UNBOUNDED`` when its ``x`` satisfies
``max(||Px||, ||Ax||, ||(Gx)+||) <= tol_infeas * -q'x`` (both measured on the equilibrated
data; such a ratio bounds the size of every feasible point, resp. dual point, from below by
its inverse, so it is never met by a problem with a moderate solution).  An optimum is
reported only when the residuals above are met, so an infeasible or unbounded problem is
never OPTIMAL; one that is unbounded along a direction no constraint touches can end
``NUMERICAL_ERROR`` instead of ``UNBOUNDED``.  A sample stopped by
``max_iter``, ``time_limit`` or lack of progress is ``OPTIMAL_INACCURATE`` /
``INFEASIBLE_INACCURATE`` / ``UNBOUNDED_INACCURATE`` if it meets ``tol_inaccurate``, else
``ITERATION_LIMIT`` / ``TIME_LIMIT`` / ``NUMERICAL_ERROR``; a NaN or Inf in a sample's
data is that sample's ``NUMERICAL_ERROR``.  Only ``OPTIMAL*`` samples carry a solution
(other rows of a ``BatchSolution`` are NaN).  ``SolveInfo.raw_status`` is the kernel's
word (``solved``, ``primal_infeasible``, ``max_iterations``, ...), plus a note where one
applies; ``solve_time`` is the wall time of the whole batch; ``extra["batch_size"]``.

Settings (config string ``"pdipm:tol=1e-10,max_iter=50"``; checked when the backend is
made, a bad name or value is a ``ConfigError`` naming it):

=================  =================  =================  ======================================
setting            float64 default    float32 default    meaning
=================  =================  =================  ======================================
``tol``            1e-11              1e-5               relative residuals and gaps for OPTIMAL
``tol_inaccurate`` 1e-6               1e-3               the same for the *_INACCURATE statuses
``tol_infeas``     1e-8               1e-5               certificate ratio for INFEASIBLE/UNBOUNDED
``max_iter``       100                100                interior-point iterations
``refine``         5                  5                  iterative refinement steps per KKT solve
``reg``            1e-9               1e-6               static regularisation rho (scaled data)
``equilibrate_iter`` 10               10                 Ruiz passes (0: no scaling)
``time_limit``     none               none               seconds for the whole batch
``max_memory_gb``  8                  8                  refuse larger dense storage (GiB)
=================  =================  =================  ======================================

A setting given explicitly applies to both dtypes.  float32 is about 1e-6 accurate at
best, hence its looser defaults; float16 and bfloat16 are refused.

Cost.  Dense linear algebra, made for many small problems (up to a few hundred
variables): per iteration and sample ``O(n (p + k)^2 + (p + k)^3)`` in the Schur case,
``O((n + p + k)^3)`` otherwise, plus products with the data; memory for ``batch`` such
matrices and the dense data (once when shared by the batch).  A batch whose estimate
exceeds ``max_memory_gb`` is refused with a ``SolverError`` before the memory is taken.
Use a sparse backend (``clarabel``) for large sparse problems.  On the CPU, torch's
per-operation overhead (a few microseconds, some hundreds of operations per iteration)
dominates small batches; the method pays off with large batches and on a GPU.

Thread safety: no state is kept between calls; one instance may be used from many
threads.  Results on the CPU are deterministic; on CUDA some sums use atomic additions,
so repeated solves can differ in the last bits.  There is no warm start.  A sample's
answer does not depend on the other samples of its batch beyond solver accuracy (the
equilibration is common to the batch).
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from typing import Any, ClassVar

import numpy as np

from ffo_core.backend_base import BackendBase
from ffo_core.errors import ConfigError, InvalidParameterError, SolverError
from ffo_core.hookspecs import hookimpl
from ffo_core.protocol import (
    BatchSolution,
    Capabilities,
    ConeConstraints,
    Equalities,
    Objective,
    ProblemBatch,
    Solution,
    SolveInfo,
    Status,
)

#: kernel status code -> protocol status (codes: ``_pdipm_kernel``'s constants 1..9)
STATUS_MAP = {
    1: Status.OPTIMAL,
    2: Status.OPTIMAL_INACCURATE,
    3: Status.INFEASIBLE,
    4: Status.INFEASIBLE_INACCURATE,
    5: Status.UNBOUNDED,
    6: Status.UNBOUNDED_INACCURATE,
    7: Status.ITERATION_LIMIT,
    8: Status.TIME_LIMIT,
    9: Status.NUMERICAL_ERROR,
}

#: setting -> (float64 default, float32 default); None: no default (off)
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "tol": (1e-11, 1e-5),
    "tol_inaccurate": (1e-6, 1e-3),
    "tol_infeas": (1e-8, 1e-5),
    "max_iter": (100, 100),
    "refine": (5, 5),
    "reg": (1e-9, 1e-6),
    "equilibrate_iter": (10, 10),
    "time_limit": (None, None),
    "max_memory_gb": (8.0, 8.0),
}
_POSITIVE_FLOATS = ("tol", "tol_inaccurate", "tol_infeas", "reg", "time_limit", "max_memory_gb")
_COUNTS = {"max_iter": 1, "refine": 0, "equilibrate_iter": 0}  # name -> smallest value


class PDIPMBackend(BackendBase):
    name = "pdipm"
    package = "torch"
    distribution = "torch"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg"}),
        quadratic_objective=True,
        warm_start=False,
        thread_safe=True,
        device=True,
    )

    #: cvxpylayers' common ``solver_args`` keys and this solver's settings for them
    #: (:mod:`ffo_core.solver_args`)
    solver_arg_names: ClassVar[dict] = {"eps": "tol", "max_iters": "max_iter"}

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        for key, value in self.settings.items():
            self._check(key, value)

    def setting_names(self):
        return tuple(DEFAULTS)

    @classmethod
    def version(cls) -> str | None:
        """ffo's version (the solver is part of ffo) and the torch it runs on."""
        try:
            torch_version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None
        try:
            own = importlib.metadata.version("ffo")
        except importlib.metadata.PackageNotFoundError:
            own = "?"
        return f"{own} (torch {torch_version})"

    @staticmethod
    def _check(key: str, value: Any) -> None:
        """Raise :class:`ConfigError` naming ``key`` and ``value`` when it is out of range."""
        bad = f"pdipm setting {key}={value!r}: "
        if key in _POSITIVE_FLOATS:
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value > 0
            )
            if not ok:
                raise ConfigError(f"{bad}must be a positive finite number")
        elif key in _COUNTS:
            low = _COUNTS[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{bad}must be an integer >= {low}")

    def options(self, dtype_is_float32: bool):
        """The kernel's options for a dtype (settings given, else that dtype's defaults)."""
        from ._pdipm_kernel import Options

        col = 1 if dtype_is_float32 else 0
        values = {k: self.settings.get(k, v[col]) for k, v in DEFAULTS.items()}
        return Options(
            tol=float(values["tol"]),
            tol_inaccurate=max(float(values["tol_inaccurate"]), float(values["tol"])),
            tol_infeas=float(values["tol_infeas"]),
            max_iter=int(values["max_iter"]),
            refine=int(values["refine"]),
            reg=float(values["reg"]),
            equilibrate_iter=int(values["equilibrate_iter"]),
            time_limit=None if values["time_limit"] is None else float(values["time_limit"]),
            max_memory=float(values["max_memory_gb"]) * 2**30,
        )

    # -- sizes ---------------------------------------------------------------------------------
    def _memory_limit(self) -> float:
        """``max_memory_gb`` in bytes."""
        return float(self.settings.get("max_memory_gb", DEFAULTS["max_memory_gb"][0])) * 2**30

    def _refuse(self, what: str, need: float) -> None:
        limit = self._memory_limit()
        raise SolverError(
            f"pdipm stores {what} densely: about {need / 2**30:.1f} GiB, more than "
            f"max_memory_gb={limit / 2**30:g} (raise it with 'pdipm:max_memory_gb=...', "
            "split the batch, or use a sparse backend such as clarabel)",
            backend=self.name,
        )

    def _check_data(self, batch: int, n: int, p: int, m: int, per_sample, itemsize: int):
        """Refuse a batch whose dense data would exceed ``max_memory_gb`` before it is
        formed (``per_sample``: which of P, A, G have values per sample)."""
        sizes = {"P": n * n, "A": p * n, "G": m * n}
        count = sum(sizes[k] * (batch if k in per_sample else 1) for k in sizes)
        need = 3 * itemsize * count  # the data, an equilibration pass, the scaled copy
        if need > self._memory_limit():
            self._refuse(f"the data of a batch of {batch} (n={n}, p={p}, m={m})", need)

    # -- the protocol ------------------------------------------------------------------------
    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term=None,
        *,
        warm_start=None,
    ) -> Solution:
        import torch

        from . import _pdipm_kernel as K

        self.check_size(g, h, e)
        if h.dims.kinds - {"nonneg"}:
            raise SolverError(
                f"pdipm solves LPs and QPs only (zero and nonnegative cones); this problem "
                f"has {', '.join(sorted(h.dims.kinds - {'nonneg'}))} cones",
                backend=self.name,
            )
        n, p, m = g.n, e.p, h.m
        self._check_data(1, n, p, m, (), 8)

        def dense(M, rows):
            if M is None:
                return None
            return torch.from_numpy(np.asarray(M.toarray(), dtype=float).reshape(1, rows, n))

        def vec(v):
            return torch.from_numpy(np.array(v, dtype=float).reshape(1, -1))

        q = np.array(g.q, dtype=float)
        if extra_linear_term is not None:
            q = q + np.asarray(extra_linear_term, dtype=float)
        P = dense(g.P, n)
        if P is not None:
            P = 0.5 * (P + P.transpose(1, 2))
        data = K.Data(1, P, vec(q), dense(e.A, p), vec(e.b), dense(h.G, m), vec(h.h))
        start = time.perf_counter()
        res = self._run(K, data, False)
        elapsed = time.perf_counter() - start
        sol = self._answer(res, elapsed, numpy=True)
        return sol.sample(0)

    def solve_batch(self, batch: ProblemBatch, extra_linear_term=None) -> BatchSolution:
        """Every sample of ``batch`` in one vectorised call (see the module docstring):
        NumPy in, float64 on the CPU and NumPy out; torch tensors in (one device, float32
        or float64), computed there and answered there."""
        import torch

        from . import _pdipm_kernel as K

        B = int(batch.batch)
        n, p, m = batch.n, batch.p, batch.m
        if batch.dims.kinds - {"nonneg"}:
            raise SolverError(
                "pdipm solves LPs and QPs only (zero and nonnegative cones); this batch has "
                f"{', '.join(sorted(batch.dims.kinds - {'nonneg'}))} cones",
                backend=self.name,
            )
        if batch.dims.rows != m:
            raise SolverError(
                f"pdipm: G has {m} rows but the cone dims describe {batch.dims.rows}",
                backend=self.name,
            )
        fields = {
            "P_values": batch.P_values,
            "q": batch.q,
            "A_values": batch.A_values,
            "b": batch.b,
            "G_values": batch.G_values,
            "h": batch.h,
            "extra_linear_term": extra_linear_term,
        }
        tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
        if tensors:
            dtypes = {v.dtype for v in tensors.values()}
            devices = {v.device for v in tensors.values()}
            if len(devices) > 1 or len(dtypes) > 1:
                where = ", ".join(f"{k}: {v.dtype} on {v.device}" for k, v in tensors.items())
                raise InvalidParameterError(
                    f"pdipm: the tensors of a batch must share one device and one dtype ({where})"
                )
            dtype, device = dtypes.pop(), devices.pop()
            if dtype not in (torch.float32, torch.float64):
                raise InvalidParameterError(
                    f"pdipm computes in float32 or float64; got {dtype} (cast the data first)"
                )
        else:
            dtype, device = torch.float64, torch.device("cpu")
        numpy_out = not tensors

        def tensor(name, values, width):
            t = torch.as_tensor(values, dtype=dtype, device=device)
            if t.dim() != 2 or t.shape[0] not in (1, B) or t.shape[1] != width:
                raise InvalidParameterError(
                    f"pdipm: {name} has shape {tuple(t.shape)}, expected ({B} or 1, {width})"
                )
            return t.detach()

        def matrix(name, pattern, values):
            rows, cols = pattern.shape
            v = tensor(name, values, pattern.nnz)
            flat = v.new_zeros(v.shape[0], rows * cols)
            index = torch.as_tensor(
                np.asarray(pattern.indices, dtype=np.int64) * cols
                + np.asarray(pattern.cols, dtype=np.int64),
                device=device,
            )
            flat.index_add_(1, index, v)  # duplicates of a non-canonical pattern add up
            return flat.view(v.shape[0], rows, cols)

        per_sample = {
            name
            for name, values in (
                ("P", batch.P_values),
                ("A", batch.A_values),
                ("G", batch.G_values),
            )
            if values is not None and np.shape(values)[0] != 1
        }
        itemsize = 4 if dtype == torch.float32 else 8
        self._check_data(B, n, p, m, per_sample, itemsize)
        P = None
        if batch.P is not None and batch.P.nnz:
            P = matrix("P_values", batch.P, batch.P_values)
            P = 0.5 * (P + P.transpose(1, 2))
        q = tensor("q", batch.q, n)
        if extra_linear_term is not None:
            q = q + tensor("extra_linear_term", extra_linear_term, n)
        data = K.Data(
            B,
            P,
            q,
            matrix("A_values", batch.A, batch.A_values),
            tensor("b", batch.b, p),
            matrix("G_values", batch.G, batch.G_values),
            tensor("h", batch.h, m),
        )
        if q.shape[0] not in (1, B):
            raise InvalidParameterError(f"pdipm: q has {q.shape[0]} rows for a batch of {B}")
        start = time.perf_counter()
        with torch.no_grad():
            res = self._run(K, data, dtype == torch.float32)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return self._answer(res, time.perf_counter() - start, numpy=numpy_out)

    def _run(self, K, data, float32: bool):
        try:
            return K.run(data, self.options(float32))
        except K.TooLarge as exc:
            self._refuse(exc.what, exc.need)

    @staticmethod
    def _answer(res, elapsed: float, numpy: bool) -> BatchSolution:
        from ._pdipm_kernel import RAW

        codes = res.status.tolist()
        iters = res.iterations.tolist()
        accs = res.accuracy.tolist()
        B = len(codes)
        statuses, infos = [], []
        for k in range(B):
            code = codes[k] if codes[k] in STATUS_MAP else 9
            raw = RAW[code]
            if k in res.notes:
                raw = f"{raw} ({res.notes[k]})"
            acc = accs[k]
            infos.append(
                SolveInfo(
                    iterations=int(iters[k]),
                    solve_time=elapsed,
                    accuracy=float(acc) if math.isfinite(acc) else None,
                    raw_status=raw,
                    extra={"batch_size": B},
                )
            )
            statuses.append(STATUS_MAP[code])
        arrays = (res.y, res.nu, res.lam, res.s)
        if numpy:
            arrays = tuple(a.detach().cpu().double().numpy() for a in arrays)
        return BatchSolution(statuses, *arrays, infos)


@hookimpl
def ffo_register_backends(register):
    register(PDIPMBackend)
