"""Benchmark: a batch's solves on the local thread pool, on one Ray node, on two Ray nodes.

The decision-focused-learning QP of ``benchmarks/dfl.py`` (``--learn q``), batched ``q``:

    minimize 1/2 ||y||^2 + q'y   s.t.   -1 <= y <= 0,  1'y <= 3        (y in R^n)

through ``FFOLayer(..., executor=...)`` with Clarabel, one training step (forward, then the
first-order backward with its ghost solves) per repetition.  Modes:

* ``threads``: the local thread pool (``executor="threads"``, its default thread count);
* ``ray1``: one Ray node with 2 CPUs (``ray start --head --num-cpus=2``): 2 workers;
* ``ray2``: two Ray nodes with 1 CPU each (a head and a second ``ray start``): 2 workers,
  one per node, every structure fetched by each node's object store.

The nodes' addresses are 127.0.0.2 and 127.0.0.3 (loopback: nothing leaves the machine);
the clusters are started for the run and stopped after it (the processes they started,
by id).  Each mode runs in a fresh child process; the first step of each case is untimed
(the workers receive the structure then).

Also ``overhead``: one problem at ``--overhead-n`` (default 200) solved again and again
from one thread, locally and through a Ray worker, the difference being the per-call
overhead; and the bytes each call sends and receives (the executor's counters, checked
against the pickled size of one request).

    python -m benchmarks.ray_scaling --n 2000 5000 --batch 32 64 --out docs/benchmarks

Writes ``ray_scaling.csv`` and ``ray_scaling.png``; prints a table.  The machine's load
average is recorded with each row: on a shared machine the times are upper bounds.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("threads", "ray1", "ray2")
PORT = 6391
#: The nodes' addresses: two loopback addresses (127.0.0.0/8), so that each node has its own
#: and every byte between them stays on this machine.
HEAD, SECOND = "127.0.0.2", "127.0.0.3"
FIELDS = [
    "mode", "case", "n", "batch", "reps", "forward_s", "backward_s", "step_s",
    "bytes_sent_per_solve", "bytes_received_per_solve", "solves_per_step", "retries",
    "forward_sent_per_solve", "forward_received_per_solve", "backward_sent_per_solve",
    "backward_received_per_solve",
    "result_sha", "identical", "load_before", "load_after",
    "bare_call_s", "ray_call_s", "overhead_s", "pickled_request_bytes",
    "driver_cpu_per_call_s",
]  # fmt: skip


# -- child side -----------------------------------------------------------------------------
def _dfl_layer(n: int, executor: str):
    import cvxpy as cp

    from ffo_core import FFOLayer

    y, q = cp.Variable(n), cp.Parameter(n)
    box = [y >= -1, y <= 0, cp.sum(y) <= 3]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y) + q @ y), box)
    return FFOLayer(prob, [q], [y], solver="clarabel", executor=executor)


def _step(layer, q, w, counts=None):
    """One training step: (forward s, backward s, sha of y and dL/dq); ``counts`` gets the
    executor's counters before, between and after the two phases."""
    qs = q.clone().requires_grad_(True)  # a new q every step, as in training
    marks = [_counts(layer)] if counts is not None else None
    t0 = time.perf_counter()
    (y,) = layer(qs)
    t1 = time.perf_counter()
    if marks is not None:
        marks.append(_counts(layer))
    t1b = time.perf_counter()
    (w * y).sum().backward()
    t2 = time.perf_counter()
    if marks is not None:
        marks.append(_counts(layer))
        counts.append(marks)
    digest = hashlib.sha256(y.detach().numpy().tobytes() + qs.grad.numpy().tobytes())
    return t1 - t0, t2 - t1b, digest.hexdigest()[:16]


def _counts(layer) -> dict:
    if layer.executor.spec == "threads":
        return {}
    return layer.executor.stats(workers=False)["caller"]


