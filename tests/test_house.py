"""House rules of the layout: one-line module docstrings, no stdlib shadowing, kind = module name,
merging/ as one folder per family, no references to files outside the repository."""

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
    roles = {
        "merging",
        "models",
        "data",
        "offline",
        "hub",
        "tracking",
        "reporting",
        "runtime",
        "benchmark",
        "parity",
    }
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
    for name, cls in METHODS.items():  # merging/: config name -> merging/<family>/<name>.py (below)
        assert cls.__module__.startswith("otmf_exp.merging.") and cls.__module__.endswith(f".{name}"), name
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


# ---- merging/: one folder per family -------------------------------------------------------------------
MERGING = PACKAGE / "merging"
#: the top of merging/: the registry, the contract and what more than one family uses
SHARED = {"__init__", "base", "task_vectors", "sparsify", "adaptation", "lora_moe"}
FAMILIES = sorted(p.name for p in MERGING.iterdir() if (p / "__init__.py").is_file())


def _merging_imports(path: Path) -> set[str]:
    """The ``otmf_exp.merging.*`` modules a file imports (top-level and function-local imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the house style is absolute imports)"
            names = [node.module or ""]
        found |= {n for n in names if n.startswith("otmf_exp.merging.")}
    return found


def test_merging_top_level_holds_only_the_shared_modules():
    assert {p.stem for p in MERGING.glob("*.py")} == SHARED
    assert FAMILIES, "no family folders under merging/"


def test_every_method_lives_in_its_family_folder_under_its_config_name():
    """The naming rule: ``method=<name>`` -> ``conf/method/<name>.yaml`` -> ``merging/<family>/<name>.py``
    holding the registered class; a preset YAML (``c_adamerging``) names an existing method."""
    from otmf_exp.config import method_of_yaml, method_yamls
    from otmf_exp.merging import METHODS

    for name, cls in METHODS.items():
        homes = [f for f in FAMILIES if (MERGING / f / f"{name}.py").is_file()]
        assert len(homes) == 1, f"{name}: expected one merging/<family>/{name}.py, found {homes}"
        assert cls.__module__ == f"otmf_exp.merging.{homes[0]}.{name}", name
    for yaml_name in method_yamls():
        assert method_of_yaml(yaml_name) in METHODS, yaml_name
    for family in FAMILIES:  # a family is a folder of methods, not a dumping ground
        assert any((MERGING / family / f"{n}.py").is_file() for n in METHODS), family


@pytest.mark.parametrize("family", FAMILIES)
def test_no_family_imports_another_familys_modules(family):
    """A family imports only itself and the shared top of merging/; shared code moves to the top."""
    offenders = []
    for path in sorted((MERGING / family).rglob("*.py")):
        for mod in _merging_imports(path):
            top = mod.split(".")[2]
            if top not in SHARED and top != family:
                offenders.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert offenders == []


def test_shared_merging_modules_import_no_family():
    offenders = [
        f"{name}.py imports {mod}"
        for name in SHARED - {"__init__"}
        for mod in _merging_imports(MERGING / f"{name}.py")
        if mod.split(".")[2] not in SHARED
    ]
    assert offenders == []
