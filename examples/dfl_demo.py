"""Decision-focused learning with FFOLayer: the main demo (``bin/demo``, about 10 s).

A small version of the synthetic task of the FFOLayer paper.  Each sample is a shopping
round: ``n`` items, each with a value ``v_i`` that is unknown when we decide but depends on
``d`` observed features ``x`` (``v = f(x) + noise``).  We may take a fraction
``z_i in [0, 1]`` of every item and at most ``budget`` items in all:

    z(q) = argmax  q'z - eps/2 ||z||^2   s.t.  0 <= z <= 1,  1'z <= budget

where ``q = MLP(x)`` is the *predicted* value (the small quadratic term makes the decision
move smoothly with the prediction, so it has a useful gradient).  The MLP is trained on the
value the decision really collects, ``v'z(q)``, not on how well it predicts ``v``: that is
decision-focused learning.  The gradient of the collected value with respect to ``q``
passes through the solution of the QP; FFOLayer computes it first-order, by solving one
small perturbed "ghost" problem per sample with the same solver as the forward (Clarabel).

The printout says what each number means.  Two references frame the result: the value
collected when deciding with the true values (the best possible) and the value collected
by the untrained network; and, every epoch, the first-order gradient is compared with the
exact one (``backward="kkt"``: implicit differentiation, which factorises a matrix).
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
    """The decision as a layer: predicted values ``q`` (batch, n) -> fractions ``z``."""
    q = cp.Parameter(n, name="q")
    z = cp.Variable(n, name="z")
    prob = cp.Problem(
        cp.Minimize(0.5 * eps * cp.sum_squares(z) - q @ z), [z >= 0, z <= 1, cp.sum(z) <= budget]
    )
    return FFOLayer(prob, [q], [z], solver=solver, backward=backward)


def make_data(samples: int, d: int, n: int, seed: int):
    """Features ``x`` (samples, d) and true item values ``v`` (samples, n): a cubic of a
    random linear map of the features, plus noise."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, n, generator=g, dtype=torch.float64)
    x = torch.randn(samples, d, generator=g, dtype=torch.float64)
    v = (
        (x @ B / np.sqrt(d)) ** 3 / 3
        + 0.3
        + 0.2 * torch.randn(samples, n, generator=g, dtype=torch.float64)
    )
    return x, v


def collected(layer, q, v) -> torch.Tensor:
    """The mean true value ``v'z(q)`` that the decisions made from ``q`` collect."""
    return (layer(q)[0] * v).sum(dim=1).mean()


def grad_agreement(model, layer, layer_kkt, x, v) -> tuple[float, float]:
    """Cosine similarity and relative error between the network's gradient through the
    first-order layer and through the exact (KKT) layer, on one batch."""
    grads = []
    for lay in (layer, layer_kkt):
        model.zero_grad()
        (-collected(lay, model(x), v)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
    a, b = grads
    return float(a @ b / (a.norm() * b.norm())), float((a - b).norm() / b.norm())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="items per round (decision dimension)")
    ap.add_argument("--d", type=int, default=8, help="features per round")
    ap.add_argument("--samples", type=int, default=512, help="training rounds")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--budget", type=float, default=5.0, help="items one round may take")
    ap.add_argument("--eps", type=float, default=0.5, help="weight of the quadratic term")
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    ap.add_argument("--solver", default="clarabel")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    x, v = make_data(args.samples + 128, args.d, args.n, args.seed)
    x_tr, v_tr, x_te, v_te = (
        x[: args.samples],
        v[: args.samples],
        x[args.samples :],
        v[args.samples :],
    )
    layer = make_layer(args.n, args.budget, args.eps, args.solver)
    layer_kkt = make_layer(args.n, args.budget, args.eps, args.solver, backward="kkt")
    model = torch.nn.Sequential(
        torch.nn.Linear(args.d, 64), torch.nn.ReLU(), torch.nn.Linear(64, args.n)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    with torch.no_grad():
        best = float(collected(layer, v_te, v_te))
        start = float(collected(layer, model(x_te), v_te))

    def share(value: float) -> str:
        return f"{100 * value / best:.1f}%"

    batches = -(-args.samples // args.batch)
    print(
        f"Decision-focused learning through FFOLayer (solver {args.solver!r}).\n"
        f"Each round: take up to {args.budget:g} of {args.n} items, maximising their total value. "
        f"The values are unknown;\na small neural network predicts them from {args.d} "
        f"features, and is trained on the value its\ndecisions collect (the gradient "
        f"passes through the optimisation problem): {args.samples} training\nrounds in "
        f"batches of {args.batch}, 128 test rounds it never trains on.\n"
    )
    print(f"Best possible (decide with the true values): {best:6.3f} per test round")
    print(f"Untrained network:                           {start:6.3f} ({share(start)} of best)\n")
    print(
        "Per epoch: the value the network's decisions collect on the test rounds, its share of\n"
        "the best possible, and how the first-order gradient compares with the exact gradient\n"
        "(implicit differentiation) on one test batch: cosine 1 = same direction, relative\n"
        f"error ~1e-12 or less = the same numbers. Time: {batches} training steps.\n"
    )
    print(
        f"{'epoch':>5}  {'value':>7}  {'share':>6}  {'cosine':>12}  {'rel. error':>10}  {'time':>6}"
    )
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(args.samples)
        for i in tqdm(range(0, args.samples, args.batch), desc=f"epoch {epoch}", leave=False):
            idx = perm[i : i + args.batch]
            loss = -collected(layer, model(x_tr[idx]), v_tr[idx])  # maximise the value
            opt.zero_grad()
            loss.backward()  # through the QP: one ghost solve per round of the batch
            opt.step()
        elapsed = time.perf_counter() - t0
        with torch.no_grad():
            test = float(collected(layer, model(x_te), v_te))
        cos, rel = grad_agreement(model, layer, layer_kkt, x_te[: args.batch], v_te[: args.batch])
        print(
            f"{epoch:>5}  {test:>7.3f}  {share(test):>6}  {cos:>12.9f}  {rel:>10.1e}  "
            f"{elapsed:>5.1f}s"
        )
    diag = layer.last_diagnostics
    locked = np.mean([dg["locked"] for dg in diag]) if diag else float("nan")
    print(
        f"\nWhat this shows:\n"
        f"* Training on the value of the decisions took the network from {share(start)} to "
        f"{share(test)}\n  of the best possible value, on rounds it never saw "
        f"({args.epochs * batches} gradient steps through the QP).\n"
        f"* The first-order gradient agreed with the exact one to a relative error of "
        f"{rel:.1e}; the exact\n  one needs a matrix factorisation, which the first-order "
        f"backward never forms.\n"
        f"* Each backward solved one small equality-constrained QP per round with the same "
        f"solver: the\n  constraints that bind at the decision (on average {locked:.0f} of "
        f"{2 * args.n + 1}) held fixed, the objective tilted\n  along the loss's gradient."
    )


if __name__ == "__main__":
    main()
