"""Every tolerance of the conformance suite, in one place.

The report prints this table; change a number here and it changes everywhere (checks, CLI
table, JSON report, pytest plugin).  All measures are *relative* and dimensionless; how each
is computed is documented in :mod:`ffo_conformance.measures`.

Profiles.  Each zoo instance names a tolerance profile:

``well``        well-scaled, strictly complementary instances (margins >= 0.5);
``scaled``      the same constructions with rows and columns scaled by 10^U(-2, 2), so that
                matrix entries span about 1e-4..1e4 (condition numbers ~1e8);
``degenerate``  nearly degenerate instances: weakly active rows (slack 0, multiplier 1e-3)
                and nearly active rows (slack 1e-3, multiplier 0).  Solver error is amplified
                by 1/margin in the active-set-dependent quantities, so these tolerances are
                looser;
``cone``        well-scaled SOC/EXP/PSD instances.  An interior-point solve that stops at
                residual eps leaves the solution ~sqrt(eps) from the curved boundary of the
                cone (1e-5..1e-4 at the usual eps = 1e-8), not ~eps as on polyhedra, so
                distances and the FFO's finite differences are looser;
``cone-scaled`` the scaled SOC/EXP/PSD instances.

A backend is expected to meet them with the settings it is run with; a first-order solver
(OSQP, SCS) usually needs tightened settings, e.g. ``ffo conformance "scs:eps_abs=1e-9"``.
The default, one-sided FFO gradient has an O(delta) truncation error on the quadratic
terms (``dP``, ``dG``, ``dA``) of the Lagrangian gradient, with ``delta ~ sqrt(accuracy)``,
hence its looser tolerance; the central difference is exact for a fixed active set up to
solver accuracy.
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    """Tolerances for one kind of instance."""

    residual: float  # primal / dual / complementarity / cone-membership residual
    distance: float  # distance of (y, nu, lam) to the reference solution
    grad_rel_ffo: float  # per-block relative error of the default FFO gradient vs KKT
    grad_cos_ffo: float  # per-block cosine similarity (lower bound), default FFO
    grad_rel_central: float  # per-block relative error, central FFO (central=True)
    grad_cos_central: float  # per-block cosine similarity (lower bound), central FFO


PROFILES: dict[str, Profile] = {
    "well": Profile(
        residual=1e-6,
        distance=1e-5,
        grad_rel_ffo=2e-2,
        grad_cos_ffo=0.999,
        grad_rel_central=1e-4,
        grad_cos_central=0.99999,
    ),
    "scaled": Profile(
        residual=1e-6,
        distance=1e-4,
        grad_rel_ffo=5e-2,
        grad_cos_ffo=0.998,
        grad_rel_central=1e-3,
        grad_cos_central=0.9999,
    ),
    "degenerate": Profile(
        residual=1e-5,
        distance=1e-3,
        grad_rel_ffo=5e-2,
        grad_cos_ffo=0.998,
        grad_rel_central=1e-2,
        grad_cos_central=0.9995,
    ),
    "cone": Profile(
        residual=1e-6,
        distance=1e-3,
        grad_rel_ffo=5e-2,
        grad_cos_ffo=0.998,
        grad_rel_central=2e-2,
        grad_cos_central=0.9995,
    ),
    "cone-scaled": Profile(
        residual=1e-6,
        distance=1e-3,
        grad_rel_ffo=1e-1,
        grad_cos_ffo=0.995,
        grad_rel_central=5e-2,
        grad_cos_central=0.998,
    ),
}

#: Repeated calls, and concurrent calls from threads, must agree with the first sequential
#: call to this relative difference (a deterministic, re-entrant solver gives 0 exactly).
DETERMINISM = 1e-10

#: Threads used by the concurrency check, and how many times each sample is solved in it.
THREADS = 4
THREAD_REPEATS = 2

#: The concurrency check looks for races, not for non-determinism (the determinism check's
#: business): concurrent results may differ from sequential ones by at most
#: ``max(DETERMINISM, THREAD_SPREAD_FACTOR x`` the difference between two sequential
#: passes``)``.  For a deterministic solver that is DETERMINISM.
THREAD_SPREAD_FACTOR = 10.0

#: Calls per sample in the repeated-calls (determinism) check.
REPEATS = 3

#: A gradient block whose reference norm is below this fraction of the whole reference
#: gradient's norm is measured relative to ``GRAD_BLOCK_FLOOR * ||whole||`` instead of its
#: own norm, and its cosine is not measured (it is numerically zero).
GRAD_BLOCK_FLOOR = 1e-3

#: A failing gradient check is attributed to ffo_core (``FAIL*``, ``engine_limited``)
#: when the same FFO (same step) through the trusted reference solver fails too, and each
#: measure the backend fails is at most this many times as bad as the baseline's same
#: measure (both in units of the tolerance).
ENGINE_ATTRIBUTION_FACTOR = 3.0

#: The trusted reference solve (Clarabel, called directly, not through any adapter) must
#: reach this residual, else the instance is reported as an error rather than judged.
REFERENCE_RESIDUAL = 1e-8

#: Settings of the reference solve (clarabel.DefaultSettings attribute names).
REFERENCE_SETTINGS = {
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
    "max_iter": 500,
    "verbose": False,
}

#: Relative size of the perturbation of ``q`` whose solution seeds the warm-start check.
WARM_START_PERTURBATION = 1e-2

#: Seconds one (instance, check) may take in the worker process before it counts as a hang
#: (``ffo conformance --timeout``).  Clarabel's slowest check takes well under a second.
CASE_TIMEOUT = 60.0


def as_dict() -> dict:
    """Everything above, for the JSON report."""
    return {
        "profiles": {k: asdict(v) for k, v in PROFILES.items()},
        "determinism": DETERMINISM,
        "threads": THREADS,
        "thread_repeats": THREAD_REPEATS,
        "thread_spread_factor": THREAD_SPREAD_FACTOR,
        "repeats": REPEATS,
        "grad_block_floor": GRAD_BLOCK_FLOOR,
        "engine_attribution_factor": ENGINE_ATTRIBUTION_FACTOR,
        "reference_residual": REFERENCE_RESIDUAL,
        "reference_settings": REFERENCE_SETTINGS,
        "warm_start_perturbation": WARM_START_PERTURBATION,
        "case_timeout": CASE_TIMEOUT,
    }


def describe() -> str:
    """The tolerance table as printed in the report."""
    cols = (
        "profile",
        "residual",
        "distance",
        "grad-ffo rel",
        "grad-ffo cos",
        "grad-central rel",
        "grad-central cos",
    )
    rows = [cols] + [
        (
            name,
            f"{p.residual:.0e}",
            f"{p.distance:.0e}",
            f"{p.grad_rel_ffo:.0e}",
            f">= {p.grad_cos_ffo:g}",
            f"{p.grad_rel_central:.0e}",
            f">= {p.grad_cos_central:g}",
        )
        for name, p in PROFILES.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [
        f"repeated calls: relative difference <= {DETERMINISM:.0e} ({REPEATS} calls); "
        f"concurrent calls ({THREADS} threads x {THREAD_REPEATS} repeats) vs "
        f"sequential: <= max({DETERMINISM:.0e}, {THREAD_SPREAD_FACTOR:g} x the "
        "sequential repeat spread)",
        f"gradient blocks: norms below {GRAD_BLOCK_FLOOR:.0e} x ||whole gradient|| "
        "are measured against that floor, cosine not measured",
        f"reference: Clarabel at tol 1e-12, must reach residual <= "
        f"{REFERENCE_RESIDUAL:.0e}; gradients by KKT implicit differentiation",
    ]
    lines += [textwrap.fill(note, 100, subsequent_indent="  ") for note in notes]
    return "\n".join(lines)
