"""End to end against FusionBench (marker ``parity``: needs ``.venv-parity``; ``make parity-test``):
a row passes, and the same row with one of our tensors scaled by 1 + 1e-4 fails and exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv-parity" / "bin" / "python"
pytestmark = pytest.mark.parity


def _run(tmp_path: Path, perturb: str | None) -> subprocess.CompletedProcess:
    assert PY.exists(), "no .venv-parity: run `make parity-test` (it creates the FusionBench venv)"
    env = {k: v for k, v in os.environ.items() if k != "OTMF_PARITY_PERTURB"}
    if perturb:
        env["OTMF_PARITY_PERTURB"] = perturb
    cmd = [sys.executable, "-m", "otmf_exp.parity", "--python", str(PY), "--cases", "magmax"]
    cmd += ["--work", str(tmp_path / "work"), "--json", str(tmp_path / "p.json")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_a_perturbed_row_fails_and_the_driver_exits_1(tmp_path):
    clean = _run(tmp_path, None)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "FAIL" not in clean.stdout and "magmax" in clean.stdout
    bad = _run(tmp_path, "magmax:1.0001")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL magmax: max |Δ|" in bad.stdout
