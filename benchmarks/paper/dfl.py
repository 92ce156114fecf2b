"""Synthetic decision-focused learning (the paper's §6.1).

A network predicts the linear cost ``q`` of a lower-level QP from features ``x``; the QP's
solution ``z`` is the decision, and the loss is the decision's true cost ``mean(c * z)``::

    z(q) = argmin 1/2 ||z||^2 + q'z   subject to   z <= 0,  -z <= 1,  1'z <= 3

in qpth's form ``Q = I``, ``G = [I; -I; 1']``, ``h = [0; 1; 3]``, no equalities (the paper's
problem).  The true costs ``c`` are uniform in [0, 1)^n; the features (dimension 640) are a
random two-layer map of ``c`` plus uniform noise of size 0.1; the network is
640-128-128-n with batch normalisation and ReLU, its output clamped to [-10, 10]; Adam,
learning rate 1e-3, batch 8, gradient norm clipped to 2; 80% of the samples for training
(``--samples``, 1000 by default; the paper has 2000).
Data and initialisation depend on the seed; every method gets the same for one seed.

Test metric: the decision regret on the test samples, ``mean(c * z(q))`` minus the best
decision cost over the feasible set, ``min mean(c * z) = -mean(c)`` (``z = -1``: the costs
are nonnegative and the budget row ``1'z <= 3`` is never active), with the QP solved in
closed form (it separates: ``z = clip(-q, -1, 0)``), so the test numbers do not depend on
any solver.  (The QP's own solution at the true cost, ``z(c) = -c``, is not the best
decision: the quadratic term pulls it inside the box, and a network that predicts large
costs does better than it.)

The CVXPY layers (``ffolayer``, ``cvxpylayers``) get the QP with only ``q`` as a parameter
(``--cvxpy-form q``, the default: what is learnt) or, as in the paper's code, with ``Q``,
``q``, ``G``, ``h`` all parameters (``--cvxpy-form all``; CVXPY's canonicalisation of that
form needs minutes and gigabytes from n = 1000 on).

    python -m benchmarks.paper.dfl                      # the full run (n = 100, 200)
    python -m benchmarks.paper.dfl --sizes 200 --epochs 2 --seeds 0
    python -m benchmarks.paper.dfl --smoke

Writes ``dfl_{epochs,steps,runs}.csv`` under ``--out`` and ``dfl.png``.
"""

from __future__ import annotations

import argparse
import math
import sys

from .common import Split, Task, add_common_args, run_all
from .methods import CvxpyForm, QPData

INPUT_DIM = 640


class DFLTask(Task):
    experiment = "dfl"
    clip = 2.0

    def __init__(self, spec: dict):
        import torch

        self.n = self.size = spec["size"]
        self.label = f"n={self.n}"
        self.lr, self.batch = spec.get("lr", 1e-3), spec.get("batch", 8)
        self.form = spec.get("cvxpy_form", "q")
        samples, frac = spec["samples"], spec.get("train_frac", 0.8)
        dt = torch.float64
        g = torch.Generator().manual_seed(10_000 + spec["seed"])  # data, apart from the model
        c = torch.rand(samples, self.n, generator=g, dtype=dt)
        W1 = torch.randn(self.n, 128, generator=g, dtype=dt) / math.sqrt(self.n)
        W2 = torch.randn(128, INPUT_DIM, generator=g, dtype=dt) / math.sqrt(128)
        x = torch.relu(c @ W1) @ W2 + 0.1 * torch.rand(samples, INPUT_DIM, generator=g, dtype=dt)
        n_train = int(frac * samples)
        self.train = Split(x[:n_train], c[:n_train])
        self.test = Split(x[n_train:], c[n_train:])
        n = self.n
        self.Q = torch.eye(n, dtype=dt)
        self.G = torch.cat(
            [torch.eye(n, dtype=dt), -torch.eye(n, dtype=dt), torch.ones(1, n, dtype=dt)]
        )
        self.h = torch.cat(
            [torch.zeros(n, dtype=dt), torch.ones(n, dtype=dt), torch.tensor([3.0], dtype=dt)]
        )
        self.empty = torch.empty(0, dtype=dt)

    def make_model(self):
        import torch
        from torch import nn

        class Predictor(nn.Module):
            def __init__(self, d_in: int, d_out: int):
                super().__init__()
                self.body = nn.Sequential(
                    nn.Linear(d_in, 128), nn.BatchNorm1d(128), nn.ReLU(),
                    nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
                    nn.Linear(128, d_out),
                )  # fmt: skip

            def forward(self, x):
                return torch.clamp(self.body(x), -10.0, 10.0)

        return Predictor(INPUT_DIM, self.n).double()

    def qp(self, model, x) -> QPData:
        return QPData(self.Q, model(x), self.G, self.h, self.empty, self.empty)

    def cvxpy_form(self) -> CvxpyForm:
        import cvxpy as cp
        import numpy as np

        n = self.n
        z, p = cp.Variable(n), cp.Parameter(n)
        if self.form == "q":
            problem = cp.Problem(
                cp.Minimize(0.5 * cp.sum_squares(z) + p @ z), [z <= 0, -z <= 1, cp.sum(z) <= 3]
            )
            return CvxpyForm(problem, [p], z, lambda qp: [qp.p])
        # the paper's form: Q, q, G, h all parameters (Q enters as the square root of Q = I)
        Qs, G, h = cp.Parameter((n, n)), cp.Parameter((2 * n + 1, n)), cp.Parameter(2 * n + 1)
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Qs @ z) + p @ z), [G @ z <= h])
        assert np.allclose(self.Q.numpy(), np.eye(n))  # its square root is itself
        return CvxpyForm(problem, [Qs, p, G, h], z, lambda qp: [qp.Q, qp.p, qp.G, qp.h])

    def loss(self, z, y):
        return (y * z).mean()

    def evaluate(self, model) -> tuple[float, float]:
        import torch

        q = model(self.test.x)
        c = self.test.y
        z = torch.clamp(-q, -1.0, 0.0)
        loss = float((c * z).mean())
        return loss, loss + float(c.mean())  # the best decision, z = -1, costs -mean(c)


def make_task(spec: dict) -> DFLTask:
    return DFLTask(spec)


#: the full run (what ``python -m benchmarks.paper.dfl`` does without options)
FULL = {"sizes": [100, 200], "samples": 1000, "epochs": 3, "seeds": [0, 1, 2]}
SMOKE = {"sizes": [20], "samples": 40, "epochs": 1, "seeds": [0]}


def add_dfl_args(ap: argparse.ArgumentParser, full: dict, time_limit: float) -> None:
    ap.add_argument("--sizes", type=int, nargs="+", default=full["sizes"], help="QP sizes n")
    ap.add_argument("--samples", type=int, default=full["samples"], help="80%% train, 20%% test")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cvxpy-form", choices=["q", "all"], default="q")
    add_common_args(ap, seeds=full["seeds"], epochs=full["epochs"], time_limit=time_limit)


def base_spec(args) -> dict:
    return {
        "samples": args.samples,
        "batch": args.batch,
        "lr": args.lr,
        "cvxpy_form": args.cvxpy_form,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dfl_args(ap, FULL, time_limit=1800.0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.samples = SMOKE["sizes"], SMOKE["samples"]
        args.epochs, args.seeds, args.in_process = SMOKE["epochs"], SMOKE["seeds"], True
    run_all("dfl", "dfl", sorted(args.sizes), base_spec(args), args)
    if not args.no_plot:
        from .plots import plot_curves

        print(f"wrote {plot_curves(args.out, 'dfl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
