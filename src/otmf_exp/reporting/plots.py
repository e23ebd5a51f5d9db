"""Figures for continual-merging runs: accuracy heatmaps, forgetting, ACC vs tasks, time/memory.

The per-step / forgetting views the OTMF reviewers asked for (arXiv 2511.19561), with matplotlib's
Agg backend: every figure in each of ``formats`` (PNG and PDF by default, SVG on request) at
``dpi`` (200 by default; a PNG is ``size × dpi`` pixels, sizes in inches below). Every per-step
axis has integer ticks; titles and legends name the variant (the overrides that differ between
the plotted runs, ``α = 0.7``, ``iterations=10``) and the run's ``order_seed`` / ``seed``.

- ``heatmap/<run>.<fmt>`` (:data:`HEATMAP_SIZE`): the accuracy matrix a[j][i] of one run
  (row = after merging step j, column = task i, blank = not yet seen), values annotated.
- ``forgetting/<run>.<fmt>`` (:data:`CURVE_SIZE`): per-task accuracy over steps of one run, each
  task from the step it was merged in, dashed line = its individual (fine-tuned) accuracy.
- ``acc_vs_tasks__<block>.<fmt>`` (:data:`CURVE_SIZE`): mean accuracy over the seen tasks vs number
  of tasks merged, one line per method (± std band over orders/seeds), from ``steps.jsonl``
  (:func:`otmf_exp.reporting.runs.load_steps`).
- ``time_memory__<block>.<fmt>`` (:data:`WIDE_SIZE`): merge time, evaluation time and method
  memory per step (peak − the run's ``baseline_memory_mb``: what the method adds to the loaded
  model and data, axis from 0), one line per method (mean over runs).
A block is ``protocol · backbone · task_seq`` and a line is a row of
:func:`otmf_exp.reporting.tables.aggregate`; runs come from the DataFrame of
:func:`otmf_exp.reporting.runs.load_runs`.
"""

from __future__ import annotations

import json
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
from matplotlib.ticker import MaxNLocator  # noqa: E402

from otmf_exp.errors import UserError  # noqa: E402
from otmf_exp.reporting.runs import flatten, load_runs  # noqa: E402
from otmf_exp.reporting.tables import aggregate, py  # noqa: E402
from otmf_exp.runtime.files import atomic_path  # noqa: E402

log = logging.getLogger(__name__)

DPI = 200
FORMATS = ("png", "pdf")
#: what ``--format`` accepts (matplotlib's writers for them need nothing else)
FORMAT_CHOICES = ("png", "pdf", "svg")
HEATMAP_SIZE = (8.0, 7.0)  # inches: a PNG is (8 dpi, 7 dpi) pixels
CURVE_SIZE = (9.0, 5.6)
WIDE_SIZE = (16.0, 5.2)


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """The formats, lower case, each once; an unknown one is a :class:`UserError` naming the choices."""
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in formats if f.strip()))
    bad = [f for f in out if f not in FORMAT_CHOICES]
    if bad or not out:
        raise UserError(
            f"unknown figure format {', '.join(bad) or '(none)'}; choose from {', '.join(FORMAT_CHOICES)}"
        )
    return out


def _fig(size: tuple[float, float], ncols: int = 1) -> tuple[Any, Any]:
    return plt.subplots(1, ncols, figsize=size, layout="constrained")


