"""Result tables (OTMF, arXiv 2511.19561, and baselines): runs DataFrame in, one row per table line out.

The runs DataFrame of :mod:`otmf_exp.reporting.runs` is aggregated with pandas ``groupby``,
with the published numbers side by side.

Runs are grouped into *blocks* ``(protocol, backbone, task_seq)`` and, inside a block, into
rows ``(method, variant)``: the variant lists the ``method.*`` fields that differ between the
runs of that method in the block (an α sweep gives ``alpha=0.5`` ... rows; a method run with a
single setting has no variant). Everything else that differs between runs of a row — task
order, ``seed`` — is a replicate: cells are mean ± sample std (ddof=1) over them, ``n`` says
how many. Published numbers come from ``otmf_exp/data/reference_numbers.csv`` (column
``source``); Δ = ours − published. :mod:`otmf_exp.reporting.render` writes the documents and
``scripts/make_tables.py`` is the CLI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from otmf_exp.errors import UserError
from otmf_exp.reporting.runs import METRICS, NO_RESULT, is_missing, result_keys

log = logging.getLogger(__name__)

#: row order inside a block: references first, then the tables' method order
METHOD_ORDER = (
    "pretrained",
    "individual",
    "continual_finetuning",
    "continual_finetune",
    "averaging",
    "fisher",
    "regmean",
    "task_arithmetic",
    "ties",
    "tsvm",
    "magmax",
    "consensus",
    "opcm",
    "dop",
    "adamerging",
    "adamerging_task",
    "adamerging_layer",
    "adamerging_layer_plus",
    "concrete_ta",
    "concrete_adamerging_task",
    "concrete_adamerging_layer",
    "mingle",
    "mingle_star",
    "wemoe",
    "otmf",
    "otmf_no_masks",
    "otmf_no_head_tuning",
)
#: OTMF settings of the paper's headline numbers; a run that changes one has no published number
_OTMF_PAPER = {
    "alpha": 0.8,
    "sinkhorn.blur": 0.05,
    "sinkhorn.p": 2,
    "schedule": "alternate",
    "pre_data": "previous_task",
    "mask.granularity": "element",
    "iterations": 100,
    "select": "authors",
}
#: the authors' head tuning (test split, all of it: leakage) — only runs with it match a published
#: number that used head tuning; a default run (25 % of train) is ours, not the paper's setting
_OTMF_PAPER_HEADS = {"which": "authors", "split": "test", "fraction": 1.0, "steps": 100, "lr": 0.01}
#: MINGLE settings of the published numbers (null options resolve to the authors' per-backbone values);
#: the layer lists of MINGLE* (tab1.sh's [attn, fc1] and the paper's "qkv & fc1")
_MINGLE_PAPER = {
    "lora_r": 64,
    "batch_reduce": True,
    "max_steps": 50,
    "seed_split": "test",
    "subspace_k": 3,
    "constraint_gate": True,
    "gamma": 1.0,
    "beta": 0.99,
    "gate_init": "normal",
    "zero_diag": False,
}
#: Consensus TA settings of the published rows (MINGLE's consensus_ta.yaml: λ 0.1, λ_t 0.2, k 2)
_CONSENSUS_PAPER = {"k": 2, "inclusive": False, "fusionbench_mask_bug": False, "merged_mask": "ones"}
_CONSENSUS_COEFS = {"scaling": (None, 0.1), "tall_mask_lambda": (None, 0.2)}
#: TSV-Merge settings of the published rows (FusionBench's TaskSingularVectorMerging.yaml)
_TSVM_PAPER = {"alpha": 1.0, "matrices": "all_2d", "exclude_keys": None, "svd_dtype": "auto"}
#: continual fine-tuning settings of the published rows (MINGLE's continual_clip_finetune.yaml: full
#: fine-tuning, FusionBench's Adam + cosine); LoRA or another budget has no published number
_CFT_PAPER = {
    "lr": 1e-5,
    "steps": 4000,
    "batch_size": 16,
    "weight_decay": 0.0,
    "scheduler": "cosine",
    "split": "train",
    "lora.enabled": False,
}
_MINGLE_NULL = ("lr", "batch_size", "seed_samples", "seed_sampling", "subspace", "static_gate")
_MINGLE_STAR = (["attn", "fc1"], ["q_proj", "k_proj", "v_proj", "fc1"])
#: Concrete settings of the published runs (FusionBench's YAMLs; max_steps null = 2000 TA / 1000 AdaMerging)
_CONCRETE_PAPER = {
    "scaling_factor": 0.3,
    "initial_logits": 0.0,
    "temperature": 0.5,
    "lr": 1e-3,
    "base_lr": 1.0,
    "adamerging_lr": 1e-3,
    "max_adamerging_steps": 1000,
    "batch_size": 16,
    "eval_mask_type": "continuous",
    "clamp_weights": False,
    "adapt_split": "test",
}
_CONCRETE_STEPS = {"task_arithmetic": 2000, "adamerging": 1000}
#: columns of a table row that identify it; the statistics follow
ROW_KEYS = ["protocol", "backbone", "task_seq", "method", "variant"]
_REF_KEYS = ["protocol", "backbone", "task_seq", "method"]


def py(v: Any) -> Any:
    """A DataFrame cell as a plain Python value (NA -> None, numpy scalars -> int/float/bool)."""
    if is_missing(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """The published numbers: ``source, protocol, backbone, task_seq, method, metric, value, std,
    note`` (``std`` NaN when the paper gives none)."""
    src = Path(path) if path else resources.files("otmf_exp") / "data" / "reference_numbers.csv"
    try:
        with src.open(encoding="utf-8") as f:
            return pd.read_csv(f, dtype={"value": float, "std": float})
    except (UnicodeDecodeError, ValueError, pd.errors.ParserError) as e:  # not UTF-8, not a CSV, a bad value
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"--reference {src} is not a UTF-8 CSV of published numbers ({first}); fix or drop it"
        ) from None


def reference_method(method: str, cfg: Mapping[str, Any], protocol: str | None = None) -> str | None:
    """The name a run has in reference_numbers.csv, or None when the paper has no such setting."""
    if method == "adamerging" and cfg.get("granularity"):
        # continual: the published rows (MINGLE Tables 1-2) are C. AdaMerging (method=c_adamerging,
        # continual=current_only); a pairwise continual run has none. ++ = tv_prune=ties
        if protocol == "continual" and cfg.get("continual", "pairwise") != "current_only":
            return None
        plus = "_plus" if cfg.get("tv_prune") == "ties" else ""
        return f"adamerging_{cfg['granularity']}{plus}"
    if method == "continual_finetune":
        return "continual_finetuning" if all(cfg.get(k, v) == v for k, v in _CFT_PAPER.items()) else None
    if method == "concrete":
        merge = cfg.get("merge", "task_arithmetic")
        steps = cfg.get("max_steps")
        if any(k in cfg and cfg[k] != v for k, v in _CONCRETE_PAPER.items()) or steps not in (
            None,
            _CONCRETE_STEPS.get(merge),
        ):
            return None
        return (
            "concrete_ta"
            if merge == "task_arithmetic"
            else f"concrete_adamerging_{cfg.get('granularity', 'task')}"
        )
    if method == "mingle":
        if any(k in cfg and cfg[k] != v for k, v in _MINGLE_PAPER.items()) or any(
            k in cfg for k in _MINGLE_NULL
        ):
            return None
        layers = cfg.get("lora_layer")
        if layers is None:
            return "mingle"
        return "mingle_star" if list(layers) in _MINGLE_STAR else None
    if method == "consensus":
        paper = all(cfg.get(k, v) == v for k, v in _CONSENSUS_PAPER.items())
        paper = paper and all(cfg.get(k) in ok for k, ok in _CONSENSUS_COEFS.items())
        return "consensus_ta" if paper else None
    if method == "tsvm":
        return "tsvm" if all(cfg.get(k, v) == v for k, v in _TSVM_PAPER.items()) else None
    if method == "otmf":
        if any(k in cfg and cfg[k] != v for k, v in _OTMF_PAPER.items()):
            return None
        tuned = cfg.get("head_tuning.enabled", True) is not False
        if tuned and any(cfg.get(f"head_tuning.{k}", v) != v for k, v in _OTMF_PAPER_HEADS.items()):
            return None
        if cfg.get("mask.enabled") is False:
            return "otmf_no_masks" if cfg.get("head_tuning.enabled", True) else None
        return "otmf_no_head_tuning" if cfg.get("head_tuning.enabled") is False else "otmf"
    return method


def _task_order(run: pd.Series) -> list[str]:
    """The task sequence's own order when the run covers its tasks, else the run's order."""
    order = run.get("order")
    if not isinstance(order, list) or not order:
        order = sorted(c[9:] for c, v in run.items() if c.startswith("per_task.") and not is_missing(v))
    given = run.get("task_seq.tasks")
    return list(given) if isinstance(given, list) and sorted(given) == sorted(order) else list(order)


def label_runs(runs: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """``runs`` plus the table columns: ``variant`` (the ``by`` keys, then the ``method.*``
    fields varying among the runs of a method in a block), ``table_seq`` (the task sequence,
    ``"(N tasks)"`` added when a block mixes task sets), ``tasks`` and ``ref_method``."""
    df = runs.copy()
    for k in ("protocol", "backbone", "task_seq", "method", *by):
        if k not in df:
            df[k] = None
    df["tasks"] = [_task_order(r) for _, r in df.iterrows()]
    df["_task_set"] = df["tasks"].map(lambda ts: ",".join(sorted(ts)))
    df["_extra"] = [", ".join(f"{k}={py(r[k])}" for k in by) for _, r in df.iterrows()]
    method_cols = sorted(
        c for c in df if c.startswith("method.") and c != "method.name" and c not in NO_RESULT
    )
    # every other result-relevant setting (eval_split, backbone options, ...) must agree too
    keys_of = df["config_keys"] if "config_keys" in df else pd.Series([[]] * len(df), index=df.index)
    other = {"method", "task_seq", "backbone", "protocol", "task_seq.tasks", *by}
    other_cols = sorted(
        {k for ks in keys_of if isinstance(ks, list) for k in result_keys(ks)}
        - other
        - set(method_cols)
        - {c for c in df if c.endswith(".name")}
    )
    other_cols = [c for c in other_cols if c in df]
    variant = pd.Series("", index=df.index, dtype=object)
    group_keys = ["protocol", "backbone", "task_seq", "_task_set", "method", "_extra"]
    for _, g in df.groupby(group_keys, dropna=False, sort=False):
        keyed = {c: g[c].map(lambda v: json.dumps(py(v), default=str)) for c in [*other_cols, *method_cols]}
        varying = [c for c in other_cols if keyed[c].nunique() > 1]
        varying += [c for c in method_cols if keyed[c].nunique() > 1]
        for i in g.index:
            parts = [df.at[i, "_extra"]] if by else []
            names = [c[7:] if c.startswith("method.") else c for c in varying]
            variant[i] = ", ".join([*parts, *(f"{n}={py(df.at[i, c])}" for n, c in zip(names, varying))])
    df["variant"] = variant
    sets = df.groupby(["protocol", "backbone", "task_seq"], dropna=False)["_task_set"].transform("nunique")
    df["table_seq"] = [
        py(s) if k == 1 else f"{py(s)} ({len(ts)} tasks)"
        for s, k, ts in zip(df["task_seq"], sets, df["tasks"])
    ]
    df["ref_method"] = [
        reference_method(
            py(r["method"]),
            {c[7:]: py(r[c]) for c in method_cols if not is_missing(r[c])},
            py(r.get("protocol")),
        )
        for _, r in df.iterrows()
    ]
    return df


def _reference_wide(reference: pd.DataFrame) -> pd.DataFrame:
    """One row per published (protocol, backbone, task_seq, method): ``acc_ref``, ``acc_ref_std``,
    ``bwt_ref``, ``bwt_ref_std``, ``per_task.<task>_ref``, ``ref_source``, ``ref_tasks``."""
    ref = reference.assign(col=reference["metric"].str.replace(r"^acc/", "per_task.", regex=True))
    value = ref.pivot_table(index=_REF_KEYS, columns="col", values="value", aggfunc="first", sort=False)
    value.columns = [f"{c}_ref" for c in value.columns]
    std = ref.groupby([*_REF_KEYS, "col"], sort=False)["std"].first().unstack("col")
    std = std.reindex(columns=["acc", "bwt"]).add_suffix("_ref_std")
    per_task = ref[ref["col"].str.startswith("per_task.")]
    tasks = per_task.groupby(_REF_KEYS, sort=False)["col"].agg(lambda s: [c[9:] for c in s])
    source = ref.groupby(_REF_KEYS, sort=False)["source"].first()
    out = value.join(std, how="outer").join(source.rename("ref_source")).join(tasks.rename("ref_tasks"))
    return out.reindex(columns=[*out.columns, *(c for c in ("acc_ref", "bwt_ref") if c not in out)])


def aggregate(
    runs: pd.DataFrame, reference: pd.DataFrame | None = None, by: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per (protocol, backbone, task_seq, method, variant): ``n``, ``<metric>_mean`` and
    ``<metric>_std`` for every metric and ``per_task.<task>``, ``tasks``, ``run_dirs``, and with
    a ``reference``: ``acc_ref``, ``acc_ref_std``, ``acc_delta`` (same for ``bwt``),
    ``per_task.<task>_ref``, ``ref_method``, ``ref_source``. Rows in :func:`row_order`.

    ``by``: extra config columns (e.g. ``eval_split``) that split rows too; they lead the variant.
    """
    if runs.empty:
        return pd.DataFrame(columns=[*ROW_KEYS, "n", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))])
    df = label_runs(runs, by)
    metric_cols = [*METRICS, *(c for c in df if c.startswith("per_task."))]
    df = df.reindex(columns=[*df.columns, *(m for m in METRICS if m not in df)])
    df[metric_cols] = df[metric_cols].replace([np.inf, -np.inf], np.nan)  # ±inf: in no n, no mean
    for c in _bounded(metric_cols):  # an accuracy outside [0, 100]: in no n, no mean (a note says so)
        v = pd.to_numeric(df[c], errors="coerce")
        df[c] = v.where(~((v < ACC_RANGE[0]) | (v > ACC_RANGE[1])), np.nan)
    keys = ROW_GROUP
    df["_row"] = df.groupby(keys, dropna=False, sort=False).ngroup()
    g = df.groupby("_row")
    stats = g[metric_cols].agg(["mean", "std"])  # pandas' std is the sample std (ddof=1)
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    first = df.drop_duplicates("_row").set_index("_row")[[*keys, "tasks", "ref_method"]]
    n = g["acc"].count().rename("n")  # exactly the runs in the mean (a NaN acc is listed in notes)
    out = pd.concat([first, n, stats, g["run_dir"].agg(list).rename("run_dirs")], axis=1)
    out = out.reset_index(drop=True).rename(columns={"task_seq": "ref_task_seq", "table_seq": "task_seq"})
    if reference is not None and not reference.empty:
        wide = _reference_wide(reference).drop(columns="ref_tasks")
        wide.index = wide.index.set_names(["protocol", "backbone", "ref_task_seq", "ref_method"])
        out = out.join(wide, on=["protocol", "backbone", "ref_task_seq", "ref_method"])
        for c in [c for c in out if c.startswith("per_task.") and c.endswith("_ref")]:
            out.loc[~out["tasks"].map(lambda ts, t=c[9:-4]: t in ts), c] = np.nan  # a task the row lacks
        for m in ("acc", "bwt"):
            out[f"{m}_delta"] = out[f"{m}_mean"] - out[f"{m}_ref"]
    out = out.drop(columns=["ref_task_seq", "_task_set"])
    return sort_rows(out)


