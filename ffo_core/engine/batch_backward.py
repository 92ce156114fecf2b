"""The first-order backward of a polyhedral batch as array operations over the batch.

This computes the same steps as :mod:`.ffo_backward` (read that file for the method), for
every sample of a batch at once, when the batch goes to a backend with ``solve_batch``
(:func:`~.batched.batch_solver`) and its cones are polyhedral (zero and nonnegative rows
only).  Every per-sample quantity is a row of a ``(B, .)`` array:

1. **Active sets**: the forward solutions' slacks and multipliers stacked ``(B, m)`` and
   classified at once (:func:`~.active_set.classify_rows`, the core of ``classify``).
2. **Step size**: ``delta = kappa (1 + ||y*||) / ||(c, c_nu, c_lam)||`` per row, ``kappa = 1``
   (a polyhedral ghost is affine in delta) unless ``kappa``/``delta`` are given; central
   only when ``central=True``.
3. **Ghost problems**: one :class:`~ffo_core.protocol.ProblemBatch` whose right-hand sides
   are one product per matrix over the batch (:func:`~.batched.ghost_batch_arrays`), solved
   in one ``solve_batch`` call and read back as arrays (:func:`~.batched.solve_arrays`; no
   per-sample Solution).
4. **Base-point check and difference**: the check (:func:`~.ghost.base_point_error`'s
   measure) for every one-sided sample at once, one more ``solve_batch`` at ``-delta`` for
   the samples above ``base_check`` (central fallback), the finite difference and the
   derivative of ``grad_data L`` as array operations; each sample's
   :class:`~.data_gradient.DataGradient` holds its rows (a low-rank gradient, as
   :func:`~.ffo_backward.ffo_backward` returns).

A sample gets what the per-sample path gives it up to rounding (the sums are ordered
differently), with the same diagnostics and, when its ghost fails, a
:class:`~ffo_core.errors.GhostProblemError` with its ``delta`` (and ``batch_index`` when its
backend is a per-sample guard) for the caller's ``ghost_fallback`` policy.  Curved cone
blocks (SOC/EXP/PSD) and problems solved rescaled (:mod:`.scaling`) take the per-sample
bookkeeping of :mod:`.schedule` (:func:`applies`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import GhostProblemError
from .active_set import accuracies, classify_rows
from .batched import (
    BatchAnswers,
    _matrices,
    failed_ghost,
    ghost_batch_arrays,
    inaccurate_ghost,
    pattern_products,
    solve_arrays,
)
from .data_gradient import DataGradient
from .ffo_backward import AFFINE_KAPPA, FFOOptions
from .solves import backend_name

_TINY = np.finfo(float).tiny


def applies(samples: Sequence) -> bool:
    """The batch can take this module's path: polyhedral cones, one layout and size, no
    sample solved rescaled (its active set is measured in the scaled units)."""
    s0 = samples[0]
    dims, n, p = s0.h.dims, s0.g.n, s0.e.p
    if dims.soc or dims.exp or dims.psd:
        return False
    for s in samples:
        if s.h.dims != dims or s.g.n != n or s.e.p != p:
            return False
        info = s.sol.info
        if info is not None and info.extra and "scaling" in info.extra:
            return False
    return True


def _stack(rows: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The rows, of length ``size``, as a ``(len(rows), size)`` float array."""
    return np.array([np.asarray(r, dtype=float) for r in rows]).reshape(len(rows), size)


