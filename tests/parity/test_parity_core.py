"""The parity diff, verdict and report logic, and the case registry (no FusionBench venv needed)."""

from __future__ import annotations

import ast
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

from otmf_exp.parity import core
from otmf_exp.parity.core import Case

SRC = Path(__file__).resolve().parents[2] / "src"


def _case(bound: float = 1e-6, name: str = "c") -> Case:
    return Case(name, "m", "joint", "ref.Cls", "merged weights", bound, "why", lambda z, w: {}, "mod:fn")


def test_diff_is_the_max_over_the_union_of_keys_and_names_the_worst():
    a = {"x": torch.zeros(3), "y": torch.ones(2)}
    b = {"x": torch.tensor([0.0, 0.5, 0.0]), "y": torch.ones(2) * 1.25}
    d = core.diff(a, b)
    assert d.message is None and d.max_abs_diff == pytest.approx(0.5) and d.worst_key == "x"
    assert core.diff(a, {k: v.clone() for k, v in a.items()}).max_abs_diff == 0.0


def test_diff_fails_on_keys_shapes_and_non_finite_values():
    a = {"x": torch.zeros(3), "y": torch.zeros(2)}
    only = core.diff(a, {"x": torch.zeros(3), "z": torch.zeros(2)})
    assert (
        only.max_abs_diff is None
        and "only ours: y" in only.message
        and "only the reference: z" in only.message
    )
    shape = core.diff(a, {"x": torch.zeros(4), "y": torch.zeros(2)})
    assert shape.max_abs_diff is None and "shape of x" in shape.message
    nan = core.diff(a, {"x": torch.tensor([0.0, math.nan, 0.0]), "y": torch.zeros(2)})
    assert nan.max_abs_diff is None and "non-finite value in x (reference)" in nan.message
    inf = core.diff({"x": torch.tensor([math.inf])}, {"x": torch.tensor([math.inf])})
    assert inf.max_abs_diff is None and "(ours)" in inf.message
    assert core.diff({}, {}).message == "no tensors to compare"


def test_judge_passes_only_within_the_bound():
    case = _case(bound=1e-6)
    assert core.judge(case, core.Diff(1e-6, "k", None)).ok
    over = core.judge(case, core.Diff(2e-6, "k", None))
    assert not over.ok and "> bound" in over.message
    assert not core.judge(case, core.Diff(None, None, "keys differ")).ok
    failed = core.judge(case, None, "reference failed: boom")
    assert not failed.ok and failed.max_abs_diff is None and failed.message == "reference failed: boom"
    assert not core.judge(_case(bound=0.0), core.Diff(math.nan, "k", None)).ok


def test_table_and_markdown_show_every_row_and_each_failure():
    rows = [
        core.judge(_case(name="good"), core.Diff(0.0, "k", None)).as_dict(),
        core.judge(_case(name="bad"), core.Diff(1.0, "k", None)).as_dict(),
    ]
    text = core.table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "settings", "reference", "compared", "max", "|Δ|", "bound", "ok"]
    assert lines[2].split()[-1] == "ok" and lines[3].split()[-1] == "FAIL"
    assert "FAIL bad: max |Δ| 1 > bound 1e-06" in text
    md = core.markdown(rows).splitlines()
    assert len(md) == 4 and md[0].startswith("| method |") and md[3].endswith("| FAIL |")
    assert "`ref.Cls`" in md[2]
    assert (
        core.fmt(None) == "—"
        and core.fmt(0.0) == "0"
        and core.fmt(1.2e-5) == "1.2e-05"
        and core.fmt(0.25) == "0.25"
    )


def test_perturbation_hook_parses_and_scales_one_tensor():
    assert core.perturbation(None) is None and core.perturbation("") is None
    assert core.perturbation("dop_f64:1.0001") == ("dop_f64", 1.0001)
    for bad in ("ties", "ties:", ":2", "ties:x", "ties:nan"):
        with pytest.raises(ValueError, match="OTMF_PARITY_PERTURB"):
            core.perturbation(bad)
    t = {"b": torch.ones(2), "a": torch.ones(2), "i": torch.ones(2, dtype=torch.long)}
    out = core.perturb(t, 2.0)
    assert torch.equal(out["a"], torch.full((2,), 2.0)) and torch.equal(out["b"], t["b"])
    assert core.diff(t, out).max_abs_diff == 1.0


def _reference_modules() -> dict[str, Path]:
    ref = SRC / "otmf_exp" / "parity" / "reference"
    return {f"otmf_exp.parity.reference.{p.stem}": p for p in ref.glob("*.py") if p.stem != "__init__"}


def test_every_case_is_unique_and_points_at_a_reference_function():
    from otmf_exp.parity.driver import AUTHOR_MODULES, MODULES, collect

    cases = collect(MODULES + AUTHOR_MODULES)
    assert len({c.name for c in cases}) == len(cases) and len(cases) >= 15
    modules = _reference_modules()
    for c in cases:
        mod, _, fn = c.theirs.partition(":")
        assert mod in modules, c.theirs
        tree = ast.parse(modules[mod].read_text())
        assert fn in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, c.theirs
        assert callable(c.ours) and c.bound >= 0 and c.why and c.dtype in ("float32", "float64")
        if c.dtype == "float64":
            assert c.bound <= 1e-10, c.name


