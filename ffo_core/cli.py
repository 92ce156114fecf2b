"""The ``ffo`` command line: ``ffo backends`` (more subcommands register here)."""

from __future__ import annotations

import argparse
import sys


def _cones(caps) -> str:
    if caps is None:
        return "-"
    order = ("zero", "nonneg", "soc", "exp", "psd")
    return ",".join(c for c in order if c in caps.cones)


def cmd_backends(args: argparse.Namespace) -> int:
    from .registry import available_backends

    rows = [("backend", "version", "available", "cones", "quad", "warm", "note")]
    for name, info in available_backends().items():
        caps = info.capabilities
        rows.append(
            (
                name,
                info.version or "-",
                "yes" if info.available else "no",
                _cones(caps),
                "-" if caps is None else ("yes" if caps.quadratic_objective else "no (SOC)"),
                "-" if caps is None else ("yes" if caps.warm_start else "no"),
                info.reason or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        if k == 0:
            print("  ".join("-" * w for w in widths) + "  ----")
    return 0


#: Modules contributing subcommands: each has ``add_subparser(subparsers)`` that adds its
#: parser and sets ``func``.  Imported lazily so ``ffo backends`` stays fast.
SUBCOMMAND_MODULES = ("ffo_conformance.cli",)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="ffo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list backends, whether they can run here, and why")
    p.set_defaults(func=cmd_backends)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
