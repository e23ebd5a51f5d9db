"""The wheel: conf/ (repository root) ships inside it as otmf_exp.conf, and a non-editable install runs
``python -m otmf_exp.run`` from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("source")  # a copy: building never writes build/ into the checkout
    for name in ("pyproject.toml", "README.md", "src", "conf"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(src),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("otmf_exp-*.whl")
    return whl


def test_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        f"otmf_exp/{p.relative_to(ROOT / 'src' / 'otmf_exp').as_posix()}"
        for p in (ROOT / "src" / "otmf_exp").rglob("*.py")
    }
    configs = {
        f"otmf_exp/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert modules and configs
    assert modules - names == set(), "a package is missing from pyproject's [tool.setuptools] packages"
    assert configs - names == set()
    assert "otmf_exp/data/reference_numbers.csv" in names


def test_installed_wheel_runs_from_any_directory(wheel, tmp_path, zoo):
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import otmf_exp.conf, otmf_exp.run; print(otmf_exp.conf.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(site)  # the installed copy, not the checkout
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "otmf_exp.run",
        "method=task_arithmetic",
        "task_order=[rot90,flip]",
        f"out_dir={out}",
        "progress=false",
    ]
    r = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "task_arithmetic" and m["order"] == ["rot90", "flip"]
