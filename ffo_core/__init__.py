"""ffo: any convex-optimisation solver as a differentiable PyTorch layer, with a fully
first-order backward pass (FFOLayer, Zhao et al., ICML 2026).

Torch-free parts (protocol, registry, errors) import without torch, so solver adapters can
use them; the layers are loaded on first access.
"""

from __future__ import annotations

from .backend_base import interrupt_solves
from .errors import (
    BackendUnavailable,
    ConfigError,
    FFOError,
    GhostProblemError,
    GradientHealthWarning,
    InaccurateSolutionWarning,
    InvalidGradientError,
    InvalidParameterError,
    NotDPPError,
    ProblemError,
    SolverError,
    UnsupportedError,
)
from .protocol import (
    Backend,
    BatchSolution,
    Capabilities,
    ConeConstraints,
    ConeDims,
    Equalities,
    Objective,
    ProblemBatch,
    Solution,
    SolveInfo,
    SparsePattern,
    Status,
)
from .registry import available_backends, get_backend, register_backend, unregister_backend

__version__ = "0.1.0"

_LAZY = {"FFOLayer": ".layers.cvxpy_layer", "FFOQPLayer": ".layers.qp_layer"}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ffo_core' has no attribute {name!r}")


__all__ = [
    "Backend",
    "BackendUnavailable",
    "BatchSolution",
    "Capabilities",
    "ConeConstraints",
    "ConeDims",
    "ConfigError",
    "Equalities",
    "FFOError",
    "FFOLayer",
    "FFOQPLayer",
    "GhostProblemError",
    "GradientHealthWarning",
    "InaccurateSolutionWarning",
    "InvalidGradientError",
    "InvalidParameterError",
    "NotDPPError",
    "Objective",
    "ProblemBatch",
    "ProblemError",
    "Solution",
    "SolveInfo",
    "SolverError",
    "SparsePattern",
    "Status",
    "UnsupportedError",
    "available_backends",
    "get_backend",
    "interrupt_solves",
    "register_backend",
    "unregister_backend",
]
