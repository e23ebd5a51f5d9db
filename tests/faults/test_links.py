"""Fault injection, issue 27 class 4: a run follows no symbolic link in its run dir. Each name the
run writes (``.lock``, ``run.log``, the result files, ``checkpoints/`` and its step dirs) planted as a
link to a victim outside out_dir gives one ``error:`` line (exit 2) and leaves the victim's bytes,
and the link, as they were. A fresh run removes only its own step dirs under ``checkpoints/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faults.conftest import RUN, one_error, untouched
from otmf_exp.runtime.files import RUN_NAMES


@pytest.mark.parametrize("name", RUN_NAMES)
def test_a_planted_link_is_refused_and_its_target_untouched(run_main, tmp_path: Path, name: str):
    out = tmp_path / "o"
    out.mkdir()
    victim = tmp_path / "victim"
    if name == "checkpoints":
        victim.mkdir()
        (victim / "step_001").mkdir()
        (victim / "step_001" / "precious.txt").write_text("keep me")
    else:
        victim.write_text("keep me")
    os.symlink(victim, out / name)
    with untouched(victim):
        rc, _, err = run_main(*RUN, f"out_dir={out}")
    line = one_error(err, 2, rc, "is a symbolic link")
    assert name in line
    assert (out / name).is_symlink()  # the user's link is not removed either
    assert not (out / "metrics.json").is_file() or name == "metrics.json"


def test_a_linked_step_dir_is_refused(run_main, tmp_path: Path):
    out = tmp_path / "o"
    (out / "checkpoints").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "state.safetensors").write_text("not ours")
    os.symlink(victim, out / "checkpoints" / "step_001")
    with untouched(victim):
        rc, _, err = run_main(*RUN, f"out_dir={out}")
    assert "step_001" in one_error(err, 2, rc, "is a symbolic link")


def test_lock_and_log_are_opened_without_following_links(tmp_path: Path):
    """The open itself refuses a link (O_NOFOLLOW), for a link planted after the up-front check."""
    from otmf_exp.errors import UserError
    from otmf_exp.runtime.lock import RunDirLock
    from otmf_exp.runtime.session import attach_log_file

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(victim, out / ".lock")
    os.symlink(victim, out / "run.log")
    with untouched(victim):
        with pytest.raises(UserError, match="symbolic link"):
            RunDirLock(out).acquire()
        with pytest.raises(UserError, match="symbolic link"):
            attach_log_file(out)


def test_a_fresh_run_removes_only_its_own_step_dirs(run_main, tmp_path: Path):
    out = tmp_path / "o"
    mine = out / "checkpoints" / "mine"
    mine.mkdir(parents=True)
    (mine / "vit.pt").write_bytes(b"user weights")
    (out / "checkpoints" / "step_007").mkdir()  # a step dir of an earlier run of ours: goes
    with untouched(mine):
        rc, _, err = run_main(*RUN, f"out_dir={out}", "keep_checkpoints=last")
    assert rc == 0, err[-5:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["mine", "step_002"]


def test_the_sweep_bookkeeping_files_are_written_without_following_links(tmp_path: Path):
    """The failed-jobs ledger and the ``append`` offset, planted as links: the ledger is refused in one
    line; the offset's name is the sweep's own, so the link is dropped and a real file written in its
    place. The victim is untouched either way."""
    from otmf_exp.errors import UserError
    from otmf_exp.runtime import sweep

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    root = tmp_path / "multirun"
    (root / "0_otmf").mkdir(parents=True)
    (root / "0_otmf" / "metrics.json").write_text("{}")
    os.symlink(victim, sweep.ledger(root))
    os.symlink(victim, root / sweep.OFFSET)
    with untouched(victim):
        with pytest.raises(UserError, match="failed_jobs.jsonl is a symbolic link"):
            sweep.record_failure(root, 1, ["seed=1"], "boom", "RuntimeError")
        sweep.check_existing(root, "append")
    offset = root / sweep.OFFSET
    assert not offset.is_symlink() and offset.read_text() == "1"
