"""The one exception hierarchy of ffo.

Every error the library raises on purpose derives from :class:`FFOError`, so a
training loop can ``except ffo_core.FFOError`` and know it caught *our* report
of a problem (bad input, solver failure, missing backend), not a bug.

    FFOError
    ├── InvalidParameterError (also ValueError)  bad parameter value/shape/dtype
    ├── ProblemError (also ValueError)           the CVXPY problem cannot be compiled
    │   └── NotDPPError                          ... because it is not DPP
    ├── ConfigError (also ValueError)            bad solver config string or setting
    ├── BackendUnavailable                       unknown name, missing package/licence
    └── SolverError                              a solve did not give a usable answer
        └── GhostProblemError                    ... the backward (ghost) solve failed
"""
from __future__ import annotations


class FFOError(Exception):
    """Base class of every error raised deliberately by ffo."""


class InvalidParameterError(FFOError, ValueError):
    """A parameter tensor is unusable: wrong shape, NaN/Inf, inconsistent batch."""


class ProblemError(FFOError, ValueError):
    """The CVXPY problem cannot be turned into a layer (e.g. integer variables)."""


class NotDPPError(ProblemError):
    """The problem is not DPP, so its data is not an affine map of the parameters."""


class ConfigError(FFOError, ValueError):
    """A solver config string or one of its settings is malformed or unknown."""


class BackendUnavailable(FFOError):
    """A backend name is unknown, or the backend is installed but cannot run here."""


class SolverError(FFOError):
    """A solve returned no usable solution.

    Attributes:
        status: the protocol :class:`~ffo_core.protocol.Status` reported, if any.
        batch_index: index of the failing sample in the batch, if known.
        backend: name of the backend that failed.
    """

    def __init__(self, message: str, *, status=None, batch_index=None, backend=None):
        super().__init__(message)
        self.status = status
        self.batch_index = batch_index
        self.backend = backend


class GhostProblemError(SolverError):
    """The ghost (active-set-reduced, perturbed) problem of the backward pass failed."""
