"""Resume after SIGKILL or Ctrl-C, determinism, NaN losses and broken checkpoints."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ORDER = "task_order=[rot90,rot180,flip,invert]"
FAST = ("method.iterations=20", "method.head_tuning.steps=3", "progress=false")
#: what differs between two runs of the same experiment by design: timings and the provenance (the
#: command line, e.g. resume=true)
TIMING = {"wall_time_s", "peak_memory_mb", "baseline_memory_mb", "provenance"}
STEP_TIMING = {"time_s", "eval_time_s", "peak_memory_mb", "start_memory_mb"}


def _strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMING}


def _steps(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in STEP_TIMING and not k.startswith("time_")} for r in rows]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "otmf_exp.run", f"out_dir={out}", ORDER, *FAST, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, zoo):
    out = tmp_path_factory.mktemp("full")
    subprocess.run(_cmd(out), check=True, capture_output=True, timeout=600)
    return json.loads((out / "metrics.json").read_text()), _steps(out)


@pytest.mark.parametrize("k", [1, 3])
def test_sigkill_after_step_k_then_resume_matches(tmp_path, uninterrupted, k):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = out / "checkpoints" / f"step_{k:03d}"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() or any((out / "checkpoints").glob("step_*"))
    if not (out / "metrics.json").exists():  # killed mid-run: nothing that looks complete
        steps_done = len((out / "steps.jsonl").read_text().splitlines())
        assert steps_done >= k
    r = subprocess.run(_cmd(out, "resume=true"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    full, full_steps = uninterrupted
    assert _strip(json.loads((out / "metrics.json").read_text())) == _strip(full)
    assert _steps(out) == full_steps


def test_ctrl_c_prints_how_to_resume_and_exits_130(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_001").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert lines[0].startswith("interrupted after step ") and "(checkpoint kept); resume with: " in lines[0]
    cmd = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert cmd[-2:] == [f"out_dir={out}", "resume=true"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the printed command, as is
    assert r.returncode == 0, r.stderr
    full, full_steps = uninterrupted
    assert _strip(json.loads((out / "metrics.json").read_text())) == _strip(full)
    assert _steps(out) == full_steps


def test_ctrl_c_line_without_a_checkpoint():
    from otmf_exp.errors import RunInterrupted
    from otmf_exp.run import interrupted_line

    line = interrupted_line(RunInterrupted("/r", 0, 8, False), ["alpha=0.5", "out_dir=/old", "resume=false"])
    assert line.startswith("interrupted; /r has no checkpoint to resume from; rerun with: ")
    assert line.endswith("-m otmf_exp.run alpha=0.5 out_dir=/r") and "resume" not in line.split("with:")[1]
    assert interrupted_line(KeyboardInterrupt(), []) == "interrupted"


def test_ctrl_c_turned_into_another_error_by_native_code_is_still_the_interrupt(
    make_cfg, tmp_path, zoo, monkeypatch
):
    """Ctrl-C inside safetensors/torch can surface as their own error (seen: a file read failing
    with a shape error, reported as a broken cache file); once Ctrl-C was pressed, any error is
    the interrupt, so no good file is called broken."""
    import otmf_exp.runner as runner
    from otmf_exp import errors

    def read_cut_short(*a, **k):
        errors._INTERRUPT.set()  # what the SIGINT handler records
        raise errors.UserError("cannot read zoo/rot180.safetensors: could not determine the shape; delete it")

    monkeypatch.setattr(runner, "build_backbone", read_cut_short)
    try:
        with pytest.raises(errors.RunInterrupted) as e:
            runner.run_experiment(make_cfg(ORDER, *FAST), tmp_path / "run")
    finally:
        errors._INTERRUPT.clear()
    assert e.value.done == 0 and not e.value.resumable


def test_same_seed_identical_metrics(run_cfg):
    a, out = run_cfg(ORDER, *FAST)
    steps_a = _steps(out)
    b, out = run_cfg(ORDER, *FAST)
    assert _strip(a) == _strip(b) and steps_a == _steps(out)


def test_keep_checkpoints(run_cfg):
    _, out = run_cfg(ORDER, *FAST, "keep_checkpoints=all")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_00{i}" for i in range(1, 5)]
    _, out = run_cfg(ORDER, *FAST, "keep_checkpoints=none")
    assert not (out / "checkpoints").exists()


def test_nan_loss_stops_with_step_and_keeps_last_good_state(tmp_path, zoo):
    out = tmp_path / "run"
    r = subprocess.run(
        _cmd(out, "method.lr=1e30", "method.select=last"), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "non-finite OT loss" in err[0] and "step 2" in err[0]
    assert "Traceback" not in r.stderr
    assert (out / "checkpoints" / "step_001").exists()
    assert not (out / "metrics.json").exists()


def _broken_cache(tmp_path: Path, zoo, task: str, content: bytes) -> dict:
    cache = tmp_path / "cache"
    shutil.copytree(zoo.dir, cache / zoo.dir.name)
    (cache / zoo.dir.name / f"{task}.safetensors").write_bytes(content)
    return {**os.environ, "OTMF_EXP_CACHE": str(cache)}


@pytest.mark.parametrize("content", [b"\x00garbage", b"PK\x03\x04 a pickled torch module"])
def test_corrupted_checkpoint_one_line(tmp_path, zoo, content):
    env = _broken_cache(tmp_path, zoo, "rot180", content)
    r = subprocess.run(_cmd(tmp_path / "run"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "rot180.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
