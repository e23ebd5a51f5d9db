"""Fault injection, issue 27 class 6: every failure of every CLI is one ``error:`` line with an
honest exit code (2 bad input, 130 Ctrl-C, 0 when the results were written and only the console
failed, 1 only for a real crash), and the files planted around it are left untouched."""

from __future__ import annotations

import json
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from faults.conftest import ASCII_STDOUT, RUN, one_error, subprocess_cli, tree_digest, untouched
from otmf_exp.errors import cli_main, one_line

ROOT = Path(__file__).resolve().parents[2]


def _tables_main():
    return runpy.run_path(str(ROOT / "scripts" / "make_tables.py"), run_name="make_tables")["main"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, zoo) -> Path:
    """One completed 2-task run dir (config.yaml, metrics.json, checkpoints/step_002), read-only use."""
    from hydra import compose, initialize_config_module

    from otmf_exp.runner import run_experiment

    out = tmp_path_factory.mktemp("finished") / "run"
    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=RUN)
    run_experiment(cfg, out)
    return out


# ---- the wrapper itself ------------------------------------------------------------------------
def test_wrapper_maps_each_ending_to_its_code(capsys):
    from otmf_exp.errors import UserError

    def raises(e):
        def fn(argv):
            raise e

        return fn

    cases = [
        (UserError("bad value"), 2, "error: bad value"),
        (
            FileNotFoundError(2, "No such file or directory", "/x/y"),
            2,
            "error: /x/y: No such file or directory",
        ),
        (KeyboardInterrupt(), 130, "interrupted"),
        (BrokenPipeError(), 0, None),
        (SystemExit(2), 2, None),
    ]
    for exc, code, line in cases:
        assert cli_main(raises(exc), []) == code, exc
        err = capsys.readouterr().err.splitlines()
        assert err == ([line] if line else []), (exc, err)
    assert cli_main(raises(ZeroDivisionError("bug")), []) == 1  # a real crash keeps its traceback
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "ZeroDivisionError: bug"
    assert cli_main(lambda argv: 0, []) == 0 and cli_main(lambda argv: None, []) == 0


def test_config_errors_are_one_line():
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError

    e = MissingConfigException(
        "In 'hydra/config': Could not find 'hydra/launcher/nope'\n\nAvailable options in 'hydra/launcher':"
        "\n\tbasic\n\tjoblib\nConfig search path:\n\tprovider=hydra, path=pkg://hydra.conf"
    )
    assert one_line(e) == (
        "In 'hydra/config': Could not find 'hydra/launcher/nope' Available options in 'hydra/launcher': basic, joblib"
    )
    k = ConfigKeyError(
        "Key 'alpha' not in 'TaskArithmeticConfig'\n    full_key: method.alpha\n    object_type=X"
    )
    assert one_line(k) == "Key 'alpha' not in 'TaskArithmeticConfig'"


# ---- python -m otmf_exp.run -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        (["alpha=${eval:1}"], "Unsupported interpolation type eval"),
        (["alpha=${nope}"], "Interpolation key 'nope' not found"),
        (["method=task_arithmetic", "alpha=???"], "Missing mandatory value: alpha"),
        (["method=task_arithmetic", "method.alpha=1"], "Key 'alpha' not in 'TaskArithmeticConfig'"),
        (["-m", "--cfg", "job"], "--cfg prints the config of one run and cannot be combined with -m"),
        (["-m", "--info", "config"], "Only one of --run, --multirun, --cfg, --info"),
        (
            ["-m", "hydra/launcher=nope"],
            "Could not find 'hydra/launcher/nope' Available options in 'hydra/launcher': basic",
        ),
    ],
    ids=[
        "eval_resolver",
        "unknown_interpolation",
        "missing_value",
        "unknown_key",
        "multirun_cfg",
        "multirun_info",
        "bad_launcher",
    ],
)
def test_config_errors_of_a_run_are_one_line(run_main, tmp_path, zoo, overrides, text):
    out, sweep = tmp_path / "o", tmp_path / "sweep"
    (tmp_path / "mine.txt").write_text("planted")
    with untouched(tmp_path / "mine.txt"):
        flags = [o for o in overrides if o.startswith("-") or o in ("job", "config")]  # first
        rest = [o for o in overrides if o not in flags]
        rc, _, err = run_main(*flags, *RUN, *rest, f"out_dir={out}", f"hydra.sweep.dir={sweep}")
    one_error(err, 2, rc, text)
    assert not (out / "metrics.json").exists() and not (sweep / "0" / "metrics.json").exists()


def test_unwritable_hydra_run_dir_is_one_line(run_main, tmp_path):
    planted = tmp_path / "afile"
    planted.write_text("mine")
    with untouched(planted):
        rc, _, err = run_main(*RUN, f"hydra.run.dir={planted}/run")
    one_error(err, 2, rc, f"{planted}")


