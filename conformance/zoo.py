"""The problem zoo: seeded instances in protocol form (and a few CVXPY layers).

Most optimal instances are *constructed from their KKT conditions*: pick ``y*``, a
complementary pair ``(s*, lam*)`` for every cone block (active rows/blocks on the boundary
with a multiplier of size ~1, inactive ones strictly inside with a zero multiplier), random
``G``, ``A``, ``nu*``, then ``h = G y* + s*``, ``b = A y*``, ``q = -(P y* + A'nu* + G'lam*)``.
The margins of strict complementarity are therefore known: ~1 for ``well`` instances, 1e-3
for the weakly/nearly active rows of ``degenerate`` ones (resolvable by a solver accurate
to 1e-8, which splits complementary pairs at ~sqrt(1e-8) = 1e-4, but only just).
``P`` is positive definite
(``qp``: ``F'F + 0.1 I``; ``lp``: the "small quadratic regularisation" ``1e-2 I``), so the
solution is unique and the FFO ghost problem is bounded -- except in the *pure linear*
instances (tag ``linear``, names ``*-pure-*``), which have no quadratic term at all: their
optimum is unique because it is a nondegenerate vertex (as many linearly independent active
rows, equalities included, as variables, every multiplier of an active row ~1) or, with
SOC/EXP/PSD blocks, because the active cone block is curved in every direction the linear
rows leave free.  They exercise an adapter's LP-only code path, and they are the only
optimal instances a backend without a quadratic objective
(``Capabilities.quadratic_objective=False``) is judged on.

``limit`` instances are optimal problems solved with a tiny iteration or time limit (through
the backend's ``with_settings`` or its config string, see
:func:`ffo_conformance.checks_limits.limited_backend`): the status check wants the limit
status, or an answer that really is the optimum.

Every instance has a *class* (``lp``, ``qp``, ``socp``, ``exp``, ``sdp``: the most
demanding cone it uses) and a *variant* (``well``, ``batched``, ``scaled``, ``degenerate``,
``infeasible``, ``unbounded``, ``layer``); ``group`` (``"qp/scaled"``) is the row of the
report.  ``layer`` instances are CVXPY problems run through :class:`ffo_core.FFOLayer`,
which checks the whole path (compilation, batching, ``M'`` back-mapping) per parameter.

Size: one table of instances and the generators that build them; splitting it would scatter
the zoo a plugin author reads in one place.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ffo_core.protocol import ConeConstraints, ConeDims, Equalities, Objective, Status

from . import cones

CLASSES = ("lp", "qp", "socp", "exp", "sdp")
VARIANTS = (
    "well",
    "batched",
    "scaled",
    "degenerate",
    "infeasible",
    "unbounded",
    "limit",
    "layer",
)
#: Extra selectors of :func:`select`: ``linear`` = the instances with no quadratic term.
TAGS = ("linear",)

EXPECT_INFEASIBLE = frozenset({Status.INFEASIBLE, Status.INFEASIBLE_INACCURATE})
EXPECT_UNBOUNDED = frozenset({Status.UNBOUNDED, Status.UNBOUNDED_INACCURATE})
EXPECT_LIMIT = frozenset({Status.ITERATION_LIMIT, Status.TIME_LIMIT})

#: What a ``limit`` instance sets: an iteration limit of 1, or a time limit of 1 microsecond
#: (``with_settings(time_limit=...)``, the protocol's generic name, in seconds).
ITERATION_LIMIT = 1
TIME_LIMIT = 1e-6


@dataclass
class Sample:
    """One problem in protocol form plus the upstream gradient ``c`` used for it."""

    g: Objective
    h: ConeConstraints
    e: Equalities
    c: np.ndarray
    truth: dict | None = None  # the constructed optimum (y, nu, lam, s), if known


@dataclass
class LayerCase:
    """A CVXPY problem for :class:`ffo_core.FFOLayer`, with parameter values and weights.

    ``build()`` returns ``(problem, parameters, variables)``; ``values`` are NumPy arrays
    (with a leading batch dimension where the parameter is batched); the loss is
    ``sum_k <weights[k], output_k>``.
    """

    build: Callable[[], tuple]
    values: list[np.ndarray]
    weights: list[np.ndarray]


@dataclass
class Instance:
    name: str
    cls: str
    variant: str = "well"
    profile: str = "well"  # tolerance profile (ffo_conformance.tolerances.PROFILES)
    samples: list[Sample] = field(default_factory=list)
    expect: frozenset | None = None  # statuses accepted for infeasible/unbounded instances
    layer: LayerCase | None = None
    description: str = ""
    #: ``"iterations"`` or ``"time"`` for a ``limit`` instance (what the backend is limited by)
    limit: str | None = None

    @property
    def group(self) -> str:
        return self.cls if self.variant == "well" else f"{self.cls}/{self.variant}"

    @property
    def kind(self) -> str:
        """``"layer"``, ``"limit"``, ``"status"`` (infeasible/unbounded) or ``"optimal"``."""
        if self.layer is not None:
            return "layer"
        if self.limit is not None:
            return "limit"
        return "status" if self.expect is not None else "optimal"

    @property
    def tags(self) -> frozenset[str]:
        """Selectors besides class, variant, group and name (see :data:`TAGS`)."""
        linear = bool(self.samples) and not self.quadratic
        return frozenset({"linear"} if linear else ())

    @property
    def dims(self) -> ConeDims | None:
        return self.samples[0].h.dims if self.samples else None

    @property
    def has_equalities(self) -> bool:
        return bool(self.samples) and self.samples[0].e.p > 0

    @property
    def quadratic(self) -> bool:
        return any(s.g.P is not None and s.g.P.nnz > 0 for s in self.samples)

    @property
    def size(self) -> tuple[int, int]:
        """(variables, constraint rows) of the largest sample."""
        if not self.samples:
            return (0, 0)
        return (max(s.g.n for s in self.samples), max(s.h.m + s.e.p for s in self.samples))


# -- construction helpers -----------------------------------------------------------------


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _sparse_random(rng, rows: int, n: int, density: float) -> sp.csc_matrix:
    M = rng.standard_normal((rows, n)) * (rng.random((rows, n)) < density)
    for i in np.flatnonzero(~M.any(axis=1)):
        M[i, rng.integers(n)] = rng.standard_normal() + 1.0
    return sp.csc_matrix(M)


def _objective(rng, n: int, kind: str, reg: float) -> sp.csc_matrix | None:
    if kind == "linear":
        return None
    if kind == "lp":
        return sp.csc_matrix(reg * np.eye(n))
    F = rng.standard_normal((n, n)) / np.sqrt(n)
    return sp.csc_matrix(F.T @ F + 0.1 * np.eye(n))


def constructed(
    rng,
    n: int,
    p: int,
    nonneg: str = "",
    soc=(),
    exp: str = "",
    psd=(),
    objective: str = "qp",
    reg: float = 1e-2,
    density: float = 0.7,
    margin: float = 1e-3,
    box: float | None = None,
) -> Sample:
    """An optimal instance with known solution (see the module docstring).

    ``nonneg``: one letter per row, ``A`` active (s = 0, lam ~ 1), ``I`` inactive
    (s ~ 1, lam = 0), ``w`` weakly active (s = 0, lam = margin), ``n`` nearly active
    (s = margin, lam = 0).  ``soc``: ``[(d, active), ...]``; ``exp``: ``"A"``/``"I"`` per
    cone; ``psd``: ``[(k, rank of S), ...]`` (rank ``k``: inactive).
    ``objective``: ``"qp"``, ``"lp"`` (``reg * I``) or ``"linear"`` (no quadratic term:
    ``P`` is None; the caller makes the optimum unique, see the module docstring).
    ``box``: add ``2n`` inactive rows ``-box <= y - y* <= box`` after the ``nonneg`` rows,
    so that the feasible set is bounded and every tilt of a linear objective (the checks'
    perturbations) keeps the problem bounded.
    """
    s_parts: list[np.ndarray | list[float]] = []
    l_parts: list[np.ndarray | list[float]] = []
    for role in nonneg:
        s_i, l_i = {
            "A": (0.0, rng.uniform(0.5, 1.5)),
            "I": (rng.uniform(0.5, 1.5), 0.0),
            "w": (0.0, margin),
            "n": (margin, 0.0),
        }[role]
        s_parts.append([s_i])
        l_parts.append([l_i])
    if box is not None:
        s_parts.append(np.full(2 * n, float(box)))
        l_parts.append(np.zeros(2 * n))
    for d, active in soc:
        s_k, l_k = cones.soc_pair(rng, d, active)
        s_parts.append(s_k)
        l_parts.append(l_k)
    for role in exp:
        s_k, l_k = cones.exp_pair(rng, role == "A")
        s_parts.append(s_k)
        l_parts.append(l_k)
    for k, rank in psd:
        s_k, l_k = cones.psd_pair(rng, k, rank)
        s_parts.append(s_k)
        l_parts.append(l_k)
    boxed = 0 if box is None else 2 * n
    dims = ConeDims(
        nonneg=len(nonneg) + boxed,
        soc=tuple(d for d, _ in soc),
        exp=len(exp),
        psd=tuple(k for k, _ in psd),
    )
    s = np.concatenate(s_parts) if s_parts else np.zeros(0)
    lam = np.concatenate(l_parts) if l_parts else np.zeros(0)
    y = rng.standard_normal(n)
    G = _sparse_random(rng, dims.rows, n, density)
    if boxed:
        G = G.tolil()
        G[len(nonneg) : len(nonneg) + boxed, :] = np.vstack([np.eye(n), -np.eye(n)])
        G = sp.csc_matrix(G)
    A = _sparse_random(rng, p, n, density)
    nu = rng.standard_normal(p)
    P = _objective(rng, n, objective, reg)
    q = -(A.T @ nu + G.T @ lam) - (P @ y if P is not None else 0.0)
    return Sample(
        Objective(P, q),
        ConeConstraints(G, G @ y + s, dims),
        Equalities(A, A @ y),
        rng.standard_normal(n),
        truth={"y": y, "nu": nu, "lam": lam, "s": s},
    )


def scaled(sample: Sample, rng, span: float = 2.0) -> Sample:
    """Rescale rows and columns by 10^U(-span, span): entries then span ~1e-4..1e4.

    Variables ``y = D y~``; nonnegative rows and equality rows get their own factor, every
    SOC/EXP/PSD block one factor (so the cone is preserved); the objective a factor too.
    The solution maps as ``y~ = y/D``, ``s~ = R s``, ``lam~ = w lam / R``, ``nu~ = w nu / R_e``.
    """
    g, h, e = sample.g, sample.h, sample.e
    n, dims = g.n, h.dims

    def factors(count: int) -> np.ndarray:  # 10^U(-span, span), both extremes included
        f = rng.uniform(-span, span, count)
        ends = rng.permutation(count)[:2]
        f[ends] = [-span, span][: len(ends)]
        return 10.0**f

    D = factors(n)
    units = [rows for _, _, rows in cones.blocks(dims)]
    nn = dims.nonneg
    unit_f = factors(nn + len(units) - (1 if nn else 0))
    R = np.empty(h.m)
    R[:nn] = unit_f[:nn]
    for f, rows in zip(unit_f[nn:], units[1:] if nn else units):
        R[rows] = f  # one factor per SOC/EXP/PSD block
    Re = factors(e.p)
    w = 10.0 ** rng.uniform(-1.0, 1.0)
    Dm, Rm, Rem = sp.diags(D), sp.diags(R), sp.diags(Re)
    P = sp.csc_matrix(w * (Dm @ g.P @ Dm)) if g.P is not None else None
    t = sample.truth
    truth = (
        None
        if t is None
        else {"y": t["y"] / D, "nu": w * t["nu"] / Re, "lam": w * t["lam"] / R, "s": R * t["s"]}
    )
    return Sample(
        Objective(P, w * D * g.q),
        ConeConstraints(sp.csc_matrix(Rm @ h.G @ Dm), R * h.h, dims),
        Equalities(sp.csc_matrix(Rem @ e.A @ Dm), Re * e.b),
        sample.c,
        truth,
    )


def _eye_rows(n: int, rows, sign: float = 1.0) -> sp.csc_matrix:
    M = np.zeros((len(rows), n))
    for i, j in enumerate(rows):
        M[i, j] = sign
    return sp.csc_matrix(M)


def _status_sample(P, q, G, h, dims, A=None, b=None) -> Sample:
    n = len(q)
    A = sp.csc_matrix((0, n)) if A is None else sp.csc_matrix(A)
    b = np.zeros(0) if b is None else np.asarray(b, float)
    return Sample(
        Objective(P, np.asarray(q, float)),
        ConeConstraints(sp.csc_matrix(G), np.asarray(h, float), dims),
        Equalities(A, b),
        np.ones(n),
    )


# -- infeasible and unbounded instances --------------------------------------------------


def _dual_feasible_q(rng, G, dims) -> np.ndarray:
    """``q = -G'lam0`` with ``lam0`` inside ``K*``: the dual is strictly feasible, so a
    primal-infeasible instance is not also dual infeasible (which would make both
    "infeasible" and "unbounded" correct answers)."""
    return -(np.asarray(G).T @ cones.interior_dual(rng, dims))


def lp_infeasible(rng) -> Sample:
    """``a'y <= -1`` and ``a'y >= 1`` among feasible random rows; no quadratic term."""
    n = 6
    y0 = rng.standard_normal(n)
    G1 = rng.standard_normal((4, n))
    a = rng.standard_normal(n)
    G = np.vstack([G1, a, -a])
    h = np.concatenate([G1 @ y0 + 1.0, [-1.0, -1.0]])
    dims = ConeDims(nonneg=6)
    return _status_sample(None, _dual_feasible_q(rng, G, dims), G, h, dims)


def lp_unbounded(rng) -> Sample:
    """``min q'y  s.t.  y >= 0`` with some ``q_i < 0``; no quadratic term."""
    n = 5
    q = np.abs(rng.standard_normal(n))
    q[1] = -1.0
    return _status_sample(None, q, -np.eye(n), np.zeros(n), ConeDims(nonneg=n))


