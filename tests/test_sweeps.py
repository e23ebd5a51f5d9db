"""A sweep survives a bad job: the other jobs run, the end lists the failures, the exit code is non-zero."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from otmf_exp.runtime import sweep

JOBS = (
    "method=task_arithmetic",
    "method.scaling=0.1,nan,0.2",
    "task_order=[rot90,flip]",
    "eval_split=validation",
)


def _sweep(root, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "otmf_exp.run",
        "-m",
        *JOBS,
        "progress=false",
        f"hydra.sweep.dir={root}",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _check(p: subprocess.CompletedProcess, root) -> None:
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    # reported when it fails, and listed at the end
    assert "error: job #1: method.scaling must be a finite number >= 0, got nan" in p.stderr
    tail = p.stderr.strip().splitlines()[-2:]
    assert (
        tail[0].startswith("sweep finished with 1 failed job(s)")
        and str(root / "failed_jobs.jsonl") in tail[0]
    )
    assert tail[1].startswith("  job #1 [") and "method.scaling=nan" in tail[1]
    # the jobs before and after the bad one completed
    # job dirs are named by their swept values (options that cannot change a result left out)
    assert (
        root
        / "0_task_arithmetic_eval_split=validation,method.scaling=0.1,task_order=[rot90,flip]"
        / "metrics.json"
    ).exists()
    assert (
        root
        / "2_task_arithmetic_eval_split=validation,method.scaling=0.2,task_order=[rot90,flip]"
        / "metrics.json"
    ).exists()
    assert not list(root.glob("1_task_arithmetic*"))  # nothing written for the refused job
    rows = sweep.failures(root)
    assert [(r["job"], r["kind"]) for r in rows] == [(1, "UserError")]


def test_basic_launcher_survives_a_bad_job(tmp_path, zoo):
    root = tmp_path / "sweep"
    _check(_sweep(root), root)


def test_joblib_launcher_survives_a_bad_job(tmp_path, zoo):
    """Jobs run in worker processes: the failure reaches the sweep through failed_jobs.jsonl."""
    root = tmp_path / "sweep"
    _check(_sweep(root, "hydra/launcher=local_parallel"), root)


def test_composition_errors_stop_the_sweep_before_any_job(tmp_path):
    """A value the schema rejects (not a float) fails Hydra's check of every job's composition,
    which runs before the first job: nothing is computed, one message, non-zero exit."""
    root = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "otmf_exp.run", "-m", "method=task_arithmetic", "method.scaling=0.1,abc"]
    p = subprocess.run([*cmd, f"hydra.sweep.dir={root}"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "method.scaling" in p.stderr and "Traceback" not in p.stderr
    assert not list(root.glob("*/metrics.json"))


# ---- in-process: a crash (not bad input) in one job, and out_dir shared by a sweep ---------------
def _run_main(monkeypatch, argv: list[str], fake) -> SystemExit | None:
    from otmf_exp import run

    monkeypatch.setattr(run, "run_experiment", fake)
    monkeypatch.setattr(run, "print_summary", lambda result, **kw: None)
    monkeypatch.setattr(sys, "argv", ["otmf_exp.run", *argv])
    try:
        run.main()
    except SystemExit as e:
        return e
    return None


def test_a_crashing_job_is_listed_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    from otmf_exp.errors import UserError

    done = []

    def fake(cfg, out_dir, jobs=1):
        if cfg.method.name == "averaging":
            raise RuntimeError("boom in the merge")
        if cfg.method.name == "ties":
            raise UserError("bad ties value")
        out_dir.mkdir(parents=True, exist_ok=True)
        done.append(cfg.method.name)
        return {"acc": 1.0}

    root = tmp_path / "sweep"
    e = _run_main(
        monkeypatch,
        ["-m", "method=pretrained,averaging,ties,task_arithmetic", f"hydra.sweep.dir={root}"],
        fake,
    )
    assert e is not None and e.code == 1  # a crash among the failures: exit code 1
    assert done == ["pretrained", "task_arithmetic"]
    err = capsys.readouterr().err
    assert "job #1 [method=averaging" in err and "RuntimeError: boom in the merge" in err
    assert "job #2 [method=ties" in err and "bad ties value" in err
    lines = [json.loads(x) for x in (root / "failed_jobs.jsonl").read_text().splitlines()]
    assert {r["job"]: r["kind"] for r in lines} == {1: "RuntimeError", 2: "UserError"}


def test_a_clean_sweep_exits_0_and_forgets_old_failures(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    sweep.record_failure(root, 7, ["x=1"], "from an earlier sweep", "UserError")

    def fake(cfg, out_dir, jobs=1):
        return {"acc": 1.0}

    assert (
        _run_main(monkeypatch, ["-m", "method=pretrained,averaging", f"hydra.sweep.dir={root}"], fake) is None
    )
    assert sweep.failures(root) == []


def test_out_dir_shared_by_several_jobs_is_refused_after_the_first(tmp_path, monkeypatch, capsys):
    seen = []

    def fake(cfg, out_dir, jobs=1):
        seen.append(str(out_dir))
        return {"acc": 1.0}

    root, out = tmp_path / "sweep", tmp_path / "pinned"
    e = _run_main(
        monkeypatch, ["-m", "method=pretrained,averaging", f"out_dir={out}", f"hydra.sweep.dir={root}"], fake
    )
    assert e is not None and e.code == 2 and seen == [str(out)]
    assert "would be shared by every job of this sweep" in capsys.readouterr().err
    assert not (root / "0_pretrained").exists()  # the unused job dir of the pinned job is removed


@pytest.mark.parametrize("kinds, code", [(["UserError"], 2), (["UserError", "OSError"], 1)])
def test_exit_code(kinds, code):
    assert sweep.exit_code([{"kind": k} for k in kinds]) == code


def test_dry_run_lists_every_job_of_a_preset_and_runs_none(tmp_path):
    from otmf_exp.runtime.sweep import dry_run_lines, plan_jobs

    jobs = plan_jobs(["experiment=paper/continual_vision"])
    assert len(jobs) == 3 * 3 * 10 * 10
    assert jobs[0][:4] == ["backbone=clip_vit_b32", "task_seq=vit8", "method=pretrained", "order_seed=42"]
    sliced = plan_jobs(
        ["experiment=paper/continual_vision", "backbone=clip_vit_b32", "task_seq=vit8", "method=otmf,opcm"]
    )
    assert len(sliced) == 2 * 10 and {j[2] for j in sliced} == {"method=otmf", "method=opcm"}
    lines = dry_run_lines(["method=averaging,ties", "seed=0,1"])
    assert lines[0].startswith("4 jobs") and lines[1] == "#0 method=averaging seed=0"
    p = subprocess.run(
        [sys.executable, "-m", "otmf_exp.run", "-m", "method=nope,ties", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert p.returncode == 2 and p.stderr.strip() == "error: In 'run': Could not find 'method/nope'"
    assert list(tmp_path.iterdir()) == []  # nothing written
