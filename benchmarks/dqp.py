"""Benchmark: FFOQPLayer side by side with dQP on the DFL box QP, forward, backward, accuracy.

Size: one benchmark script: its methods, the child process that isolates each run, the
ghost-solve floor, and the table, CSV and plot.

dQP (PyPI ``libdqp``, "Differentiation Through Black-Box Quadratic Programming Solvers",
NeurIPS 2025) solves each sample with a qpsolvers solver, reads the active set off the
solution (slack under ``eps_active = 1e-5``) and differentiates the equality-constrained
QP on it: its forward also assembles each sample's reduced KKT matrix, its backward
factorises it (sparse LU) and solves.  Ours re-solves one "ghost" problem per sample with
the forward's solver.  The problem is the DFL box QP of ``benchmarks/batched.py``
(``data("box", n, batch)``), with the loss ``(w * y).sum()`` and the gradient taken
w.r.t. the batched ``q``::

    minimize 1/2 ||y||^2 + q'y   s.t.  -1 <= y <= 0,  1'y <= 3        (q ~ N(0, 1), batched)

Both layers take ``G y <= h`` and ``A y = b`` with the same signs; dQP batches every
argument, so it gets ``h`` repeated per sample and ``Q``, ``G`` as a list of per-sample
CSC tensors (its batched sparse input).  Methods, each in its own child process:

================  ==========================================================================
``ffo``           ``FFOQPLayer("clarabel", n_jobs=1)`` with ``Q``, ``G`` as torch sparse CSC
                  tensors shared by the batch (its defaults: Clarabel at
                  ``tol_gap_abs = tol_gap_rel = 1e-12``, polished where it leaves a row
                  undecided)
``ffo-dense``     the same with dense ``Q``, ``G``
``ffo-moreau``    ``FFOQPLayer("moreau", n_jobs=1)``, sparse inputs (when moreau imports)
``dqp``           dQP's fastest configuration, at its default tolerances:
                  ``build_settings(solve_type="sparse", qp_solver="clarabel",
                  lin_solver="scipy SPLU")`` (Clarabel at ``eps_abs = 1e-6``)
``dqp-tight``     the same with Clarabel at ffo's settings (``tol_gap_abs = tol_gap_rel =
                  1e-12``)
``dqp-qdldl``     ``dqp`` with ``lin_solver="qdldl"`` (the linear solver of dQP's README)
``dqp-dense``     ``solve_type="dense"``, ``lin_solver="scipy LU"``: not run by default
                  (its dense LU takes seconds a sample at n = 2000)
================  ==========================================================================

Measured per (method, n): forward and backward seconds over ``--reps`` steps after one
untimed step (``*_min`` the fastest, ``*_med`` the median) and the accuracy
against this problem's closed form (``1'y <= 3`` never binds since ``y <= 0``):
``y = clip(-q, -1, 0)`` and ``dL/dq = -w * (0 < q < 1)``.  ``err`` is the solution's
largest distance to it, ``grad_rel`` the gradient's relative error, ``bad`` the number of
gradient entries (of ``batch * n``) off by more than ``1e-6 * |w_i|``: a coordinate put on
the wrong side of a kink.  ``lsq`` counts dQP's least-squares fallbacks (weakly active
rows), ``inexact`` the samples of the last step Clarabel did not report ``Solved`` for
under dQP.  On the
``ffo`` row ``ghost_min`` times Clarabel called directly on the backward's ghost problems
(the floor a first-order backward over Clarabel cannot go under) and ``bwd_over_ghost``
is the median per-repetition ratio of the two, timed alternately; where dQP imports, the
same process also times the ``dqp`` configuration alternately with ours, and
``paired_bwd_x_dqp``, ``paired_total_x_dqp`` are the medians of the per-step ratios (a slow
spell of a shared machine then slows both sides).  ``*_x_dqp`` divide a row's fastest
times by those of the ``dqp`` row (its own process) at the same n.  ``peak_mb`` is the
process's peak RSS after its first step (imports included).  One thread everywhere
(``OMP_NUM_THREADS=1``, ``RAYON_NUM_THREADS=1``, ``torch.set_num_threads(1)``,
``n_jobs=1``); ``load`` is the one-minute load average when the case ended.

dQP is not a dependency of ffo: its PyPI metadata requires commercial solvers (gurobipy,
mosek) and every qpsolvers backend.  Install it beside the project's environment (with
only what it imports; pandas brings a NumPy of its own, removed so that the environment's
is used) and put that folder on ``PYTHONPATH``::

    .venv/bin/pip install --target /tmp/dqp_site --no-deps libdqp==0.1.2 qpsolvers
    .venv/bin/pip install --target /tmp/dqp_site pandas joblib
    rm -rf /tmp/dqp_site/numpy*
    PYTHONPATH=/tmp/dqp_site .venv/bin/python -m benchmarks.dqp --reps 9 --reps-large 7 \\
        --out docs/benchmarks/dqp

Without it the benchmark prints ``skipping dqp: <reason>`` and runs the rest.  It writes
``dqp.csv`` and ``dqp.png`` into ``--out`` (default ``bench_out/dqp``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from benchmarks.batched import data
from benchmarks.dfl import _peak_mb

METHODS = ("ffo", "ffo-dense", "ffo-moreau", "dqp", "dqp-tight", "dqp-qdldl", "dqp-dense")
DEFAULT_METHODS = ("ffo", "ffo-dense", "ffo-moreau", "dqp", "dqp-tight", "dqp-qdldl")
COLUMNS = ("batch", "n", "method", "reps", "fwd_min", "fwd_med", "bwd_min", "bwd_med",
           "total_min", "fwd_x_dqp", "bwd_x_dqp", "total_x_dqp", "paired_bwd_x_dqp",
           "paired_total_x_dqp", "ghost_min", "bwd_over_ghost", "peak_mb", "err", "grad_rel",
           "bad", "lsq", "inexact", "load", "note")  # fmt: skip


# -- child side -----------------------------------------------------------------------------
def _dqp_layer(method: str):
    """dQP's layer in the configuration ``method`` names (see the module docstring)."""
    from dqp import dQP

    from ffo_backends.clarabel import DEFAULTS

    kw = {"qp_solver": "clarabel", "solve_type": "sparse", "lin_solver": "scipy SPLU"}
    if method == "dqp-tight":
        kw["qp_solver_keywords"] = dict(DEFAULTS)
    elif method == "dqp-qdldl":
        kw["lin_solver"] = "qdldl"
    elif method == "dqp-dense":
        kw.update(solve_type="dense", lin_solver="scipy LU")
    return dQP.dQP_layer(settings=dQP.build_settings(**kw))


