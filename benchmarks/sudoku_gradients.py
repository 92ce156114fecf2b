"""Sudoku training through the first-order layers, with the gradient checked on the way.

OptNet's 4x4 Sudoku task as in ``benchmarks/paper/sudoku.py`` (learnable ``A`` and ``log z0``,
``b = A exp(log z0)``, MSE, Adam lr 0.1, batch 8): trains ``--steps`` steps through
``FFOQPLayer`` and ``FFOLayer`` at their defaults and, every ``--check-every`` steps,
compares the step's gradient (w.r.t. ``A`` and ``log z0``) with the exact KKT gradient of
the same batch solved by Clarabel at 1e-12.  Reports the failed steps (any exception) and
the smallest cosine and largest relative error seen.

    python -m benchmarks.sudoku_gradients                 # 1,500 steps of each layer
    python -m benchmarks.sudoku_gradients --steps 100     # quicker

Writes ``sudoku_gradients.csv`` (one row per check) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

TIGHT = "clarabel:tol_gap_abs=1e-12,tol_gap_rel=1e-12,tol_feas=1e-12"


def run(layer_name: str, steps: int, check_every: int, seed: int) -> tuple[list[dict], int]:
    import numpy as np
    import torch

    from benchmarks.paper.sudoku import SudokuTask
    from ffo_core import FFOLayer, FFOQPLayer

    task = SudokuTask({"train": 1000, "test": 8, "data_seed": 0})
    torch.manual_seed(seed)
    model = task.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    rng = np.random.default_rng(seed)
    form = task.cvxpy_form()
    if layer_name == "ffoqp":
        layer = FFOQPLayer()
        exact = FFOQPLayer(TIGHT, backward="kkt")
        call = lambda lay, qp: lay(*qp.args())  # noqa: E731
    else:
        layer = FFOLayer(form.problem, form.params, [form.variable])
        exact = FFOLayer(form.problem, form.params, [form.variable], solver=TIGHT,
                         backward="kkt")  # fmt: skip
        call = lambda lay, qp: lay(*form.values(qp))[0]  # noqa: E731
    rows, failed = [], 0
    for step in range(steps):
        idx = rng.choice(len(task.train), task.batch, replace=False)
        x, y = task.train.x[idx], task.train.y[idx]
        opt.zero_grad()
        try:
            loss = task.loss(call(layer, task.qp(model, x)), y)
            loss.backward()
        except Exception as exc:  # counted, as in the paper benchmarks
            failed += 1
            print(f"  {layer_name} step {step}: {type(exc).__name__}: {exc}", flush=True)
            continue
        if step % check_every == 0:
            mine = torch.cat([p.grad.flatten() for p in model.parameters()])
            opt.zero_grad()
            task.loss(call(exact, task.qp(model, x)), y).backward()
            ref = torch.cat([p.grad.flatten() for p in model.parameters()])
            cos = float(mine @ ref / (mine.norm() * ref.norm()))
            rel = float((mine - ref).norm() / ref.norm())
            rows.append({"layer": layer_name, "step": step, "cos": cos, "rel": rel,
                         "loss": float(loss.detach())})  # fmt: skip
            opt.zero_grad()
            for p, g in zip(model.parameters(), _split(mine, model)):
                p.grad = g
        opt.step()
    return rows, failed


def _split(flat, model):
    out, k = [], 0
    for p in model.parameters():
        out.append(flat[k : k + p.numel()].view_as(p).clone())
        k += p.numel()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", nargs="+", default=["ffoqp", "ffolayer"])
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.layers:
        start = time.perf_counter()
        got, failed = run(name, args.steps, args.check_every, args.seed)
        rows += got
        cos = min(r["cos"] for r in got)
        rel = max(r["rel"] for r in got)
        print(f"{name}: {args.steps} steps, {failed} failed, {len(got)} checks: smallest cosine "
              f"{cos:.8f}, largest relative error {rel:.2e} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    with open(out / "sudoku_gradients.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["layer", "step", "cos", "rel", "loss"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