def qp_infeasible(rng) -> Sample:
    """``y1 + y2 = 2`` with ``y1 <= 0``, ``y2 <= 0``; positive definite objective."""
    n = 5
    P = _objective(rng, n, "qp", 0.0)
    A = np.zeros((1, n))
    A[0, :2] = 1.0
    G = np.vstack([_eye_rows(n, [0, 1]).toarray(), rng.standard_normal((2, n))])
    h = np.concatenate([[0.0, 0.0], np.abs(rng.standard_normal(2)) + 5.0])
    return _status_sample(P, rng.standard_normal(n), G, h, ConeDims(nonneg=4), A, [2.0])


def qp_unbounded(rng) -> Sample:
    """``P`` singular along ``e_n``, ``q_n < 0``, no constraint bounds ``y_n``."""
    n = 5
    F = rng.standard_normal((n - 1, n - 1))
    P = np.zeros((n, n))
    P[: n - 1, : n - 1] = F.T @ F + 0.1 * np.eye(n - 1)
    q = rng.standard_normal(n)
    q[-1] = -1.0
    G = np.hstack([rng.standard_normal((3, n - 1)), np.zeros((3, 1))])
    A = np.zeros((1, n))
    A[0, :2] = 1.0
    return _status_sample(sp.csc_matrix(P), q, G, np.ones(3), ConeDims(nonneg=3), A, [0.0])


