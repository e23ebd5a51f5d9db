"""Runs as a pandas DataFrame: run directories and W&B exports in, one row per run out.

Every completed run directory (one holding ``metrics.json``, see the output contract in the
README) becomes one row whose columns are its resolved config flattened with dots
(``method.alpha``, ``task_seq.name``, ``backbone.name``, ``seed``, ``order_seed``, ...), its
metrics (``acc``, ``bwt``, ``normalized_acc``, ``wall_time_s``, ``peak_memory_mb``,
``per_task.<task>``, ``individual.<task>``, ``order``, ``acc_matrix``, ...) and ``run_dir`` /
``finished_at`` (when ``metrics.json`` was written). The short columns ``method``, ``task_seq``,
``backbone`` and ``protocol`` hold names. A W&B export (the UI's runs-table CSV or a JSON list
of ``{"name", "config", "summary"}``) gives rows with the same columns; W&B's own columns
(``Name``, ``State``, ``Created`` ...) become ``wandb.name``, ``wandb.state`` ...

Identical runs (equal ``settings_hash``: every config value but logging / output options, the
names and the task order) count once, the newest wins::

    df = load_runs(["multirun/digits8"])
    df.groupby(["method", "method.alpha"])["acc"].agg(["mean", "std", "count"])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from otmf_exp.errors import UserError

log = logging.getLogger(__name__)

#: the scalar metrics every run reports (floats, in % for the accuracies)
METRICS = ("acc", "bwt", "normalized_acc", "wall_time_s", "peak_memory_mb")
#: the first columns, in this order (the rest follow in the order the sources give them)
_LEAD = ("run_dir", "method", "task_seq", "backbone", "protocol", "seed", "order_seed", "alpha", *METRICS)
_LEAD += ("settings_hash",)
#: what identifies a run besides its config values: the names and the task order it ran
_IDENTITY = ("method", "task_seq", "backbone", "protocol", "seed", "alpha", "order")


#: config values that cannot change a result (where and how a run was logged, saved, run, and the
#: evaluation's batching): they neither split table rows nor make two runs different (a run
#: repeated with another ``backbone.batch_size`` is a duplicate, not a second replicate). Declared
#: on the schema fields (``result_neutral``: :func:`otmf_exp.schema.neutral`), never listed here.
def _no_result() -> tuple[str, ...]:
    from otmf_exp.config import neutral_config_keys

    return neutral_config_keys(tables=True)


NO_RESULT = _no_result()
_NOT_IDENTITY = set(NO_RESULT)
#: config values that make replicates of one experiment (mean ± std over them), never a new row;
#: ``alpha`` is applied to the method's own field (``method.*``), which is compared instead
REPLICATE = ("seed", "order_seed", "task_order", "alpha")
#: what the W&B tracker puts in a run's summary, besides ``per_task/<task>`` and ``step/...``
_SUMMARY = {*METRICS, "order", "acc_matrix"}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_missing(v: Any) -> bool:
    """None, NaN and pandas' NA (not lists, which ``pd.isna`` would test element-wise)."""
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short hash of a run's settings (config values but logging / output options, names,
    task order), equal for identical runs: the ``settings_hash`` column, :func:`dedupe`'s key."""
    plain = {
        k: v.item() if isinstance(v, np.generic) else v
        for k, v in settings.items()
        if not is_missing(v) and k not in _NOT_IDENTITY and not k.startswith(("logger.", "provenance.", "_"))
    }
    return hashlib.sha1(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finish(rec: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Names from ``<group>.name`` where missing, protocol ``continual`` by default, the hash."""
    for name in ("method", "task_seq", "backbone"):
        if is_missing(rec.get(name)):
            rec[name] = rec.get(f"{name}.name")
    if is_missing(rec.get("protocol")):
        rec["protocol"] = "continual"
    rec["settings_hash"] = settings_hash({**settings, **{k: rec.get(k) for k in _IDENTITY}})
    rec["config_keys"] = sorted(settings)
    return rec


def result_keys(config_keys: Iterable[str]) -> list[str]:
    """The config keys whose values can change a run's result and are not replicate keys: the
    columns that must agree between the runs pooled in one table row."""
    return sorted(
        k
        for k in config_keys
        if k not in NO_RESULT
        and k not in REPLICATE
        and not k.startswith(("logger.", "hydra.", "provenance.", "_"))
    )


def _run_record(metrics_file: Path) -> dict[str, Any] | None:
    """One run's row, or None (with a warning naming the file) when its files cannot be read as a
    run: not JSON / YAML, not a mapping, a YAML tag that safe loading refuses, no ``acc``."""
    cfg_file = metrics_file.parent / "config.yaml"
    try:
        m = json.loads(metrics_file.read_text())
        raw = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as e:
        log.warning(
            "skipping unreadable run %s: %s", metrics_file.parent, str(e).splitlines()[0] if str(e) else e
        )
        return None
    if not isinstance(m, dict) or "acc" not in m or not isinstance(raw or {}, dict):
        log.warning("skipping %s: not a run's metrics.json / config.yaml", metrics_file.parent)
        return None
    problem = _metrics_problem(m)
    if problem:
        log.warning("skipping %s: metrics.json %s", metrics_file.parent, problem)
        return None
    rec = flatten(raw or {})
    rec.update(flatten(m.pop("method_config", None) or {}, "method."))  # what the method really ran
    settings = dict(rec)
    for k, v in m.items():
        if isinstance(v, Mapping):
            rec.update(flatten(v, f"{k}."))
        else:
            rec[k] = v
    rec["run_dir"] = str(metrics_file.parent)
    rec["finished_at"] = pd.Timestamp(metrics_file.stat().st_mtime, unit="s", tz="UTC")
    return _finish(rec, settings)


def _metrics_problem(m: dict[str, Any]) -> str | None:
    """What makes a metrics.json inconsistent (an ``acc_matrix`` that does not fit ``order``), or None."""
    order, mat = m.get("order"), m.get("acc_matrix")
    if not isinstance(order, list) or mat is None:
        return None
    t = len(order)
    if not isinstance(mat, list) or not all(isinstance(r, list) for r in mat):
        return "has an acc_matrix that is not a list of rows"
    if len(mat) > t or any(len(r) != t for r in mat):
        shape = f"{len(mat)} rows of {sorted({len(r) for r in mat})} values"
        return f"has an acc_matrix of {shape}, not (at most) {t} rows of {t} for its {t} tasks"
    return None


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Records -> DataFrame: metrics float64, integer settings Int64 (no ``100.0`` for 100),
    booleans ``boolean``, the rest as pandas infers (lists stay Python lists)."""
    df = pd.DataFrame(records, dtype=object) if records else pd.DataFrame(columns=["run_dir", *METRICS])
    for c in df.columns:
        if c in METRICS or c.startswith(("per_task.", "individual.")):
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
            continue
        vals = [v for v in df[c] if not is_missing(v)]
        if vals and all(isinstance(v, bool) for v in vals):
            df[c] = df[c].astype("boolean")
        elif vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            df[c] = df[c].astype("Int64")
        else:
            df[c] = df[c].infer_objects()
    lead = [c for c in _LEAD if c in df]
    return df[lead + [c for c in df.columns if c not in lead]]


def dedupe(df: pd.DataFrame, notes: list[str] | None = None) -> pd.DataFrame:
    """Identical runs (equal ``settings_hash``) once: the newest (``finished_at``) wins; an
    export row, undated, loses to a run dir. Each group of duplicates is listed in ``notes``,
    with the results when they disagree (the same settings gave another ``acc``)."""
    if df.empty:
        return df
    when = df["finished_at"] if "finished_at" in df else pd.Series(pd.NaT, index=df.index)
    keep = when.sort_values(kind="stable", na_position="first").index
    kept = df.loc[keep][~df.loc[keep, "settings_hash"].duplicated(keep="last")].sort_index()
    if len(kept) < len(df):
        log.info("%d duplicate run(s) (same settings, order and seed) counted once", len(df) - len(kept))
    if notes is not None:
        for i in kept.index:
            dups = df[df["settings_hash"] == df.at[i, "settings_hash"]]
            if len(dups) < 2:
                continue
            others = [str(r) for r in dups["run_dir"] if r != df.at[i, "run_dir"]]
            accs = sorted({round(float(a), 6) for a in dups.get("acc", []) if not is_missing(a)})
            what = (
                f"conflicting results (acc {', '.join(f'{a:g}' for a in accs)})"
                if len(accs) > 1
                else "same result"
            )
            notes.append(
                f"duplicate settings, {what}: kept {df.at[i, 'run_dir']} (newest), not counted: {', '.join(others)}"
            )
    return kept


def unfinished(paths: Iterable[str | Path]) -> list[str]:
    """Run dirs under ``paths`` that started (``config.yaml`` or ``steps.jsonl``) but hold no
    ``metrics.json``: runs that failed or are still running, left out of every table."""
    out = set()
    for p in map(Path, paths):
        if not p.is_dir():
            continue
        for f in [*p.rglob("config.yaml"), *p.rglob("steps.jsonl")]:
            if not (f.parent / "metrics.json").exists() and "checkpoints" not in f.parts:
                out.add(str(f.parent))
    return sorted(out)


def load_runs(
    paths: Iterable[str | Path] = (),
    wandb_exports: Iterable[str | Path] = (),
    keep_duplicates: bool = False,
    notes: list[str] | None = None,
) -> pd.DataFrame:
    """Every completed run under ``paths`` (run dirs, trees of them, or ``metrics.json`` files)
    and in ``wandb_exports`` (see :func:`load_wandb_export`): one row per run, index 0..n-1.
    ``notes`` (a list) receives one line per run left out: unfinished dirs, unreadable files,
    duplicates (with conflicting results said as such)."""
    paths = list(paths)
    records = []
    if notes is not None:
        notes += [f"unfinished (no metrics.json), not counted: {d}" for d in unfinished(paths)]
    for p in map(Path, paths):
        if not p.exists():
            log.warning("no such run dir: %s", p)
            continue
        for f in [p] if p.is_file() else sorted(p.rglob("metrics.json")):
            rec = _run_record(f)
            if rec is not None:
                records.append(rec)
            elif notes is not None:
                notes.append(f"unreadable metrics.json, not counted: {f}")
    df = _frame(records)
    exports = [load_wandb_export(f) for f in wandb_exports]
    if exports:
        df = pd.concat([d for d in [df, *exports] if not d.empty] or [df], ignore_index=True)
    df = df if keep_duplicates else dedupe(df, notes)
    return df.reset_index(drop=True)


def _value(v: Any) -> Any:
    """A CSV cell back to a Python value (numbers, booleans, JSON lists/dicts, null)."""
    if not isinstance(v, str):
        return v
    s = v.strip()
    if s == "" or s.lower() in ("null", "none", "nan"):
        return None
    try:
        return json.loads(s.replace("'", '"').replace("True", "true").replace("False", "false"))
    except json.JSONDecodeError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def _export_record(row: dict[str, Any], source: Path, config: Iterable[str] | None) -> dict[str, Any]:
    """A run of an export; ``config``: its config keys (JSON), None for a CSV row, whose config
    columns are the lowercase ones that are not summary values."""
    if config is None:
        config = [k for k in row if k[:1].islower() and "/" not in k and k not in _SUMMARY]
    settings = {k: row.get(k) for k in config}
    rec: dict[str, Any] = {}
    for k, v in row.items():
        if k.startswith("_") or k.startswith("acc_matrix"):  # W&B internals; the matrix is a file ref
            continue
        if k[:1].isupper():  # the UI's own columns: Name, State, Created, Runtime, ...
            rec[f"wandb.{k.lower()}"] = v
        else:
            rec[k.replace("per_task/", "per_task.")] = v
    order = rec.get("order")
    tasks = [k.split(".", 1)[1] for k in rec if k.startswith("per_task.")]
    rec["order"] = order.split(",") if isinstance(order, str) else list(order or tasks)
    rec["run_dir"] = str(rec.get("wandb.name") or source)
    return _finish(rec, settings)


def load_wandb_export(path: str | Path) -> pd.DataFrame:
    """Finished runs of an exported W&B project: the UI's runs-table CSV (config columns dotted,
    e.g. ``method.name``; summary columns ``acc``, ``per_task/<task>``) or a JSON list of
    ``{"name", "config", "summary"}`` objects (see the README for the export)."""
    path = Path(path)
    rows: list[tuple[dict[str, Any], list[str] | None]] = []
    try:
        if path.suffix == ".json":
            for it in json.loads(path.read_text()):
                if "config" in it:
                    cfg = flatten(it["config"])
                    rows.append(
                        ({**cfg, **flatten(it.get("summary", {})), "Name": it.get("name")}, list(cfg))
                    )
                else:
                    rows.append((dict(it), None))
        else:
            raw = pd.read_csv(path, dtype=str, keep_default_na=False)
            rows = [({k: _value(v) for k, v in r.items()}, None) for r in raw.to_dict("records")]
    except (ValueError, TypeError, AttributeError, RecursionError) as e:  # not JSON / CSV, or not of runs
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{path} is not a W&B runs export (a .csv, or a .json list of runs): {first}"
        ) from None
    done = [(r, c) for r, c in rows if r.get("State") in (None, "finished") and not is_missing(r.get("acc"))]
    return _frame([_export_record(r, path, c) for r, c in done])


def load_steps(runs: pd.DataFrame) -> pd.DataFrame:
    """``steps.jsonl`` of every run in ``runs``, one row per (run, step): ``run_dir``, ``step``,
    ``task``, ``acc.<task>``, ``avg_acc``, ``time_s``, ``eval_time_s``, ``peak_memory_mb``, the
    method's records (lists such as loss curves stay lists)."""
    records = []
    for run_dir in runs.get("run_dir", pd.Series(dtype=object)):
        f = Path(run_dir) / "steps.jsonl"
        if f.exists():
            lines = f.read_text().splitlines()
            records += [{"run_dir": run_dir, **flatten(json.loads(s))} for s in lines if s.strip()]
    return pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=["run_dir", "step"])
