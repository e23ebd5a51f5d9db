"""Bad input: one clear line, exit code 2, no traceback, no metrics.json."""

import os
import subprocess
import sys

import pytest

from otmf_exp.errors import UserError


def _cli(tmp_path, *args):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    p = subprocess.run(
        [sys.executable, "-m", "otmf_exp.run", f"out_dir={tmp_path / 'run'}", "progress=false", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return p


@pytest.mark.parametrize(
    "args, needle",
    [
        (["alpha=1.5"], "alpha must be in [0, 1]"),
        (["task_order=[rot90,nope]"], "unknown task 'nope'"),
        (["task_order=[rot90,rot90]"], "repeats task 'rot90'"),
        (["task_seq.tasks=[]"], "has no tasks"),
        (["method.iterations=-1"], "iterations must be >= 0"),
        (["method.batch_size=0"], "batch_size must be >= 1"),
        (["method.head_tuning.fraction=0"], "fraction must be in (0, 1]"),
        (["method.head_tuning.fraction=1.5"], "fraction must be in (0, 1]"),
        (["protocol=sideways"], "protocol must be"),
        (["method.mask.param=tanh"], "mask.param must be one of"),
    ],
)
def test_bad_values_one_line_exit_2(tmp_path, args, needle, zoo):
    p = _cli(tmp_path, *args)
    assert p.returncode == 2, p.stderr
    err_lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and needle in err_lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unknown_option_lists_choices(tmp_path):
    p = _cli(tmp_path, "method=nope")
    assert p.returncode != 0 and "Available options" in p.stderr and "otmf" in p.stderr


def test_unwritable_output_dir(tmp_path, zoo):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
        target = "/proc/otmf_exp_cannot_write_here"
    else:
        target = str(ro / "run")
    p = subprocess.run(
        [sys.executable, "-m", "otmf_exp.run", f"out_dir={target}"], capture_output=True, text=True
    )
    assert p.returncode == 2 and "not writable" in p.stderr and "Traceback" not in p.stderr


def test_mismatched_checkpoint_names_first_key(zoo):
    from otmf_exp.models.tiny import TinyBackbone

    bb = TinyBackbone(zoo)
    sd = {k: v.clone() for k, v in bb.pretrained_state().items()}
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    sd[key] = sd[key][:, :-1]
    with pytest.raises(UserError, match="fc1.weight"):
        bb.validate_finetuned("rot90", sd, "test")
    del sd[key]
    with pytest.raises(UserError, match="missing parameter 'vision_model.encoder.layers.0.mlp.fc1.weight'"):
        bb.validate_finetuned("rot90", sd, "test")