def socp_infeasible(rng) -> Sample:
    """``(t, x) in SOC(4)`` and ``t <= -1``."""
    n = 4
    G = np.vstack([np.eye(n)[:1], -np.eye(n)])
    h = np.concatenate([[-1.0], np.zeros(n)])
    dims = ConeDims(nonneg=1, soc=(4,))
    return _status_sample(None, _dual_feasible_q(rng, G, dims), G, h, dims)


def socp_unbounded(rng) -> Sample:
    """``min -t + x'r  s.t.  (t, x) in SOC(4)`` with ``||r|| < 1``: ``t -> inf`` along the axis."""
    n = 4
    r = rng.standard_normal(n - 1)
    q = np.concatenate([[-1.0], 0.3 * r / np.linalg.norm(r)])
    return _status_sample(None, q, -np.eye(n), np.zeros(n), ConeDims(soc=(4,)))


def exp_infeasible(rng) -> Sample:
    """``(x, y, z) in EXP`` and ``z <= -1`` (EXP has ``z >= 0``)."""
    n = 3
    G = np.vstack([np.eye(n)[2:], -np.eye(n)])
    h = np.concatenate([[-1.0], np.zeros(n)])
    dims = ConeDims(nonneg=1, exp=1)
    return _status_sample(None, _dual_feasible_q(rng, G, dims), G, h, dims)


