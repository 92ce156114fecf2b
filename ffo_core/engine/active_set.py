"""Which inequality rows and cone blocks are active at a solution.

An interior-point or first-order solver returns ``s`` and ``lam`` that are complementary only
up to its accuracy: for a nonnegative row, ``s_i * lam_i ~ mu`` where ``mu`` is what the solver
left of the duality gap.  So the zero member of the pair is not 0 but of size about
``sqrt(mu)`` when the pair is undecided, much smaller when it is clear.  We therefore measure
``s`` and ``lam`` in units of thresholds tied to the solver's reported accuracy ``acc``:

    tau_s   = sqrt(acc) * max(1, ||s||_inf)      (a slack this small is numerically zero)
    tau_lam = sqrt(acc) * max(1, ||lam||_inf)    (a multiplier this small is numerically zero)

and call a nonnegative row *active* when ``s_i / tau_s < lam_i / tau_lam`` (its slack is the
smaller of the two in those units), and *weakly active* when both are below their thresholds
(degenerate: either choice is a valid one-sided derivative; we report these rows).  With a
1e-5-accurate solver the thresholds grow to ~3e-3 and a slack of 1e-6 still counts as zero,
where a fixed 1e-8 cut-off would call the row inactive.

A cone block (SOC, EXP, PSD) is *active* when its multiplier is numerically nonzero,
``||lam_k|| > tau_lam``, and is then kept as a cone in the ghost problem.  When the
multiplier is numerically zero the block is *inactive* and dropped if its slack is strictly
inside the cone, ``margin(s_k) > tau_s`` (:func:`ffo_core.engine.kkt_cones.interior_margin`:
``t - ||x||`` for SOC, the smallest eigenvalue for PSD, ``min(y, z - y e^(x/y))`` for EXP);
if the slack is (numerically) on the boundary as well -- a block at the apex with a zero
multiplier, an EXP slack on the boundary ray ``y = 0``, a PSD slack that is singular -- the
block is *weakly active*: it is kept as a cone (harmless if it stays inactive, and it stops
the ghost's solution from leaving the cone if it does not) and reported in ``weak_blocks``.
A kept block adds no equality to the ghost, so keeping too many blocks cannot make the
ghost infeasible; it only costs solver time.

Both thresholds can be given explicitly (``tau_s``, ``tau_lam``) to override the defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..protocol import ConeDims, Solution
from .kkt_cones import interior_margin
from .scaling import in_units

#: A complementary pair counts as unsettled (:attr:`ActiveSet.ambiguous`) when both its
#: members exceed this fraction of their thresholds.
UNSETTLED = 1e-2

#: Accuracy assumed when a solver reports none.
DEFAULT_ACCURACY = 1e-8


@dataclass
class ActiveSet:
    """Classification of the rows of ``G`` (length ``m`` boolean masks; read-only: the
    samples of one :func:`classify_batch` call share the arrays, each mask a row view)."""

    locked: np.ndarray  # nonnegative rows that become equalities in the ghost problem
    kept: np.ndarray  # rows of active (or weakly active) SOC/EXP/PSD blocks, kept as cones
    weak: np.ndarray  # nonnegative rows with both s and lam numerically zero
    kept_dims: ConeDims  # cone sizes of the kept blocks (nonneg=0)
    tau_s: float
    tau_lam: float
    #: rows of cone blocks kept although weakly active (multiplier and distance to the
    #: boundary both numerically zero); a subset of ``kept``
    weak_blocks: np.ndarray | None = None
    #: nonnegative rows whose slack and multiplier are *both* above
    #: :data:`UNSETTLED` times their thresholds: the solver left the pair undecided (a row
    #: near a kink) or the point far from its exact value there (a leftover multiplier on
    #: a row with slack moves ``y``); :mod:`.polish` settles them
    ambiguous: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.weak_blocks is None:
            self.weak_blocks = np.zeros_like(self.kept)
        if self.ambiguous is None:
            self.ambiguous = np.zeros_like(self.kept)

    @property
    def ghost_rows(self) -> np.ndarray:
        """Rows of ``G`` that appear in the ghost problem (locked or kept)."""
        return self.locked | self.kept


def block_slices(dims: ConeDims):
    """(kind, size, slice) of every non-polyhedral cone block, in row order; ``size`` is
    the SOC dimension, 1 for EXP, the matrix order for PSD."""
    start = dims.nonneg
    blocks = (
        [("soc", k, k) for k in dims.soc]
        + [("exp", 3, 1)] * dims.exp
        + [("psd", s * (s + 1) // 2, s) for s in dims.psd]
    )
    for kind, rows, size in blocks:
        yield kind, size, slice(start, start + rows)
        start += rows


#: The cone sizes of a ghost that keeps no cone block (most ghosts).
_NO_CONES = ConeDims()


def accuracies(sols: Sequence[Solution]) -> np.ndarray:
    """Every solution's reported accuracy, :data:`DEFAULT_ACCURACY` where it reports none;
    shape ``(batch,)``."""
    return np.array(
        [
            s.info.accuracy if s.info.accuracy and s.info.accuracy > 0 else DEFAULT_ACCURACY
            for s in sols
        ],
        dtype=float,
    )


class RowClasses(NamedTuple):
    """The nonnegative rows' classification of a batch (:func:`classify_rows`): masks of
    shape ``(batch, m)`` (False on the rows after the nonnegative block) and the
    thresholds, shape ``(batch, 1)``."""

    locked: np.ndarray
    weak: np.ndarray
    ambiguous: np.ndarray
    tau_s: np.ndarray
    tau_lam: np.ndarray


def classify_rows(
    S: np.ndarray,
    Lam: np.ndarray,
    acc: np.ndarray,
    nonneg: int,
    *,
    tau_s: float | None = None,
    tau_lam: float | None = None,
    rhs: np.ndarray | None = None,
) -> RowClasses:
    """The nonnegative rows of a batch, as elementwise operations on ``(batch, m)`` arrays:
    slacks ``S`` and multipliers ``Lam`` (in the units they were solved in), accuracies
    ``acc`` ``(batch,)`` and, optionally, the right-hand sides of the nonnegative rows
    ``rhs`` ``(batch, nonneg)`` (module docstring; :func:`classify` with ``rhs``).  The
    array core of :func:`classify_batch`: each sample's row is its lone ``classify``."""
    batch, m = S.shape
    root = np.sqrt(np.maximum(acc, 1e-16))[:, None]  # (batch, 1)
    if tau_s is None:
        taus_s = root * np.maximum(1.0, np.abs(S).max(axis=1, initial=0.0)[:, None])
    else:
        taus_s = np.full((batch, 1), float(tau_s))
    if tau_lam is None:
        taus_lam = root * np.maximum(1.0, np.abs(Lam).max(axis=1, initial=0.0)[:, None])
    else:
        taus_lam = np.full((batch, 1), float(tau_lam))
    nn = slice(0, nonneg)
    locked = np.zeros((batch, m), dtype=bool)
    weak = np.zeros((batch, m), dtype=bool)
    ambiguous = np.zeros((batch, m), dtype=bool)
    s_nn, lam_nn = np.maximum(S[:, nn], 0.0), np.maximum(Lam[:, nn], 0.0)
    tau_rows = taus_s
    if rhs is not None and tau_s is None:
        tau_rows = root * np.maximum(1.0, np.maximum(np.abs(rhs), np.abs(rhs - S[:, nn])))
    locked[:, nn] = s_nn * taus_lam < lam_nn * tau_rows
    weak[:, nn] = (s_nn <= tau_rows) & (lam_nn <= taus_lam)
    ambiguous[:, nn] = (s_nn > UNSETTLED * tau_rows) & (lam_nn > UNSETTLED * taus_lam)
    return RowClasses(locked, weak, ambiguous, taus_s, taus_lam)


