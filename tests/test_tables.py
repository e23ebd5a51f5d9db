"""make_tables: a real digits8 multirun tree -> markdown / LaTeX / CSV, checked cell by cell."""

from __future__ import annotations

import csv
import json
import runpy
import shutil
import statistics
from pathlib import Path

import pytest

from otmf_exp.reporting import render, tables

ROOT = Path(__file__).resolve().parents[1]


def _metrics(tree: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(tree.rglob("metrics.json"))]


def _cli(args: list[str]) -> int:
    mod = runpy.run_path(str(ROOT / "scripts" / "make_tables.py"), run_name="make_tables")
    return mod["main"](args)


def _expected(ms: list[dict], method: str) -> dict:
    sel = [m for m in ms if m["method"] == method]
    out = {"n": len(sel)}
    for k in ("acc", "bwt", "normalized_acc", "wall_time_s", "peak_memory_mb"):
        xs = [m[k] for m in sel]
        out[f"{k}_mean"] = statistics.fmean(xs)
        out[f"{k}_std"] = statistics.stdev(xs)
    out["per_task"] = {t: statistics.fmean(m["per_task"][t] for m in sel) for t in sel[0]["per_task"]}
    return out


def test_tree_is_two_methods_by_two_orders(digits_multirun):
    ms = _metrics(digits_multirun)
    assert sorted(m["method"] for m in ms) == ["averaging", "averaging", "task_arithmetic", "task_arithmetic"]
    assert len({tuple(m["order"]) for m in ms}) == 2  # order_seed=0,1 gave two different orders


def test_tables_cell_by_cell(digits_multirun, tmp_path):
    ms = _metrics(digits_multirun)
    out = tmp_path / "tables"
    assert _cli([str(digits_multirun), "--out", str(out), "--quiet", "--decimals", "2"]) == 0
    with (out / "summary.csv").open() as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    assert set(summary) == {"averaging", "task_arithmetic"}
    md = (out / "tables.md").read_text()
    for method, row in summary.items():
        exp = _expected(ms, method)
        assert (row["protocol"], row["backbone"], row["task_seq"], row["variant"]) == (
            "continual",
            "tiny",
            "digits8",
            "",
        )
        assert int(row["n"]) == exp["n"] == 2
        for k in ("acc", "bwt", "normalized_acc", "wall_time_s", "peak_memory_mb"):
            assert float(row[f"{k}_mean"]) == pytest.approx(exp[f"{k}_mean"], rel=1e-12, abs=1e-12)
            assert float(row[f"{k}_std"]) == pytest.approx(exp[f"{k}_std"], rel=1e-9, abs=1e-12)
        assert row["acc_ref"] == "" and row["acc_delta"] == ""  # no published numbers for digits8
        # the markdown line of this method, cell by cell
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {method} | 2 |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == f"{exp['acc_mean']:.2f} ± {exp['acc_std']:.2f}"
        assert cells[3] == "—" and cells[4] == "—"
        assert cells[5] == f"{exp['bwt_mean']:.2f} ± {exp['bwt_std']:.2f}"
        assert cells[8] == f"{exp['normalized_acc_mean']:.2f} ± {exp['normalized_acc_std']:.2f}"
    with (out / "per_task.csv").open() as f:
        per_task = list(csv.DictReader(f))
    assert len(per_task) == 2 * 4
    for r in per_task:
        assert float(r["mean"]) == pytest.approx(_expected(ms, r["method"])["per_task"][r["task"]], rel=1e-12)
    # per-task columns follow the task sequence's order, not one run's shuffled order
    header = next(ln for ln in md.splitlines() if ln.startswith("| method | rot90"))
    assert header.startswith("| method | rot90 | flip | invert | parity | avg |")
    tex = (out / "tables.tex").read_text()
    assert "\\begin{tabular}" in tex and "task\\_arithmetic" in tex and "$\\pm$" in tex