def sdp_infeasible(rng) -> Sample:
    """``X in PSD(3)`` (its svec is the variable) and ``trace X <= -1``."""
    k = 3
    n = k * (k + 1) // 2
    diag = [j * (j + 1) // 2 + j for j in range(k)]  # svec index of (j, j)
    tr = np.zeros((1, n))
    tr[0, diag] = 1.0
    G = np.vstack([tr, -np.eye(n)])
    h = np.concatenate([[-1.0], np.zeros(n)])
    dims = ConeDims(nonneg=1, psd=(k,))
    return _status_sample(None, _dual_feasible_q(rng, G, dims), G, h, dims)


# -- CVXPY layer cases --------------------------------------------------------------------


def qp_layer_case(rng, n: int, m: int, p: int, batch: int | None) -> LayerCase:
    """``0.5||F y||^2 + q'y s.t. G y <= h, A y = b``, every datum a parameter, strictly
    complementary by construction (half of the rows of ``G`` active)."""
    F = np.eye(n) + rng.standard_normal((n, n)) / (2 * np.sqrt(n))
    y0 = rng.standard_normal(n)
    G = rng.standard_normal((m, n))
    active = np.arange(m) < m // 2
    h = G @ y0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    lam = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    A = rng.standard_normal((p, n))
    b = A @ y0
    q = -(F.T @ F @ y0 + A.T @ rng.standard_normal(p) + G.T @ lam)

    def build():
        import cvxpy as cp

        y = cp.Variable(n, name="y")
        Fp, qp_ = cp.Parameter((n, n), name="F"), cp.Parameter(n, name="q")
        Gp, hp = cp.Parameter((m, n), name="G"), cp.Parameter(m, name="h")
        Ap, bp = cp.Parameter((p, n), name="A"), cp.Parameter(p, name="b")
        prob = cp.Problem(
            cp.Minimize(0.5 * cp.sum_squares(Fp @ y) + qp_ @ y), [Gp @ y <= hp, Ap @ y == bp]
        )
        return prob, [Fp, qp_, Gp, hp, Ap, bp], [y]

    values = [F, q, G, h, A, b]
    w = rng.standard_normal(n)
    if batch:
        # q and h batched (tiny perturbations keep the active set); F, G, A, b shared, so
        # their gradients are sums over the batch.
        values[1] = q + 1e-3 * rng.standard_normal((batch, n))
        values[3] = h + np.where(active, 0.0, 1e-3 * rng.standard_normal((batch, m)))
        w = rng.standard_normal((batch, n))
    return LayerCase(build, values, [w])


def _lp_layer(rng, n: int, m: int, reg: float = 1e-2) -> LayerCase:
    y0 = rng.standard_normal(n)
    G = rng.standard_normal((m, n))
    active = np.arange(m) < n - 1
    h = G @ y0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    lam = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    q = -(reg * y0 + G.T @ lam)

    def build():
        import cvxpy as cp

        y = cp.Variable(n, name="y")
        qp_, Gp, hp = (
            cp.Parameter(n, name="q"),
            cp.Parameter((m, n), name="G"),
            cp.Parameter(m, name="h"),
        )
        prob = cp.Problem(cp.Minimize(qp_ @ y + 0.5 * reg * cp.sum_squares(y)), [Gp @ y <= hp])
        return prob, [qp_, Gp, hp], [y]

    return LayerCase(build, [q, G, h], [rng.standard_normal(n)])


def _lp_pure_layer(rng, n: int, m: int) -> LayerCase:
    """``min q'y s.t. G y <= h`` with no quadratic term: ``n`` of the ``m`` rows active with
    multipliers ~1 at a random vertex ``y0`` (a nondegenerate vertex: unique solution, and a
    bounded FFO ghost problem)."""
    y0 = rng.standard_normal(n)
    G = rng.standard_normal((m, n))
    active = np.arange(m) < n
    h = G @ y0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    lam = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    q = -(G.T @ lam)

    def build():
        import cvxpy as cp

        y = cp.Variable(n, name="y")
        qp_, Gp, hp = (
            cp.Parameter(n, name="q"),
            cp.Parameter((m, n), name="G"),
            cp.Parameter(m, name="h"),
        )
        prob = cp.Problem(cp.Minimize(qp_ @ y), [Gp @ y <= hp])
        return prob, [qp_, Gp, hp], [y]

    return LayerCase(build, [q, G, h], [rng.standard_normal(n)])


def _socp_layer(rng, n: int, k: int) -> LayerCase:
    q = -3.0 * rng.standard_normal(n)
    F = rng.standard_normal((k, n))
    f = 0.1 * rng.standard_normal(k)
    r = np.array([1.0])

    def build():
        import cvxpy as cp

        y = cp.Variable(n, name="y")
        qp_, Fp = cp.Parameter(n, name="q"), cp.Parameter((k, n), name="F")
        fp, rp = cp.Parameter(k, name="f"), cp.Parameter(1, name="r")
        prob = cp.Problem(
            cp.Minimize(0.5 * cp.sum_squares(y) + qp_ @ y), [cp.norm(Fp @ y + fp, 2) <= rp[0]]
        )
        return prob, [qp_, Fp, fp, rp], [y]

    return LayerCase(build, [q, F, f, r], [rng.standard_normal(n)])


def _exp_layer(rng, n: int, m: int) -> LayerCase:
    G = rng.standard_normal((m, n))
    h = rng.standard_normal(m)
    q = rng.standard_normal(n)

    def build():
        import cvxpy as cp

        y = cp.Variable(n, name="y")
        Gp, hp, qp_ = (
            cp.Parameter((m, n), name="G"),
            cp.Parameter(m, name="h"),
            cp.Parameter(n, name="q"),
        )
        prob = cp.Problem(
            cp.Minimize(cp.log_sum_exp(Gp @ y + hp) + 0.5 * cp.sum_squares(y) + qp_ @ y)
        )
        return prob, [Gp, hp, qp_], [y]

    return LayerCase(build, [G, h, q], [rng.standard_normal(n)])


# -- the zoo ------------------------------------------------------------------------------


def build_zoo(seed: int = 0) -> list[Instance]:
    """All instances, deterministic for a given ``seed``."""
    zoo: list[Instance] = []

    def add(
        name,
        cls,
        variant="well",
        profile=None,
        samples=None,
        expect=None,
        layer=None,
        description="",
        limit=None,
    ):
        if profile is None:
            profile = {"scaled": "scaled", "degenerate": "degenerate"}.get(variant, "well")
            if cls in ("socp", "exp", "sdp"):
                profile = "cone-scaled" if variant == "scaled" else "cone"
        zoo.append(
            Instance(name, cls, variant, profile, samples or [], expect, layer, description, limit)
        )

    def one(name, **kw):
        return [constructed(_rng(seed, name), **kw)]

    def batch(name, count, **kw):
        rng = _rng(seed, name)
        return [constructed(rng, **kw) for _ in range(count)]

    def scaled_one(name, **kw):
        rng = _rng(seed, name)
        return [scaled(constructed(rng, **kw), rng)]

    lp = dict(objective="lp", reg=1e-2)
    linear = dict(objective="linear", box=10.0)
    # LP with small quadratic regularisation (1e-2 I)
    add(
        "lp-vertex-n10",
        "lp",
        samples=one("lp-vertex-n10", n=10, p=2, nonneg="A" * 8 + "I" * 5, **lp),
        description="10 active constraints: a vertex",
    )
    add(
        "lp-face-n12",
        "lp",
        samples=one("lp-face-n12", n=12, p=1, nonneg="A" * 6 + "I" * 6, **lp),
        description="solution on a face",
    )
    add(
        "lp-batch4",
        "lp",
        "batched",
        samples=batch("lp-batch4", 4, n=8, p=1, nonneg="AAAAIIII", **lp),
    )
    add(
        "lp-scaled-n10",
        "lp",
        "scaled",
        samples=scaled_one("lp-scaled-n10", n=10, p=2, nonneg="AAAAAIIIII", **lp),
    )
    add(
        "lp-degenerate-n10",
        "lp",
        "degenerate",
        samples=one("lp-degenerate-n10", n=10, p=1, nonneg="AAAwwnnIII", **lp),
        description="2 weakly active rows (lam 1e-3), 2 nearly active rows (s 1e-3)",
    )
    add(
        "lp-infeasible",
        "lp",
        "infeasible",
        samples=[lp_infeasible(_rng(seed, "lpi"))],
        expect=EXPECT_INFEASIBLE,
    )
    add(
        "lp-unbounded",
        "lp",
        "unbounded",
        samples=[lp_unbounded(_rng(seed, "lpu"))],
        expect=EXPECT_UNBOUNDED,
    )
    add(
        "lp-layer",
        "lp",
        "layer",
        layer=_lp_layer(_rng(seed, "lp-layer"), 6, 10),
        description="FFOLayer, parameters q, G, h",
    )
    # pure LPs (no quadratic term): a nondegenerate vertex, n active rows (equalities included)
    add(
        "lp-pure-vertex-n8",
        "lp",
        samples=one("lp-pure-vertex-n8", n=8, p=2, nonneg="A" * 6 + "I" * 6, **linear),
        description="pure LP (P = None): a vertex of 2 equalities + 6 active rows, in a box",
    )
    add(
        "lp-pure-ineq-n10",
        "lp",
        samples=one("lp-pure-ineq-n10", n=10, p=0, nonneg="A" * 10 + "I" * 8, **linear),
        description="pure LP, inequalities only: a vertex of 10 active rows, in a box",
    )
    add(
        "lp-pure-batch4",
        "lp",
        "batched",
        samples=batch("lp-pure-batch4", 4, n=6, p=1, nonneg="AAAAAIIII", **linear),
        description="pure LPs, 4 samples of one structure",
    )
    add(
        "lp-pure-scaled-n8",
        "lp",
        "scaled",
        samples=scaled_one("lp-pure-scaled-n8", n=8, p=2, nonneg="A" * 6 + "I" * 5, **linear),
        description="pure LP, rows and columns scaled by 10^U(-2, 2)",
    )
    add(
        "lp-pure-layer",
        "lp",
        "layer",
        layer=_lp_pure_layer(_rng(seed, "lp-pure-layer"), 5, 9),
        description="FFOLayer on a pure LP (no quadratic term), parameters q, G, h",
    )
    # limits: a backend stopped after 1 iteration / 1 microsecond must say so
    add(
        "lp-pure-iter-limit",
        "lp",
        "limit",
        samples=one("lp-pure-iter-limit", n=12, p=2, nonneg="A" * 10 + "I" * 8, **linear),
        limit="iterations",
        description=f"pure LP solved with an iteration limit of {ITERATION_LIMIT}",
    )
    add(
        "lp-pure-time-limit",
        "lp",
        "limit",
        samples=one(
            "lp-pure-time-limit", n=60, p=4, nonneg="A" * 56 + "I" * 40, density=0.3, **linear
        ),
        limit="time",
        description=f"pure LP, n = 60, solved with a time limit of {TIME_LIMIT:g} s",
    )

    # QP with equalities and inequalities
    add("qp-eq-ineq-n12", "qp", samples=one("qp-eq-ineq-n12", n=12, p=3, nonneg="AAAA" + "I" * 6))
    add(
        "qp-ineq-n20",
        "qp",
        samples=one("qp-ineq-n20", n=20, p=0, nonneg="A" * 8 + "I" * 12, density=0.4),
    )
    add(
        "qp-eq-only-n8",
        "qp",
        samples=one("qp-eq-only-n8", n=8, p=3),
        description="equalities only (no cone rows)",
    )
    add(
        "qp-interior-n6",
        "qp",
        samples=one("qp-interior-n6", n=6, p=1, nonneg="IIIII"),
        description="no active inequality",
    )
    add("qp-batch4", "qp", "batched", samples=batch("qp-batch4", 4, n=10, p=2, nonneg="AAAIIII"))
    add(
        "qp-scaled-n12",
        "qp",
        "scaled",
        samples=scaled_one("qp-scaled-n12", n=12, p=3, nonneg="AAAA" + "I" * 6),
    )
    add(
        "qp-degenerate-n12",
        "qp",
        "degenerate",
        samples=one("qp-degenerate-n12", n=12, p=2, nonneg="AAwwwnnnIII"),
        description="3 weakly active rows (lam 1e-3), 3 nearly active rows (s 1e-3)",
    )
    add(
        "qp-infeasible",
        "qp",
        "infeasible",
        samples=[qp_infeasible(_rng(seed, "qpi"))],
        expect=EXPECT_INFEASIBLE,
    )
    add(
        "qp-unbounded",
        "qp",
        "unbounded",
        samples=[qp_unbounded(_rng(seed, "qpu"))],
        expect=EXPECT_UNBOUNDED,
    )
    add(
        "qp-iter-limit",
        "qp",
        "limit",
        samples=one("qp-iter-limit", n=20, p=3, nonneg="A" * 6 + "I" * 10),
        limit="iterations",
        description=f"QP solved with an iteration limit of {ITERATION_LIMIT}",
    )
    add(
        "qp-time-limit",
        "qp",
        "limit",
        samples=one("qp-time-limit", n=80, p=5, nonneg="A" * 30 + "I" * 50, density=0.3),
        limit="time",
        description=f"QP, n = 80, solved with a time limit of {TIME_LIMIT:g} s",
    )
    add(
        "qp-layer",
        "qp",
        "layer",
        layer=qp_layer_case(_rng(seed, "qp-layer"), 8, 6, 2, None),
        description="FFOLayer, parameters F, q, G, h, A, b",
    )
    add(
        "qp-layer-batch3",
        "qp",
        "layer",
        layer=qp_layer_case(_rng(seed, "qp-layer-b"), 8, 6, 2, 3),
        description="FFOLayer, q and h batched (3), the rest broadcast",
    )

    # SOCP
    add(
        "socp-n10",
        "socp",
        samples=one("socp-n10", n=10, p=1, nonneg="AII", soc=[(4, True), (3, False)]),
    )
    add(
        "socp-lp-n8",
        "socp",
        samples=one("socp-lp-n8", n=8, p=0, nonneg="AAI", soc=[(5, True)], **lp),
    )
    add(
        "socp-pure-n6",
        "socp",
        samples=one("socp-pure-n6", n=6, p=1, nonneg="AAI", soc=[(4, True)], **linear),
        description="linear objective: 3 free directions, curved by the active SOC(4)",
    )
    add(
        "socp-batch3",
        "socp",
        "batched",
        samples=batch("socp-batch3", 3, n=8, p=1, nonneg="AI", soc=[(3, True)]),
    )
    add(
        "socp-scaled-n10",
        "socp",
        "scaled",
        samples=scaled_one("socp-scaled-n10", n=10, p=1, nonneg="AII", soc=[(4, True), (3, False)]),
    )
    add(
        "socp-iter-limit",
        "socp",
        "limit",
        samples=one("socp-iter-limit", n=10, p=1, nonneg="AII", soc=[(4, True), (3, False)]),
        limit="iterations",
        description=f"SOCP solved with an iteration limit of {ITERATION_LIMIT}",
    )
    add(
        "socp-infeasible",
        "socp",
        "infeasible",
        samples=[socp_infeasible(_rng(seed, "si"))],
        expect=EXPECT_INFEASIBLE,
    )
    add(
        "socp-unbounded",
        "socp",
        "unbounded",
        samples=[socp_unbounded(_rng(seed, "su"))],
        expect=EXPECT_UNBOUNDED,
    )
    add(
        "socp-layer",
        "socp",
        "layer",
        layer=_socp_layer(_rng(seed, "socp-layer"), 6, 3),
        description="FFOLayer, ||F y + f|| <= r",
    )

    # exponential cone
    add("exp-n8", "exp", samples=one("exp-n8", n=8, p=1, nonneg="AI", exp="AAI"))
    add("exp-lp-n6", "exp", samples=one("exp-lp-n6", n=6, p=0, nonneg="I", exp="AA", **lp))
    add(
        "exp-pure-n5",
        "exp",
        samples=one("exp-pure-n5", n=5, p=1, nonneg="AAI", exp="A", **linear),
        description="linear objective: 2 free directions, curved by the active EXP cone",
    )
    add(
        "exp-batch3",
        "exp",
        "batched",
        samples=batch("exp-batch3", 3, n=6, p=1, nonneg="I", exp="AI"),
    )
    add(
        "exp-scaled-n8",
        "exp",
        "scaled",
        samples=scaled_one("exp-scaled-n8", n=8, p=1, nonneg="AI", exp="AAI"),
    )
    add(
        "exp-infeasible",
        "exp",
        "infeasible",
        samples=[exp_infeasible(_rng(seed, "ei"))],
        expect=EXPECT_INFEASIBLE,
    )
    add(
        "exp-layer",
        "exp",
        "layer",
        layer=_exp_layer(_rng(seed, "exp-layer"), 5, 4),
        description="FFOLayer, log-sum-exp objective",
    )

    # SDP
    add("sdp-n10", "sdp", samples=one("sdp-n10", n=10, p=1, nonneg="AI", psd=[(3, 1)]))
    add(
        "sdp-two-blocks-n14",
        "sdp",
        samples=one("sdp-two-blocks-n14", n=14, p=1, nonneg="AII", psd=[(3, 2), (2, 2)]),
        description="an active PSD(3) block and an inactive PSD(2) block",
    )
    add(
        "sdp-pure-n5",
        "sdp",
        samples=one("sdp-pure-n5", n=5, p=1, nonneg="AI", psd=[(3, 1)], **linear),
        description="linear objective: a rank-1 PSD(3) slack, rank-2 multiplier",
    )
    add(
        "sdp-batch3",
        "sdp",
        "batched",
        samples=batch("sdp-batch3", 3, n=9, p=0, nonneg="AI", psd=[(3, 1)]),
    )
    add(
        "sdp-infeasible",
        "sdp",
        "infeasible",
        samples=[sdp_infeasible(_rng(seed, "di"))],
        expect=EXPECT_INFEASIBLE,
    )
    return zoo


def select(zoo: list[Instance], classes=None) -> list[Instance]:
    """Instances whose class, group (``"qp/scaled"``), variant, tag (``"linear"``) or name
    is in ``classes``."""
    if not classes:
        return list(zoo)
    wanted = {c.strip().lower() for c in classes if c.strip()}
    known = (
        set(CLASSES) | set(VARIANTS) | set(TAGS) | {i.group for i in zoo} | {i.name for i in zoo}
    )
    unknown = wanted - known
    if unknown:
        raise ValueError(
            f"unknown problem class(es) {', '.join(sorted(unknown))}; "
            f"classes: {', '.join(CLASSES)}; variants: {', '.join(VARIANTS)}; "
            f"tags: {', '.join(TAGS)}; or a group such as 'qp/scaled', or an instance name"
        )
    return [i for i in zoo if ({i.cls, i.group, i.variant, i.name} | i.tags) & wanted]


def get_instance(name: str, seed: int = 0) -> Instance:
    """The zoo instance called ``name`` (as the report names it), rebuilt exactly: the same
    seed gives the same arrays.  ``inst.samples[k].g``, ``.h``, ``.e`` are the protocol
    objects the suite passed to ``solve``, ``.c`` the upstream gradient of the gradient
    checks, ``.truth`` the constructed optimum; ``inst.layer.build()`` gives a layer
    instance's CVXPY problem."""
    for inst in build_zoo(seed):
        if inst.name == name:
            return inst
    raise KeyError(f"no zoo instance {name!r} (ffo conformance --list shows them)")
