"""The dense QP path on a device backend: ``FFOQPLayer`` with tensors that never leave
their device.

When the backend is a *device* backend (``Capabilities.device``: it takes torch tensors in
``solve_batch`` and answers on their device, as ``pdipm`` does) and the layer's inputs are
dense, :class:`~ffo_core.layers.qp_layer.FFOQPLayer` runs its forward and its first-order
backward here, in torch, with no copy to NumPy: qpth's use (large batches of small dense
QPs on a GPU) on the library's own backward.  The steps are those of the engine, written
over the batch:

1. forward: the batch as one :class:`~ffo_core.protocol.ProblemBatch` of dense patterns
   (values in column-major order, matrices the batch shares sent once), one
   ``solve_batch``; then the polish of :mod:`ffo_core.engine.polish` -- the equality
   problem of the suggested active set, solved for the whole batch at once, rows moved in
   or out until primal and dual feasible (at most 4 rounds) -- so the point is exact;
2. backward: the active set of that point (:mod:`ffo_core.engine.active_set`'s rule), one
   ghost batch at ``delta = (1 + ||y*||) / ||c||`` with the locked rows *through* ``y*``
   (unlocked rows absent), and the one-sided difference ``w = (ghost - forward) / delta``;
   a sample whose point could not be polished gets the ``-delta`` ghost too (central);
3. the data gradient is the Lagrangian derivative along ``w``
   (:mod:`ffo_core.engine.data_gradient`), formed densely: ``dQ = (w_y y' + y w_y')/2``,
   ``dG = w_lam y' + lam w_y'``, ``dA = w_nu y' + nu w_y'``, ``dp = w_y``,
   ``dh = -w_lam``, ``db = -w_nu``.

Used for ``backward="ffo"`` without the health check; every other configuration (the KKT
and Alt-Diff modes, ``check_every``, sparse inputs) takes the general path, which copies the
data to the CPU.
"""

from __future__ import annotations

import torch

from ..errors import GhostProblemError, SolverError
from ..protocol import ProblemBatch, SparsePattern
from .function import check_upstream

#: Polish rounds, as :data:`ffo_core.engine.polish.MAX_ROUNDS`.
ROUNDS = 4
#: A pair is unsettled when both members exceed this fraction of their thresholds
#: (:data:`ffo_core.engine.active_set.UNSETTLED`).
UNSETTLED = 1e-2


def _sparse(M: torch.Tensor) -> tuple[SparsePattern, torch.Tensor]:
    """The pattern of ``M`` ``(1|B, rows, cols)`` -- its nonzeros, the union over the batch --
    and its values on it, ``(1|B, nnz)``, on ``M``'s device.  Only the pattern's indices
    come to the CPU; a solver sees the structure (bound rows, one-hot rows) it can use."""
    import numpy as np

    rows_, cols_ = M.shape[-2:]
    mask = (M != 0).any(dim=0).T  # (cols, rows): column-major order of the nonzeros
    cols, rows = (t for t in torch.nonzero(mask, as_tuple=True))
    pattern = SparsePattern.from_rows_cols(
        rows.cpu().numpy(), cols.cpu().numpy(), (rows_, cols_)
    ) if rows.numel() else SparsePattern(
        (rows_, cols_), np.zeros(0, np.int32), np.zeros(cols_ + 1, np.int64),
        np.zeros(0, np.int32),
    )  # fmt: skip
    return pattern, M[:, rows, cols]