def test_published_numbers_side_by_side(digits_multirun, tmp_path):
    ms = _metrics(digits_multirun)
    ref = tmp_path / "ref.csv"
    ref.write_text(
        "source,protocol,backbone,task_seq,method,metric,value,std,note\n"
        "toy,continual,tiny,digits8,averaging,acc,70.0,1.5,made up\n"
        "toy,continual,tiny,digits8,averaging,bwt,-3.0,,made up\n"
        "toy,continual,tiny,digits8,averaging,acc/flip,80.0,,made up\n"
        "toy,continual,tiny,digits8,mingle,acc,90.0,,made up\n"
    )
    rows = tables.aggregate(tables.load_runs([digits_multirun]), tables.load_reference(ref))
    avg = next(r for r in rows if r["method"] == "averaging")
    exp = _expected(ms, "averaging")
    assert avg["acc_ref"] == 70.0 and avg["acc_ref_std"] == 1.5 and avg["ref_source"] == "toy"
    assert avg["acc_delta"] == pytest.approx(exp["acc_mean"] - 70.0)
    assert avg["bwt_delta"] == pytest.approx(exp["bwt_mean"] + 3.0)
    assert avg["per_task_ref"] == {"flip": 80.0}
    ta = next(r for r in rows if r["method"] == "task_arithmetic")
    assert ta["acc_ref"] is None and ta["acc_delta"] is None
    extra = tables.reference_only_rows(rows, tables.load_reference(ref))
    assert [(r["method"], r["acc_ref"], r["n"]) for r in extra] == [("mingle", 90.0, 0)]
    md, _ = render.render(rows + extra, tables.load_reference(ref), d=1)
    line = next(ln for ln in md.splitlines() if ln.startswith("| averaging | 2 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "70.0 ± 1.5" and cells[4] == f"{exp['acc_mean'] - 70.0:+.1f}" and cells[-1] == "toy"
    assert f"{exp['per_task']['flip']:.1f} (80.0)" in md
    assert "`toy` = made up" in md


def test_varying_method_config_becomes_a_variant(digits_multirun, tmp_path):
    """An ablation sweep (here: TA's λ changed in copies of the real runs) gives one row per value."""
    tree = tmp_path / "tree"
    shutil.copytree(digits_multirun, tree)
    for i, f in enumerate(sorted(tree.rglob("metrics.json"))):
        m = json.loads(f.read_text())
        if m["method"] == "task_arithmetic":
            m["method_config"]["scaling"] = [0.1, 0.2][i % 2]
            f.write_text(json.dumps(m))
    rows = tables.aggregate(tables.load_runs([tree]))
    assert sorted((r["method"], r["variant"], r["n"]) for r in rows) == [
        ("averaging", "", 2),
        ("task_arithmetic", "scaling=0.1", 1),
        ("task_arithmetic", "scaling=0.2", 1),
    ]


def test_duplicates_count_once(digits_multirun, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(digits_multirun, tree / "a")
    shutil.copytree(digits_multirun, tree / "b")
    assert {r["n"] for r in tables.aggregate(tables.load_runs([tree]))} == {2}
    assert {r["n"] for r in tables.aggregate(tables.load_runs([tree], keep_duplicates=True))} == {4}


def test_wandb_exports_give_the_same_table(digits_multirun, tmp_path):
    """The JSON (API) and CSV (UI) export formats yield the rows the run dirs give."""
    import yaml

    from_dirs = tables.aggregate(tables.load_runs([digits_multirun]))
    items, flat_rows = [], []
    for f in sorted(digits_multirun.rglob("metrics.json")):
        m = json.loads(f.read_text())
        config = yaml.safe_load((f.parent / "config.yaml").read_text())
        summary = {k: m[k] for k in ("acc", "bwt", "normalized_acc", "wall_time_s", "peak_memory_mb")}
        summary.update({f"per_task/{t}": v for t, v in m["per_task"].items()}, order=m["order"])
        items.append({"name": f.parent.name, "config": config, "summary": summary})
        flat_rows.append(
            {
                "Name": f.parent.name,
                "State": "finished",
                **tables.flatten(config),
                **{k: (",".join(v) if isinstance(v, list) else v) for k, v in summary.items()},
            }
        )
    js = tmp_path / "export.json"
    js.write_text(json.dumps(items))
    cs = tmp_path / "export.csv"
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, sorted({k for r in flat_rows for k in r}))
        w.writeheader()
        w.writerows(flat_rows)
    keys = ("method", "variant", "n", "acc_mean", "acc_std", "bwt_mean", "normalized_acc_mean")
    want = [tuple(r[k] for k in keys) for r in from_dirs]
    for export in (js, cs):
        got = [tuple(r[k] for k in keys) for r in tables.aggregate(tables.load_wandb_export(export))]
        assert [g[:3] for g in got] == [w[:3] for w in want]
        for g, w in zip(got, want):
            assert g[3:] == pytest.approx(w[3:], rel=1e-12)
    assert _cli(["--wandb-export", str(cs), "--out", str(tmp_path / "t"), "--quiet"]) == 0


def test_reference_numbers_are_package_data():
    ref = tables.load_reference()
    assert len(ref) > 300 and all(r["source"] for r in ref)
    ta = [
        r
        for r in ref
        if (r["method"], r["backbone"], r["task_seq"], r["metric"])
        == ("task_arithmetic", "clip_vit_b32", "vit8", "acc")
        and r["protocol"] == "continual"
    ]
    assert ta[0]["value"] == 67.5 and ta[0]["source"] == "mingle_table1"


def test_reference_method_names():
    rm = tables.reference_method
    assert rm("adamerging", {"granularity": "layer"}) == "adamerging_layer"
    assert rm("otmf", {"alpha": 0.8, "mask.enabled": True, "head_tuning.enabled": True}) == "otmf"
    assert rm("otmf", {"alpha": 0.8, "mask.enabled": False, "head_tuning.enabled": True}) == "otmf_no_masks"
    assert (
        rm("otmf", {"alpha": 0.8, "mask.enabled": True, "head_tuning.enabled": False})
        == "otmf_no_head_tuning"
    )
    assert rm("otmf", {"alpha": 0.5, "mask.enabled": True}) is None  # the paper has no number for α=0.5
    assert rm("task_arithmetic", {"scaling": 0.3}) == "task_arithmetic"


def test_no_runs_is_an_error(tmp_path, capsys):
    assert _cli([str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert "no completed runs" in capsys.readouterr().err
