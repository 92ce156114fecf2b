"""Benchmark: the ``moreau`` backend's batched solve against per-sample solves (forward only).

Two problems, a batch of samples that differ in the linear term:

* ``sudoku``: OptNet's 4x4 Sudoku QP, ``min 0.05||z||^2 - p'z  s.t.  A z = 1, z >= 0``,
  ``n = 64``, ``A`` the 40 linearly independent rows of the cell/row/column/box constraints;
  ``p ~ U(0, 1)``;
* ``box``: the DFL box QP, ``min 1/2||y||^2 + q'y  s.t.  -1 <= y <= 0, 1'y <= 3``,
  ``q ~ N(0, 1)``, at ``n = 100`` and ``500``.

Methods (each times only the solve of data already in the solver's form; medians of
``--reps`` timed calls after one untimed call, the methods of a case timed round robin):

==========================  ==============================================================
``moreau-batch``            ``MoreauBackend().solve_batch`` (default ``solver=auto``)
``moreau-batch-ipm``        the same, ``solver=ipm``
``moreau-batch-as``         the same, ``solver=active_set``
``moreau-solve``            ``MoreauBackend().solve`` sample by sample
``clarabel-solve``          ``ClarabelBackend().solve`` sample by sample
``cvxpylayers-moreau``      cvxpylayers' ``CvxpyLayer(..., solver="MOREAU")`` forward on the
                            problem as written (its own parameter-to-data map included)
``cvxpylayers-moreau-h``    the same with the zero right-hand side of ``z >= 0`` /
                            ``y <= 0`` made a parameter (set to 0): cvxpylayers 1.2 drops
                            constraint rows whose data are constant with a zero right-hand
                            side (``err`` shows it), and keeps them when it is a parameter
==========================  ==============================================================

``err`` is the largest ``|y - y_ref|`` over the samples solved, ``y_ref`` Clarabel at
1e-12; ``failed`` counts the samples whose status has no solution (cvxpylayers reports no
statuses).
Moreau's own thread pool is limited to ``--threads`` (default 1, ``RAYON_NUM_THREADS``).

    python -m benchmarks.moreau                      # batch 8 and 128
    python -m benchmarks.moreau --batch 8 128 1024 --out bench_out

Prints a table and writes ``moreau.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

METHODS = (
    "moreau-batch",
    "moreau-batch-ipm",
    "moreau-batch-as",
    "moreau-solve",
    "clarabel-solve",
    "cvxpylayers-moreau",
    "cvxpylayers-moreau-h",
)
COLUMNS = ("problem", "n", "batch", "method", "ms", "us_per_sample", "err", "failed", "note")


def sudoku_rows():
    """The 40 linearly independent rows of OptNet's 4x4 Sudoku equalities: the rows of
    :func:`benchmarks.paper.boards.constraint_matrix` in OptNet's order (cells, then every
    row, every column and every box, each with its 4 digits), each kept when it raises
    the rank."""
    from benchmarks.paper.boards import constraint_matrix, independent_rows

    # constraint_matrix: 16 cell rows, then per digit d its 4 row, 4 column and 4 box rows
    order = list(range(16)) + [
        16 + 12 * d + 4 * kind + place for kind in range(3) for place in range(4) for d in range(4)
    ]
    return independent_rows(constraint_matrix(2)[order])


def problem(name: str, n: int, batch: int, seed: int = 0):
    """``(ProblemBatch, linear terms (batch, n), cvxpy builder)`` of one case."""
    import numpy as np
    import scipy.sparse as sp

    from ffo_core.protocol import ConeDims, ProblemBatch, SparsePattern

    rng = np.random.default_rng(seed)
    if name == "sudoku":
        A = sudoku_rows()
        n = A.shape[1]
        P, scale = sp.identity(n, format="csc"), 0.1
        G = -sp.identity(n, format="csc")
        h = np.zeros(n)
        b = np.ones(A.shape[0])
        lin = -rng.random((batch, n))
    else:
        A = np.zeros((0, n))
        P, scale = sp.identity(n, format="csc"), 1.0
        G = sp.vstack([-sp.identity(n), sp.identity(n), np.ones((1, n))], format="csc")
        h = np.r_[np.ones(n), np.zeros(n), 3.0]
        b = np.zeros(0)
        lin = rng.standard_normal((batch, n))
    As, Gs = sp.csc_matrix(A), sp.csc_matrix(G)
    pb = ProblemBatch(
        batch,
        SparsePattern.of(P),
        scale * P.data[None, :],
        lin,
        SparsePattern.of(As),
        As.data[None, :],
        b[None, :],
        SparsePattern.of(Gs),
        Gs.data[None, :],
        h[None, :],
        ConeDims(nonneg=G.shape[0]),
    )

    def cvxpy_problem(zero_rhs_parameter: bool):
        import cvxpy as cp

        y = cp.Variable(n)
        c = cp.Parameter(n)
        params = [c]
        if name == "sudoku":
            lower = cp.Parameter(n) if zero_rhs_parameter else 0.0
            cons = [A @ y == 1, y >= lower]
            obj = 0.05 * cp.sum_squares(y) + c @ y
        else:
            upper = cp.Parameter(n) if zero_rhs_parameter else 0.0
            cons = [y >= -1, y <= upper, cp.sum(y) <= 3]
            obj = 0.5 * cp.sum_squares(y) + c @ y
        if zero_rhs_parameter:
            params.append(lower if name == "sudoku" else upper)
        return cp.Problem(cp.Minimize(obj), cons), params, y

    return pb, cvxpy_problem


def runners(name: str, n: int, batch: int, methods) -> tuple[dict, object, dict]:
    """``({method: callable returning the (batch, n) primal}, ProblemBatch, notes)``."""
    import numpy as np
    import torch

    from ffo_backends.clarabel import ClarabelBackend
    from ffo_backends.moreau import MoreauBackend

    pb, cvxpy_problem = problem(name, n, batch)
    samples = [pb.sample(k) for k in range(batch)]
    calls: dict = {}
    notes: dict = {}
    for method in methods:
        if method.startswith("moreau-batch"):
            solver = {"moreau-batch": "auto", "moreau-batch-ipm": "ipm"}.get(method, "active_set")
            be = MoreauBackend(solver=solver)

            def call(be=be, method=method):
                out = be.solve_batch(pb)
                used = sorted({i.extra["method"] for i in out.info})
                notes[method] = "answered by " + "+".join(used)
                ok = np.array([st.has_solution for st in out.status])
                return np.where(ok[:, None], out.primal, np.nan)

            calls[method] = call
        elif method in ("moreau-solve", "clarabel-solve"):
            be = MoreauBackend() if method == "moreau-solve" else ClarabelBackend()
            calls[method] = lambda be=be: np.stack([_primal(be.solve(*s), pb.n) for s in samples])
        else:  # cvxpylayers
            try:
                from cvxpylayers.torch import CvxpyLayer
            except ImportError as exc:
                notes[method] = f"cvxpylayers not importable: {exc}"
                continue
            with_h = method.endswith("-h")
            prob, params, y = cvxpy_problem(with_h)
            try:
                layer = CvxpyLayer(prob, parameters=params, variables=[y], solver="MOREAU")
            except Exception as exc:  # a cvxpylayers without Moreau support
                notes[method] = f"{type(exc).__name__}: {exc}"
                continue
            args = [torch.tensor(pb.q)]
            if with_h:
                args.append(torch.zeros((batch, pb.n), dtype=torch.float64))

            def call(layer=layer, args=args):
                with torch.no_grad():
                    return layer(*args)[0].numpy()

            calls[method] = call
            notes[method] = "zero-RHS rows as parameters" if with_h else "problem as written"
    return calls, pb, notes


def _primal(sol, n: int):
    """A Solution's primal, NaN when the solve found none."""
    import numpy as np

    return sol.primal if sol.status.has_solution else np.full(n, np.nan)


