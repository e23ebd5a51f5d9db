"""Files we read or write are named when broken: zoo files, the cache dir, checkpoints, a full disk."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from otmf_exp.errors import UserError
from otmf_exp.runner import run_experiment
from otmf_exp.runtime import files

RUN = ("method=task_arithmetic", "task_order=[rot90,flip,invert]", "eval_split=validation")


@pytest.fixture
def cache(tmp_path, zoo, monkeypatch) -> Path:
    """A private copy of the built zoo, used through OTMF_EXP_CACHE; returns its digits-<hash> dir."""
    root = tmp_path / "cache"
    shutil.copytree(zoo.dir, root / zoo.dir.name)
    monkeypatch.setenv("OTMF_EXP_CACHE", str(root))
    return root / zoo.dir.name


# ---- the zoo ------------------------------------------------------------------------------------
def _unindexed(path: Path) -> None:
    """Drop ``path`` from the zoo's digest index, as in a zoo built before the index: a zoo that has
    its digest rebuilds a file with other bytes (tests/faults/test_identity.py); one without reads it
    and must name it when broken."""
    from otmf_exp.runtime import digest

    index = path.parent / "digests.json"
    entries = digest.read_map(index)
    entries.pop(path.name, None)
    digest.write_map(index, entries)


def test_truncated_pretrained_is_named(make_cfg, cache, tmp_path):
    path = cache / "pretrained.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    _unindexed(path)
    with pytest.raises(UserError) as e:
        run_experiment(make_cfg(*RUN), tmp_path / "run")
    assert str(e.value).startswith(f"cannot read {path}") and "delete it to rebuild" in str(e.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_missing_pretrained_is_rebuilt_identically(make_cfg, cache, tmp_path):
    path = cache / "pretrained.safetensors"
    before = load_file(str(path))
    path.unlink()
    m = run_experiment(
        make_cfg("method=pretrained", "task_order=[rot90]", "eval_split=validation"), tmp_path / "r"
    )
    after = load_file(str(path))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert m["acc"] > 0


def test_task_file_without_its_head_is_named(make_cfg, cache, tmp_path):
    path = cache / "rot90.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "head"}
    save_file(tensors, str(path), metadata=meta)  # same key: not rebuilt, but no zero-shot head
    _unindexed(path)
    with pytest.raises(UserError, match=r"rot90\.safetensors has no zero-shot head; delete it to rebuild"):
        run_experiment(make_cfg(*RUN), tmp_path / "run")


def test_unwritable_cache_is_named_before_any_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    env = {**os.environ, "OTMF_EXP_CACHE": str(blocker / "cache")}
    p = subprocess.run(
        [sys.executable, "-m", "otmf_exp.run", f"out_dir={tmp_path / 'run'}", "progress=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert f"cache directory {blocker / 'cache'}" in err[0] and "set OTMF_EXP_CACHE" in err[0]


# ---- checkpoints --------------------------------------------------------------------------------
@pytest.fixture
def checkpointed(make_cfg, tmp_path, zoo) -> Path:
    out = tmp_path / "run"
    run_experiment(make_cfg(*RUN, "keep_checkpoints=all"), out)
    return out


@pytest.mark.parametrize("content", [b"\x00garbage", b"", b"PK\x03\x04 a pickled torch module"])
def test_garbage_state_file_is_named(make_cfg, checkpointed, content):
    path = checkpointed / "checkpoints" / "step_003" / "state.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        run_experiment(make_cfg(*RUN, "resume=true"), checkpointed)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {path} is unreadable") and "delete" in msg and "\n" not in msg


def test_state_file_of_another_model_is_named(make_cfg, checkpointed):
    import hashlib
    import json

    step = checkpointed / "checkpoints" / "step_003"
    save_file({"merged/not_a_parameter": torch.zeros(2)}, str(step / "state.safetensors"))
    with pytest.raises(
        UserError, match=r"state\.safetensors is unreadable \(its sha256 .* swapped or damaged"
    ):
        run_experiment(make_cfg(*RUN, "resume=true"), checkpointed)
    # past the digest (a progress.json rewritten to match): the keys are checked against the model
    doc = json.loads((step / "progress.json").read_text())
    doc["state_sha256"] = hashlib.sha256((step / "state.safetensors").read_bytes()).hexdigest()
    (step / "progress.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"state\.safetensors is unreadable \(checkpoint and model differ"):
        run_experiment(make_cfg(*RUN, "resume=true"), checkpointed)


def test_deleting_the_broken_step_resumes_from_the_one_before(make_cfg, checkpointed, caplog):
    import logging

    (checkpointed / "checkpoints" / "step_003" / "state.safetensors").write_bytes(b"junk")
    shutil.rmtree(checkpointed / "checkpoints" / "step_003")  # what the message tells the user
    with caplog.at_level(logging.INFO):
        m = run_experiment(make_cfg(*RUN, "resume=true"), checkpointed)
    assert "resuming from step 2 of 3" in caplog.text and len(m["acc_matrix"]) == 3


class _SafetensorLikeError(Exception):
    """What safetensors raises for an I/O failure: not an OSError, the reason in the text."""


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        _SafetensorLikeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ],
)
def test_full_disk_while_checkpointing_keeps_the_last_good_one(make_cfg, tmp_path, zoo, monkeypatch, error):
    from otmf_exp.runtime import checkpoint

    real, calls = checkpoint.save_file, []

    def save(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise error
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", save)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        run_experiment(make_cfg(*RUN), out)
    msg = str(e.value)
    ck = out / "checkpoints"
    assert msg.startswith(f"cannot write {ck / 'step_002' / 'state.safetensors'}"), msg
    assert "free space" in msg and "step_001 is kept" in msg and "resume=true" in msg
    assert sorted(p.name for p in ck.iterdir()) == ["step_001"]  # no step_002, no temp dir
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    m = run_experiment(make_cfg(*RUN, "resume=true"), out)  # what the message says to do
    assert len(m["acc_matrix"]) == 3 and (out / "metrics.json").exists()


def test_full_disk_writing_a_result_file_is_named(tmp_path, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError) as e:
        files.write_json(tmp_path / "metrics.json", {"acc": 1.0})
    assert str(e.value) == (
        f"cannot write {tmp_path / 'metrics.json'} (No space left on device); free space on its disk and rerun"
    )
    assert not list(tmp_path.iterdir())  # no temp file left behind