class DenseQP:
    """One call's dense data on its device: ``Q (1|B, n, n)`` (symmetrised), ``q (B, n)``,
    ``G (1|B, m, n)``, ``h (1|B, m)``, ``A (1|B, p, n)``, ``b (1|B, p)``."""

    def __init__(self, Q, q, G, h, A, b, batch: int) -> None:
        self.Q, self.q, self.G, self.h, self.A, self.b = Q, q, G, h, A, b
        self.batch, self.n = batch, q.shape[-1]
        self.m, self.p = G.shape[-2], A.shape[-2]
        self._P: tuple | None = None  # Q's pattern and values, made once

    def subset(self, idx: torch.Tensor) -> DenseQP:
        """The samples ``idx`` (batched tensors indexed, shared ones kept)."""

        def pick(t):
            return t if t.shape[0] == 1 else t[idx]

        Q, q, G, h, A, b = (pick(t) for t in (self.Q, self.q, self.G, self.h, self.A, self.b))
        sub = DenseQP(Q, q, G, h, A, b, batch=int(idx.numel()))
        if self.Q.shape[0] == 1:
            sub._P = self._P
        return sub

    def batch_of(self, G, h, A, b) -> ProblemBatch:
        if self._P is None:
            self._P = _sparse(self.Q)
        (Pp, Pv), (Ap, Av), (Gp, Gv) = self._P, _sparse(A), _sparse(G)
        return ProblemBatch(self.batch, Pp, Pv, self.q, Ap, Av, b, Gp, Gv, h, _nonneg(G.shape[-2]))


def _nonneg(m: int):
    from ..protocol import ConeDims

    return ConeDims(nonneg=m)


def _solve(backend, batch: ProblemBatch, extra=None, ghost: bool = False):
    """``solve_batch`` with the statuses checked; ``(y, nu, lam, s, accuracy (B,))``."""
    error = GhostProblemError if ghost else SolverError
    what = "backward (ghost) solve" if ghost else "forward solve"
    answer = backend.solve_batch(batch, extra)
    bad = [k for k, s in enumerate(answer.status) if not s.has_solution]
    if bad:
        st = answer.status[bad[0]]
        raise error(
            f"{what} of batch index {bad[0]}: status {st.value} (solver {backend.name}: "
            f"{answer.info[bad[0]].raw_status})",
            status=st,
            batch_index=bad[0],
            backend=backend.name,
        )
    acc = torch.tensor(
        [i.accuracy if i.accuracy and i.accuracy > 0 else 1e-8 for i in answer.info],
        dtype=answer.primal.dtype,
        device=answer.primal.device,
    )
    return answer.primal, answer.eq_dual, answer.ineq_dual, answer.slack, acc, answer.status


def _classify(s, lam, h, acc):
    """Locked and unsettled rows, the rule of :func:`ffo_core.engine.active_set.classify`."""
    root = torch.sqrt(torch.clamp(acc, min=1e-16))[:, None]
    h = h.expand_as(s)
    tau_rows = root * torch.clamp(torch.maximum(h.abs(), (h - s).abs()), min=1.0)
    tau_lam = root * torch.clamp(lam.abs().amax(dim=1, keepdim=True), min=1.0)
    s_p, lam_p = s.clamp(min=0), lam.clamp(min=0)
    locked = s_p * tau_lam < lam_p * tau_rows
    unsettled = (s_p > UNSETTLED * tau_rows) & (lam_p > UNSETTLED * tau_lam)
    return locked, unsettled, tau_rows


def _equality_batch(qp: DenseQP, locked, rhs_rows, extra=None):
    """The problems with ``[A; G_locked]`` as equalities (unlocked rows absent) and no
    inequality: ``rhs_rows`` ``(B, p + m)`` right-hand sides."""
    B, n = qp.batch, qp.n
    G = qp.G.expand(B, -1, -1) * locked[..., None]
    E = torch.cat([qp.A.expand(B, -1, -1), G], dim=1)
    keep = torch.cat([torch.ones_like(rhs_rows[:, : qp.p], dtype=torch.bool), locked], dim=1)
    rhs = torch.where(keep, rhs_rows, torch.zeros_like(rhs_rows))
    empty = qp.G.new_zeros((B, 0, n))
    return qp.batch_of(empty, qp.G.new_zeros((B, 0)), E, rhs), extra


