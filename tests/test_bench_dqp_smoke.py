"""``benchmarks/dqp.py`` at a tiny size, so it cannot rot unnoticed.

It runs as a user runs it (``python -m benchmarks.dqp`` in a child process, n = 50,
batch 2, one timed step) and must exit 0 and write its CSV and plot.  Accuracy is read
against the box QP's closed form, ``y = clip(-q, -1, 0)`` and ``dL/dq = -w * (0 < q < 1)``:
ours to 1e-7 (Clarabel at 1e-12, polished where a pair is undecided: ~1e-11 here; the
first-order gradient has no truncation error on a QP); dQP's solution to 1e-4 (Clarabel
at dQP's ``eps_abs = 1e-6``; a sign convention crossed between the two layers would put
it off by O(1)).  The dQP case runs only where ``dqp`` imports (``libdqp`` is not a
dependency; the benchmark's docstring gives the install).
"""

from __future__ import annotations

import pytest
from test_benchmarks_smoke import rows, run

ARGS = ("benchmarks.dqp", "--n", "50", "--batch", "2", "--reps", "1")


def test_dqp_benchmark_ffo(tmp_path):
    run(*ARGS, "--methods", "ffo", "--out", str(tmp_path))
    (got,) = rows(tmp_path / "dqp.csv")
    assert got["method"] == "ffo" and not got["note"], got
    assert float(got["err"]) <= 1e-7 and float(got["grad_rel"]) <= 1e-7, got
    assert got["bad"] == "0", got
    assert float(got["bwd_min"]) > 0 and float(got["ghost_min"]) > 0, got
    assert (tmp_path / "dqp.png").stat().st_size > 0


def test_dqp_benchmark_against_dqp(tmp_path):
    pytest.importorskip("dqp", reason="libdqp is not installed (not a dependency of ffo)")
    out = run(*ARGS, "--methods", "ffo", "dqp", "--out", str(tmp_path))
    assert "skipping dqp" not in out
    got = {r["method"]: r for r in rows(tmp_path / "dqp.csv")}
    assert set(got) == {"ffo", "dqp"}
    dqp = got["dqp"]
    assert not dqp["note"], dqp
    assert float(dqp["err"]) <= 1e-4, dqp
    assert float(dqp["bwd_x_dqp"]) == 1.0
    assert float(got["ffo"]["bwd_x_dqp"]) > 0 and float(got["ffo"]["paired_bwd_x_dqp"]) > 0
