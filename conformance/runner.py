"""Run the zoo through a backend: the :class:`Suite` and :func:`run_suite`.

Size: one class, :class:`Suite`, whose methods share its state (the backend, the reference,
the worker process, the results): which cases run, in the worker or in-process, and what a
hang or a crash becomes.  The :class:`~ffo_conformance.report.Report` it returns is
:mod:`ffo_conformance.report`'s.
"""

from __future__ import annotations

import pickle
import sys
import time

from ffo_core.config import SolverConfig, parse_config
from ffo_core.errors import ConfigError
from ffo_core.registry import available_backends, get_backend

from . import tolerances as T
from .checks import CHECKS, applies, run_check
from .instance import InstanceRun
from .isolation import (
    MAX_CRASHES,
    MAX_TIMEOUTS,
    STARTUP_TIMEOUT,
    Worker,
    WorkerDied,
    WorkerTimeout,
)
from .reference import ReferenceSolver
from .report import Report
from .results import CheckResult
from .zoo import Instance, build_zoo, select


def parse_list(text: str | None) -> list[str] | None:
    """``"lp,qp"`` -> ``["lp", "qp"]``; None or empty -> None."""
    if not text:
        return None
    return [t.strip() for t in text.split(",") if t.strip()] or None


def spec_string(config: SolverConfig) -> str:
    """A config string that parses back to ``config``."""
    parts = [str(a) for a in config.args] + [f"{k}={v}" for k, v in config.settings.items()]
    return config.name + (":" + ",".join(parts) if parts else "")


