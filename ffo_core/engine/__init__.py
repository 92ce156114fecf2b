"""The engine: what happens to one batch of problems between the data map and the layers.

* :mod:`.ffo_backward` -- the fully first-order backward of one sample (read it first),
  :mod:`.ghost` its ghost problem, :mod:`.data_gradient` the gradient it returns, and
  :mod:`.schedule` the same steps over a batch;
* :mod:`.active_set` -- which rows and cone blocks are active at a solution;
* :mod:`.kkt_backward`, :mod:`.kkt_cones` -- the exact reference (implicit
  differentiation of the KKT conditions; it factorises, the first-order path never does);
* :mod:`.solves` -- guarded solves: every way a solve fails becomes a typed error.

Nothing here imports torch or a solver package.  The two backward functions live in the
modules of their name (``from ffo_core.engine.ffo_backward import ffo_backward``,
``from ffo_core.engine.kkt_backward import kkt_backward``); the rest of the engine's public
names are re-exported here.
"""

from .active_set import ActiveSet, classify, classify_batch
from .data_gradient import DataGradient, lagrangian_gradient_derivative, low_rank_factors
from .ffo_backward import FFOOptions, choose_delta
from .ghost import (
    GhostSource,
    base_point_error,
    base_point_errors,
    build_ghost,
    build_ghosts,
    solve_ghost,
    without_stored_zeros,
)
from .schedule import FFOSample, ffo_backward_batch

__all__ = [
    "ActiveSet",
    "DataGradient",
    "FFOOptions",
    "FFOSample",
    "GhostSource",
    "base_point_error",
    "base_point_errors",
    "build_ghost",
    "build_ghosts",
    "choose_delta",
    "classify",
    "classify_batch",
    "ffo_backward_batch",
    "lagrangian_gradient_derivative",
    "low_rank_factors",
    "solve_ghost",
    "without_stored_zeros",
]