class Case:
    """One (method, n, batch): the inputs as the method takes them and one training step."""

    def __init__(self, method: str, n: int, batch: int) -> None:
        import numpy as np
        import torch

        self.method, self.batch = method, batch
        Q, q, G, h, _, _ = data("box", n, batch)
        self.q, self.h, self.dense = q, h, (Q, G)
        self.w = torch.tensor(np.random.default_rng(1).standard_normal((batch, n)))
        self.log = io.StringIO()  # what dQP prints (its least-squares fallback announces itself)
        self.inexact = 0
        if method.startswith("ffo"):
            from ffo_core import FFOQPLayer

            self.layer = FFOQPLayer("moreau" if method == "ffo-moreau" else "clarabel", n_jobs=1)
            self.mats = (Q, G) if method == "ffo-dense" else (Q.to_sparse_csc(), G.to_sparse_csc())
            return
        with contextlib.redirect_stdout(self.log):
            self.layer = _dqp_layer(method)
        self.h = h.expand(batch, -1).clone()  # dQP batches every argument
        if method == "dqp-dense":
            self.mats = tuple(M.expand(batch, -1, -1).clone() if batch > 1 else M for M in (Q, G))
        elif batch == 1:
            self.mats = (Q.to_sparse_csc(), G.to_sparse_csc())
        else:  # a list of per-sample CSC tensors: dQP's batched sparse input
            self.mats = tuple([M.to_sparse_csc() for _ in range(batch)] for M in (Q, G))

    def step(self):
        """One forward and backward: ``(y, q leaf, forward s, backward s)``."""
        q = self.q.clone().requires_grad_()
        Q, G = self.mats
        if self.method.startswith("ffo"):
            start = time.perf_counter()
            y = self.layer(Q, q, G, self.h)
            mid = time.perf_counter()
            (y * self.w).sum().backward()
            return y.detach(), q, mid - start, time.perf_counter() - mid
        with contextlib.redirect_stdout(self.log), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            start = time.perf_counter()
            y = self.layer(Q, q, G, self.h)[0].reshape(self.batch, -1)
            mid = time.perf_counter()
            (y * self.w).sum().backward()
            end = time.perf_counter()
        self.inexact = sum("terminated with status" in str(m.message) for m in seen)
        return y.detach(), q, mid - start, end - mid