#: the range of an accuracy in %: ``acc`` and ``per_task.<task>`` outside it are refused from tables
ACC_RANGE = (0.0, 100.0)
ROW_GROUP = ["protocol", "backbone", "task_seq", "table_seq", "_task_set", "method", "variant"]


def _bounded(cols: Sequence[str]) -> list[str]:
    return [c for c in cols if c == "acc" or (c.startswith("per_task.") and not c.endswith(("_ref", "_std")))]


def table_notes(runs: pd.DataFrame, by: Sequence[str] = ()) -> list[str]:
    """The ``note:`` lines of a table (:func:`otmf_exp.reporting.notes.table_notes`)."""
    from otmf_exp.reporting.notes import table_notes as notes

    return notes(runs, by)


def reference_only_rows(summary: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Rows for published methods that were not run (MINGLE, Fisher, ...) in the blocks that were."""
    blocks = set(summary[["protocol", "backbone", "task_seq"]].itertuples(index=False, name=None))
    have = set(summary[["protocol", "backbone", "task_seq", "ref_method"]].itertuples(index=False, name=None))
    wide = _reference_wide(reference).reset_index()
    keys = list(wide[_REF_KEYS].itertuples(index=False, name=None))
    extra = wide[[k[:3] in blocks and k not in have for k in keys]].copy()
    extra["ref_method"], extra["variant"], extra["n"] = extra["method"], "(published only)", 0
    extra["tasks"] = extra.pop("ref_tasks").map(lambda ts: ts if isinstance(ts, list) else [])
    return extra.reset_index(drop=True)


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


def row_order(r: Mapping[str, Any]) -> tuple:
    """Blocks alphabetically; inside a block the paper's method order, then variants."""
    m = str(py(r["method"]))
    rank = METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
    block = tuple(str(py(r[k])) for k in ("protocol", "backbone", "task_seq"))
    return (*block, rank, m, _variant_key(str(r["variant"])))


def sort_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` in :func:`row_order`, index 0..n-1."""
    order = sorted(range(len(summary)), key=lambda i: row_order(summary.iloc[i]))
    return summary.iloc[order].reset_index(drop=True)


def per_task(summary: pd.DataFrame) -> pd.DataFrame:
    """Long form: one row per (table row, task) with ``n``, ``mean``, ``std``, ``ref``."""
    ex = summary.explode("tasks").dropna(subset=["tasks"]).rename(columns={"tasks": "task"})
    cols = [*ROW_KEYS, "task", "n"]
    if ex.empty:
        return pd.DataFrame(columns=[*cols, "mean", "std", "ref"])
    stat = {
        s: [py(r.get(f"per_task.{r['task']}_{s}")) for _, r in ex.iterrows()] for s in ("mean", "std", "ref")
    }
    out = ex[cols].reset_index(drop=True)
    return out.assign(**{s: pd.Series(v, dtype="float64") for s, v in stat.items()})
