"""The report of a suite run (:class:`Report`): the group x check table, the text the CLI
prints (capabilities, table, tolerances, failures, skips, verdict) and the JSON report."""

from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass, field

from ffo_core.protocol import Capabilities

from . import tolerances as T
from .results import CheckResult


def _caps_dict(caps) -> dict:
    return {
        "cones": sorted(caps.cones),
        "quadratic_objective": caps.quadratic_objective,
        "warm_start": caps.warm_start,
        "thread_safe": getattr(caps, "thread_safe", None),
        "needs_license": caps.needs_license,
        "max_variables": caps.max_variables,
        "max_constraints": caps.max_constraints,
        "device": getattr(caps, "device", False),
    }


#: Widest line of the report's tables and text (characters).
TABLE_WIDTH = 100


def _cell(results: list[CheckResult]) -> tuple[str, str]:
    """(outcome word, measured/tolerance) of one group x check cell."""
    if not results:
        return "·", ""
    outcomes = {r.outcome for r in results}
    if "error" in outcomes:
        word = "ERROR"
    elif "fail" in outcomes:
        word = "FAIL"
        if all(r.engine_limited for r in results if r.outcome == "fail"):
            word = "FAIL*"
    elif "pass" in outcomes:
        word = "pass"
    else:
        return "skip", ""
    judged = [r for r in results if r.outcome == ("pass" if word == "pass" else "fail")]
    metrics = [m for r in judged for m in r.metrics if m.text is None]
    if not metrics:
        return word, ""
    worst = max(metrics, key=lambda m: (not m.ok, m.badness))
    if worst.value is None or not math.isfinite(worst.value):
        return word, f"{worst.name}={worst.value}"
    if worst.kind == "min":
        return word, f"{worst.value:.5f}>={worst.tol:g}"
    return word, f"{worst.value:.1e}/{worst.tol:.0e}"


@dataclass
class Report:
    spec: str
    backend: str
    version: str | None
    capabilities: Capabilities
    reference: str
    seed: int
    classes: list[str] | None
    checks: list[str]
    groups: list[str]
    instances: int
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    isolation: str = ""
    has_solve_batch: bool = False

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    @property
    def passed(self) -> bool:
        """No failure and no error, and at least one check actually passed."""
        return self.count("pass") > 0 and not any(r.failed for r in self.results)

    def table(self) -> str:
        by: dict[tuple[str, str], list[CheckResult]] = {}
        for r in self.results:
            by.setdefault((r.group, r.check), []).append(r)
        cells = {
            (group, check): " ".join(_cell(by.get((group, check), []))).strip()
            for group in self.groups
            for check in self.checks
        }
        group_width = max([len("group")] + [len(g) for g in self.groups])
        width_of = {
            check: max([len(check)] + [len(cells[(g, check)]) for g in self.groups])
            for check in self.checks
        }
        # the checks in blocks of at most TABLE_WIDTH characters, each a table of its own
        blocks: list[list[str]] = [[]]
        used = group_width
        for check in self.checks:
            if blocks[-1] and used + 2 + width_of[check] > TABLE_WIDTH:
                blocks.append([])
                used = group_width
            blocks[-1].append(check)
            used += 2 + width_of[check]
        out = []
        for block in blocks:
            widths = [group_width] + [width_of[c] for c in block]
            rows = [["group", *block]] + [[g, *(cells[(g, c)] for c in block)] for g in self.groups]
            lines = ["  ".join(c.ljust(w) for c, w in zip(rows[0], widths)).rstrip(),
                     "  ".join("-" * w for w in widths)]  # fmt: skip
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows[1:]]
            out.append("\n".join(lines))
        return "\n\n".join(out)

    def text(self) -> str:
        caps = self.capabilities
        cones = ",".join(c for c in ("zero", "nonneg", "soc", "exp", "psd") if c in caps.cones)
        out = [
            f"ffo conformance: backend {self.spec!r} ({self.backend}"
            f"{' ' + self.version if self.version else ''})",
            f"capabilities: cones {cones}; quadratic "
            f"{'yes' if caps.quadratic_objective else 'no'};\n  warm start "
            f"{'yes' if caps.warm_start else 'no'}; thread safe "
            f"{'yes' if getattr(caps, 'thread_safe', False) else 'no'}; solve_batch "
            f"{'yes' if self.has_solve_batch else 'no'}",
            f"reference: {self.reference}; seed {self.seed}; {self.instances} instances"
            + (f" (classes {','.join(self.classes)})" if self.classes else ""),
            f"isolation: {self.isolation}",
            "",
            self.table(),
            "",
            textwrap.fill(
                "cells: outcome, then the worst measure over the group's instances as "
                "measured/tolerance (a/b) or measured>=bound; '·' not applicable; FAIL*: "
                "the same FFO through the trusted reference solver fails too (an ffo_core "
                "limitation, not this backend's fault; still a failure)",
                TABLE_WIDTH,
            ),
            "",
            "tolerances (conformance/tolerances.py):",
            T.describe(),
        ]
        bad = [r for r in self.results if r.failed]
        if bad:
            out += ["", f"failures and errors ({len(bad)}):"]
            out += ["  " + r.describe() for r in bad]
        skipped: dict[str, list[str]] = {}
        for r in self.results:
            if r.outcome == "skip":
                skipped.setdefault(r.reason, []).append(f"{r.instance}:{r.check}")
        if skipped:
            out += ["", f"skipped ({self.count('skip')}):"]
            for reason, where in skipped.items():
                names = sorted({w.split(":")[0] for w in where})
                checks = sorted({w.split(":")[1] for w in where})
                out += [
                    textwrap.fill(reason, TABLE_WIDTH, initial_indent="  ",
                                  subsequent_indent="    "),
                    textwrap.fill(", ".join(names), TABLE_WIDTH, initial_indent="    instances: ",
                                  subsequent_indent="      "),
                    textwrap.fill(", ".join(checks), TABLE_WIDTH, initial_indent="    checks: ",
                                  subsequent_indent="      "),
                ]  # fmt: skip
        verdict = "PASS" if self.passed else "FAIL"
        if not self.count("pass") and not bad:
            verdict += " (no check ran: everything was skipped)"
        engine = sum(r.engine_limited for r in bad)
        if engine:
            verdict += (
                f" ({engine} of the failures engine-side, FAIL*; {len(bad) - engine} backend-side)"
            )
        out += [
            "",
            f"{len(self.results)} checks: {self.count('pass')} passed, "
            f"{self.count('fail')} failed, {self.count('error')} errors, "
            f"{self.count('skip')} skipped in {self.seconds:.1f} s -> {verdict}",
        ]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {
            "backend": self.spec,
            "name": self.backend,
            "version": self.version,
            "capabilities": _caps_dict(self.capabilities),
            "reference": self.reference,
            "seed": self.seed,
            "classes": self.classes,
            "checks": self.checks,
            "instances": self.instances,
            "passed": self.passed,
            "summary": {
                **{k: self.count(k) for k in ("pass", "fail", "error", "skip")},
                "engine_limited": sum(r.engine_limited for r in self.results),
            },
            "seconds": round(self.seconds, 3),
            "isolation": self.isolation,
            "tolerances": T.as_dict(),
            "results": [r.to_dict() for r in self.results],
        }

    def write_json(self, path: str) -> None:
        """Write :meth:`to_dict` to ``path`` (its folder is created if missing)."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, default=str)
            fh.write("\n")
