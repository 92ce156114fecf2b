"""Soak benchmark (not a test): thousands of forward/backward calls of one small FFOLayer,
sampling memory and threads, to show that neither grows with use.

Setup: a random strictly complementary QP (``min 1/2||F y||^2 + q'y, G y <= h, A y = b``,
n = 10, 6 inequalities, 2 equalities), every parameter a leaf tensor with a gradient, a
batch of 4 (so the per-sample solves run in the thread pool), ``q`` redrawn every call.
With ``--faults`` (the default) the loop also goes through the error paths: every 7th
call passes a NaN (refused, InvalidParameterError), every 13th an infeasible sample
(SolverError from the forward solves), every 17th a NaN upstream gradient
(InvalidGradientError in backward); their exceptions and tracebacks must not leak either.

Every ``--every`` calls it records the process's resident memory (psutil), the number of
live threads (``threading.active_count()``), the number of objects the garbage collector
tracks and the elapsed time, prints a table and writes ``bench_out/soak.csv`` (``--out
PATH`` elsewhere; the table in docs/reliability.md is ``docs/benchmarks/soak/soak.csv``).  The
summary compares the first sample after warm-up with the last, and fits a slope (MB per
1000 calls) over the second half.

    .venv/bin/python -m benchmarks.soak                   # 3000 calls
    .venv/bin/python -m benchmarks.soak --calls 10000 --every 250 --no-faults
"""

from __future__ import annotations

import argparse
import csv
import gc
import threading
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("calls", "elapsed_s", "rss_mb", "threads", "gc_objects", "errors")


def build_layer(n: int, m: int, p: int, seed: int, **layer_kw):
    """A random QP layer (the conformance zoo's ``qp-layer`` family) and one strictly
    complementary parameter sample."""
    from ffo_conformance.zoo import qp_layer_case
    from ffo_core import FFOLayer

    case = qp_layer_case(np.random.default_rng(seed), n, m, p, None)
    prob, params, variables = case.build()
    return FFOLayer(prob, params, variables, **layer_kw), case.values


def run(calls: int, every: int, batch: int, faults: bool, layer_kw: dict) -> list[dict]:
    import psutil
    import torch

    from ffo_core import FFOError

    proc = psutil.Process()
    layer, values = build_layer(10, 6, 2, seed=0, **layer_kw)
    rng = np.random.default_rng(1)
    base = [torch.tensor(np.repeat(v[None], batch, axis=0)) for v in values]
    rows, errors, start = [], 0, time.perf_counter()
    for k in range(1, calls + 1):
        ts = [t.clone().requires_grad_(True) for t in base]
        with torch.no_grad():
            ts[1] += 1e-3 * torch.as_tensor(rng.standard_normal(ts[1].shape))
            if faults and k % 7 == 0:
                ts[3][batch - 1, 0] = float("nan")
            elif faults and k % 13 == 0:
                ts[3][0] = -1e3  # G y <= -1e3 with A y = b: infeasible
                ts[2][0] = 0.0
        try:
            (y,) = layer(*ts)
            w = torch.ones_like(y)
            if faults and k % 17 == 0:
                w[0, 0] = float("inf")
            (w * y).sum().backward()
        except FFOError:
            errors += 1
        if k % every == 0 or k == calls:
            rows.append(
                {
                    "calls": k,
                    "elapsed_s": round(time.perf_counter() - start, 3),
                    "rss_mb": round(proc.memory_info().rss / 2**20, 2),
                    "threads": threading.active_count(),
                    "gc_objects": len(gc.get_objects()),
                    "errors": errors,
                }
            )
    return rows


def summary(rows: list[dict], warmup: int) -> dict:
    after = [r for r in rows if r["calls"] > warmup] or rows
    half = after[len(after) // 2 :]
    x = np.array([r["calls"] for r in half], dtype=float)
    yv = np.array([r["rss_mb"] for r in half])
    slope = float(np.polyfit(x, yv, 1)[0] * 1000) if len(half) >= 2 else float("nan")
    return {
        "rss_first_mb": after[0]["rss_mb"],
        "rss_last_mb": after[-1]["rss_mb"],
        "rss_growth_mb": round(after[-1]["rss_mb"] - after[0]["rss_mb"], 2),
        "rss_slope_mb_per_1000_calls_second_half": round(slope, 3),
        "threads_min": min(r["threads"] for r in after),
        "threads_max": max(r["threads"] for r in after),
        "gc_objects_first": after[0]["gc_objects"],
        "gc_objects_last": after[-1]["gc_objects"],
        "calls_per_s": round(rows[-1]["calls"] / rows[-1]["elapsed_s"], 1),
        "errors": rows[-1]["errors"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--every", type=int, default=100, help="sample every K calls")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--warmup",
        type=int,
        default=300,
        help="calls excluded from the growth figures (allocator warm-up)",
    )
    ap.add_argument("--no-faults", dest="faults", action="store_false")
    ap.add_argument(
        "--check-every", type=int, default=50, help="FFOLayer gradient health check period (0: off)"
    )
    ap.add_argument("--solver", default="clarabel")
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "soak.csv"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = run(
        args.calls,
        args.every,
        args.batch,
        args.faults,
        dict(solver=args.solver, check_every=args.check_every),
    )
    print(
        f"{'calls':>7} {'elapsed_s':>10} {'rss_mb':>9} {'threads':>8} {'gc_objects':>11} "
        f"{'errors':>7}"
    )
    for r in rows:
        print(
            f"{r['calls']:>7} {r['elapsed_s']:>10.2f} {r['rss_mb']:>9.1f} {r['threads']:>8} "
            f"{r['gc_objects']:>11} {r['errors']:>7}"
        )
    s = summary(rows, args.warmup)
    print("\nsummary (after the first", args.warmup, "calls):")
    for k, v in s.items():
        print(f"  {k}: {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
