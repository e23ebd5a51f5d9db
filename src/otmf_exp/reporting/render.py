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

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from otmf_exp.errors import UserError
from otmf_exp.reporting.tables import ROW_KEYS, per_task, py
from otmf_exp.runtime.files import write_text

SUMMARY_HEAD = ["method", "n", "ACC", "ACC (published)", "Δ ACC", "BWT", "BWT (published)", "Δ BWT"]
SUMMARY_HEAD += ["norm. ACC", "time/run (s)", "peak mem (MB)", "source"]
#: ``--columns`` names of the summary columns (method is always shown)
COLUMNS = dict(
    zip(
        ["method", "n", "acc", "acc_published", "acc_delta", "bwt", "bwt_published", "bwt_delta"]
        + ["norm_acc", "time", "memory", "source"],
        SUMMARY_HEAD,
    )
)
#: the summary value a column's best cell is chosen on, and whether higher is better
BEST = {
    "ACC": ("acc_mean", True),
    "BWT": ("bwt_mean", True),
    "norm. ACC": ("normalized_acc_mean", True),
    "time/run (s)": ("wall_time_s_mean", False),
    "peak mem (MB)": ("peak_memory_mb_mean", False),
}
_B = "\u2063"  # invisible separator: marks a bold cell until the markdown / LaTeX writer


@dataclass
class TableOptions:
    """What ``make_tables`` passes: shown columns (``None`` = every non-empty one), best in bold,
    LaTeX ``\\label`` / ``\\caption`` templates (``{block}`` = the block's title / its slug)."""

    columns: Sequence[str] | None = None
    bold: bool = True
    label: str = "tab:{block}"
    caption: str = "{block}: ACC / BWT (mean ± std over orders and seeds)"
    _keys: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.columns is not None:
            cols = [c.strip() for c in self.columns if c.strip()]
            bad = [c for c in cols if c not in COLUMNS]
            if bad or not cols:
                raise UserError(
                    f"unknown --columns {', '.join(bad) or '(none)'}; choose from {', '.join(COLUMNS)}"
                )
            self._keys = ["method", *(c for c in dict.fromkeys(cols) if c != "method")]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "table"


def _bold_best(table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """The best value per :data:`BEST` column marked bold (ties all bold; rows that ran only)."""
    out = table.copy()
    for head, (col, higher) in BEST.items():
        if head not in out or col not in summary:
            continue
        v = pd.to_numeric(summary[col], errors="coerce").reset_index(drop=True)
        v = v.where(pd.to_numeric(summary["n"], errors="coerce").reset_index(drop=True) > 0)
        if v.notna().sum() < 2:
            continue
        best = v.max() if higher else v.min()
        for i in v.index[v == best]:
            out.iat[i, out.columns.get_loc(head)] = f"{_B}{out.iat[i, out.columns.get_loc(head)]}{_B}"
    return out


def choose_columns(table: pd.DataFrame, summary: pd.DataFrame, opts: TableOptions) -> pd.DataFrame:
    """The summary table with ``opts``: named columns (in that order) or every column that is not
    empty (``—``) for every row; best values bold."""
    if opts._keys:
        table = table[[COLUMNS[k] for k in opts._keys]]
    else:
        keep = [c for c in table.columns if c == "method" or not (table[c].astype(str) == "—").all()]
        table = table[keep]
    return _bold_best(table, summary) if opts.bold else table


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
    text = cells.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True) + "\n"
    return text.replace(_B, "**")


def latex(table: pd.DataFrame, caption: str, label: str | None = None) -> str:
    """A booktabs ``table`` float (cells and headers escaped by pandas, ± Δ — as math/dashes),
    bold cells as ``\\textbf{..}``, with ``\\label{label}``."""
    styler = table.astype(str).style.hide(axis="index").format(escape="latex")
    tex = styler.format_index(escape="latex", axis=1).to_latex(
        caption="".join(_TEX_SPECIAL.get(c, c) for c in caption),
        position="t",
        position_float="centering",
        hrules=True,
        column_format="l" + "r" * (table.shape[1] - 1),
        environment="table",
        label=label,
    )
    tex = re.sub(f"{_B}(.*?){_B}", r"\\textbf{\1}", tex)
    return tex.translate(_TEX_UNICODE)