def _save(fig: Any, path: Path, formats: Iterable[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """``fig`` as ``path`` with each format's suffix (no bbox_inches="tight": the size stays fixed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        for f in check_formats(formats):
            target = path.parent / f"{path.name}.{f}"
            with atomic_path(target) as tmp:  # the one writer: temp + rename, never through a link
                fig.savefig(tmp, dpi=dpi, format=f)
            out.append(target)
    finally:
        plt.close(fig)
    return out


def _int_ticks(ax: Any, tmax: int) -> None:
    """Integer step ticks 1..tmax (fewer, still integers, for long sequences)."""
    ax.set_xlim(0.7, max(tmax, 1) + 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(max(tmax, 1), 20)))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")[:150] or "run"


def _title(m: Mapping[str, Any]) -> str:
    return f"{m.get('method')} · {m.get('backbone')} · {m.get('task_seq')} ({m.get('protocol')})"


def pretty_variant(variant: Any) -> str:
    """``alpha=0.7, iterations=10`` -> ``α = 0.7, iterations=10`` (the variant column of the tables)."""
    v = py(variant)
    if not v:
        return ""
    return ", ".join(re.sub(r"^alpha=", "α = ", part.strip()) for part in str(v).split(", "))


def series_label(method: Any, variant: Any) -> str:
    """A legend entry: the method and its variant, ``otmf (α = 0.7)``."""
    v = pretty_variant(variant)
    return f"{method} ({v})" if v else str(method)


def run_label(m: Mapping[str, Any], variant: Any = None) -> str:
    """What names one run in a title: method, variant, ``order_seed`` and ``seed``."""
    seeds = ", ".join(f"{k}={py(m.get(k))}" for k in ("order_seed", "seed") if py(m.get(k)) is not None)
    return " · ".join(x for x in (series_label(m.get("method"), variant), seeds) if x)


def heatmap(
    m: Mapping[str, Any], path: Path, variant: Any = None, formats: Iterable[str] = FORMATS, dpi: int = DPI
) -> list[Path]:
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
        f"{_title(m)}\n{run_label(m, variant)} · ACC {m['acc']:.1f}"
        + (f" · BWT {bwt:+.1f}" if bwt is not None else "")
    )
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    return _save(fig, path, formats, dpi)


def forgetting(
    m: Mapping[str, Any],
    steps: pd.DataFrame,
    path: Path,
    variant: Any = None,
    formats: Iterable[str] = FORMATS,
    dpi: int = DPI,
) -> list[Path]:
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
    _int_ticks(ax, len(order))
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"Per-task accuracy over steps — {_title(m)}\n"
        f"{run_label(m, variant)} · dashed: individual (fine-tuned) accuracy"
    )
    ax.legend(
        title="task",
        fontsize=8,
        ncol=2 if len(order) > 10 else 1,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
    )
    return _save(fig, path, formats, dpi)


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


def acc_vs_tasks(
    groups: Mapping[str, pd.DataFrame],
    title: str,
    path: Path,
    formats: Iterable[str] = FORMATS,
    dpi: int = DPI,
) -> list[Path]:
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
    _int_ticks(ax, tmax)
    ax.grid(alpha=0.3)
    ax.set_title(f"ACC vs number of tasks — {title}\n(mean ± std over orders / seeds)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path, formats, dpi)


def time_memory(
    groups: Mapping[str, pd.DataFrame],
    title: str,
    path: Path,
    formats: Iterable[str] = FORMATS,
    dpi: int = DPI,
) -> list[Path]:
    """Merge time, evaluation time and method memory per step, one line per label (mean).

    Method memory is ``peak_memory_mb`` minus the run's ``baseline_memory_mb`` (a ``steps`` column,
    see :func:`plot_all`); runs without a baseline are plotted as peak memory and the axis says so."""
    fig, (ax_t, ax_e, ax_m) = _fig(WIDE_SIZE, ncols=3)
    kind, relative, tmax = "memory", True, 1
    styles = _styles(list(groups))
    for label, steps in groups.items():
        steps = steps.copy()
        base = pd.to_numeric(steps.get("baseline_memory_mb"), errors="coerce")
        if base is None or base.isna().any():
            relative = False
            steps["method_memory_mb"] = pd.to_numeric(steps.get("peak_memory_mb"), errors="coerce")
        else:
            steps["method_memory_mb"] = pd.to_numeric(steps["peak_memory_mb"], errors="coerce") - base
        st = {**styles[label], "ls": "-"}
        for ax, key in ((ax_t, "time_s"), (ax_e, "eval_time_s"), (ax_m, "method_memory_mb")):
            xs, ys, _ = _series(steps, key)
            if len(xs):
                tmax = max(tmax, int(xs.max()))
                ax.plot(xs, ys, ms=4, lw=1.6, label=label, **st)
        kinds = steps["memory_kind"].dropna() if "memory_kind" in steps else []
        kind = kinds.iloc[0] if len(kinds) else kind
    ax_t.set_yscale("log")
    ax_t.set_ylabel("merge time (s, log scale)")
    ax_t.set_title("Merge time per step")
    ax_e.set_ylabel("evaluation time (s)")
    ax_e.set_title("Evaluation of the seen tasks per step")
    if relative:
        ax_m.set_ylabel(f"method memory (MB, {kind} peak − baseline)")
        ax_m.set_title("Method memory per step (above the run's baseline)")
    else:
        ax_m.set_ylabel(f"peak memory (MB, {kind}; no baseline recorded)")
        ax_m.set_title("Peak memory per step")
    lo = min([0.0, *(ln.get_ydata().min() for ln in ax_m.get_lines() if len(ln.get_ydata()))])
    ax_m.set_ylim(bottom=lo)
    for ax in (ax_t, ax_e, ax_m):
        ax.set_xlabel("merging step")
        _int_ticks(ax, tmax)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Time and memory — {title} (mean over runs)")
    return _save(fig, path, formats, dpi)


def _run_steps(run_dir: str, warned: set[str]) -> list[dict[str, Any]]:
    """The records of a run's ``steps.jsonl``; an unreadable one gives no steps and one warning."""
    f = Path(run_dir) / "steps.jsonl"
    if not f.exists():
        return []
    try:
        recs = [flatten(json.loads(s)) for s in f.read_text().splitlines() if s.strip()]
        if not all(isinstance(r.get("step"), int) for r in recs):
            raise ValueError("a line without an integer step")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        _warn_once(warned, run_dir, f"steps.jsonl unreadable ({why}); its per-step figures are left out")
        return []
    return [{"run_dir": run_dir, **r} for r in recs]


def _warn_once(warned: set[str], run_dir: str, why: str) -> None:
    if run_dir not in warned:
        warned.add(run_dir)
        log.warning("%s: %s", run_dir, why)


def plot_all(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    per_run_limit: int | None = None,
    formats: Iterable[str] = FORMATS,
    dpi: int = DPI,
) -> list[Path]:
    """Every figure for the runs under ``paths``; ``per_run_limit`` caps heatmaps/forgetting per row.

    A run whose files cannot be read (see :func:`otmf_exp.reporting.runs.load_runs`) or drawn is
    skipped with one warning naming its dir; the other figures are still written."""
    formats = check_formats(formats)
    if dpi < 10 or dpi > 2400:
        raise UserError(f"--dpi {dpi} is out of range; give 10 to 2400")
    out = Path(out_dir)
    runs = load_runs(paths)
    if runs.empty:
        return []
    warned: set[str] = set()
    base = dict(zip(runs["run_dir"], runs.get("baseline_memory_mb", pd.Series([None] * len(runs)))))
    records = [r for d in runs["run_dir"] for r in _run_steps(d, warned)]
    steps = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=["run_dir", "step"])
    steps["baseline_memory_mb"] = pd.to_numeric(steps["run_dir"].map(base), errors="coerce")
    by_dir = runs.set_index("run_dir", drop=False)
    written: list[Path] = []
    blocks: dict[str, dict[str, pd.DataFrame]] = defaultdict(dict)
    for _, row in aggregate(runs).iterrows():
        label = series_label(row["method"], row["variant"])
        blocks[f"{row['protocol']} · {row['backbone']} · {row['task_seq']}"][label] = steps[
            steps["run_dir"].isin(row["run_dirs"])
        ]
        for run_dir in row["run_dirs"][: per_run_limit or None]:
            m, rd = by_dir.loc[run_dir], Path(run_dir)
            variant = py(row["variant"])
            name = _slug(f"{row['method']}{'_' + variant if variant else ''}__{rd.parent.name}_{rd.name}")
            run_steps = steps[steps["run_dir"] == run_dir]
            try:
                written += heatmap(m, out / "heatmap" / name, row["variant"], formats, dpi)
                if m.get("protocol") == "continual" and not run_steps.empty:
                    written += forgetting(
                        m, run_steps, out / "forgetting" / name, row["variant"], formats, dpi
                    )
            except (KeyError, TypeError, ValueError, IndexError) as e:
                _warn_once(warned, run_dir, f"skipped, cannot draw its figures ({type(e).__name__}: {e})")
    for title, groups in blocks.items():
        slug = _slug(title.replace(" · ", "__"))
        written += acc_vs_tasks(groups, title, out / f"acc_vs_tasks__{slug}", formats, dpi)
        written += time_memory(groups, title, out / f"time_memory__{slug}", formats, dpi)
    log.info("wrote %d figure files to %s", len(written), out)
    return written