def ghost_floor(case: Case):
    """A function timing Clarabel called directly on every sample's ghost problem of the
    backward pass as ``case.layer`` (an ``ffo`` layer) builds it: the locked rows through
    the forward point, the linear term perturbed by ``delta * dloss/dy``, ffo's Clarabel
    settings, the cheapest conversions we know.  The floor a first-order backward over
    Clarabel cannot go under."""
    import clarabel
    import numpy as np

    from ffo_backends.clarabel import DEFAULTS, ClarabelBackend
    from ffo_core.engine import build_ghost, classify
    from ffo_core.engine.ffo_backward import plan
    from ffo_core.engine.ghost import GhostSource
    from ffo_core.engine.scaling import ScaledBackend
    from ffo_core.sparse_ops import prune, stack_rows

    layer = case.layer
    Q, G = case.mats
    call = layer.prepare(Q, case.q, G, case.h)
    call.backend = ScaledBackend(layer.backend_for(None))
    sols = layer.solve_all(call)
    c, _ = layer._upstream(call, (case.w,))
    ghosts = []
    for i, sol in enumerate(sols):
        g, h, e = call.sample(i)
        active = classify(sol, h.dims, rhs=h.h)
        source = call.ghost_source(h, e) or GhostSource.of(h, e)
        planned = plan(call.backend, g, h, e, sol, c[i], active, layer.options, source)
        gh, ge = build_ghost(source, active, planned.through())
        ghosts.append((g, gh, ge, g.q + planned.delta * c[i]))

    def run() -> float:
        start = time.perf_counter()
        for g, h, e, q in ghosts:
            settings = clarabel.DefaultSettings()
            settings.verbose = False
            for key, value in DEFAULTS.items():
                setattr(settings, key, value)
            A = stack_rows(prune(e.A), prune(h.G))
            cones = ClarabelBackend._cones(e, h)
            clarabel.DefaultSolver(g.upper(), q, A, np.r_[e.b, h.h], cones, settings).solve()
        return time.perf_counter() - start

    return run


