"""The exceptions of ``executor="ray"``: the public :class:`RayWorkerError` (a solve the
cluster could not finish), the remote traceback attached as an exception's ``__cause__``, and
the private signal that a caller thread's batch was cancelled."""

from __future__ import annotations

from ...errors import FFOError


class RayWorkerError(FFOError):
    """A solve could not be completed on the Ray cluster: its worker was lost on every
    try (killed, crashed, out of memory, node gone), or no worker could start.

    Attributes:
        batch_index: the sample whose solve failed (None outside a batch).
        phase: ``"forward"`` or ``"backward"`` (None outside a batch).
    """

    def __init__(self, message: str, *, batch_index=None, phase=None):
        super().__init__(message)
        self.batch_index = batch_index
        self.phase = phase


class _RemoteTraceback(Exception):
    """The traceback of an exception raised on a Ray worker (set as its ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n--- on the Ray worker ---\n{self.tb}"


class _Cancelled(BaseException):
    """This thread's batch was cancelled (the caller raises the original exception)."""
