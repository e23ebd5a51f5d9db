"""Issue 27 class 1 (data loss): a run owns what it writes (runtime/manifest.py) and nothing else."""

from __future__ import annotations

import json

from tests.faults.conftest import RUN, one_error, tree_digest, untouched


def _done(run_main, out) -> dict:
    rc, _, err = run_main(*RUN, f"out_dir={out}")
    assert rc == 0, err[-10:]
    return tree_digest(out)


def _results(digest: dict) -> dict:
    names = ("config.yaml", "steps.jsonl", "acc_matrix.csv", "metrics.json")
    return {k: v for k, v in digest.items() if k in names}


def test_user_files_under_checkpoints_survive(run_main, tmp_path, zoo):
    out = tmp_path / "o"
    (out / "checkpoints" / "mine").mkdir(parents=True)
    (out / "checkpoints" / "mine" / "vit.pt").write_text("user's")
    with untouched(out / "checkpoints" / "mine"):
        _done(run_main, out)
    assert "metrics.json" in json.loads((out / ".otmf_manifest.json").read_text())["files"]


def test_user_metrics_json_in_a_foreign_dir_is_refused(run_main, tmp_path, zoo):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    with untouched(out / "metrics.json"):
        rc, _, err = run_main(*RUN, f"out_dir={out}")
    one_error(err, 2, rc, f"{out / 'metrics.json'} was not written by a run of otmf_exp")


def test_failed_wandb_start_keeps_the_old_result(run_main, tmp_path, zoo, no_wandb_key):
    out = tmp_path / "o"
    before = _results(_done(run_main, out))
    rc, _, err = run_main(*RUN, "logger=wandb", "logger.mode=online", f"out_dir={out}")
    assert rc == 2, err[-5:]
    assert _results(tree_digest(out)) == before
    assert not (out / ".previous").exists()


def test_failure_and_ctrl_c_at_the_end_keep_the_old_result(run_main, tmp_path, zoo, monkeypatch):
    from otmf_exp.reporting import metrics

    out = tmp_path / "o"
    before = _results(_done(run_main, out))
    for exc in (KeyboardInterrupt, RuntimeError("broken")):

        def boom(*a, exc=exc, **k):
            raise exc

        with monkeypatch.context() as m:
            m.setattr(metrics, "matrix_csv", boom)  # after steps.jsonl and checkpoints were rewritten
            rc, _, _ = run_main(*RUN, "seed=1", f"out_dir={out}")
        assert rc != 0
        assert _results(tree_digest(out)) == before, exc


def test_killed_rerun_is_restored_then_replaced(run_main, tmp_path, zoo):
    out = tmp_path / "o"
    _done(run_main, out)
    # what a rerun killed (-9) after moving the old set aside leaves: .previous/ + a partial steps.jsonl
    from otmf_exp.runtime import manifest

    assert manifest.set_aside(out)
    (out / "steps.jsonl").write_text("{}\n")
    acc = json.loads((out / ".previous" / "metrics.json").read_text())["acc_matrix"]
    _done(run_main, out)
    assert json.loads((out / "metrics.json").read_text())["acc_matrix"] == acc
    assert json.loads((out / "steps.jsonl").read_text().splitlines()[0])["step"] == 1
    assert not (out / ".previous").exists()


def test_rerun_with_other_config_replaces_the_result(run_main, tmp_path, zoo):
    out = tmp_path / "o"
    _done(run_main, out)
    rc, _, err = run_main(*RUN, "seed=1", f"out_dir={out}")
    assert rc == 0, err[-5:]
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    assert "seed: 1" in (out / "config.yaml").read_text()
    assert not (out / ".previous").exists()


def test_second_sweep_into_a_sweep_dir(run_main, tmp_path, zoo):
    sd = tmp_path / "sweep"
    sweep = ["-m", *RUN, f"hydra.sweep.dir={sd}"]
    rc, _, err = run_main(*sweep)
    assert rc == 0, err[-5:]
    jobs = sorted(p.name for p in sd.iterdir() if p.is_dir())
    assert len(jobs) == 1 and jobs[0].startswith("0_")
    with untouched(sd):
        rc, _, err = run_main(*sweep)
    one_error(
        err, 2, rc, f"sweep dir {sd} already holds results (1 job dir(s) with metrics.json, multirun.yaml)"
    )
    with untouched(sd / jobs[0], sd / "multirun.yaml"):
        old_conf = (sd / "multirun.yaml").read_text()
        rc, _, err = run_main(*sweep, "sweep_existing=append")
        assert rc == 0, err[-5:]
        assert (sd / "multirun.1.yaml").read_text() == old_conf
        # multirun.yaml is rewritten by Hydra: restore the planted copy for `untouched`
        (sd / "multirun.yaml").write_text(old_conf)
    new = sorted(p.name for p in sd.iterdir() if p.is_dir() and p.name not in jobs)
    assert new == ["1_" + jobs[0].partition("_")[2]] and (sd / new[0] / "metrics.json").is_file()
    rc, _, err = run_main(*sweep, "sweep_existing=resume")
    assert rc == 0, err[-5:]
    assert sorted(p.name for p in sd.iterdir() if p.is_dir()) == sorted(jobs + new)
