"""logger=wandb: offline runs are written and read back; disabled writes nothing; one run per job."""

from __future__ import annotations

import json
import time

import pytest
from omegaconf import OmegaConf

from otmf_exp.tracking import NullTracker, make_tracker
from otmf_exp.tracking.wandb import WandbTracker, read_offline_run, run_name

FAST = ("task_order=[rot90]", "eval_split=validation")


def _offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_disabled_writes_nothing(run_cfg):
    m, out = run_cfg("method=pretrained", "logger=wandb", "logger.mode=disabled", *FAST)
    assert (out / "metrics.json").exists() and not (out / "wandb").exists()
    assert isinstance(make_tracker(OmegaConf.create({"name": "wandb", "mode": "disabled"})), NullTracker)


def test_curves_dicts_and_failure_exit_code(tmp_path, monkeypatch):
    """Loss curves (lists) become first/last/min series + a line chart; a failed run exits 1."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create(
        {
            "name": "wandb",
            "mode": "offline",
            "project": "p",
            "entity": None,
            "group": "g",
            "tags": [],
            "dir": None,
        }
    )
    tr = WandbTracker(cfg)
    tr.start({"method": {"name": "otmf"}, "task_seq": {"name": "digits8"}}, str(tmp_path))
    tr.log_step(
        {
            "step": 1,
            "task": "a",
            "acc": {"a": 50.0},
            "avg_acc": 50.0,
            "time_s": 0.5,
            "peak_memory_mb": 10.0,
            "memory_kind": "cpu_rss",
            "ot_loss_pre": [3.0, 2.0, 2.5],
            "head_tuning_loss": {"a": 0.1},
            "flag": True,
            "note": "x",
        }
    )
    tr.finish(None, failed=True)
    tr.finish(None, failed=True)  # idempotent
    (run,) = sorted((tmp_path / "wandb").glob("offline-run-*"))
    r = read_offline_run(run)
    deadline = time.time() + 20  # wandb-core may flush the exit record just after finish() returns
    while r["exit_code"] is None and time.time() < deadline:
        time.sleep(0.2)
        r = read_offline_run(run)
    assert r["exit_code"] == 1 and r["group"] == "g"
    h = r["history"][0]
    assert (h["step/ot_loss_pre/first"], h["step/ot_loss_pre/last"], h["step/ot_loss_pre/min"]) == (
        3.0,
        2.5,
        2.0,
    )
    assert h["step/head_tuning_loss/a"] == 0.1 and "step/flag" not in h and "step/note" not in h
    assert any(k.startswith("curves/ot_loss_pre/step_1") for k in h)
    assert "acc" not in r["summary"]


def test_each_multirun_job_has_its_own_offline_run(digits_multirun):
    """The multirun fixture ran with logger=wandb logger.mode=offline: one W&B run per job in its
    run dir, named method + overrides, holding that job's own summary, steps and config."""
    names = set()
    for f in sorted(digits_multirun.rglob("metrics.json")):
        m = json.loads(f.read_text())
        (run,) = _offline_runs(f.parent)  # dir defaults to the run dir
        r = read_offline_run(run)
        for k in ("acc", "bwt", "normalized_acc"):
            assert r["summary"][k] == pytest.approx(m[k]), k
        t = m["order"][0]
        assert r["summary"][f"per_task/{t}"] == pytest.approx(m["per_task"][t])
        assert r["exit_code"] == 0 and r["group"] == "digits8"
        assert r["name"].startswith(m["method"] + " ") and "order_seed=" in r["name"]
        assert "progress" not in r["name"] and "logger" not in r["name"]
        assert r["config"]["method"]["name"] == m["method"] and r["config"]["task_seq"]["name"] == "digits8"
        steps = [h for h in r["history"] if "step/acc" in h]
        assert [h["_step"] for h in steps] == [1, 2, 3, 4]
        assert steps[1][f"step/acc/{t}"] == pytest.approx(m["acc_matrix"][1][0])
        assert steps[-1]["step/acc"] == pytest.approx(m["acc"])
        assert all("step/time_s" in h and "step/peak_memory_mb" in h for h in steps)
        assert any(k.startswith("acc_matrix") for h in r["history"] for k in h)  # the wandb.Table
        names.add(r["name"])
    assert len(names) == 4  # nothing shared between jobs


def test_offline_runs_exported_give_the_run_dirs_table(digits_multirun, tmp_path):
    """What W&B recorded for the multirun, exported as the API's JSON list, loads as the same
    runs DataFrame rows and the same table as the run dirs (summary ``acc_matrix`` table refs and
    ``_wandb`` internals left out)."""
    from otmf_exp.reporting.runs import load_runs, load_wandb_export
    from otmf_exp.reporting.tables import aggregate

    items = []
    for f in sorted(digits_multirun.rglob("metrics.json")):
        (run,) = _offline_runs(f.parent)
        r = read_offline_run(run)
        items.append({"name": r["name"], "config": r["config"], "summary": r["summary"]})
    export = tmp_path / "runs.json"
    export.write_text(json.dumps(items, default=str))
    df = load_wandb_export(export)
    dirs = load_runs([digits_multirun])
    assert sorted(df["run_dir"]) == sorted(it["name"] for it in items) and len(df) == 4
    assert not [c for c in df if c.startswith(("_", "acc_matrix"))]
    key = ["method", "order_seed"]
    a, b = df.sort_values(key).reset_index(drop=True), dirs.sort_values(key).reset_index(drop=True)
    for col in ("method", "task_seq", "backbone", "seed", "order_seed", "order", "eval_split"):
        assert list(a[col]) == list(b[col]), col
    for col in ("acc", "bwt", "normalized_acc", *(c for c in dirs if c.startswith("per_task."))):
        assert list(a[col]) == pytest.approx(list(b[col])), col
    want, got = aggregate(dirs), aggregate(df)
    assert list(got["method"]) == list(want["method"]) and list(got["n"]) == list(want["n"]) == [2, 2]
    assert list(got["acc_mean"]) == pytest.approx(list(want["acc_mean"]))
    assert list(got["bwt_std"]) == pytest.approx(list(want["bwt_std"]))
    assert len(load_runs([digits_multirun], wandb_exports=[export])) == 4  # the same runs, counted once


