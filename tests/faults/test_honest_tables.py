"""Issue 39 class 5 (honest tables, by declaration) and the reporting side of classes 3 and 6:
``result_neutral`` fields never split rows; runs of other code versions or model files are never
pooled silently; an ACC outside [0, 100] is refused with a note; a run dir's name cannot inject a
LaTeX line; ``--out`` planted with links is refused; bad CLI arguments are one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from faults.conftest import one_error, untouched
from otmf_exp.reporting import tables
from otmf_exp.reporting.runs import load_runs


@pytest.fixture
def tree(digits_multirun, tmp_path) -> Path:
    out = tmp_path / "tree"
    shutil.copytree(digits_multirun, out)
    return out


def _runs(tree: Path, method: str) -> list[Path]:
    return sorted(
        f.parent for f in tree.rglob("metrics.json") if json.loads(f.read_text())["method"] == method
    )


def _edit_metrics(run: Path, **change) -> None:
    f = run / "metrics.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **change}))


def _make_tables(run_cli, *argv: str):
    import runpy

    mod = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "make_tables.py"))
    return run_cli(mod["main"], *argv)


def _rows(tree: Path, notes: list[str] | None = None) -> dict[tuple[str, str], int]:
    summary = tables.aggregate(load_runs([tree], notes=notes))
    return {(m, v): n for m, v, n in zip(summary["method"], summary["variant"], summary["n"])}


def test_a_result_neutral_lever_does_not_split_rows(tree):
    from otmf_exp.config import neutral_config_keys

    assert "method.offload" in neutral_config_keys(tables=True)  # declared on OTMFConfig, no hand list
    src = _runs(tree, "averaging")[0]
    extra = tree / "offloaded"
    shutil.copytree(src, extra)
    text = (extra / "config.yaml").read_text()
    assert "\nmethod:\n" in text and "seed: 0" in text
    text = text.replace("\nmethod:\n", "\nmethod:\n  offload: true\n  offload_dir: /elsewhere\n")
    (extra / "config.yaml").write_text(text.replace("seed: 0", "seed: 7"))  # a replicate, not a duplicate
    _edit_metrics(extra, seed=7)
    assert _rows(tree) == {("averaging", ""): 3, ("task_arithmetic", ""): 2}


def test_acc_outside_0_100_is_refused_with_a_note(tree):
    run = _runs(tree, "averaging")[0]
    _edit_metrics(run, acc=250.0)
    notes: list[str] = []
    runs = load_runs([tree], notes=notes)
    summary = tables.aggregate(runs)
    row = summary[summary["method"] == "averaging"].iloc[0]
    assert row["n"] == 1 and row["acc_mean"] <= 100
    got = tables.table_notes(runs)
    assert any("acc = 250 is outside [0, 100]" in n and str(run) in n for n in got), got


def test_other_model_files_or_code_versions_are_never_pooled_silently(tree):
    a, b = _runs(tree, "averaging")
    doc = json.loads((a / "metrics.json").read_text())
    task = next(iter(doc["provenance"]["models"]))
    doc_b = json.loads((b / "metrics.json").read_text())
    doc_b["provenance"]["models"][task] = "f" * 64
    doc_b["provenance"]["code_version"] = "0123456789ab-other"
    (b / "metrics.json").write_text(json.dumps(doc_b))
    got = tables.table_notes(load_runs([tree]))
    assert any("averaging" in n and "2 different code versions" in n for n in got), got
    assert any("averaging" in n and f"different model files ({task})" in n for n in got), got
    assert not any("task_arithmetic" in n and "pools" in n for n in got), got


def test_a_run_dir_name_cannot_inject_a_latex_line(tree, tmp_path, run_cli):
    bad = tree / "x\n\\input{evil}"
    bad.mkdir()
    (bad / "metrics.json").write_text("[]")  # unreadable: the note names the dir
    out = tmp_path / "tables"
    rc, _, err = _make_tables(run_cli, str(tree), "--out", str(out), "--quiet")
    assert rc == 0, err[-5:]
    tex = (out / "tables.tex").read_text()
    assert "input{evil}" in tex  # the note is there ...
    assert all(line.startswith("%") for line in tex.splitlines() if "input{evil}" in line)  # ... inert
    md = (out / "tables.md").read_text()
    assert not any(line.startswith("\\input") for line in md.splitlines())


def test_make_tables_never_writes_through_a_planted_link(tree, tmp_path, run_cli):
    out = tmp_path / "tables"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "tables.md").symlink_to(victim)
    with untouched(victim):
        rc, _, err = _make_tables(run_cli, str(tree), "--out", str(out), "--quiet")
    one_error(err, 2, rc, "is a symbolic link")
    link_dir = tmp_path / "linked"
    link_dir.symlink_to(tmp_path / "victim_dir", target_is_directory=True)
    (tmp_path / "victim_dir").mkdir()
    rc, _, err = _make_tables(run_cli, str(tree), "--out", str(link_dir), "--quiet")
    one_error(err, 2, rc, "is a symbolic link")
    assert not any((tmp_path / "victim_dir").iterdir())


def test_plot_never_writes_through_a_planted_link(tree, tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    import runpy

    mod = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "plot.py"))
    out = tmp_path / "plots"
    rc, stdout, err = run_cli(mod["main"], str(tree), "--out", str(out), "--format", "png")
    assert rc == 0, err[-5:]
    first = Path(stdout.splitlines()[0])
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    first.unlink()
    first.symlink_to(victim)
    with untouched(victim):
        rc, _, err = run_cli(mod["main"], str(tree), "--out", str(out), "--format", "png")
    one_error(err, 2, rc, "is a symbolic link")


@pytest.mark.parametrize("bad", [["--decimals", "-1"], ["--decimals", "99"]])
def test_make_tables_bad_decimals_is_one_line(tree, tmp_path, run_cli, bad):
    rc, _, err = _make_tables(run_cli, str(tree), "--out", str(tmp_path / "t"), *bad)
    assert rc == 2 and not any("Traceback" in s for s in err), err[-5:]
    assert "--decimals must be an integer in [0, 10]" in err[-1]


def test_make_tables_reference_not_utf8_is_one_line(tree, tmp_path, run_cli):
    ref = tmp_path / "ref.csv"
    ref.write_bytes(b"source,protocol\n\xff\xfe\x00bad\n")
    rc, _, err = _make_tables(run_cli, str(tree), "--out", str(tmp_path / "t"), "--reference", str(ref))
    one_error(err, 2, rc, "is not a UTF-8 CSV of published numbers")
    assert os.path.exists(ref)