def test_uncreatable_sweep_dir_is_one_line(run_main, tmp_path):
    planted = tmp_path / "afile"
    planted.write_text("mine")
    with untouched(planted):
        rc, _, err = run_main("-m", *RUN, f"hydra.sweep.dir={planted}/sweep")
    assert err == [f"error: {planted}/sweep: Not a directory"], err  # no callback warning before it
    assert rc == 2


def test_out_dir_naming_a_file_is_one_line(run_main, tmp_path):
    planted = tmp_path / "afile"
    planted.write_text("mine")
    with untouched(planted):
        rc, _, err = run_main(*RUN, f"out_dir={planted}", f"hydra.run.dir={tmp_path / 'h'}")
    one_error(err, 2, rc, str(planted.name))


def test_logger_dir_naming_a_file_is_one_line(run_main, tmp_path, zoo):
    planted = tmp_path / "afile"
    planted.write_text("mine")
    with untouched(planted):
        rc, _, err = run_main(
            *RUN, "logger=wandb", "logger.mode=offline", f"logger.dir={planted}", f"out_dir={tmp_path / 'o'}"
        )
    one_error(err, 2, rc, f"logger.dir / WANDB_DIR {planted} is a file")
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_no_wandb_key_is_one_line(run_main, tmp_path, zoo, no_wandb_key):
    rc, _, err = run_main(*RUN, "logger=wandb", "logger.mode=online", f"out_dir={tmp_path / 'o'}")
    one_error(err, 2, rc, "W&B could not start a run")
    assert "logger.mode=offline" in err[-1]


def test_deeply_nested_progress_json_is_one_line(run_main, finished_run, tmp_path):
    out = tmp_path / "o"
    import shutil

    shutil.copytree(finished_run, out)
    (out / "metrics.json").unlink()  # an unfinished run: resume reads the checkpoint's doc
    doc = out / "checkpoints" / "step_002" / "progress.json"
    doc.write_text("[" * 100_000 + "]" * 100_000)
    with untouched(out / "checkpoints", out / "config.yaml"):
        rc, _, err = run_main(*RUN, f"out_dir={out}", "resume=true")
    one_error(err, 2, rc, f"{doc}")
    assert "maximum recursion depth" in err[-1]


def test_ascii_stdout_and_a_closed_pipe_keep_exit_0(tmp_path):
    """The results are written before the table is printed: a console that cannot take the table
    is no failure (ASCII stand-ins; a closed pipe is silent). Needs a process (the real stdout)."""
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    m = {"method": "averaging", "task_seq": "digits8", "backbone": "tiny", "seed": 0, "order": ["a", "b"]}
    m |= {"acc": 80.0, "bwt": -1.0, "normalized_acc": 90.0, "wall_time_s": 1.0, "peak_memory_mb": 10.0}
    (runs / "r" / "metrics.json").write_text(json.dumps(m))
    cmd = [sys.executable, str(ROOT / "scripts" / "make_tables.py"), str(runs)]
    rc, out, err = subprocess_cli([*cmd, "--out", str(tmp_path / "t1")], ASCII_STDOUT)
    assert rc == 0 and not any("Traceback" in s for s in err), err
    out.encode("ascii")
    assert "| averaging |" in out and "80.0 " in out and (tmp_path / "t1" / "tables.md").exists()
    rc, _, err = subprocess_cli([*cmd, "--out", str(tmp_path / "t2")], shell_tail="| head -c 0")
    assert rc == 0 and not any("Traceback" in s for s in err), err
    assert (tmp_path / "t2" / "tables.md").read_text().count("averaging") >= 1
    rc, _, err = subprocess_cli(["bash", "-c", 'exec "$@" >&-', "x", *cmd, "--out", str(tmp_path / "t3")])
    assert rc == 0 and not any("Traceback" in s for s in err), err
    assert (tmp_path / "t3" / "tables.md").exists()


# ---- python -m otmf_exp.offline.zoo -------------------------------------------------------------
def test_ctrl_c_in_zoo_build_is_exit_130_one_line(zoo_copy):
    """SIGINT while a task model trains: exit 130, one line, the zoo's files untouched and no
    half-written file left (needs a process to signal)."""
    (zoo_copy / "rot90.safetensors").unlink()  # (our copy) rebuilt on demand: seconds of training
    with untouched(zoo_copy):
        p = subprocess.Popen(
            [sys.executable, "-m", "otmf_exp.offline.zoo", "build", "--tasks", "rot90"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stderr is not None
        first = p.stderr.readline()  # "building the offline digits zoo into ...": training has begun
        assert "building" in first, first
        p.send_signal(signal.SIGINT)
        _, rest = p.communicate(timeout=60)
    err = [s for s in rest.splitlines() if s.strip()]
    assert p.returncode == 130, (p.returncode, err)
    assert err == ["interrupted; the models built so far are kept, rerun to build the rest"]
    assert not (zoo_copy / "rot90.safetensors").exists()


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["build", "--tasks", "nope"], "nope"),
        (["build", "--tasks", ","], "--tasks needs at least one task name"),
        (["export", "{planted}", "--tasks", "rot90"], "exists and is not empty"),
    ],
    ids=["unknown_task", "empty_tasks", "export_onto_a_file"],
)
def test_zoo_cli_failures_are_one_line(run_cli, zoo_copy, tmp_path, argv, text):
    from otmf_exp.offline import zoo as zoo_mod

    planted = tmp_path / "afile"
    planted.write_text("mine")
    with untouched(planted, zoo_copy):
        rc, _, err = run_cli(zoo_mod.main, *[a.format(planted=planted) for a in argv])
    one_error(err, 2, rc, text)


