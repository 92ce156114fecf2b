"""Gradient error of the first-order backward versus the step delta, on the paper's SOCP shape.

The layer is a QP with an added norm-ball constraint (a second-order cone), as in the
FFOLayer paper's SOCP experiment, at several sizes ``n``:

    y*(q, G, h, A, b, r) = argmin 1/2||F y||^2 + q'y
                           s.t.  G y <= h  (m = n/2),  A y = b  (p = n/4),  ||y||_2 <= r

with the ball active at the optimum (its multiplier is nonzero, so its SOC block is *kept*
in the ghost problem).  For each ``n`` and each step ``delta`` we run the FFO backward with
a fixed ``delta``, one-sided ("forward") and ``central=True``, and measure the relative
error of the parameter gradient of ``w'y*`` against the exact KKT mode (run on SCS at eps
1e-12, an accurate forward point).

Three backends are shown: Clarabel with its default tolerances (1e-8), Clarabel at 1e-12
(its point is ~1e-8 from the optimum on these problems although it reports ~1e-11) and
SCS at eps 1e-10.  The classical picture
appears: truncation error falls with delta (linearly for the one-sided difference -- the
ghost's solution is not affine in delta because of the curvature of the cone --
quadratically for the central one) until the solver's error divided by delta takes over.
Big markers show the default delta (chosen from the backend's reported accuracy, see
``ffo_core.engine.ffo_backward.choose_delta``): a star for ``central=False`` (one-sided), a plus
for ``central=True`` -- which is also what the layer does with all defaults here, because
the ghost keeps a curved cone block.

Run:  python examples/socp_delta.py            (writes bench_out/socp_delta.png)
      python examples/socp_delta.py --out docs/benchmarks/socp_delta/socp_delta.png  (docs/cones.md)
      python examples/socp_delta.py --sizes 10 50 --out /tmp/x.png
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import replace

import cvxpy as cp
import numpy as np
import torch

from ffo_core import FFOLayer, SolverError

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "bench_out", "socp_delta.png")
BACKENDS = {
    "Clarabel (default tol 1e-8)": "clarabel",
    "Clarabel (tol 1e-12)": "clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12,"
    "max_iter=500",
    # eps 1e-10: at 1e-12 SCS solves the forward problem (~300 iterations) but stalls on
    # the ghost problems for n >= 100.  cache_size=0: a reused SCS workspace was seen to
    # stall at this accuracy where a fresh one converges.
    "SCS (eps 1e-10)": "scs:eps_abs=1e-10,eps_rel=1e-10,max_iters=20000,cache_size=0",
}
#: The exact reference: the KKT mode at SCS's eps-1e-12 forward point.
REFERENCE = "scs:eps_abs=1e-12,eps_rel=1e-12,max_iters=200000,cache_size=0"


def socp_layer_data(n: int, seed: int = 0):
    """The problem, its parameters and variable, and parameter values with an active ball."""
    rng = np.random.default_rng(seed)
    m, p = max(1, n // 2), max(1, n // 4)
    y = cp.Variable(n, name="y")
    F = cp.Parameter((n, n), name="F")
    q, G, h = cp.Parameter(n, name="q"), cp.Parameter((m, n), name="G"), cp.Parameter(m, name="h")
    A, b, r = cp.Parameter((p, n), name="A"), cp.Parameter(p, name="b"), cp.Parameter(name="r")
    prob = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(F @ y) + q @ y),
        [G @ y <= h, A @ y == b, cp.norm(y, 2) <= r],
    )
    Fv = np.eye(n) + rng.standard_normal((n, n)) / (2 * np.sqrt(n))
    y_feas = 0.3 * rng.standard_normal(n) / np.sqrt(n)  # ||y_feas|| ~ 0.3 < r
    Gv = rng.standard_normal((m, n))
    hv = Gv @ y_feas + rng.uniform(0.1, 1.0, m)
    Av = rng.standard_normal((p, n))
    values = [Fv, 3.0 * rng.standard_normal(n), Gv, hv, Av, Av @ y_feas, np.array(1.0)]
    return prob, [F, q, G, h, A, b, r], y, values


def gradient(layer: FFOLayer, values, w) -> np.ndarray:
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    with warnings.catch_warnings():  # Clarabel flags AlmostSolved points
        warnings.simplefilter("ignore")
        (y,) = layer(*ts)
        (torch.as_tensor(w) * y).sum().backward()
    return np.concatenate([t.grad.numpy().ravel() for t in ts])


def sweep(n: int, deltas: np.ndarray, seed: int = 0) -> dict:
    prob, params, y, values = socp_layer_data(n, seed)
    w = np.random.default_rng(seed + 1).standard_normal(n)
    w /= np.linalg.norm(w)  # ||c|| = 1: delta ~ kappa (1 + r) for every n
    ref_layer = FFOLayer(prob, params, [y], solver=REFERENCE, backward="kkt")
    ref = gradient(ref_layer, values, w)
    lam_ball = ref_layer.last_diagnostics[0]
    out = {"n": n, "kept_rows": lam_ball["kept"], "errors": {}, "default": {}}
    for label, solver in BACKENDS.items():
        for central in (False, True):
            layer = FFOLayer(prob, params, [y], solver=solver, central=central)
            errs = []
            for d in deltas:  # base_check=None keeps one-sided differences one-sided
                layer.options = replace(layer.options, base_check=None, delta=float(d))
                try:
                    g = gradient(layer, values, w)
                except SolverError as exc:  # e.g. SCS at its iteration limit
                    print(f"  n={n} {label} delta={d:.0e}: {exc}")
                    errs.append(np.nan)
                    continue
                errs.append(np.linalg.norm(g - ref) / np.linalg.norm(ref))
            out["errors"][(label, central)] = np.array(errs)
            # default delta (from the backend's reported accuracy), base check on
            default = FFOLayer(prob, params, [y], solver=solver, central=central)
            g = gradient(default, values, w)
            out["default"][(label, central)] = (
                default.last_diagnostics[0]["delta"],
                np.linalg.norm(g - ref) / np.linalg.norm(ref),
            )
    return out


def plot(results: list[dict], deltas: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BACKENDS), figsize=(5.2 * len(BACKENDS), 4.6), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(results)))
    for ax, label in zip(np.atleast_1d(axes), BACKENDS):
        for res, col in zip(results, colors):
            ax.loglog(
                deltas,
                res["errors"][(label, False)],
                "-o",
                ms=3,
                color=col,
                label=f"n={res['n']} forward",
            )
            ax.loglog(
                deltas,
                res["errors"][(label, True)],
                "--s",
                ms=3,
                color=col,
                label=f"n={res['n']} central",
            )
            for central, marker in ((False, "*"), (True, "P")):
                d, err = res["default"][(label, central)]
                ax.loglog([d], [err], marker, ms=11, color=col, mec="k", mew=0.6)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("delta")
        ax.grid(True, which="major", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("relative gradient error vs exact KKT")
    np.atleast_1d(axes)[-1].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(
        "FFO backward on a QP + norm-ball constraint (SOC block kept in the "
        "ghost): gradient error vs delta.  Forward: solid, central: dashed; "
        "default delta: star (forward), plus (central = the default on curved "
        "cones)",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 200])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    deltas = np.logspace(-8, -1, 15)
    results = []
    for n in args.sizes:
        t0 = time.perf_counter()
        res = sweep(n, deltas, args.seed)
        results.append(res)
        print(
            f"n={n:4d}  ball kept ({res['kept_rows']} cone rows)  "
            f"[{time.perf_counter() - t0:.1f}s]",
            flush=True,
        )
        for (label, central), errs in res["errors"].items():
            d, err = res["default"][(label, central)]
            print(
                f"    {label:28s} {'central' if central else 'forward'}: best "
                f"{np.nanmin(errs):.1e} at delta {deltas[np.nanargmin(errs)]:.0e}; "
                f"default delta {d:.1e} -> {err:.1e}",
                flush=True,
            )
    plot(results, deltas, args.out)
    print(f"wrote {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
