"""Cone geometry in the protocol's conventions, written independently of any adapter.

Used to build the zoo (complementary boundary pairs) and to measure how far a returned
slack lies from ``K`` and a returned multiplier from ``K*`` (which is how wrong dual signs
show up).  Conventions are those of :mod:`ffo_core.protocol`: SOC ``(t, x)`` with
``||x|| <= t``; EXP ``cl{(x, y, z): y exp(x/y) <= z, y > 0}``; PSD as the isometric svec
(upper triangle column by column, off-diagonals times sqrt(2)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ffo_core.protocol import ConeDims

SQRT2 = math.sqrt(2.0)


def svec(S: np.ndarray) -> np.ndarray:
    """Symmetric ``k x k`` matrix -> protocol svec (length ``k(k+1)/2``)."""
    k = S.shape[0]
    out = []
    for j in range(k):
        for i in range(j + 1):
            out.append(S[i, j] if i == j else SQRT2 * S[i, j])
    return np.array(out)


def smat(v: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`svec`."""
    S = np.zeros((k, k))
    idx = 0
    for j in range(k):
        for i in range(j + 1):
            if i == j:
                S[i, j] = v[idx]
            else:
                S[i, j] = S[j, i] = v[idx] / SQRT2
            idx += 1
    return S


def blocks(dims: ConeDims) -> Iterator[tuple[str, int, slice]]:
    """``(kind, size, rows)`` for the nonnegative block and every cone block, in row order.

    ``size`` is the number of rows for nonneg/SOC/EXP and the matrix order for PSD.
    """
    start = 0
    if dims.nonneg:
        yield "nonneg", dims.nonneg, slice(0, dims.nonneg)
        start = dims.nonneg
    for d in dims.soc:
        yield "soc", d, slice(start, start + d)
        start += d
    for _ in range(dims.exp):
        yield "exp", 3, slice(start, start + 3)
        start += 3
    for k in dims.psd:
        rows = k * (k + 1) // 2
        yield "psd", k, slice(start, start + rows)
        start += rows


def _exp_primal_violation(v: np.ndarray) -> float:
    x, y, z = v
    viol = max(0.0, -y, -z)
    if y > 1e-300 and z > 1e-300:
        # y exp(x/y) <= z  <=>  x <= y log(z/y)
        viol = max(viol, x - y * math.log(z / y))
    else:
        viol = max(viol, x)  # the closure: y = 0 needs x <= 0, z >= 0
    return viol


def _exp_dual_violation(v: np.ndarray) -> float:
    # K_exp* = cl{(u, v, w): u < 0, -u exp(v/u) <= e w}
    u, vv, w = v
    if u < -1e-300 and w > 1e-300:
        # -u exp(v/u - 1) <= w  <=>  v/u - 1 <= log(w/(-u)); times (-u) > 0:
        return max(0.0, -vv + u + u * math.log(w / (-u)))
    return max(0.0, u) + max(0.0, -vv, -w)  # closure: u = 0 needs v, w >= 0


def violation(vec: np.ndarray, dims: ConeDims, dual: bool = False) -> float:
    """Largest (absolute) violation of membership in ``K`` (or ``K*`` when ``dual``)."""
    worst = 0.0
    for kind, size, rows in blocks(dims):
        v = vec[rows]
        if kind == "nonneg":
            worst = max(worst, float(np.max(-v, initial=0.0)))
        elif kind == "soc":
            worst = max(worst, float(np.linalg.norm(v[1:]) - v[0]))
        elif kind == "exp":
            worst = max(worst, _exp_dual_violation(v) if dual else _exp_primal_violation(v))
        else:
            eig = np.linalg.eigvalsh(smat(v, size))
            worst = max(worst, float(-eig[0]))
    return max(worst, 0.0)


def complementarity(s: np.ndarray, lam: np.ndarray, dims: ConeDims) -> float:
    """``sum_i |s_i lam_i|`` over nonnegative rows plus ``sum_k |s_k' lam_k|`` over cones."""
    total = 0.0
    for kind, _, rows in blocks(dims):
        if kind == "nonneg":
            total += float(np.sum(np.abs(s[rows] * lam[rows])))
        else:
            total += abs(float(s[rows] @ lam[rows]))
    return total


# -- complementary pairs used to construct instances with a known solution ----------------


def soc_pair(rng: np.random.Generator, d: int, active: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(s, lam)`` in SOC(d) x SOC(d) with ``s'lam = 0``: on the boundary, or s interior."""
    u = rng.standard_normal(d - 1)
    u /= np.linalg.norm(u)
    if active:
        t, tau = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
        return t * np.concatenate([[1.0], u]), tau * np.concatenate([[1.0], -u])
    t = rng.uniform(1.0, 2.0)
    return np.concatenate([[t], 0.5 * t * rng.uniform(0, 1) * u]), np.zeros(d)


def exp_pair(rng: np.random.Generator, active: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(s, lam)`` in EXP x EXP* with ``s'lam = 0``: on the boundary, or s interior.

    Boundary point ``s = beta (r, 1, e^r)``; the dual vector orthogonal to it is
    ``lam = alpha (-e^r, e^r (r - 1), 1)`` (normal of ``y e^(x/y) - z = 0`` there).
    """
    r = rng.uniform(-1.0, 1.0)
    beta = rng.uniform(0.5, 1.5)
    if active:
        alpha = rng.uniform(0.5, 1.5)
        er = math.exp(r)
        return beta * np.array([r, 1.0, er]), alpha * np.array([-er, er * (r - 1.0), 1.0])
    return beta * np.array([r, 1.0, 2.0 * math.exp(r) + 0.5]), np.zeros(3)


def psd_pair(rng: np.random.Generator, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """svec ``(S, Lam)``: ``S`` of rank ``rank``, ``Lam`` of rank ``k - rank``, ``S Lam = 0``."""
    U, _ = np.linalg.qr(rng.standard_normal((k, k)))
    sig = np.concatenate([rng.uniform(0.5, 1.5, rank), np.zeros(k - rank)])
    mu = np.concatenate([np.zeros(rank), rng.uniform(0.5, 1.5, k - rank)])
    return svec(U @ np.diag(sig) @ U.T), svec(U @ np.diag(mu) @ U.T)


def interior_dual(rng: np.random.Generator, dims: ConeDims) -> np.ndarray:
    """A point strictly inside ``K*`` (used to make infeasible instances dual feasible)."""
    parts = []
    for kind, size, _ in blocks(dims):
        if kind == "nonneg":
            parts.append(rng.uniform(0.5, 1.5, size))
        elif kind == "soc":
            u = rng.standard_normal(size - 1)
            parts.append(np.concatenate([[2.0], 0.5 * u / np.linalg.norm(u)]))
        elif kind == "exp":
            parts.append(rng.uniform(0.5, 1.5) * np.array([-1.0, 1.0, 1.0]))
        else:
            parts.append(svec(np.eye(size)))
    return np.concatenate(parts) if parts else np.zeros(0)
