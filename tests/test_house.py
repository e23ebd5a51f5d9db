"""House rules of the layout: one-line module docstrings, no stdlib shadowing, kind = module name, no
references to files outside the repository."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "otmf_exp"
PY_FILES = sorted(p for d in ("src", "scripts", "tests", "conf") for p in (ROOT / d).rglob("*.py"))


def test_the_design_card_top_level():
    for name in ("conf", "src/otmf_exp", "scripts", "tests", "pyproject.toml", "Makefile"):
        assert (ROOT / name).exists(), name
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "config.py", "errors.py", "run.py", "runner.py", "schema.py"]
    roles = {"merging", "models", "data", "offline", "hub", "tracking", "reporting", "runtime", "benchmark"}
    assert roles == {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_opens_with_a_one_line_purpose(path):
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert doc and doc.strip().splitlines()[0].strip(), f"{path} has no opening docstring"


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert not names & set(sys.stdlib_module_names)


def test_config_kinds_share_their_module_name():
    from otmf_exp.data import TASK_KINDS
    from otmf_exp.merging import METHODS
    from otmf_exp.models import BACKBONES

    def module_exists(kind: str, *packages: str) -> bool:
        return any((PACKAGE / pkg / f"{kind}.py").is_file() for pkg in packages)

    for kind in BACKBONES:
        assert module_exists(kind, "models", "offline"), kind
    for kind in TASK_KINDS:
        assert module_exists(kind, "data", "offline"), kind
    for name in METHODS:
        assert module_exists(name, "merging"), name
    for logger in (ROOT / "conf" / "logger").glob("*.yaml"):
        assert module_exists(logger.stem, "tracking"), logger.stem


def test_no_reference_to_files_outside_the_repository():
    pattern = re.compile(r"shared/spec|shared/DESIGN|docs/readme")
    offenders = []
    for path in [*PY_FILES, *(ROOT / "conf").rglob("*.yaml")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and path.name != "test_house.py":
                offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert offenders == []