def forward(backend, qp: DenseQP, polish: bool):
    """Step 1: ``(y, nu, lam, s, accuracy, polished (B,) bool, statuses)``."""
    y, nu, lam, s, acc, status = _solve(backend, qp.batch_of(qp.G, qp.h, qp.A, qp.b))
    polished = torch.zeros(qp.batch, dtype=torch.bool, device=y.device)
    if not polish or qp.m == 0:
        return y, nu, lam, s, acc, polished, status
    locked, unsettled, _ = _classify(s, lam, qp.h, acc)
    todo = unsettled.any(dim=1) | (acc > 1e-10)
    polished |= ~todo
    h = qp.h.expand(qp.batch, -1)
    exact = torch.cat([qp.b.expand(qp.batch, -1), h], dim=1)
    violated = torch.full((qp.batch,), qp.m + 1, device=y.device)
    for _ in range(ROUNDS):  # each round solves the samples not settled yet, only them
        idx = torch.nonzero(todo).flatten()
        if idx.numel() == 0:
            break
        sub, lk = qp.subset(idx), locked[idx]
        batch, _ = _equality_batch(sub, lk, exact[idx])
        answer = backend.solve_batch(batch, None)
        solved = torch.tensor([st.has_solution for st in answer.status], device=y.device)
        accp = torch.tensor(
            [i.accuracy if i.accuracy and i.accuracy > 0 else 1e-8 for i in answer.info],
            dtype=y.dtype, device=y.device,
        )  # fmt: skip
        yp, eq = answer.primal, answer.eq_dual
        lam_p = torch.where(lk, eq[:, qp.p :], torch.zeros_like(lk, dtype=y.dtype))
        hs = h[idx]
        slack_p = hs - torch.einsum("kmn,kn->km", sub.G.expand(idx.numel(), -1, -1), yp)
        tol = 100.0 * accp[:, None]
        lam_scale = torch.clamp(lam_p.abs().amax(dim=1, keepdim=True), min=1.0)
        row_scale = torch.clamp(torch.maximum(hs.abs(), (hs - slack_p).abs()), min=1.0)
        primal_bad = ~lk & (slack_p < -tol * row_scale)
        dual_bad = lk & (lam_p < -tol * lam_scale)
        count = primal_bad.sum(dim=1) + dual_bad.sum(dim=1)
        ok = solved & (count == 0)
        y[idx] = torch.where(ok[:, None], yp, y[idx])
        nu[idx] = torch.where(ok[:, None], eq[:, : qp.p], nu[idx])
        lam[idx] = torch.where(ok[:, None], lam_p.clamp(min=0), lam[idx])
        s[idx] = torch.where(ok[:, None], torch.where(lk, 0.0, slack_p.clamp(min=0)), s[idx])
        acc[idx] = torch.where(ok, accp, acc[idx])
        polished[idx] |= ok
        # stop a sample that is done, failed, or made no progress (a degenerate vertex)
        todo[idx] = solved & ~ok & (count < violated[idx])
        violated[idx] = count
        locked[idx] = torch.where(todo[idx][:, None], (lk | primal_bad) & ~dual_bad, lk)
    return y, nu, lam, s, acc, polished, status


