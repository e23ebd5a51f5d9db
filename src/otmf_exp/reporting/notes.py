"""The ``note:`` lines of a table: every run in no mean, every row pooling unlike runs, said as such."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from otmf_exp.reporting.runs import is_missing
from otmf_exp.reporting.tables import ACC_RANGE, ROW_GROUP, _bounded, label_runs

#: provenance columns that must agree between the runs pooled in one row (or a note names them)
CODE_COLUMN, MODELS_PREFIX = "provenance.code_version", "provenance.models."


def table_notes(runs: pd.DataFrame, by: Sequence[str] = ()) -> list[str]:
    """One line per run that is in ``runs`` but in no mean (a missing or non-finite ``acc``, an
    accuracy outside [0, 100]) and per row that pools runs of different code versions or model
    files (``provenance.code_version``, ``provenance.models.*``): never pooled silently."""
    if runs.empty or "acc" not in runs:
        return []
    notes = []
    acc = pd.to_numeric(runs["acc"], errors="coerce").astype(float)
    for r in runs.loc[~np.isfinite(acc), "run_dir"]:
        notes.append(f"acc is not a finite number, not counted in n or the mean: {r}")
    for c in _bounded(list(runs.columns)):
        v = pd.to_numeric(runs[c], errors="coerce").astype(float)
        for i in runs.index[np.isfinite(v) & ((v < ACC_RANGE[0]) | (v > ACC_RANGE[1]))]:  # NaN/inf: above
            where = runs.at[i, "run_dir"]
            notes.append(f"{c} = {v[i]:g} is outside [0, 100], not counted in n or the mean: {where}")
    return notes + _pooling_notes(runs, by)


def _pooling_notes(runs: pd.DataFrame, by: Sequence[str]) -> list[str]:
    cols = [c for c in runs.columns if c == CODE_COLUMN or c.startswith(MODELS_PREFIX)]
    if not cols:
        return []
    out = []
    for _, g in label_runs(runs, by).groupby(ROW_GROUP, dropna=False, sort=False):
        for c in cols:
            vals = sorted({str(v) for v in g[c] if not is_missing(v)})
            if len(vals) > 1:
                what = "code versions" if c == CODE_COLUMN else f"model files ({c[len(MODELS_PREFIX) :]})"
                row = f"{g['method'].iloc[0]} {g['variant'].iloc[0] or ''}".strip()
                shown = ", ".join(v[:12] for v in vals[:4])
                out.append(f"row {row} pools {len(g)} runs of {len(vals)} different {what}: {shown}")
    return out
