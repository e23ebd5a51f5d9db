"""Resume never mixes configurations: a changed result-relevant value is refused naming the key."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from otmf_exp.errors import UserError
from otmf_exp.runner import run_experiment
from otmf_exp.runtime.resume import first_difference, ignored, result_config

BASE = ("method=task_arithmetic", "task_order=[rot90,flip]", "eval_split=validation")


@pytest.fixture(scope="module")
def done(tmp_path_factory, zoo):
    """A completed, checkpointed run (scaling 0.3) and its metrics.json text."""
    from hydra import compose, initialize_config_module

    out = tmp_path_factory.mktemp("guard") / "run"
    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=["progress=false", *BASE])
    run_experiment(cfg, out)
    return out, (out / "metrics.json").read_text()


@pytest.fixture
def copy(done, tmp_path):
    src, _ = done
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "override, key, was, now",
    [
        ("alpha=0.9", "alpha", "null", "0.9"),
        ("method.scaling=0.5", "method.scaling", "0.3", "0.5"),
        ("seed=1", "seed", "0", "1"),
        ("eval_split=test", "eval_split", '"validation"', '"test"'),
        ("eval_individual=false", "eval_individual", "true", "false"),
        ("backbone.batch_size=64", "backbone.batch_size", "512", "64"),
        ("method=averaging", "method.name", '"task_arithmetic"', '"averaging"'),
        ("task_order=[flip,rot90]", "task_order", "[", "["),
    ],
)
def test_changed_value_is_refused_naming_key_and_both_values(
    make_cfg, copy, done, monkeypatch, override, key, was, now
):
    import otmf_exp.runner as runner

    def no_heavy_work(*a, **k):
        raise AssertionError("a model was built before the checkpoint's config was compared")

    monkeypatch.setattr(runner, "build_backbone", no_heavy_work)
    cfg = make_cfg(*BASE, override, "resume=true")
    with pytest.raises(UserError) as e:
        run_experiment(cfg, copy)
    msg = str(e.value)
    assert "\n" not in msg and f"with {key}={was}" in msg and f"has {key}={now}" in msg, msg
    assert (copy / "metrics.json").read_text() == done[1]  # the completed result survives the refusal


def test_values_that_cannot_change_results_do_not_block_resume(make_cfg, copy, caplog):
    cfg = make_cfg(*BASE, "resume=true", "keep_checkpoints=all", "save_merged=true", "backbone.num_workers=0")
    with caplog.at_level(logging.INFO):
        m = run_experiment(cfg, copy)
    assert "resuming from step 2 of 2" in caplog.text
    assert m["method_config"]["scaling"] == 0.3 and (copy / "merged.safetensors").exists()


def test_resume_without_checkpoint_says_it_starts_fresh(make_cfg, tmp_path, zoo, caplog):
    out = tmp_path / "fresh"
    with caplog.at_level(logging.WARNING):
        m = run_experiment(make_cfg(*BASE, "resume=true"), out)
    assert f"resume=true but {out} has no checkpoint: starting fresh" in caplog.text
    assert m["acc"] > 0 and (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{}", "'step' missing"),
        ("[]", "expected a JSON object"),
        ('{"step": 2, "scalars": {}}', "'progress' missing"),
        ("not json at all", "Expecting value"),
        ("", "Expecting value"),
    ],
)
def test_structurally_wrong_progress_gets_the_corrupted_line(make_cfg, copy, monkeypatch, content, problem):
    import otmf_exp.runner as runner

    monkeypatch.setattr(runner, "build_backbone", None)  # refused before any model is built
    doc = copy / "checkpoints" / "step_002" / "progress.json"
    doc.write_text(content)
    with pytest.raises(UserError) as e:
        run_experiment(make_cfg(*BASE, "resume=true"), copy)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {doc} is unreadable (") and problem in msg, msg
    assert "delete" in msg and "\n" not in msg


def test_older_checkpoint_without_recorded_config_is_refused(make_cfg, copy):
    doc = copy / "checkpoints" / "step_002" / "progress.json"
    d = json.loads(doc.read_text())
    del d["progress"]["config"]
    doc.write_text(json.dumps(d))
    with pytest.raises(UserError, match=r"'progress.config' missing .*older version"):
        run_experiment(make_cfg(*BASE, "resume=true"), copy)


def test_checkpoint_records_the_result_config(copy, make_cfg):
    d = json.loads((copy / "checkpoints" / "step_002" / "progress.json").read_text())
    rc = d["progress"]["config"]
    assert rc["method"]["scaling"] == 0.3 and rc["seed"] == 0 and len(d["progress"]["config_hash"]) == 64
    assert not {"progress", "logger", "out_dir", "resume", "keep_checkpoints"} & set(rc)
    assert "num_workers" not in rc["backbone"]


def test_result_config_applies_alpha_and_first_difference_orders_top_level_first():
    cfg = {"alpha": 0.9, "seed": 0, "progress": True, "backbone": {"num_workers": 2, "batch_size": 8}}
    rc = result_config(cfg, {"name": "otmf", "alpha": 0.9})
    assert rc == {
        "alpha": 0.9,
        "seed": 0,
        "backbone": {"batch_size": 8},
        "method": {"name": "otmf", "alpha": 0.9},
    }
    other = json.loads(json.dumps(rc))
    other["alpha"], other["method"]["alpha"] = 0.3, 0.3
    assert first_difference(other, rc) == ("alpha", 0.3, 0.9)
    assert "progress" in ignored() and first_difference(rc, rc) is None


def test_resume_refusal_through_the_cli(done, tmp_path):
    """The user-facing form: one ``error:`` line, exit code 2, no traceback."""
    import subprocess
    import sys

    out = tmp_path / "run"
    shutil.copytree(done[0], out)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "otmf_exp.run",
            *BASE,
            f"out_dir={out}",
            "resume=true",
            "alpha=0.9",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert err[0].startswith("error: cannot resume from") and "alpha=null" in err[0] and "alpha=0.9" in err[0]
    assert (out / "metrics.json").read_text() == done[1]