def backward(backend, qp: DenseQP, point, c, c_dual):
    """Steps 2-3: the direction ``w = (w_y, w_nu, w_lam)`` and the base ``(y, nu, lam)``."""
    y, nu, lam, s, acc, polished = point
    B = qp.batch
    locked, _, _ = _classify(s, lam, qp.h, acc)
    size = c.norm(dim=1)
    if c_dual is not None:
        size = torch.sqrt(size**2 + c_dual[0].norm(dim=1) ** 2 + c_dual[1].norm(dim=1) ** 2)
    live = size > 0
    delta = torch.where(live, (1.0 + y.norm(dim=1)) / torch.where(live, size, 1.0), 1.0)
    G = qp.G.expand(B, -1, -1)
    E = torch.cat([qp.A.expand(B, -1, -1), G * locked[..., None]], dim=1)
    through = torch.einsum("kmn,kn->km", E, y)
    shift = None
    if c_dual is not None:
        shift = torch.cat([c_dual[0], torch.where(locked, c_dual[1], 0.0)], dim=1)

    def ghost(sign: float, ks: torch.Tensor | None = None):
        """The ghosts at ``sign * delta`` of the samples ``ks`` (all when None)."""
        sub, lk, d = qp, locked, sign * delta
        rhs = through - (d[:, None] * shift if shift is not None else 0.0)
        cs = c
        if ks is not None:
            sub, lk, d, rhs, cs = qp.subset(ks), locked[ks], d[ks], rhs[ks], c[ks]
        batch, _ = _equality_batch(sub, lk, rhs)
        try:
            yg, eq, _, _, _, _ = _solve(backend, batch, d[:, None] * cs, ghost=True)
        except GhostProblemError as exc:  # name the sample's index in the whole batch
            if ks is not None and exc.batch_index is not None:
                j, exc.batch_index = exc.batch_index, int(ks[exc.batch_index])
                text = exc.args[0] if exc.args else str(exc)
                exc.args = (text.replace(f"batch index {j}:", f"batch index {exc.batch_index}:"),)
            raise
        lam_g = torch.where(lk, eq[:, qp.p :], torch.zeros_like(lk, dtype=eq.dtype))
        return yg, eq[:, : qp.p], lam_g

    base: tuple[torch.Tensor, ...] = (y, nu, torch.where(locked, lam, torch.zeros_like(lam)))
    up = ghost(1.0)
    w = [(u - f) / delta[:, None] for u, f in zip(up, base)]
    central = ~polished & live
    ks = torch.nonzero(central).flatten()
    if ks.numel():  # an unpolished point is no base for a one-sided difference
        down = ghost(-1.0, ks)  # only those samples
        d2 = 2 * delta[ks, None]
        for k in range(3):
            w[k] = w[k].index_copy(0, ks, (up[k][ks] - down[k]) / d2)
        base = tuple(b.index_copy(0, ks, (u[ks] + dn) / 2) for b, u, dn in zip(base, up, down))
    w = [torch.where(live[:, None], wk, torch.zeros_like(wk)) for wk in w]
    return base, tuple(w)


def input_gradients(qp: DenseQP, base, w, args, needs, scale_of):
    """The gradient of every input (None where not needed), densely (module docstring)."""
    (y, nu, lam), (wy, wnu, wlam) = base, w
    outer = {
        "Q": lambda: 0.5 * (wy[:, :, None] * y[:, None, :] + y[:, :, None] * wy[:, None, :]),
        "p": lambda: wy,
        "G": lambda: wlam[:, :, None] * y[:, None, :] + lam[:, :, None] * wy[:, None, :],
        "h": lambda: -wlam,
        "A": lambda: wnu[:, :, None] * y[:, None, :] + nu[:, :, None] * wy[:, None, :],
        "b": lambda: -wnu,
    }
    out: list[torch.Tensor | None] = []
    for name, need in zip(("Q", "p", "G", "h", "A", "b"), needs):
        arg = args[name]
        if not need or not arg.present:
            out.append(None)
            continue
        value = outer[name]()
        if not arg.batched:
            value = scale_of(arg) * value.sum(dim=0)
        out.append(value.to(arg.tensor.dtype))
    return tuple(out)


