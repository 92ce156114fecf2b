"""``ffo conformance NAME``: run the suite on an installed backend (a subcommand of ``ffo``).

This module is imported every time ``ffo`` builds its parser, so it imports nothing heavy
at module level.  Exit status: 0 all checks passed, 1 a check failed or errored (or nothing
could be checked), 2 the backend or the arguments are unusable.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  ffo conformance clarabel
  ffo conformance "clarabel:tol_gap_abs=1e-10" --classes lp,qp
  ffo conformance osqp --classes lp,qp --json osqp.json
  ffo conformance scs --checks status,solution --classes socp/scaled

classes: lp, qp, socp, exp, sdp; variants (also usable in --classes): well, batched,
scaled, degenerate, infeasible, unbounded, limit, layer; the tag linear (no quadratic
term); a group such as qp/scaled; or an instance name (see --list).
checks: status, solution, grad-ffo, grad-central, warm-start, resolve, solve-batch,
deterministic, threads.
Each check runs in a worker process under --timeout seconds: a hang or a crash of the
backend is reported as an ERROR of that check and its group, and the run goes on.
exit status: 0 pass, 1 a failure or error, 2 unusable backend, settings or arguments.
"""


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "conformance",
        help="run the conformance suite on a backend",
        description="Run ffo's conformance suite (problem zoo; status, solution, gradient, "
        "warm-start, resolve, solve-batch, determinism and thread checks, each in a worker "
        "process under a timeout) on backend NAME "
        "and print a problem-class x check table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "backend",
        metavar="NAME",
        nargs="?",
        help='backend config string, e.g. clarabel or "scs:eps_abs=1e-9"',
    )
    p.add_argument(
        "--classes", metavar="LIST", help="comma-separated problem classes/variants/groups to run"
    )
    p.add_argument("--checks", metavar="LIST", help="comma-separated checks to run")
    p.add_argument(
        "--json",
        metavar="PATH",
        dest="json_path",
        help="write the full report (every measure) as JSON",
    )
    p.add_argument("--seed", type=int, default=0, help="zoo seed (default 0)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds one check may take before it counts as a hang (default 60)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the checks in this process (no worker: a hang or crash stops the run)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the zoo's instances and exit")
    p.set_defaults(func=cmd_conformance)
    return p


def _list(seed: int) -> int:
    from .zoo import build_zoo

    for inst in build_zoo(seed):
        what = (
            f"{len(inst.samples)} sample(s), n={inst.size[0]}, rows={inst.size[1]}"
            if inst.samples
            else "CVXPY layer"
        )
        print(
            f"{inst.name:20s} {inst.group:16s} {inst.profile:11s} {what}"
            f"{'  ' + inst.description if inst.description else ''}"
        )
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    if args.list:
        return _list(args.seed)
    if not args.backend:
        print("ffo conformance: a backend NAME is required (see `ffo backends`)", file=sys.stderr)
        return 2
    from ffo_core.errors import FFOError

    from . import tolerances as T
    from .runner import Suite, parse_list

    if args.timeout is not None and not args.timeout > 0:
        print("ffo conformance: --timeout must be a positive number of seconds", file=sys.stderr)
        return 2
    if args.json_path:
        problem = _prepare_json(args.json_path)
        if problem:
            print(f"ffo conformance: --json {args.json_path}: {problem}", file=sys.stderr)
            return 2
    suite = None
    try:
        suite = Suite(
            args.backend,
            classes=parse_list(args.classes),
            checks=parse_list(args.checks),
            seed=args.seed,
            isolate=not args.in_process,
            timeout=args.timeout or T.CASE_TIMEOUT,
        )
        suite.validate()
    except (FFOError, ValueError) as exc:
        if suite is not None:
            suite.close()
        print(f"ffo conformance: {exc}", file=sys.stderr)
        return 2
    report = suite.run(progress=not args.no_progress)
    print(report.text())
    if args.json_path:
        report.write_json(args.json_path)
        print(f"JSON report written to {args.json_path}")
    return 0 if report.passed else 1


def _prepare_json(path: str) -> str:
    """Create the report's folder and make sure the file can be written, before the run
    (a run must not end in a write error); returns what is wrong, or ''."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(path):
            return "is a folder"
        existed = os.path.exists(path)
        with open(path, "a", encoding="utf-8"):
            pass
        if not existed:
            os.remove(path)
    except OSError as exc:
        return f"cannot be written ({exc.strerror or exc})"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffo_conformance")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subparser(sub).prog = "python -m ffo_conformance"
    args = parser.parse_args(["conformance", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
