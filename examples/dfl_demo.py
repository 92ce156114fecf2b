"""Decision-focused learning with FFOLayer: the main demo (``bin/demo``).

A small version of the paper's synthetic task.  Each sample has features ``x`` (dimension
``d``) and an unknown cost vector ``c = f(x) + noise`` over ``n`` items.  We decide

    y(q) = argmin 1/2 eps ||y||^2 + q'y   s.t.  -1 <= y <= 0,  -1'y <= budget

(buy at most ``budget`` units; ``y_i = -1`` buys item ``i`` whole) from a *predicted* cost
``q = MLP(x)``, and pay the decision's true cost ``c'y(q)``.  The MLP is trained on that cost
directly (decision-focused), differentiating through the QP with FFOLayer's first-order
backward on Clarabel.  Each epoch prints the mean decision cost, the regret against the
decisions made with the true cost, and the FFO gradient's agreement (cosine similarity,
relative error) with the exact KKT gradient on a fixed batch.
"""

from __future__ import annotations

import argparse
import time

import cvxpy as cp
import numpy as np
import torch
from tqdm import tqdm

from ffo_core import FFOLayer


def make_layer(n: int, budget: float, eps: float, solver: str, backward: str = "ffo"):
    q = cp.Parameter(n, name="q")
    y = cp.Variable(n, name="y")
    prob = cp.Problem(
        cp.Minimize(0.5 * eps * cp.sum_squares(y) + q @ y), [y >= -1, y <= 0, -cp.sum(y) <= budget]
    )
    return FFOLayer(prob, [q], [y], solver=solver, backward=backward)


def make_data(samples: int, d: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, n, generator=g, dtype=torch.float64)
    x = torch.randn(samples, d, generator=g, dtype=torch.float64)
    c = (
        (x @ B / np.sqrt(d)) ** 3 / 3
        + 0.3
        + 0.2 * torch.randn(samples, n, generator=g, dtype=torch.float64)
    )
    return x, c


def grad_agreement(model, layer, layer_kkt, x, c) -> tuple[float, float]:
    """Cosine and relative error between FFO and exact KKT gradients of the loss."""
    grads = []
    for lay in (layer, layer_kkt):
        model.zero_grad()
        (lay(model(x))[0] * c).sum(dim=1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
    a, b = grads
    return float(a @ b / (a.norm() * b.norm())), float((a - b).norm() / b.norm())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="items (decision dimension)")
    ap.add_argument("--d", type=int, default=8, help="feature dimension")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--budget", type=float, default=5.0)
    ap.add_argument("--eps", type=float, default=0.1, help="quadratic regulariser")
    ap.add_argument("--solver", default="clarabel")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    x, c = make_data(args.samples + 128, args.d, args.n, args.seed)
    x_tr, c_tr, x_te, c_te = (
        x[: args.samples],
        c[: args.samples],
        x[args.samples :],
        c[args.samples :],
    )
    layer = make_layer(args.n, args.budget, args.eps, args.solver)
    layer_kkt = make_layer(args.n, args.budget, args.eps, args.solver, backward="kkt")
    model = torch.nn.Sequential(
        torch.nn.Linear(args.d, 64), torch.nn.ReLU(), torch.nn.Linear(64, args.n)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def cost(q, c_true):
        return (layer(q)[0] * c_true).sum(dim=1).mean()

    with torch.no_grad():
        oracle = float(cost(c_te, c_te))
    print(
        f"FFOLayer demo: n={args.n} items, budget {args.budget}, {args.samples} training "
        f"samples, batch {args.batch}, solver {args.solver!r}"
    )
    print(f"oracle test cost (decisions from the true cost): {oracle:.4f}")
    print(
        f"{'epoch':>5} {'train cost':>11} {'test cost':>10} {'test regret':>12} "
        f"{'cos(FFO,KKT)':>13} {'rel.err':>9} {'time [s]':>9}"
    )
    for epoch in range(1, args.epochs + 1):
        t0, losses = time.perf_counter(), []
        perm = torch.randperm(args.samples)
        for i in tqdm(range(0, args.samples, args.batch), desc=f"epoch {epoch}", leave=False):
            idx = perm[i : i + args.batch]
            loss = cost(model(x_tr[idx]), c_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        elapsed = time.perf_counter() - t0
        with torch.no_grad():
            test = float(cost(model(x_te), c_te))
        cos, rel = grad_agreement(model, layer, layer_kkt, x_te[: args.batch], c_te[: args.batch])
        print(
            f"{epoch:>5} {np.mean(losses):>11.4f} {test:>10.4f} {test - oracle:>12.4f} "
            f"{cos:>13.8f} {rel:>9.2e} {elapsed:>9.2f}"
        )
    d = layer.last_diagnostics[0] if layer.last_diagnostics else {}
    print(
        f"last backward (sample 0): delta={d.get('delta', float('nan')):.2e}, "
        f"{d.get('locked', 0)} locked rows, {d.get('weak', 0)} weakly active"
    )


if __name__ == "__main__":
    main()