def trial_solve(spec: str) -> str | None:
    """Build the backend of ``spec`` and solve one small LP; None if that works, else what
    went wrong (the constructor's or the solve's exception).  Statuses are not judged."""
    import numpy as np

    from .zoo import constructed

    try:
        backend = get_backend(spec)
        smp = constructed(np.random.default_rng(1), n=2, p=0, nonneg="AAI", objective="linear")
        if "nonneg" not in backend.capabilities.cones:
            return None
        backend.solve(smp.g, smp.h, smp.e)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class Suite:
    """The conformance suite for one backend.

    ``backend`` is a config string (``"osqp:eps_abs=1e-9"``) or a backend instance.
    ``classes`` restricts the zoo (a class ``"qp"``, a variant ``"scaled"``, a group
    ``"qp/scaled"``, the tag ``"linear"`` or an instance name); ``checks`` restricts the
    checks.  ``isolate`` (default True) runs the checks in a worker process, each under
    ``timeout`` seconds (:mod:`ffo_conformance.isolation`); a backend that cannot be sent to
    a worker runs in-process, and :attr:`isolation` says why.  Call :meth:`close` (or use
    the suite as a context manager) when done calling :meth:`run_case` yourself;
    :meth:`run` closes the worker when it finishes.
    """

    def __init__(
        self,
        backend,
        *,
        classes=None,
        checks=None,
        seed: int = 0,
        reference: ReferenceSolver | None = None,
        isolate: bool = True,
        timeout: float = T.CASE_TIMEOUT,
    ) -> None:
        self.spec = backend if isinstance(backend, str) else getattr(backend, "name", "?")
        self._given = backend
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
        self.timeout = float(timeout)
        self._runs: dict[str, InstanceRun] = {}
        self.results: list[CheckResult] = []
        self._worker: Worker | None = None
        self._setup: dict | None = None
        self._hung: dict[str, str] = {}  # group -> the case that timed out
        self._timeouts = 0
        self._crashes = 0
        self._unstartable: str | None = None
        self.isolation = "off (isolate=False)"
        if isolate:
            self._setup, why = self._worker_setup()
            self.isolation = (
                f"a worker process, {self.timeout:g} s per check"
                if self._setup is not None
                else f"off ({why})"
            )

    # -- isolation -------------------------------------------------------------------------
    def _worker_setup(self) -> tuple[dict | None, str]:
        """What a worker rebuilds the backend from, or ``(None, why not)``."""
        setup = {
            "seed": self.seed,
            "reference": pickle.dumps(self.reference),
            "sys_path": list(sys.path),
            "spec": self.spec if isinstance(self._given, str) else None,
            "factory": None,
            "instance": None,
        }
        try:
            if isinstance(self._given, str):
                name = parse_config(self._given).name
                info = available_backends().get(name)
                if info is not None and info.plugin == "<runtime>":
                    setup["factory"] = pickle.dumps(type(self.backend))
            else:
                setup["instance"] = pickle.dumps(self._given)
        except Exception as exc:
            return None, (
                f"the backend cannot be sent to a worker process ({type(exc).__name__}: "
                f"{exc}); a hang or crash would stop the run"
            )
        return setup, ""

    def _start_worker(self) -> Worker | None:
        """The worker (started if need be); None when there is none.  A worker whose set-up
        raised (it could not import or unpickle the backend) turns isolation off: the checks
        run in-process.  One that hung or died while making the backend leaves every
        remaining check an ERROR saying so (in-process it would hang or crash the run)."""
        if self._worker is None and self._setup is not None and self._unstartable is None:
            try:
                self._worker = Worker(self._setup)
            except WorkerTimeout:
                self._unstartable = (
                    f"the worker process was not ready after {STARTUP_TIMEOUT:g} s (importing "
                    "or making the backend hung)"
                )
            except WorkerDied as exc:
                self._unstartable = f"the worker process died while making the backend: {exc}"
            except RuntimeError as exc:
                self._setup = None
                self.isolation = (
                    f"off (a worker process could not rebuild the backend: {exc}); a hang "
                    "or crash would stop the run"
                )
        return self._worker

    def close(self) -> None:
        """Stop the worker process (a later :meth:`run_case` starts a new one)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __enter__(self) -> Suite:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- configuration check -----------------------------------------------------------
    def _trial(self, spec: str) -> str | None:
        worker = self._start_worker()
        if worker is None:
            return None if self._unstartable else trial_solve(spec)
        try:
            return worker.call(("trial", spec), self.timeout)
        except WorkerTimeout:
            self._worker = None
            return None  # a hang is the suite's to report, not a settings problem
        except (WorkerDied, RuntimeError):
            self._worker = None
            return None

    def validate(self) -> None:
        """Raise :class:`~ffo_core.errors.ConfigError` naming the setting when the config
        string's settings make the backend fail one small solve that it passes without
        them (a value of the wrong type or out of range that its constructor let
        through).  Nothing to do for a backend instance or a config without settings."""
        if not isinstance(self._given, str):
            return
        config = parse_config(self._given)
        if not config.settings:
            return
        problem = self._trial(self._given)
        if problem is None:
            return
        bare = SolverConfig(config.name, config.args, {})
        if self._trial(spec_string(bare)) is not None:
            return  # broken without the settings too: the checks will say how
        for key, value in config.settings.items():
            alone = SolverConfig(config.name, config.args, {key: value})
            failure = self._trial(spec_string(alone))
            if failure is not None:
                raise ConfigError(
                    f"setting {key}={value!r} (parsed as {type(value).__name__}) is not "
                    f"usable by backend {config.name!r}: a trial solve with it raised "
                    f"{_shorten(failure)}"
                )
        raise ConfigError(
            f"the settings of {self._given!r} make backend {config.name!r} fail a trial "
            f"solve that it passes without them: {_shorten(problem)}"
        )

    # -- running -----------------------------------------------------------------------
    def cases(self) -> list[tuple[Instance, str]]:
        """Every applicable (instance, check) pair, in report order."""
        return [
            (inst, check)
            for inst in self.instances
            for check in self.checks
            if applies(inst, check)
        ]

    def _not_run(self, inst: Instance, check: str, reason: str) -> CheckResult:
        return CheckResult(
            inst.name, inst.group, check, "error", reason=reason, profile=inst.profile
        )

    def _refused(self, inst: Instance, check: str) -> CheckResult | None:
        """The ERROR of a case not run because of earlier hangs or crashes, or None."""
        if self._unstartable is not None:
            return self._not_run(inst, check, f"not run: {self._unstartable}")
        if inst.group in self._hung:
            return self._not_run(
                inst,
                check,
                f"not run: group {inst.group} hung in {self._hung[inst.group]} (its "
                "other checks would likely hang too)",
            )
        if self._timeouts >= MAX_TIMEOUTS:
            return self._not_run(
                inst, check, f"not run: the backend hung {self._timeouts} times in this run"
            )
        if self._crashes >= MAX_CRASHES:
            return self._not_run(
                inst,
                check,
                f"not run: the backend crashed the worker process {self._crashes} times",
            )
        return None

    def _isolated(self, inst: Instance, check: str) -> CheckResult | None:
        """The case run by the worker, or None when there is no worker to run it."""
        refused = self._refused(inst, check)
        if refused is not None:
            return refused
        worker = self._start_worker()
        if worker is None:
            return None
        try:
            worker.send(("cases", [(inst.name, check)]))
        except WorkerDied:
            return self._lost(worker, inst, check, 0.0, died=True)
        return self._receive(worker, inst, check)

    def _receive(self, worker: Worker, inst: Instance, check: str) -> CheckResult:
        """The worker's answer for this case (sent already), or the ERROR that replaces it."""
        start = time.perf_counter()
        try:
            return worker.receive(self.timeout)
        except WorkerTimeout:
            return self._lost(worker, inst, check, time.perf_counter() - start, died=False)
        except WorkerDied:
            return self._lost(worker, inst, check, time.perf_counter() - start, died=True)
        except RuntimeError as exc:  # the worker could not run the case at all
            result = self._not_run(inst, check, f"worker: {exc}")
            result.seconds = time.perf_counter() - start
            return result

    def _lost(self, worker: Worker, inst, check, seconds: float, died: bool) -> CheckResult:
        """The ERROR of a case whose worker hung (killed now) or died."""
        if not died:
            self._worker = None
            self._timeouts += 1
            self._hung[inst.group] = f"{inst.name} [{check}]"
            result = self._not_run(
                inst,
                check,
                f"timed out after {self.timeout:g} s in group {inst.group}: the backend "
                "hung (or is far too slow); the worker process was killed and the rest of "
                "the group is not run",
            )
        else:
            self._worker = None
            self._crashes += 1
            tail = worker.stderr_tail()
            worker.kill()
            result = self._not_run(
                inst,
                check,
                f"the backend crashed the worker process ({worker.exit_text}) in group "
                f"{inst.group}" + (f"; end of its stderr:\n{_indent(tail)}" if tail else ""),
            )
        result.seconds = seconds
        return result

    def _in_process(self, inst: Instance, check: str) -> CheckResult:
        run = self._runs.get(inst.name)
        if run is None:
            run = self._runs[inst.name] = InstanceRun(inst, self.backend, self.reference, self.spec)
        return run_check(run, check)

    def _stream(self, pending: list, done) -> list:
        """Send the pending cases to the worker in one request and take its answers as they
        come, each under the timeout; returns the cases still to run (after a hang or a
        crash: those, for a fresh worker; ``[]`` when all are done).  Cases refused because
        of earlier hangs or crashes are reported in their place without being sent."""
        sent = [c for c in pending if self._refused(*c) is None]
        worker = self._start_worker() if sent else None
        if sent and worker is None:
            if self._unstartable is None:
                return pending  # no worker after all: in-process
            sent = []  # every case is refused now
        if sent:
            try:
                worker.send(("cases", [(inst.name, check) for inst, check in sent]))
            except WorkerDied:
                pass  # reported by the first receive
        for k, (inst, check) in enumerate(pending):
            refused = self._refused(inst, check)
            if refused is not None:
                done(inst, check, refused)
                continue
            done(inst, check, self._receive(worker, inst, check))
            if self._worker is not worker:  # it hung or died: a fresh one for the rest
                return pending[k + 1 :]
        return []

    def run_case(self, inst: Instance, check: str) -> CheckResult:
        """Run one (instance, check) -- in the worker process unless isolation is off."""
        result = self._isolated(inst, check) if self._setup is not None else None
        if result is None:
            result = self._in_process(inst, check)
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

        def done(inst, check, result) -> None:
            self.results.append(result)
            if bar is not None:
                bar.set_postfix_str(f"{inst.name} {check}", refresh=False)
                bar.update()

        try:
            pending = list(cases)
            while pending and self._setup is not None:
                pending = self._stream(pending, done)
            for inst, check in pending:  # in-process (no worker)
                done(inst, check, self._in_process(inst, check))
        finally:
            if bar is not None:
                bar.close()
            self.close()
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
            isolation=self.isolation,
            has_solve_batch=hasattr(self.backend, "solve_batch"),
        )


def _shorten(text: str, limit: int = 400) -> str:
    """One line of at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def run_suite(
    backend,
    *,
    classes=None,
    checks=None,
    seed: int = 0,
    progress: bool = False,
    isolate: bool = True,
    timeout: float = T.CASE_TIMEOUT,
) -> Report:
    """Run the conformance suite on ``backend`` (config string or instance)."""
    suite = Suite(
        backend, classes=classes, checks=checks, seed=seed, isolate=isolate, timeout=timeout
    )
    return suite.run(progress=progress)