def _case(mode: str, n: int, batch: int, reps: int) -> dict:
    import numpy as np
    import torch

    executor = "threads" if mode == "threads" else "ray"
    layer = _dfl_layer(n, executor)
    rng = np.random.default_rng(n + batch)  # the same sequence of q in every mode
    w = torch.tensor(rng.standard_normal((batch, n)))

    def q():
        return torch.tensor(rng.standard_normal((batch, n)))

    load0 = os.getloadavg()[0]
    _step(layer, q(), w)  # untimed: workers get the structure, the layer its caches
    before = _counts(layer)
    fwd, bwd, shas, marks = [], [], [], []
    for _ in range(reps):
        f, b, sha = _step(layer, q(), w, marks)
        fwd.append(f)
        bwd.append(b)
        shas.append(sha)
    after = _counts(layer)
    row = {
        "mode": mode, "case": "step", "n": n, "batch": batch, "reps": reps,
        "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
        "result_sha": hashlib.sha256("/".join(shas).encode()).hexdigest()[:16],
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }  # fmt: skip
    row["step_s"] = row["forward_s"] + row["backward_s"]
    if after:
        d = {k: after[k] - before[k] for k in after}
        row["bytes_sent_per_solve"] = d["bytes_sent"] / max(1, d["solves"])
        row["bytes_received_per_solve"] = d["bytes_received"] / max(1, d["solves"])
        row["solves_per_step"] = d["solves"] / reps
        row["retries"] = d["retries"]
        for phase, (i, j) in (("forward", (0, 1)), ("backward", (1, 2))):
            diff = {k: sum(m[j][k] - m[i][k] for m in marks) for k in after}
            solves = max(1, diff["solves"])
            row[f"{phase}_sent_per_solve"] = diff["bytes_sent"] / solves
            row[f"{phase}_received_per_solve"] = diff["bytes_received"] / solves
    return row


def _overhead(mode: str, n: int, calls: int) -> list[dict]:
    """Per-call latency at ``n`` from one thread: the bare backend, and through Ray."""
    import pickle

    import numpy as np

    from ffo_backends.clarabel import ClarabelBackend
    from ffo_core.layers.ray_executor import RayExecutor, _Request
    from ffo_core.protocol import Objective

    layer = _dfl_layer(n, "threads")
    rng = np.random.default_rng(0)
    import torch

    q = torch.tensor(rng.standard_normal((1, n)))
    layer(q)  # compiles; the problem data of one sample:
    problem = _sample_problem(layer, q)
    local = ClarabelBackend()
    proxy = RayExecutor().backend(ClarabelBackend())
    g, h, e = problem

    def fresh():  # a new q each call (per-sample data), the structure the same
        return Objective(g.P, rng.standard_normal(n), g.P_upper), h, e

    for _ in range(3):
        proxy.solve(*fresh())  # structure shipped, worker warm
    rows = []
    for name, backend in (("bare", local), ("ray", proxy)):
        times = []
        cpu = time.process_time()
        for _ in range(calls):
            one = fresh()
            t0 = time.perf_counter()
            backend.solve(*one)
            times.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu) / calls  # this process, all its threads
        rows.append({"name": name, "median_s": statistics.median(times), "cpu_s": cpu})
    executor = proxy.executor
    before = executor.stats(workers=False)["caller"]
    proxy.solve(*fresh())
    after = executor.stats(workers=False)["caller"]
    sent = after["bytes_sent"] - before["bytes_sent"]
    received = after["bytes_received"] - before["bytes_received"]
    g, h, e = fresh()
    # the pickled size of one request as it travels (keys for the shared structure)
    pool = executor._bound
    slot = pool.slots[0]
    parts = pool._parts(g, h, e, None, slot, [0, 0])
    req = _Request(b"x" * 12, pool._backend_item(proxy.spec, slot), parts, None, None, None, None)
    pickled = len(pickle.dumps(req, protocol=5))
    return [
        {
            "mode": mode, "case": "overhead", "n": n, "batch": 1, "reps": calls,
            "bare_call_s": rows[0]["median_s"], "ray_call_s": rows[1]["median_s"],
            "overhead_s": rows[1]["median_s"] - rows[0]["median_s"],
            "bytes_sent_per_solve": sent, "bytes_received_per_solve": received,
            "pickled_request_bytes": pickled, "driver_cpu_per_call_s": rows[1]["cpu_s"],
            "load_before": os.getloadavg()[0],
            "load_after": os.getloadavg()[0],
        }
    ]  # fmt: skip


