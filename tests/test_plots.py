"""plot.py: every figure in PNG and PDF (SVG on request) at its documented size × dpi, integer step
ticks, titles/legends naming the variant and order/seed, memory relative to the run's baseline;
bad run dirs skipped with one warning; without matplotlib, one line.

Without matplotlib the CLI names ``pip install -e '.[plots]'`` on one line and exits 1."""

from __future__ import annotations

import json
import logging
import runpy
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from otmf_exp.reporting import plots

ROOT = Path(__file__).resolve().parents[1]


def _px(size: tuple[float, float], dpi: int = plots.DPI) -> tuple[int, int]:
    return round(size[0] * dpi), round(size[1] * dpi)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _not_blank(path: Path) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return float(np.asarray(img)[..., :3].std()) > 0.02


def test_plots_from_a_multirun_tree(digits_multirun, tmp_path):
    out = tmp_path / "plots"
    main = runpy.run_path(str(ROOT / "scripts" / "plot.py"), run_name="plot")["main"]
    assert main([str(digits_multirun), "--out", str(out), "--dpi", "60"]) == 0
    heat = sorted((out / "heatmap").glob("*.png"))
    forget = sorted((out / "forgetting").glob("*.png"))
    assert len(heat) == 4 and len(forget) == 4  # one per run
    assert len(list(out.rglob("*.pdf"))) == 10  # the default formats: png and pdf
    acc = sorted(out.glob("acc_vs_tasks__*.png"))
    tm = sorted(out.glob("time_memory__*.png"))
    assert [p.name for p in acc] == ["acc_vs_tasks__continual__tiny__digits8.png"]
    assert len(tm) == 1
    expected = [
        (heat, _px(plots.HEATMAP_SIZE, 60)),
        (forget, _px(plots.CURVE_SIZE, 60)),
        (acc, _px(plots.CURVE_SIZE, 60)),
        (tm, _px(plots.WIDE_SIZE, 60)),
    ]
    for files, size in expected:
        for f in files:
            assert f.stat().st_size > 5_000, f
            assert _png_size(f) == size, f
            assert _not_blank(f), f


def test_per_run_limit(digits_multirun, tmp_path):
    written = plots.plot_all([digits_multirun], tmp_path, per_run_limit=1, formats=["png"])
    assert len([p for p in written if p.parent.name == "heatmap"]) == 2  # one per method


