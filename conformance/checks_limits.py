"""The ``status`` check of a ``limit`` instance: under a tiny iteration or time limit (set
with the backend's ``with_settings``, else through its config string) the backend must
report the limit, or return a point that really is the optimum."""

from __future__ import annotations

from ffo_core.config import SolverConfig, parse_config
from ffo_core.errors import ConfigError
from ffo_core.registry import get_backend

from .guard import GuardedBackend
from .instance import InstanceRun
from .measures import check_shapes, distances, residuals, status_word
from .results import Fail, Metric, Skip
from .zoo import EXPECT_LIMIT, ITERATION_LIMIT, TIME_LIMIT

#: Setting names the ``limit`` instances look for (in ``setting_names()`` where the backend
#: lists its settings, else tried in turn): the iteration limits of Clarabel, OSQP, SCS, ECOS,
#: GUROBI, MOSEK and common spellings.  A backend may name its own with a class attribute
#: ``iteration_limit_setting`` (a string or a tuple of strings).  Time limits use the
#: protocol's generic ``time_limit`` (seconds), through ``with_settings``.
ITERATION_LIMIT_NAMES = (
    "max_iter",
    "max_iters",
    "maxiter",
    "max_iterations",
    "iteration_limit",
    "IterationLimit",
    "BarIterLimit",
    "MSK_IPAR_INTPNT_MAX_ITERATIONS",
    "MSK_IPAR_SIM_MAX_ITERATIONS",
)


def configure(run: InstanceRun, **settings):
    """The run's backend with ``settings`` added: its ``with_settings`` copy, else the
    backend its config string gives with the settings appended; guarded like the original.
    Raises :class:`Skip` when neither is possible or the backend refuses the settings."""
    what = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    backend = run.backend
    copy_ = getattr(backend, "with_settings", None)
    try:
        if copy_ is not None:
            return copy_(**settings)
        if isinstance(run.spec, str):
            cfg = parse_config(run.spec)
            made = get_backend(SolverConfig(cfg.name, cfg.args, {**cfg.settings, **settings}))
            return GuardedBackend(made, backend.violations)
    except (ConfigError, TypeError) as exc:
        raise Skip(f"the backend does not take {what}: {exc}") from exc
    raise Skip(
        f"cannot set {what}: the backend has no with_settings(**settings) and was not "
        "given as a config string"
    )


def iteration_limit_setting(run: InstanceRun) -> str:
    """The name of the backend's iteration limit (see :data:`ITERATION_LIMIT_NAMES`)."""
    inner = run.backend.inner
    hint = getattr(inner, "iteration_limit_setting", None)
    if isinstance(hint, str):
        return hint
    if isinstance(hint, (tuple, list)) and hint:
        return hint[0]
    lister = getattr(inner, "setting_names", None)
    if lister is not None:
        try:
            names = {str(n) for n in lister()}
        except Exception:
            names = set()
        if names:
            lower = {n.lower(): n for n in names}
            for want in ITERATION_LIMIT_NAMES:
                if want in names:
                    return want
                if want.lower() in lower:
                    return lower[want.lower()]
            raise Skip(
                "none of the backend's setting_names() is a known iteration limit "
                f"({', '.join(ITERATION_LIMIT_NAMES)}); name yours with the class attribute "
                "iteration_limit_setting"
            )
    for want in ITERATION_LIMIT_NAMES:  # no list of names: the first one accepted
        try:
            configure(run, **{want: ITERATION_LIMIT})
        except Skip:
            continue
        return want
    raise Skip(
        "the backend accepts none of the known iteration-limit settings "
        f"({', '.join(ITERATION_LIMIT_NAMES)}); name yours with the class attribute "
        "iteration_limit_setting"
    )


def limited_backend(run: InstanceRun):
    """``(backend, what)``: the run's backend under the instance's iteration or time limit."""
    if run.inst.limit == "time":
        return configure(run, time_limit=TIME_LIMIT), f"time_limit={TIME_LIMIT:g} s"
    name = iteration_limit_setting(run)
    settings = {name: ITERATION_LIMIT}
    extra = getattr(run.backend.inner, "iteration_limit_setting", None)
    if isinstance(extra, (tuple, list)):
        settings = {n: ITERATION_LIMIT for n in extra}
    elif name in ("IterationLimit", "BarIterLimit"):  # GUROBI: simplex and barrier
        settings = {"IterationLimit": ITERATION_LIMIT, "BarIterLimit": ITERATION_LIMIT}
    return configure(run, **settings), ", ".join(f"{k}={v}" for k, v in settings.items())


def check_limit(run: InstanceRun):
    """A ``limit`` instance: solved under a tiny iteration or time limit, the backend must
    report the limit (``ITERATION_LIMIT``/``TIME_LIMIT``), or return a point that really is
    the optimum (a solver may finish within the limit).  An "optimal" answer that is not
    the optimum is how a limit mapped to ``OPTIMAL`` shows; any other status would blame
    the user's problem for the solver's stop."""
    backend, what = limited_backend(run)
    tol = run.profile
    words, bad, notes = [], 0, []
    for i, (smp, clean) in enumerate(zip(run.inst.samples, run.pristine)):
        sol = backend.solve(smp.g, smp.h, smp.e)
        words.append(status_word(sol))
        if sol.status in EXPECT_LIMIT:
            continue
        if sol.status.has_solution:
            try:
                check_shapes(clean, sol)
                ref = run.ref_solutions()[i]
                measures = {**residuals(clean, sol), **distances(sol, ref)}
            except Fail as exc:
                bad += 1
                notes.append(f"sample {i}: {exc}")
                continue
            over = {
                k: v / (tol.distance if k.startswith("dist") else tol.residual)
                for k, v in measures.items()
            }
            if all(x <= 1 for x in over.values()):
                notes.append(f"sample {i}: finished within the limit (point verified)")
                continue
            worst = max(over, key=over.get)
            limit = tol.distance if worst.startswith("dist") else tol.residual
            bad += 1
            notes.append(
                f"sample {i}: reported {status_word(sol)} after a stop forced by {what}, "
                f"but the point is not the optimum ({worst} {measures[worst]:.1e} > "
                f"{limit:.0e}): a limit stop reported as an optimum"
            )
            continue
        bad += 1
        notes.append(
            f"sample {i}: reported {status_word(sol)} for a stop forced by {what} on a "
            "problem with an optimum (map the solver's limit status to ITERATION_LIMIT or "
            "TIME_LIMIT)"
        )
    want = "/".join(sorted(x.value for x in EXPECT_LIMIT))
    metric = Metric(
        "status",
        float(bad),
        0.0,
        text=f"{', '.join(sorted(set(words)))} under {what} (want {want}, or the verified optimum)",
    )
    return [metric], "; ".join(notes)
