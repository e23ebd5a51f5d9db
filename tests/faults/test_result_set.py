"""Issue 39 classes 1-3 on the run side: one result set (``runtime/results.py``) that set-aside,
restore, cleanup and ownership derive from; a job's identity is its result-relevant config (the
sweep-dir check composes argv as Hydra does); a sweep job dir planted as a link is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from faults.conftest import RUN, one_error, tree_digest, untouched
from otmf_exp.runtime import manifest, results

NAMES = ("config.yaml", "steps.jsonl", "acc_matrix.csv", "metrics.json")


def _done(run_main, out: Path, *extra: str) -> None:
    rc, _, err = run_main(*RUN, f"out_dir={out}", *extra)
    assert rc == 0, err[-10:]


def _seed(out: Path) -> int:
    return json.loads((out / "metrics.json").read_text())["seed"]


def test_one_declaration_covers_every_name_a_run_writes():
    from otmf_exp.runtime.files import RUN_NAMES

    assert set(results.RESULT_SET) <= set(RUN_NAMES) and "merged_model" in results.RESULT_SET
    assert manifest.RESULTS == results.RESULT_SET
    assert {".previous", ".otmf_manifest.json", "checkpoints"} <= set(RUN_NAMES)


def test_a_stale_previous_is_never_restored_over_a_newer_complete_result(run_main, tmp_path, zoo):
    old, out = tmp_path / "old", tmp_path / "o"
    _done(run_main, old)
    _done(run_main, out, "seed=1")
    (out / ".previous").mkdir()  # our set-aside of the seed-0 result, left behind
    for name in NAMES:
        shutil.copy(old / name, out / ".previous" / name)
    (out / ".previous" / ".otmf_manifest.json").write_text(
        json.dumps({"files": list(NAMES), "set_aside": True})
    )
    rc, _, err = run_main(*RUN, f"out_dir={out}", "seed=2", "resume=true")  # refused: another config
    one_error(err, 2, rc, "it was run with seed=1, this run has seed=2")
    assert _seed(out) == 1
    _done(run_main, out, "seed=1")
    assert _seed(out) == 1 and not (out / ".previous").exists()


def test_a_users_previous_dir_is_refused_and_kept(run_main, tmp_path, zoo):
    out = tmp_path / "o"
    _done(run_main, out)
    (out / ".previous").mkdir()
    (out / ".previous" / "notes.txt").write_text("mine")
    with untouched(out / ".previous"):
        rc, _, err = run_main(*RUN, f"out_dir={out}", "seed=1")
    one_error(err, 2, rc, f"{out / '.previous'} was not written by a run of otmf_exp")
    assert _seed(out) == 0


def test_a_users_merged_model_dir_is_refused_and_kept(run_main, tmp_path, zoo):
    out = tmp_path / "o"
    (out / "merged_model").mkdir(parents=True)
    (out / "merged_model" / "weights.bin").write_text("mine")
    with untouched(out / "merged_model"):
        rc, _, err = run_main(*RUN, f"out_dir={out}", "save_merged=true")
    one_error(err, 2, rc, f"{out / 'merged_model'} was not written by a run of otmf_exp")


def test_rerun_without_save_merged_leaves_no_old_merged_model(run_main, tmp_path, zoo):
    out = tmp_path / "o"
    _done(run_main, out, "save_merged=true")
    assert (out / "merged_model").is_dir() and (out / "merged.safetensors").is_file()
    _done(run_main, out, "seed=1")
    assert not (out / "merged_model").exists() and not (out / "merged.safetensors").exists()
    assert _seed(out) == 1 and not (out / ".previous").exists()


def test_failed_export_restores_the_previous_result(run_main, tmp_path, zoo, monkeypatch):
    import errno

    from otmf_exp.models import export

    out = tmp_path / "o"
    _done(run_main, out, "save_merged=true")
    before = tree_digest(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_run_model", full)
    rc, _, err = run_main(*RUN, f"out_dir={out}", "seed=1", "save_merged=true")
    one_error(err, 2, rc, "free space on its disk")
    after = tree_digest(out)
    keep = [k for k in before if k.split("/")[0] in results.RESULT_SET]
    assert {k: after.get(k) for k in keep} == {k: before[k] for k in keep}
    assert _seed(out) == 0


def test_resume_refuses_a_run_dir_of_another_config(run_main, tmp_path, zoo):
    out = tmp_path / "o"
    _done(run_main, out, "protocol=joint", "method=task_arithmetic")
    with untouched(out / "metrics.json"):
        rc, _, err = run_main(
            *RUN, f"out_dir={out}", "protocol=joint", "method=task_arithmetic", "alpha=0.9", "resume=true"
        )
    one_error(err, 2, rc, "it was run with alpha=null, this run has alpha=0.9")
    _done(
        run_main, out, "protocol=joint", "method=task_arithmetic", "resume=true", "progress=true"
    )  # neutral keys: the same job


def test_job_dirs_are_named_by_the_method_preset():
    from otmf_exp.config import _job_method

    assert _job_method("adamerging_plus") != _job_method("adamerging")
    assert _job_method("a/b c") == "a_b_c"


def test_sweep_resume_refuses_a_job_of_another_config(run_main, tmp_path, zoo):
    """An experiment preset (not in the job dir's name) changes alpha: the job is refused, its
    result kept, the sweep exits 2."""
    cd = tmp_path / "conf" / "experiment"
    cd.mkdir(parents=True)
    (cd / "a9.yaml").write_text("# @package _global_\nalpha: 0.9\n")
    sd = tmp_path / "sweep"
    sweep = ["-m", *RUN, "method=task_arithmetic", f"hydra.sweep.dir={sd}"]
    rc, _, err = run_main(*sweep)
    assert rc == 0, err[-5:]
    (job,) = [p for p in sd.iterdir() if p.is_dir()]
    with untouched(job / "metrics.json"):
        rc, _, err = run_main(
            "--config-dir", str(tmp_path / "conf"), *sweep, "experiment=a9", "sweep_existing=resume"
        )
    assert rc == 2, err[-5:]
    assert any("it was run with alpha=null, this run has alpha=0.9" in s for s in err), err[-5:]


@pytest.mark.parametrize("form", ["--config-dir {d}", "--config-dir={d}", "-cd {d}"])
def test_sweep_dir_check_reads_argv_as_hydra_does(tmp_path, form):
    """The sweep dir comes from a preset in a --config-dir: the check finds it in every argv form."""
    from otmf_exp.errors import UserError
    from otmf_exp.runtime import sweep

    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    sd = tmp_path / "sweep"
    (conf / "here.yaml").write_text(f"# @package _global_\nhydra:\n  sweep:\n    dir: {sd}\n")
    (sd / "0_averaging").mkdir(parents=True)
    (sd / "multirun.yaml").write_text("{}")
    argv = [*form.format(d=tmp_path / "conf").split(), "method=averaging", "experiment=here"]
    with pytest.raises(UserError, match=f"sweep dir {sd} already holds results"):
        sweep.check_sweep_dir(argv)


def test_bad_yaml_in_a_config_dir_preset_is_one_line(run_main, tmp_path, zoo):
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "bad.yaml").write_text("foo: [1,\n  bar: }\n")
    for multi in ([], ["-m"]):
        rc, _, err = run_main(*multi, "--config-dir", str(tmp_path / "conf"), *RUN, "experiment=bad")
        one_error(err, 2, rc, "bad.yaml")


def test_a_sweep_job_dir_planted_as_a_link_is_refused(run_main, tmp_path, zoo):
    sd, victim = tmp_path / "sweep", tmp_path / "victim"
    sd.mkdir()
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (sd / "0_averaging_task_order=[rot90,rot180]").symlink_to(victim, target_is_directory=True)
    with untouched(victim):
        rc, _, err = run_main("-m", *RUN, f"hydra.sweep.dir={sd}")
    assert rc == 2, err[-5:]
    assert any("is a symbolic link" in s for s in err), err[-5:]


@pytest.mark.parametrize("code", ["EROFS", "EACCES", "ENOSPC"])
def test_an_oserror_anywhere_in_a_run_is_one_line_and_keeps_the_result(
    run_main, tmp_path, zoo, monkeypatch, code
):
    import errno
    import os

    from otmf_exp.reporting import metrics

    out = tmp_path / "o"
    _done(run_main, out)
    before = {k: v for k, v in tree_digest(out).items() if k in NAMES}

    def fail(*a, **k):
        num = getattr(errno, code)
        raise OSError(num, os.strerror(num), str(out / "acc_matrix.csv"))

    monkeypatch.setattr(metrics, "matrix_csv", fail)
    rc, _, err = run_main(*RUN, f"out_dir={out}", "seed=1")
    one_error(err, 2, rc, os.strerror(getattr(errno, code)))
    assert {k: v for k, v in tree_digest(out).items() if k in NAMES} == before
