"""Tables never pool unlike runs, and ``n`` counts exactly the runs in each mean (issues 24, 27).

Built on the real digits8 multirun tree (2 methods x 2 orders) copied and edited on disk."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest

from otmf_exp.reporting import tables
from otmf_exp.reporting.runs import load_runs

ROOT = Path(__file__).resolve().parents[1]


def _rows(tree: Path, notes: list[str] | None = None) -> list[tuple[str, str, int]]:
    summary = tables.aggregate(load_runs([tree], notes=notes))
    return sorted(zip(summary["method"], summary["variant"], summary["n"]))


def _edit(run_dir: Path, old: str, new: str) -> None:
    f = run_dir / "config.yaml"
    text = f.read_text()
    assert old in text, (old, text[:500])
    f.write_text(text.replace(old, new))


def _runs(tree: Path, method: str) -> list[Path]:
    return sorted(
        f.parent for f in tree.rglob("metrics.json") if json.loads(f.read_text())["method"] == method
    )


@pytest.fixture
def tree(digits_multirun, tmp_path) -> Path:
    out = tmp_path / "tree"
    shutil.copytree(digits_multirun, out)
    return out


def test_a_test_split_run_is_not_a_replicate_of_validation_runs(tree):
    """The issue's case: one eval_split=test run beside validation runs made "averaging n=3"."""
    avg = _runs(tree, "averaging")
    extra = tree / "extra"
    shutil.copytree(avg[0], extra)
    _edit(extra, "eval_split: validation", "eval_split: test")
    metrics = json.loads((extra / "metrics.json").read_text())
    metrics["acc"] += 7.0  # a different result, as a test-split run has
    (extra / "metrics.json").write_text(json.dumps(metrics))
    assert _rows(tree) == [
        ("averaging", "eval_split=test", 1),
        ("averaging", "eval_split=validation", 2),
        ("task_arithmetic", "", 2),
    ]


def test_a_different_task_list_or_backbone_option_splits_rows(tree):
    ta = _runs(tree, "task_arithmetic")
    _edit(ta[0], "deterministic: true", "deterministic: false")
    rows = _rows(tree)
    assert ("task_arithmetic", "deterministic=False", 1) in rows
    assert ("task_arithmetic", "deterministic=True", 1) in rows
    assert ("averaging", "", 2) in rows


def test_evaluation_only_options_do_not_split_replicates(tree):
    """backbone.batch_size, num_workers, progress and the logger cannot change a result."""
    for d in _runs(tree, "averaging"):
        _edit(d, "batch_size: 512", "batch_size: 7")
    _edit(_runs(tree, "task_arithmetic")[0], "progress: false", "progress: true")
    assert _rows(tree) == [("averaging", "", 2), ("task_arithmetic", "", 2)]


def test_nan_acc_is_not_counted_and_is_noted(tree):
    bad = _runs(tree, "averaging")[0]
    m = json.loads((bad / "metrics.json").read_text())
    good = json.loads((_runs(tree, "averaging")[1] / "metrics.json").read_text())
    m["acc"] = float("nan")
    (bad / "metrics.json").write_text(json.dumps(m))
    runs = load_runs([tree])
    summary = tables.aggregate(runs)
    row = summary[summary["method"] == "averaging"].iloc[0]
    assert row["n"] == 1 and row["acc_mean"] == pytest.approx(good["acc"])
    assert tables.table_notes(runs) == [f"acc is not a finite number, not counted in n or the mean: {bad}"]


def test_unfinished_and_conflicting_duplicates_are_listed(tree, tmp_path):
    avg = _runs(tree, "averaging")
    (avg[0] / "metrics.json").unlink()  # a run that died before its result
    dup = tree / "dup"
    shutil.copytree(avg[1], dup)
    m = json.loads((dup / "metrics.json").read_text())
    m["acc"] += 1.0  # same settings, another result
    (dup / "metrics.json").write_text(json.dumps(m))
    notes: list[str] = []
    assert _rows(tree, notes) == [("averaging", "", 1), ("task_arithmetic", "", 2)]
    assert f"unfinished (no metrics.json), not counted: {avg[0]}" in notes
    (conflict,) = [n for n in notes if n.startswith("duplicate settings, conflicting results")]
    assert str(avg[1]) in conflict and str(dup) in conflict


def test_make_tables_writes_the_notes_and_skips_bad_run_dirs(tree, tmp_path, capsys):
    (_runs(tree, "averaging")[0] / "metrics.json").unlink()
    bad = tree / "broken"
    bad.mkdir()
    (bad / "metrics.json").write_text("[]")
    (bad / "config.yaml").write_text("a: !!python/object:os.system x\n")
    mod = runpy.run_path(str(ROOT / "scripts" / "make_tables.py"), run_name="make_tables")
    out = tmp_path / "tables"
    assert mod["main"]([str(tree), "--out", str(out), "--quiet"]) == 0
    md = (out / "tables.md").read_text()
    assert "Not counted" in md and "unfinished (no metrics.json)" in md
    assert "unreadable metrics.json, not counted" in md and str(bad) in md
    err = capsys.readouterr().err
    assert "note: unfinished" in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert mod["main"]([str(tree), "--out", str(afile), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err
