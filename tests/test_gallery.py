"""The examples gallery (examples/gallery) in its smoke mode: each script runs, writes its
figure where ``--out`` says, and the independent check it prints holds (read back from its
output): isotonic regression against pool-adjacent-violators, the transport plan against
Sinkhorn and its gradient against finite differences, the MPC and denoising gradients
against the exact KKT mode."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

SCRIPTS = ["mpc", "portfolio", "optimal_transport", "denoising", "isotonic"]


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the output:\n{text}"
    return float(m.group(1))


@pytest.mark.parametrize("name", SCRIPTS)
def test_gallery_smoke(name, tmp_path, capsys):
    module = importlib.import_module(f"examples.gallery.{name}")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    png = tmp_path / f"{name}.png"
    assert png.stat().st_size > 10_000 and f"wrote {png}" in out
    if name == "isotonic":
        # Clarabel's default accuracy on the projection
        assert number(r"pool-adjacent-violators to (\S+)", out) < 1e-3
    elif name == "optimal_transport":
        assert number(r"equals Sinkhorn's to (\S+)", out) < 1e-5
        assert number(r"cosine (\S+),", out) > 0.999
    elif name == "mpc":
        assert number(r"exact KKT, cosine (\S+)", out) > 0.9999
    elif name == "denoising":
        fo = number(r"first-order (\S+),", out)
        ex = number(r"exact KKT (\S+)", out)
        assert abs(fo - ex) <= 1e-3 * abs(ex)
    elif name == "portfolio":
        assert "learnt risk aversion gamma" in out


def test_gallery_default_out_is_ignored_by_git():
    """Without --out, figures go to bench_out/gallery, which .gitignore ignores."""
    root = Path(__file__).resolve().parents[1]
    for name in SCRIPTS:
        module = importlib.import_module(f"examples.gallery.{name}")
        assert module.DEFAULT_OUT == root / "bench_out" / "gallery"
    assert "bench_out/" in (root / ".gitignore").read_text().splitlines()
