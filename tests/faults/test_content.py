"""Issue 39 class 4 (identity by content): a model file rewritten with its old mtime kept
(``cp -p`` / ``rsync -t`` / ``touch -r``) is re-hashed; a checkpoint's ``state.safetensors``
swapped for another run's is refused in one line."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from faults.conftest import RUN, one_error
from otmf_exp.errors import UserError
from otmf_exp.runtime import checkpoint, digest


def test_same_size_rewrite_with_the_old_mtime_is_rehashed(tmp_path, monkeypatch):
    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 4096)
    a = digest.file_digest(f)
    st = f.stat()
    other = tmp_path / "other"
    other.write_bytes(b"y" * 4096)
    shutil.copyfile(other, f)  # same size, same inode, new bytes ...
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime put back (touch -r)
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert digest.file_digest(f) == digest.sha256_file(f) != a


def test_a_file_replaced_by_a_copy_with_preserved_mtime_is_rehashed(tmp_path, monkeypatch):
    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "cache"))
    f, other = tmp_path / "w.safetensors", tmp_path / "other"
    f.write_bytes(b"x" * 4096)
    a = digest.file_digest(f)
    other.write_bytes(b"z" * 4096)
    os.utime(other, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    os.replace(other, f)  # cp -p / rsync -t: another inode, the same size and mtime
    assert digest.file_digest(f) != a


def _save(root, step: int, value: float) -> None:
    checkpoint.save(root, step, {"w": torch.full((3,), value)}, {"scalars": {}, "progress": {}}, "last")


def test_a_swapped_state_file_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _save(a, 1, 1.0)
    _save(b, 1, 2.0)
    assert checkpoint.load_latest(a, "cpu")[1]["w"][0] == 1.0
    shutil.copy(b / "checkpoints/step_001/state.safetensors", a / "checkpoints/step_001/state.safetensors")
    with pytest.raises(UserError, match="swapped or damaged"):
        checkpoint.load_latest(a, "cpu")


def test_resume_with_another_runs_state_file_is_one_line(run_main, tmp_path, zoo):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, alpha in ((a, 0.3), (b, 0.5)):  # other merged weights: other state bytes
        rc, _, err = run_main(*RUN, "method=task_arithmetic", f"alpha={alpha}", f"out_dir={out}")
        assert rc == 0, err[-5:]
    (step,) = checkpoint.steps(a)
    shutil.copy(checkpoint.steps(b)[-1] / checkpoint.STATE, step / checkpoint.STATE)
    rc, _, err = run_main(*RUN, "method=task_arithmetic", "alpha=0.3", f"out_dir={a}", "resume=true")
    one_error(err, 2, rc, "swapped or damaged")
