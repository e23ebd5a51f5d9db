"""scripts/bench.py end to end on the tiny synthetic tower (a smoke test: numbers are not checked
against targets here -- timing lives in the benchmark, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)


def test_bench_writes_tables_and_json(tmp_path):
    out = tmp_path / "bench"
    proc = _run(
        "--quick",
        "--arch",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "3",
        "--only",
        "step,flat,ratio,eval",
        "--methods",
        "otmf",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "benchmarks.json").read_text())
    md = (out / "BENCHMARKS.md").read_text()
    # every measurement asked for is present, with the quick plan
    assert res["quick"] and res["plan"]["iterations_step"] == 10 and res["plan"]["batch_size"] == 16
    otmf = res["step"]["otmf"]["steps"]
    assert [s["step"] for s in otmf] == [1, 2, 3] and all(s["peak_mb"] > 0 and s["wall_s"] > 0 for s in otmf)
    assert {"teacher_s", "train_s", "head_tuning_s"} <= set(otmf[-1]["phases"])
    assert [s["step"] for s in res["flat"]["otmf"]["steps"]] == [1, 2, 3]
    assert len(res["ratio"]) == 2 and all(v["steps"][0]["peak_mb"] > 0 for v in res["ratio"].values())
    assert res["eval"]["raw_per_s"] > 0 and res["eval"]["evaluate_per_s"] > 0
    ratios = res["summary"]["ratios"]
    assert {"otmf_vs_joint_adamerging_memory", "flat_step_last_vs_step2", "eval_vs_raw_forward"} <= set(
        ratios
    )
    # the markdown shows every table and the ratio it computed
    for heading in (
        "## Targets",
        "## 1. One continual step",
        "## 2. Peak memory",
        "## 3. OTMF step vs joint",
        "## 4. Evaluation throughput",
    ):
        assert heading in md
    assert f"{ratios['otmf_vs_joint_adamerging_memory']:.3f}" in md  # the targets table's 3 decimals
    assert "python scripts/bench.py --quick --arch tiny" in md
    # the --out directory's absolute path is in neither file (no machine's paths)
    assert str(out) not in res["command"] and "--out PATH" in res["command"] and str(out) not in md


def test_bench_bad_input_one_line(tmp_path):
    for args, needle in (
        (["--only", "nonsense"], "unknown part 'nonsense'"),
        (["--methods", "nope"], "unknown method 'nope'"),
    ):
        proc = _run(*args, "--out", str(tmp_path))
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and needle in proc.stderr
    assert not (tmp_path / "BENCHMARKS.md").exists()
