"""cvxpylayers compatibility: ``from ffo_core.compat import CvxpyLayer`` is the whole
migration from ``from cvxpylayers.torch import CvxpyLayer``.

:class:`CvxpyLayer` has exactly cvxpylayers' constructor,
``CvxpyLayer(problem, parameters, variables, solver=None, gp=False, verbose=False,
canon_backend=None, solver_args=None)``, and call, ``layer(*params, solver_args=None)``,
with the same batching, dtype and output conventions; it is an
:class:`~ffo_core.FFOLayer` (first-order backward) underneath.  What maps to what:

* ``solver=None`` (cvxpylayers: diffcp, which solves with SCS) and ``"DIFFCP"``: our SCS
  backend at 1e-8 (:data:`DEFAULT_SOLVER`), so that cvxpylayers' ``solver_args`` (SCS
  settings) keep their meaning.
  A CVXPY solver name (``"CLARABEL"``, ``"SCS"``, ``"ECOS"``, ``"GUROBI"``, ``"MOSEK"``,
  ``"MOREAU"``, any case) selects our backend of that name; another solver CVXPY has
  installed goes through the CVXPY pass-through backend (``"cvxpy:OSQP"``).  Our config
  strings (``"scs:eps_abs=1e-9"``) and backend objects work too.  cvxpylayers'
  ``SolverInterface`` objects do not (:class:`~ffo_core.errors.UnsupportedError`).
* ``solver_args`` (constructor and call) go to the backend through
  :mod:`ffo_core.solver_args`: its own setting names, or the common cvxpylayers/diffcp
  keys it translates (``eps``, ``max_iters``, ``verbose``...); a key it has no equivalent
  for (e.g. SCS's ``acceleration_lookback`` on Clarabel) is refused by name, never
  ignored.
* ``verbose=True`` is ``solver_args={"verbose": True}``.
* ``gp``, ``canon_backend``: as cvxpylayers (:class:`~ffo_core.FFOLayer`).
* Errors are ours (:class:`~ffo_core.errors.FFOError`); input errors are ``ValueError``
  subclasses as in cvxpylayers, a failed solve is a
  :class:`~ffo_core.errors.SolverError` (cvxpylayers: ``diffcp.SolverError``).

See docs/migration.md for everything else that differs.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UnsupportedError
from .layers.cvxpy_layer import FFOLayer
from .protocol import Backend
from .registry import available_backends

#: ``solver=None`` (and ``"DIFFCP"``): cvxpylayers' default is diffcp, which solves with SCS
#: (ECOS where there is no PSD cone), and its users' ``solver_args`` are SCS settings
#: (``eps``, ``max_iters``, ``acceleration_lookback``...).  So the compatibility class
#: solves with our SCS backend, to 1e-8 (SCS's own default, 1e-4, is too coarse for
#: gradient checks by finite differences); those settings keep their meaning.  Pass
#: ``solver="CLARABEL"`` for our general default (an interior-point method), as
#: :class:`~ffo_core.FFOLayer` uses.
DEFAULT_SOLVER = "scs:eps_abs=1e-8,eps_rel=1e-8"
#: cvxpylayers' own solver names that mean "the library's default differentiable path".
_DEFAULT_NAMES = {"DIFFCP"}


def backend_for(solver: Any) -> str | Backend:
    """Our backend (or config string) for a cvxpylayers ``solver`` argument."""
    if solver is None:
        return DEFAULT_SOLVER
    if not isinstance(solver, str):
        if hasattr(solver, "solve") and hasattr(solver, "capabilities"):
            return solver  # one of our backends
        raise UnsupportedError(
            f"solver={type(solver).__name__}: cvxpylayers' SolverInterface objects are not "
            "supported; write a backend (docs/plugins.md) or pass a solver name"
        )
    if ":" in solver:
        return solver  # one of our config strings
    if solver.upper() in _DEFAULT_NAMES:
        return DEFAULT_SOLVER
    name = solver.lower()
    if name in available_backends():
        return name
    import cvxpy as cp

    if solver.upper() in cp.installed_solvers():
        return f"cvxpy:{solver.upper()}"
    return name  # the registry's error lists what is available


class CvxpyLayer(FFOLayer):
    """cvxpylayers' ``CvxpyLayer``, on ffo's first-order backward (module docstring).

    Args:
        problem: a DPP ``cvxpy.Problem`` (DGP with ``gp=True``).
        parameters: its parameters, in the order the layer is called with.
        variables: the variables and dual variables (``constraint.dual_variables[k]``)
            the layer returns, in this order.
        solver: None (SCS, as cvxpylayers), a CVXPY solver name, one of our config
            strings or a backend.
        gp: a log-log convex (geometric) program.
        verbose: print the solver's output (``solver_args={"verbose": True}``).
        canon_backend: CVXPY's canonicalisation backend.
        solver_args: solver settings for every call (a call's ``solver_args`` adds to
            them for that call).
    """

    def __init__(
        self,
        problem,
        parameters,
        variables,
        solver=None,
        gp: bool = False,
        verbose: bool = False,
        canon_backend: str | None = None,
        solver_args: dict[str, Any] | None = None,
    ) -> None:
        args = dict(solver_args or {})
        if verbose:
            args.setdefault("verbose", True)
        super().__init__(
            problem,
            parameters,
            variables,
            solver=backend_for(solver),
            gp=gp,
            canon_backend=canon_backend,
            solver_args=args or None,
        )

    def forward(
        self,
        *params: torch.Tensor,
        solver_args: dict[str, Any] | None = None,
        warm_start: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """The outputs' optimal values; ``solver_args`` for this call only.
        ``warm_start=True`` (cvxpylayers: Moreau only) is refused."""
        if warm_start:
            raise UnsupportedError(
                "warm_start=True: the layer does not reuse the previous call's solutions; "
                "a backend that warm-starts does it within a call"
            )
        return super().forward(*params, solver_args=solver_args)


__all__ = ["CvxpyLayer", "backend_for"]
