"""The console at the end of a run (issue 24, 27): the last line names the run dir, an ASCII-only
or closed stdout never fails a completed run, and files follow the user's umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

RUN = [sys.executable, "-m", "otmf_exp.run", "method=averaging", "task_order=[rot90,flip]", "progress=false"]


def _run(out, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RUN, f"out_dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        **kw,
    )


def test_last_line_names_the_run_dir_and_files_follow_the_umask(tmp_path):
    out = tmp_path / "o"
    p = subprocess.run(
        ["bash", "-c", 'umask 002 && exec "$@"', "x", *RUN, f"out_dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == f"results: {out.resolve()}"
    for name in ("metrics.json", "config.yaml", "steps.jsonl", "acc_matrix.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name
    step = next((out / "checkpoints").iterdir())
    assert stat.S_IMODE(step.stat().st_mode) & 0o070 == 0o070  # group may read the checkpoint dir


def test_ascii_stdout_draws_an_ascii_table(tmp_path):
    p = _run(tmp_path / "o", {"PYTHONIOENCODING": "ascii", "LANG": "C", "LC_ALL": "C"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    p.stdout.encode("ascii")  # nothing outside ASCII
    assert "| ACC" in p.stdout and "results: " in p.stdout


def test_a_closed_pipe_is_not_an_error(tmp_path):
    out = tmp_path / "o"
    p = subprocess.run(
        [
            "bash",
            "-c",
            '"$@" | head -c 10 >/dev/null; echo "rc=${PIPESTATUS[0]}"',
            "x",
            *RUN,
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.stdout.strip() == "rc=0", p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Logging error" not in p.stderr
    assert (out / "metrics.json").exists()
