"""``backward="altdiff"``: the layers' gradients by Alt-Diff (:mod:`ffo_core.engine.altdiff`).

The forward is the layer's backend, as in the other modes; the backward continues ADMM from
the forward point and runs Alt-Diff's reverse-mode recursion on the batch's dense data,
which gives the same base point and direction as the other modes, so the data gradient is
the same Lagrangian derivative (:class:`~ffo_core.engine.data_gradient.DataGradient`).

Polyhedral problems only (zero and nonnegative cones: the QP layer always, a CVXPY problem
whose canonical form is a QP); the data is made dense (``n x n`` per distinct matrix: the
matrices a batch shares are densified once).  Upstream gradients on duals are refused.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.altdiff import altdiff_backward
from ..engine.data_gradient import DataGradient
from ..errors import SolverError, UnsupportedError
from ..protocol import ConeConstraints, Equalities, Objective, Solution


def check_polyhedral(dims, where: str = "the problem") -> None:
    """Refuse a problem with curved cone blocks, naming the mode."""
    curved = sorted(dims.kinds - {"nonneg"})
    if curved:
        raise UnsupportedError(
            f"backward='altdiff' handles polyhedral problems (QPs and LPs); {where} has "
            f"{', '.join(curved)} cone blocks: use backward='ffo' or 'kkt'"
        )


def _dense(mats: list, shape: tuple[int, int]) -> torch.Tensor:
    """``(B or 1, rows, cols)``: one dense copy per distinct matrix object."""
    if all(M is mats[0] for M in mats):
        mats = mats[:1]
    out = np.zeros((len(mats), *shape))
    for k, M in enumerate(mats):
        if M is not None and M.nnz:
            out[k] = M.toarray()
    return torch.from_numpy(out)


def altdiff_gradients(
    samples: list[tuple[Objective, ConeConstraints, Equalities]],
    sols: list[Solution],
    c: np.ndarray,
    c_dual,
    tol: float,
    max_iter: int,
) -> list[DataGradient]:
    """Every sample's data gradient of ``c[k]'y_k`` by Alt-Diff."""
    if c_dual is not None:
        raise UnsupportedError(
            "backward='altdiff' differentiates the primal solution only; a layer output "
            "that is a dual variable needs backward='ffo' or 'kkt'"
        )
    g0, h0, e0 = samples[0]
    check_polyhedral(h0.dims)
    n, p, m = g0.n, e0.p, h0.m
    P = _dense([g.P for g, _, _ in samples], (n, n))
    A = _dense([e.A for _, _, e in samples], (p, n))
    G = _dense([h.G for _, h, _ in samples], (m, n))

    def stack(rows):
        return torch.from_numpy(np.array(rows, dtype=float).reshape(len(rows), -1))

    data = (
        P,
        stack([g.q for g, _, _ in samples]),
        A,
        stack([e.b for _, _, e in samples]),
        G,
        stack([h.h for _, h, _ in samples]),
    )
    point = tuple(
        stack([getattr(s, f) for s in sols]) for f in ("primal", "eq_dual", "ineq_dual", "slack")
    )
    out = altdiff_backward(data, point, torch.from_numpy(np.asarray(c)), tol, max_iter)
    failed = torch.nonzero(~out.info["converged"]).flatten().tolist()
    if failed:
        raise SolverError(
            f"backward='altdiff' did not converge to tol={tol:g} within {max_iter} iterations "
            f"at batch index {failed[:5]}; raise altdiff_max_iter or use backward='ffo'",
            batch_index=failed[0],
            backend="altdiff",
        )
    base = [t.numpy() for t in out.base]
    direction = [t.numpy() for t in out.direction]
    grads = []
    for k, (g, h, e) in enumerate(samples):
        grad = DataGradient.along(
            g, h, e, tuple(b[k] for b in base), tuple(d[k] for d in direction)
        )
        grad.diagnostics = {
            "altdiff_iterations": int(out.info["iterations"][k]),
            "altdiff_primal_iterations": int(out.info["primal_iterations"][k]),
        }
        grads.append(grad)
    return grads


__all__ = ["altdiff_gradients", "check_polyhedral"]
