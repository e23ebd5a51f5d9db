"""make_tables options (issue 24 item 3): --columns (validated), best per column in bold (markdown
``**x**``, LaTeX ``\\textbf{x}``; --no-bold), LaTeX \\label / \\caption, no all-dash columns.

Small synthetic run dirs in tmp_path: two methods x two seeds on a 2-task toy sequence."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAIN = runpy.run_path(str(ROOT / "scripts" / "make_tables.py"), run_name="make_tables")["main"]


def _run(root: Path, method: str, seed: int, acc: float, bwt: float, time_s: float, mem: float) -> None:
    d = root / f"{method}_{seed}"
    d.mkdir(parents=True)
    cfg = {"method": {"name": method}, "task_seq": {"name": "toy", "tasks": ["a", "b"]}}
    cfg |= {"backbone": {"name": "tiny"}, "seed": seed, "order_seed": 0}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = {"method": method, "task_seq": "toy", "backbone": "tiny", "protocol": "continual", "seed": seed}
    m |= {"order": ["a", "b"], "acc": acc, "bwt": bwt, "per_task": {"a": acc, "b": acc}}
    m |= {"acc_matrix": [[acc, None], [acc, acc]], "wall_time_s": time_s, "peak_memory_mb": mem}
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "runs"
    _run(root, "ties", 0, 60.0, -10.0, 5.0, 900.0)
    _run(root, "ties", 1, 62.0, -12.0, 5.0, 900.0)
    _run(root, "opcm", 0, 70.0, -20.0, 9.0, 800.0)
    _run(root, "opcm", 1, 72.0, -22.0, 9.0, 800.0)
    return root


def _md_table(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [rows[0], *rows[2:]]  # header, then the data rows (not the |:---| line)


def test_default_bold_best_and_no_dash_columns(tree, tmp_path):
    out = tmp_path / "t"
    # without published numbers: no "ACC (published)" / Δ / source / norm. ACC columns of dashes
    empty_ref = tmp_path / "ref.csv"
    empty_ref.write_text("protocol,backbone,task_seq,method,metric,value,std,source,note\n")
    assert MAIN([str(tree), "--out", str(out), "--quiet", "--reference", str(empty_ref)]) == 0
    md = (out / "tables.md").read_text()
    head, *rows = _md_table(md.split("Final accuracy")[0])
    assert head == ["method", "n", "ACC", "BWT", "time/run (s)", "peak mem (MB)"]
    by = {r[0]: r for r in rows}
    assert by["opcm"][2] == "**71.0 ± 1.4**" and by["ties"][2] == "61.0 ± 1.4"  # higher ACC wins
    assert by["ties"][3] == "**-11.0 ± 1.4**" and by["opcm"][3] == "-21.0 ± 1.4"  # higher BWT wins
    assert by["ties"][4] == "**5.0**" and by["opcm"][4] == "9.0"  # lower time wins
    assert by["opcm"][5] == "**800**" and by["ties"][5] == "900"  # lower memory wins
    tex = (out / "tables.tex").read_text()
    assert r"\textbf{71.0 $\pm$ 1.4}" in tex and r"\textbf{800}" in tex
    assert r"\label{tab:continual-tiny-toy}" in tex and r"\label{tab:continual-tiny-toy-per-task}" in tex
    assert r"\caption{continual · tiny · toy: ACC / BWT (mean $\pm$ std over orders and seeds)}" in tex


def test_columns_no_bold_label_caption(tree, tmp_path):
    out = tmp_path / "t"
    args = [str(tree), "--out", str(out), "--quiet", "--columns", "acc,source,memory", "--no-bold"]
    args += ["--label", "tab:digits", "--caption", "Digits {block} 50% & more"]
    assert MAIN(args) == 0
    md = (out / "tables.md").read_text()
    head, *rows = _md_table(md.split("Final accuracy")[0])
    assert head == ["method", "ACC", "source", "peak mem (MB)"]  # named: kept even when all dashes
    assert all(r[2] == "—" for r in rows) and "**" not in md
    tex = (out / "tables.tex").read_text()
    assert r"\label{tab:digits}" in tex and r"\textbf" not in tex
    assert r"\caption{Digits continual · tiny · toy 50\% \& more}" in tex


def test_unknown_column_is_one_line(tree, tmp_path, capsys):
    out = tmp_path / "t"
    assert MAIN([str(tree), "--out", str(out), "--columns", "acc,speed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: unknown --columns speed; choose from method, n, acc, acc_published, acc_delta, bwt, "
        "bwt_published, bwt_delta, norm_acc, time, memory, source"
    ]
    assert not out.exists()
