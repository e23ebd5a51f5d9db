"""Run directories are owned: a lock per run dir, unique default dirs, results kept until a rerun
passes its checks, nothing written outside out_dir, zoo export atomic and refusing non-empty dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from otmf_exp.errors import UserError
from otmf_exp.runtime.lock import LOCK_NAME, RunDirLock

ONE = (
    "method=pretrained",
    "task_order=[rot90]",
    "eval_split=validation",
    "eval_individual=false",
    "progress=false",
)


def _cli(*args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "otmf_exp.run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


# ---- the lock ---------------------------------------------------------------------------------
def test_second_owner_is_refused_in_one_line(tmp_path):
    with RunDirLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UserError) as e:
            RunDirLock(tmp_path).acquire()
        assert "is in use by another run" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert not (tmp_path / LOCK_NAME).exists()  # released and removed
    with RunDirLock(tmp_path):  # free again
        pass


def test_lock_of_a_killed_run_is_not_stale(tmp_path):
    """The lock is the kernel's: a SIGKILLed owner leaves the file but not the lock."""
    code = f"from otmf_exp.runtime.lock import RunDirLock; RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); import time; time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {p.pid}"):
        RunDirLock(tmp_path).acquire()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (tmp_path / LOCK_NAME).exists()  # left behind ...
    with RunDirLock(tmp_path):  # ... and taken over
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}")


def test_second_run_on_a_locked_out_dir_is_refused_and_writes_nothing(tmp_path, zoo):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"acc": 1.0}')
    with RunDirLock(out):  # another run owns it
        p = _cli(*ONE, f"out_dir={out}")
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(err) == 1 and "is in use by another run" in err[0], p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["metrics.json"]  # no run.log, no config.yaml
    assert (out / "metrics.json").read_text() == '{"acc": 1.0}'


# ---- default run dirs ---------------------------------------------------------------------------
def test_default_run_dirs_are_unique_within_a_second(tmp_path, zoo):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "otmf_exp.run", *ONE],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    dirs = sorted((tmp_path / "outputs" / "digits8" / "pretrained").iterdir())
    assert len(dirs) == 2 and all((d / "metrics.json").exists() for d in dirs)
    assert not list(tmp_path.rglob(".hydra"))


def test_run_dir_names(make_cfg):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        a = compose("run", overrides=["method=averaging"], return_hydra_config=True)
        b = compose("run", overrides=["method=averaging"], return_hydra_config=True)
        pinned = compose("run", overrides=["out_dir=/data/x"], return_hydra_config=True)
    ra, rb = str(a.hydra.run.dir), str(b.hydra.run.dir)
    assert ra.startswith("outputs/digits8/averaging/") and ra != rb
    assert ra.rsplit("/", 1)[1][:19] != ra.rsplit("/", 1)[1]  # time stamp + random suffix
    assert str(pinned.hydra.run.dir) == "."  # Hydra stays put and writes nothing; the run goes to out_dir
    assert a.hydra.output_subdir is None and str(a.hydra.sweep.dir) != str(b.hydra.sweep.dir)


def test_out_dir_run_writes_only_there(tmp_path, zoo):
    out = tmp_path / "here"
    p = _cli(*ONE, f"out_dir={out}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["here"]  # no outputs/, no .hydra/
    assert {"metrics.json", "config.yaml", "run.log", "steps.jsonl"} <= {x.name for x in out.iterdir()}
    assert not (out / LOCK_NAME).exists()


def test_bad_input_leaves_no_empty_default_dir(tmp_path):
    p = _cli("alpha=nan", cwd=tmp_path)
    assert p.returncode == 2 and "alpha must be a finite number" in p.stderr
    assert not list(tmp_path.glob("outputs/*/*/*"))  # the run's own (unique, empty) dir is removed


# ---- a rerun into a completed dir ---------------------------------------------------------------
@pytest.fixture
def completed(run_cfg):
    _, out = run_cfg("method=averaging", "task_order=[rot90,flip]", "eval_split=validation")
    return out, (out / "metrics.json").read_text()


@pytest.mark.parametrize(
    "overrides",
    [
        ("alpha=nan",),  # refused by the value rules
        ("method=averaging", "task_order=[rot90,flip]", "eval_split=validation", "resume=true", "seed=3"),
    ],
)
def test_rerun_that_fails_its_checks_keeps_the_result(make_cfg, completed, overrides):
    from otmf_exp.runner import run_experiment

    out, before = completed
    with pytest.raises(UserError):
        run_experiment(make_cfg(*overrides), out)
    assert (out / "metrics.json").read_text() == before


def test_rerun_that_fails_in_setup_keeps_the_result(make_cfg, completed, monkeypatch):
    import otmf_exp.runner as runner

    def broken(*a, **k):
        raise UserError("cannot read /cache/pretrained.safetensors; delete it to rebuild")

    out, before = completed
    monkeypatch.setattr(runner, "build_backbone", broken)
    with pytest.raises(UserError, match="pretrained.safetensors"):
        runner.run_experiment(make_cfg("method=averaging", "task_order=[rot90,flip]"), out)
    assert (out / "metrics.json").read_text() == before


# ---- zoo export ---------------------------------------------------------------------------------
def test_zoo_export_refuses_non_empty_dir_unless_force(tmp_path, zoo):
    from otmf_exp.offline.zoo import main

    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    assert main(["export", str(dest), "--tasks", "rot90"]) == 2
    assert sorted(x.name for x in dest.iterdir()) == ["mine.txt"]
    assert main(["export", str(dest), "--tasks", "rot90", "--force"]) == 0
    assert sorted(x.name for x in dest.iterdir()) == [
        "config.json",
        "heads.safetensors",
        "pretrained.safetensors",
        "rot90.safetensors",
    ]
    assert [x.name for x in tmp_path.iterdir()] == ["export"]  # no temp dirs left


def test_zoo_export_is_atomic(tmp_path, zoo, monkeypatch, capsys):
    import errno

    from otmf_exp.offline import zoo as zoo_mod

    dest = tmp_path / "export"
    assert zoo_mod.main(["export", str(dest), "--tasks", "rot90"]) == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    calls = []
    real = zoo_mod.save_file

    def full_disk(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(zoo_mod, "save_file", full_disk)
    assert zoo_mod.main(["export", str(dest), "--tasks", "rot90,flip", "--force"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {dest}" in err and "free space" in err
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # the old export is untouched
    assert [x.name for x in tmp_path.iterdir()] == ["export"]
