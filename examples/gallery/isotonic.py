"""Monotonic regression with a learnt smoothness: isotonic regression, smoothed, tuned by gradient.

Isotonic regression fits the nondecreasing sequence closest to noisy data; its answer is a
staircase.  Adding a curvature penalty of weight ``lam`` gives a smooth monotone fit,

    z(y) = argmin 1/2 ||z - y||^2 + lam/2 ||D2 z||^2   subject to   z_1 <= z_2 <= ... <= z_n,

a QP in qpth's form (``Q = I + lam D2'D2``, ``p = -y``, ``G`` the first-difference matrix,
``h = 0``) solved by ``FFOQPLayer``.  Which ``lam``?  Here it is learnt: gradient descent on
``log lam`` through the layer (the gradient reaches ``lam`` through ``Q``), minimising the
error to the clean curves of a set of training signals, and then checked on fresh test
signals against a sweep of fixed values.  At ``lam = 0`` the layer's answer is compared with
the pool-adjacent-violators algorithm (exact, solver-free).

    python examples/gallery/isotonic.py                 # writes bench_out/gallery/isotonic.png
    python examples/gallery/isotonic.py --out DIR --smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ffo_core import FFOQPLayer

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bench_out" / "gallery"


def pav(v: np.ndarray) -> np.ndarray:
    """Pool adjacent violators: the nondecreasing least-squares fit of ``v``."""
    blocks: list[list[float]] = []  # [mean, size]
    for x in v:
        blocks.append([float(x), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, n in blocks])


def signals(count: int, n: int, rng: np.random.Generator):
    """Random smooth increasing curves (sums of logistic steps) and noisy samples of them."""
    t = np.linspace(0, 1, n)
    clean = np.zeros((count, n))
    for i in range(count):
        for _ in range(3):
            c, w, a = rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.15), rng.uniform(0.3, 1.0)
            clean[i] += a / (1 + np.exp(-(t - c) / w))
    noisy = clean + 0.15 * rng.standard_normal((count, n))
    return t, torch.tensor(clean), torch.tensor(noisy)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for isotonic.png")
    ap.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = ap.parse_args(argv)
    n, count, steps = (15, 4, 3) if args.smoke else (60, 16, 60)

    rng = np.random.default_rng(0)
    t, clean, noisy = signals(count, n, rng)
    _, clean_test, noisy_test = signals(count, n, rng)
    D1 = torch.zeros(n - 1, n, dtype=torch.float64)  # (D1 z)_i = z_i - z_(i+1) <= 0
    i = torch.arange(n - 1)
    D1[i, i], D1[i, i + 1] = 1.0, -1.0
    D2 = D1[1:] - D1[:-1]  # second differences
    eye, h = torch.eye(n, dtype=torch.float64), torch.zeros(n - 1, dtype=torch.float64)
    layer = FFOQPLayer()  # Clarabel, first-order backward

    def fit(y, lam):
        return layer(eye + lam * (D2.T @ D2), -y, D1, h, None, None)

    def error(y, target, lam) -> float:
        with torch.no_grad():
            return float(((fit(y, lam) - target) ** 2).mean())

    gap = float(np.abs(fit(noisy[:1], 0.0)[0].detach().numpy() - pav(noisy[0].numpy())).max())
    log_lam = torch.tensor(np.log(0.1), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_lam], lr=0.15)
    path = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((fit(noisy, log_lam.exp()) - clean) ** 2).mean()
        loss.backward()
        path.append((log_lam.exp().item(), loss.item()))
        opt.step()
    lam = log_lam.exp().item()
    sweep = np.logspace(-2, 3, 6 if args.smoke else 16)
    test = [error(noisy_test, clean_test, s) for s in sweep]

    print("Smoothed isotonic regression with a learnt weight (FFOQPLayer, gradient via Q).")
    print(f"  isotonic regression (lam = 0) equals pool-adjacent-violators to {gap:.1e}")
    print(f"  learnt lam = {lam:.3g} (from 0.1) after {steps} steps")
    print(
        f"  test error: lam = 0 (staircase) {error(noisy_test, clean_test, 0.0):.2e}, "
        f"learnt lam {error(noisy_test, clean_test, lam):.2e}, "
        f"best of the sweep {min(test):.2e} at lam = {sweep[int(np.argmin(test))]:.3g}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.semilogx(sweep, test, "k.-", label="test error of fixed lam")
    lams, losses = zip(*path)
    ax.semilogx(lams, losses, "o-", color="C0", ms=3, label="training error along the learning")
    ax.axvline(lam, color="C0", ls=":", label=f"learnt lam = {lam:.3g}")
    ax.set_xlabel("lam")
    ax.set_ylabel("mean squared error to the clean curve")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(t, noisy_test[0], "k.", alpha=0.5, label="noisy test signal")
    ax.plot(t, clean_test[0], "k--", lw=1, label="clean")
    ax.plot(t, pav(noisy_test[0].numpy()), color="C3", lw=1.5, label="isotonic (lam = 0)")
    with torch.no_grad():
        ax.plot(t, fit(noisy_test[:1], lam)[0], color="C0", lw=2, label="learnt lam")
    ax.set_xlabel("t")
    ax.legend(fontsize=8)
    fig.suptitle("Monotone fits: learning the smoothness of isotonic regression")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "isotonic.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
