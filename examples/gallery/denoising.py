"""Signal denoising by total variation, with the regularisation weight learnt through the layer.

The total-variation denoiser of a signal ``s`` is

    x(s) = argmin 1/2 ||x - s||^2 + lam ||D x||_1          (D: first differences),

which keeps jumps and flattens noise; too small a ``lam`` leaves noise, too large a ``lam``
erases the signal.  Here ``lam`` is a ``cp.Parameter`` of an ``FFOLayer`` and is learnt by
gradient descent on the mean squared error between the denoised training signals and their
clean versions (a bilevel problem, solved with the layer's first-order backward).  A sweep
of fixed values on fresh test signals shows where the learnt value lands.  The script also
compares the gradient with the exact KKT mode's on one batch.

    python examples/gallery/denoising.py                # writes bench_out/gallery/denoising.png
    python examples/gallery/denoising.py --out DIR --smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cvxpy as cp
import numpy as np
import torch

from ffo_core import FFOLayer

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bench_out" / "gallery"


def signals(count: int, n: int, rng: np.random.Generator):
    """Piecewise-constant signals (4-8 random jumps) and noisy copies (noise 0.3)."""
    clean = np.zeros((count, n))
    for i in range(count):
        cuts = np.sort(rng.choice(np.arange(1, n), rng.integers(4, 9), replace=False))
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, n]):
            clean[i, a:b] = rng.uniform(-1.5, 1.5)
    noisy = clean + 0.3 * rng.standard_normal((count, n))
    return torch.tensor(clean), torch.tensor(noisy)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for denoising.png")
    ap.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = ap.parse_args(argv)
    n, count, steps = (20, 4, 3) if args.smoke else (100, 12, 30)

    s, lam_p = cp.Parameter(n), cp.Parameter(nonneg=True)
    x = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - s) + lam_p * cp.norm1(cp.diff(x))))
    layer = FFOLayer(problem, parameters=[s, lam_p], variables=[x])  # Clarabel, first-order
    exact = FFOLayer(problem, parameters=[s, lam_p], variables=[x], backward="kkt")

    rng = np.random.default_rng(0)
    clean, noisy = signals(count, n, rng)
    clean_test, noisy_test = signals(count, n, rng)

    def error(lam: float, y=noisy_test, target=clean_test) -> float:
        with torch.no_grad():
            (xs,) = layer(y, torch.tensor(lam, dtype=torch.float64))
        return float(((xs - target) ** 2).mean())

    log_lam = torch.tensor(np.log(0.02), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_lam], lr=0.2)
    path = []
    for _ in range(steps):
        opt.zero_grad()
        (xs,) = layer(noisy, log_lam.exp())
        loss = ((xs - clean) ** 2).mean()
        loss.backward()
        path.append((log_lam.exp().item(), loss.item()))
        opt.step()
    lam = log_lam.exp().item()

    grads = []  # d(loss)/d(lam) of the first-order and the exact backward, same batch
    for lay in (layer, exact):
        lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
        (xs,) = lay(noisy, lam_t)
        ((xs - clean) ** 2).mean().backward()
        grads.append(lam_t.grad.item())
    sweep = np.logspace(-2, 1, 5 if args.smoke else 13)
    test = [error(v) for v in sweep]

    print("Total-variation denoising with a learnt weight (FFOLayer, first-order backward).")
    print(f"  learnt lam = {lam:.3g} (from 0.02) after {steps} steps")
    print(
        f"  test error: noisy input {float(((noisy_test - clean_test) ** 2).mean()):.3f}, "
        f"learnt lam {error(lam):.3f}, best of the sweep {min(test):.3f} "
        f"at lam = {sweep[int(np.argmin(test))]:.3g}"
    )
    print(f"  d loss / d lam: first-order {grads[0]:.6g}, exact KKT {grads[1]:.6g}")

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
    ax.set_ylabel("mean squared error to the clean signal")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(noisy_test[0], "k.", ms=3, alpha=0.5, label="noisy test signal")
    ax.plot(clean_test[0], "k--", lw=1, label="clean")
    with torch.no_grad():
        (xs,) = layer(noisy_test[:1], torch.tensor(lam, dtype=torch.float64))
    ax.plot(xs[0], color="C0", lw=2, label="denoised, learnt lam")
    ax.set_xlabel("sample")
    ax.legend(fontsize=8)
    fig.suptitle("Total-variation denoising: learning the regularisation weight")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "denoising.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
