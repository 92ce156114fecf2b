"""Every paper experiment in one command: Sudoku, synthetic DFL, time against size.

    python -m benchmarks.paper.all                      # the full run, into bench_out/paper
    python -m benchmarks.paper.all --out DIR --img docs/img/paper
    python -m benchmarks.paper.all --smoke              # seconds: a few steps of each

Runs ``benchmarks.paper.sudoku``, ``benchmarks.paper.dfl`` and ``benchmarks.paper.scaling``
with their defaults (the full runs), then redraws the figures (into ``--img`` if given) and
prints the table of final numbers.  ``--methods`` is passed on to all three.  For qpth, put
it on ``PYTHONPATH`` first (docs/benchmarks.md, section "qpth"); without it qpth
is skipped and the reason recorded.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import dfl, plots, scaling, sudoku
from .common import DEFAULT_OUT

#: wall-clock minutes of each full run on the project's shared, loaded 2-core machine
#: (docs/paper.md, "Cost of the full run"); most of it is qpth and CvxpyLayer
EXPECTED_MINUTES = {"sudoku": 130, "dfl": 100, "scaling": 40}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    ap.add_argument("--img", default=None, help="folder for the figures (default: --out)")
    ap.add_argument("--methods", default=None, help="passed on to every experiment")
    ap.add_argument("--smoke", action="store_true", help="the smoke mode of each experiment")
    args = ap.parse_args(argv)
    extra = ["--out", args.out, "--no-plot"]
    if args.methods:
        extra += ["--methods", args.methods]
    if args.smoke:
        extra.append("--smoke")
    else:
        total = sum(EXPECTED_MINUTES.values())
        parts = ", ".join(f"{k} ~{v} min" for k, v in EXPECTED_MINUTES.items())
        print(
            f"expected duration of the full run: about {total / 60:.1f} h on a loaded 2-core "
            f"machine ({parts}); less on a faster or quieter one",
            flush=True,
        )
    start = time.time()
    for module in (sudoku, dfl, scaling):
        module.main(list(extra))
    for path in (
        plots.plot_curves(args.out, "sudoku", args.img),
        plots.plot_curves(args.out, "dfl", args.img),
        plots.plot_scaling(args.out, "scaling", args.img),
    ):
        print(f"wrote {path}")
    print(plots.table(args.out))
    print(f"done in {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