def classify(
    sol: Solution,
    dims: ConeDims,
    *,
    tau_s: float | None = None,
    tau_lam: float | None = None,
    rhs: np.ndarray | None = None,
) -> ActiveSet:
    """Active set of ``sol`` for cones ``dims`` (thresholds default to the solver's accuracy).

    With ``rhs`` (the constraint's ``h``) the slack threshold of a nonnegative row is scaled
    by that row's own size, ``max(1, |h_i|, |(G y)_i|)``, instead of the largest slack: a
    budget row ``1'y <= 3`` with slack ~n/3 no longer inflates the threshold of every unit
    bound row.
    """
    return classify_batch(
        [sol], dims, tau_s=tau_s, tau_lam=tau_lam, rhs=None if rhs is None else [rhs]
    )[0]


def classify_batch(
    sols: Sequence[Solution],
    dims: ConeDims,
    *,
    tau_s: float | None = None,
    tau_lam: float | None = None,
    rhs: Sequence[np.ndarray] | None = None,
) -> list[ActiveSet]:
    """:func:`classify` of every solution of a batch that shares ``dims`` (``rhs``: one
    ``h`` per solution), the nonnegative rows of all of them in one pass of elementwise
    operations on ``(batch, m)`` arrays: each sample's result is exactly its lone
    :func:`classify` (the same operations on its row)."""
    # slacks and multipliers in the units each was solved in (a badly scaled problem is
    # solved rescaled, :mod:`.scaling`), so the thresholds below do not depend on the data's
    # scale; identical arrays for a well-scaled problem
    units = [
        in_units(s, s.slack, s.ineq_dual, rhs[k] if rhs is not None else s.slack)
        for k, s in enumerate(sols)
    ]
    S = np.array([np.asarray(u[0], dtype=float) for u in units])
    Lam = np.array([np.asarray(u[1], dtype=float) for u in units])
    if rhs is not None:
        rhs = [u[2] for u in units]
    batch, m = S.shape
    acc = accuracies(sols)
    h_nn = None
    if rhs is not None:
        h_nn = np.array([np.asarray(r)[: dims.nonneg] for r in rhs])
    rows = classify_rows(S, Lam, acc, dims.nonneg, tau_s=tau_s, tau_lam=tau_lam, rhs=h_nn)
    taus_s, taus_lam = rows.tau_s, rows.tau_lam
    locked, weak, ambiguous = rows.locked, rows.weak, rows.ambiguous
    kept = np.zeros((batch, m), dtype=bool)
    weak_blocks_all = np.zeros((batch, m), dtype=bool)

    out = []
    for i in range(batch):
        t_s, t_lam = float(taus_s[i, 0]), float(taus_lam[i, 0])
        soc, exp, psd = [], 0, []
        weak_blocks = weak_blocks_all[i]
        for kind, size, rows in block_slices(dims):
            if np.linalg.norm(Lam[i, rows]) <= t_lam:
                if interior_margin(kind, S[i, rows]) > t_s:
                    continue  # inactive: slack strictly inside, dropped
                weak_blocks[rows] = True  # weakly active: kept, reported
            kept[i, rows] = True
            if kind == "soc":
                soc.append(size)
            elif kind == "exp":
                exp += 1
            else:
                psd.append(size)
        kept_dims = (
            ConeDims(0, tuple(soc), exp, tuple(psd)) if soc or exp or psd else _NO_CONES
        )  # shared: its `kinds` is formed once, not per ghost
        out.append(
            ActiveSet(locked[i], kept[i], weak[i], kept_dims, t_s, t_lam, weak_blocks, ambiguous[i])
        )
    return out


_block_slices = block_slices  # former private name