def test_no_runs_is_an_error(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "scripts" / "plot.py"), run_name="plot")["main"]
    assert main([str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "no completed runs" in capsys.readouterr().err


def test_per_run_figures_follow_the_runs_dataframe(digits_multirun, tmp_path):
    """heatmap/forgetting take a row of the runs DataFrame and its rows of load_steps."""
    from otmf_exp.reporting.runs import load_runs, load_steps

    runs = load_runs([digits_multirun])
    steps = load_steps(runs)
    assert len(steps) == 4 * 4 and set(steps["run_dir"]) == set(runs["run_dir"])
    r = runs.iloc[0]
    own = steps[steps["run_dir"] == r["run_dir"]]
    assert list(own["step"]) == [1, 2, 3, 4] and own["avg_acc"].iloc[-1] == r["acc"]
    for paths, size in (
        (plots.heatmap(r, tmp_path / "h", formats=["png"], dpi=50), _px(plots.HEATMAP_SIZE, 50)),
        (plots.forgetting(r, own, tmp_path / "f", formats=["png"], dpi=50), _px(plots.CURVE_SIZE, 50)),
    ):
        assert [p.suffix for p in paths] == [".png"]
        assert _png_size(paths[0]) == size and _not_blank(paths[0]), paths


def test_plot_without_matplotlib_says_how_to_install(digits_multirun, tmp_path):
    """``import matplotlib`` fails in the child: one line naming the extra, exit 1, no traceback."""
    block = (
        "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', *sys.argv[1:]]; "
        f"runpy.run_path({str(ROOT / 'scripts' / 'plot.py')!r}, run_name='__main__')"
    )
    out = tmp_path / "plots"
    proc = subprocess.run(
        [sys.executable, "-c", block, str(digits_multirun), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[plots]'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "" and not out.exists()


# --- synthetic run dirs (fast): two OTMF variants, 3 tasks, known memory baselines -------------

TASKS = ["a", "b", "c"]


def _run(root: Path, name: str, alpha: float, order_seed: int, base_mb: float = 900.0) -> Path:
    d = root / name
    d.mkdir(parents=True)
    acc = [[80.0, None, None], [70.0, 75.0, None], [60.0, 65.0, 70.0]]
    cfg = {"method": {"name": "otmf", "alpha": alpha}, "task_seq": {"name": "toy", "tasks": TASKS}}
    cfg |= {"backbone": {"name": "tiny"}, "seed": 0, "order_seed": order_seed, "task_order": "shuffled"}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"method": "otmf", "task_seq": "toy", "backbone": "tiny", "protocol": "continual"}
    metrics |= {"seed": 0, "order": TASKS, "method_config": {"alpha": alpha}, "acc": 65.0, "bwt": -12.5}
    metrics |= {"per_task": dict(zip(TASKS, acc[-1])), "individual": dict.fromkeys(TASKS, 90.0)}
    metrics |= {"acc_matrix": acc, "wall_time_s": 3.0, "peak_memory_mb": base_mb + 30}
    metrics |= {"baseline_memory_mb": base_mb, "memory_kind": "cpu_rss"}
    (d / "metrics.json").write_text(json.dumps(metrics))
    lines = []
    for j in range(3):
        seen = {t: acc[j][i] for i, t in enumerate(TASKS[: j + 1])}
        rec = {"step": j + 1, "task": TASKS[j], "acc": seen, "avg_acc": sum(seen.values()) / len(seen)}
        rec |= {"time_s": 0.5 + j, "eval_time_s": 0.1, "peak_memory_mb": base_mb + 10 * (j + 1)}
        lines.append(json.dumps(rec))
    (d / "steps.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture
def toy(tmp_path) -> Path:
    root = tmp_path / "runs"
    _run(root, "0_otmf", 0.7, 0, base_mb=900.0)
    _run(root, "1_otmf", 0.5, 1, base_mb=2000.0)
    return root


def _figure_texts(monkeypatch) -> dict[str, dict]:
    """Capture every figure's axes (title, legend, x ticks, y limits) as plots saves it."""
    seen: dict[str, dict] = {}
    orig = plots._save

    def spy(fig, path, formats=plots.FORMATS, dpi=plots.DPI):
        axes = []
        for ax in fig.axes:
            leg = ax.get_legend()
            axes.append(
                {
                    "title": ax.get_title(),
                    "ylabel": ax.get_ylabel(),
                    "xticks": [
                        float(t) for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]
                    ],
                    "ylim": ax.get_ylim(),
                    "legend": [t.get_text() for t in leg.get_texts()] if leg else [],
                    "lines": [list(ln.get_ydata()) for ln in ax.get_lines()],
                }
            )
        seen[f"{path.parent.name}/{path.name}"] = {
            "suptitle": fig._suptitle.get_text() if fig._suptitle else "",
            "axes": axes,
        }
        return orig(fig, path, formats, dpi)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def test_titles_legends_ticks_and_memory_relative_to_baseline(toy, tmp_path, monkeypatch):
    seen = _figure_texts(monkeypatch)
    plots.plot_all([toy], tmp_path / "out", formats=["png"], dpi=40)
    heat = {k: v for k, v in seen.items() if k.endswith("_0_otmf")}
    assert sorted(heat) == ["forgetting/otmf_alpha=0.7__runs_0_otmf", "heatmap/otmf_alpha=0.7__runs_0_otmf"]
    for fig in heat.values():
        title = fig["axes"][0]["title"]
        assert "otmf (α = 0.7) · order_seed=0, seed=0" in title and "run 0_otmf" not in title, title
    acc = seen["out/acc_vs_tasks__continual__tiny__toy"]["axes"][0]
    assert acc["legend"] == ["otmf (α = 0.5) (n=1)", "otmf (α = 0.7) (n=1)"]
    assert acc["xticks"] == [1.0, 2.0, 3.0]
    tm = seen["out/time_memory__continual__tiny__toy"]["axes"]
    for ax in tm:
        assert ax["xticks"] == [1.0, 2.0, 3.0], ax  # integer steps on every per-step panel
    mem = tm[2]
    assert "peak − baseline" in mem["ylabel"] and mem["ylim"][0] == 0.0
    # both runs add 10, 20, 30 MB to baselines of 900 and 2000 MB: the panel shows method memory
    assert mem["lines"] == [[10.0, 20.0, 30.0], [10.0, 20.0, 30.0]]
    assert mem["legend"] == ["otmf (α = 0.5)", "otmf (α = 0.7)"]
    assert heat["forgetting/otmf_alpha=0.7__runs_0_otmf"]["axes"][0]["xticks"] == [1.0, 2.0, 3.0]


def test_formats_and_dpi(toy, tmp_path):
    written = plots.plot_all([toy / "0_otmf"], tmp_path / "o", formats=["png", "pdf", "svg"], dpi=30)
    by = {s: [p for p in written if p.suffix == s] for s in (".png", ".pdf", ".svg")}
    assert len(by[".png"]) == len(by[".pdf"]) == len(by[".svg"]) == 4  # heatmap, curve, 2 block figures
    for p in by[".pdf"]:
        assert p.read_bytes()[:5] == b"%PDF-", p
    for p in by[".svg"]:
        assert b"<svg" in p.read_bytes()[:2000], p
    heat = [p for p in by[".png"] if p.parent.name == "heatmap"]
    assert all(_png_size(p) == _px(plots.HEATMAP_SIZE, 30) for p in heat)
    tm = [p for p in by[".png"] if p.name.startswith("time_memory")]
    assert [_png_size(p) for p in tm] == [_px(plots.WIDE_SIZE, 30)]


def test_bad_run_dirs_are_skipped_with_one_warning_each(toy, tmp_path, caplog):
    bad = {
        "empty_list": lambda d: (d / "metrics.json").write_text("[]"),
        "long_matrix": lambda d: _edit_metrics(d, acc_matrix=[[1.0, 2.0, 3.0]] * 5),
        "python_tag": lambda d: (d / "config.yaml").write_text("method: !!python/object:os.system {}\n"),
        "bad_steps": lambda d: (d / "steps.jsonl").write_text("{not json\n"),
        "no_order": lambda d: _edit_metrics(d, order=None),
    }
    for name, spoil in bad.items():
        spoil(_run(toy, name, 0.3, 2))
    caplog.set_level(logging.WARNING)
    written = plots.plot_all([toy], tmp_path / "o", formats=["png"], dpi=30)
    names = {f"{p.parent.name}/{p.name}" for p in written}
    assert sum("_0_otmf" in n for n in names) == 2 and sum("_1_otmf" in n for n in names) == 2
    assert any(n.startswith("o/time_memory") for n in names)
    for name in bad:
        hits = [r for r in caplog.records if str(toy / name) in r.getMessage()]
        assert len(hits) == 1, (name, [r.getMessage() for r in caplog.records])


def _edit_metrics(d: Path, **changes) -> None:
    m = json.loads((d / "metrics.json").read_text())
    for k, v in changes.items():
        m.pop(k) if v is None else m.__setitem__(k, v)
    (d / "metrics.json").write_text(json.dumps(m))


def test_cli_errors_are_one_line(toy, tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "scripts" / "plot.py"), run_name="plot")["main"]
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main([str(toy), "--out", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {f} is a file; give a directory"]
    assert main([str(toy), "--out", str(tmp_path / "p"), "--format", "png,gif"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown figure format gif; choose from png, pdf, svg"]
    assert not (tmp_path / "p").exists() and f.read_text() == "x"
