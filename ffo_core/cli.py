"""The ``ffo`` command line: ``ffo backends``, ``ffo conformance NAME``, ``ffo --version``."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
ffo: any convex solver as a differentiable PyTorch layer, with a fully first-order
backward pass.

commands:
  ffo backends              list the installed backends, whether each can run here (and
                            why not), its cones and capabilities
  ffo conformance NAME      prove a backend right: solutions, statuses and gradients on
                            a problem zoo (ffo conformance --help)
"""


def _cones(caps) -> str:
    if caps is None:
        return "-"
    order = ("zero", "nonneg", "soc", "exp", "psd")
    return ",".join(c for c in order if c in caps.cones)


def cmd_backends(args: argparse.Namespace) -> int:
    from .registry import available_backends

    rows = [("backend", "version", "available", "cones", "quad", "batch", "note")]
    for name, info in available_backends().items():
        caps = info.capabilities
        rows.append(
            (
                name,
                info.version or "-",
                "yes" if info.available else "no",
                _cones(caps),
                "-" if caps is None else ("yes" if caps.quadratic_objective else "no (SOC)"),
                "-" if caps is None else ("device" if caps.device else "-"),
                info.reason or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        if k == 0:
            print("  ".join("-" * w for w in widths) + "  ----")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ffo_conformance import cli as conformance_cli

    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ffo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ffo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("backends", help="list backends, whether they can run here, and why")
    p.set_defaults(func=cmd_backends)
    conformance_cli.add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
