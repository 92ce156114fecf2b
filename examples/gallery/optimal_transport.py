"""Entropic optimal transport (exponential cones): moving points through a transport plan.

The entropy-regularised transport plan between ``n`` source points (weights ``a``) and
``m`` target points (weights ``b``) with cost matrix ``C`` is

    P(C) = argmin <C, P> - eps * sum entr(P)   subject to   P 1 = a,   P'1 = b,

a convex program whose entropy term CVXPY writes with exponential cones; ``FFOLayer``
solves it with Clarabel and differentiates it with its first-order backward (central
differences, since the ghost problem keeps curved cone blocks).  The source points are
learnt: the loss is the transport cost ``<C(x), P(C(x))>`` with ``C_ij = ||x_i - y_j||^2``,
and gradient descent moves the points onto the targets (a discrete Wasserstein gradient
flow).  The layer's plan is checked against Sinkhorn's algorithm (exact for this problem,
no cone solver), and its gradient against central finite differences of the transport cost
computed with Sinkhorn's plans.

    python examples/gallery/optimal_transport.py   # writes bench_out/gallery/optimal_transport.png
    python examples/gallery/optimal_transport.py --out DIR --smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cvxpy as cp
import numpy as np
import torch

from ffo_core import FFOLayer

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bench_out" / "gallery"
EPS = 0.05


def sinkhorn(C: np.ndarray, a: np.ndarray, b: np.ndarray, eps: float, tol: float = 1e-14):
    """The entropic plan by Sinkhorn's matrix scaling (log domain), iterated until both
    marginals are met to ``tol``."""
    f, g = np.zeros(len(a)), np.zeros(len(b))
    for _ in range(100_000):
        f = eps * np.log(a) - eps * np.log(np.exp((g[None, :] - C) / eps).sum(1))
        g = eps * np.log(b) - eps * np.log(np.exp((f[:, None] - C) / eps).sum(0))
        P = np.exp((f[:, None] + g[None, :] - C) / eps)
        if np.abs(P.sum(1) - a).max() < tol:
            break
    return P


def reference_gradient(start, target, a, b, h=1e-6) -> np.ndarray:
    """Central finite differences of the transport cost, plans from :func:`sinkhorn`."""

    def cost(x):
        C = ((x[:, None, :] - target[None]) ** 2).sum(-1)
        return (C * sinkhorn(C, a, b, EPS)).sum()

    g = np.zeros_like(start)
    for idx in np.ndindex(start.shape):
        e = np.zeros_like(start)
        e[idx] = h
        g[idx] = (cost(start + e) - cost(start - e)) / (2 * h)
    return g


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for optimal_transport.png"
    )
    ap.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = ap.parse_args(argv)
    n, steps = (4, 2) if args.smoke else (8, 60)

    rng = np.random.default_rng(0)
    angle = 2 * np.pi * np.arange(n) / n
    target = torch.tensor(np.c_[np.cos(angle), np.sin(angle)])  # a ring
    start = 0.3 * rng.standard_normal((n, 2)) + [0.2, -0.1]  # a blob inside it
    a = b = np.full(n, 1.0 / n)

    C_p, P = cp.Parameter((n, n)), cp.Variable((n, n))
    problem = cp.Problem(
        cp.Minimize(cp.sum(cp.multiply(C_p, P)) - EPS * cp.sum(cp.entr(P))),
        [cp.sum(P, axis=1) == a, cp.sum(P, axis=0) == b],
    )
    layer = FFOLayer(problem, parameters=[C_p], variables=[P])  # Clarabel, first-order

    def cost(points):
        return ((points[:, None, :] - target[None, :, :]) ** 2).sum(-1)

    def transport_cost(lay, points):
        C = cost(points)
        (plan,) = lay(C)
        return (C * plan).sum(), plan

    x = torch.tensor(start, requires_grad=True)
    loss0, plan0 = transport_cost(layer, x)
    gap = np.abs(plan0.detach().numpy() - sinkhorn(cost(x).detach().numpy(), a, b, EPS)).max()
    loss0.backward()
    ours, ref = x.grad.numpy().ravel(), reference_gradient(start, target.numpy(), a, b).ravel()
    cos = float(ours @ ref / (np.linalg.norm(ours) * np.linalg.norm(ref)))
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    x.grad = None

    opt = torch.optim.Adam([x], lr=0.05)
    trail, costs = [x.detach().numpy().copy()], []
    for _ in range(steps):
        opt.zero_grad()
        loss, plan = transport_cost(layer, x)
        loss.backward()
        opt.step()
        costs.append(loss.item())
        trail.append(x.detach().numpy().copy())
    trail = np.array(trail)

    print("Entropic optimal transport through FFOLayer (exponential cones, Clarabel).")
    print(f"  the layer's plan equals Sinkhorn's to {gap:.1e} (eps = {EPS})")
    print(
        f"  gradient of the transport cost: first-order vs finite differences (Sinkhorn), "
        f"cosine {cos:.8f}, relative difference {rel:.1e}"
    )
    print(
        f"  transport cost {costs[0]:.3g} -> {costs[-1]:.3g} after {steps} steps: "
        "the points moved onto the ring"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    ax.plot(*target.numpy().T, "k*", ms=12, label="targets")
    for i in range(n):
        ax.plot(trail[:, i, 0], trail[:, i, 1], "-", color="C0", alpha=0.6)
    ax.plot(*trail[0].T, "o", color="C1", label="start")
    ax.plot(*trail[-1].T, "o", color="C0", label="end")
    pl = plan.detach().numpy()
    for i in range(n):
        for j in range(n):
            if pl[i, j] > 0.2 / n:
                ax.plot(*np.c_[trail[-1][i], target[j]], "k-", lw=2 * n * pl[i, j], alpha=0.3)
    ax.set_aspect("equal")
    ax.legend(fontsize=8)
    ax.set_title("points moved by the gradient of the transport cost")
    ax = axes[1]
    ax.plot(costs, color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("transport cost <C, P>")
    ax.set_yscale("log")
    ax.set_title("transport cost along the descent")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "optimal_transport.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
