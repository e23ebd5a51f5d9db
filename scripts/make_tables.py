#!/usr/bin/env python
"""Tables from run dirs or a W&B export: markdown (printed and saved), LaTeX and CSV.

    python scripts/make_tables.py multirun/paper/continual_vision            # a multirun tree
    python scripts/make_tables.py outputs/a outputs/b --out reports/tables   # several run dirs
    python scripts/make_tables.py --wandb-export runs.csv                     # an exported W&B project
    python scripts/make_tables.py multirun --by eval_split --decimals 2 --published-only
    python scripts/make_tables.py multirun --columns acc,bwt,time,memory --label tab:digits --no-bold

Rows are grouped by (protocol, backbone, task_seq, method, varying method_config fields); cells
are mean ± std over task orders and seeds (n shown), next to the published numbers
(src/otmf_exp/data/reference_numbers.csv) and the difference. The runs are a pandas DataFrame
(otmf_exp.reporting.runs.load_runs); see otmf_exp.reporting.tables and .render.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from otmf_exp.errors import cli_main
from otmf_exp.reporting import render, tables
from otmf_exp.reporting.runs import load_runs


def main(argv: list[str] | None = None) -> int:
    """The CLI through the shared wrapper: every failure is one ``error:`` line (exit 2), Ctrl-C
    exit 130, a closed stdout after the tables were written exit 0."""
    return cli_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="run dirs or trees containing metrics.json files")
    p.add_argument(
        "--wandb-export",
        action="append",
        default=[],
        help="a W&B runs export (.csv from the UI, or .json list of {name, config, summary})",
    )
    p.add_argument("--out", default="reports/tables", help="output directory (default: %(default)s)")
    p.add_argument("--reference", default=None, help="published numbers CSV (default: the package's copy)")
    p.add_argument("--by", action="append", default=[], help="extra config key that splits rows (repeatable)")
    p.add_argument("--decimals", type=int, default=1)
    p.add_argument(
        "--published-only",
        action="store_true",
        help="also list published methods that were not run (MINGLE, Fisher, ...) in each block",
    )
    p.add_argument("--keep-duplicates", action="store_true", help="count identical runs separately")
    p.add_argument("--quiet", action="store_true", help="do not print the markdown")
    p.add_argument(
        "--columns",
        default=None,
        help="comma-separated summary columns to show, in order: "
        + ", ".join(render.COLUMNS)
        + " (default: every column not empty for all rows)",
    )
    p.add_argument("--no-bold", action="store_true", help="do not set the best value per column in bold")
    p.add_argument(
        "--label",
        default=render.TableOptions.label,
        help="LaTeX \\label of each summary table, {block} = the block's slug (default: %(default)s)",
    )
    p.add_argument(
        "--caption",
        default=render.TableOptions.caption,
        help="LaTeX caption of each summary table, {block} = the block's title (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if not 0 <= args.decimals <= 10:
        p.error(f"--decimals must be an integer in [0, 10], got {args.decimals}")
    options = render.TableOptions(
        columns=args.columns.split(",") if args.columns is not None else None,
        bold=not args.no_bold,
        label=args.label,
        caption=args.caption,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not args.paths and not args.wandb_export:
        p.error("give run dirs and/or --wandb-export FILE")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file; give a directory", file=sys.stderr)
        return 2
    if out.is_symlink():
        print(f"error: --out {out} is a symbolic link; give the real directory", file=sys.stderr)
        return 2
    notes: list[str] = []
    runs = load_runs(args.paths, args.wandb_export, keep_duplicates=args.keep_duplicates, notes=notes)
    if runs.empty:
        print(
            f"error: no completed runs (metrics.json) under {' '.join(args.paths or args.wandb_export)}",
            file=sys.stderr,
        )
        return 2
    reference = tables.load_reference(args.reference)
    summary = tables.aggregate(runs, reference, by=args.by)
    if args.published_only:
        extra = tables.reference_only_rows(summary, reference)
        summary = tables.sort_rows(pd.concat([summary, extra], ignore_index=True))
    notes += tables.table_notes(runs, args.by)
    try:
        files = render.write_all(summary, reference, out, args.decimals, notes, options)
    except OSError as e:
        print(f"error: cannot write the tables into {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(files["md"].read_text())
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    print(
        f"{len(runs)} runs -> {len(summary)} rows; wrote " + ", ".join(str(f) for f in files.values()),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
