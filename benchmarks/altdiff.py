"""Benchmark: Alt-Diff beside the first-order (``ffo``) and exact (``kkt``) backward passes.

Size: one benchmark script with its three experiments, their tables, CSVs and plots.

Three experiments, after Sun et al., "Alternating Differentiation for Optimization Layers"
(ICLR 2023):

``dense`` (its Table 1).  One dense QP per n, Alt-Diff's own generator:
``P = X'X`` (X n x n Gaussian), ``q, b, h`` Gaussian, ``A`` (n/2 x n) and ``G`` (n/5 x n)
Gaussian; batch 1; gradients of ``c'x*`` (c Gaussian) with respect to all six inputs.
Methods:

    ffo           FFOQPLayer("clarabel"), the first-order backward (default)
    kkt           FFOQPLayer("clarabel", backward="kkt"), the exact reduced-KKT backward
    altdiff-warm  forward: FFOQPLayer's Clarabel solve; backward: factorise
                  P + rho(A'A + G'G), altdiff_backward warm-started at Clarabel's point
    altdiff       forward: altdiff_solve (ADMM) at --tol; backward: altdiff_backward,
                  reusing the forward's factorisation

Each method's gradient is compared with the exact one at a tight solve (Clarabel at 1e-11,
``kkt_backward``): cosine similarity and relative error over the six blocks together.

``dfl``.  The decision-focused-learning QP ``min 1/2||y||^2 + q'y, -1 <= y <= 0,
1'y <= 3`` (G = [I; -I; 1'] passed dense, shared by the batch), batch 8, gradient w.r.t.
``q`` only, compared with the closed form (``x = clip(-q, -1, 0)``, ``dq = -c`` on the
coordinates strictly inside the box).  Same methods (Alt-Diff gets the shared P, G once:
one factorisation).

``truncation`` (its Table 2).  The dense QP at --trunc-n: Alt-Diff stopped at
tol = 1e-1 .. 1e-4 (table) and 1e-1 .. 1e-8 (curve), both as its own forward + backward
and as a backward warm-started at Clarabel's point: iterations, time, the solution's and
the gradient's error against the exact ones.  The curve adds the DFL QP and a random QP
with a strictly complementary solution.

Times are medians of ``--reps`` repetitions (the methods interleaved), in one process with
``--threads`` torch threads (default 1: Clarabel is single-threaded, and on a shared
machine more threads mostly measure the neighbours).  Not a test; run by hand:

    .venv/bin/python -m benchmarks.altdiff                    # default sizes (n <= 1000)
    .venv/bin/python -m benchmarks.altdiff --large            # adds n = 2000 to ``dense``
    .venv/bin/python -m benchmarks.altdiff --smoke            # tiny sizes, into a temp dir
    .venv/bin/python -m benchmarks.altdiff --only truncation --trunc-n 200

It prints the tables and writes ``dense.csv``, ``dfl.csv``, ``truncation.csv``,
``truncation_curve.csv``, ``truncation.png`` and ``times.png`` to ``--out``
(default ``bench_out/altdiff``; ``--out docs/benchmarks/altdiff`` refreshes the committed
figures).
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ffo_core import FFOQPLayer  # noqa: E402
from ffo_core.engine.altdiff import (  # noqa: E402
    QPData,
    altdiff_backward,
    altdiff_factor,
    altdiff_solve,
    data_gradient,
)
from ffo_core.engine.kkt_backward import kkt_backward  # noqa: E402
from ffo_core.protocol import ConeConstraints, ConeDims, Equalities, Objective  # noqa: E402
from ffo_core.registry import get_backend  # noqa: E402

METHODS = ("ffo", "kkt", "altdiff-warm", "altdiff")
REFERENCE = "clarabel:tol_gap_abs=1e-11,tol_gap_rel=1e-11,tol_feas=1e-11,tol_ktratio=1e-9"
F64 = torch.float64


# -- problems -------------------------------------------------------------------------------
def dense_qp(n: int, seed: int = 0):
    """Alt-Diff's ``param_random``: ``(P, q, A, b, G, h)`` NumPy, p = n/2, m = n/5."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n))
    p, m = n // 2, n // 5
    return (
        X.T @ X,
        rng.standard_normal(n),
        rng.standard_normal((p, n)),
        rng.standard_normal(p),
        rng.standard_normal((m, n)),
        rng.standard_normal(m),
    )


def dfl_qp(n: int):
    """``(P, G, h)`` of the DFL QP (shared by the batch)."""
    G = np.vstack([np.eye(n), -np.eye(n), np.ones((1, n))])
    return np.eye(n), G, np.r_[np.zeros(n), np.ones(n), 3.0]


