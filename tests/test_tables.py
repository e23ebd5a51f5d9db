"""make_tables: a real digits8 multirun tree -> runs DataFrame -> markdown / LaTeX / CSV, cell by cell."""

from __future__ import annotations

import csv
import json
import os
import runpy
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from otmf_exp.reporting import render, tables
from otmf_exp.reporting.runs import flatten, load_runs, load_wandb_export

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("acc", "bwt", "normalized_acc", "wall_time_s", "peak_memory_mb")


def _metrics(tree: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(tree.rglob("metrics.json"))]


def _cli(args: list[str]) -> int:
    mod = runpy.run_path(str(ROOT / "scripts" / "make_tables.py"), run_name="make_tables")
    return mod["main"](args)


def _expected(ms: list[dict], method: str) -> dict:
    sel = [m for m in ms if m["method"] == method]
    out = {"n": len(sel)}
    for k in METRICS:
        xs = [m[k] for m in sel]
        out[f"{k}_mean"] = statistics.fmean(xs)
        out[f"{k}_std"] = statistics.stdev(xs)
    out["per_task"] = {t: statistics.fmean(m["per_task"][t] for m in sel) for t in sel[0]["per_task"]}
    return out


def _md_rows(md: str) -> list[list[str]]:
    """The cells of every markdown table line (separator lines left out)."""
    rows = [
        [c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")
    ]
    return [r for r in rows if not all(set(c) <= set(":-") for c in r)]


def _row(summary: pd.DataFrame, method: str) -> pd.Series:
    (i,) = summary.index[summary["method"] == method]
    return summary.loc[i]


def test_tree_is_two_methods_by_two_orders(digits_multirun):
    ms = _metrics(digits_multirun)
    assert sorted(m["method"] for m in ms) == ["averaging", "averaging", "task_arithmetic", "task_arithmetic"]
    assert len({tuple(m["order"]) for m in ms}) == 2  # order_seed=0,1 gave two different orders


def test_runs_dataframe_one_row_per_run(digits_multirun):
    """Every config value (dotted) and every metric is a column; values are the files' values."""
    df = load_runs([digits_multirun])
    files = sorted(digits_multirun.rglob("metrics.json"))
    assert len(df) == len(files) == 4 and list(df.index) == [0, 1, 2, 3]
    assert sorted(df["run_dir"]) == sorted(str(f.parent) for f in files)
    for col in ("method", "method.name", "method.scaling", "task_seq", "task_seq.name", "task_seq.tasks"):
        assert col in df, col
    for col in ("backbone.name", "seed", "order_seed", "eval_split", "alpha", "order", "acc_matrix"):
        assert col in df, col
    assert df["seed"].dtype == "Int64" and df["acc"].dtype == "float64"
    for f in files:
        m = json.loads(f.read_text())
        cfg = flatten(yaml.safe_load((f.parent / "config.yaml").read_text()))
        r = df.set_index("run_dir").loc[str(f.parent)]
        assert r["method"] == r["method.name"] == m["method"]
        assert r["task_seq"] == r["task_seq.name"] == "digits8" and r["backbone"] == "tiny"
        assert r["seed"] == m["seed"] and r["order_seed"] == cfg["order_seed"]
        assert r["eval_split"] == "validation" and r["order"] == m["order"]
        assert r["task_seq.tasks"] == ["rot90", "flip", "invert", "parity"]
        for k in METRICS:
            assert r[k] == m[k], k
        for t in m["per_task"]:
            assert r[f"per_task.{t}"] == m["per_task"][t] and r[f"individual.{t}"] == m["individual"][t]
        assert r["acc_matrix"] == m["acc_matrix"]
        if m["method"] == "task_arithmetic":
            assert r["method.scaling"] == m["method_config"]["scaling"] == 0.3
        else:
            assert pd.isna(r["method.scaling"])  # averaging has no such field
    assert sorted(df["order_seed"]) == [0, 0, 1, 1]
    assert df["settings_hash"].nunique() == 4  # two methods x two task orders: four different runs


def test_tables_cell_by_cell(digits_multirun, tmp_path):
    ms = _metrics(digits_multirun)
    out = tmp_path / "tables"
    every = ["--columns", ",".join(render.COLUMNS), "--no-bold"]  # the full layout, cells as computed
    assert _cli([str(digits_multirun), "--out", str(out), "--quiet", "--decimals", "2", *every]) == 0
    with (out / "summary.csv").open() as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    assert set(summary) == {"averaging", "task_arithmetic"}
    md = (out / "tables.md").read_text()
    md_rows = _md_rows(md)
    for method, row in summary.items():
        exp = _expected(ms, method)
        assert (row["protocol"], row["backbone"], row["task_seq"], row["variant"]) == (
            "continual",
            "tiny",
            "digits8",
            "",
        )
        assert int(row["n"]) == exp["n"] == 2
        for k in METRICS:
            assert float(row[f"{k}_mean"]) == pytest.approx(exp[f"{k}_mean"], rel=1e-12, abs=1e-12)
            assert float(row[f"{k}_std"]) == pytest.approx(exp[f"{k}_std"], rel=1e-9, abs=1e-12)
        assert row["acc_ref"] == "" and row["acc_delta"] == ""  # no published numbers for digits8
        # the markdown line of this method, cell by cell
        cells = next(c for c in md_rows if c[:2] == [method, "2"])
        assert cells[2] == f"{exp['acc_mean']:.2f} ± {exp['acc_std']:.2f}"
        assert cells[3] == "—" and cells[4] == "—"
        assert cells[5] == f"{exp['bwt_mean']:.2f} ± {exp['bwt_std']:.2f}"
        assert cells[8] == f"{exp['normalized_acc_mean']:.2f} ± {exp['normalized_acc_std']:.2f}"
        assert (
            cells[9] == f"{exp['wall_time_s_mean']:.2f}" and cells[10] == f"{exp['peak_memory_mb_mean']:.0f}"
        )
    with (out / "per_task.csv").open() as f:
        per_task = list(csv.DictReader(f))
    assert len(per_task) == 2 * 4
    for r in per_task:
        assert float(r["mean"]) == pytest.approx(_expected(ms, r["method"])["per_task"][r["task"]], rel=1e-12)
    # per-task columns follow the task sequence's order, not one run's shuffled order
    header = next(c for c in md_rows if c[:2] == ["method", "rot90"])
    assert header == ["method", "rot90", "flip", "invert", "parity", "avg"]
    assert "|:---" in md and "---:|" in md  # method column left-aligned, numbers right-aligned
    tex = (out / "tables.tex").read_text()
    assert "\\begin{tabular}" in tex and "task\\_arithmetic" in tex and "$\\pm$" in tex
    assert "\\begin{tabular}{lrrrrrrrrrrr}" in tex and "$\\Delta$ ACC" in tex
    assert tex.count("\\toprule") == tex.count("\\midrule") == tex.count("\\bottomrule") == 2


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
    rows = tables.aggregate(load_runs([digits_multirun]), tables.load_reference(ref))
    avg = _row(rows, "averaging")
    exp = _expected(ms, "averaging")
    assert avg["acc_ref"] == 70.0 and avg["acc_ref_std"] == 1.5 and avg["ref_source"] == "toy"
    assert avg["acc_delta"] == pytest.approx(exp["acc_mean"] - 70.0)
    assert avg["bwt_delta"] == pytest.approx(exp["bwt_mean"] + 3.0)
    per_task_ref = {c[9:-4]: v for c, v in avg.items() if c.startswith("per_task.") and c.endswith("_ref")}
    assert {t: v for t, v in per_task_ref.items() if pd.notna(v)} == {"flip": 80.0}
    long = tables.per_task(rows).dropna(subset=["ref"])
    assert list(zip(long["method"], long["task"], long["ref"])) == [("averaging", "flip", 80.0)]
    ta = _row(rows, "task_arithmetic")
    assert pd.isna(ta["acc_ref"]) and pd.isna(ta["acc_delta"])
    extra = tables.reference_only_rows(rows, tables.load_reference(ref))
    assert list(zip(extra["method"], extra["acc_ref"], extra["n"])) == [("mingle", 90.0, 0)]
    both = tables.sort_rows(pd.concat([rows, extra], ignore_index=True))
    assert list(both["method"]) == ["averaging", "task_arithmetic", "mingle"]  # the paper's order
    md, _ = render.render(both, tables.load_reference(ref), d=1)
    cells = next(c for c in _md_rows(md) if c[:2] == ["averaging", "2"])
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
    rows = tables.aggregate(load_runs([tree]))
    assert sorted(zip(rows["method"], rows["variant"], rows["n"])) == [
        ("averaging", "", 2),
        ("task_arithmetic", "scaling=0.1", 1),
        ("task_arithmetic", "scaling=0.2", 1),
    ]


def test_by_splits_rows_and_other_settings_are_not_duplicates(digits_multirun, tmp_path):
    """Runs that differ in a setting outside method_config (eval_split) are distinct runs, and
    ``--by eval_split`` gives one row per value."""
    tree = tmp_path / "tree"
    shutil.copytree(digits_multirun, tree / "val")
    shutil.copytree(digits_multirun, tree / "test")
    for f in (tree / "test").rglob("config.yaml"):
        f.write_text(f.read_text().replace("eval_split: validation", "eval_split: test"))
    runs = load_runs([tree])
    assert len(runs) == 8 and sorted(runs["eval_split"].unique()) == ["test", "validation"]
    rows = tables.aggregate(runs, by=["eval_split"])
    assert sorted(zip(rows["method"], rows["variant"], rows["n"])) == [
        ("averaging", "eval_split=test", 2),
        ("averaging", "eval_split=validation", 2),
        ("task_arithmetic", "eval_split=test", 2),
        ("task_arithmetic", "eval_split=validation", 2),
    ]


def test_duplicates_count_once(digits_multirun, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(digits_multirun, tree / "a")
    shutil.copytree(digits_multirun, tree / "b")
    assert len(load_runs([tree])) == 4 and len(load_runs([tree], keep_duplicates=True)) == 8
    assert set(load_runs([tree], keep_duplicates=True)["settings_hash"].value_counts()) == {2}
    assert set(tables.aggregate(load_runs([tree]))["n"]) == {2}
    assert set(tables.aggregate(load_runs([tree], keep_duplicates=True))["n"]) == {4}
    # the newest copy wins: give one copy of one run another acc and a later mtime
    f = sorted((tree / "b").rglob("metrics.json"))[0]
    m = json.loads(f.read_text())
    m["acc"] = 12.5
    f.write_text(json.dumps(m))
    os.utime(f, (f.stat().st_atime, f.stat().st_mtime + 3600))
    df = load_runs([tree])
    assert len(df) == 4
    (i,) = df.index[df["acc"] == 12.5]
    assert df.at[i, "run_dir"] == str(f.parent)
    assert str(f.parent).replace(str(tree / "b"), str(tree / "a")) not in set(df["run_dir"])


def _exports(tree: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The run dirs of ``tree`` as a W&B JSON (API) export and a CSV (UI) export; the CSV also
    has a crashed run that must be left out."""
    items, flat_rows = [], []
    for f in sorted(tree.rglob("metrics.json")):
        m = json.loads(f.read_text())
        config = yaml.safe_load((f.parent / "config.yaml").read_text())
        summary = {k: m[k] for k in METRICS}
        summary.update({f"per_task/{t}": v for t, v in m["per_task"].items()}, order=m["order"])
        items.append({"name": f.parent.name, "config": config, "summary": summary})
        flat_rows.append(
            {
                "Name": f.parent.name,
                "State": "finished",
                **flatten(config),
                **{k: (",".join(v) if isinstance(v, list) else v) for k, v in summary.items()},
            }
        )
    flat_rows.append({**flat_rows[0], "Name": "crashed run", "State": "crashed", "seed": 7})
    js = tmp_path / "export.json"
    js.write_text(json.dumps(items))
    cs = tmp_path / "export.csv"
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, sorted({k for r in flat_rows for k in r}))
        w.writeheader()
        w.writerows(flat_rows)
    return js, cs


def test_wandb_export_rows(digits_multirun, tmp_path):
    """An export gives one row per finished run with the run dirs' columns and values."""
    dirs = load_runs([digits_multirun]).set_index("run_dir")
    for export in _exports(digits_multirun, tmp_path):
        df = load_wandb_export(export)
        assert len(df) == 4 and sorted(df["run_dir"]) == sorted(Path(d).name for d in dirs.index)
        assert sorted(df["wandb.name"]) == sorted(df["run_dir"])
        for _, r in df.iterrows():
            d = dirs.loc[next(x for x in dirs.index if Path(x).name == r["run_dir"])]
            for col in (
                "method",
                "method.name",
                "task_seq",
                "task_seq.name",
                "backbone",
                "seed",
                "order_seed",
            ):
                assert r[col] == d[col], col
            assert r["order"] == d["order"] and r["task_seq.tasks"] == d["task_seq.tasks"]
            assert r["protocol"] == "continual" and r["eval_split"] == "validation"
            assert r["settings_hash"] == d["settings_hash"]  # the same run, whatever the source
            for col in [*METRICS, *(c for c in dirs if c.startswith("per_task."))]:
                assert r[col] == pytest.approx(d[col], rel=1e-12), col
    for export in _exports(digits_multirun, tmp_path):
        both = load_runs([digits_multirun], wandb_exports=[export])
        assert len(both) == 4 and set(both["run_dir"]) == set(dirs.index)  # run dirs win over exports
        assert len(load_runs([digits_multirun], wandb_exports=[export], keep_duplicates=True)) == 8


def test_wandb_exports_give_the_same_table(digits_multirun, tmp_path):
    """The JSON (API) and CSV (UI) export formats yield the rows the run dirs give."""
    from_dirs = tables.aggregate(load_runs([digits_multirun]))
    keys = ["method", "variant", "n", "acc_mean", "acc_std", "bwt_mean", "normalized_acc_mean"]
    want = list(from_dirs[keys].itertuples(index=False, name=None))
    js, cs = _exports(digits_multirun, tmp_path)
    for export in (js, cs):
        got = list(tables.aggregate(load_wandb_export(export))[keys].itertuples(index=False, name=None))
        assert [g[:3] for g in got] == [w[:3] for w in want]
        for g, w in zip(got, want):
            assert g[3:] == pytest.approx(w[3:], rel=1e-12)
    assert _cli(["--wandb-export", str(cs), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    with (tmp_path / "t" / "summary.csv").open() as f:
        assert [(r["method"], r["n"]) for r in csv.DictReader(f)] == [
            ("averaging", "2"),
            ("task_arithmetic", "2"),
        ]


def test_docs_notebook_lines(digits_multirun, tmp_path, monkeypatch):
    """The three lines docs/comparing.md shows for a notebook run as written, on a multirun tree."""
    text = (ROOT / "docs" / "comparing.md").read_text()
    block = next(
        b.split("```", 1)[0] for b in text.split("```python\n")[1:] if "import load_runs" in b.split("```")[0]
    )
    lines = block.strip().splitlines()
    assert len(lines) == 3
    (tmp_path / "multirun").mkdir()
    (tmp_path / "multirun" / "digits8").symlink_to(digits_multirun, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec("\n".join(lines[:-1]), ns)
    result = eval(lines[-1], ns)
    assert isinstance(ns["df"], pd.DataFrame) and len(ns["df"]) == 4
    ms = _metrics(digits_multirun)
    assert len(result) == 2
    for method in ("averaging", "task_arithmetic"):
        exp = _expected(ms, method)
        got = result.loc[("digits8", method)]
        for k in ("acc", "bwt"):
            assert got[(k, "mean")] == pytest.approx(exp[f"{k}_mean"], rel=1e-12)
            assert got[(k, "std")] == pytest.approx(exp[f"{k}_std"], rel=1e-9)
            assert got[(k, "count")] == 2


def test_markdown_and_latex_escape_cells():
    t = pd.DataFrame([["a|b", "x_1 & 50%"]], columns=["method", "Δ c"])
    assert "| a\\|b " in render.markdown(t)
    tex = render.latex(t, "t_1 & more")
    assert "x\\_1 \\& 50\\%" in tex and "\\caption{t\\_1 \\& more}" in tex and "$\\Delta$ c" in tex
    assert render.fmt(None) == render.fmt(float("nan")) == "—" and render.fmt(1.25, 0.5, 1) == "1.2 ± 0.5"
    assert render.fmt_delta(-0.04) == "-0.0" and render.fmt_delta(pd.NA) == "—"


def test_reference_numbers_are_package_data():
    ref = tables.load_reference()
    assert len(ref) > 300 and ref["source"].notna().all() and (ref["source"] != "").all()
    ta = ref[
        (ref["method"] == "task_arithmetic")
        & (ref["backbone"] == "clip_vit_b32")
        & (ref["task_seq"] == "vit8")
        & (ref["metric"] == "acc")
        & (ref["protocol"] == "continual")
    ]
    assert ta.iloc[0]["value"] == 67.5 and ta.iloc[0]["source"] == "mingle_table1"


def test_reference_method_names():
    rm = tables.reference_method
    assert rm("adamerging", {"granularity": "layer"}) == "adamerging_layer"
    assert rm("adamerging", {"granularity": "layer", "tv_prune": "ties"}, "joint") == "adamerging_layer_plus"
    c_ada = {"granularity": "layer", "continual": "current_only"}  # MINGLE Table 1 C. AdaMerging
    assert rm("adamerging", c_ada, "continual") == "adamerging_layer"
    assert rm("adamerging", {"granularity": "layer"}, "continual") is None  # pairwise: no published row
    assert rm("otmf", {"alpha": 0.8, "mask.enabled": True, "head_tuning.enabled": True}) == "otmf"
    assert rm("otmf", {"alpha": 0.8, "mask.enabled": False, "head_tuning.enabled": True}) == "otmf_no_masks"
    assert (
        rm("otmf", {"alpha": 0.8, "mask.enabled": True, "head_tuning.enabled": False})
        == "otmf_no_head_tuning"
    )
    assert rm("otmf", {"alpha": 0.5, "mask.enabled": True}) is None  # the paper has no number for α=0.5
    assert rm("task_arithmetic", {"scaling": 0.3}) == "task_arithmetic"
    assert rm("concrete", {"merge": "task_arithmetic", "max_steps": None, "lr": 1e-3}) == "concrete_ta"
    assert rm("concrete", {"merge": "adamerging", "granularity": "layer"}) == "concrete_adamerging_layer"
    assert rm("concrete", {"merge": "task_arithmetic", "max_steps": 200}) is None  # fewer steps: no number
    assert rm("concrete", {"merge": "adamerging", "max_steps": 2000}) is None


def test_no_runs_is_an_error(tmp_path, capsys):
    assert _cli([str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert "no completed runs" in capsys.readouterr().err


def test_otmf_matches_published_numbers_only_with_the_authors_head_tuning():
    """A default OTMF run tunes heads on 25 % of train: it is not the setting behind 79.7 (test split)."""
    authors = {
        "alpha": 0.8,
        "select": "authors",
        "head_tuning.enabled": True,
        "head_tuning.which": "authors",
        "head_tuning.split": "test",
        "head_tuning.fraction": 1.0,
        "head_tuning.steps": 100,
    }
    assert tables.reference_method("otmf", authors) == "otmf"
    assert (
        tables.reference_method(
            "otmf", authors | {"head_tuning.split": "train", "head_tuning.fraction": 0.25}
        )
        is None
    )
    assert tables.reference_method("otmf", authors | {"select": "last"}) is None
    no_heads = authors | {"head_tuning.enabled": False, "head_tuning.split": "train"}
    assert tables.reference_method("otmf", no_heads) == "otmf_no_head_tuning"
