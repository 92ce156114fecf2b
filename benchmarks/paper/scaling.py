"""Forward and backward time against problem size (the shape of the paper's Fig. 3).

The synthetic DFL task of ``benchmarks.paper.dfl`` (same data, network, QP and training
step) at growing sizes, a few training steps per (method, size): the figure shows the median
forward and backward seconds of a training step, warm-up steps left out.  Each run has a
time limit; a method past it is recorded as *did not finish* at that size and not started
at larger ones.

    python -m benchmarks.paper.scaling            # n = 100 ... 5000, 12 steps, 600 s a run
    python -m benchmarks.paper.scaling --sizes 100 1000 --max-steps 8 --methods ffoqp,qpth
    python -m benchmarks.paper.scaling --smoke

Writes ``scaling_{epochs,steps,runs}.csv`` under ``--out`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import sys

from .common import run_all
from .dfl import add_dfl_args, base_spec

FULL = {"sizes": [100, 200, 500, 1000, 2000, 5000], "samples": 200, "epochs": 1, "seeds": [0]}
MAX_STEPS = 12
SMOKE = {"sizes": [10, 20], "samples": 40, "max_steps": 2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dfl_args(ap, FULL, time_limit=600.0)
    ap.set_defaults(max_steps=MAX_STEPS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.samples = SMOKE["sizes"], SMOKE["samples"]
        args.max_steps = SMOKE["max_steps"]
        args.in_process = True
    run_all("scaling", "dfl", sorted(args.sizes), base_spec(args), args)
    if not args.no_plot:
        from .plots import plot_scaling

        print(f"wrote {plot_scaling(args.out, 'scaling')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
