#!/usr/bin/env python
"""PNG figures from run dirs (metrics.json + steps.jsonl), the CLI over otmf_exp.reporting.plots.

Accuracy-matrix heatmaps, forgetting curves per run, ACC vs number of tasks and time / memory
per step per method.

    python scripts/plot.py multirun/paper/continual_vision --out reports/plots
    python scripts/plot.py multirun outputs --per-run-limit 1     # one heatmap/curve per row

See otmf_exp.reporting.plots for the figures and their pixel sizes. Needs matplotlib:
pip install -e '.[plots]'.
"""

from __future__ import annotations

import argparse
import logging
import sys

PLOTS_EXTRA = "pip install -e '.[plots]'"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run dirs or trees containing metrics.json files")
    p.add_argument("--out", default="reports/plots", help="output directory (default: %(default)s)")
    p.add_argument(
        "--per-run-limit",
        type=int,
        default=None,
        help="at most this many per-run figures (heatmap, forgetting) per table row",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from otmf_exp.reporting.plots import plot_all
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] != "matplotlib":
            raise
        print(f"error: plot.py needs matplotlib, which is not installed: {PLOTS_EXTRA}", file=sys.stderr)
        return 1
    written = plot_all(args.paths, args.out, args.per_run_limit)
    if not written:
        print(f"error: no completed runs (metrics.json) under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    for f in written:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