def _sample_problem(layer, q):
    """Sample 0 of a call, as the layer hands it to its backend."""
    from ffo_core.layers.cvxpy_layer import FFOLayer

    captured = []

    class Capture:
        name = "capture"

        def __init__(self, inner):
            self.inner, self.capabilities = inner, inner.capabilities

        def solve(self, g, h, e, term=None, **kw):
            captured.append((g, h, e))
            return self.inner.solve(g, h, e, term, **kw)

    assert isinstance(layer, FFOLayer)
    layer.backend_for(None)  # the layer's own proxy (threads: the backend)
    layer._call_backends[()] = Capture(layer.backend)
    layer(q)
    del layer._call_backends[()]
    return captured[0]


def _client_check(n: int) -> dict:
    """One step at ``n`` through ``executor="ray://HEAD:PORT+1"`` (Ray Client; this
    process is not connected before), against the thread pool."""
    import numpy as np
    import torch

    rng = np.random.default_rng(1)
    q = torch.tensor(rng.standard_normal((8, n)))
    w = torch.tensor(rng.standard_normal((8, n)))
    shas = [_step(_dfl_layer(n, ex), q, w)[2] for ex in ("threads", f"ray://{HEAD}:{PORT + 1}")]
    return {"mode": "ray1", "case": "client", "n": n, "batch": 8, "reps": 1,
            "identical": shas[0] == shas[1], "result_sha": shas[1]}  # fmt: skip


def _child(mode: str, args) -> None:
    if args.client_check:
        print(json.dumps(_client_check(args.overhead_n)), flush=True)
        return
    if mode != "threads":
        import ray

        ray.init(
            address=f"{HEAD}:{PORT}", _node_ip_address=HEAD, log_to_driver=False,
            logging_level="ERROR",
        )  # fmt: skip
    for n in args.n:
        for batch in args.batch:
            print(json.dumps(_case(mode, n, batch, args.reps)), flush=True)
    if mode != "threads" and args.overhead_n:
        for row in _overhead(mode, args.overhead_n, args.overhead_calls):
            print(json.dumps(row), flush=True)


# -- the clusters -----------------------------------------------------------------------------
def _ray_env() -> dict:
    """No usage stats, and the token authentication ``ray start`` turns on (its token in
    ``~/.ray/auth_token``) for the drivers that connect."""
    return dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"),
    )


