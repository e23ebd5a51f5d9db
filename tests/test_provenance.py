"""Threads and provenance (issue 24): the zoo's bytes do not depend on the thread count, every run
records the code and machine that made it, and resume refuses another code version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otmf_exp.errors import UserError
from otmf_exp.offline.tiny_clip import TinyRecipe
from otmf_exp.offline.zoo import DigitsZoo
from otmf_exp.reporting.runs import load_runs
from otmf_exp.runtime import session

SMALL = TinyRecipe(pretrain_epochs=1, finetune_epochs=1)
T2 = "task_order=[rot90,flip]"


def test_zoo_files_are_the_same_bytes_at_1_and_2_threads(tmp_path):
    before = torch.get_num_threads()
    files = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            zoo = DigitsZoo(SMALL, root=tmp_path / f"t{n}", progress=False)
            zoo.build(["rot90"])
            assert torch.get_num_threads() == n  # the caller's setting is restored
            files[n] = {p.name: p.read_bytes() for p in sorted(zoo.dir.glob("*.safetensors"))}
    finally:
        torch.set_num_threads(before)
    assert sorted(files[1]) == ["pretrained.safetensors", "rot90.safetensors"]
    assert files[1] == files[2]


def test_threads_auto_and_explicit(monkeypatch):
    import os

    assert 1 <= session.available_cpus() <= (os.cpu_count() or 1)
    monkeypatch.setattr(session, "available_cpus", lambda: 8)
    assert session.resolve_threads("auto", "hf_clip") == 8
    assert session.resolve_threads("auto", "hf_clip", jobs=3) == 2  # a joblib sweep shares the CPUs
    assert session.resolve_threads("auto", "tiny") == 1
    assert session.resolve_threads(3, "tiny") == 3


@pytest.mark.parametrize("bad", ["0", "-2", "many", "1.5"])
def test_bad_threads_is_one_line(make_cfg, tmp_path, bad):
    from otmf_exp.runner import run_experiment

    with pytest.raises(UserError, match="threads must be auto or an integer >= 1"):
        run_experiment(make_cfg("method=averaging", T2, f"threads={bad}"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_metrics_record_provenance_and_load_runs_has_it(run_cfg):
    m, out = run_cfg("method=averaging", T2, "threads=1")
    p = json.loads((out / "metrics.json").read_text())["provenance"]
    assert p == m["provenance"]
    assert p["threads"] == 1 and p["torch"] == torch.__version__ and p["host"]
    assert p["code_version"] and p["otmf_exp"] and p["python"] and p["device_name"]
    if (Path(__file__).resolve().parents[1] / ".git").exists():
        assert len(p["git_sha"]) == 40 and isinstance(p["git_dirty"], bool)
        assert p["code_version"].startswith(p["git_sha"][:12])
    df = load_runs([out])
    assert df.loc[0, "provenance.code_version"] == p["code_version"]
    assert df.loc[0, "provenance.threads"] == 1


def _edit_checkpoint_version(out: Path, version: str) -> None:
    (prog,) = sorted(out.glob("checkpoints/step_*/progress.json"))[-1:]
    doc = json.loads(prog.read_text())
    assert doc["progress"]["code_version"]
    doc["progress"]["code_version"] = version
    prog.write_text(json.dumps(doc))


def test_resume_refuses_another_code_version_unless_told(make_cfg, tmp_path):
    from otmf_exp.runner import run_experiment

    out = tmp_path / "o"
    first = run_experiment(make_cfg("method=averaging", T2), out)
    _edit_checkpoint_version(out, "0123456789ab")
    with pytest.raises(UserError, match="code version 0123456789ab.*resume_across_versions=true"):
        run_experiment(make_cfg("method=averaging", T2, "resume=true"), out)
    again = run_experiment(
        make_cfg("method=averaging", T2, "resume=true", "resume_across_versions=true"), out
    )
    assert again["provenance"]["resumed_from_code_version"] == "0123456789ab"
    assert again["acc"] == first["acc"]
