"""The one exception hierarchy of ffo.

Every error the library raises on purpose derives from :class:`FFOError`, so a
training loop can ``except ffo_core.FFOError`` and know it caught *our* report
of a problem (bad input, solver failure, missing backend), not a bug.

    FFOError
    ├── InvalidParameterError (also ValueError)  bad parameter value/shape/dtype/device,
    │                                            or a value outside its declared attributes
    ├── InvalidGradientError (also ValueError)   NaN/Inf in the gradient entering backward
    ├── ProblemError (also ValueError)           the CVXPY problem cannot be compiled
    │   └── NotDPPError                          ... because it is not DPP
    ├── ConfigError (also ValueError)            bad solver config string or setting
    ├── UnsupportedError                         a use the layers refuse by name (double
    │                                            backward, torch.func transforms, ...)
    ├── BackendUnavailable                       unknown name, missing package/licence
    └── SolverError                              a solve did not give a usable answer
        └── GhostProblemError                    ... the backward (ghost) solve failed

Warnings (not errors; ``warnings.warn`` categories): :class:`GradientHealthWarning` (the
optional gradient health check of ``FFOLayer(check_every=N)`` found the first-order gradient
far from the exact one) and :class:`InaccurateSolutionWarning`.
"""

from __future__ import annotations


class FFOError(Exception):
    """Base class of every error raised deliberately by ffo."""


class InvalidParameterError(FFOError, ValueError):
    """A parameter tensor is unusable: wrong shape, NaN/Inf, inconsistent batch."""


class InvalidGradientError(FFOError, ValueError):
    """The gradient flowing into a layer's output in the backward pass has NaN or Inf.

    It comes from the loss or from a layer after this one; the layer refuses to turn it into
    ghost problems (whose data would be NaN) or parameter gradients.
    """


class ProblemError(FFOError, ValueError):
    """The CVXPY problem cannot be turned into a layer (e.g. integer variables)."""


class NotDPPError(ProblemError):
    """The problem is not DPP, so its data is not an affine map of the parameters."""


class ConfigError(FFOError, ValueError):
    """A solver config string or one of its settings is malformed or unknown."""


class UnsupportedError(FFOError):
    """A use of a layer that ffo does not support, refused by name rather than answered
    wrongly: differentiating the backward again (``create_graph=True``), ``torch.func``
    transforms, a modelling feature with no faithful translation."""


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
    """The ghost (active-set-reduced, perturbed) problem of the backward pass failed.

    ``delta``: the perturbation the failing ghost was solved with, when known (the
    backward pass adds it, and it appears in the message)."""

    delta: float | None = None


class InaccurateSolutionWarning(UserWarning):
    """A solver returned a solution it flags as inaccurate (``Status.OPTIMAL_INACCURATE``);
    the layers' ``inaccurate="warn"`` policy (the default) warns with this."""


class GradientHealthWarning(UserWarning):
    """The gradient health check (``FFOLayer(check_every=N)``) measured a cosine similarity
    between the first-order and the exact KKT gradient below ``check_threshold``."""