# ---- scripts/make_tables.py ---------------------------------------------------------------------
def _tree(finished_run: Path, root: Path) -> Path:
    """``root/{good,bad}``: two copies of one finished run (metrics.json + config.yaml)."""
    for name in ("good", "bad"):
        (root / name).mkdir(parents=True)
        for f in ("metrics.json", "config.yaml"):
            (root / name / f).write_bytes((finished_run / f).read_bytes())
    return root


def _overlong(p: Path) -> None:
    m = json.loads(p.read_text())
    m["acc_matrix"] = [[*r, 1.0, 1.0] for r in m["acc_matrix"]] + [[1.0] * 4] * 2
    m["acc"] = 1.0
    p.write_text(json.dumps(m))


BAD_RUN = {
    "empty_list": ("metrics.json", lambda p: p.write_text("[]"), "not a run's metrics.json"),
    "deep_json": ("metrics.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "recursion"),
    "overlong_acc_matrix": ("metrics.json", _overlong, "acc_matrix of 4 rows of [4] values"),
    "python_tag": (
        "config.yaml",
        lambda p: p.write_text('!!python/object/apply:os.system ["echo pwned"]\n'),
        "could not determine a constructor for the tag",
    ),
    "not_utf8": ("metrics.json", lambda p: p.write_bytes(b"\xff\xfe{"), "unreadable run"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN))
def test_a_bad_run_dir_is_skipped_with_one_warning_and_the_table_written(
    run_cli, finished_run, tmp_path, caplog, case
):
    name, plant, text = BAD_RUN[case]
    root = _tree(finished_run, tmp_path / "runs")
    plant(root / "bad" / name)
    with untouched(root), caplog.at_level("WARNING"):
        rc, out, err = run_cli(_tables_main(), str(root), "--out", str(tmp_path / "t"))
    assert rc == 0 and not any("Traceback" in s for s in err), err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(root / "bad") in warned[0] and text in warned[0], warned
    assert f"note: unreadable metrics.json, not counted: {root / 'bad' / 'metrics.json'}" in err
    table = (tmp_path / "t" / "tables.md").read_text()
    assert "| averaging |   1 |" in table  # the good run, alone
    assert "| averaging |   1 |" in out


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["{runs}", "--out", "{planted}"], "--out {planted} is a file; give a directory"),
        (["{tmp}/nothing_here"], "no completed runs (metrics.json) under"),
        (["--wandb-export", "{tmp}/bad.json"], "bad.json is not a W&B runs export"),
        (["--wandb-export", "{tmp}/list.json"], "list.json is not a W&B runs export"),
        (["--wandb-export", "{tmp}/missing.csv"], "missing.csv: No such file or directory"),
        (["--wandb-export", "{tmp}/empty.csv"], "empty.csv is not a W&B runs export"),
        (["{runs}", "--out", "{planted}/sub"], "{planted}/sub"),
    ],
    ids=[
        "out_is_a_file",
        "no_runs",
        "export_not_json",
        "export_not_runs",
        "export_missing",
        "export_empty_csv",
        "out_under_a_file",
    ],
)
def test_make_tables_failures_are_one_line(run_cli, finished_run, tmp_path, argv, text):
    runs = _tree(finished_run, tmp_path / "runs")
    planted = tmp_path / "afile"
    planted.write_text("mine")
    (tmp_path / "bad.json").write_text('{"a": 1')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "empty.csv").write_text("")
    fmt = {"runs": runs, "planted": planted, "tmp": tmp_path}
    with untouched(planted, runs):
        rc, _, err = run_cli(_tables_main(), *[a.format(**fmt) for a in argv])
    one_error(err, 2, rc, text.format(**fmt))


# ---- python -m otmf_exp.hub.prefetch ----------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["nope=1"], "Could not override 'nope'"),
        (["task_seq=nope"], "Could not find 'task_seq/nope' Available options in 'task_seq':"),
    ],
    ids=["unknown_key", "unknown_choice"],
)
def test_prefetch_failures_are_one_line(run_cli, argv, text):
    from otmf_exp.hub import prefetch

    rc, _, err = run_cli(prefetch.main, *argv)
    one_error(err, 2, rc, text)


def test_tree_digest_sees_a_change(tmp_path):
    """The planted-files check can fail: one changed byte and one new link are seen."""
    (tmp_path / "a").write_text("x")
    before = tree_digest(tmp_path)
    (tmp_path / "a").write_text("y")
    assert tree_digest(tmp_path) != before
    with pytest.raises(AssertionError, match="planted files changed"), untouched(tmp_path):
        (tmp_path / "l").symlink_to("a")
