"""Forward solves of a batch: ``pdipm.solve_batch`` against qpth's batched PDIPM and
Clarabel called per sample.

Cases (float64, CPU):

* ``sudoku``: OptNet's 4x4 Sudoku QP, ``min 0.05||z||^2 - p'z  s.t.  A z = 1, z >= 0``,
  n = 64, ``A`` the 40 linearly independent one-hot constraints of a 4x4 board (cells,
  rows, columns, boxes; OptNet's ``get_sudoku_matrix``), ``p`` the one-hot clues of a
  random valid board with half its cells given, one board per sample;
* ``box``: ``min 1/2||y||^2 + q'y  s.t.  -1 <= y <= 0, 1'y <= 3`` at n = 100 and 500,
  ``q`` random per sample.

Methods: ``pdipm`` (one ``solve_batch``, matrices shared by the batch), ``qpth``
(``QPFunction`` at its defaults, if importable: see docs/benchmarks.md for installing
0.0.18 into a side folder on ``PYTHONPATH``), ``clarabel`` (the ``clarabel`` backend's
``solve`` per sample).  Times are the median of ``--reps`` calls after one warm-up, wall
and CPU seconds (every method runs on one thread, ``--threads``; on a shared machine the
CPU time is the steadier figure).  "max |y - y_ref|" compares each method's solutions
with Clarabel's at tolerance 1e-12 (untimed): the box QP has coordinates within 1e-5 of a
bound, where every method stopping at the usual 1e-8..1e-9 is 1e-5..1e-4 off, Clarabel at
its defaults included.  A (method, case, batch) whose predicted time (from the smaller
batch) exceeds ``--max-seconds`` is skipped.

    .venv/bin/python benchmarks/pdipm.py                       # all cases, batch 8 128 1024
    PYTHONPATH=/tmp/qpth_site .venv/bin/python benchmarks/pdipm.py --cases sudoku --batch 8 128

It prints a table and writes ``--csv`` (default ``docs/benchmarks/pdipm.csv``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ffo_core import get_backend
from ffo_core.protocol import ConeDims, ProblemBatch, SparsePattern

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "case",
    "n",
    "batch",
    "method",
    "seconds",
    "cpu_seconds",
    "per_sample_ms",
    "max_abs_diff",
    "status",
)


def sudoku_matrix() -> np.ndarray:
    """OptNet's ``get_sudoku_matrix(2)``: the one-hot constraints of a 4x4 board over
    z[(row*4 + col)*4 + digit], greedily reduced to linearly independent rows (40)."""
    k, N = 2, 4
    rows = []
    for r in range(N):
        for c in range(N):
            rows.append([(r * N + c) * N + v for v in range(N)])
    for v in range(N):
        for r in range(N):
            rows.append([(r * N + c) * N + v for c in range(N)])
        for c in range(N):
            rows.append([(r * N + c) * N + v for r in range(N)])
        for br in range(k):
            for bc in range(k):
                rows.append(
                    [((br * k + i) * N + bc * k + j) * N + v for i in range(k) for j in range(k)]
                )
    full = np.zeros((len(rows), N**3))
    for i, cols in enumerate(rows):
        full[i, cols] = 1.0
    kept = [full[0]]
    for row in full[1:]:
        if np.linalg.matrix_rank(np.array(kept + [row])) > len(kept):
            kept.append(row)
    return np.array(kept)


def sudoku_clues(rng, batch: int) -> np.ndarray:
    """One-hot clues of random valid 4x4 boards (digit and band permutations of one
    solution), half of the cells given."""
    base = np.array([[0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2], [3, 2, 1, 0]])
    out = np.zeros((batch, 64))
    for b in range(batch):
        board = rng.permutation(4)[base]
        board = board[rng.permutation(2).repeat(2) * 2 + np.tile(rng.permutation(2), 2)]
        given = rng.permutation(16)[:8]
        for cell in given:
            out[b, cell * 4 + board.flat[cell]] = 1.0
    return out


def problem(case: str, n: int, batch: int, rng):
    """``(P, q, A, b, G, h)``: dense matrices shared by the batch, ``q`` per sample."""
    if case == "sudoku":
        A = sudoku_matrix()
        return (
            0.1 * np.eye(64),
            -sudoku_clues(rng, batch),
            A,
            np.ones(A.shape[0]),
            -np.eye(64),
            np.zeros(64),
        )
    G = np.vstack([np.eye(n), -np.eye(n), np.ones((1, n))])
    h = np.concatenate([np.zeros(n), np.ones(n), [3.0]])
    return np.eye(n), rng.standard_normal((batch, n)), np.zeros((0, n)), np.zeros(0), G, h


def run_pdipm(data):
    P, q, A, b, G, h = data
    pats = [SparsePattern.of(sp.csc_matrix(M)) for M in (P, A, G)]
    vals = [M[p.indices, p.cols][None] for M, p in zip((P, A, G), pats)]
    batch = ProblemBatch(
        q.shape[0],
        pats[0],
        vals[0],
        q,
        pats[1],
        vals[1],
        b[None],
        pats[2],
        vals[2],
        h[None],
        ConeDims(nonneg=len(h)),
    )
    backend = get_backend("pdipm")

    def call():
        out = backend.solve_batch(batch)
        return out.primal, [s.value for s in out.status]

    return call


def run_qpth(data):
    from qpth.qp import QPFunction

    P, q, A, b, G, h = (torch.from_numpy(np.asarray(v, dtype=float)) for v in data)
    if A.shape[0] == 0:
        A, b = torch.Tensor().double(), torch.Tensor().double()

    def call():
        with torch.no_grad():
            y = QPFunction(verbose=-1)(P, q, G, h, A, b)
        return y.numpy(), []

    return call


def run_clarabel(data, config: str = "clarabel"):
    from ffo_core.protocol import ConeConstraints, Equalities, Objective

    P, q, A, b, G, h = data
    Ps, As, Gs = sp.csc_matrix(P), sp.csc_matrix(A), sp.csc_matrix(G)
    cons = ConeConstraints(Gs, h, ConeDims(nonneg=len(h)))
    eq = Equalities(As, b)
    backend = get_backend(config)

    def call():
        sols = [backend.solve(Objective(Ps, qk), cons, eq) for qk in q]
        return np.array([s.primal for s in sols]), [s.status.value for s in sols]

    return call


RUNNERS = {"pdipm": run_pdipm, "qpth": run_qpth, "clarabel": run_clarabel}
#: the reference of the "max_abs_diff" column (not timed)
TIGHT = "clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12,tol_ktratio=1e-10"


def timed(call, reps: int):
    """Median wall and CPU seconds of ``reps`` calls after a warm-up, and the last output."""
    call()
    times, cpu, out = [], [], None
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        out = call()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(times), statistics.median(cpu), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["sudoku", "box100", "box500"])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 128, 1024])
    ap.add_argument("--methods", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--csv", default=str(ROOT / "docs" / "benchmarks" / "pdipm.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = list(args.methods)
    if "qpth" in methods:
        try:
            import qpth  # noqa: F401
        except ImportError as exc:
            print(f"skipping qpth: {exc}")
            methods.remove("qpth")
    rows = []
    for case in args.cases:
        n = 64 if case == "sudoku" else int(case.removeprefix("box"))
        last: dict[str, tuple[int, float]] = {}
        for batch in sorted(args.batch):
            data = problem(case, n, batch, np.random.default_rng(batch))
            results = {}
            for method in methods:
                if method in last:
                    b0, t0 = last[method]
                    if t0 * batch / b0 > args.max_seconds:
                        print(f"skip {case} batch {batch} {method}: ~{t0 * batch / b0:.0f} s")
                        continue
                reps = args.reps if batch < 1024 else 1
                seconds, cpu, (y, statuses) = timed(RUNNERS[method](data), reps)
                last[method] = (batch, seconds)
                results[method] = (seconds, cpu, y, statuses)
            ref, _ = run_clarabel(data, TIGHT)()
            for method, (seconds, cpu, y, statuses) in results.items():
                diff = float(np.max(np.abs(y - ref)))
                bad = sorted({s for s in statuses if s != "optimal"})
                rows.append(
                    {
                        "case": case,
                        "n": n,
                        "batch": batch,
                        "method": method,
                        "seconds": round(seconds, 5),
                        "cpu_seconds": round(cpu, 5),
                        "per_sample_ms": round(1e3 * seconds / batch, 4),
                        "max_abs_diff": f"{diff:.1e}",
                        "status": ",".join(bad) or "optimal",
                    }
                )
                print(" ".join(f"{rows[-1][k]}" for k in FIELDS), flush=True)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=FIELDS)
        out.writeheader()
        out.writerows(rows)
    print()
    print("| case | n | batch | method | s | CPU s | ms/sample | max abs diff vs tight Clarabel |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['n']} | {r['batch']} | {r['method']} | {r['seconds']:.4f} "
            f"| {r['cpu_seconds']:.4f} | {r['per_sample_ms']:.3f} | {r['max_abs_diff']} |"
        )
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
