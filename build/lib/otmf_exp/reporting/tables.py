"""Result tables for the OTMF reproduction (arXiv 2511.19561) and its baselines: run dirs (or a W&B
export) in, markdown / LaTeX / CSV out, with the published numbers side by side.

Runs are grouped into *blocks* ``(protocol, backbone, task_seq)`` and, inside a block, into
rows ``(method, variant)``: the variant lists the fields of ``method_config`` that differ between
the runs of that method in the block (an α sweep gives ``alpha=0.5`` ... rows; a method run
with a single setting has no variant). Everything else that differs between runs of a row —
task order, ``seed`` — is a replicate: cells are mean ± sample std (ddof=1) over them, ``n``
says how many. Identical runs (same settings, order and seed) count once (the newest).
Published numbers come from ``otmf_exp/data/reference_numbers.csv`` (column ``source``);
Δ = ours − published. ``scripts/make_tables.py`` is the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

METRICS = ("acc", "bwt", "normalized_acc", "wall_time_s", "peak_memory_mb")
#: row order inside a block: references first, then the tables' method order
METHOD_ORDER = (
    "pretrained",
    "individual",
    "continual_finetuning",
    "averaging",
    "fisher",
    "regmean",
    "task_arithmetic",
    "ties",
    "magmax",
    "opcm",
    "adamerging",
    "adamerging_task",
    "adamerging_layer",
    "adamerging_layer_plus",
    "mingle",
    "otmf",
    "otmf_no_masks",
    "otmf_no_head_tuning",
)
#: method_config fields that never define a variant
_NOT_VARIANT = {"name"}
#: OTMF settings of the paper's headline numbers; a run that changes one has no published number
_OTMF_PAPER = {
    "alpha": 0.8,
    "sinkhorn.blur": 0.05,
    "sinkhorn.p": 2,
    "schedule": "alternate",
    "pre_data": "previous_task",
    "mask.granularity": "element",
    "iterations": 100,
}


# ---- loading ----------------------------------------------------------------------------------
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_runs(paths: Iterable[str | Path], keep_duplicates: bool = False) -> list[dict[str, Any]]:
    """Every completed run (a dir with ``metrics.json``) under ``paths``; adds ``run_dir``."""
    runs = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            log.warning("no such run dir: %s", p)
            continue
        files = [p] if p.is_file() else sorted(p.rglob("metrics.json"))
        for f in files:
            try:
                m = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                log.warning("skipping unreadable %s: %s", f, e)
                continue
            m["run_dir"] = str(f.parent)
            m["_mtime"] = f.stat().st_mtime
            cfg_file = f.parent / "config.yaml"
            if cfg_file.exists():
                m["config"] = flatten(yaml.safe_load(cfg_file.read_text()) or {})
            runs.append(m)
    return runs if keep_duplicates else dedupe(runs)


def _identity(r: dict[str, Any]) -> str:
    keys = ("protocol", "backbone", "task_seq", "method", "method_config", "order", "seed", "alpha")
    return json.dumps([r.get(k) for k in keys], sort_keys=True, default=str)


def dedupe(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    for r in runs:
        k = _identity(r)
        if k not in newest or r.get("_mtime", 0) >= newest[k].get("_mtime", 0):
            newest[k] = r
    if len(newest) < len(runs):
        log.info("%d duplicate run(s) (same settings, order and seed) counted once", len(runs) - len(newest))
    return list(newest.values())


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        d = out
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def _value(v: Any) -> Any:
    """A CSV cell back to a Python value (numbers, booleans, JSON lists/dicts, null)."""
    if not isinstance(v, str):
        return v
    s = v.strip()
    if s == "" or s.lower() in ("null", "none", "nan"):
        return None
    for conv in (json.loads, float):
        try:
            return conv(
                s if conv is float else s.replace("'", '"').replace("True", "true").replace("False", "false")
            )
        except (ValueError, json.JSONDecodeError):
            pass
    return s


def load_wandb_export(path: str | Path) -> list[dict[str, Any]]:
    """Runs from an exported W&B project: the UI's runs-table CSV (config columns dotted, e.g.
    ``method.name``; summary columns ``acc``, ``per_task/<task>``) or a JSON list of
    ``{"name", "config", "summary"}`` objects (README "Tables and plots" says how to export)."""
    path = Path(path)
    if path.suffix == ".json":
        items = json.loads(path.read_text())
        rows = [
            {**flatten(it.get("config", {})), **flatten(it.get("summary", {}), ""), "_name": it.get("name")}
            if "config" in it
            else it
            for it in items
        ]
    else:
        with path.open(newline="") as f:
            rows = [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]
    runs = []
    for row in rows:
        if row.get("State") not in (None, "finished") or row.get("acc") is None:
            continue
        cfg = _unflatten({k: v for k, v in row.items() if "." in k and not k.startswith("per_task/")})
        per_task = {
            k.split("/", 1)[1]: float(v)
            for k, v in row.items()
            if k.startswith("per_task/") and v is not None
        }
        order = row.get("order")
        order = order.split(",") if isinstance(order, str) else list(order or per_task)
        runs.append(
            {
                "method": row.get("method.name"),
                "task_seq": row.get("task_seq.name"),
                "backbone": row.get("backbone.name"),
                "protocol": row.get("protocol", "continual"),
                "seed": row.get("seed"),
                "alpha": row.get("alpha"),
                "order": order,
                "method_config": cfg.get("method", {}),
                "per_task": per_task,
                **{m: (float(row[m]) if row.get(m) is not None else None) for m in METRICS},
                "run_dir": str(row.get("_name") or row.get("Name") or path),
            }
        )
    return runs


def load_reference(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The published numbers (``source, protocol, backbone, task_seq, method, metric, value, std, note``)."""
    text = (
        Path(path).read_text()
        if path
        else (resources.files("otmf_exp") / "data" / "reference_numbers.csv").read_text()
    )
    rows = list(csv.DictReader(io.StringIO(text)))
    for r in rows:
        r["value"] = float(r["value"])
        r["std"] = float(r["std"]) if r.get("std") else None
    return rows


