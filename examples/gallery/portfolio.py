"""Markowitz portfolio tuning: learning the risk aversion and the return shrinkage end to end.

Each month a long-only portfolio of 12 assets is chosen by

    w = argmax  mu_hat'w - gamma ||L'w||^2     subject to   1'w = 1,   w >= 0,

with ``L L' = Sigma`` the (known) covariance and ``mu_hat`` the estimated mean returns:
the last 24 months' sample mean, shrunk by a factor ``alpha`` towards its cross-sectional
average.  Two knobs, ``gamma`` (risk aversion) and ``alpha`` (shrinkage), decide the
portfolio; here they are learnt by gradient descent through an ``FFOLayer`` (``gamma`` and
``mu_hat`` are ``cp.Parameter``s) to maximise the investor's realised utility
``mean(r'w) - (k/2) var(r'w)`` over the following months (k = 4).  The learnt knobs are
compared, on fresh months, with the untuned start (``gamma = 1``, ``alpha = 0``: plain
sample means) and with the best of a grid.

    python examples/gallery/portfolio.py                # writes bench_out/gallery/portfolio.png
    python examples/gallery/portfolio.py --out DIR --smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cvxpy as cp
import numpy as np
import torch

from ffo_core import FFOLayer

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bench_out" / "gallery"
RISK = 4.0  # the investor's risk aversion k in the realised utility
WINDOW = 24


def market(n: int, months: int, rng: np.random.Generator):
    """Monthly returns from a one-factor model: means, covariance and a (months, n) draw."""
    beta = rng.uniform(0.5, 1.5, n)
    mu = 0.004 + 0.004 * beta + 0.002 * rng.standard_normal(n)
    sigma = 0.045**2 * np.outer(beta, beta) + np.diag(rng.uniform(0.03, 0.08, n) ** 2)
    returns = rng.multivariate_normal(mu, sigma, size=months)
    return mu, sigma, torch.tensor(returns)


def episodes(returns: torch.Tensor, horizon: int):
    """(estimated means from the last WINDOW months, the next ``horizon`` months' returns)."""
    starts = range(WINDOW, len(returns) - horizon + 1, horizon)
    past = torch.stack([returns[s - WINDOW : s].mean(0) for s in starts])
    future = torch.stack([returns[s : s + horizon] for s in starts])
    return past, future


def utility(w: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    """Mean over episodes of the realised mean-variance utility of the portfolios ``w``."""
    r = (future * w[:, None, :]).sum(-1)  # (episodes, months)
    return (r.mean(1) - 0.5 * RISK * r.var(1)).mean()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for portfolio.png")
    ap.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = ap.parse_args(argv)
    n, months, steps = (4, 60, 2) if args.smoke else (12, 1200, 50)

    rng = np.random.default_rng(0)
    _, sigma, returns = market(n, months, rng)
    L = np.linalg.cholesky(sigma)
    mu_p, gamma_p, w = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Variable(n)
    problem = cp.Problem(
        cp.Maximize(mu_p @ w - gamma_p * cp.sum_squares(L.T @ w)), [cp.sum(w) == 1, w >= 0]
    )
    layer = FFOLayer(problem, parameters=[mu_p, gamma_p], variables=[w])  # Clarabel

    half = months // 2
    train = episodes(returns[:half], 6)
    test = episodes(returns[half:], 6)

    def portfolios(past, log_gamma, logit_alpha):
        alpha = torch.sigmoid(logit_alpha)
        mu_hat = (1 - alpha) * past + alpha * past.mean(1, keepdim=True)
        return layer(mu_hat, log_gamma.exp())[0]

    def test_utility(log_gamma: float, logit_alpha: float) -> float:
        with torch.no_grad():
            knobs = torch.tensor(log_gamma, dtype=torch.float64), torch.tensor(logit_alpha)
            return float(utility(portfolios(test[0], *knobs), test[1]))

    log_gamma = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)  # gamma = 1
    logit_alpha = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)  # alpha ~ 0.02
    opt = torch.optim.Adam([log_gamma, logit_alpha], lr=0.15)
    path = []
    for _ in range(steps):
        opt.zero_grad()
        loss = -utility(portfolios(train[0], log_gamma, logit_alpha), train[1])
        loss.backward()
        opt.step()
        path.append((log_gamma.exp().item(), torch.sigmoid(logit_alpha).item(), -loss.item()))

    gammas = np.logspace(-0.5, 2, 5 if args.smoke else 11)
    alphas = np.array([0.02, 0.5, 0.98]) if args.smoke else np.linspace(0.02, 0.98, 9)
    grid = np.array(
        [[test_utility(np.log(g), np.log(a / (1 - a))) for g in gammas] for a in alphas]
    )
    start = test_utility(0.0, -4.0)
    tuned = test_utility(log_gamma.item(), logit_alpha.item())
    g, a = path[-1][:2]

    print("Tuning a Markowitz portfolio through FFOLayer (first-order backward, Clarabel).")
    print(f"  learnt risk aversion gamma = {g:.3g}, shrinkage alpha = {a:.2f}")
    print(
        f"  test utility per month: start {start:.5f}, learnt {tuned:.5f}, "
        f"best of a {grid.size}-point grid {grid.max():.5f}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    im = ax.pcolormesh(gammas, alphas, grid, shading="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label="test utility per month")
    gs, als, _ = zip(*path)
    ax.plot(gs, als, "w.-", ms=3, label="learning path")
    ax.plot(gs[-1], als[-1], "r*", ms=12, label="learnt")
    ax.set_xscale("log")
    ax.set_xlabel("risk aversion gamma")
    ax.set_ylabel("shrinkage alpha")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    ax.plot([u for *_, u in path], color="C0")
    ax.axhline(start, color="C3", ls="--", label="test utility, start")
    ax.axhline(tuned, color="C0", ls=":", label="test utility, learnt")
    ax.set_xlabel("step")
    ax.set_ylabel("training utility per month")
    ax.legend(fontsize=8)
    fig.suptitle("Markowitz portfolio: learning gamma and alpha through the optimiser")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "portfolio.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