def _ray_start(ip: str, *extra: str) -> subprocess.Popen:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen(
        [ray_bin, "start", "--block", f"--node-ip-address={ip}", "--disable-usage-stats",
         "--object-store-memory=1000000000", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=_ray_env(),
    )  # fmt: skip


def _cluster(mode: str) -> list[subprocess.Popen]:
    """Start the cluster of ``mode`` and wait until it offers 2 CPUs."""
    cpus = "2" if mode == "ray1" else "1"
    procs = [
        _ray_start(
            HEAD, "--head", f"--port={PORT}", f"--num-cpus={cpus}", "--include-dashboard=false",
            f"--ray-client-server-port={PORT + 1}",
        )
    ]  # fmt: skip
    probe = (
        f"import ray;ray.init(address='{HEAD}:{PORT}',_node_ip_address='{HEAD}',"
        "logging_level='ERROR');print(ray.cluster_resources().get('CPU',0))"
    )
    try:
        if mode == "ray2":
            time.sleep(5)
            procs.append(_ray_start(SECOND, f"--address={HEAD}:{PORT}", "--num-cpus=1"))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            time.sleep(3)
            out = subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, text=True,
                env=_ray_env(), timeout=120,
            )  # fmt: skip
            if out.returncode == 0 and float(out.stdout.strip().splitlines()[-1]) >= 2:
                return procs
        raise RuntimeError(f"the {mode} cluster did not come up within 180 s")
    except BaseException:
        _stop(procs)
        raise


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop the clusters this run started: each ``ray start`` process group, then any of
    their descendants still alive (Ray's workers run in groups of their own), by id."""
    import psutil

    family = []
    for p in procs:
        try:
            family += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


# -- main ---------------------------------------------------------------------------------------
def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r["case"] == "step"]
    ns = sorted({r["n"] for r in steps})
    fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 4), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for mode in MODES:
            pts = sorted((r["batch"], r["forward_s"], r["step_s"]) for r in steps
                         if r["n"] == n and r["mode"] == mode)  # fmt: skip
            if not pts:
                continue
            b = [p[0] for p in pts]
            (line,) = ax.plot(b, [p[2] for p in pts], marker="o", label=f"{mode}: step")
            ax.plot(b, [p[1] for p in pts], ls="--", marker=".", color=line.get_color(),
                    label=f"{mode}: forward")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("seconds")
        ax.set_title(f"DFL QP, n = {n} (2 shared cores)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 5000])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--overhead-n", type=int, default=200)
    ap.add_argument("--overhead-calls", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--client-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args)
        return
    rows: list[dict] = []
    for mode in args.modes:
        procs = [] if mode == "threads" else _cluster(mode)
        try:
            cmd = [sys.executable, "-m", "benchmarks.ray_scaling", "--child", mode, "--n",
                   *map(str, args.n), "--batch", *map(str, args.batch), "--reps",
                   str(args.reps), "--overhead-n", str(args.overhead_n),
                   "--overhead-calls", str(args.overhead_calls)]  # fmt: skip
            out = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, env=_ray_env(), timeout=3600
            )
            if out.returncode != 0:
                print(out.stderr[-4000:], file=sys.stderr)
            rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            if mode == "ray1":  # executor="ray://HOST:PORT" (Ray Client), once
                check = subprocess.run(
                    [sys.executable, "-m", "benchmarks.ray_scaling", "--child", mode,
                     "--client-check", "--overhead-n", str(args.overhead_n)],
                    cwd=ROOT, capture_output=True, text=True, env=_ray_env(), timeout=600,
                )  # fmt: skip
                found = [json.loads(x) for x in check.stdout.splitlines() if x.startswith("{")]
                if not found:
                    print(check.stderr[-3000:], file=sys.stderr)
                rows += found
        finally:
            _stop(procs)
        for r in rows:
            if r["mode"] == mode:
                print(json.dumps(r))
    ref = {(r["n"], r["batch"]): r["result_sha"] for r in rows
           if r["case"] == "step" and r["mode"] == "threads"}  # fmt: skip
    for r in rows:
        if r["case"] == "step" and (r["n"], r["batch"]) in ref:
            r["identical"] = r["result_sha"] == ref[(r["n"], r["batch"])]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "ray_scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in FIELDS})
    _plot(rows, out_dir / "ray_scaling.png")
    print(f"\n{'mode':8} {'n':>5} {'batch':>5} {'fwd s':>7} {'bwd s':>7} {'step s':>7} "
          f"{'B/solve out':>11} {'B/solve in':>10} identical")  # fmt: skip
    for r in rows:
        if r["case"] != "step":
            continue
        print(f"{r['mode']:8} {r['n']:5} {r['batch']:5} {r['forward_s']:7.2f} "
              f"{r['backward_s']:7.2f} {r['step_s']:7.2f} "
              f"{r.get('bytes_sent_per_solve', 0):11.0f} "
              f"{r.get('bytes_received_per_solve', 0):10.0f} {r.get('identical', '')}")  # fmt: skip
    for r in rows:
        if r["case"] == "client":
            print(f"executor='ray://{HEAD}:{PORT + 1}' (Ray Client), n={r['n']}: "
                  f"identical to threads: {r['identical']}")  # fmt: skip
        if r["case"] == "overhead":
            print(f"overhead {r['mode']}: n={r['n']}: ray {r['ray_call_s'] * 1e3:.2f} ms vs "
                  f"bare {r['bare_call_s'] * 1e3:.2f} ms per call: "
                  f"+{r['overhead_s'] * 1e3:.2f} ms; sends {r['bytes_sent_per_solve']} B by "
                  f"value ({r['pickled_request_bytes']} B pickled request), receives "
                  f"{r['bytes_received_per_solve']} B; caller CPU "
                  f"{r['driver_cpu_per_call_s'] * 1e3:.2f} ms per call")  # fmt: skip
    print(f"wrote {out_dir / 'ray_scaling.csv'} and {out_dir / 'ray_scaling.png'}")


if __name__ == "__main__":
    main()