# ---- aggregation ------------------------------------------------------------------------------
def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def reference_method(method: str, cfg: dict[str, Any]) -> str | None:
    """The name a run has in reference_numbers.csv, or None when the paper has no such setting."""
    if method == "adamerging" and cfg.get("granularity"):
        return f"adamerging_{cfg['granularity']}"
    if method == "otmf":
        if any(k in cfg and cfg[k] != v for k, v in _OTMF_PAPER.items()):
            return None
        if cfg.get("mask.enabled") is False:
            return "otmf_no_masks" if cfg.get("head_tuning.enabled", True) else None
        return "otmf_no_head_tuning" if cfg.get("head_tuning.enabled") is False else "otmf"
    return method


def aggregate(
    runs: list[dict[str, Any]], reference: list[dict[str, Any]] | None = None, by: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """One row per (protocol, backbone, task_seq, method, variant) with means, stds, n and references.

    ``by``: extra config keys (dotted, read from each run's ``config.yaml``, e.g. ``eval_split``)
    that split rows as well; they appear in the variant label.
    """
    by = list(by)
    by_method: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        tasks = tuple(sorted(r.get("order") or r.get("per_task", {})))
        extra = tuple(f"{k}={r.get('config', {}).get(k)}" for k in by)
        by_method[
            (r.get("protocol"), r.get("backbone"), r.get("task_seq"), tasks, r.get("method"), extra)
        ].append(r)
    multi_tasks = defaultdict(set)
    for key in by_method:
        multi_tasks[key[:3]].add(key[3])
    refs = defaultdict(dict)
    for ref in reference or []:
        refs[(ref["protocol"], ref["backbone"], ref["task_seq"], ref["method"])][ref["metric"]] = ref
    rows = []
    for (protocol, backbone, task_seq, tasks, method, extra), group in by_method.items():
        flat = [
            {k: v for k, v in flatten(r.get("method_config") or {}).items() if k not in _NOT_VARIANT}
            for r in group
        ]
        varying = sorted({k for f in flat for k in f if len({json.dumps(g.get(k)) for g in flat}) > 1})
        variants: dict[str, list[int]] = defaultdict(list)
        for i, f in enumerate(flat):
            variants[", ".join([*extra, *(f"{k}={f.get(k)}" for k in varying)])].append(i)
        for variant, idx in variants.items():
            members = [group[i] for i in idx]
            seq = (
                task_seq
                if len(multi_tasks[(protocol, backbone, task_seq)]) == 1
                else f"{task_seq} ({len(tasks)} tasks)"
            )
            row: dict[str, Any] = {
                "protocol": protocol,
                "backbone": backbone,
                "task_seq": seq,
                "method": method,
                "variant": variant,
                "n": len(members),
                "run_dirs": [m.get("run_dir") for m in members],
            }
            for m in METRICS:
                row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([x.get(m) for x in members])
            given = members[0].get("config", {}).get("task_seq.tasks")
            order = members[0].get("order") or sorted(members[0].get("per_task", {}))
            if given and sorted(given) == sorted(order):
                order = list(given)  # the task sequence's own order, not one run's shuffled order
            row["tasks"] = order
            row["per_task"] = {t: _mean_std([x.get("per_task", {}).get(t) for x in members]) for t in order}
            ref_name = reference_method(method, flat[idx[0]])
            row["ref_method"] = ref_name
            published = refs.get((protocol, backbone, task_seq, ref_name), {})
            for m in ("acc", "bwt"):
                ref = published.get(m)
                row[f"{m}_ref"] = ref["value"] if ref else None
                row[f"{m}_ref_std"] = ref["std"] if ref else None
                row[f"{m}_delta"] = (
                    (row[f"{m}_mean"] - ref["value"]) if ref and row[f"{m}_mean"] is not None else None
                )
            row["ref_source"] = next((r["source"] for r in published.values()), None)
            row["per_task_ref"] = {
                t: published[f"acc/{t}"]["value"] for t in order if f"acc/{t}" in published
            }
            rows.append(row)
    rows.sort(key=row_order)
    return rows


def _variant_key(variant: str) -> list[tuple[int, float, str]]:
    """Numeric values sort numerically (alpha=0.5 < alpha=0.10 would be wrong as text)."""
    out = []
    for part in variant.split(", "):
        value = part.split("=", 1)[-1]
        try:
            out.append((0, float(value), ""))
        except ValueError:
            out.append((1, 0.0, part))
    return out


def row_order(r: dict[str, Any]) -> tuple:
    """Blocks alphabetically; inside a block the paper's method order, then variants."""
    m = str(r["method"])
    rank = METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
    return (str(r["protocol"]), str(r["backbone"]), str(r["task_seq"]), rank, m, _variant_key(r["variant"]))


def reference_only_rows(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for published methods that were not run (MINGLE, Fisher, ...) in the blocks that were."""
    blocks = {(r["protocol"], r["backbone"], r["task_seq"]) for r in rows}
    have = {(r["protocol"], r["backbone"], r["task_seq"], r["ref_method"]) for r in rows}
    extra: dict[tuple, dict[str, Any]] = {}
    for ref in reference:
        key = (ref["protocol"], ref["backbone"], ref["task_seq"], ref["method"])
        if key[:3] not in blocks or key in have:
            continue
        row = extra.setdefault(
            key,
            {
                "protocol": key[0],
                "backbone": key[1],
                "task_seq": key[2],
                "method": key[3],
                "variant": "(published only)",
                "n": 0,
                "tasks": [],
                "per_task": {},
                "per_task_ref": {},
                "ref_method": key[3],
                "ref_source": ref["source"],
            },
        )
        if ref["metric"] in ("acc", "bwt"):
            row[f"{ref['metric']}_ref"], row[f"{ref['metric']}_ref_std"] = ref["value"], ref["std"]
        elif ref["metric"].startswith("acc/"):
            row["per_task_ref"][ref["metric"][4:]] = ref["value"]
    return list(extra.values())