def child(method: str, n: int, batch: int, reps: int) -> dict:
    """The measurement of one method on one case (run in a child process)."""
    import torch

    torch.set_num_threads(1)
    case = Case(method, n, batch)
    y, q, *_ = case.step()  # untimed (set-up, caches); its gradient is the one checked
    peak = _peak_mb()  # before the paired peer below is built
    floor = ghost_floor(case) if method == "ffo" else None
    peer = None
    if method == "ffo" and "dqp" not in unavailable(("dqp",)):
        peer = Case("dqp", n, batch)
        peer.step()
    times, ghost, ratios, vs_dqp = [], [], [], []
    for _ in range(reps):  # paired: a slow spell of the machine slows both sides of a ratio
        times.append(case.step()[2:])
        if floor is not None:
            ghost.append(floor())
            ratios.append(times[-1][1] / ghost[-1])
        if peer is not None:
            theirs = peer.step()[2:]
            vs_dqp.append((times[-1][1] / theirs[1], sum(times[-1]) / sum(theirs)))
    fwd, bwd = ([t[k] for t in times] for k in (0, 1))
    # the closed form: y = clip(-q, -1, 0) (1'y <= 3 never binds), dy_i/dq_i = -1 on (0, 1)
    qv = case.q
    y_ref = (-qv).clamp(-1.0, 0.0)
    g_ref = -case.w * ((qv > 0) & (qv < 1))
    off = (q.grad - g_ref).abs() > 1e-6 * case.w.abs()
    return {
        "reps": reps,
        "fwd_min": min(fwd),
        "fwd_med": statistics.median(fwd),
        "bwd_min": min(bwd),
        "bwd_med": statistics.median(bwd),
        "total_min": min(fwd) + min(bwd),
        "ghost_min": min(ghost) if ghost else None,
        "bwd_over_ghost": statistics.median(ratios) if ratios else None,
        "paired_bwd_x_dqp": statistics.median(r[0] for r in vs_dqp) if vs_dqp else None,
        "paired_total_x_dqp": statistics.median(r[1] for r in vs_dqp) if vs_dqp else None,
        "peak_mb": peak,
        "err": float((y - y_ref).abs().max()),
        "grad_rel": float((q.grad - g_ref).norm() / g_ref.norm()),
        "bad": int(off.sum()),
        "lsq": case.log.getvalue().count("Back-propagate using least-squares"),
        "inexact": case.inexact if method.startswith("dqp") else None,
        "note": "",
    }


# -- parent side ----------------------------------------------------------------------------
def _import_error(module: str) -> str:
    """Why ``module`` does not import ("" when it does)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # dQP prints what it skips
            __import__(module)
    except Exception as exc:  # ImportError, or a dependency that fails to load
        return f"{module} not importable ({type(exc).__name__}: {exc})"
    return ""


def unavailable(which=("dqp", "ffo-moreau")) -> dict[str, str]:
    """``{"dqp" or "ffo-moreau": why it cannot run here}`` for those of ``which`` whose
    package does not import."""
    why = {}
    if "dqp" in which and (err := _import_error("dqp.dQP")):
        why["dqp"] = f"{err}; install libdqp beside the venv (see the module docstring)"
    if "ffo-moreau" in which and (err := _import_error("moreau")):
        why["ffo-moreau"] = err
    return why


def run(method: str, n: int, batch: int, reps: int, timeout: float) -> dict:
    """One case in a fresh interpreter, killed past ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    spec = json.dumps({"method": method, "n": n, "batch": batch, "reps": reps})
    row = {"batch": batch, "n": n, "method": method}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.dqp", "--child", spec],
            capture_output=True, text=True, timeout=timeout, env=env, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**row, "note": f"over {timeout:g} s", "load": round(os.getloadavg()[0], 2)}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("@@")]
    load = round(os.getloadavg()[0], 2)
    if not lines:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return {**row, "note": f"failed: {last[:120]}", "load": load}
    return {**row, **json.loads(lines[-1][2:]), "load": load}


def ratios(rows: list[dict]) -> None:
    """Each row's fastest times over the ``dqp`` row's at the same (batch, n)."""
    ref = {(r["batch"], r["n"]): r for r in rows if r["method"] == "dqp" and r.get("bwd_min")}
    for r in rows:
        peer = ref.get((r["batch"], r["n"]))
        if peer and r.get("bwd_min"):
            for key in ("fwd", "bwd", "total"):
                r[f"{key}_x_dqp"] = r[f"{key}_min"] / peer[f"{key}_min"]