def complementary_qp(n: int, m: int, p: int, seed: int = 0):
    """A random QP with a known strictly complementary solution (as in the tests)."""
    rng = np.random.default_rng(seed)
    F = np.eye(n) + rng.standard_normal((n, n)) / (2 * np.sqrt(n))
    P = F.T @ F
    G, A = rng.standard_normal((m, n)), rng.standard_normal((p, n))
    x0 = rng.standard_normal(n)
    active = np.arange(m) < round(0.4 * m)
    h = G @ x0 + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    lam0 = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    nu0 = rng.standard_normal(p)
    return P, -(P @ x0 + A.T @ nu0 + G.T @ lam0), A, A @ x0, G, h


def protocol(P, q, A, b, G, h):
    return (
        Objective(sp.csc_matrix(P), q),
        ConeConstraints(sp.csc_matrix(G), h, ConeDims(nonneg=G.shape[0])),
        Equalities(sp.csc_matrix(A), b),
    )


def reference(problem, c):
    """Exact solution and gradient blocks ``[dP, dq, dA, db, dG, dh]`` of ``c'x*``."""
    parts = protocol(*problem)
    sol = get_backend(REFERENCE).solve(*parts)
    if not sol.status.has_solution:
        raise RuntimeError(f"reference solve failed: {sol.status}")
    g = kkt_backward(*parts, sol, c)
    base = tuple(torch.tensor(v)[None] for v in g.base)
    direction = tuple(torch.tensor(v)[None] for v in g.direction)
    return sol, [t[0].numpy() for t in data_gradient(base, direction)]


def compare(mine, ref) -> tuple[float, float]:
    """Cosine similarity and relative error of two lists of blocks (flattened together)."""
    a = np.concatenate([np.asarray(x, dtype=float).ravel() for x in mine])
    b = np.concatenate([np.asarray(x, dtype=float).ravel() for x in ref])
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return cos, float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- timing ---------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.seconds = time.perf_counter() - self.t0


# -- one method on one problem --------------------------------------------------------------
def run_layer(mode: str, inputs: list[torch.Tensor], needs: str, c: torch.Tensor):
    """FFOQPLayer(backward=mode): ``(forward_s, backward_s, x, grads by name)``.
    ``inputs`` in qpth order ``Q, p, G, h, A, b``; ``needs``: names requiring a gradient."""
    layer = FFOQPLayer("clarabel", backward=mode, inaccurate="ignore")
    ts = [
        t.clone().requires_grad_(name in needs) if t.numel() else t
        for name, t in zip("QpGhAb", inputs)
    ]
    with Clock("cpu") as fw:
        y = layer(*ts)
    with Clock("cpu") as bw:
        (c * y).sum().backward()
    grads = {name: t.grad for name, t in zip("QpGhAb", ts) if name in needs}
    return fw.seconds, bw.seconds, y.detach(), grads, {}


def run_altdiff(
    warm: bool, data: QPData, layer_inputs, needs: str, c: torch.Tensor, tol: float, device: str
):
    """Alt-Diff, with Clarabel's forward (``warm``) or its own: ``(forward_s, backward_s,
    x, grads by qpth name, info)``."""
    info: dict = {}
    if warm:
        layer = FFOQPLayer("clarabel", inaccurate="ignore")
        with Clock("cpu") as fw:
            call = layer.prepare(*layer_inputs)
            sols = layer.solve(call)
            point = tuple(
                torch.tensor(np.stack([getattr(s, f) for s in sols]), dtype=F64, device=device)
                for f in ("primal", "eq_dual", "ineq_dual", "slack")
            )
        with Clock(device) as bw:
            out = altdiff_backward(data, point, c, tol=tol, factor=altdiff_factor(data))
            grads = _grads(out, needs)
        x = point[0]
    else:
        with Clock(device) as fw:
            fwd = altdiff_solve(data, tol=tol)
        with Clock(device) as bw:
            out = altdiff_backward(data, fwd.point, c, tol=tol, factor=fwd.factor)
            grads = _grads(out, needs)
        x = fwd.x
        info["fwd_iters"] = int(fwd.iterations.max())
        info["fwd_converged"] = bool(fwd.converged.all())
    info["bwd_iters"] = int(out.info["iterations"].max())
    info["bwd_converged"] = bool(out.info["converged"].all())
    return fw.seconds, bw.seconds, x, grads, info


