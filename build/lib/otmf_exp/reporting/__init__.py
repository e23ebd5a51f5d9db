"""From runs to results: accuracy-matrix metrics, runs as a DataFrame, tables, plots, console summary."""