def test_reference_modules_import_only_what_the_fusionbench_venv_has():
    allowed = {"torch", "transformers", "safetensors", "fusion_bench", "fusion_bench_config", "omegaconf"}
    allowed |= {"lightning", "peft"}  # FusionBench 0.2.33's own dependencies (its fabric, its LoRA)
    allowed |= set(sys.stdlib_module_names)
    # parity-authors' child processes import the clones' own code (OT_fusion's src/ and scripts/)
    clones = {"src", "clip_task_wise_adamerging_sequential", "clip_layer_wise_adamerging_sequential"}
    clones |= {"clip_optimal_transport_route"}  # authors_otmf: the OTMF authors' mask-training script
    for name, path in _reference_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [node.module or ""]
            else:
                continue
            for r in roots:
                ok = r.split(".")[0] in allowed or r.startswith("otmf_exp.parity.reference")
                child = name.endswith((".authors_adamerging", ".authors_otmf"))  # run in child processes
                ok = ok or (child and r.split(".")[0] in clones)
                assert ok, f"{name} imports {r}"
    for pkg in ("otmf_exp", "otmf_exp.parity", "otmf_exp.parity.reference"):
        tree = ast.parse(Path(importlib.util.find_spec(pkg).origin).read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not imports, f"{pkg}/__init__.py must stay import-free"


def test_driver_refuses_bad_input_with_one_line(capsys, tmp_path):
    from otmf_exp.parity.driver import main

    assert main(["--python", str(tmp_path / "nope")]) == 2
    assert "no reference Python" in capsys.readouterr().err
    assert main(["--python", "/bin/sh", "--cases", "no_such_case"]) == 2
    assert "unknown parity case(s) no_such_case" in capsys.readouterr().err
    assert main(["--md", str(tmp_path / "missing.json")]) == 2


def test_authors_without_clones_says_how_to_get_them(capsys, monkeypatch):
    from otmf_exp.parity.driver import main

    monkeypatch.delenv("OTMF_REPO", raising=False)
    monkeypatch.delenv("MINGLE_REPO", raising=False)
    assert main(["--authors"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "git clone https://github.com/37ETs/OT_fusion" in out[0]
    assert "zihuanqiu/MINGLE" in out[0]


def test_md_renders_the_committed_report(capsys):
    from otmf_exp.parity.driver import main

    report = SRC.parent / "parity.json"
    assert main(["--md", str(report)]) == 0
    md = capsys.readouterr().out.splitlines()
    import json

    rows = json.loads(report.read_text())["rows"]
    assert len(md) == 2 + len(rows) and all(r["ok"] for r in rows)


def test_the_authors_side_loads_a_file_of_the_clone_or_says_what_is_missing(tmp_path, monkeypatch):
    from otmf_exp.parity.reference.authors import by_path

    monkeypatch.delenv("MINGLE_REPO", raising=False)
    with pytest.raises(RuntimeError, match="MINGLE_REPO is not set"):
        by_path("MINGLE_REPO", "a.py")
    monkeypatch.setenv("MINGLE_REPO", str(tmp_path))
    with pytest.raises(RuntimeError, match="MINGLE_REPO has no a.py: is it a clone of the right repository"):
        by_path("MINGLE_REPO", "a.py")
    (tmp_path / "a.py").write_text("VALUE = 42\n")
    assert by_path("MINGLE_REPO", "a.py").VALUE == 42


def test_the_authors_adamerging_layout_is_one_for_both_sides(monkeypatch, tmp_path):
    from otmf_exp.parity.reference import authors_adamerging as ref

    keys = ["a.weight", "layers.0.k_proj.bias", "b.bias"]
    layer = torch.arange(6.0).reshape(2, 3)  # [2 pools, P keys], as merged
    x1, x2, x3 = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)
    out = ref.named(
        [layer, torch.tensor([0.5, 0.75])],
        [{"a.weight": torch.ones(1)}, {"a.weight": torch.zeros(1)}],
        2,
        {"a.weight": torch.ones(1)},
        [("rot90", x1), ("flip", x2), ("rot90", x3)],
        keys,
    )
    assert out["coef/0000"].tolist() == [0.0, 2.0, 3.0, 5.0]  # the k_proj.bias column is left out
    assert out["coef/0001"].tolist() == [0.5, 0.75]  # task-wise λ unchanged
    assert (
        set(out) >= {"tau/2/a.weight", "tau/3/a.weight", "weights/a.weight"} and "tau/1/a.weight" not in out
    )
    assert torch.equal(out["batch/rot90/0001"], x3) and torch.equal(out["batch/flip/0000"], x2)
    monkeypatch.delenv("OTMF_REPO", raising=False)
    with pytest.raises(RuntimeError, match="OTMF_REPO is not set"):
        ref.otmf_task(tmp_path, tmp_path)
