"""The training harness shared by the paper experiments: runs, CSV files, time limits.

One *run* is (experiment, size, method, seed).  A run trains the experiment's model through
the method's layer for ``epochs`` epochs and appends to three CSV files under ``--out``:

* ``{tag}_epochs.csv``: one row per epoch (epoch 0 is the untrained model): mean training
  loss of the epoch's successful steps, test loss and test error, the epoch's summed forward
  and backward seconds, steps and failed steps;
* ``{tag}_steps.csv``: one row per step: loss, forward and backward seconds, and for a
  failed step the exception's type and message;
* ``{tag}_runs.csv`` (written by the parent): one row per run: status (``ok``,
  ``did not finish: ...``, ``skipped: ...``, ``crashed: ...``), steps, failed steps, wall
  seconds, peak memory, final numbers.

**Same start for every method.**  The model's initial parameters come from
``torch.manual_seed(seed)`` before any layer is built, and the batch order from
``numpy.random.default_rng(seed)``, which no layer touches: for one seed, every method starts
from the same parameters and sees the same batches in the same order.

**Failures.**  An exception in a step's forward or backward (for example a
``GhostProblemError``) is recorded in the steps file and counted; that step makes no update
and the run goes on.

**Time limits.**  Each run runs in a fresh interpreter (unless ``--in-process``) that stops
itself at the time limit, after the step in progress, and is killed past the limit plus a
grace period or over the memory cap; either way the run is recorded as *did not finish*,
with the epochs and steps it completed.  Sizes run in increasing order, and a method that
did not finish at one size is not started at larger ones (recorded as skipped).

Forward seconds cover the model, the layer's forward and the loss; backward seconds cover
``loss.backward()``: what a user's training step pays.  Test evaluation is not timed.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .methods import DEFAULT_METHODS, CvxpyForm, QPData, parse_methods

EPOCH_FIELDS = [
    "experiment", "size", "label", "method", "seed", "epoch", "train_loss", "train_error",
    "test_loss", "test_error", "fwd_s", "bwd_s", "steps", "failed_steps", "wall_s",
]  # fmt: skip
STEP_FIELDS = [
    "experiment", "size", "method", "seed", "epoch", "step", "loss", "fwd_s", "bwd_s",
    "failed", "error",
]  # fmt: skip
RUN_FIELDS = [
    "experiment", "size", "label", "method", "seed", "status", "steps", "failed_steps",
    "wall_s", "setup_s", "peak_mb", "final_train_loss", "final_test_loss", "final_test_error",
]  # fmt: skip

#: default output folder, ignored by git (.gitignore has bench_out/)
DEFAULT_OUT = "bench_out/paper"
#: the repository root (children run there, so ``-m benchmarks.paper.common`` resolves)
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Split:
    """Inputs and targets, as tensors with the sample in the first dimension."""

    x: object
    y: object

    def __len__(self) -> int:
        return len(self.x)


class Task:
    """An experiment at one size: data, model, the QP a model's output poses, loss, metrics.

    Subclasses set ``experiment``, ``size`` (QP variables), ``label``, ``lr``, ``batch``,
    ``clip`` (gradient-norm clipping or None), ``train`` and ``test`` (:class:`Split`), and
    implement the methods below."""

    experiment: str
    size: int
    label: str
    lr: float
    batch: int
    clip: float | None = None
    counts_errors: bool = False  # True: wrong() counts training errors
    train: Split
    test: Split

    def make_model(self):
        """The model to train (called right after ``torch.manual_seed(seed)``)."""
        raise NotImplementedError

    def qp(self, model, x) -> QPData:
        """The batch's QP from the model's output."""
        raise NotImplementedError

    def cvxpy_form(self) -> CvxpyForm:
        raise NotImplementedError

    def loss(self, z, y):
        raise NotImplementedError

    def wrong(self, z, y) -> int:
        """Training errors counted from the layer's own training solutions (experiments
        with ``counts_errors``)."""
        return 0

    def evaluate(self, model) -> tuple[float, float]:
        """(test loss, test error) of ``model``, computed the same way for every method."""
        raise NotImplementedError


def task_for(spec: dict) -> Task:
    module = importlib.import_module(f"benchmarks.paper.{spec['module']}")
    return module.make_task(spec)


def _append(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.6g}"
    return x


def train_run(spec: dict) -> dict:
    """One run (see the module docstring); returns its summary for the runs file."""
    import numpy as np
    import torch
    from tqdm import tqdm

    start = time.perf_counter()
    torch.set_num_threads(1)
    out = Path(spec["out"])
    tag, seed, limit = spec["tag"], spec["seed"], spec.get("time_limit")
    method = parse_methods(spec["method"])[0]
    task = task_for(spec)
    key = {"experiment": tag, "size": task.size, "method": method.name, "seed": seed}

    torch.manual_seed(seed)
    model = task.make_model()
    t0 = time.perf_counter()
    solve = method.build(task.cvxpy_form)
    setup_s = time.perf_counter() - t0
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    order = np.random.default_rng(seed)

    steps_done = failed_total = 0
    status = "ok"
    last: dict = {}
    n_train, batch = len(task.train), task.batch
    per_epoch = max(1, n_train // batch)  # an incomplete last batch is dropped
    max_steps = spec.get("max_steps")
    bar = tqdm(
        total=spec["epochs"] * (min(per_epoch, max_steps) if max_steps else per_epoch),
        desc=f"{tag} {task.label} {method.name} seed {seed}",
        leave=False,
        disable=None,
        position=1 if spec.get("child") else 0,
    )

    def epoch_row(epoch, losses, wrong, fwd, bwd, steps, failed):
        model.eval()
        with torch.no_grad():
            test_loss, test_error = task.evaluate(model)
        model.train()
        row = {
            **key,
            "label": task.label,
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else "",
            "train_error": (
                wrong / max(1, (steps - failed) * batch) if steps and task.counts_errors else ""
            ),
            "test_loss": test_loss,
            "test_error": test_error,
            "fwd_s": fwd,
            "bwd_s": bwd,
            "steps": steps,
            "failed_steps": failed,
            "wall_s": time.perf_counter() - start,
        }
        _append(out / f"{tag}_epochs.csv", EPOCH_FIELDS, [{k: _fmt(v) for k, v in row.items()}])
        return row

    model.train()
    last = epoch_row(0, [], 0, 0.0, 0.0, 0, 0)
    for epoch in range(1, spec["epochs"] + 1):
        perm = order.permutation(n_train)
        losses = []
        wrong = failed = steps = 0
        fwd_sum = bwd_sum = 0.0
        for k in range(per_epoch):
            if max_steps and k >= max_steps:
                break
            if limit and time.perf_counter() - start > limit:
                status = f"did not finish: time limit {limit:g} s"
                break
            idx = torch.as_tensor(perm[k * batch : (k + 1) * batch])
            x, y = task.train.x[idx], task.train.y[idx]
            opt.zero_grad()
            row = {**key, "epoch": epoch, "step": steps_done, "failed": 0, "error": ""}
            t0 = time.perf_counter()
            fwd = bwd = None
            try:
                z = solve(task.qp(model, x))
                loss = task.loss(z, y)
                fwd = time.perf_counter() - t0
                t1 = time.perf_counter()
                loss.backward()
                bwd = time.perf_counter() - t1
                if task.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=task.clip)
                opt.step()
                losses.append(loss.item())
                with torch.no_grad():
                    wrong += task.wrong(z.detach(), y)
                row.update(loss=losses[-1], fwd_s=fwd, bwd_s=bwd)
                fwd_sum += fwd
                bwd_sum += bwd
            except Exception as exc:  # recorded and counted; the run goes on
                failed += 1
                msg = " ".join(str(exc).split())[:300]
                row.update(failed=1, error=f"{type(exc).__name__}: {msg}", fwd_s=fwd, bwd_s=bwd)
            steps += 1
            steps_done += 1
            # written at once: a run killed in a later step keeps the steps it made
            _append(out / f"{tag}_steps.csv", STEP_FIELDS, [{k2: _fmt(v) for k2, v in row.items()}])
            bar.update(1)
            bar.set_postfix(failed=failed_total + failed)
        failed_total += failed
        if steps:
            last = epoch_row(epoch, losses, wrong, fwd_sum, bwd_sum, steps, failed)
        if status != "ok":
            break
    bar.close()
    return {
        **key,
        "label": task.label,
        "status": status,
        "steps": steps_done,
        "failed_steps": failed_total,
        "wall_s": time.perf_counter() - start,
        "setup_s": setup_s,
        "peak_mb": _peak_mb(),
        "final_train_loss": last.get("train_loss", ""),
        "final_test_loss": last.get("test_loss", ""),
        "final_test_error": last.get("test_error", ""),
    }


def _count_steps(out: Path, tag: str, size: int, method: str, seed: int) -> tuple[int, int]:
    path = out / f"{tag}_steps.csv"
    if not path.exists():
        return 0, 0
    steps = failed = 0
    with open(path) as fh:
        for r in csv.DictReader(fh):
            if (r["size"], r["method"], r["seed"]) == (str(size), method, str(seed)):
                steps += 1
                failed += r["failed"] == "1"
    return steps, failed


def run_child(spec: dict, limit: float | None, mem_mb: float) -> dict:
    """``train_run(spec)`` in a fresh interpreter, killed past ``limit`` plus a grace period
    (the run stops itself at ``limit`` after the step in progress) or over ``mem_mb``."""
    import psutil

    spec = {**spec, "child": True}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.paper.common", "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ps, start, peak = psutil.Process(proc.pid), time.time(), 0.0
    hard = None if limit is None else limit + max(60.0, 0.25 * limit)
    why = None
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss / 2**20)
        except psutil.Error:
            pass
        if peak > mem_mb:
            why = f"did not finish: memory over {mem_mb:.0f} MB"
        elif hard is not None and time.time() - start > hard:
            why = f"did not finish: killed after {hard:.0f} s (time limit {limit:g} s)"
        if why:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.2)
    stdout = proc.stdout.read() if proc.stdout else ""
    if why is None and proc.returncode == 0:
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if lines:
            return json.loads(lines[-1])
        why = "crashed: no result"
    elif why is None:
        why = f"crashed: exit status {proc.returncode}"
    return {"status": why, "peak_mb": peak, "wall_s": time.time() - start}


def add_common_args(ap: argparse.ArgumentParser, *, seeds, epochs, time_limit) -> None:
    ap.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated method names (benchmarks/paper/methods.py), default %(default)s",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--max-steps", type=int, default=None, help="at most this many steps an epoch")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=time_limit,
        help="seconds per run (method, size, seed); past it the run is recorded as "
        "'did not finish' (default %(default)s)",
    )
    ap.add_argument("--mem-mb", type=float, default=12000.0, help="memory cap per run (MB)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run every run in this process (no hard kill, no memory cap)",
    )
    ap.add_argument("--no-plot", action="store_true", help="write the CSV files only")
    ap.add_argument(
        "--append",
        action="store_true",
        help="add to the CSV files under --out (e.g. a missing seed) instead of starting afresh",
    )
    ap.add_argument("--smoke", action="store_true", help="a few steps of every method (CI)")


def run_all(tag: str, module: str, sizes: list, base: dict, args) -> list[dict]:
    """Every (size, method, seed) of an experiment, sizes in increasing order; writes the
    runs file and returns its rows.  ``base`` is the spec shared by all runs."""
    from tqdm import tqdm

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not getattr(args, "append", False):
        for suffix in ("epochs", "steps", "runs"):
            (out / f"{tag}_{suffix}.csv").unlink(missing_ok=True)
    methods = parse_methods(args.methods)
    unavailable = {}
    for m in methods:
        why = m.check()
        if why:
            unavailable[m.name] = why
            print(f"[{tag}] skipping {m.name}: {why}", file=sys.stderr)
    jobs = [(size, m, seed) for size in sizes for m in methods for seed in args.seeds]
    dnf_at: dict[str, object] = {}
    rows = []
    bar = tqdm(jobs, desc=tag, disable=None, position=0)
    for size, m, seed in bar:
        spec = {
            **base,
            "module": module,
            "tag": tag,
            "size": size,
            "method": m.name,
            "seed": seed,
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "time_limit": args.time_limit,
            "out": str(out),
        }
        if m.name in unavailable:
            res = {"status": f"skipped: {unavailable[m.name]}"}
        elif m.name in dnf_at:  # larger sizes, and the other seeds of the same size
            res = {"status": f"skipped: did not finish at size {dnf_at[m.name]}"}
        elif args.in_process:
            res = train_run(spec)
        else:
            res = run_child(spec, args.time_limit, args.mem_mb)
        if res["status"].startswith(("did not finish", "crashed")):
            dnf_at.setdefault(m.name, size)
            if "steps" not in res:
                res["steps"], res["failed_steps"] = _count_steps(out, tag, size, m.name, seed)
        row = {"experiment": tag, "size": size, "method": m.name, "seed": seed, **res}
        rows.append(row)
        _append(out / f"{tag}_runs.csv", RUN_FIELDS, [{k: _fmt(v) for k, v in row.items()}])
        bar.write(
            f"[{tag}] size {size} {m.name} seed {seed}: {row['status']}"
            + (f", {row['failed_steps']} failed steps" if row.get("failed_steps") else "")
            + (f", {row['wall_s']:.0f} s" if isinstance(row.get("wall_s"), float) else "")
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one run of a paper experiment (internal)")
    ap.add_argument("--child", required=True)
    args = ap.parse_args(argv)
    print(json.dumps(train_run(json.loads(args.child))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