def ffo_backward_polyhedral(
    samples: Sequence, options: FFOOptions, batched
) -> list[DataGradient | GhostProblemError]:
    """:func:`~.ffo_backward.ffo_backward` of every sample of ``samples``
    (:class:`~.schedule.FFOSample`, :func:`applies` true), as array operations (module
    docstring); ``batched`` the backend whose ``solve_batch`` solves the ghosts."""
    B = len(samples)
    s0 = samples[0]
    n, p, m, nn = s0.g.n, s0.e.p, s0.h.m, s0.h.dims.nonneg
    sols = [s.sol for s in samples]
    Y, NU = _stack([s.primal for s in sols], n), _stack([s.eq_dual for s in sols], p)
    LAM, S = _stack([s.ineq_dual for s in sols], m), _stack([s.slack for s in sols], m)
    C = _stack([s.c for s in samples], n)
    dual = any(s.c_dual is not None for s in samples)
    C_nu = _stack([s.c_dual[0] if s.c_dual is not None else np.zeros(p) for s in samples], p)
    C_lam = _stack([s.c_dual[1] if s.c_dual is not None else np.zeros(m) for s in samples], m)
    live = np.asarray(C.any(axis=1) | C_nu.any(axis=1) | C_lam.any(axis=1), dtype=bool)

    # 1: active sets (every sample; the dead ones' are not used)
    H = _stack([s.h.h for s in samples], m)
    rows = classify_rows(
        S, LAM, accuracies(sols), nn, tau_s=options.tau_s, tau_lam=options.tau_lam, rhs=H[:, :nn]
    )
    locked = rows.locked
    # 2: delta and central
    central = bool(options.central)
    if options.delta is not None:
        delta = np.full(B, float(options.delta))
    else:
        kappa = options.kappa if options.kappa is not None else AFFINE_KAPPA
        size = np.concatenate([C, C_nu, C_lam], axis=1) if dual else C
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = kappa * (1.0 + np.linalg.norm(Y, axis=1)) / np.linalg.norm(size, axis=1)
    out: list = [None] * B
    duals = (C_nu, C_lam) if dual else None
    # 3: the ghosts at +delta
    ks = np.flatnonzero(live)
    upper, ks = _ghosts(samples, ks, locked, Y, central, delta, C, duals, 1.0, batched, out)
    # 4: base-point check, the fallback's -delta ghosts, the difference
    checked = not central and options.base_check is not None
    errors = np.full(B, np.nan)
    again = ks if central else ks[:0]
    if checked and ks.size:
        errors[ks] = _base_errors(samples, ks, LAM, locked, delta[ks, None] * C[ks])
        again = ks[errors[ks] > options.base_check]
    lower, again = _ghosts(samples, again, locked, Y, central, delta, C, duals, -1.0, batched, out)
    two = np.zeros(B, dtype=bool)
    two[again] = True
    forward = (Y, NU, np.where(locked, LAM, 0.0))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d1, d2 = delta[:, None], 2 * delta[:, None]
        base = tuple(
            np.where(two[:, None], (u + w) / 2, f) for u, w, f in zip(upper, lower, forward)
        )
        direction = tuple(
            np.where(two[:, None], (u - w) / d2, (u - f) / d1)
            for u, w, f in zip(upper, lower, forward)
        )
    base = tuple(np.where(live[:, None], b, v) for b, v in zip(base, (Y, NU, LAM)))
    direction = tuple(np.where(live[:, None], d, 0.0) for d in direction)
    finite = np.isfinite(np.concatenate([*base, *direction], axis=1)).all(axis=1)
    weak, n_locked = rows.weak.sum(axis=1), locked.sum(axis=1)
    tau_s, tau_lam = rows.tau_s[:, 0], rows.tau_lam[:, 0]
    for k in range(B):
        if out[k] is not None:  # its ghost failed
            continue
        grad = _gradient(samples[k], [v[k] for v in base], [v[k] for v in direction], finite[k])
        if live[k]:
            grad.diagnostics = {
                "delta": delta[k],
                "central": bool(two[k]),
                "locked": int(n_locked[k]),
                "kept": 0,
                "weak": int(weak[k]),
                "weak_blocks": 0,
                "tau_s": float(tau_s[k]),
                "tau_lam": float(tau_lam[k]),
                "central_fallback": bool(checked and errors[k] > options.base_check),
                "base_error": float(errors[k]) if checked else None,
            }
        out[k] = grad
    return out


def _gradient(s, base: list, direction: list, finite: bool) -> DataGradient:
    """Sample ``s``'s low-rank gradient at ``base`` along ``direction`` (the arrays are
    rows of the batch's; ``finite`` was checked over the batch)."""
    wy, wnu, wlam = direction
    grad = DataGradient(None, wy, None, -wnu, None, -wlam)
    grad.base, grad.direction = tuple(base), tuple(direction)
    grad._patterns = {"P": s.g.P, "A": s.e.A, "G": s.h.G}
    grad._finite = bool(finite)
    return grad