def _grads(out, needs: str) -> dict:
    """The gradients the layer would return, by qpth name (only those in ``needs``)."""
    if needs == "p":
        return {"p": out.direction[0]}
    g = data_gradient(out.base, out.direction)
    return dict(zip("QpAbGh", g))


# -- experiments ----------------------------------------------------------------------------
def bench_dense(ns, reps, tol, device) -> list[dict]:
    rows = []
    for n in ns:
        problem = dense_qp(n)
        rng = np.random.default_rng(n + 1)
        c_np = rng.standard_normal(n)
        t0 = time.perf_counter()
        sol, ref = reference(problem, c_np)
        ref_s = time.perf_counter() - t0
        P, q, A, b, G, h = (torch.tensor(v, dtype=F64) for v in problem)
        layer_inputs = [P, q, G, h, A, b]
        data = QPData(*(t[None].to(device) for t in (P, q, A, b, G, h)))
        c = torch.tensor(c_np, dtype=F64)[None]
        results: dict[str, list] = {mth: [] for mth in METHODS}
        for _ in range(reps):
            for mth in METHODS:
                if mth in ("ffo", "kkt"):
                    out = run_layer(mth, layer_inputs, "QpGhAb", c)
                else:
                    out = run_altdiff(
                        mth == "altdiff-warm",
                        data,
                        layer_inputs,
                        "QpGhAb",
                        c.to(device),
                        tol,
                        device,
                    )
                results[mth].append(out)
        for mth in METHODS:
            fw = statistics.median(r[0] for r in results[mth])
            bw = statistics.median(r[1] for r in results[mth])
            _, _, x, grads, info = results[mth][-1]
            blocks = [grads[k].detach().cpu().double().numpy().reshape(-1) for k in "QpAbGh"]
            cos, rel = compare(blocks, ref)
            _, x_rel = compare([x.cpu().double().numpy()], [sol.primal])
            rows.append(
                dict(
                    experiment="dense",
                    method=mth,
                    n=n,
                    p=n // 2,
                    m=n // 5,
                    batch=1,
                    tol=tol if mth.startswith("altdiff") else "",
                    forward_s=fw,
                    backward_s=bw,
                    total_s=fw + bw,
                    fwd_iters=info.get("fwd_iters", ""),
                    bwd_iters=info.get("bwd_iters", ""),
                    x_rel=x_rel,
                    grad_cos=cos,
                    grad_rel=rel,
                    reference_s=ref_s,
                )
            )
            _print_row(rows[-1])
    return rows


def bench_dfl(ns, batch, reps, tol, device) -> list[dict]:
    rows = []
    for n in ns:
        P0, G0, h0 = dfl_qp(n)
        rng = np.random.default_rng(n)
        qs = rng.standard_normal((batch, n))
        cs = rng.standard_normal((batch, n)) / (batch * n)  # d mean(y_true * y) / dy
        # closed form: 1'x <= 3 is never active (x <= 0), so x = clip(-q, -1, 0) and
        # d(c'x)/dq = -c on the coordinates strictly inside the box, 0 on the others
        ref_x = np.clip(-qs, -1.0, 0.0)
        ref_dq = np.where((qs > 0) & (qs < 1), -cs, 0.0)
        Pt, Gt, ht = (torch.tensor(v, dtype=F64) for v in (P0, G0, h0))
        q = torch.tensor(qs, dtype=F64)
        layer_inputs = [Pt, q, Gt, ht, None, None]
        empty = torch.zeros(1, 0, n, dtype=F64)
        data = QPData(Pt[None], q, empty, torch.zeros(1, 0, dtype=F64), Gt[None], ht[None])
        data = QPData(*(t.to(device) for t in data))
        c = torch.tensor(cs, dtype=F64)
        results: dict[str, list] = {mth: [] for mth in METHODS}
        for _ in range(reps):
            for mth in METHODS:
                if mth in ("ffo", "kkt"):
                    out = run_layer(mth, [Pt, q, Gt, ht, torch.empty(0), torch.empty(0)], "p", c)
                else:
                    out = run_altdiff(
                        mth == "altdiff-warm", data, layer_inputs, "p", c.to(device), tol, device
                    )
                results[mth].append(out)
        for mth in METHODS:
            fw = statistics.median(r[0] for r in results[mth])
            bw = statistics.median(r[1] for r in results[mth])
            _, _, x, grads, info = results[mth][-1]
            cos, rel = compare([grads["p"].detach().cpu().double().numpy()], [ref_dq])
            _, x_rel = compare([x.cpu().double().numpy()], [ref_x])
            rows.append(
                dict(
                    experiment="dfl",
                    method=mth,
                    n=n,
                    p=0,
                    m=2 * n + 1,
                    batch=batch,
                    tol=tol if mth.startswith("altdiff") else "",
                    forward_s=fw,
                    backward_s=bw,
                    total_s=fw + bw,
                    fwd_iters=info.get("fwd_iters", ""),
                    bwd_iters=info.get("bwd_iters", ""),
                    x_rel=x_rel,
                    grad_cos=cos,
                    grad_rel=rel,
                    reference_s="",
                )
            )
            _print_row(rows[-1])
    return rows


