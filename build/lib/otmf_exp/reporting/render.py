"""Rendering of :mod:`otmf_exp.reporting.tables` rows as markdown, LaTeX (booktabs) and CSV.

Layouts (one section per block ``protocol · backbone · task_seq``):

- *summary*: method (+ variant) × n, ACC, published ACC, Δ, BWT, published BWT, Δ, normalized ACC,
  time per run, peak memory, source (the MINGLE / OPCM Table 1 columns, long form);
- *per task*: method × final accuracy on each task and the average (MINGLE Table 2 / AdaMerging
  layout), published value in parentheses where known;
- *paper layout* (when there are several blocks of one protocol): method × (backbone, task_seq)
  ACC ± std with the published value in brackets (MINGLE Table 1).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

Table = tuple[list[str], list[list[str]]]


def fmt(mean: float | None, std: float | None = None, d: int = 1) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{d}f} ± {std:.{d}f}" if std is not None else f"{mean:.{d}f}"


def fmt_delta(x: float | None, d: int = 1) -> str:
    return "—" if x is None else f"{x:+.{d}f}"


def _label(r: dict[str, Any]) -> str:
    return r["method"] if not r["variant"] else f"{r['method']} ({r['variant']})"


def blocks(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(str(r["protocol"]), str(r["backbone"]), str(r["task_seq"]))].append(r)
    return dict(out)


def summary_table(rows: list[dict[str, Any]], d: int = 1) -> Table:
    head = [
        "method",
        "n",
        "ACC",
        "ACC (published)",
        "Δ ACC",
        "BWT",
        "BWT (published)",
        "Δ BWT",
        "norm. ACC",
        "time/run (s)",
        "peak mem (MB)",
        "source",
    ]
    body = [
        [
            _label(r),
            str(r["n"]),
            fmt(r.get("acc_mean"), r.get("acc_std"), d),
            fmt(r.get("acc_ref"), r.get("acc_ref_std"), d),
            fmt_delta(r.get("acc_delta"), d),
            fmt(r.get("bwt_mean"), r.get("bwt_std"), d),
            fmt(r.get("bwt_ref"), r.get("bwt_ref_std"), d),
            fmt_delta(r.get("bwt_delta"), d),
            fmt(r.get("normalized_acc_mean"), r.get("normalized_acc_std"), d),
            fmt(r.get("wall_time_s_mean"), None, d),
            fmt(r.get("peak_memory_mb_mean"), None, 0),
            r.get("ref_source") or "—",
        ]
        for r in rows
    ]
    return head, body


def per_task_table(rows: list[dict[str, Any]], d: int = 1) -> Table:
    tasks: list[str] = []
    for r in rows:
        tasks += [t for t in (r.get("tasks") or list(r.get("per_task_ref", {}))) if t not in tasks]
    head = ["method", *tasks, "avg"]
    body = []
    for r in rows:
        cells = [_label(r)]
        for t in tasks:
            mean = r.get("per_task", {}).get(t, (None, None))[0]
            ref = r.get("per_task_ref", {}).get(t)
            cell = fmt(mean, None, d)
            cells.append(cell if ref is None else f"{cell} ({ref:.{d}f})")
        avg = fmt(r.get("acc_mean"), None, d)
        cells.append(avg if r.get("acc_ref") is None else f"{avg} ({r['acc_ref']:.{d}f})")
        body.append(cells)
    return head, body


def paper_layout(rows: list[dict[str, Any]], d: int = 1) -> Table:
    cols = sorted({(str(r["backbone"]), str(r["task_seq"])) for r in rows})
    labels = list(dict.fromkeys(_label(r) for r in rows))
    cell = {(_label(r), str(r["backbone"]), str(r["task_seq"])): r for r in rows}
    body = []
    for lab in labels:
        line = [lab]
        for b, s in cols:
            r = cell.get((lab, b, s))
            if r is None:
                line.append("")
                continue
            txt = fmt(r.get("acc_mean"), r.get("acc_std"), d)
            line.append(txt if r.get("acc_ref") is None else f"{txt} [{r['acc_ref']:.{d}f}]")
        body.append(line)
    return ["method", *[f"{b} / {s}" for b, s in cols]], body


# ---- renderers ----------------------------------------------------------------------------------
def markdown(table: Table) -> str:
    head, body = table
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (
        ("\\", "\\textbackslash{}"),
        ("_", "\\_"),
        ("%", "\\%"),
        ("&", "\\&"),
        ("#", "\\#"),
        ("±", "$\\pm$"),
        ("Δ", "$\\Delta$"),
        ("—", "--"),
    ):
        s = s.replace(a, b)
    return s


def latex(table: Table, caption: str) -> str:
    head, body = table
    out = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{_tex(caption)}}}",
        "\\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
        "\\toprule",
        " & ".join(_tex(h) for h in head) + " \\\\",
        "\\midrule",
    ]
    out += [" & ".join(_tex(c) for c in row) + " \\\\" for row in body]
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


SUMMARY_FIELDS = [
    "protocol",
    "backbone",
    "task_seq",
    "method",
    "variant",
    "n",
    "acc_mean",
    "acc_std",
    "acc_ref",
    "acc_ref_std",
    "acc_delta",
    "bwt_mean",
    "bwt_std",
    "bwt_ref",
    "bwt_ref_std",
    "bwt_delta",
    "normalized_acc_mean",
    "normalized_acc_std",
    "wall_time_s_mean",
    "wall_time_s_std",
    "peak_memory_mb_mean",
    "peak_memory_mb_std",
    "ref_method",
    "ref_source",
]


def csv_text(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(summary.csv, per_task.csv) contents, full precision."""
    s = io.StringIO()
    w = csv.DictWriter(s, SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    p = io.StringIO()
    pw = csv.writer(p, lineterminator="\n")
    pw.writerow(["protocol", "backbone", "task_seq", "method", "variant", "task", "n", "mean", "std", "ref"])
    for r in rows:
        for t in r.get("tasks") or []:
            mean, std = r["per_task"].get(t, (None, None))
            pw.writerow(
                [
                    r["protocol"],
                    r["backbone"],
                    r["task_seq"],
                    r["method"],
                    r["variant"],
                    t,
                    r["n"],
                    mean,
                    std,
                    r.get("per_task_ref", {}).get(t),
                ]
            )
    return s.getvalue(), p.getvalue()


def render(rows: list[dict[str, Any]], reference: list[dict[str, Any]], d: int = 1) -> tuple[str, str]:
    """(markdown document, LaTeX document) of every block, the paper layouts and the sources."""
    md, tex = ["# Results\n"], []
    for (protocol, backbone, seq), rs in blocks(rows).items():
        title = f"{protocol} · {backbone} · {seq}"
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
    by_protocol: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_protocol[str(r["protocol"])].append(r)
    for protocol, rs in by_protocol.items():
        if len({(r["backbone"], r["task_seq"]) for r in rs}) > 1:
            md += [
                f"## Paper layout: {protocol} ACC, mean ± std [published]\n",
                markdown(paper_layout(rs, d)),
            ]
            tex.append(latex(paper_layout(rs, d), f"{protocol}: ACC (mean ± std) [published]"))
    used = {r.get("ref_source") for r in rows if r.get("ref_source")}
    if used:
        notes = {}
        for ref in reference:
            notes.setdefault(ref["source"], ref.get("note", ""))
        md.append("\nSources: " + "; ".join(f"`{s}` = {notes.get(s, '')}" for s in sorted(used)) + "\n")
    return "\n".join(md), "\n".join(tex)


def write_all(
    rows: list[dict[str, Any]], reference: list[dict[str, Any]], out_dir: str | Path, d: int = 1
) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, tex = render(rows, reference, d)
    summary, per_task = csv_text(rows)
    files = {
        "md": out / "tables.md",
        "tex": out / "tables.tex",
        "csv": out / "summary.csv",
        "per_task_csv": out / "per_task.csv",
    }
    for key, text in zip(files, (md, tex, summary, per_task)):
        files[key].write_text(text)
    return files
