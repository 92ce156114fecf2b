"""Figures and the summary table of the paper experiments, redrawn from their CSV files.

    python -m benchmarks.paper.plots                       # every figure under bench_out/paper
    python -m benchmarks.paper.plots --out DIR --img docs/img/paper --table

* ``{tag}.png`` for a training experiment (``sudoku``, ``dfl``): the training loss step by
  step (averaged over a tenth of an epoch) and the test error after each epoch, the line
  the mean over seeds and the band their minimum to maximum (the shape of the paper's
  Fig. 2), and the mean forward and backward seconds of a training step; one row of panels
  per size.
* ``scaling.png``: median forward and backward seconds of a training step against the
  problem size, one line per method (the shape of the paper's Fig. 3); a hollow marker is a
  size where the method did not finish its run (its completed steps' median), and the
  legend says from which size on a method did not finish.
* ``--table``: the final numbers of every experiment as a Markdown table (printed): per
  size and method, the final training loss and test error (mean over seeds, and their
  range), the mean test error over the last quarter of the epochs, the median forward and
  backward seconds of a step, and the failed steps of each run.

Nothing here runs a solver: the figures are functions of the CSV files alone.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .common import DEFAULT_OUT

#: training steps left out of the per-step times of a run: our layers spend their first
#: calls choosing between a thread pool and one thread, and every layer fills caches
WARMUP_STEPS = 4

YLABEL = {
    "sudoku": ("training loss (MSE)", "test error (boards with a wrong cell)"),
    "dfl": ("training decision loss mean(y * z)", "test regret"),
}
STYLE = {
    "ffoqp": ("C0", "-"),
    "ffolayer": ("C1", "-"),
    "ffoqp-kkt": ("C2", "--"),
    "ffolayer-kkt": ("C4", "--"),
    "qpth": ("C3", ":"),
    "cvxpylayers": ("C5", ":"),
}


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _style(method: str, k: int):
    return STYLE.get(method, (f"C{6 + k % 4}", "-."))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _methods(rows) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _step_losses(out: Path, tag: str) -> dict:
    """(method, size) -> {seed: [loss of each step, NaN for a failed one]}."""
    res: dict = defaultdict(lambda: defaultdict(list))
    for r in _read(out / f"{tag}_steps.csv"):
        res[(r["method"], int(r["size"]))][r["seed"]].append(_num(r["loss"]))
    return res


def _loss_curve(ax, by_seed: dict, per_epoch: int, color, ls, name) -> None:
    """Training loss against the epoch, step by step: each seed's losses averaged over a
    window of a tenth of an epoch (failed steps left out), then the mean over seeds as the
    line and their minimum to maximum as the band."""
    import numpy as np

    if not by_seed:
        return
    w = max(1, per_epoch // 10)
    curves = []
    for losses in by_seed.values():
        v = np.asarray(losses, dtype=float)
        ok = ~np.isnan(v)
        num = np.convolve(np.where(ok, v, 0.0), np.ones(w), "valid")
        den = np.convolve(ok.astype(float), np.ones(w), "valid")
        curves.append(np.where(den > 0, num / np.maximum(den, 1), np.nan))
    length = min(len(c) for c in curves)
    if length == 0:
        return
    stack = np.array([c[:length] for c in curves])
    x = (np.arange(length) + w) / per_epoch
    ax.plot(x, np.nanmean(stack, 0), color=color, ls=ls, lw=1.2, label=name)
    if len(stack) > 1:
        ax.fill_between(x, np.nanmin(stack, 0), np.nanmax(stack, 0), color=color, alpha=0.15)


def plot_curves(out: str | Path, tag: str, img: str | Path | None = None) -> Path:
    """``{tag}.png`` from ``{tag}_epochs.csv`` (see the module docstring)."""
    out = Path(out)
    rows = _read(out / f"{tag}_epochs.csv")
    runs = _read(out / f"{tag}_runs.csv")
    plt = _plt()
    sizes = sorted({int(r["size"]) for r in rows}) or [0]
    fig, axes = plt.subplots(len(sizes), 3, figsize=(15, 4.2 * len(sizes)), squeeze=False)
    ylab = YLABEL.get(tag, ("training loss", "test error"))
    step_losses = _step_losses(out, tag)
    for i, size in enumerate(sizes):
        sub = [r for r in rows if int(r["size"]) == size]
        label = sub[0]["label"] if sub else ""
        per_epoch = max([int(r["steps"]) for r in sub if r["epoch"] == "1"] or [1])
        methods = _methods(sub)
        for k, m in enumerate(methods):
            color, ls = _style(m, k)
            fails = sum(
                int(_num(r.get("failed_steps")) or 0)
                for r in runs
                if r["method"] == m and r["size"] == str(size)
            )
            name = m + (f" ({fails} failed steps)" if fails else "")
            _loss_curve(axes[i][0], step_losses.get((m, size), {}), per_epoch, color, ls, name)
            by_epoch = defaultdict(list)
            for r in sub:
                if r["method"] == m and not math.isnan(_num(r["test_error"])):
                    by_epoch[int(r["epoch"])].append(_num(r["test_error"]))
            if by_epoch:
                ep = sorted(by_epoch)
                mean = [statistics.fmean(by_epoch[e]) for e in ep]
                ax = axes[i][1]
                ax.plot(ep, mean, color=color, ls=ls, marker="o", ms=3, label=name)
                if max(len(v) for v in by_epoch.values()) > 1:
                    ax.fill_between(
                        ep,
                        [min(by_epoch[e]) for e in ep],
                        [max(by_epoch[e]) for e in ep],
                        color=color,
                        alpha=0.15,
                    )
            steps = [r for r in sub if r["method"] == m and int(r["epoch"]) > 0]
            n_ok = sum(_num(r["steps"]) - _num(r["failed_steps"]) for r in steps)
            if n_ok > 0:
                fwd = sum(_num(r["fwd_s"]) for r in steps) / n_ok
                bwd = sum(_num(r["bwd_s"]) for r in steps) / n_ok
                ax = axes[i][2]
                ax.bar(k - 0.2, fwd, 0.4, color=color, alpha=0.9)
                ax.bar(k + 0.2, bwd, 0.4, color=color, alpha=0.45, hatch="//")
        for j in range(2):
            ax = axes[i][j]
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylab[j])
            ax.set_title(f"{tag} {label}: {ylab[j].split(' (')[0]}")
            ax.grid(True, alpha=0.3)
            # log scales where the values span decades: Sudoku's loss, DFL's regret
            if ax.lines and (tag == "sudoku") == (j == 0):
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=8)
        ax = axes[i][2]
        ax.set_xticks(range(len(methods)), methods, rotation=25, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds per training step")
        ax.set_title(f"{tag} {label}: forward (solid) / backward (hatched)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(img or out) / f"{tag}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def step_times(out: str | Path, tag: str) -> dict[tuple[str, int], dict]:
    """(method, size) -> median forward and backward seconds of its successful steps after
    the first :data:`WARMUP_STEPS` of each run, the step count, and the run status."""
    out = Path(out)
    per: dict = defaultdict(lambda: {"fwd": [], "bwd": []})
    seen: dict = defaultdict(int)
    for r in _read(out / f"{tag}_steps.csv"):
        key = (r["method"], int(r["size"]))
        run = key + (r["seed"],)
        seen[run] += 1
        if r["failed"] == "1" or seen[run] <= WARMUP_STEPS:
            continue
        per[key]["fwd"].append(_num(r["fwd_s"]))
        per[key]["bwd"].append(_num(r["bwd_s"]))
    status: dict = {}
    for r in _read(out / f"{tag}_runs.csv"):
        key = (r["method"], int(r["size"]))
        if status.get(key, "ok") == "ok":
            status[key] = r["status"]
    res = {}
    for key in set(per) | set(status):
        f, b = per[key]["fwd"], per[key]["bwd"]
        res[key] = {
            "fwd": statistics.median(f) if f else math.nan,
            "bwd": statistics.median(b) if b else math.nan,
            "steps": len(f),
            "status": status.get(key, "ok"),
        }
    return res


def plot_scaling(out: str | Path, tag: str = "scaling", img: str | Path | None = None) -> Path:
    """``{tag}.png``: per-step forward and backward seconds against the size."""
    out = Path(out)
    times = step_times(out, tag)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = list(dict.fromkeys(m for m, _ in sorted(times, key=lambda k: k[1])))
    runs = _read(out / f"{tag}_runs.csv")
    order = _methods(runs) or methods
    for k, m in enumerate(order):
        color, ls = _style(m, k)
        pts = sorted((s, v) for (mm, s), v in times.items() if mm == m)
        dnf = [s for s, v in pts if v["status"].startswith(("did not finish", "crashed"))]
        skipped = [s for s, v in pts if v["status"].startswith("skipped")]
        name = m
        if dnf:
            name += f" (did not finish from n = {min(dnf)})"
        elif skipped and not any(v["steps"] for _, v in pts):
            name += " (skipped)"
        for j, col in enumerate(("fwd", "bwd")):
            ok = [(s, v[col]) for s, v in pts if v["steps"] and v["status"] == "ok"]
            part = [(s, v[col]) for s, v in pts if v["steps"] and v["status"] != "ok"]
            ax = axes[j]
            if ok:
                ax.plot(*zip(*ok), color=color, ls=ls, marker="o", label=name)
            if part:
                ax.plot(
                    *zip(*part), color=color, ls="none", marker="o", mfc="none", ms=9,
                    label=None if ok else name,
                )  # fmt: skip
    for j, what in enumerate(("forward", "backward")):
        ax = axes[j]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("problem size n (QP variables)")
        ax.set_ylabel(f"{what} seconds per training step (median)")
        ax.set_title(f"{what} time against size (hollow: run did not finish)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend below both panels, clear of the points
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 3) + 0.02, 1, 1))
    path = Path(img or out) / f"{tag}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _late_errors(rows: list[dict]) -> dict:
    """(size, method) -> mean test error over the last quarter of the epochs and the seeds
    (less noisy than the last epoch alone), as text."""
    vals: dict = defaultdict(dict)
    for r in rows:
        if int(r["epoch"]) > 0 and not math.isnan(_num(r["test_error"])):
            vals[(int(r["size"]), r["method"])][(r["seed"], int(r["epoch"]))] = _num(
                r["test_error"]
            )
    res = {}
    for key, v in vals.items():
        last = max(e for _, e in v)
        pick = [x for (_, e), x in v.items() if e > 0.75 * last]
        res[key] = f"{statistics.fmean(pick):.4g}"
    return res


def table(out: str | Path) -> str:
    """The final numbers of every experiment found under ``out``, as Markdown."""
    out = Path(out)
    lines = [
        "| experiment | size | method | runs ok | final train loss | final test error | "
        "test error, last quarter | fwd s/step | bwd s/step | failed steps (per run) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tag in ("sudoku", "dfl", "scaling"):
        runs = _read(out / f"{tag}_runs.csv")
        if not runs:
            continue
        times = step_times(out, tag)
        late = _late_errors(_read(out / f"{tag}_epochs.csv"))
        groups = defaultdict(list)
        labels = {}  # a skipped run has no label of its own: take its size's
        for r in runs:
            groups[(int(r["size"]), r["method"])].append(r)
            if r.get("label"):
                labels[int(r["size"])] = r["label"]
        for (size, m), rs in sorted(groups.items(), key=lambda kv: kv[0][0]):

            def span(col, rs=rs):
                v = [_num(r[col]) for r in rs if not math.isnan(_num(r.get(col)))]
                if not v:
                    return "-"
                mean = statistics.fmean(v)
                return f"{mean:.4g}" + (f" ({min(v):.4g}-{max(v):.4g})" if len(v) > 1 else "")

            t = times.get((m, size), {})

            def sec(col, t=t):
                v = t.get(col, math.nan)
                return "-" if math.isnan(v) else f"{v:.3g}"

            ok = sum(r["status"] == "ok" for r in rs)
            fails = ", ".join(r.get("failed_steps") or "-" for r in rs)
            statuses = sorted({r["status"] for r in rs if r["status"] != "ok"})
            label = rs[0].get("label") or labels.get(size, size)
            lines.append(
                f"| {tag} | {label} | {m} | {ok}/{len(rs)} | {span('final_train_loss')} | "
                f"{span('final_test_error')} | {late.get((size, m), '-')} | "
                f"{sec('fwd')} | {sec('bwd')} | {fails} | {'; '.join(statuses) or 'ok'} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder of the CSV files")
    ap.add_argument("--img", default=None, help="folder for the PNG files (default: --out)")
    ap.add_argument("--table", action="store_true", help="print the Markdown summary table")
    args = ap.parse_args(argv)
    out = Path(args.out)
    made = []
    for tag in ("sudoku", "dfl"):
        if (out / f"{tag}_epochs.csv").exists():
            made.append(plot_curves(out, tag, args.img))
    if (out / "scaling_steps.csv").exists():
        made.append(plot_scaling(out, "scaling", args.img))
    for p in made:
        print(f"wrote {p}")
    if not made:
        print(f"no experiment CSV files under {out}", file=sys.stderr)
        return 1
    if args.table:
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