def run_case(name: str, n: int, batch: int, reps: int, methods, max_seconds: float) -> list[dict]:
    """Every method on one case, round robin: repetition ``r`` times each method once, so
    that a slow spell of a shared machine slows all of them alike.  A method whose first
    (untimed) call takes longer than ``max_seconds`` is reported with that one call."""
    import numpy as np

    from ffo_backends.clarabel import ClarabelBackend

    calls, pb, notes = runners(name, n, batch, methods)
    tight = ClarabelBackend(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    ref = np.stack([tight.solve(*pb.sample(k)).primal for k in range(batch)])
    outputs, times = {}, {}
    for m, call in calls.items():  # untimed: first-call caches
        t0 = time.perf_counter()
        outputs[m] = call()
        first = time.perf_counter() - t0
        times[m] = [first] if first > max_seconds else []
        if first > max_seconds:
            notes[m] = f"{notes.get(m, '')}; one call (over {max_seconds:g} s)".lstrip("; ")
    for _ in range(reps):
        for m, call in calls.items():
            if len(times[m]) == 1 and "one call" in notes.get(m, ""):
                continue
            t0 = time.perf_counter()
            call()
            times[m].append(time.perf_counter() - t0)
    rows = []
    for m in methods:
        seconds = statistics.median(times[m]) if m in calls else float("nan")
        if m in calls:
            ok = ~np.isnan(outputs[m]).any(axis=1)
            err = float(np.max(np.abs(outputs[m][ok] - ref[ok]), initial=0.0))
            failed = int((~ok).sum())
        else:
            err, failed = float("nan"), 0
        rows.append(
            {
                "problem": name,
                "n": pb.n,
                "batch": batch,
                "method": m,
                "ms": 1e3 * seconds,
                "us_per_sample": 1e6 * seconds / batch,
                "err": err,
                "failed": failed,
                "note": notes.get(m, ""),
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", nargs="+", default=["sudoku", "box"], choices=["sudoku", "box"])
    ap.add_argument("--n", nargs="+", type=int, default=[100, 500], help="box QP sizes")
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 128])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1, help="Moreau's thread pool (rayon)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=10.0,
        help="a method whose first call takes longer is timed by that call only",
    )
    ap.add_argument("--out", type=Path, default=None, help="folder for moreau.csv")
    args = ap.parse_args(argv)
    if "moreau" in sys.modules:
        print("warning: moreau already imported; --threads may not apply", file=sys.stderr)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.filterwarnings("ignore")  # cvxpy/moreau chatter about solver choices

    cases = [(p, n) for p in args.problems for n in (args.n if p == "box" else [64])]
    rows: list[dict] = []
    for name, n in cases:
        for batch in args.batch:
            rows += run_case(name, n, batch, args.reps, args.methods, args.max_seconds)
            _print(rows[-len(args.methods) :], header=len(rows) == len(args.methods))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "moreau.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")
    return 0


def _print(rows, header: bool) -> None:
    if header:
        print(
            f"{'problem':8s} {'n':>4s} {'batch':>5s} {'method':22s} {'ms':>9s} "
            f"{'us/sample':>9s} {'err':>8s} {'failed':>6s}  note"
        )
    for r in rows:
        print(
            f"{r['problem']:8s} {r['n']:4d} {r['batch']:5d} {r['method']:22s} {r['ms']:9.2f} "
            f"{r['us_per_sample']:9.1f} {r['err']:8.1e} {r['failed']:6d}  {r['note']}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