def test_run_name_keeps_only_experiment_overrides():
    ov = [
        "method=otmf",
        "alpha=0.5",
        "progress=false",
        "logger.mode=offline",
        "hydra.verbose=true",
        "out_dir=/x",
        "task_order=shuffled",
        "+experiment=paper/ablation_alpha",
    ]
    assert run_name("otmf", ov) == "otmf alpha=0.5 task_order=shuffled +experiment=paper/ablation_alpha"
    assert run_name("averaging", []) == "averaging"


# ---- W&B's environment variables are honoured wherever the config leaves a value null ----------
_NULL = {
    "name": "wandb",
    "mode": None,
    "project": None,
    "entity": None,
    "group": None,
    "tags": [],
    "dir": None,
}
_RUN = {"method": {"name": "otmf"}, "task_seq": {"name": "digits8"}, "protocol": "continual"}
_ENV = ("WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS")
_ENV += ("WANDB_DIR", "WANDB_NAME", "WANDB_JOB_TYPE")


@pytest.fixture
def clean_env(monkeypatch):
    for k in _ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_defaults_without_environment(clean_env):
    from otmf_exp.tracking.wandb import settings

    s = settings(OmegaConf.create(_NULL), _RUN, "/run")
    assert (s["mode"], s["project"], s["entity"], s["group"], s["tags"], s["dir"], s["job_type"]) == (
        "online",
        "otmf_exp",
        None,
        "digits8",
        [],
        "/run",
        "continual",
    )
    assert s["name"] == "otmf"


def test_environment_fills_what_the_config_leaves_null(clean_env):
    from otmf_exp.tracking.wandb import settings

    env = {
        "WANDB_MODE": "offline",
        "WANDB_PROJECT": "proj",
        "WANDB_ENTITY": "team",
        "WANDB_RUN_GROUP": "grp",
        "WANDB_TAGS": "a, b",
        "WANDB_DIR": "/wb",
        "WANDB_NAME": "my run",
        "WANDB_JOB_TYPE": "eval",
    }
    for k, v in env.items():
        clean_env.setenv(k, v)
    s = settings(OmegaConf.create(_NULL), _RUN, "/run")
    assert (s["mode"], s["project"], s["entity"], s["group"], s["tags"], s["dir"]) == (
        "offline",
        "proj",
        "team",
        "grp",
        ["a", "b"],
        "/wb",
    )
    assert s["name"] == "my run" and s["job_type"] == "eval"
    # a value set in the config wins
    cfg = {**_NULL, "mode": "disabled", "project": "mine", "group": "g", "tags": ["t"], "dir": "/d"}
    s = settings(OmegaConf.create(cfg), _RUN, "/run")
    assert (s["mode"], s["project"], s["group"], s["tags"], s["dir"]) == (
        "disabled",
        "mine",
        "g",
        ["t"],
        "/d",
    )


def test_wandb_disabled_and_a_bad_mode(clean_env):
    from otmf_exp.errors import UserError
    from otmf_exp.tracking.wandb import settings

    clean_env.setenv("WANDB_DISABLED", "true")
    assert settings(OmegaConf.create(_NULL), _RUN, "/r")["mode"] == "disabled"
    clean_env.delenv("WANDB_DISABLED")
    clean_env.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match="WANDB_MODE must be online, offline or disabled, got 'sometimes'"):
        WandbTracker(OmegaConf.create(_NULL))


def test_wandb_mode_offline_from_the_environment_end_to_end(run_cfg, clean_env):
    """``logger=wandb`` without logger.mode: WANDB_MODE=offline gives an offline run in the run dir."""
    clean_env.setenv("WANDB_MODE", "offline")
    clean_env.setenv("WANDB_SILENT", "true")
    m, out = run_cfg("method=pretrained", "logger=wandb", *FAST)
    (run,) = _offline_runs(out)
    assert read_offline_run(run)["config"]["method"]["name"] == "pretrained"


def test_wandb_mode_disabled_from_the_environment_writes_nothing(run_cfg, clean_env):
    clean_env.setenv("WANDB_MODE", "disabled")
    m, out = run_cfg("method=pretrained", "logger=wandb", *FAST)
    assert (out / "metrics.json").exists() and not (out / "wandb").exists()


def test_a_linked_wandb_dir_is_refused_before_wandb_writes(clean_env, tmp_path):
    """W&B writes its own files (``<dir>/wandb/...``): a planted link there or at ``logger.dir`` is one
    line, and the link's target stays empty."""
    import os

    from otmf_exp.errors import UserError

    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim, out / "wandb")
    clean_env.setenv("WANDB_MODE", "offline")
    with pytest.raises(UserError, match=r"run/wandb is a symbolic link; W&B's files are never written"):
        WandbTracker(OmegaConf.create(_NULL)).start(_RUN, str(out))
    linked = tmp_path / "linked_dir"
    os.symlink(victim, linked)
    with pytest.raises(UserError, match=r"linked_dir is a symbolic link"):
        WandbTracker(OmegaConf.create({**_NULL, "dir": str(linked)})).start(_RUN, str(out))
    assert list(victim.iterdir()) == []
