"""ECOS adapter (interior point; LP, SOCP, EXP; no quadratic objective, no PSD): ``ecos.solve``.

Native conventions and how they map to the protocol (:mod:`ffo_core.protocol`) -- applied in
one place, :func:`ecos_data` on the way in and :meth:`EcosBackend._to_protocol` on the way out:

* ECOS solves ``min c'x  s.t.  Ax = b (dual y),  Gx + s = h, s in K (dual z)`` with
  ``c + A'y + G'z = 0`` and ``z in K*``: the protocol's form exactly, so ``nu = y``,
  ``lam = z``, ``slack = s`` with **no sign change**.  Equalities go to ECOS's ``A, b``
  (``A`` is passed as ``None`` when there are none: ECOS rejects an empty ``A``).
* **No quadratic objective.**  :attr:`Capabilities.quadratic_objective` is False, so the
  engine compiles ``1/2 y'Py`` into a second-order cone before anything reaches this adapter
  (CVXPY's ``use_quad_obj=False``).  A direct call with a nonzero ``P`` raises
  :class:`~ffo_core.errors.SolverError` rather than silently dropping it.
* **Exponential cone order.**  ECOS's cone is ``{(x, y, z): z e^(x/z) <= y, z > 0}`` -- the
  protocol's (CVXPY/SCS/Clarabel) ``(x, y, z)`` with ``y`` and ``z`` swapped -- so the rows
  of each 3-row block are permuted by :data:`EXP_CONE_ORDER` ``= (0, 2, 1)`` (CVXPY's
  ``ECOS.EXP_CONE_ORDER``) on the way in, and ``z``, ``s`` by the same (self-inverse)
  permutation on the way out.
* SOC is ``(t, x)``, ``||x|| <= t`` in both.  ECOS has no PSD cone.

Settings are ECOS's keyword names (:data:`ECOS_SETTINGS`: ``feastol``, ``abstol``,
``reltol``, their ``*_inacc`` variants, ``max_iters``, ``nitref``, ``verbose``).  ECOS has no
time limit, so ``time_limit`` is not accepted.

Statuses (:data:`STATUS_MAP`): ECOS's ``exitFlag``; ``+10`` marks "close to" results
(``OPTIMAL_INACCURATE`` etc.), ``-1`` is the iteration limit.

Thread safety: every ``solve`` is a separate ``ecos.solve`` call on fresh arrays; the adapter
keeps no mutable state.  ECOS is an interior-point method: no warm start, no structure reuse.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ffo_core.backend_base import BackendBase, linear_cost
from ffo_core.errors import ConfigError, SolverError
from ffo_core.hookspecs import hookimpl
from ffo_core.protocol import (
    Capabilities,
    ConeConstraints,
    ConeDims,
    Equalities,
    Objective,
    Solution,
    SolveInfo,
    Status,
)

#: Keyword settings of ``ecos.solve`` for continuous problems.
ECOS_SETTINGS = (
    "feastol",
    "abstol",
    "reltol",
    "feastol_inacc",
    "abstol_inacc",
    "reltol_inacc",
    "max_iters",
    "nitref",
    "verbose",
)

#: Protocol exponential-cone rows ``(x, y, z)`` as ECOS wants them (CVXPY's EXP_CONE_ORDER).
EXP_CONE_ORDER = (0, 2, 1)

#: ECOS ``exitFlag`` -> protocol status.
STATUS_MAP = {
    0: Status.OPTIMAL,  # ECOS_OPTIMAL
    1: Status.INFEASIBLE,  # ECOS_PINF: certificate of primal infeasibility
    2: Status.UNBOUNDED,  # ECOS_DINF: certificate of dual infeasibility
    10: Status.OPTIMAL_INACCURATE,  # ECOS_INACC_OFFSET + ECOS_OPTIMAL
    11: Status.INFEASIBLE_INACCURATE,
    12: Status.UNBOUNDED_INACCURATE,
    -1: Status.ITERATION_LIMIT,  # ECOS_MAXIT
    -2: Status.NUMERICAL_ERROR,  # ECOS_NUMERICS: search direction unreliable
    -3: Status.NUMERICAL_ERROR,  # ECOS_OUTCONE: s or z left the cone
    -4: Status.NUMERICAL_ERROR,  # ECOS_SIGINT
    -7: Status.NUMERICAL_ERROR,  # ECOS_FATAL
}


def ecos_row_order(dims: ConeDims) -> np.ndarray:
    """``perm`` with ``ecos_rows = protocol_rows[perm]`` for ``G`` (self-inverse)."""
    perm = np.arange(dims.rows, dtype=np.int64)
    start = dims.nonneg + sum(dims.soc)
    for k in range(dims.exp):
        block = start + 3 * k
        perm[block : block + 3] = block + np.asarray(EXP_CONE_ORDER)
    return perm


def ecos_dims(dims: ConeDims) -> dict:
    """ECOS's cone dictionary."""
    return {"l": int(dims.nonneg), "q": [int(k) for k in dims.soc], "e": int(dims.exp)}


