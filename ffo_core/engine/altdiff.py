"""Alt-Diff: ADMM for polyhedral QPs, differentiated alternately with the iterations.

Size: one algorithm, the ADMM iterations and the derivative recursion that runs alongside
them; they share every intermediate and read top to bottom.

Sun, Shi, Wang, Tuan, Poor, Tao, "Alternating Differentiation for Optimization Layers",
ICLR 2023.  This module is the third way the library can differentiate a QP, beside the
first-order ghost problem (:mod:`ffo_core.engine.ffo_backward`, no factorisation) and the
exact reduced KKT system (:mod:`ffo_core.engine.kkt_backward`, sparse LU of an
``(n + p + |L|)``-square matrix).  Alt-Diff factorises one ``n x n`` matrix per sample and
iterates; both its passes can be stopped early at a tolerance, and the gradient is then
wrong by the same order as the solution (its Theorem 4.1).  Everything here is torch,
batched over samples, on the data's device (CPU or CUDA) and dtype (float32 or float64).

The problem (one sample; dense tensors, a batch adds a leading dimension ``B``; a matrix
with leading dimension 1 is shared by the batch, see :class:`QPData`)::

    minimize 1/2 x'Px + q'x   subject to   A x = b   (p rows, dual nu, free)
                                           G x <= h  (m rows, dual lam >= 0, slack s = h - Gx)

in the library's conventions: ``Px + q + A'nu + G'lam = 0``, ``lam >= 0``, ``s >= 0``,
``s'lam = 0``.  ``p`` or ``m`` may be 0.  ``P`` must be symmetric positive semidefinite and
``P + A'A + G'G`` positive definite (a unique ``x``; otherwise :class:`SolverError`).

1. Scaling and the penalty rho
------------------------------
Each row of ``A`` and of ``G`` is divided by its Euclidean norm (with ``b`` and ``h``), so a
primal residual measures a distance to the row's hyperplane and the multipliers of the
scaled problem are ``nu_i ||A_i||`` and ``lam_i ||G_i||``; everything below is the scaled
problem, and the answers are mapped back.  With unit rows the constraint Gram
``A'A + G'G`` has eigenvalues of order one, so the penalty ``rho`` is put at the scale of
the objective's curvature: ``rho = trace(P) / n``, the mean eigenvalue of ``P`` (per
sample).  Multiplying the objective by ``alpha`` multiplies ``rho`` and the duals by
``alpha`` and leaves the iterates' ``x`` unchanged; multiplying a row by ``beta`` changes
nothing (it is normalised away); so the iteration count is scale-free.  On the three
problem families of docs/altdiff.md (dense, DFL, random strictly complementary; n = 200)
this choice was the fastest of ``rho x {0.01, 0.1, 1, 10, 100}``.  An LP
(``P = 0``) has no curvature scale; there ``rho = ||q||_2 / sqrt(n)`` (see
:func:`default_rho`), and ADMM is slow on LPs whatever ``rho``: use another mode.  A
caller may pass ``rho`` (a number or a ``(B,)`` tensor) instead.

2. The forward: ADMM with a slack (what Alt-Diff runs)
------------------------------------------------------
With the slack ``s >= 0`` (``Gx + s = h``) and the augmented Lagrangian
``L_rho = 1/2 x'Px + q'x + nu'(Ax - b) + lam'(Gx + s - h)
+ rho/2 ||Ax - b||^2 + rho/2 ||Gx + s - h||^2``, one iteration is

    x+   = H^-1 ( -q - A'nu - G'lam + rho A'b + rho G'(h - s) ),  H = P + rho A'A + rho G'G
    s+   = max(0, v),                    v = h - G x+ - lam/rho
    nu+  = nu + rho (A x+ - b)
    lam+ = lam + rho (G x+ + s+ - h)  =  max(0, lam + rho (G x+ - h))  =  rho max(0, -v)

``H`` is factorised once (Cholesky; its inverse is formed from the factor, so an iteration
is one batched matrix-vector product rather than two triangular solves, which batch
poorly on CPUs and GPUs alike).
``s+`` and ``lam+`` are the positive and negative parts of one vector, so every iterate is
exactly complementary with ``s, lam >= 0``, and at a fixed point ``Ax = b``,
``Gx + s = h``: a KKT point.  The stationarity residual of an iterate is
``P x+ + q + A'nu+ + G'lam+ = rho G'(s+ - s)``.  Stopping rule (relative, OSQP-like, in the
scaled problem; ``tol`` is dimensionless; ``|Px|`` is left out of the dual scale, as at the
solution it is at most the sum of the other three)::

    max(|A x - b|, |G x + s - h|)   <= tol * max(|A x|, |G x|, |s|, |b|, |h|)
    |rho G'(s+ - s)|                <= tol * max(|q|, |A'nu|, |G'lam|)              (inf-norms)

A warm start gives ``(nu, lam)`` and ``s`` (or ``x``, then ``s = max(0, h - Gx)``): the
iteration's state is ``(s, nu, lam)``; ``x`` is a function of it.

3. The backward: the adjoint of the ADMM map
--------------------------------------------
Write one iteration as ``z+ = F(z; theta)`` for the state ``z = (s, nu, lam)`` and the
output as ``x = X(z; theta)`` (the x-update).  At the fixed point ``z* = F(z*)`` the loss
``c'x*`` has, by the implicit function theorem applied to ``z = F(z)``,

    d(c'x*)/d theta = c' X_theta + mu' F_theta,     mu = F_z' mu + X_z' c,

and the adjoint ``mu`` is found by iterating ``mu <- F_z' mu + X_z' c`` (the reverse-mode
counterpart of Alt-Diff's forward recursion of ``dz/d theta``: it converges at ADMM's own
local linear rate, stores three vectors per sample, and never forms a Jacobian).  At the
fixed point ``F`` is piecewise linear with the 0/1 diagonal masks ``D = [v > 0]`` (rows
with ``s > 0``: inactive) and ``E = I - D`` (active rows); linearising the four updates,

    dx   = H^-1 ( -dq - A'dnu - G'dlam - rho G'ds + rho A'db + rho G'dh )
    ds+  = D ( dh - G dx - dlam/rho )
    dnu+ = dnu + rho (A dx - db)
    dlam+ = E ( dlam + rho (G dx - dh) ),

and transposing (an adjoint ``a_x`` of ``dx`` and ``(a_s, a_nu, a_lam)`` of the new state;
``t = H^-1 (a_x - G'D a_s + rho A'a_nu + rho G'E a_lam)``) gives the adjoint step

    mu_s <- -rho G t,   mu_nu <- mu_nu - A t,   mu_lam <- E mu_lam - D mu_s / rho - G t

with ``a_x = c`` (the output is the last x-update), and the data gradient
``dq = -t``, ``db = rho A t - rho mu_nu``, ``dh = rho G t + D mu_s - rho E mu_lam``.
Renaming ``u = -t``, ``nu~ = rho mu_nu``, ``lam~ = rho mu_lam`` (and eliminating
``mu_s = rho G u_prev``) turns the recursion into the one this module runs::

    H u_k    = -c - A' nu~_{k-1} - G' ( E lam~_{k-1} - rho D G u_{k-1} )
    nu~_k    = nu~_{k-1} + rho A u_k
    lam~_k   = E lam~_{k-1} - rho D G u_{k-1} + rho G u_k           (u_{-1} = 0, nu~ = lam~ = 0)

whose iterate *is* the answer in the engine's form: ``dq = u``, ``db = -nu~``,
``dh = -lam~``, so ``direction = (w_x, w_nu, w_lam) = (u, nu~, E lam~)``.  Indeed, by
construction ``P u_k + A'nu~_k + G'lam~_k = -c`` at every ``k``, and at the fixed point
``A u = 0``, ``E G u = 0``, ``D lam~ = 0``: ``(u, nu~, lam~_L)`` solves the reduced KKT
system of :mod:`ffo_core.engine.kkt_backward`

    [ P   A'  G_L' ] [ w_x   ]   [ -c ]
    [ A   0   0    ] [ w_nu  ] = [  0 ]          L = the active rows (E = 1),
    [ G_L 0   0    ] [ w_L   ]   [  0 ]

so the matrix parts of the gradient follow from the envelope theorem exactly as in the
other two modes (:func:`ffo_core.engine.ffo_backward.lagrangian_gradient_derivative`):
``dP = (w_x x' + x w_x')/2``, ``dA = w_nu x' + nu w_x'``, ``dG = w_lam x' + lam w_x'``
(:func:`data_gradient` forms them densely).  The recursion is ADMM applied to that equality
QP (``min 1/2 u'Pu + c'u`` s.t. ``Au = 0``, ``G_L u = 0``, inactive rows free), and it is
stopped by the same relative rule as the forward, now on the residuals of that system::

    max(|A u|, |E G u|)  <= tol * max(|u|, |G u|, |u_0|)         (u_0 = -H^-1 c, the first iterate)
    |G' D lam~|          <= tol * max(|c|, |A'nu~|, |G'lam~|)

(``G' D lam~`` is the stationarity residual of the returned, masked direction).
:func:`altdiff_backward` runs this recursion *alternately* with further ADMM steps on the
point, as Alt-Diff does: while the point's own residual is above ``tol`` every iteration
takes one primal step and one adjoint step (one matrix product with two right-hand
sides), the masks ``D``, ``E`` taken from the current iterate; a warm start from an accurate
solution (Clarabel's) passes the primal test after one step and only the adjoint runs.
The truncated variant is this with a loose ``tol``: both errors fall with ``tol``
(docs/altdiff.md measures them).

Cost per sample: the factorisation and inverse of ``H`` (``n^3``, once per forward; the
backward reuses the forward's :class:`AltDiffFactor` when given it), then per iteration one
``n x n`` matrix-vector product and a few products with ``A`` and ``G``; memory ``n^2`` for
``H^-1`` plus ``O(n + m + p)`` for the iteration.  The masks are exact only away from
degenerate rows (``s_i = lam_i = 0``), where the derivative does not exist; there Alt-Diff,
like the KKT mode, takes the one-sided derivative its iterate happens to select.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import InvalidParameterError, SolverError

__all__ = [
    "AltDiffBackward",
    "AltDiffFactor",
    "AltDiffSolution",
    "QPData",
    "altdiff_backward",
    "altdiff_factor",
    "altdiff_solve",
    "data_gradient",
    "default_rho",
]

#: Iterations between two checks of "is every sample done?" (a device synchronisation on
#: CUDA); the per-sample test itself runs every iteration, so counts are exact.
SYNC_EVERY = 10


class QPData(NamedTuple):
    """A batch of QPs ``min 1/2 x'Px + q'x s.t. Ax = b, Gx <= h`` as dense tensors.

    ``P (B, n, n)`` symmetric PSD, ``q (B, n)``, ``A (B, p, n)``, ``b (B, p)``,
    ``G (B, m, n)``, ``h (B, m)``; one floating dtype (float32 or float64) and one device;
    ``p``, ``m`` may be 0.  Any of them may have leading dimension 1 instead of ``B``: the
    same for every sample (as in :class:`~ffo_core.protocol.ProblemBatch`).  When ``P``,
    ``A`` and ``G`` all are, the batch shares one factorisation and every iteration is one
    matrix product for the whole batch.
    """

    P: torch.Tensor
    q: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor


def _check(data) -> QPData:
    """Validate the six tensors; vectors given with a leading 1 are expanded to ``B``,
    matrices keep their leading 1 (shared by the batch)."""
    data = QPData(*data)
    q = data.q
    for name, t in zip(QPData._fields, data):
        if not isinstance(t, torch.Tensor):
            raise InvalidParameterError(f"altdiff: {name} must be a torch tensor, got {type(t)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise InvalidParameterError(
                f"altdiff: {name} must be float32 or float64, got {t.dtype}"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise InvalidParameterError(
                f"altdiff: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}; "
                "pass every tensor with one dtype and device"
            )
        if t.dim() != (3 if name in "PAG" else 2):
            want = "(B, rows, n)" if name in "PAG" else "(B, size)"
            raise InvalidParameterError(
                f"altdiff: {name} must be {want} (B may be 1: shared), got {tuple(t.shape)}"
            )
    B = max(t.shape[0] for t in data)
    n, p, m = q.shape[1], data.A.shape[1], data.G.shape[1]
    shapes: dict[str, tuple[int, ...]] = {
        "P": (n, n),
        "q": (n,),
        "A": (p, n),
        "b": (p,),
        "G": (m, n),
        "h": (m,),
    }
    for name, shape in shapes.items():
        t = getattr(data, name)
        if tuple(t.shape[1:]) != shape or t.shape[0] not in (1, B):
            raise InvalidParameterError(
                f"altdiff: {name} must have shape ({B} or 1, {', '.join(map(str, shape))}) "
                f"(n = {n} from q, p = {p} from A, m = {m} from G, batch {B}), "
                f"got {tuple(t.shape)}"
            )
    for name, t in zip(QPData._fields, data):
        if not bool(torch.isfinite(t).all()):
            raise InvalidParameterError(f"altdiff: {name} has NaN or Inf entries")
    return data._replace(q=data.q.expand(B, n), b=data.b.expand(B, p), h=data.h.expand(B, m))


def _inf(x: torch.Tensor) -> torch.Tensor:
    """Per-sample infinity norm over the last dimension ``(B, k) -> (B,)`` (0 when k = 0)."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[0])
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=-1)


