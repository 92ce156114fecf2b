"""The outcome of a check: each measured number against its tolerance (:class:`Metric`),
one check's verdict on one instance (:class:`CheckResult`), and the exceptions that end a
check early (:class:`Skip`, :class:`Fail`, :class:`ReferenceUnavailable`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Metric:
    """One measured number against its tolerance (``kind="min"``: a lower bound)."""

    name: str
    value: float | None
    tol: float
    kind: str = "max"
    text: str | None = None

    @property
    def ok(self) -> bool:
        if self.value is None or not math.isfinite(self.value):
            return False
        return self.value <= self.tol if self.kind == "max" else self.value >= self.tol

    @property
    def badness(self) -> float:
        """How close to (or beyond) the tolerance: 1 at the tolerance, larger is worse."""
        if self.value is None or not math.isfinite(self.value):
            return math.inf
        if self.kind == "max":
            return self.value / self.tol if self.tol > 0 else (0.0 if self.value <= 0 else math.inf)
        return (1.0 - self.value) / max(1.0 - self.tol, 1e-300)

    def display(self) -> str:
        if self.text is not None:
            return self.text
        if self.value is None or not math.isfinite(self.value):
            return f"{self.name}={self.value}"
        if self.kind == "min":
            return f"{self.name} {self.value:.6f} (>= {self.tol:g})"
        return f"{self.name} {self.value:.1e} (<= {self.tol:.0e})"

    def to_dict(self) -> dict:
        value: float | str | None = self.value
        if self.value is not None and not math.isfinite(self.value):
            value = str(self.value)  # JSON has no inf/nan
        return {
            "name": self.name,
            "value": value,
            "tol": self.tol,
            "kind": self.kind,
            "ok": self.ok,
            **({"text": self.text} if self.text else {}),
        }


@dataclass
class CheckResult:
    instance: str
    group: str
    check: str
    outcome: str  # "pass", "fail", "error", "skip"
    metrics: list[Metric] = field(default_factory=list)
    reason: str = ""
    profile: str = ""
    seconds: float = 0.0
    #: a gradient failure that the same FFO through the trusted reference solver shares:
    #: an ffo_core limitation on this instance rather than the backend's fault
    engine_limited: bool = False

    @property
    def failed(self) -> bool:
        return self.outcome in ("fail", "error")

    def worst(self) -> Metric | None:
        if not self.metrics:
            return None
        return max(self.metrics, key=lambda m: (not m.ok, m.badness))

    def describe(self) -> str:
        head = f"{self.instance} [{self.check}] {self.outcome.upper()}"
        if self.reason:
            head += f": {self.reason}"
        bad = [m for m in self.metrics if not m.ok]
        shown = bad or self.metrics
        if shown:
            head += "\n    " + "; ".join(m.display() for m in shown[:12])
        return head

    def to_dict(self) -> dict:
        return {
            "instance": self.instance,
            "group": self.group,
            "check": self.check,
            "outcome": self.outcome,
            "profile": self.profile,
            "reason": self.reason,
            "engine_limited": self.engine_limited,
            "seconds": round(self.seconds, 4),
            "metrics": [m.to_dict() for m in self.metrics],
        }


class Skip(Exception):
    """The check does not apply to this backend (reason = the capability that excludes it)."""


class Fail(Exception):
    """The check failed for a reason that is not a number (wrong shape, missing field)."""


class ReferenceUnavailable(Exception):
    """The trusted reference could not be computed for this instance."""
