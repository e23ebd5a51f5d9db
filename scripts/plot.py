#!/usr/bin/env python
"""Figures from run dirs (metrics.json + steps.jsonl), the CLI over otmf_exp.reporting.plots.

Accuracy-matrix heatmaps, forgetting curves per run, ACC vs number of tasks and time / method
memory per step per method, as PNG and PDF (SVG on request) at 200 dpi by default.

    python scripts/plot.py multirun/paper/continual_vision --out reports/plots
    python scripts/plot.py multirun outputs --per-run-limit 1     # one heatmap/curve per row
    python scripts/plot.py multirun --format png,svg --dpi 300

A run dir that cannot be read is skipped with one warning naming it. See otmf_exp.reporting.plots
for the figures and their sizes. Needs matplotlib: pip install -e '.[plots]'.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from otmf_exp.errors import UserError, cli_main

PLOTS_EXTRA = "pip install -e '.[plots]'"


def main(argv: list[str] | None = None) -> int:
    """The CLI through the shared wrapper: every failure is one ``error:`` line (exit 2)."""
    return cli_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run dirs or trees containing metrics.json files")
    p.add_argument("--out", default="reports/plots", help="output directory (default: %(default)s)")
    p.add_argument(
        "--per-run-limit",
        type=int,
        default=None,
        help="at most this many per-run figures (heatmap, forgetting) per table row",
    )
    p.add_argument(
        "--format",
        default="png,pdf",
        help="comma-separated figure formats: png, pdf, svg (default: %(default)s)",
    )
    p.add_argument("--dpi", type=int, default=200, help="resolution (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    try:
        from otmf_exp.reporting.plots import check_formats, plot_all
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] != "matplotlib":
            raise
        print(f"error: plot.py needs matplotlib, which is not installed: {PLOTS_EXTRA}", file=sys.stderr)
        return 1
    formats = check_formats(args.format.split(","))
    written = plot_all(args.paths, out, args.per_run_limit, formats, args.dpi)
    if not written:
        raise UserError(f"no completed runs (metrics.json) under {' '.join(args.paths)}")
    for f in written:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
