"""The paper experiments' smoke modes (benchmarks/paper), so the scripts cannot rot.

Each smoke mode trains every default method for a few steps in this process.  Beyond "it
runs": every method starts from the same parameters and takes the same first batch, so the
untrained test numbers must be identical and the first step's loss equal to solver accuracy;
the DFL layers' forward must equal the QP's closed-form solution; a failing step must be
recorded and the run go on; a run past its time limit must be recorded as not finished and
the larger sizes skipped.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.paper import common, dfl, methods, plots, scaling, sudoku
from ffo_core import GhostProblemError


def rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def check_runs(out: Path, tag: str) -> list[dict]:
    runs = rows(out / f"{tag}_runs.csv")
    names = {r["method"] for r in runs}
    assert names == set(methods.DEFAULT_METHODS)
    for r in runs:
        # ran, or skipped with the reason (qpth where it is not importable)
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r
        if r["status"] == "ok":
            assert int(r["steps"]) > 0 and r["failed_steps"] == "0"
    ours = [r for r in runs if r["method"] in ("ffoqp", "ffolayer", "ffoqp-kkt")]
    assert all(r["status"] == "ok" for r in ours)
    return runs


def same_start(out: Path, tag: str, first_step_rtol: float) -> None:
    ep = rows(out / f"{tag}_epochs.csv")
    init = {(r["method"], r["size"]): float(r["test_loss"]) for r in ep if r["epoch"] == "0"}
    for size in {s for _, s in init}:
        vals = [v for (_, s), v in init.items() if s == size]
        assert len(vals) > 1 and max(vals) == min(vals)  # the same initial parameters
    steps = rows(out / f"{tag}_steps.csv")
    first = {}
    for r in steps:
        first.setdefault((r["method"], r["size"]), float(r["loss"]))
    ref = {s: v for (m, s), v in first.items() if m == "ffoqp-kkt"}
    for (m, s), v in first.items():
        np.testing.assert_allclose(v, ref[s], rtol=first_step_rtol, err_msg=m)
    # and training moved the parameters
    moved = [r for r in ep if r["epoch"] == "1"]
    assert moved and all(float(r["test_loss"]) != init[(r["method"], r["size"])] for r in moved)


def test_sudoku_smoke(tmp_path):
    assert sudoku.main(["--smoke", "--out", str(tmp_path)]) == 0
    check_runs(tmp_path, "sudoku")
    same_start(tmp_path, "sudoku", first_step_rtol=1e-3)
    assert (tmp_path / "sudoku.png").stat().st_size > 10_000


def test_dfl_smoke(tmp_path):
    assert dfl.main(["--smoke", "--out", str(tmp_path)]) == 0
    check_runs(tmp_path, "dfl")
    same_start(tmp_path, "dfl", first_step_rtol=1e-3)
    for r in rows(tmp_path / "dfl_epochs.csv"):
        # regret against the best feasible decision: nonnegative, and below mean(c) < 1
        assert 0.0 <= float(r["test_error"]) < 1.0
        assert float(r["test_error"]) - float(r["test_loss"]) > 0.4  # mean(c), c ~ U[0, 1)
    assert (tmp_path / "dfl.png").stat().st_size > 10_000


def test_scaling_smoke_and_table(tmp_path):
    assert scaling.main(["--smoke", "--out", str(tmp_path)]) == 0
    runs = rows(tmp_path / "scaling_runs.csv")
    assert {int(r["size"]) for r in runs} == set(scaling.SMOKE["sizes"])
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    times = plots.step_times(tmp_path, "scaling")
    assert all(v["status"] == "ok" or v["status"].startswith("skipped") for v in times.values())
    table = plots.table(tmp_path)
    assert table.count("| scaling |") == len(runs) // len(scaling.SMOKE.get("seeds", [0]))


def test_dfl_layers_solve_the_qp():
    """Every method's forward equals the closed form z = clip(-q, -1, 0) of the DFL QP."""
    task = dfl.make_task({"size": 12, "samples": 20, "seed": 0})
    torch.manual_seed(0)
    model = task.make_model().eval()
    qp = task.qp(model, task.train.x[:4])
    want = torch.clamp(-qp.p, -1.0, 0.0).detach()
    assert (want > -1).any() and (want < 0).any() and (want == 0).any()  # all three regimes
    for m in methods.parse_methods(",".join(methods.DEFAULT_METHODS)):
        if m.check():
            continue
        z = m.build(task.cvxpy_form)(qp).detach()
        # the solvers' default accuracies: SCS (cvxpylayers) 1e-4, qpth's PDIPM, Clarabel 1e-8
        tol = {"cvxpylayers": 1e-3, "qpth": 1e-4}.get(m.name, 1e-6)
        np.testing.assert_allclose(z.numpy(), want.numpy(), atol=tol, err_msg=m.name)


def test_method_names():
    assert methods.resolve("ffoqp").label == "FFOQPLayer" and not methods.resolve("ffoqp").exact
    assert methods.resolve("ffoqp-kkt").exact and methods.resolve("qpth").exact
    assert methods.resolve("ffoqp:scs:eps_abs=1e-9").label == "FFOQPLayer [scs:eps_abs=1e-9]"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.resolve("nope")
    why = methods.resolve("ffoqp:no_such_solver").check()
    assert why and "no_such_solver" in why
    for name in methods.BATCHED_BACKENDS:  # run where registered, else a reason
        m = methods.resolve(name)
        assert m.name == name and (m.check() is None or name in m.check())


def _args(tmp_path, **kw):
    ns = {
        "methods": "ffoqp",
        "seeds": [0],
        "epochs": 1,
        "max_steps": 3,
        "time_limit": None,
        "mem_mb": 1e9,
        "out": str(tmp_path),
        "in_process": True,
    }
    ns.update(kw)
    return type("Args", (), ns)()


def test_failed_step_recorded_and_run_goes_on(tmp_path, monkeypatch):
    calls = {"n": 0}

    def flaky(form_factory):
        from ffo_core import FFOQPLayer

        layer = FFOQPLayer()

        def solve(qp):
            calls["n"] += 1
            if calls["n"] == 2:
                raise GhostProblemError("ghost failed on purpose")
            return layer(*qp.args())

        return solve

    m = methods.Method("flaky", "flaky", False, flaky, lambda: None)
    monkeypatch.setattr(common, "parse_methods", lambda text: [m])
    base = {"samples": 40, "batch": 8}
    (run,) = common.run_all("dfl", "dfl", [10], base, _args(tmp_path))
    assert run["status"] == "ok" and run["steps"] == 3 and run["failed_steps"] == 1
    steps = rows(tmp_path / "dfl_steps.csv")
    assert [r["failed"] for r in steps] == ["0", "1", "0"]
    assert steps[1]["error"] == "GhostProblemError: ghost failed on purpose"
    (ep1,) = [r for r in rows(tmp_path / "dfl_epochs.csv") if r["epoch"] == "1"]
    assert ep1["failed_steps"] == "1" and ep1["steps"] == "3"


def test_time_limit_and_skip(tmp_path):
    base = {"samples": 40, "batch": 8}
    runs = common.run_all("dfl", "dfl", [10, 20], base, _args(tmp_path, time_limit=1e-9))
    assert runs[0]["status"].startswith("did not finish: time limit")
    assert runs[0]["steps"] == 0
    assert runs[1]["status"] == "skipped: did not finish at size 10"
