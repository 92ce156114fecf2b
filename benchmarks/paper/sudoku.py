"""Sudoku (the paper's §6.2, after OptNet): learn the constraints of an eps-regularised LP.

Each puzzle is a one-hot ``(N, N, N)`` array ``x`` (blank cells all zeros, ``n = N^3``
entries); the layer solves ::

    minimize 0.05 ||z||^2 - x'z    subject to   A z = b,   z >= 0

(``Q = 0.1 I``, ``p = -x``, ``G = -I``, ``h = 0``) and the loss is the mean squared error
between ``z`` and the solution's one-hot array.  What is learnt is the constraints: ``A``
(``40 x 64`` for 4x4 boards, the rank of Sudoku's own constraint matrix; ``249 x 729`` for
9x9), initialised uniform in [0, 1), and ``log z0`` (zeros), with ``b = A exp(log z0)`` so
that the problem stays feasible (OptNet's parametrisation).  Adam, learning rate 0.1,
batch 8.  The boards are generated here (``benchmarks/paper/boards.py``, seed
``--data-seed``): minimal puzzles with a unique solution.

Test error: the fraction of test boards with at least one wrong cell, the digit of a cell
being the largest entry of ``z`` over its digits.  Every method's learnt ``(A, log z0)`` is
evaluated by the same forward solve (``FFOQPLayer``, Clarabel), so the test numbers compare
what was learnt, not the forward solvers.  The training error is counted from each method's
own training solutions.

    python -m benchmarks.paper.sudoku                 # 4x4, 1000 boards, 3 seeds, all methods
    python -m benchmarks.paper.sudoku --smoke         # seconds: 2 steps of every method
    python -m benchmarks.paper.sudoku --box 3 --methods ffoqp,ffolayer   # 9x9

Writes ``sudoku_{epochs,steps,runs}.csv`` under ``--out`` and the figure
``sudoku.png`` (``python -m benchmarks.paper.plots`` redraws it from the CSV files).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from . import boards
from .common import Split, Task, add_common_args, run_all
from .methods import CvxpyForm, QPData

QPENALTY = 0.1


class SudokuTask(Task):
    experiment = "sudoku"
    clip = None
    counts_errors = True

    def __init__(self, spec: dict):
        import torch

        box = spec.get("box", 2)
        side = box * box
        self.n = side**3
        self.size = self.n
        self.label = f"{side}x{side}"
        self.lr, self.batch = spec.get("lr", 0.1), spec.get("batch", 8)
        n_train, n_test = spec["train"], spec["test"]
        data = boards.make_dataset(
            n_train + n_test, box, spec.get("data_seed", 0), spec.get("min_givens", 0)
        )
        X = torch.tensor(boards.one_hot(data.puzzles, box).reshape(len(data), -1))
        Y = torch.tensor(boards.one_hot(data.solutions, box).reshape(len(data), -1))
        self.train = Split(X[:n_train], Y[:n_train])
        self.test = Split(X[n_train:], Y[n_train:])
        self.side = side
        self.neq = boards.independent_rows(boards.constraint_matrix(box)).shape[0]
        dt = torch.float64
        self.Q = QPENALTY * torch.eye(self.n, dtype=dt)
        self.G = -torch.eye(self.n, dtype=dt)
        self.h = torch.zeros(self.n, dtype=dt)
        self._evaluator = None

    def make_model(self):
        import torch

        class Constraints(torch.nn.Module):
            def __init__(self, neq: int, n: int):
                super().__init__()
                self.A = torch.nn.Parameter(torch.rand(neq, n, dtype=torch.float64))
                self.log_z0 = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

        return Constraints(self.neq, self.n)

    def qp(self, model, x) -> QPData:
        b = model.A @ model.log_z0.exp()
        return QPData(self.Q, -x, self.G, self.h, model.A, b)

    def cvxpy_form(self) -> CvxpyForm:
        import cvxpy as cp

        p, A, b = cp.Parameter(self.n), cp.Parameter((self.neq, self.n)), cp.Parameter(self.neq)
        z = cp.Variable(self.n)
        problem = cp.Problem(
            cp.Minimize(0.5 * QPENALTY * cp.sum_squares(z) + p @ z), [A @ z == b, z >= 0]
        )
        return CvxpyForm(problem, [p, A, b], z, lambda qp: [qp.p, qp.A, qp.b])

    def loss(self, z, y):
        import torch

        return torch.nn.functional.mse_loss(z, y)

    def board_wrong(self, z, y) -> np.ndarray:
        s = self.side
        zz = z.detach().reshape(-1, s, s, s).argmax(-1)
        yy = y.reshape(-1, s, s, s).argmax(-1)
        return (zz != yy).flatten(1).any(1).numpy()

    def wrong(self, z, y) -> int:
        return int(self.board_wrong(z, y).sum())

    def evaluate(self, model) -> tuple[float, float]:
        import torch

        from ffo_core import FFOError, FFOQPLayer

        if self._evaluator is None:
            self._evaluator = FFOQPLayer(solver="clarabel")
        losses, wrong = [], 0
        for k in range(0, len(self.test), 64):
            x, y = self.test.x[k : k + 64], self.test.y[k : k + 64]
            try:
                z = self._evaluator(*self.qp(model, x).args())
            except FFOError:  # counted as wrong boards, loss unknown
                losses.append(float("nan"))
                wrong += len(x)
                continue
            losses.append(float(torch.nn.functional.mse_loss(z, y)) * len(x))
            wrong += self.wrong(z, y)
        return float(np.sum(losses) / len(self.test)), wrong / len(self.test)


def make_task(spec: dict) -> SudokuTask:
    return SudokuTask(spec)


#: the full run (what ``python -m benchmarks.paper.sudoku`` does without options)
FULL = {"box": 2, "train": 1000, "test": 200, "epochs": 20, "seeds": [0, 1, 2]}
SMOKE = {"box": 2, "train": 16, "test": 8, "epochs": 1, "seeds": [0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--box", type=int, default=FULL["box"], help="2: 4x4 boards, 3: 9x9")
    ap.add_argument("--train", type=int, default=FULL["train"], help="training boards")
    ap.add_argument("--test", type=int, default=FULL["test"], help="test boards")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the board generator")
    ap.add_argument(
        "--min-givens",
        type=int,
        default=0,
        help="stop blanking cells at this many givens (0: minimal puzzles)",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1)
    add_common_args(ap, seeds=FULL["seeds"], epochs=FULL["epochs"], time_limit=3600.0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.train, args.test, args.epochs = SMOKE["train"], SMOKE["test"], SMOKE["epochs"]
        args.seeds, args.in_process = SMOKE["seeds"], True
    base = {
        "box": args.box,
        "train": args.train,
        "test": args.test,
        "data_seed": args.data_seed,
        "min_givens": args.min_givens,
        "batch": args.batch,
        "lr": args.lr,
    }
    size = (args.box * args.box) ** 3
    run_all("sudoku", "sudoku", [size], base, args)
    if not args.no_plot:
        from .plots import plot_curves

        print(f"wrote {plot_curves(args.out, 'sudoku')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
