"""Figures for continual-merging runs: accuracy heatmaps, forgetting, ACC vs tasks, time/memory.

The per-step / forgetting views the OTMF reviewers asked for (arXiv 2511.19561): PNGs with
matplotlib's Agg backend, fixed pixel sizes.

- ``heatmap/<run>.png`` (:data:`HEATMAP_SIZE`): the accuracy matrix a[j][i] of one run
  (row = after merging step j, column = task i, blank = not yet seen), values annotated.
- ``forgetting/<run>.png`` (:data:`CURVE_SIZE`): per-task accuracy over steps of one run, each
  task from the step it was merged in, dashed line = its individual (fine-tuned) accuracy.
- ``acc_vs_tasks__<block>.png`` (:data:`CURVE_SIZE`): mean accuracy over the seen tasks vs number
  of tasks merged, one line per method (± std band over orders/seeds), from ``steps.jsonl``
  (:func:`otmf_exp.reporting.runs.load_steps`).
- ``time_memory__<block>.png`` (:data:`WIDE_SIZE`): merge time, evaluation time and peak memory
  per step, one line per method (mean over runs).
A block is ``protocol · backbone · task_seq`` and a line is a row of
:func:`otmf_exp.reporting.tables.aggregate`; runs come from the DataFrame of
:func:`otmf_exp.reporting.runs.load_runs`.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from otmf_exp.reporting.runs import load_runs, load_steps  # noqa: E402
from otmf_exp.reporting.tables import aggregate, py  # noqa: E402

log = logging.getLogger(__name__)

DPI = 100
HEATMAP_SIZE = (800, 700)  # pixels
CURVE_SIZE = (900, 560)
WIDE_SIZE = (1600, 520)


def _fig(size: tuple[int, int], ncols: int = 1) -> tuple[Any, Any]:
    return plt.subplots(1, ncols, figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays fixed
    plt.close(fig)
    return path


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")[:150] or "run"


def _title(m: dict[str, Any]) -> str:
    return f"{m.get('method')} · {m.get('backbone')} · {m.get('task_seq')} ({m.get('protocol')})"


def heatmap(m: Mapping[str, Any], path: Path) -> Path:
    """Accuracy matrix of one run (a row of the runs DataFrame, or a ``metrics.json`` dict)."""
    order = list(m["order"])
    a = np.array([[np.nan if v is None else v for v in row] for row in m["acc_matrix"]], dtype=float)
    fig, ax = _fig(HEATMAP_SIZE)
    im = ax.imshow(a, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    fs = 10 if len(order) <= 8 else 8 if len(order) <= 14 else 6
    for j in range(a.shape[0]):
        for i in range(a.shape[1]):
            if not np.isnan(a[j, i]):
                ax.text(
                    i,
                    j,
                    f"{a[j, i]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=fs,
                    color="white" if a[j, i] < 60 else "black",
                )
    ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
    steps = [f"{j + 1}: +{order[j]}" for j in range(a.shape[0])] if a.shape[0] == len(order) else ["joint"]
    ax.set_yticks(range(a.shape[0]), steps)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after merging step (task added)")
    bwt = py(m.get("bwt"))
    ax.set_title(
        f"{_title(m)}\nrun {Path(m.get('run_dir', '')).name} · ACC {m['acc']:.1f}"
        + (f" · BWT {bwt:+.1f}" if bwt is not None else "")
    )
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    return _save(fig, path)


def forgetting(m: Mapping[str, Any], steps: pd.DataFrame, path: Path) -> Path:
    """Per-task accuracy over continual steps of one run (its rows of :func:`load_steps`)."""
    order = list(m["order"])
    fig, ax = _fig(CURVE_SIZE)
    colors = plt.get_cmap("tab20" if len(order) > 10 else "tab10")
    for i, t in enumerate(order):
        seen = steps[["step", f"acc.{t}"]].dropna() if f"acc.{t}" in steps else steps.iloc[:0]
        xs, ys = seen["step"].tolist(), seen.get(f"acc.{t}", pd.Series(dtype=float)).tolist()
        c = colors(i % colors.N)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.6, color=c, label=t)
        ind = py(m.get(f"individual.{t}"))
        if ind is not None and xs:
            ax.hlines(ind, xs[0], len(order), colors=[c], linestyles="dashed", lw=0.8, alpha=0.6)
    ax.set_xlabel("merging step (number of tasks merged)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(range(1, len(order) + 1))
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"Per-task accuracy over steps — {_title(m)}\n"
        f"run {Path(m.get('run_dir', '')).name} · dashed: individual (fine-tuned) accuracy"
    )
    ax.legend(
        title="task",
        fontsize=8,
        ncol=2 if len(order) > 10 else 1,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
    )
    return _save(fig, path)


def _series(steps: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step: mean and sample std (0 for one run) of ``key`` over the runs in ``steps``."""
    v = pd.to_numeric(steps[key], errors="coerce") if key in steps else pd.Series(dtype=float)
    v = v.replace([np.inf, -np.inf], np.nan)
    stats = v.groupby(steps["step"].astype(int)).agg(["mean", "std"]).dropna(subset=["mean"]).sort_index()
    return stats.index.to_numpy(), stats["mean"].to_numpy(), stats["std"].fillna(0.0).to_numpy()