def truncation_case(name, problem, c_np, tols, reps, device) -> list[dict]:
    """Alt-Diff at each tolerance on one problem (batch 1), both variants."""
    sol, ref = reference(problem, c_np)
    data = QPData(*(torch.tensor(v, dtype=F64)[None].to(device) for v in problem))
    point = tuple(
        torch.tensor(v, dtype=F64)[None].to(device)
        for v in (sol.primal, sol.eq_dual, sol.ineq_dual, sol.slack)
    )
    c = torch.tensor(c_np, dtype=F64)[None].to(device)
    n, p, m = problem[1].shape[0], problem[3].shape[0], problem[5].shape[0]
    rows = []
    for tol in tols:
        for variant in ("altdiff", "altdiff-warm"):
            times = []
            for _ in range(reps):
                if variant == "altdiff":
                    with Clock(device) as fw:
                        fwd = altdiff_solve(data, tol=tol)
                    with Clock(device) as bw:
                        out = altdiff_backward(data, fwd.point, c, tol=tol, factor=fwd.factor)
                        g = data_gradient(out.base, out.direction)
                    x = fwd.x
                    fwd_iters = int(fwd.iterations[0])
                else:
                    fw = None
                    with Clock(device) as bw:
                        out = altdiff_backward(data, point, c, tol=tol)
                        g = data_gradient(out.base, out.direction)
                    x = out.base[0]
                    fwd_iters = ""
                times.append((fw.seconds if fw else float("nan"), bw.seconds))
            cos, rel = compare([t[0].cpu().numpy() for t in g], ref)
            _, x_rel = compare([x.cpu().numpy()], [sol.primal])
            rows.append(
                dict(
                    experiment="truncation",
                    problem=name,
                    variant=variant,
                    n=n,
                    p=p,
                    m=m,
                    tol=tol,
                    fwd_iters=fwd_iters,
                    bwd_iters=int(out.info["iterations"][0]),
                    forward_s=statistics.median(t[0] for t in times),
                    backward_s=statistics.median(t[1] for t in times),
                    x_rel=x_rel,
                    grad_cos=cos,
                    grad_rel=rel,
                )
            )
    return rows


def bench_truncation(n, curve_n, reps, device) -> tuple[list[dict], list[dict]]:
    table_tols = [1e-1, 1e-2, 1e-3, 1e-4]
    curve_tols = [10.0**-k for k in range(1, 9)]
    c = np.random.default_rng(7).standard_normal(n)
    table = truncation_case(f"dense n={n}", dense_qp(n), c, table_tols, reps, device)
    for r in table:
        _print_trunc(r)
    curve = []
    cases = [
        (f"dense (Table 1 QP) n={curve_n}", dense_qp(curve_n)),
        (f"DFL n={curve_n}", _dfl_problem(curve_n)),
        (
            f"random, strictly complementary n={curve_n}",
            complementary_qp(curve_n, (3 * curve_n) // 5, curve_n // 5),
        ),
    ]
    for name, problem in cases:
        cc = np.random.default_rng(8).standard_normal(problem[1].shape[0])
        curve += truncation_case(name, problem, cc, curve_tols, 1, device)
    for r in curve:
        _print_trunc(r)
    return table, curve


def _dfl_problem(n: int):
    P, G, h = dfl_qp(n)
    q = 2 * np.random.default_rng(n).standard_normal(n)
    return P, q, np.zeros((0, n)), np.zeros(0), G, h


# -- output ---------------------------------------------------------------------------------
def _print_row(r: dict) -> None:
    its = f"{r['fwd_iters']}/{r['bwd_iters']}" if r["bwd_iters"] != "" else ""
    print(
        f"{r['experiment']:6s} n={r['n']:5d} {r['method']:13s} fwd {r['forward_s']:8.3f}s "
        f"bwd {r['backward_s']:8.3f}s  iters {its:>9s}  x_rel {r['x_rel']:.1e}  "
        f"grad cos {r['grad_cos']:.8f} rel {r['grad_rel']:.1e}",
        flush=True,
    )


def _print_trunc(r: dict) -> None:
    fw = "-" if r["forward_s"] != r["forward_s"] else f"{r['forward_s']:.3f}s"  # NaN: none
    print(
        f"trunc {r['problem']:42s} {r['variant']:13s} tol {r['tol']:.0e} iters "
        f"{r['fwd_iters']!s:>5s}/{r['bwd_iters']:5d} fwd {fw:>7s} bwd "
        f"{r['backward_s']:.3f}s x_rel {r['x_rel']:.1e} grad cos {r['grad_cos']:.8f} "
        f"rel {r['grad_rel']:.1e}",
        flush=True,
    )


def _write(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: ("" if v != v else f"{v:.6g}") if isinstance(v, float) else v
                    for k, v in r.items()
                }
            )