def csv_text(summary: pd.DataFrame) -> tuple[str, str]:
    """(summary.csv, per_task.csv) contents, full precision; per_task.csv has the rows that ran."""
    s = summary.reindex(columns=SUMMARY_FIELDS).to_csv(index=False, lineterminator="\n")
    p = per_task(summary[summary["n"] > 0]).to_csv(index=False, lineterminator="\n")
    return s, p


def render(
    summary: pd.DataFrame,
    reference: pd.DataFrame | None,
    d: int = 1,
    notes: Sequence[str] = (),
    options: TableOptions | None = None,
) -> tuple[str, str]:
    """(markdown document, LaTeX document) of every block, the paper layouts, the sources and the
    ``notes`` (runs left out of every mean: unfinished, NaN, duplicates). ``options``: columns,
    bold, label and caption of the summary tables (:class:`TableOptions`)."""
    opts = options or TableOptions()
    md, tex = ["# Results\n"], []
    blocks = list(summary.groupby(["protocol", "backbone", "task_seq"], sort=False, dropna=False))
    for block, rs in blocks:
        title = " · ".join(str(py(k)) for k in block)
        label = opts.label.replace("{block}", _slug(title))
        if "{block}" not in opts.label and len(blocks) > 1:
            label += f"-{_slug(title)}"  # one label per float
        table = choose_columns(summary_table(rs, d), rs, opts)
        md += [
            f"## {title}\n",
            markdown(table),
            "\nFinal accuracy per task (published in parentheses):\n",
            markdown(per_task_table(rs, d)),
        ]
        tex += [
            latex(table, opts.caption.replace("{block}", title), label),
            latex(per_task_table(rs, d), f"{title}: final accuracy per task", f"{label}-per-task"),
        ]
    left_out = list(notes)
    for protocol, rs in summary.groupby("protocol", sort=False, dropna=False):
        if len(rs[["backbone", "task_seq"]].drop_duplicates()) > 1:
            md += [
                f"## Paper layout: {protocol} ACC, mean ± std [published]\n",
                markdown(paper_layout(rs, d)),
            ]
            tex.append(
                latex(
                    paper_layout(rs, d),
                    f"{protocol}: ACC (mean ± std) [published]",
                    f"tab:paper-{_slug(str(py(protocol)))}",
                )
            )
    used = sorted(summary["ref_source"].dropna().unique()) if "ref_source" in summary else []
    if used and reference is not None:
        notes = reference.groupby("source", sort=False)["note"].first().fillna("")
        md.append("\nSources: " + "; ".join(f"`{s}` = {notes.get(s, '')}" for s in used) + "\n")
    if left_out:
        md += [
            "\nNot counted (n counts exactly the runs in each mean):\n",
            *(f"- {safe_note(x)}" for x in left_out),
        ]
        md.append("")
        tex += [
            "% not counted (n counts exactly the runs in each mean):",
            *(f"% {safe_note(x)}" for x in left_out),
        ]
    return "\n".join(md), "\n".join(tex)


def write_all(
    summary: pd.DataFrame,
    reference: pd.DataFrame | None,
    out_dir: str | Path,
    d: int = 1,
    notes: Sequence[str] = (),
    options: TableOptions | None = None,
) -> dict[str, Path]:
    """``tables.md``, ``tables.tex``, ``summary.csv`` and ``per_task.csv`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, tex = render(summary, reference, d, notes, options)
    files = {
        "md": out / "tables.md",
        "tex": out / "tables.tex",
        "csv": out / "summary.csv",
        "per_task_csv": out / "per_task.csv",
    }
    for key, text in zip(files, (md, tex, *csv_text(summary))):
        write_text(files[key], text)  # the one writer: temp + rename, never through a link
    return files


def safe_note(text: str) -> str:
    """A note (it may name a run dir: any characters a file name holds) made inert for one LaTeX
    ``%`` comment line and one Markdown list item: control characters (a newline would end the
    comment and start a live LaTeX line) written as ``\\xNN``."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in str(text))
