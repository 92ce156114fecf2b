"""Constrained MPC: learning the cost weights of a controller from an expert's plans.

A cart (position, velocity; ``x+ = A x + B u``, time step 0.2 s) is steered to the origin by
model predictive control over 15 steps with a bounded force ``|u| <= 1``:

    u(x0) = argmin  sum_t  q1 pos_t^2 + q2 vel_t^2 + r u_t^2
            subject to  x_(t+1) = A x_t + B u_t,   x_0 = x0,   |u_t| <= 1,

a QP whose weights ``(q1, q2, r)`` are ``cp.Parameter``s of an ``FFOLayer``.  An expert
controller with unknown weights shows its plans for a set of starting states; the learner
starts from equal weights and fits ``log q1, log q2, log r`` by gradient descent on the
squared difference between its plans and the expert's (inverse optimal control through the
layer's first-order backward).  Only the ratios of the weights matter (scaling all three
gives the same plans), so the script reports ``q1/r`` and ``q2/r``, then runs both
controllers in closed loop (re-planning every step) from a start where the force bound is
active.

    python examples/gallery/mpc.py                      # writes bench_out/gallery/mpc.png
    python examples/gallery/mpc.py --out DIR --smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cvxpy as cp
import numpy as np
import torch

from ffo_core import FFOLayer

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bench_out" / "gallery"
DT = 0.2
A = np.array([[1.0, DT], [0.0, 1.0]])
B = np.array([0.5 * DT**2, DT])
EXPERT = torch.tensor([1.0, 0.2, 0.05], dtype=torch.float64)  # q1, q2, r


def mpc_layer(horizon: int, **kw) -> FFOLayer:
    x, u = cp.Variable((horizon + 1, 2)), cp.Variable(horizon)
    x0, q, r = cp.Parameter(2), cp.Parameter(2, nonneg=True), cp.Parameter(nonneg=True)
    cost = q[0] * cp.sum_squares(x[1:, 0]) + q[1] * cp.sum_squares(x[1:, 1]) + r * cp.sum_squares(u)
    cons = [x[0] == x0, u <= 1, u >= -1]
    cons += [x[t + 1] == A @ x[t] + B * u[t] for t in range(horizon)]
    return FFOLayer(cp.Problem(cp.Minimize(cost), cons), parameters=[x0, q, r], variables=[u], **kw)


def plans(layer, x0, w):
    """Planned forces, (batch, horizon), for weights ``w = (q1, q2, r)``."""
    return layer(x0, w[:2], w[2])[0]


def closed_loop(layer, w, x0, steps: int) -> np.ndarray:
    """Positions and forces when the first planned force is applied and the plan redone."""
    x, out = np.array(x0, dtype=float), []
    with torch.no_grad():
        for _ in range(steps):
            u = float(plans(layer, torch.tensor(x)[None], w)[0, 0])
            out.append((x[0], u))
            x = A @ x + B * u
    return np.array(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for mpc.png")
    ap.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = ap.parse_args(argv)
    horizon, starts, steps, sim = (5, 8, 2, 5) if args.smoke else (15, 32, 60, 40)

    layer = mpc_layer(horizon)  # Clarabel, first-order backward
    rng = np.random.default_rng(0)
    x0 = torch.tensor(rng.uniform([-3, -1], [3, 1], size=(starts, 2)))
    with torch.no_grad():
        target = plans(layer, x0, EXPERT)
    bound_active = float((target.abs() > 0.999).any(1).double().mean())

    log_w = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # q1 = q2 = r = 1
    opt = torch.optim.Adam([log_w], lr=0.1)
    order = np.random.default_rng(1)
    losses = []
    for _ in range(steps):
        pick = torch.as_tensor(order.choice(starts, 8, replace=False))
        opt.zero_grad()
        loss = ((plans(layer, x0[pick], log_w.exp()) - target[pick]) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    learnt = log_w.detach().exp()

    grads = []  # first-order against exact gradient of the imitation loss, one batch
    for kw in ({}, {"backward": "kkt"}):
        lw = log_w.detach().clone().requires_grad_(True)
        ((plans(mpc_layer(horizon, **kw), x0[:8], lw.exp()) - target[:8]) ** 2).mean().backward()
        grads.append(lw.grad)
    cos = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))

    print("Inverse optimal control through an MPC layer (FFOLayer, first-order backward).")
    print(f"  the force bound is active in {100 * bound_active:.0f}% of the expert's plans")
    for name, w in (("expert", EXPERT), ("start", torch.ones(3)), ("learnt", learnt)):
        print(f"  {name:7s}: q1/r = {w[0] / w[2]:7.2f}, q2/r = {w[1] / w[2]:6.2f}")
    print(f"  imitation error {losses[0]:.2e} -> {losses[-1]:.2e} after {steps} steps")
    print(f"  gradient: first-order against exact KKT, cosine {cos:.8f}")

    start = [-3.0, 0.5]
    runs = {
        "expert": closed_loop(layer, EXPERT, start, sim),
        "start weights": closed_loop(layer, torch.ones(3, dtype=torch.float64), start, sim),
        "learnt weights": closed_loop(layer, learnt, start, sim),
    }

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].semilogy(losses)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("imitation error")
    axes[0].set_title("fitting the expert's plans")
    t = DT * np.arange(sim)
    for (name, run), style in zip(runs.items(), ("k-", "C3--", "C0:")):
        axes[1].plot(t, run[:, 0], style, lw=2, label=name)
        axes[2].step(t, run[:, 1], style, lw=2, where="post", label=name)
    axes[1].set_title("closed loop: position")
    axes[2].set_title("closed loop: force (bound |u| <= 1)")
    for ax in axes[1:]:
        ax.set_xlabel("time [s]")
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "mpc.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
