"""Run one module's parity rows directly (ours here, theirs in the FusionBench venv ``.venv-parity``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv-parity" / "bin" / "python"


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from otmf_exp.offline.zoo import DigitsZoo

    out = tmp_path_factory.mktemp("parity") / "zoo"
    DigitsZoo(progress=False).export(out)
    return out


def check_rows(module: str, zoo: Path, work: Path) -> None:
    """Every ``CASES`` row of ``otmf_exp.parity.<module>`` within its bound."""
    from otmf_exp.parity.core import run_case

    assert PY.exists(), f"{PY} missing: make parity creates the FusionBench venv"
    cases = importlib.import_module(f"otmf_exp.parity.{module}").CASES
    assert cases
    bad = []
    for case in cases:
        res = run_case(case, zoo, work / case.name, str(PY))
        if not res["ok"]:
            bad.append(res)
    assert not bad, bad
