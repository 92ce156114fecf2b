"""ffo-osqp: OSQP as a backend of ffo layers (an example third-party plugin).

Installing this distribution registers the backend ``osqp`` through the ``ffo`` entry-point
group; ``FFOLayer(problem, params, vars, solver="osqp:eps_abs=1e-9")`` then uses it, and
``ffo conformance osqp --classes lp,qp`` checks it.
"""

from .backend import OSQPBackend

__all__ = ["OSQPBackend"]
__version__ = "0.1.0"