_MARKERS = "osD^vP*Xh<>p"


def _styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """Distinct line styles: references (pretrained, individual) dashed grey/black, methods in
    tab10 (tab20 beyond 10) with a marker each, so no two lines look alike."""
    refs = {
        "pretrained": {"color": "0.55", "ls": "--", "marker": None},
        "individual": {"color": "black", "ls": "--", "marker": None},
    }
    others = [lab for lab in labels if lab.split(" ")[0] not in refs]
    cmap = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    out = {}
    for lab in labels:
        base = lab.split(" ")[0]
        if base in refs:
            out[lab] = refs[base]
        else:
            i = others.index(lab)
            out[lab] = {"color": cmap(i % cmap.N), "ls": "-", "marker": _MARKERS[i % len(_MARKERS)]}
    return out


def acc_vs_tasks(groups: Mapping[str, pd.DataFrame], title: str, path: Path) -> Path:
    """One line per label: the steps of its runs (rows of :func:`load_steps`), mean ± std."""
    fig, ax = _fig(CURVE_SIZE)
    tmax = 1
    styles = _styles(list(groups))
    for label, steps in groups.items():
        xs, mean, std = _series(steps, "avg_acc")
        if len(xs) == 0:
            continue
        tmax = max(tmax, int(xs.max()))
        st = styles[label]
        n = steps["run_dir"].nunique()
        ax.plot(xs, mean, ms=4, lw=1.8, label=f"{label} (n={n})", **st)
        if n > 1 and st["ls"] == "-":
            ax.fill_between(xs, mean - std, mean + std, color=st["color"], alpha=0.12)
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("average accuracy on the tasks seen so far (%)")
    ax.set_xticks(range(1, tmax + 1))
    ax.grid(alpha=0.3)
    ax.set_title(f"ACC vs number of tasks — {title}\n(mean ± std over orders / seeds)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def time_memory(groups: Mapping[str, pd.DataFrame], title: str, path: Path) -> Path:
    """Merge time, evaluation time and peak memory per step, one line per label (mean)."""
    fig, (ax_t, ax_e, ax_m) = _fig(WIDE_SIZE, ncols=3)
    kind = "memory"
    styles = _styles(list(groups))
    panels = ((ax_t, "time_s"), (ax_e, "eval_time_s"), (ax_m, "peak_memory_mb"))
    for label, steps in groups.items():
        st = {**styles[label], "ls": "-"}
        for ax, key in panels:
            xs, ys, _ = _series(steps, key)
            if len(xs):
                ax.plot(xs, ys, ms=4, lw=1.6, label=label, **st)
        kinds = steps["memory_kind"].dropna() if "memory_kind" in steps else []
        kind = kinds.iloc[0] if len(kinds) else kind
    ax_t.set_yscale("log")
    ax_t.set_ylabel("merge time (s, log scale)")
    ax_t.set_title("Merge time per step")
    ax_e.set_ylabel("evaluation time (s)")
    ax_e.set_title("Evaluation of the seen tasks per step")
    ax_m.set_ylabel(f"peak memory (MB, {kind})")
    ax_m.set_title("Peak memory per step")
    for ax, _ in panels:
        ax.set_xlabel("merging step")
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Time and memory — {title} (mean over runs)")
    return _save(fig, path)


def plot_all(
    paths: Iterable[str | Path], out_dir: str | Path, per_run_limit: int | None = None
) -> list[Path]:
    """Every figure for the runs under ``paths``; ``per_run_limit`` caps heatmaps/forgetting per row."""
    out = Path(out_dir)
    runs = load_runs(paths)
    if runs.empty:
        return []
    steps = load_steps(runs)
    by_dir = runs.set_index("run_dir", drop=False)
    written: list[Path] = []
    blocks: dict[str, dict[str, pd.DataFrame]] = defaultdict(dict)
    for _, row in aggregate(runs).iterrows():
        label = row["method"] if not row["variant"] else f"{row['method']} ({row['variant']})"
        blocks[f"{row['protocol']} · {row['backbone']} · {row['task_seq']}"][label] = steps[
            steps["run_dir"].isin(row["run_dirs"])
        ]
        for run_dir in row["run_dirs"][: per_run_limit or None]:
            m, rd = by_dir.loc[run_dir], Path(run_dir)
            name = _slug(f"{label}__{rd.parent.name}_{rd.name}")
            written.append(heatmap(m, out / "heatmap" / f"{name}.png"))
            run_steps = steps[steps["run_dir"] == run_dir]
            if m.get("protocol") == "continual" and not run_steps.empty:
                written.append(forgetting(m, run_steps, out / "forgetting" / f"{name}.png"))
    for title, groups in blocks.items():
        slug = _slug(title.replace(" · ", "__"))
        written.append(acc_vs_tasks(groups, title, out / f"acc_vs_tasks__{slug}.png"))
        written.append(time_memory(groups, title, out / f"time_memory__{slug}.png"))
    log.info("wrote %d figures to %s", len(written), out)
    return written
