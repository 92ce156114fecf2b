"""Benchmark: the paper's synthetic decision-focused-learning QP, FFOLayer against its peers.

Size: one benchmark script: its methods, the child process that isolates each run, and
the table, CSV and plot.

    minimize 1/2 ||Q y||^2 + q'y   s.t.  G y <= h     (Q = I, G y <= h is -1 <= y <= 0, 1'y <= 3)

``--learn q``: only ``q`` is a parameter (the common training case); ``--learn all``: Q, q, G
and h are all parameters (the paper's setup, dense parameter matrices).  Each (method, n) runs
in a fresh subprocess under a time and memory cap; it records set-up (layer construction),
forward and backward time (medians of ``--reps`` runs after warm-up calls, batch ``--batch``;
the CSV also has the fastest run), peak RSS, and for our methods the gradient's agreement
with the exact KKT mode.  The bare solver (Clarabel called directly on the same forward
problems, and on the ghost problems of the backward pass) is timed in the same run: ratios
to these floors show the layer's own overhead.  The ``ffo`` row's ratios are paired: the
``bare`` process alternates one step of the layer (in one thread, like the floors) with the
floors, repetition by repetition, and reports the median per-repetition ratio.

    python -m benchmarks.dfl --n 100 500 1000 --learn q all              # -> bench_out/
    python -m benchmarks.dfl ... --out docs/benchmarks/dfl              # the committed tables

Methods: ffo, ffo-central, kkt (ours), cvxpylayers (diffcp, its default), cvxpylayers-clarabel,
qpth (if importable), bare (the floors).  Prints a table, writes ``dfl.csv`` and ``dfl.png``
into ``--out`` (default ``bench_out/``, not committed).  The CSV's ``load`` column is the
machine's one-minute load average when the run ended (a shared machine slows every side).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("ffo", "ffo-central", "kkt", "cvxpylayers", "cvxpylayers-clarabel", "qpth", "bare")


# -- child side -----------------------------------------------------------------------------
def _problem(n: int, learn: str):
    """``(problem, params, y, tensors, (Q, G, h) for qpth or None)`` of one benchmark case."""
    import cvxpy as cp
    import numpy as np
    import scipy.sparse as sp
    import torch

    rng = np.random.default_rng(n)
    y = cp.Variable(n)
    q = cp.Parameter(n)
    qv = torch.tensor(rng.standard_normal((BATCH, n)))
    G0 = np.vstack([-np.eye(n), np.eye(n), np.ones((1, n))]) if n <= 5000 else None
    h0 = np.r_[np.ones(n), np.zeros(n), 3.0]
    box = [y >= -1, y <= 0, cp.sum(y) <= 3]
    if learn == "q":
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), box)
        return prob, [q], y, [qv], (np.eye(n), G0, h0)
    if learn == "socp":  # the paper's SOCP variant: an added norm-ball constraint
        prob = cp.Problem(
            cp.Minimize(0.5 * cp.sum_squares(y) + q @ y),
            box + [cp.norm(y, 2) <= 0.5 * np.sqrt(3.0)],
        )
        return prob, [q], y, [qv], None
    if learn == "sparse":  # sparse learnable constraint values on a fixed pattern
        D = sp.diags([np.ones(n), -0.5 * np.ones(n - 1)], [0, 1], format="csc")
        d = cp.Parameter(D.nnz)
        rows, cols = D.nonzero()
        S = sp.csc_matrix(
            (np.ones(D.nnz), (rows * 0 + np.arange(D.nnz), rows * n + cols)), shape=(D.nnz, n * n)
        )
        # y's coefficient matrix as a parameter-affine sparse expression: D(d) y <= h
        Dy = cp.reshape(S.T @ d, (n, n), order="C") @ y
        h = cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), [Dy <= h, y >= -1])
        tensors = [torch.tensor(D.tocoo().data), qv, torch.ones(n, dtype=torch.float64)]
        return prob, [d, q, h], y, tensors, None
    Q, G, h = cp.Parameter((n, n)), cp.Parameter(G0.shape), cp.Parameter(2 * n + 1)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Q @ y) + q @ y), [G @ y <= h])
    tensors = [torch.eye(n, dtype=torch.float64), qv, torch.tensor(G0), torch.tensor(h0)]
    return prob, [Q, q, G, h], y, tensors, (np.eye(n), G0, h0)


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


#: Untimed calls before the timed ones: one for every method (first-call caches), four for
#: our layers, which spend their first four calls choosing between a thread pool and one
#: thread per phase (``ffo_core.engine.solves.ThreadChoice``): the steady state of a training loop.
WARMUP = {"ours": 4, "peer": 1}


def _step(layer, tensors, weights) -> tuple[float, float]:
    """One training step through ``layer``: (forward seconds, backward seconds)."""
    ts = [t.clone().requires_grad_(True) for t in tensors]
    t0 = time.perf_counter()
    (sol,) = layer(*ts)
    t1 = time.perf_counter()
    (weights * sol).sum().backward()
    return t1 - t0, time.perf_counter() - t1


def _time_layer(make, tensors, reps: int, weights, warmup: int = 1):
    """``(layer, setup, median forward, median backward, {fastest forward, backward})``."""
    t0 = time.perf_counter()
    layer = make()
    setup = time.perf_counter() - t0
    fwd, bwd = [], []
    for k in range(warmup + reps):
        f, b = _step(layer, tensors, weights)
        if k >= warmup:
            fwd.append(f)
            bwd.append(b)
    fastest = {"fwd_min": min(fwd), "bwd_min": min(bwd)}
    return layer, setup, statistics.median(fwd), statistics.median(bwd), fastest


def _bare(layer, tensors, reps: int, weights) -> dict:
    """Clarabel called directly: the forward problems, then the ghost problems.

    The forward floor is one Clarabel solve of each sample's problem (the layer's forward
    adds its checks, the data map and the polish on the active set).  The ghost floor is
    one solve of each sample's ghost problem exactly as the backward hands it to the solver
    (the locked rows, the perturbed linear term, the tighter settings of a ghost that keeps
    a curved cone); a central difference solves it twice, the floor once.

    ``layer`` runs its solves in one thread (``n_jobs=1``), as the floors do.  Each
    repetition also times one step of ``layer`` just before the floors, and the ratios
    ``paired_fwd``/``paired_bwd`` are medians of the per-repetition ratios: on a shared
    machine a slow spell then slows both sides of a ratio (see docs/benchmarks.md,
    Method)."""
    import clarabel
    import numpy as np

    from ffo_backends.clarabel import ClarabelBackend
    from ffo_core.engine import FFOOptions, build_ghost, classify
    from ffo_core.engine.ffo_backward import plan
    from ffo_core.engine.scaling import ScaledBackend
    from ffo_core.layers.cvxpy_layer import _Call
    from ffo_core.layers.parameters import inspect_params
    from ffo_core.sparse_ops import prune, stack_rows

    info = inspect_params(layer.compiled.user_params, tensors, layer._rules)
    call = _Call(layer._data(tensors, info), info)
    call.backend = ScaledBackend(layer.backend_for(None))
    bound = call.bound
    samples = [bound.sample(i) for i in range(bound.batch)]
    # the numeric problems, as the layer hands them to the solver (stored zeros dropped)
    numeric = [call.solver_problem(i) for i in range(bound.batch)]
    tight = ClarabelBackend.tight_settings

    def native(g, h, e, q=None, curved=False):  # the cheapest conversions we know
        st = clarabel.DefaultSettings()
        st.verbose = False
        if curved:
            for key, value in tight.items():
                setattr(st, key, value)
        P = g.upper()  # P's triangle, formed once per call for a shared P, as ours
        A = stack_rows(prune(e.A), prune(h.G))
        cones = ClarabelBackend._cones(e, h)
        q = g.q if q is None else q
        return clarabel.DefaultSolver(P, q, A, np.r_[e.b, h.h], cones, st).solve()

    sols = layer.solve_all(call)  # the forward solutions, polished as the layer's are
    c, _ = layer._upstream(call, (weights,))  # dloss/dy in the solver's variables
    ghosts = []
    for i, ((g, h, e), sol) in enumerate(zip(samples, sols)):
        active = classify(sol, h.dims, rhs=h.h)
        source = bound.ghost_source(h, e)
        planned = plan(call.backend, g, h, e, sol, c[i], active, FFOOptions(), source)
        gh, ge = build_ghost(source, active, planned.through())
        ghosts.append((g, gh, ge, g.q + planned.delta * c[i], bool(active.kept.any())))
    fwd, ghost_t, ratio_f, ratio_b = [], [], [], []
    for _ in range(reps):
        ours_f, ours_b = _step(layer, tensors, weights)
        t0 = time.perf_counter()
        for s in numeric:
            native(*s)
        t1 = time.perf_counter()
        for g, gh, ge, q, curved in ghosts:
            native(g, gh, ge, q, curved)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        ghost_t.append(t2 - t1)
        ratio_f.append(ours_f / fwd[-1])
        ratio_b.append(ours_b / ghost_t[-1])
    return {
        "fwd": statistics.median(fwd),
        "bwd": statistics.median(ghost_t),
        "fwd_min": min(fwd),
        "bwd_min": min(ghost_t),
        "paired_fwd": statistics.median(ratio_f),
        "paired_bwd": statistics.median(ratio_b),
    }


def child(spec: dict) -> dict:
    import numpy as np
    import torch

    global BATCH
    BATCH = spec["batch"]
    n, learn, method, reps = spec["n"], spec["learn"], spec["method"], spec["reps"]
    torch.set_num_threads(1)
    prob, params, y, tensors, _ = _problem(n, learn)
    weights = torch.tensor(np.random.default_rng(0).standard_normal((BATCH, n)))
    out = {"baseline_mb": _peak_mb()}
    if method in ("ffo", "ffo-central", "kkt", "bare"):
        from ffo_core import FFOLayer

        kw = {
            "ffo": {},
            "ffo-central": {"central": True},
            "kkt": {"backward": "kkt"},
            "bare": {"n_jobs": 1},  # one thread, as the floors
        }[method]
        layer, setup, fwd, bwd, fastest = _time_layer(
            lambda: FFOLayer(prob, params, [y], **kw), tensors, reps, weights, WARMUP["ours"]
        )
        out.update(setup=setup, fwd=fwd, bwd=bwd, peak_mb=_peak_mb(), **fastest)
        if method == "bare":
            out.update(_bare(layer, tensors, reps, weights), setup=0.0)
        elif method != "kkt":
            # agreement with the exact KKT mode on the first two samples (the KKT reference
            # on a 5000-dim SOC takes ~10 s a sample: not worth a whole batch)
            keep = min(2, BATCH)
            sub = [
                t[:keep] if t.dim() and t.shape[0] == BATCH and p.ndim < t.dim() else t
                for t, p in zip(tensors, params)
            ]
            ours = FFOLayer(prob, params, [y], **kw)
            refl = FFOLayer(prob, params, [y], backward="kkt")
            pair = []
            for lay in (ours, refl):
                ts = [t.clone().requires_grad_(True) for t in sub]
                (weights[:keep] * lay(*ts)[0]).sum().backward()
                pair.append(torch.cat([t.grad.flatten() for t in ts]))
            a, b = pair
            out.update(
                cos=float(a @ b / (a.norm() * b.norm())), rel=float((a - b).norm() / b.norm())
            )
        return out
    if method.startswith("cvxpylayers"):
        from cvxpylayers.torch import CvxpyLayer

        # cvxpylayers-clarabel: diffcp with Clarabel as its cone solver (solve_method)
        args = {"solve_method": "Clarabel"} if method.endswith("clarabel") else {}
        _, setup, fwd, bwd, fastest = _time_layer(
            lambda: CvxpyLayer(prob, params, [y], solver_args=args), tensors, reps, weights
        )
        return {**out, "setup": setup, "fwd": fwd, "bwd": bwd, "peak_mb": _peak_mb(), **fastest}
    if method == "qpth":
        from qpth.qp import QPFunction

        Q0, G0, h0 = _problem(n, learn)[4]
        Qt = torch.tensor(Q0)
        args = [
            Qt,
            tensors[0] if learn == "q" else tensors[1],
            torch.tensor(G0),
            torch.tensor(h0),
            torch.empty(0, dtype=torch.float64),
            torch.empty(0, dtype=torch.float64),
        ]

        class Wrap:
            def __call__(self, *ts):
                full = list(args)
                if learn == "q":
                    full[1] = ts[0]
                else:
                    full[0], full[1], full[2], full[3] = ts
                return (QPFunction(verbose=-1)(*full),)

        _, setup, fwd, bwd, fastest = _time_layer(Wrap, tensors, reps, weights)
        return {**out, "setup": setup, "fwd": fwd, "bwd": bwd, "peak_mb": _peak_mb(), **fastest}
    raise ValueError(method)


BATCH = 8


# -- parent side ----------------------------------------------------------------------------
def run_one(spec: dict, timeout: float, mem_mb: float) -> dict:
    """Run one (method, n) in a fresh interpreter; kill it past the time or memory cap."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.dfl", "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ps, start, peak = psutil.Process(proc.pid), time.time(), 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss / 2**20)
        except psutil.Error:
            break
        if peak > mem_mb or time.time() - start > timeout:
            proc.kill()
            proc.wait()
            why = (
                f"killed: RSS > {mem_mb:.0f} MB" if peak > mem_mb else f"killed: > {timeout:.0f} s"
            )
            return {"status": why, "peak_mb": peak, "load": round(os.getloadavg()[0], 2)}
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    load = round(os.getloadavg()[0], 2)
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"failed: {last[:120]}", "load": load}
    return {"status": "ok", **json.loads(stdout.strip().splitlines()[-1]), "load": load}