SHOWN = ("n", "method", "fwd_min", "fwd_med", "bwd_min", "bwd_med", "total_min", "bwd_x_dqp",
         "total_x_dqp", "paired_bwd_x_dqp", "paired_total_x_dqp", "bwd_over_ghost", "err",
         "grad_rel", "bad", "lsq", "note")  # fmt: skip
WIDTHS = {"n": 5, "method": 10, "bad": 4, "lsq": 3, "note": 20}
HEADS = {"paired_bwd_x_dqp": "p_bwd_x_d", "paired_total_x_dqp": "p_tot_x_d", "total_x_dqp":
         "tot_x_dqp", "bwd_over_ghost": "bwd/ghost"}  # fmt: skip


def _cell(value, width: int = 9) -> str:
    if value is None or value == "":
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.3g}"
    return f"{value!s:>{width}.{width}}"


def table(rows: list[dict]) -> str:
    lines = [" ".join(_cell(HEADS.get(k, k), WIDTHS.get(k, 9)) for k in SHOWN)]
    for r in rows:
        lines.append(" ".join(_cell(r.get(k), WIDTHS.get(k, 9)) for k in SHOWN))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), 3, figsize=(13, 3.8 * len(batches)), squeeze=False)
    for row_axes, batch in zip(axes, batches):
        for ax, key, title in zip(row_axes, ("fwd_min", "bwd_min", "total_min"),
                                  ("forward", "backward", "forward + backward")):  # fmt: skip
            for method in METHODS:
                pts = sorted((r["n"], r[key]) for r in rows if r["batch"] == batch
                             and r["method"] == method and r.get(key) is not None)  # fmt: skip
                if pts:
                    ax.loglog(*zip(*pts), "o-" if method.startswith("ffo") else "s--",
                              label=method)  # fmt: skip
            if key == "bwd_min":
                pts = sorted((r["n"], r["ghost_min"]) for r in rows if r["batch"] == batch
                             and r.get("ghost_min") is not None)  # fmt: skip
                if pts:
                    ax.loglog(*zip(*pts), ":", color="gray", label="ghost solves (floor)")
            ax.set_title(f"DFL box QP, batch {batch}: {title}")
            ax.set_xlabel("n")
            ax.set_ylabel("seconds (fastest of the reps)")
            ax.grid(True, which="both", alpha=0.3)
        row_axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", nargs="+", type=int, default=[100, 500, 1000, 2000])
    ap.add_argument("--batch", nargs="+", type=int, default=[8])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--reps", type=int, default=7, help="timed steps per case")
    ap.add_argument("--reps-large", type=int, default=5, help="timed steps at n >= 2000")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    ap.add_argument("--out", default="bench_out/dqp", help="folder for dqp.csv and dqp.png")
    args = ap.parse_args(argv)
    if args.child:
        print("@@" + json.dumps(child(**json.loads(args.child))))
        return 0
    why, methods, said = unavailable(), [], set()
    for method in args.methods:
        key = "dqp" if method.startswith("dqp") else method
        if key not in why:
            methods.append(method)
        elif key not in said:  # once for all the dqp-* methods
            print(f"skipping {key}: {why[key]}")
            said.add(key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(table([]))
    for batch in args.batch:
        for n in sorted(args.n):
            reps = args.reps_large if n >= 2000 else args.reps
            for method in methods:
                rows.append(run(method, n, batch, reps, args.timeout))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    ratios(rows)
    with open(out / "dqp.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for batch in args.batch:
        print(f"\nDFL box QP, batch {batch}, gradient w.r.t. q; seconds (min and median of the "
              "reps); *_x_dqp: fastest time over the dqp row's")  # fmt: skip
        print(table([r for r in rows if r["batch"] == batch]))
    plot(rows, out / "dqp.png")
    print(f"wrote {out / 'dqp.csv'} and {out / 'dqp.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