def _pick(active: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` for the samples still iterating, ``old`` for the others (``active`` None:
    every sample iterates)."""
    return new if active is None else torch.where(active.unsqueeze(-1), new, old)


def _still_active(done: torch.Tensor) -> torch.Tensor | None:
    """The mask of samples still iterating, or None when that is all of them (known for
    free on the CPU; on a GPU asking would synchronise, so the mask is always used)."""
    if done.device.type == "cpu" and not bool(done.any()):
        return None
    return ~done


def _mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched ``M v``: ``(B or 1, r, k) x (B, k) -> (B, r)`` (a shared ``M``: one GEMM)."""
    if M.shape[0] == 1:
        return v @ M[0].transpose(0, 1)
    return torch.bmm(M, v.unsqueeze(-1)).squeeze(-1)


def _tmv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched ``M' v``: ``(B or 1, r, k) x (B, r) -> (B, k)``."""
    if M.shape[0] == 1:
        return v @ M[0]
    return torch.bmm(v.unsqueeze(1), M).squeeze(1)


def _solve(H_inv: torch.Tensor, *vs: torch.Tensor) -> list[torch.Tensor]:
    """``H^-1 v`` for each ``v`` ``(B, n)``, in one product (``H^-1`` symmetric)."""
    if H_inv.shape[0] == 1:
        out = torch.cat(vs) @ H_inv[0]
        return list(out.split(vs[0].shape[0]))
    out = torch.bmm(H_inv, torch.stack(vs, dim=-1))
    return list(out.unbind(-1))


def default_rho(P: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The penalty for the row-normalised problem, per sample ``(B,)``: the mean eigenvalue
    of ``P``, ``trace(P) / n``; for a sample whose ``P`` is (numerically) zero, an LP,
    ``||q||_2 / sqrt(n)`` (the cost's size per coordinate: the multipliers' scale), and 1 if
    that is zero as well."""
    n = q.shape[-1]
    rho = torch.diagonal(P, dim1=-2, dim2=-1).sum(-1) / max(n, 1)
    lp = torch.linalg.vector_norm(q, dim=-1) / max(n, 1) ** 0.5
    tiny = torch.finfo(q.dtype).eps * torch.ones_like(rho)
    rho = torch.where(rho > tiny * lp.clamp(min=1.0), rho, lp)
    return torch.where(rho > 0, rho, torch.ones_like(rho))


@dataclass
class AltDiffFactor:
    """The row-normalised data and the inverse of ``H = P + rho (A'A + G'G)``, per sample.

    ``A``, ``b``, ``G``, ``h``: rows divided by ``row_A`` ``(B or 1, p)`` / ``row_G``
    ``(B or 1, m)`` (a zero row is left as is, norm 1); ``rho`` ``(B,)``; ``H_inv``
    ``(B, n, n)``, or ``(1, n, n)`` when ``P``, ``A``, ``G`` are shared; ``rhs0``
    ``(B, n)`` is the constant part ``-q + rho A'b + rho G'h`` of the x-update.  Made by
    :func:`altdiff_factor`; :func:`altdiff_solve` returns the one it used, and
    :func:`altdiff_backward` takes it back to skip the ``n^3`` work.
    """

    P: torch.Tensor
    q: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    row_A: torch.Tensor
    row_G: torch.Tensor
    rho: torch.Tensor
    H_inv: torch.Tensor
    rhs0: torch.Tensor


def _row_norms(M: torch.Tensor) -> torch.Tensor:
    r = torch.linalg.vector_norm(M, dim=-1)
    return torch.where(r > 0, r, torch.ones_like(r))


def altdiff_factor(data, rho: float | torch.Tensor | None = None) -> AltDiffFactor:
    """Normalise the rows, choose ``rho`` (:func:`default_rho` unless given: a float or a
    ``(B,)`` tensor) and invert ``H`` through its Cholesky factor.

    When ``P``, ``A`` and ``G`` are all shared by the batch (leading dimension 1), so are
    ``H`` and its one factorisation, and every iteration is one matrix product for the
    whole batch; ``rho`` is then one number (by default from the batch's root-mean-square
    ``q`` where it depends on ``q``).  Raises :class:`SolverError` (with the first failing
    ``batch_index``) when ``H`` is not positive definite: ``P`` is not positive definite on
    the null space of ``[A; G]``, so the solution is not unique (or ``P`` is not PSD)."""
    P, q, A, b, G, h = _check(data)
    B = q.shape[0]
    shared = P.shape[0] == A.shape[0] == G.shape[0] == 1
    row_A, row_G = _row_norms(A), _row_norms(G)
    A, b = A / row_A.unsqueeze(-1), b / row_A
    G, h = G / row_G.unsqueeze(-1), h / row_G
    if rho is None:
        q_rho = q.square().mean(0, keepdim=True).sqrt() if shared else q
        rho_t = default_rho(P, q_rho).expand(B).clone()
    else:
        rho_t = torch.as_tensor(rho, dtype=q.dtype, device=q.device)
        if rho_t.numel() not in (1, B):
            raise InvalidParameterError(
                f"altdiff: rho must be a number or have {B} entries, got {tuple(rho_t.shape)}"
            )
        rho_t = rho_t.reshape(-1).expand(B).clone()
        if not bool((rho_t > 0).all()) or not bool(torch.isfinite(rho_t).all()):
            raise InvalidParameterError(f"altdiff: rho must be positive and finite, got {rho}")
    if shared and not bool((rho_t == rho_t[0]).all()):
        shared = False  # one H per sample
    r3 = (rho_t[:1] if shared else rho_t).view(-1, 1, 1)
    H = P + r3 * (A.transpose(1, 2) @ A + G.transpose(1, 2) @ G)
    H = 0.5 * (H + H.transpose(1, 2))
    L, info = torch.linalg.cholesky_ex(H)
    bad = torch.nonzero(info).flatten()
    if bad.numel():
        k = int(bad[0])
        where = "(P, A and G are shared by the batch)" if H.shape[0] == 1 else ""
        raise SolverError(
            f"altdiff: P + rho (A'A + G'G) is not positive definite at batch index {k} "
            f"{where}(P is not positive definite on the null space of the constraints, so "
            "the QP has no unique solution, or P is not positive semidefinite)",
            batch_index=k,
            backend="altdiff",
        )
    H_inv = torch.cholesky_inverse(L)
    rhs0 = -q + rho_t.unsqueeze(-1) * (_tmv(A, b) + _tmv(G, h))
    return AltDiffFactor(P, q, A, b, G, h, row_A, row_G, rho_t, H_inv, rhs0)


@dataclass
class AltDiffSolution:
    """What :func:`altdiff_solve` returns, in the library's conventions (unscaled rows).

    ``x (B, n)``, ``nu (B, p)``, ``lam (B, m)`` (``>= 0``), ``s (B, m)`` (``= h - Gx`` to
    ``tol``, ``>= 0``), with ``Px + q + A'nu + G'lam = 0`` to ``tol``; ``iterations`` ``(B,)``
    int64 (ADMM steps taken); ``primal_residual``, ``dual_residual`` ``(B,)``: the relative
    residuals of the stopping rule (module docstring, section 2) at the returned point;
    ``converged`` ``(B,)`` bool (both ``<= tol``); ``factor``: for :func:`altdiff_backward`.
    """

    x: torch.Tensor
    nu: torch.Tensor
    lam: torch.Tensor
    s: torch.Tensor
    iterations: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    converged: torch.Tensor
    factor: AltDiffFactor

    @property
    def point(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, nu, lam, s)``: what :func:`altdiff_backward` and ``warm_start`` take."""
        return self.x, self.nu, self.lam, self.s


class _Primal:
    """ADMM's state on the scaled problem and one step of it (module docstring, section 2)."""

    def __init__(self, f: AltDiffFactor, s, nu, lam) -> None:
        self.f = f
        self.s, self.nu, self.lam = s, nu, lam
        self.x = torch.zeros_like(f.q)
        self.v = torch.zeros_like(f.h)  # h - Gx - lam/rho of the last step: the masks
        self.Gts = _tmv(f.G, s)  # G's
        self.rhs_dual = _tmv(f.A, nu) + _tmv(f.G, lam)  # A'nu + G'lam
        self.data_prim = torch.maximum(_inf(f.b), _inf(f.h))  # the scales' constant parts
        self.data_dual = _inf(f.q)

    def rhs(self) -> torch.Tensor:
        rho = self.f.rho.unsqueeze(-1)
        return self.f.rhs0 - self.rhs_dual - rho * self.Gts

    def step(self, x: torch.Tensor, active: torch.Tensor | None, tol: float) -> torch.Tensor:
        """Finish the step whose x-update ``x = H^-1 rhs()`` the caller computed; samples
        with ``active`` False keep their state (None: all step).  Returns the per-sample
        "converged" flags."""
        f = self.f
        rho = f.rho.unsqueeze(-1)
        Ax, Gx = _mv(f.A, x), _mv(f.G, x)
        v = f.h - Gx - self.lam / rho
        s = v.clamp(min=0.0)
        lam = rho * (-v).clamp(min=0.0)
        nu = self.nu + rho * (Ax - f.b)
        Gts = _tmv(f.G, s)
        Atnu, Gtlam = _tmv(f.A, nu), _tmv(f.G, lam)
        r_prim = torch.maximum(_inf(Ax - f.b), _inf(Gx + s - f.h))
        r_dual = f.rho * _inf(Gts - self.Gts)
        s_prim = torch.stack([_inf(Ax), _inf(Gx), _inf(s), self.data_prim]).amax(0)
        s_dual = torch.stack([self.data_dual, _inf(Atnu), _inf(Gtlam)]).amax(0)
        rel_prim = torch.where(s_prim > 0, r_prim / s_prim, r_prim)
        rel_dual = torch.where(s_dual > 0, r_dual / s_dual, r_dual)
        if active is None or not hasattr(self, "r_prim"):
            self.r_prim, self.r_dual = rel_prim, rel_dual
        else:
            self.r_prim = torch.where(active, rel_prim, self.r_prim)
            self.r_dual = torch.where(active, rel_dual, self.r_dual)
        self.x = _pick(active, x, self.x)
        self.v = _pick(active, v, self.v)
        self.s = _pick(active, s, self.s)
        self.lam = _pick(active, lam, self.lam)
        self.nu = _pick(active, nu, self.nu)
        self.Gts = _pick(active, Gts, self.Gts)
        self.rhs_dual = _pick(active, Atnu + Gtlam, self.rhs_dual)
        return (r_prim <= tol * s_prim) & (r_dual <= tol * s_dual)

    def unscaled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, nu, lam, s)`` of the original problem."""
        f = self.f
        return self.x, self.nu / f.row_A, self.lam / f.row_G, self.s * f.row_G


def _start(f: AltDiffFactor, warm_start) -> _Primal:
    """The initial ADMM state: zeros, or a warm start ``(x, nu, lam[, s])`` (unscaled;
    ``x`` or ``s`` may be None, not both when ``m > 0``)."""
    if warm_start is None:
        return _Primal(f, torch.zeros_like(f.h), torch.zeros_like(f.b), torch.zeros_like(f.h))
    x, nu, lam, *rest = warm_start
    s = rest[0] if rest else None
    like = {"nu": (nu, f.b), "lam": (lam, f.h)}
    for name, (t, ref) in like.items():
        if t is None or tuple(t.shape) != tuple(ref.shape):
            raise InvalidParameterError(
                f"altdiff: warm start {name} must have shape {tuple(ref.shape)}, "
                f"got {None if t is None else tuple(t.shape)}"
            )
    nu = nu.to(f.q) * f.row_A
    lam = lam.to(f.q).clamp(min=0.0) * f.row_G
    if s is not None:
        s = s.to(f.q).clamp(min=0.0) / f.row_G
    elif x is not None:
        s = (f.h - _mv(f.G, x.to(f.q))).clamp(min=0.0)
    else:
        raise InvalidParameterError("altdiff: a warm start needs x or s")
    return _Primal(f, s, nu, lam)


def altdiff_solve(
    data,
    *,
    tol: float = 1e-6,
    max_iter: int = 10_000,
    rho: float | torch.Tensor | None = None,
    warm_start: tuple | None = None,
    factor: AltDiffFactor | None = None,
) -> AltDiffSolution:
    """Solve a batch of QPs by ADMM (module docstring, section 2).

    Args:
        data: :class:`QPData` or the tuple ``(P, q, A, b, G, h)`` of dense tensors.
        tol: relative tolerance of the stopping rule (dimensionless).
        max_iter: most ADMM steps; samples not done then have ``converged`` False (no
            error: the caller decides, e.g. by raising :class:`SolverError`).
        rho: the penalty (float or ``(B,)``); default :func:`default_rho`.
        warm_start: ``(x, nu, lam)`` or ``(x, nu, lam, s)`` of the original problem
            (``x`` may be None when ``s`` is given).
        factor: the :class:`AltDiffFactor` of this data (skips the factorisation).

    Returns an :class:`AltDiffSolution`.
    """
    f = factor if factor is not None else altdiff_factor(data, rho)
    st = _start(f, warm_start)
    B = f.q.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=f.q.device)
    iters = torch.zeros(B, dtype=torch.int64, device=f.q.device)
    every = 1 if f.q.device.type == "cpu" else SYNC_EVERY
    for k in range(max_iter):
        active = _still_active(done)
        (x,) = _solve(f.H_inv, st.rhs())
        done = done | st.step(x, active, tol)
        iters += 1 if active is None else active
        if (k + 1) % every == 0 and bool(done.all()):
            break
    x, nu, lam, s = st.unscaled()
    r_prim = st.r_prim if max_iter > 0 else torch.full_like(f.rho, float("inf"))
    r_dual = st.r_dual if max_iter > 0 else torch.full_like(f.rho, float("inf"))
    return AltDiffSolution(x, nu, lam, s, iters, r_prim, r_dual, done, f)


class AltDiffBackward(NamedTuple):
    """What :func:`altdiff_backward` returns.

    ``base = (x, nu, lam)`` and ``direction = (w_x, w_nu, w_lam)``, tensors ``(B, n)``,
    ``(B, p)``, ``(B, m)`` in the data's dtype and device: the gradient of ``sum_k
    c_k'x*_k`` is the derivative of the Lagrangian's data gradient at ``base`` along
    ``direction`` (:func:`data_gradient`).  ``info``: ``iterations`` ``(B,)`` adjoint steps,
    ``primal_iterations`` ``(B,)`` ADMM steps taken on the point, ``residual`` ``(B,)``
    (the larger relative residual of the adjoint's stopping rule), ``converged`` ``(B,)``
    bool (point and adjoint both within ``tol``), ``rho`` ``(B,)``, ``factor``.
    """

    base: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    direction: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    info: dict


def altdiff_backward(
    data,
    point: tuple,
    c: torch.Tensor,
    tol: float = 1e-6,
    max_iter: int = 10_000,
    *,
    rho: float | torch.Tensor | None = None,
    factor: AltDiffFactor | None = None,
) -> AltDiffBackward:
    """Reverse-mode Alt-Diff: the direction whose Lagrangian derivative is ``d(c'x*)/d data``.

    Args:
        data: :class:`QPData` or ``(P, q, A, b, G, h)``, dense tensors (see :class:`QPData`).
        point: the forward solution ``(x, nu, lam)`` or ``(x, nu, lam, s)`` in the library's
            conventions (any solver's; an :class:`AltDiffSolution`'s ``(x, nu, lam, s)``).
            ADMM continues from it, alternating with the adjoint steps, until its own
            residual is within ``tol``.
        c: the upstream gradient ``dloss/dx``, ``(B, n)``.
        tol: relative tolerance of both stopping rules (module docstring, sections 2-3);
            a loose one gives Alt-Diff's truncated variant.
        max_iter: most iterations; samples not done have ``info["converged"]`` False and
            carry the last iterate (no error: the caller decides).
        rho, factor: as in :func:`altdiff_solve` (give the forward's ``factor`` to reuse
            its ``H^-1``; it fixes ``rho``).

    Returns :class:`AltDiffBackward` ``(base, direction, info)``; see the module docstring,
    section 3, for what ``direction`` solves.
    """
    f = factor if factor is not None else altdiff_factor(data, rho)
    if not isinstance(c, torch.Tensor) or tuple(c.shape) != tuple(f.q.shape):
        raise InvalidParameterError(
            f"altdiff: c must be a tensor of shape {tuple(f.q.shape)}, "
            f"got {getattr(c, 'shape', type(c))}"
        )
    c = c.to(f.q)
    if not bool(torch.isfinite(c).all()):
        raise InvalidParameterError("altdiff: c has NaN or Inf entries")
    st = _start(f, point)
    B = f.q.shape[0]
    dev = f.q.device
    every = 1 if dev.type == "cpu" else SYNC_EVERY
    rho = f.rho.unsqueeze(-1)
    zeros_m = torch.zeros_like(f.h)
    c_inf = _inf(c)
    # one primal step first: it gives the masks (and makes a solver's point complementary)
    prim_done = st.step(_solve(f.H_inv, st.rhs())[0], None, tol)
    prim_iters = torch.ones(B, dtype=torch.int64, device=dev)
    all_prim = bool(prim_done.all())
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    u = torch.zeros_like(f.q)
    Gu = zeros_m  # G u_{k-1}
    nu_t = torch.zeros_like(f.b)
    lam_t = zeros_m
    res = torch.full_like(f.rho, float("inf"))
    u0 = None  # |u_0|: the first iterate's size, a floor of the primal scale
    for k in range(max_iter):
        D = st.v > 0  # inactive rows of the current point; E = ~D the active ones
        E = ~D
        vv = torch.where(E, lam_t, -rho * torch.where(D, Gu, zeros_m))
        rhs_u = -c - _tmv(f.A, nu_t) - _tmv(f.G, vv)
        if all_prim:
            (u_new,) = _solve(f.H_inv, rhs_u)
        else:  # alternate: this iteration's primal step shares the product with H^-1
            x, u_new = _solve(f.H_inv, st.rhs(), rhs_u)
        Gu_new, Au = _mv(f.G, u_new), _mv(f.A, u_new)
        nu_new = nu_t + rho * Au
        lam_new = vv + rho * Gu_new
        if u0 is None:
            u0 = _inf(u_new)
        r_prim = torch.maximum(_inf(Au), _inf(torch.where(E, Gu_new, zeros_m)))
        r_dual = _inf(_tmv(f.G, torch.where(D, lam_new, zeros_m)))
        s_prim = torch.stack([_inf(u_new), _inf(Gu_new), u0]).amax(0)
        s_dual = torch.stack([c_inf, _inf(_tmv(f.A, nu_new)), _inf(_tmv(f.G, lam_new))])
        s_dual = s_dual.amax(0)
        adj_ok = (r_prim <= tol * s_prim) & (r_dual <= tol * s_dual)
        active = _still_active(done)
        u = _pick(active, u_new, u)
        Gu = _pick(active, Gu_new, Gu)
        nu_t = _pick(active, nu_new, nu_t)
        lam_t = _pick(active, lam_new, lam_t)
        rel = torch.maximum(
            torch.where(s_prim > 0, r_prim / s_prim, r_prim),
            torch.where(s_dual > 0, r_dual / s_dual, r_dual),
        )
        res = rel if active is None else torch.where(active, rel, res)
        iters += 1 if active is None else active
        done = done | (adj_ok & prim_done)  # the masks used were those of a done point
        if not all_prim:
            prim_active = _still_active(prim_done)
            prim_done = prim_done | st.step(x, prim_active, tol)
            prim_iters += 1 if prim_active is None else prim_active
            if (k + 1) % every == 0:
                all_prim = bool(prim_done.all())
        if (k + 1) % every == 0 and bool(done.all()):
            break
    w_lam = torch.where(st.v > 0, torch.zeros_like(lam_t), lam_t)
    x, nu, lam, _ = st.unscaled()
    direction = (u, nu_t / f.row_A, w_lam / f.row_G)
    info = {
        "iterations": iters,
        "primal_iterations": prim_iters,
        "residual": res,
        "converged": done,
        "rho": f.rho,
        "factor": f,
    }
    return AltDiffBackward((x, nu, lam), direction, info)


def data_gradient(base: tuple, direction: tuple) -> QPData:
    """The dense data gradient ``(dP, dq, dA, db, dG, dh)`` of :func:`altdiff_backward`'s
    answer (batched like it): ``dP = (w_x x' + x w_x')/2``, ``dq = w_x``,
    ``dA = w_nu x' + nu w_x'``, ``db = -w_nu``, ``dG = w_lam x' + lam w_x'``, ``dh = -w_lam``.
    ``dP`` is the symmetric gradient (``P`` enters only through its symmetric part)."""
    x, nu, lam = base
    wx, wnu, wlam = direction

    def outer(a, b):
        return a.unsqueeze(-1) * b.unsqueeze(-2)

    dP = 0.5 * (outer(wx, x) + outer(x, wx))
    return QPData(
        dP, wx, outer(wnu, x) + outer(nu, wx), -wnu, outer(wlam, x) + outer(lam, wx), -wlam
    )