def qpth_available() -> tuple[bool, str]:
    try:
        import qpth  # noqa: F401

        return True, ""
    except ImportError as exc:
        return False, f"qpth not importable ({exc}); its PyPI sdist does not build here"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, nargs="+", default=[100, 200, 500, 1000])
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument(
        "--learn",
        nargs="+",
        default=["q", "all"],
        choices=["q", "all", "sparse", "socp"],
        help="q: only q learnable; all: Q, q, G, h learnable (paper setup); "
        "sparse: sparse learnable constraint values; socp: norm-ball added",
    )
    ap.add_argument(
        "--methods", default="ffo,ffo-central,kkt,cvxpylayers,cvxpylayers-clarabel,qpth,bare"
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--mem-mb", type=float, default=12000.0, help="RSS cap per run")
    ap.add_argument("--out", default="bench_out", help="folder for dfl.csv and dfl.png")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    ok, why = qpth_available()
    if "qpth" in methods and not ok:
        print(f"skipping qpth: {why}")
        methods.remove("qpth")
    from tqdm import tqdm

    rows = []
    jobs = [
        (learn, batch, n, m)
        for learn in args.learn
        for batch in args.batch
        for n in sorted(args.n)
        for m in methods
        if not (m == "qpth" and learn in ("sparse", "socp"))
    ]
    failed: dict = {}  # (learn, batch, method) -> (smallest n it failed at, why)
    for learn, batch, n, m in tqdm(jobs, desc="benchmark"):
        key = (learn, batch, m)
        if key in failed and failed[key][0] < n:
            # sizes run in increasing order: what failed (killed, crashed) at a smaller n
            # is not retried at a larger one, which keeps a full sweep affordable
            res = {"status": f"skipped: {failed[key][1]} at n = {failed[key][0]}"}
        else:
            spec = {"n": n, "batch": batch, "learn": learn, "method": m, "reps": args.reps}
            res = run_one(spec, args.timeout, args.mem_mb)
            if res["status"] != "ok":
                failed[key] = (n, res["status"].split(":")[0])
        rows.append({"learn": learn, "batch": batch, "n": n, "method": m, **res})
    _report(rows, Path(args.out), args)
    return 0


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _report(rows: list[dict], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = {(r["learn"], r["batch"], r["n"], r["method"]): r for r in rows}
    print(
        f"\nsynthetic DFL QP, median of {args.reps}; times in seconds, "
        "memory = peak RSS in MB; ratios: vs cvxpylayers total (same learn, n) and vs the "
        "bare Clarabel floors (forward solves / ghost solves)"
    )
    head = (
        f"{'learn':6} {'batch':>5} {'n':>5} {'method':21} {'setup':>7} {'fwd':>7} {'bwd':>7} "
        f"{'total':>7} {'peakMB':>7} {'x cvxpyl':>8} {'fwd/bare':>8} {'bwd/ghost':>9} "
        f"{'cos':>10} {'rel':>8}  status"
    )
    print(head)
    print("-" * len(head))
    fields = [
        "learn",
        "batch",
        "n",
        "method",
        "status",
        "setup",
        "fwd",
        "bwd",
        "total",
        "fwd_min",
        "bwd_min",
        "peak_mb",
        "ratio_cvxpylayers",
        "fwd_over_bare",
        "bwd_over_ghost",
        "cos",
        "rel",
        "load",
    ]
    for r in rows:
        tot = (r.get("fwd") or 0) + (r.get("bwd") or 0) if r.get("status") == "ok" else None
        r["total"] = tot
        key = (r["learn"], r["batch"], r["n"])
        peer = index.get(key + ("cvxpylayers",), {})
        bare = index.get(key + ("bare",), {})
        peer_tot = (
            (peer.get("fwd") or 0) + (peer.get("bwd") or 0) if peer.get("status") == "ok" else None
        )
        r["ratio_cvxpylayers"] = tot / peer_tot if tot and peer_tot else None
        if r["method"] == "ffo" and bare.get("paired_fwd"):
            # paired in the bare run's process, repetition by repetition (see _bare)
            r["fwd_over_bare"], r["bwd_over_ghost"] = bare["paired_fwd"], bare["paired_bwd"]
        elif r["method"] != "bare" and bare.get("status") == "ok" and tot:
            r["fwd_over_bare"] = r["fwd"] / bare["fwd"]
            r["bwd_over_ghost"] = r["bwd"] / bare["bwd"]
        print(
            f"{r['learn']:6} {r['batch']:>5} {r['n']:>5} {r['method']:21} "
            f"{_fmt(r.get('setup'))!s:>7} "
            f"{_fmt(r.get('fwd'))!s:>7} {_fmt(r.get('bwd'))!s:>7} {_fmt(tot)!s:>7} "
            f"{_fmt(r.get('peak_mb'), '.0f')!s:>7} "
            f"{_fmt(r.get('ratio_cvxpylayers'), '.2f')!s:>8} "
            f"{_fmt(r.get('fwd_over_bare'), '.2f')!s:>8} "
            f"{_fmt(r.get('bwd_over_ghost'), '.2f')!s:>9} "
            f"{_fmt(r.get('cos'), '.7f')!s:>10} {_fmt(r.get('rel'), '.1e')!s:>8}  "
            f"{r['status']}"
        )
    with open(out / "dfl.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out / "dfl.png")
    print(f"\nwrote {out / 'dfl.csv'} and {out / 'dfl.png'}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learns = sorted({(r["learn"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(len(learns), 2, figsize=(11, 4 * len(learns)), squeeze=False)
    for i, (learn, batch) in enumerate(learns):
        for method in METHODS:
            pts = [
                r
                for r in rows
                if (r["learn"], r["batch"]) == (learn, batch)
                and r["method"] == method
                and r.get("status") == "ok"
            ]
            if not pts:
                continue
            ns = [r["n"] for r in pts]
            axes[i][0].plot(ns, [r["total"] for r in pts], "o-", label=method)
            if method != "bare":
                axes[i][1].plot(ns, [r["peak_mb"] for r in pts], "o-", label=method)
        for j, (ylabel, title) in enumerate(
            [("forward + backward [s]", "time"), ("peak RSS [MB]", "memory")]
        ):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("n")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{learn}, batch {batch}: {title}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