def ecos_data(g: Objective, h: ConeConstraints, e: Equalities, extra_linear_term=None):
    """``(c, G, h, dims, A, b, perm)`` in ECOS's conventions (``A``, ``b`` None if ``p = 0``)."""
    if h.dims.psd:
        raise SolverError("ecos has no PSD cone", backend="ecos")
    c = linear_cost(g, extra_linear_term, "ecos")
    perm = ecos_row_order(h.dims)
    G = sp.csc_matrix(h.G.tocsr()[perm], dtype=float)
    hh = np.ascontiguousarray(h.h[perm], dtype=float)
    A = b = None
    if e.p:
        A = sp.csc_matrix(e.A, dtype=float)
        b = np.ascontiguousarray(e.b, dtype=float)
    return c, G, hh, ecos_dims(h.dims), A, b, perm


class EcosBackend(BackendBase):
    name = "ecos"
    package = "ecos"
    distribution = "ecos"
    capabilities = Capabilities(
        cones=frozenset({"zero", "nonneg", "soc", "exp"}),
        quadratic_objective=False,
        warm_start=False,
        thread_safe=True,
    )

    def setting_names(self):
        return ECOS_SETTINGS

    def with_settings(self, **settings) -> EcosBackend:
        """A new backend with ``settings`` added to or replacing this one's.  ECOS has no
        time limit: ``time_limit`` is a :class:`ConfigError` (bound the work with
        ``max_iters`` instead)."""
        if "time_limit" in settings:
            raise ConfigError(
                "ECOS has no time limit; bound its work with max_iters "
                '(e.g. "ecos:max_iters=50") or choose another backend'
            )
        return super().with_settings(**settings)

    def solve(
        self,
        g: Objective,
        h: ConeConstraints,
        e: Equalities,
        extra_linear_term=None,
        *,
        warm_start=None,
    ) -> Solution:
        import ecos

        c, G, hh, dims, A, b, perm = ecos_data(g, h, e, extra_linear_term)
        n, p, m = g.n, e.p, h.m
        drop_eq = False
        if A is not None and A.nnz == 0:
            # ECOS rejects an all-zero A: the rows read 0 = b.
            if np.any(b != 0):
                return Solution(
                    status=Status.INFEASIBLE,
                    info=SolveInfo(raw_status="0 = b with b != 0 (checked before calling ECOS)"),
                )
            A = b = None
            drop_eq = True
        opts = {"verbose": False, **self.settings}
        try:
            res = ecos.solve(c, G if m else None, hh if m else None, dims, A, b, **opts)
        except TypeError as exc:
            raise ConfigError(
                f"ecos rejected its settings: {exc}; valid settings: {', '.join(ECOS_SETTINGS)}"
            ) from exc
        except ValueError as exc:
            raise SolverError(
                f"ecos could not solve the problem: {exc}", backend=self.name
            ) from exc
        return self._to_protocol(res, n, p, m, perm, drop_eq)

    @staticmethod
    def _to_protocol(res: dict, n, p, m, perm, drop_eq) -> Solution:
        raw = res["info"]
        flag = int(raw["exitFlag"])
        status = STATUS_MAP.get(flag, Status.NUMERICAL_ERROR)
        relgap = raw.get("relgap")
        gap = raw.get("gap")
        gaps = [abs(v) for v in (gap, relgap) if v is not None and np.isfinite(v)]
        parts = [raw.get("pres"), raw.get("dres"), min(gaps) if gaps else None]
        parts = [float(v) for v in parts if v is not None and np.isfinite(v)]
        timing = raw.get("timing", {})
        info = SolveInfo(
            iterations=int(raw.get("iter", 0)),
            solve_time=float(timing.get("runtime", 0.0)),
            accuracy=max(parts) if parts else None,
            raw_status=f"{flag}: {raw.get('infostring', '')}",
            extra={"pres": raw.get("pres"), "dres": raw.get("dres"), "gap": gap, "relgap": relgap},
        )
        if not status.has_solution:
            return Solution(status=status, info=info)
        z = np.asarray(res["z"], dtype=float)
        s = np.asarray(res["s"], dtype=float)
        lam = np.empty(m)
        slack = np.empty(m)
        lam[perm] = z
        slack[perm] = s
        nu = np.zeros(p) if drop_eq else np.asarray(res["y"], dtype=float)
        return Solution(
            status=status,
            primal=np.asarray(res["x"], dtype=float),
            eq_dual=nu,
            ineq_dual=lam,
            slack=slack,
            info=info,
        )


@hookimpl
def ffo_register_backends(register):
    register(EcosBackend)