def _ghosts(samples, ks, locked, Y, central, delta, C, c_dual, sign, batched, out):
    """The ghosts of the samples ``ks`` at ``sign * delta[k]`` in one ``solve_batch``:
    ``(y, nu, lam)`` as ``(B, .)`` arrays (full size; NaN in the rows of the other
    samples) and the indices whose ghost was solved; ``out[k]`` becomes the
    :class:`GhostProblemError` of every sample whose ghost failed (all of them when the
    whole call failed)."""
    B, n, m = Y.shape[0], Y.shape[1], locked.shape[1]
    p, nn = samples[0].e.p, samples[0].h.dims.nonneg
    found = (np.full((B, n), np.nan), np.full((B, p), np.nan), np.full((B, m), np.nan))
    if not ks.size:
        return found, ks
    sub = [(samples[k].g, samples[k].h, samples[k].e) for k in ks]
    steps = sign * delta[ks]
    duals = None if c_dual is None else (c_dual[0][ks], c_dual[1][ks])
    batch, extra = ghost_batch_arrays(
        sub, locked[ks], np.zeros((len(ks), m), dtype=bool), Y[ks],
        np.full(len(ks), central), steps, C[ks], duals,
    )  # fmt: skip
    name = backend_name(batched)
    try:
        answer: BatchAnswers = solve_arrays(batched, batch, extra, ghost=True)
    except GhostProblemError as exc:
        for k in ks:
            own = GhostProblemError(str(exc), status=exc.status, backend=exc.backend)
            own.__cause__ = exc
            out[k] = _failed(own, samples[k], abs(delta[k]))
        return found, ks[:0]
    for j in np.flatnonzero(~answer.solved):
        status = answer.status[j]
        out[ks[j]] = _failed(
            GhostProblemError(
                f"the ghost problem of the backward pass ended with status {status.value} ({name})",
                status=status,
                backend=name,
            ),
            samples[ks[j]],
            abs(steps[j]),
        )
    ok = answer.solved.copy()
    for j in np.flatnonzero(ok):  # the guards' ``inaccurate`` policy
        refused = inaccurate_ghost(samples[ks[j]].backend, answer.status[j], name)
        if refused is not None:
            out[ks[j]] = _failed(refused, samples[ks[j]], abs(steps[j]))
            ok[j] = False
    solved = ks[ok]
    eq = answer.eq_dual[ok]
    found[0][solved] = answer.primal[ok]
    found[1][solved] = eq[:, :p]
    found[2][solved] = 0.0
    found[2][solved, :nn] = np.where(locked[solved, :nn], eq[:, p:], 0.0)
    return found, solved


def _failed(exc: GhostProblemError, sample, delta: float) -> GhostProblemError:
    """``exc`` with the step that failed and the sample's batch index (its backend's, a
    per-sample guard's), as the per-sample path raises it."""
    return failed_ghost(exc, delta, sample.backend)


def _base_errors(samples, ks, LAM, locked, steps) -> np.ndarray:
    """:func:`~.ghost.base_point_error` of the samples ``ks``: ``||G' lam_D|| / ||delta c||``
    with ``lam_D`` the forward multipliers of the rows the ghost drops (0 when they exert
    no force); one product with ``G'`` over the batch."""
    Gs = [samples[k].h.G for k in ks]
    leftover = np.where(locked[ks], 0.0, LAM[ks])
    if all(G is Gs[0] for G in Gs):  # shared: (G' leftover_k)' for every k in one product
        moved = np.asarray(leftover @ Gs[0])
    else:
        pattern, values = _matrices(Gs, Gs[0].shape)
        moved = pattern_products(pattern, values, leftover, transpose=True)
    force = np.linalg.norm(moved, axis=1)
    return force / np.maximum(np.linalg.norm(steps, axis=1), _TINY)


__all__ = ["applies", "ffo_backward_polyhedral"]
