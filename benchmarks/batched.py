"""Benchmark: small QPs in big batches, forward and backward through the layers.

Two problems (the same as ``benchmarks/moreau.py``):

* ``sudoku``: OptNet's 4x4 Sudoku layer, ``min 0.05||z||^2 + p'z  s.t.  A z = 1, z >= 0``,
  ``n = 64``, ``A`` the 40 independent constraint rows (shared by the batch and learnable:
  its gradient is summed over the batch), ``p`` batched;
* ``box``: the DFL box QP ``min 1/2||y||^2 + q'y  s.t.  -1 <= y <= 0, 1'y <= 3`` at
  ``n = 50, 100, 200, 500``, ``q ~ N(0, 1)`` batched.

Methods (each runs in its own process, so its time and peak memory are its own):

=======================  =====================================================================
``ffo-clarabel``         ``FFOQPLayer("clarabel")``: per-sample Clarabel solves, polished
``ffo-moreau``           ``FFOQPLayer("moreau")``: one batched Moreau solve per step (its
                         ``auto`` method: the active set on these QPs)
``ffo-moreau-ipm``       ``FFOQPLayer("moreau:solver=ipm")``: the same with Moreau's interior
                         point (faster where many bounds are active: the box QP at n >= 100)
``ffo-pdipm``            ``FFOQPLayer("pdipm")``: ffo's torch interior point, the dense path
``qpth``                 qpth 0.0.18's ``QPFunction`` (install: ``pip install --target
                         /tmp/qpth_site --no-deps qpth``, run with ``PYTHONPATH=/tmp/qpth_site``)
``cvxpylayers``          cvxpylayers 1.2's ``CvxpyLayer`` at its defaults (diffcp, SCS)
``cvxpylayers-moreau``   the same with ``solver="MOREAU"``, the zero right-hand side of
                         ``z >= 0`` / ``y <= 0`` made a parameter (cvxpylayers 1.2 drops that
                         row when it is constant: ``err`` shows it)
=======================  =====================================================================

Measured per case: forward and backward seconds (the minimum over ``--reps`` steps after one
untimed step), for ffo's methods the time of the backward's solver calls alone (``ghost_s``:
the ghost problems, one batched call for a batched backend), the process's peak RSS, the
solution's distance to Clarabel at 1e-12 and the cosine and relative error of the gradient
w.r.t. ``p`` against the exact KKT gradient at that solution.  (The Sudoku's solutions sit at
degenerate vertices, more active rows than unknowns, where the multipliers and hence the
gradient w.r.t. ``A`` are not unique: every method picks one element of the generalised
gradient, and they differ by 10-25%.)  One thread everywhere (``OMP_NUM_THREADS=1``,
``RAYON_NUM_THREADS=1``, ``n_jobs=1``).  A case whose run exceeds ``--timeout`` seconds is
reported as such.

    python -m benchmarks.batched --out bench_out/batched            # the whole grid
    python -m benchmarks.batched --cases sudoku box:100 --batch 8 128

writes ``batched.csv`` and ``batched.png`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("ffo-clarabel", "ffo-moreau", "ffo-moreau-ipm", "ffo-pdipm", "qpth", "cvxpylayers",
           "cvxpylayers-moreau")  # fmt: skip
#: the backend config string of each ``ffo-*`` method (others: the name after ``ffo-``)
FFO_CONFIGS = {"ffo-moreau-ipm": "moreau:solver=ipm"}
COLUMNS = ("case", "n", "batch", "method", "fwd_s", "bwd_s", "ghost_s", "total_s", "peak_mb",
           "err", "grad_cos", "grad_rel", "note")  # fmt: skip


def data(case: str, n: int, batch: int, seed: int = 0):
    """``(Q, p, G, h, A, b)`` as float64 tensors (``p`` batched, the rest shared)."""
    import numpy as np
    import torch

    from benchmarks.moreau import sudoku_rows

    rng = np.random.default_rng(seed)
    if case == "sudoku":
        A = sudoku_rows()
        n = A.shape[1]
        Q, G, h, b = 0.1 * np.eye(n), -np.eye(n), np.zeros(n), np.ones(A.shape[0])
        p = -rng.random((batch, n))
    else:
        A, b = np.zeros((0, n)), np.zeros(0)
        Q = np.eye(n)
        G = np.vstack([-np.eye(n), np.eye(n), np.ones((1, n))])
        h = np.r_[np.ones(n), np.zeros(n), 3.0]
        p = rng.standard_normal((batch, n))
    return [torch.tensor(v) for v in (Q, p, G, h, A, b)]


def _cvxpy(case: str, tensors, moreau: bool):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    _, p, _, _, A, b = tensors
    n = p.shape[1]
    y = cp.Variable(n)
    c = cp.Parameter(n)
    params, extra = [c], []
    zero = cp.Parameter(n) if moreau else 0.0
    if moreau:
        params.append(zero)
        extra.append(torch_zeros(n))
    if case == "sudoku":
        Ap = cp.Parameter(tuple(A.shape))
        cons = [Ap @ y == b.numpy(), y >= zero]
        obj = 0.05 * cp.sum_squares(y) + c @ y
        params.insert(1, Ap)
    else:
        cons = [y >= -1, y <= zero, cp.sum(y) <= 3]
        obj = 0.5 * cp.sum_squares(y) + c @ y
    prob = cp.Problem(cp.Minimize(obj), cons)
    kw = {"solver": "MOREAU"} if moreau else {}
    layer = CvxpyLayer(prob, parameters=params, variables=[y], **kw)
    return layer, extra


def torch_zeros(n):
    import torch

    return torch.zeros(n, dtype=torch.float64)


def step(case: str, method: str, tensors, w):
    """One forward and backward; ``(y, leaves, fwd seconds, bwd seconds)``."""
    import torch

    Q, p, G, h, A, b = tensors
    leaves = [p.clone().requires_grad_()]
    if case == "sudoku":
        leaves.append(A.clone().requires_grad_())
    args = [Q, leaves[0], G, h, leaves[1] if case == "sudoku" else A, b]
    start = time.perf_counter()
    if method.startswith("ffo-"):
        from ffo_core import FFOQPLayer

        config = FFO_CONFIGS.get(method, method[4:])
        if method not in STATE:
            STATE[method] = FFOQPLayer(config, n_jobs=1, inaccurate="ignore")
        layer = STATE[method]
        time_solver(layer.backend)
        y = layer(*args)
    elif method == "qpth":
        from qpth.qp import QPFunction

        y = QPFunction(verbose=-1)(*[a if a.numel() else torch.Tensor() for a in args])
    else:
        if method not in STATE:
            STATE[method] = _cvxpy(case, tensors, method.endswith("moreau"))
        layer, extra = STATE[method]
        params = [leaves[0]] + ([leaves[1]] if case == "sudoku" else []) + extra
        (y,) = layer(*params)
    mid = time.perf_counter()
    SOLVER_TIME[0], SOLVER_TIME[1] = 0.0, 0
    (y * w).sum().backward()
    return y.detach(), leaves, mid - start, time.perf_counter() - mid, SOLVER_TIME[0]


#: seconds spent inside the backend's own solve calls since the last reset, and the depth
SOLVER_TIME = [0.0, 0]


def time_solver(backend) -> None:
    """Count the time of ``backend``'s ``solve``/``resolve``/``solve_batch`` calls (the
    outermost only: a batch that falls back to per-sample solves is counted once) into
    :data:`SOLVER_TIME`; read after a backward, it is the ghost solves' time exactly as the
    backward made them."""
    cls = type(backend)
    if getattr(cls, "_timed", False):
        return
    for name in ("solve", "resolve", "solve_batch"):
        inner = getattr(cls, name, None)
        if inner is None:
            continue

        def timed(self, *args, _inner=inner, **kwargs):
            SOLVER_TIME[1] += 1
            start = time.perf_counter()
            try:
                return _inner(self, *args, **kwargs)
            finally:
                SOLVER_TIME[1] -= 1
                if SOLVER_TIME[1] == 0:
                    SOLVER_TIME[0] += time.perf_counter() - start

        setattr(cls, name, timed)
    cls._timed = True


STATE: dict = {}


def child(case: str, n: int, batch: int, method: str, reps: int) -> dict:
    """The measurement of one method on one case (run in a child process)."""
    import resource

    import numpy as np
    import torch

    from ffo_core import FFOQPLayer

    torch.set_num_threads(1)
    tensors = data(case, n, batch)
    w = torch.tensor(np.random.default_rng(1).standard_normal(tensors[1].shape))
    y, leaves, *_ = step(case, method, tensors, w)  # untimed (set-up, caches)
    times = [step(case, method, tensors, w)[2:] for _ in range(reps)]
    fwd, bwd, ghost = (min(t[k] for t in times) for k in (0, 1, 2))
    # references: Clarabel at 1e-12, and the exact KKT gradient at that solution
    ref = FFOQPLayer("clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12",
                     backward="kkt", polish=False, n_jobs=1)  # fmt: skip
    STATE["ref"] = ref
    Q, p, G, h, A, b = tensors
    rl = [p.clone().requires_grad_()] + ([A.clone().requires_grad_()] if case == "sudoku" else [])
    yr = ref(Q, rl[0], G, h, rl[1] if case == "sudoku" else A, b)
    (yr * w).sum().backward()
    # the gradient w.r.t. the batched linear term: unique wherever the solution map is
    # differentiable (at the Sudoku's degenerate vertices -- more active rows than
    # unknowns -- the gradient w.r.t. A depends on which multipliers a method picks)
    got, want = leaves[0].grad.flatten(), rl[0].grad.flatten()
    cos = float(got @ want / (got.norm() * want.norm()))
    rel = float((got - want).norm() / want.norm())
    err = float((y - yr.detach()).abs().max())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"fwd_s": fwd, "bwd_s": bwd, "ghost_s": ghost if method.startswith("ffo-") else "",
            "total_s": fwd + bwd, "peak_mb": peak, "err": err, "grad_cos": cos,
            "grad_rel": rel, "note": ""}  # fmt: skip


def run(case: str, n: int, batch: int, method: str, reps: int, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    code = (
        "import json, sys; from benchmarks.batched import child; "
        f"print('@@' + json.dumps(child({case!r}, {n}, {batch}, {method!r}, {reps})))"
    )
    row = {"case": case, "n": n if case == "box" else 64, "batch": batch, "method": method}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=timeout, env=env, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**row, "note": f"over {timeout:g} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("@@")]
    if not lines:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return {**row, "note": last[:120]}
    return {**row, **json.loads(lines[-1][2:])}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:>10.3g}"
    return f"{value!s:>12.12}"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["case"], r["n"]) for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.5), squeeze=False)
    for ax, (case, n) in zip(axes[0], cases):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["batch"], r["total_s"]) for r in rows
                         if (r["case"], r["n"], r["method"]) == (case, n, method)
                         and r.get("total_s") not in (None, ""))  # fmt: skip
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=method)
        ax.set_title(f"{case} n={n}")
        ax.set_xlabel("batch")
        ax.set_ylabel("forward + backward (s)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["sudoku", "box:50", "box:100", "box:200",
                                                   "box:500"])  # fmt: skip
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 128, 1024])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default="bench_out/batched")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.cases:
        case, _, size = spec.partition(":")
        n = int(size) if size else 64
        for batch in args.batch:
            for method in args.methods:
                row = run(case, n, batch, method, args.reps, args.timeout)
                rows.append(row)
                print(" ".join(_cell(row.get(k, "")) for k in COLUMNS), flush=True)
                with open(out / "batched.csv", "w", newline="") as f:
                    writer = csv.DictWriter(f, COLUMNS)
                    writer.writeheader()
                    writer.writerows(rows)
    plot([r for r in rows if r.get("total_s") not in (None, "")], out / "batched.png")
    print(f"wrote {out / 'batched.csv'} and {out / 'batched.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
