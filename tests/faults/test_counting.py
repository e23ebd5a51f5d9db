"""Fault injection, issue 27 class 7: tables count honestly. ``n`` is exactly the runs in the
mean; a NaN / infinite ``acc``, an unfinished run and conflicting duplicates are each listed in a
note; options that cannot change a result (evaluation batch size, num_workers, progress, logger)
do not split replicates. Through ``make_tables`` in-process, asserting the written summary.csv."""

from __future__ import annotations

import json
import math
import runpy
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from faults.conftest import RUN, untouched

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, zoo) -> Path:
    from hydra import compose, initialize_config_module

    from otmf_exp.runner import run_experiment

    out = tmp_path_factory.mktemp("counting") / "run"
    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=RUN)
    run_experiment(cfg, out)
    return out


def plant(src: Path, dest: Path, seed: int, acc: float | None = None, **cfg_changes) -> Path:
    """A copy of run ``src`` as ``dest`` with another seed (config and metrics), ``acc`` and config
    values (dotted keys) changed."""
    dest.mkdir(parents=True)
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    m = json.loads((src / "metrics.json").read_text())
    cfg["seed"] = m["seed"] = seed
    for key, value in cfg_changes.items():
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    if acc is not None:
        m["acc"] = acc
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    (dest / "metrics.json").write_text(json.dumps(m))  # NaN / Infinity as Python's json writes them
    return dest


def tables(run_cli, root: Path, out: Path) -> tuple[pd.DataFrame, list[str]]:
    main = runpy.run_path(str(ROOT / "scripts" / "make_tables.py"), run_name="make_tables")["main"]
    with untouched(root):
        rc, _, err = run_cli(main, str(root), "--out", str(out), "--quiet")
    assert rc == 0, err
    return pd.read_csv(out / "summary.csv"), [s.removeprefix("note: ") for s in err if s.startswith("note: ")]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_acc_is_out_of_n_and_the_mean_and_noted(run_cli, finished_run, tmp_path, bad):
    root = tmp_path / "runs"
    good = [plant(finished_run, root / f"s{s}", s, acc=a) for s, a in ((0, 70.0), (1, 80.0))]
    broken = plant(finished_run, root / "s2", 2, acc=bad)
    summary, notes = tables(run_cli, root, tmp_path / "t")
    assert len(summary) == 1 and summary.loc[0, "n"] == len(good)
    assert summary.loc[0, "acc_mean"] == pytest.approx(75.0)
    assert summary.loc[0, "acc_std"] == pytest.approx(statistics.stdev([70.0, 80.0]))
    assert notes == [f"acc is not a finite number, not counted in n or the mean: {broken}"]


def test_an_unfinished_run_is_noted(run_cli, finished_run, tmp_path):
    root = tmp_path / "runs"
    plant(finished_run, root / "s0", 0)
    half = plant(finished_run, root / "s1", 1)
    (half / "metrics.json").unlink()  # started (config.yaml) but never finished
    (half / "steps.jsonl").write_text("{}\n")
    summary, notes = tables(run_cli, root, tmp_path / "t")
    assert summary.loc[0, "n"] == 1
    assert notes == [f"unfinished (no metrics.json), not counted: {half}"]


def test_conflicting_duplicates_are_noted_and_counted_once(run_cli, finished_run, tmp_path):
    root = tmp_path / "runs"
    old = plant(finished_run, root / "a", 0, acc=70.0)
    new = plant(finished_run, root / "b", 0, acc=71.0)  # same settings, another result
    same = plant(finished_run, root / "c", 1, acc=60.0)
    twin = plant(finished_run, root / "d", 1, acc=60.0)
    import os

    for i, d in enumerate((old, new, same, twin)):  # finished_at = metrics.json's mtime: b, d newest
        os.utime(d / "metrics.json", (1_000_000 + i, 1_000_000 + i))
    summary, notes = tables(run_cli, root, tmp_path / "t")
    assert summary.loc[0, "n"] == 2 and summary.loc[0, "acc_mean"] == pytest.approx((71.0 + 60.0) / 2)
    assert sorted(notes) == sorted(
        [
            f"duplicate settings, conflicting results (acc 70, 71): kept {new} (newest), not counted: {old}",
            f"duplicate settings, same result: kept {twin} (newest), not counted: {same}",
        ]
    )


def test_options_that_cannot_change_a_result_do_not_split_replicates(run_cli, finished_run, tmp_path):
    root = tmp_path / "runs"
    plant(finished_run, root / "s0", 0, acc=70.0)
    plant(finished_run, root / "s1", 1, acc=72.0, **{"backbone.batch_size": 7, "backbone.num_workers": 3})
    plant(finished_run, root / "s2", 2, acc=74.0, progress=True, logger={"name": "wandb", "mode": "offline"})
    plant(finished_run, root / "s3", 3, acc=76.0, out_dir="/elsewhere", keep_checkpoints="all")
    summary, notes = tables(run_cli, root, tmp_path / "t")
    assert len(summary) == 1 and summary.loc[0, "n"] == 4, summary[["method", "variant", "n"]]
    assert summary.loc[0, "acc_mean"] == pytest.approx(73.0) and notes == []


def test_an_option_that_changes_a_result_splits_the_row(run_cli, finished_run, tmp_path):
    """The check above can fail: a method value (another experiment) makes a second row."""
    root = tmp_path / "runs"
    plant(finished_run, root / "s0", 0, acc=70.0)
    plant(finished_run, root / "s1", 1, acc=72.0, eval_split="validation")
    summary, _ = tables(run_cli, root, tmp_path / "t")
    assert sorted(summary["n"]) == [1, 1]