class DeviceQPFunction(torch.autograd.Function):
    """Forward and first-order backward of :class:`FFOQPLayer` on a device backend."""

    @staticmethod
    def forward(layer, call, qp, backend, *inputs):
        y, nu, lam, s, acc, polished, status = forward(backend, qp, layer.polish)
        call.point = (y, nu, lam, s, acc, polished)
        layer.last_status = list(status)
        layer.last_polish = ["polished" if bool(p) else "not polished" for p in polished]
        outs = (y, lam, nu) if layer.duals else (y,)
        return tuple(o.to(call.dtype) for o in outs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layer, ctx.call, ctx.qp, ctx.backend = inputs[:4]

    @staticmethod
    def backward(ctx, *grads):
        layer, call, qp, backend = ctx.layer, ctx.call, ctx.qp, ctx.backend
        needs = ctx.needs_input_grad[4:]
        if not any(needs):
            return (None,) * (4 + len(needs))
        c = _upstream("y", grads[0], qp).to(qp.q.dtype)
        c_dual = None
        if layer.duals and any(g is not None and bool(g.ne(0).any()) for g in grads[1:]):
            c_lam = _upstream("lam", grads[1], qp) if grads[1] is not None else None
            c_nu = _upstream("nu", grads[2], qp) if grads[2] is not None else None
            zeros = qp.q.new_zeros
            c_dual = (
                c_nu.to(qp.q.dtype) if c_nu is not None else zeros((qp.batch, qp.p)),
                c_lam.to(qp.q.dtype) if c_lam is not None else zeros((qp.batch, qp.m)),
            )
        base, w = backward(backend, qp, call.point, c, c_dual)
        B = qp.batch

        def scale_of(arg):
            return 1.0 if layer.broadcast_grad == "sum" else 1.0 / B

        out = input_gradients(qp, base, w, call.args, needs, scale_of)
        for name, value in zip("QpGhAb", out):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise SolverError(
                    f"the gradient of argument {name} overflows {value.dtype}",
                    backend=backend.name,
                )
        layer.last_diagnostics = [{"delta": None, "device": str(qp.q.device)}] * B
        return (None, None, None, None) + out


def _upstream(name: str, grad, qp: DenseQP) -> torch.Tensor:
    if not bool(torch.isfinite(grad).all()):
        check_upstream(name, grad.cpu(), True)  # raises, naming the batch indices
    return grad.reshape(qp.batch, -1)


def applies(layer, backend, call) -> bool:
    """The device path serves this call: a device backend with ``solve_batch``, the
    first-order mode without the health check, dense inputs."""
    caps = getattr(backend, "capabilities", None)
    return bool(
        caps is not None
        and caps.device
        and callable(getattr(backend, "solve_batch", None))
        and layer.backward_mode == "ffo"
        and not layer.check_every
        and all(a.sparse is None for a in call.args.values())
    )


def dense_qp(call) -> DenseQP:
    """The call's tensors, on their device in the output dtype (module docstring); a dense
    ``Q`` that is not positive semidefinite is refused as on the general path."""
    from ..errors import InvalidParameterError

    a, dtype, n = call.args, call.dtype, call.n

    def mat(name, rows):
        t = a[name].tensor
        if t is None:
            return torch.zeros((1, rows, n), dtype=dtype, device=call.device)
        t = t.detach().to(dtype)
        return t if t.dim() == 3 else t[None]

    def vec(name, size):
        t = a[name].tensor
        if t is None:
            return torch.zeros((1, size), dtype=dtype, device=call.device)
        t = t.detach().to(dtype).clone()  # the backward uses the forward's values
        return t if t.dim() == 2 else t[None]

    Q = mat("Q", n)
    Q = 0.5 * (Q + Q.transpose(-1, -2))
    diag = Q.diagonal(dim1=-2, dim2=-1)
    eps = 1e-9 * torch.clamp(diag.abs().amax(dim=-1), min=1.0)
    eye = torch.eye(n, dtype=dtype, device=Q.device)
    _, info = torch.linalg.cholesky_ex(Q + eps[:, None, None] * eye)
    bad = torch.nonzero(info).flatten().tolist()
    if bad:
        where = f" at batch index {bad[:5]}" if a["Q"].batched else ""
        raise InvalidParameterError(
            f"argument Q{where} is not positive semidefinite (its Cholesky factorisation "
            "fails): the QP is not convex"
        )
    return DenseQP(
        Q.clone(), vec("p", n), mat("G", call.m).clone(), vec("h", call.m),
        mat("A", call.p).clone(), vec("b", call.p), call.batch,
    )  # fmt: skip


__all__ = ["DenseQP", "DeviceQPFunction", "applies"]
