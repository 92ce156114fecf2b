"""Large dense QPs: forward + backward time and peak memory of FFOQPLayer against qpth and
FFOLayer, on the synthetic decision-focused-learning setup of the FFOLayer paper.

Setup (guaguakai/FFOLayer, ``main.py``): per sample

    minimize 1/2 y'Qy + q'y   s.t.   G y <= h,   G = [I; -I; 1'],  h = [0; 1; 3]

(``-1 <= y <= 0``, ``1'y <= 3``), ``Q = I`` (n x n), batch of predictions ``q`` (B, n), and
the loss ``mean(y_true * y)``.  Q, q, G, h all require gradients and are passed **dense**,
as a qpth user would (G is (2n+1) x n).  Methods:

    ffoqp          FFOQPLayer, first-order backward (default)
    ffoqp-kkt      FFOQPLayer, backward="kkt" (exact, sparse LU of the reduced KKT system)
    ffoqp-sparse   FFOQPLayer with Q and G given as torch sparse COO tensors (learnable on
                   their pattern only: a different, cheaper gradient)
    qpth           qpth.QPFunction (batched dense PDIPM), if importable, n <= --qpth-max-n
    ffolayer       FFOLayer on the CVXPY problem 0.5*sum_squares(Q @ y) + q'y, G y <= h with
                   Q, q, G, h parameters (the paper's CvxpyLayer formulation), n <=
                   --ffolayer-max-n (CVXPY's canonicalisation is the limit: at n = 2000 it
                   tries to allocate ~179 GiB)

Every (method, n) runs in a fresh subprocess (so peak RSS is that run's own, read with
``resource.getrusage``) under a wall-clock timeout.  After a small warm-up solve (imports,
registry), the timed call is repeated ``--repeats`` times and the fastest forward and
backward are reported.  Not a test; run it by hand:

    .venv/bin/python benchmarks/qp_large.py                      # n = 1000, 2000, 5000
    .venv/bin/python benchmarks/qp_large.py --n 1000 --methods ffoqp qpth --timeout 120

It prints a table and writes ``bench_out/qp_large.csv`` (``--csv PATH`` elsewhere; the
table in docs/qp_layer.md is ``--csv docs/benchmarks/qp_large/qp_large.csv``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ffoqp", "ffoqp-kkt", "ffoqp-sparse", "qpth", "ffolayer")
FIELDS = (
    "method",
    "n",
    "batch",
    "dtype",
    "status",
    "forward_s",
    "backward_s",
    "total_s",
    "peak_rss_mb",
    "data_rss_mb",
    "note",
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# -- one measurement, in a fresh process -----------------------------------------------------
def _problem(n: int, batch: int, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    Q = torch.eye(n, dtype=dtype)
    G = torch.cat(
        [torch.eye(n, dtype=dtype), -torch.eye(n, dtype=dtype), torch.ones(1, n, dtype=dtype)]
    )
    h = torch.cat(
        [torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype), torch.tensor([3.0], dtype=dtype)]
    )
    q = torch.randn(batch, n, generator=g, dtype=dtype)
    y_true = torch.randn(batch, n, generator=g, dtype=dtype)
    return Q, q, G, h, y_true


def _runner(method: str, n: int, batch: int, dtype, solver: str):
    """A function ``(Q, q, G, h) -> y`` for the method, and its construction time."""
    import torch

    start = time.perf_counter()
    empty = torch.empty(0, dtype=dtype)
    if method.startswith("ffoqp"):
        from ffo_core import FFOQPLayer

        layer = FFOQPLayer(
            solver=solver, backward="kkt" if method == "ffoqp-kkt" else "ffo", inaccurate="ignore"
        )

        def run(Q, q, G, h):
            return layer(Q, q, G, h, empty, empty)
    elif method == "qpth":
        from qpth.qp import QPFunction

        fn = QPFunction(verbose=-1)

        def run(Q, q, G, h):
            return fn(Q, q, G, h, empty, empty)
    elif method == "ffolayer":
        import cvxpy as cp

        from ffo_core import FFOLayer

        m = 2 * n + 1
        Qp, qp = cp.Parameter((n, n)), cp.Parameter(n)
        Gp, hp = cp.Parameter((m, n)), cp.Parameter(m)
        y = cp.Variable(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Qp @ y) + qp @ y), [Gp @ y <= hp])
        layer = FFOLayer(prob, [Qp, qp, Gp, hp], [y], solver=solver, inaccurate="ignore")

        def run(Q, q, G, h):
            return layer(Q, q, G, h)[0]
    else:
        raise SystemExit(f"unknown method {method!r}")
    return run, time.perf_counter() - start


def worker(method: str, n: int, batch: int, dtype_name: str, solver: str, repeats: int) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    run, build_s = _runner(method, n, batch, dtype, solver)
    if method != "ffolayer":  # warm-up: imports, registry, first solve
        Qw, qw, Gw, hw, _ = _problem(8, 2, dtype)
        run(Qw, qw, Gw, hw)
    Q, q, G, h, y_true = _problem(n, batch, dtype)
    if method == "ffoqp-sparse":
        Q, G = Q.to_sparse(), G.to_sparse()
    data_rss = _rss_mb()
    fwd, bwd = [], []
    for _ in range(repeats):
        leaves = [t.detach().clone().requires_grad_() for t in (Q, q, G, h)]
        t0 = time.perf_counter()
        y = run(*leaves)
        t1 = time.perf_counter()
        (y_true * y).mean().backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        assert all(t.grad is not None for t in leaves)
        del y, leaves
    note = f"build {build_s:.1f}s" if method == "ffolayer" else ""
    return {
        "forward_s": min(fwd),
        "backward_s": min(bwd),
        "total_s": min(f + b for f, b in zip(fwd, bwd)),
        "peak_rss_mb": _rss_mb(),
        "data_rss_mb": data_rss,
        "note": note,
    }


# -- the driver ------------------------------------------------------------------------------
def measure(method: str, n: int, args) -> dict:
    row = {"method": method, "n": n, "batch": args.batch, "dtype": args.dtype}
    limit = {"qpth": args.qpth_max_n, "ffolayer": args.ffolayer_max_n}.get(method)
    if limit is not None and n > limit:
        flag = "--qpth-max-n" if method == "qpth" else "--ffolayer-max-n"
        return {**row, "status": "skipped", "note": f"not run: n > {flag} {limit}"}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        method,
        str(n),
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
        "--solver",
        args.solver,
        "--repeats",
        str(args.repeats),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "note": f"> {args.timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        status = "not installed" if "No module named 'qpth'" in last else "error"
        return {**row, "status": status, "note": last[:160]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "status": "ok", **result}


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 5000])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--solver", default="clarabel")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per (method, n)")
    ap.add_argument("--qpth-max-n", type=int, default=1000)
    ap.add_argument("--ffolayer-max-n", type=int, default=1000)
    ap.add_argument("--csv", default=str(ROOT / "bench_out" / "qp_large.csv"))
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        method, n = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(method, n, args.batch, args.dtype, args.solver, args.repeats)))
        return

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"batch {args.batch}, {args.dtype}, solver {args.solver}"
    )
    header = (
        f"{'method':<13}{'n':>6}  {'status':<9}{'fwd s':>8}{'bwd s':>8}"
        f"{'total s':>9}{'peak MB':>9}{'data MB':>9}  note"
    )
    print(header)
    rows = []
    for n in args.n:
        for method in args.methods:
            row = measure(method, n, args)
            rows.append(row)
            print(
                f"{method:<13}{n:>6}  {row['status']:<9}"
                f"{_fmt(row.get('forward_s'), '8.2f')}{_fmt(row.get('backward_s'), '8.2f')}"
                f"{_fmt(row.get('total_s'), '9.2f')}{_fmt(row.get('peak_rss_mb'), '9.0f')}"
                f"{_fmt(row.get('data_rss_mb'), '9.0f')}  {row.get('note', '')}",
                flush=True,
            )
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=FIELDS)
        out.writeheader()
        for row in rows:
            out.writerow(
                {
                    k: (f"{row[k]:.3f}" if isinstance(row.get(k), float) else row.get(k, ""))
                    for k in FIELDS
                }
            )
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