def _plot_truncation(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    problems = list(dict.fromkeys(r["problem"] for r in curve))
    for variant, ax in zip(("altdiff", "altdiff-warm"), axes):
        for prob in problems:
            pts = [r for r in curve if r["problem"] == prob and r["variant"] == variant]
            tols = [r["tol"] for r in pts]
            (line,) = ax.plot(tols, [r["grad_rel"] for r in pts], "o-", label=f"gradient, {prob}")
            if variant == "altdiff":
                ax.plot(
                    tols,
                    [r["x_rel"] for r in pts],
                    "x--",
                    color=line.get_color(),
                    label=f"solution, {prob}",
                )
        all_tols = sorted({r["tol"] for r in curve})
        ax.plot(all_tols, all_tols, "k:", label="= tol")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel(
            "tolerance tol (both passes)" if variant == "altdiff" else "tolerance tol (backward)"
        )
        ax.set_ylabel("relative error vs exact")
        ax.set_title(
            "Alt-Diff as forward and backward"
            if variant == "altdiff"
            else "Alt-Diff backward from Clarabel's solution"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_times(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = [e for e in ("dense", "dfl") if any(r["experiment"] == e for r in rows)]
    fig, axes = plt.subplots(1, len(exps), figsize=(6 * len(exps), 4.5), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        for mth in METHODS:
            pts = [r for r in rows if r["experiment"] == exp and r["method"] == mth]
            if pts:
                ax.plot([r["n"] for r in pts], [r["total_s"] for r in pts], "o-", label=mth)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n")
        ax.set_ylabel("forward + backward [s]")
        ax.set_title(f"{exp}: time (batch {pts[0]['batch'] if pts else ''})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=("dense", "dfl", "truncation"))
    ap.add_argument("--dense-n", type=int, nargs="+", default=[100, 200, 500, 1000])
    ap.add_argument("--large", action="store_true", help="add n = 2000 to the dense table")
    ap.add_argument("--dfl-n", type=int, nargs="+", default=[100, 500, 1000])
    ap.add_argument("--dfl-batch", type=int, default=8)
    ap.add_argument("--trunc-n", type=int, default=500, help="the dense QP of the table")
    ap.add_argument("--curve-n", type=int, default=200, help="the problems of the curve")
    ap.add_argument("--tol", type=float, default=1e-6, help="Alt-Diff's tolerance (tables)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="Alt-Diff's device (cpu, cuda)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.dense_n, args.dfl_n, args.trunc_n, args.curve_n = [30, 60], [30], 40, 30
        args.reps, args.dfl_batch = 1, 2
    elif args.large:
        args.dense_n = sorted(set(args.dense_n) | {2000})
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="altdiff-smoke-"))
        if args.smoke
        else ROOT / "bench_out" / "altdiff"
    )
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ("dense", "dfl", "truncation"))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), Alt-Diff on {args.device}, tol {args.tol:g}",
        flush=True,
    )
    rows: list[dict] = []
    if "dense" in only:
        rows += bench_dense(args.dense_n, args.reps, args.tol, args.device)
        _write([r for r in rows if r["experiment"] == "dense"], out / "dense.csv")
    if "dfl" in only:
        rows += bench_dfl(args.dfl_n, args.dfl_batch, args.reps, args.tol, args.device)
        _write([r for r in rows if r["experiment"] == "dfl"], out / "dfl.csv")
    if len({r["n"] for r in rows}) > 1:
        _plot_times(rows, out / "times.png")
    if "truncation" in only:
        table, curve = bench_truncation(args.trunc_n, args.curve_n, args.reps, args.device)
        _write(table, out / "truncation.csv")
        _write(curve, out / "truncation_curve.csv")
        _plot_truncation(curve, out / "truncation.png")
    print(f"# wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
