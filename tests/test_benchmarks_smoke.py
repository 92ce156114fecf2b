"""The benchmarks and the demo at tiny sizes, so they cannot rot unnoticed.

Each runs as a user runs it (``python -m ...`` in a child process) and must exit 0, write
its CSV, and report gradients that agree with the exact ones: the first-order gradient of
the DFL and batched benchmarks against the KKT gradient (relative error at most 1e-6, the
tolerance the benchmarks' tables are read against).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_dfl_benchmark(tmp_path):
    run("benchmarks.dfl", "--n", "20", "--learn", "q", "--methods", "ffo,kkt,bare",
        "--reps", "1", "--out", str(tmp_path))  # fmt: skip
    got = {r["method"]: r for r in rows(tmp_path / "dfl.csv")}
    assert set(got) == {"ffo", "kkt", "bare"}
    assert all(r["status"] == "ok" for r in got.values()), got
    assert float(got["ffo"]["rel"]) <= 1e-6
    assert float(got["ffo"]["fwd_over_bare"]) > 0
    assert (tmp_path / "dfl.png").stat().st_size > 0


def test_batched_benchmark(tmp_path):
    run("benchmarks.batched", "--cases", "box:20", "--batch", "4", "--methods",
        "ffo-clarabel", "ffo-pdipm", "--reps", "1", "--out", str(tmp_path))  # fmt: skip
    got = {r["method"]: r for r in rows(tmp_path / "batched.csv")}
    assert set(got) == {"ffo-clarabel", "ffo-pdipm"}
    for r in got.values():
        assert not r["note"], r
        assert float(r["err"]) <= 1e-6 and float(r["grad_rel"]) <= 1e-6, r
        assert 0 < float(r["ghost_s"]) <= float(r["bwd_s"]), r


def test_demo_explains_its_run():
    out = run("examples.dfl_demo", "--epochs", "1", "--samples", "64")
    assert "What this shows" in out
    assert "relative error" in out
