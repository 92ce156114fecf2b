"""Run the zoo through a backend and report: the :class:`Suite` and its :class:`Report`."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from ffo_core.registry import available_backends, get_backend

from . import tolerances as T
from .checks import APPLICABLE, CHECKS, CheckResult, InstanceRun, run_check
from .reference import ReferenceSolver
from .zoo import Instance, build_zoo, select


def parse_list(text: str | None) -> list[str] | None:
    """``"lp,qp"`` -> ``["lp", "qp"]``; None or empty -> None."""
    if not text:
        return None
    return [t.strip() for t in text.split(",") if t.strip()] or None


class Suite:
    """The conformance suite for one backend.

    ``backend`` is a config string (``"osqp:eps_abs=1e-9"``) or a backend instance.
    ``classes`` restricts the zoo (a class ``"qp"``, a variant ``"scaled"``, a group
    ``"qp/scaled"`` or an instance name); ``checks`` restricts the checks.
    """

    def __init__(
        self,
        backend,
        *,
        classes=None,
        checks=None,
        seed: int = 0,
        reference: ReferenceSolver | None = None,
    ) -> None:
        self.spec = backend if isinstance(backend, str) else getattr(backend, "name", "?")
        self.backend = get_backend(backend)
        self.reference = reference or ReferenceSolver()
        self.seed = seed
        self.classes = list(classes) if classes else None
        self.instances: list[Instance] = select(build_zoo(seed), classes)
        if checks:
            unknown = set(checks) - set(CHECKS)
            if unknown:
                raise ValueError(
                    f"unknown check(s) {', '.join(sorted(unknown))}; checks: {', '.join(CHECKS)}"
                )
        self.checks = [c for c in CHECKS if not checks or c in checks]
        self._runs: dict[str, InstanceRun] = {}
        self.results: list[CheckResult] = []

    def cases(self) -> list[tuple[Instance, str]]:
        """Every applicable (instance, check) pair, in report order."""
        return [
            (inst, check)
            for inst in self.instances
            for check in self.checks
            if check in APPLICABLE[inst.kind]
        ]

    def run_case(self, inst: Instance, check: str) -> CheckResult:
        run = self._runs.get(inst.name)
        if run is None:
            run = self._runs[inst.name] = InstanceRun(inst, self.backend, self.reference)
        result = run_check(run, check)
        self.results.append(result)
        return result

    def run(self, progress: bool = False) -> Report:
        start = time.perf_counter()
        cases = self.cases()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(cases), desc=f"conformance {self.backend.name}", unit="check", leave=False
            )
        for inst, check in cases:
            if bar is not None:
                bar.set_postfix_str(f"{inst.name} {check}", refresh=False)
            self.run_case(inst, check)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        return self.report(time.perf_counter() - start)

    def report(self, seconds: float | None = None) -> Report:
        name = getattr(self.backend, "name", "?")
        version = None
        info = available_backends().get(name)
        if info is not None and info.version:
            version = info.version
        return Report(
            spec=self.spec,
            backend=name,
            version=version,
            capabilities=self.backend.capabilities,
            reference=self.reference.describe(),
            seed=self.seed,
            classes=self.classes,
            checks=list(self.checks),
            groups=list(dict.fromkeys(i.group for i in self.instances)),
            instances=len(self.instances),
            results=list(self.results),
            seconds=seconds or 0.0,
        )


def _caps_dict(caps) -> dict:
    return {
        "cones": sorted(caps.cones),
        "quadratic_objective": caps.quadratic_objective,
        "warm_start": caps.warm_start,
        "thread_safe": getattr(caps, "thread_safe", None),
        "needs_license": caps.needs_license,
        "max_variables": caps.max_variables,
        "max_constraints": caps.max_constraints,
    }


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
    capabilities: object
    reference: str
    seed: int
    classes: list[str] | None
    checks: list[str]
    groups: list[str]
    instances: int
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    @property
    def passed(self) -> bool:
        """No failure and no error, and at least one check actually passed."""
        return self.count("pass") > 0 and not any(r.failed for r in self.results)

    def table(self) -> str:
        by = {}
        for r in self.results:
            by.setdefault((r.group, r.check), []).append(r)
        header = ["group"] + self.checks
        rows = []
        for group in self.groups:
            row = [group]
            for check in self.checks:
                word, measured = _cell(by.get((group, check), []))
                row.append(f"{word} {measured}".strip())
            rows.append(row)
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)

    def text(self) -> str:
        caps = self.capabilities
        cones = ",".join(c for c in ("zero", "nonneg", "soc", "exp", "psd") if c in caps.cones)
        out = [
            f"ffo conformance: backend {self.spec!r} ({self.backend}"
            f"{' ' + self.version if self.version else ''}); cones {cones}; quadratic "
            f"{'yes' if caps.quadratic_objective else 'no'}; warm start "
            f"{'yes' if caps.warm_start else 'no'}; thread safe "
            f"{'yes' if getattr(caps, 'thread_safe', False) else 'no'}",
            f"reference: {self.reference}; seed {self.seed}; {self.instances} instances"
            + (f" (classes {','.join(self.classes)})" if self.classes else ""),
            "",
            self.table(),
            "",
            "cells: outcome, then the worst measure over the group's instances as "
            "measured/tolerance (a/b) or measured>=bound; '·' not applicable; FAIL*: "
            "the same FFO through the trusted reference solver fails too (an ffo_core "
            "limitation, not this backend's fault; still a failure)",
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
                out.append(
                    f"  {reason}\n    instances: {', '.join(names)}\n"
                    f"    checks: {', '.join(checks)}"
                )
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
            "tolerances": T.as_dict(),
            "results": [r.to_dict() for r in self.results],
        }

    def write_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, default=str)
            fh.write("\n")


def run_suite(
    backend, *, classes=None, checks=None, seed: int = 0, progress: bool = False
) -> Report:
    """Run the conformance suite on ``backend`` (config string or instance)."""
    return Suite(backend, classes=classes, checks=checks, seed=seed).run(progress=progress)
