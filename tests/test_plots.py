"""plot.py: every figure is a non-empty PNG of its documented size; without matplotlib, one line.

Without matplotlib the CLI names ``pip install -e '.[plots]'`` on one line and exits 1."""

from __future__ import annotations

import runpy
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from otmf_exp.reporting import plots

ROOT = Path(__file__).resolve().parents[1]


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
    assert main([str(digits_multirun), "--out", str(out)]) == 0
    heat = sorted((out / "heatmap").glob("*.png"))
    forget = sorted((out / "forgetting").glob("*.png"))
    assert len(heat) == 4 and len(forget) == 4  # one per run
    acc = sorted(out.glob("acc_vs_tasks__*.png"))
    tm = sorted(out.glob("time_memory__*.png"))
    assert [p.name for p in acc] == ["acc_vs_tasks__continual__tiny__digits8.png"]
    assert len(tm) == 1
    expected = [
        (heat, plots.HEATMAP_SIZE),
        (forget, plots.CURVE_SIZE),
        (acc, plots.CURVE_SIZE),
        (tm, plots.WIDE_SIZE),
    ]
    for files, size in expected:
        for f in files:
            assert f.stat().st_size > 10_000, f
            assert _png_size(f) == size, f
            assert _not_blank(f), f


def test_per_run_limit(digits_multirun, tmp_path):
    written = plots.plot_all([digits_multirun], tmp_path, per_run_limit=1)
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
    for path, size in (
        (plots.heatmap(r, tmp_path / "h.png"), plots.HEATMAP_SIZE),
        (plots.forgetting(r, own, tmp_path / "f.png"), plots.CURVE_SIZE),
    ):
        assert _png_size(path) == size and _not_blank(path), path


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
