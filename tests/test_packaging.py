"""Packaging: the wheel's package list names every package folder, and the import names
are ours (no generic top-level name such as ``conformance``)."""

from __future__ import annotations

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    config = _config()
    mapped = config.get("package-dir", {})
    folder_of = {name: mapped.get(name, name) for name in config["packages"]}
    listed = {folder.replace(".", "/") for folder in folder_of.values()}
    # a subpackage of a mapped package lives inside its parent's folder
    for name in config["packages"]:
        head, _, tail = name.partition(".")
        if tail and head in config.get("package-dir", {}):
            listed.add(config["package-dir"][head] + "/" + tail.replace(".", "/"))
    found = set()
    for top in {f.split("/")[0] for f in listed}:
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(str(init.parent.relative_to(ROOT)))
    assert found <= listed, f"package folders missing from pyproject: {sorted(found - listed)}"


def test_import_names_are_ours():
    names = set(_config()["packages"])
    assert all(
        n.split(".")[0] in {"ffo", "ffo_core", "ffo_backends", "ffo_conformance"} for n in names
    )


def test_import_ffo_matches_ffo_core():
    import ffo
    import ffo_core

    assert ffo.FFOLayer is ffo_core.FFOLayer
    assert ffo.__version__ == ffo_core.__version__


def test_typed_markers_and_licence():
    for package in ("ffo", "ffo_core", "ffo_backends", "conformance"):
        assert (ROOT / package / "py.typed").exists()
    assert "Apache License" in (ROOT / "LICENSE").read_text()
