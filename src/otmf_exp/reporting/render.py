"""Result documents through pandas: markdown, LaTeX (booktabs) and CSV of the tables summary.

The :mod:`otmf_exp.reporting.tables` summary goes out with ``DataFrame.to_markdown``,
``Styler.to_latex`` and ``DataFrame.to_csv``; this module only formats the cells.

Layouts (one section per block ``protocol · backbone · task_seq``):

- *summary*: method (+ variant) × n, ACC, published ACC, Δ, BWT, published BWT, Δ, normalized ACC,
  time per run, peak memory, source (the MINGLE / OPCM Table 1 columns, long form);
- *per task*: method × final accuracy on each task and the average (MINGLE Table 2 / AdaMerging
  layout), published value in parentheses where known;
- *paper layout* (when there are several blocks of one protocol): method × (backbone, task_seq)
  ACC ± std with the published value in brackets (MINGLE Table 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from otmf_exp.reporting.tables import ROW_KEYS, per_task, py

SUMMARY_HEAD = ["method", "n", "ACC", "ACC (published)", "Δ ACC", "BWT", "BWT (published)", "Δ BWT"]
SUMMARY_HEAD += ["norm. ACC", "time/run (s)", "peak mem (MB)", "source"]
#: summary.csv columns, full precision
SUMMARY_FIELDS = [*ROW_KEYS, "n", "acc_mean", "acc_std", "acc_ref", "acc_ref_std", "acc_delta"]
SUMMARY_FIELDS += ["bwt_mean", "bwt_std", "bwt_ref", "bwt_ref_std", "bwt_delta", "normalized_acc_mean"]
SUMMARY_FIELDS += ["normalized_acc_std", "wall_time_s_mean", "wall_time_s_std", "peak_memory_mb_mean"]
SUMMARY_FIELDS += ["peak_memory_mb_std", "ref_method", "ref_source"]
#: what LaTeX cannot take as text (Styler escapes cells and headers; captions are ours)
_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}"}
_TEX_SPECIAL |= {"^": r"\textasciicircum{}"}
_TEX_UNICODE = str.maketrans({"±": r"$\pm$", "Δ": r"$\Delta$", "—": "--"})


def fmt(mean: Any, std: Any = None, d: int = 1) -> str:
    """``"12.3 ± 0.4"``, ``"12.3"`` without a std, ``"—"`` without a value."""
    mean, std = py(mean), py(std)
    if mean is None:
        return "—"
    return f"{mean:.{d}f} ± {std:.{d}f}" if std is not None else f"{mean:.{d}f}"


def fmt_delta(x: Any, d: int = 1) -> str:
    x = py(x)
    return "—" if x is None else f"{x:+.{d}f}"


def label(r: pd.Series) -> str:
    return str(r["method"]) if not r["variant"] else f"{r['method']} ({r['variant']})"


def _with_ref(cell: str, ref: Any, d: int, brackets: str = "()") -> str:
    ref = py(ref)
    return cell if ref is None else f"{cell} {brackets[0]}{ref:.{d}f}{brackets[1]}"


def summary_table(summary: pd.DataFrame, d: int = 1) -> pd.DataFrame:
    def line(r: pd.Series) -> list[str]:
        g = r.get
        return [
            label(r),
            str(r["n"]),
            fmt(g("acc_mean"), g("acc_std"), d),
            fmt(g("acc_ref"), g("acc_ref_std"), d),
            fmt_delta(g("acc_delta"), d),
            fmt(g("bwt_mean"), g("bwt_std"), d),
            fmt(g("bwt_ref"), g("bwt_ref_std"), d),
            fmt_delta(g("bwt_delta"), d),
            fmt(g("normalized_acc_mean"), g("normalized_acc_std"), d),
            fmt(g("wall_time_s_mean"), None, d),
            fmt(g("peak_memory_mb_mean"), None, 0),
            py(g("ref_source")) or "—",
        ]

    return pd.DataFrame([line(r) for _, r in summary.iterrows()], columns=SUMMARY_HEAD)


def per_task_table(summary: pd.DataFrame, d: int = 1) -> pd.DataFrame:
    """method × task (the union of the rows' tasks, in order) + avg; published in parentheses."""
    long = per_task(summary)
    long["label"] = [label(r) for _, r in long.iterrows()]
    long["cell"] = [_with_ref(fmt(m, None, d), ref, d) for m, ref in zip(long["mean"], long["ref"])]
    labels = [label(r) for _, r in summary.iterrows()]
    table = long.pivot_table(index="label", columns="task", values="cell", aggfunc="last", sort=False)
    table = table.reindex(index=labels, columns=list(dict.fromkeys(long["task"]))).fillna("—")
    table["avg"] = [
        _with_ref(fmt(r.get("acc_mean"), None, d), r.get("acc_ref"), d) for _, r in summary.iterrows()
    ]
    return table.rename_axis(index="method", columns=None).reset_index()


def paper_layout(summary: pd.DataFrame, d: int = 1) -> pd.DataFrame:
    """method × (backbone / task_seq): ACC ± std [published]."""
    s = summary.assign(backbone=summary["backbone"].astype(str), task_seq=summary["task_seq"].astype(str))
    s["label"], s["col"] = [label(r) for _, r in s.iterrows()], s["backbone"] + " / " + s["task_seq"]
    s["cell"] = [
        _with_ref(fmt(r.get("acc_mean"), r.get("acc_std"), d), r.get("acc_ref"), d, "[]")
        for _, r in s.iterrows()
    ]
    cols = [f"{b} / {t}" for b, t in sorted(set(zip(s["backbone"], s["task_seq"])))]
    table = s.pivot_table(index="label", columns="col", values="cell", aggfunc="last", sort=False)
    table = table.reindex(index=list(dict.fromkeys(s["label"])), columns=cols).fillna("")
    return table.rename_axis(index="method", columns=None).reset_index()


def markdown(table: pd.DataFrame) -> str:
    """A pipe table: first column left-aligned, the others right-aligned, cells as given."""
    cells = table.astype(str).apply(lambda col: col.str.replace("|", "\\|", regex=False))
    align = ("left", *["right"] * (table.shape[1] - 1))
    return cells.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True) + "\n"


def latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs ``table`` float (cells and headers escaped by pandas, ± Δ — as math/dashes)."""
    styler = table.astype(str).style.hide(axis="index").format(escape="latex")
    tex = styler.format_index(escape="latex", axis=1).to_latex(
        caption="".join(_TEX_SPECIAL.get(c, c) for c in caption),
        position="t",
        position_float="centering",
        hrules=True,
        column_format="l" + "r" * (table.shape[1] - 1),
        environment="table",
    )
    return tex.translate(_TEX_UNICODE)


def csv_text(summary: pd.DataFrame) -> tuple[str, str]:
    """(summary.csv, per_task.csv) contents, full precision; per_task.csv has the rows that ran."""
    s = summary.reindex(columns=SUMMARY_FIELDS).to_csv(index=False, lineterminator="\n")
    p = per_task(summary[summary["n"] > 0]).to_csv(index=False, lineterminator="\n")
    return s, p


def render(
    summary: pd.DataFrame, reference: pd.DataFrame | None, d: int = 1, notes: Sequence[str] = ()
) -> tuple[str, str]:
    """(markdown document, LaTeX document) of every block, the paper layouts, the sources and the
    ``notes`` (runs left out of every mean: unfinished, NaN, duplicates)."""
    md, tex = ["# Results\n"], []
    for block, rs in summary.groupby(["protocol", "backbone", "task_seq"], sort=False, dropna=False):
        title = " · ".join(str(py(k)) for k in block)
        md += [
            f"## {title}\n",
            markdown(summary_table(rs, d)),
            "\nFinal accuracy per task (published in parentheses):\n",
            markdown(per_task_table(rs, d)),
        ]
        tex += [
            latex(summary_table(rs, d), f"{title}: ACC / BWT (mean ± std over orders and seeds)"),
            latex(per_task_table(rs, d), f"{title}: final accuracy per task"),
        ]
    left_out = list(notes)
    for protocol, rs in summary.groupby("protocol", sort=False, dropna=False):
        if len(rs[["backbone", "task_seq"]].drop_duplicates()) > 1:
            md += [
                f"## Paper layout: {protocol} ACC, mean ± std [published]\n",
                markdown(paper_layout(rs, d)),
            ]
            tex.append(latex(paper_layout(rs, d), f"{protocol}: ACC (mean ± std) [published]"))
    used = sorted(summary["ref_source"].dropna().unique()) if "ref_source" in summary else []
    if used and reference is not None:
        notes = reference.groupby("source", sort=False)["note"].first().fillna("")
        md.append("\nSources: " + "; ".join(f"`{s}` = {notes.get(s, '')}" for s in used) + "\n")
    if left_out:
        md += ["\nNot counted (n counts exactly the runs in each mean):\n", *(f"- {x}" for x in left_out), ""]
        tex += ["% not counted (n counts exactly the runs in each mean):", *(f"% {x}" for x in left_out)]
    return "\n".join(md), "\n".join(tex)


def write_all(
    summary: pd.DataFrame,
    reference: pd.DataFrame | None,
    out_dir: str | Path,
    d: int = 1,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """``tables.md``, ``tables.tex``, ``summary.csv`` and ``per_task.csv`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, tex = render(summary, reference, d, notes)
    files = {
        "md": out / "tables.md",
        "tex": out / "tables.tex",
        "csv": out / "summary.csv",
        "per_task_csv": out / "per_task.csv",
    }
    for key, text in zip(files, (md, tex, *csv_text(summary))):
        files[key].write_text(text)
    return files
