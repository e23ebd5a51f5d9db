"""Bad input: one clear line, exit code 2, no traceback, no metrics.json; every value checked
before any heavy work (the schemas' declared ranges and choices + each method's ``validate``)."""

import json
import math
import os
import subprocess
import sys

import pytest

from otmf_exp.errors import UserError
from otmf_exp.runtime import files


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
        (
            ["method=task_arithmetic", "method.scaling=nan"],
            "method.scaling must be a finite number >= 0, got nan",
        ),
        (["eval_split=tset"], "eval_split must be one of ['train', 'validation', 'test']"),
        (["device=gpu"], "device must be auto, cpu, cuda, cuda:N or mps"),
        (["seed=-1"], "seed must be an integer in [0, 4294967295]"),
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


# ---- every value, in-process: refused by Experiment() before any model or data is touched ------
@pytest.mark.parametrize(
    "args, needle",
    [
        # non-finite floats, anywhere in the config
        (["alpha=nan"], "alpha must be a finite number in [0, 1] or null, got nan"),
        (["method=task_arithmetic", "method.scaling=inf"], "method.scaling must be a finite number"),
        (["method=opcm", "method.alpha=nan"], "method.alpha must be a finite number"),
        (["method.sinkhorn.blur=inf"], "method.sinkhorn.blur must be a finite number > 0, got inf"),
        (["method.head_tuning.lr=-inf"], "method.head_tuning.lr must be a finite number"),
        (["method=ties", "method.density=nan"], "method.density must be a finite number"),
        (
            ["backbone=synthetic", "task_seq=synthetic", "backbone.noise=nan"],
            "backbone.noise must be a finite",
        ),
        # split names wherever they are
        (["eval_split=dev"], "eval_split must be one of"),
        (["method.adapt_split=val"], "method.adapt_split must be one of"),
        (["method.head_tuning.split=dev"], "method.head_tuning.split must be one of"),
        (["method=adamerging", "method.adapt_split=tst"], "method.adapt_split must be one of"),
        # device strings
        (["device=cuda0"], "device must be auto, cpu, cuda, cuda:N or mps"),
        (["device=tpu"], "device must be auto, cpu, cuda, cuda:N or mps"),
        # seeds in range
        (["seed=-1"], "seed must be an integer in [0, 4294967295]"),
        (["seed=99999999999999999999999"], "seed must be an integer in [0, 4294967295]"),
        (["order_seed=-5", "task_order=shuffled"], "order_seed must be an integer"),
        # counts and sizes by rule
        (["backbone.num_workers=-1"], "backbone.num_workers must be >= 0"),
        (["backbone.batch_size=0"], "backbone.batch_size must be >= 1"),
        (["method.head_tuning.batch_size=0"], "method.head_tuning.batch_size must be >= 1"),
        (["method.eval_batches=-2"], "method.eval_batches must be >= 0"),
        (["method=adamerging", "method.steps=-1"], "method.steps must be >= 0"),
        (["backbone.max_new_tokens=0"], "backbone.max_new_tokens must be >= 1"),
        (["method=adamerging", "method.lr=0"], "method.lr must be > 0"),
        # one sign convention for every coefficient
        (["method=task_arithmetic", "method.scaling=-1"], "method.scaling must be >= 0"),
        (["method=ties", "method.scaling=-1"], "method.scaling must be >= 0"),
        (["method=magmax", "method.scaling=-0.5"], "method.scaling must be >= 0"),
        (["method=opcm", "method.alpha=-0.1"], "method.alpha must be >= 0"),
        (["method.sinkhorn.scaling=-0.5"], "method.sinkhorn.scaling must be in (0, 1), got -0.5"),
        # choices of the shared groups
        (["backbone.autocast=fp8"], "backbone.autocast must be one of"),
        (["logger.mode=sometimes"], "logger.mode must be one of"),
        (["keep_checkpoints=some"], "keep_checkpoints must be one of ['last', 'all', 'none']"),
        (
            ["method.student_weights=all", "method.checkpoint_blocks=true"],
            "method.checkpoint_blocks=true needs method.student_weights=layerwise",
        ),
        (
            ["method.checkpoint_blocks=sometimes"],
            "method.checkpoint_blocks must be one of ['auto', true, false]",
        ),
        (["method.memory_budget_mb=0"], "method.memory_budget_mb must be > 0 or null"),
        # issue 27: a negative chunk made range(0, n, -1) empty and OTMF trained nothing
        (["method.backward_chunk=-1"], "method.backward_chunk must be >= 1 or null, got -1"),
        (["method.backward_chunk=0"], "method.backward_chunk must be >= 1 or null, got 0"),
        (["threads=0"], "threads must be auto or an integer >= 1, got 0"),
        (["matmul_precision=low"], "matmul_precision must be one of ['highest', 'high', 'medium']"),
        (
            ["method.schedule=joint", "method.adam_in_backward=true"],
            "adam_in_backward=true needs one backward",
        ),
        (["method.l1=0.1", "method.adam_in_backward=true"], "adam_in_backward=true needs one backward"),
    ],
)
def test_every_value_is_checked_before_heavy_work(make_cfg, tmp_path, monkeypatch, args, needle):
    import otmf_exp.runner as runner

    def no_heavy_work(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(runner, "build_backbone", no_heavy_work)
    with pytest.raises(UserError) as e:
        runner.Experiment(make_cfg(*args), tmp_path / "run")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cuda_device_on_a_machine_without_it(make_cfg, tmp_path):
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(UserError, match=f"has {n} CUDA device"):
            from otmf_exp.runner import Experiment

            Experiment(make_cfg(f"device=cuda:{n}"), tmp_path / "run")
    else:
        from otmf_exp.runner import Experiment

        with pytest.raises(UserError, match="CUDA is not available"):
            Experiment(make_cfg("device=cuda:0"), tmp_path / "run")


def test_metrics_json_is_strict_json(tmp_path, caplog):
    path = tmp_path / "m.json"
    files.write_json(path, {"acc": float("nan"), "rows": [[1.0, float("inf")]], "ok": 2.5})

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert doc == {"acc": None, "rows": [[1.0, None]], "ok": 2.5}
    assert "acc" in caplog.text and "rows[0][1]" in caplog.text


def test_a_run_writes_strict_json(run_cfg):
    m, out = run_cfg("method=averaging", "task_order=[rot90,flip]", "eval_split=validation")

    def refuse(token):
        raise ValueError(token)

    for name in ("metrics.json",):
        json.loads((out / name).read_text(), parse_constant=refuse)
    for line in (out / "steps.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    assert math.isfinite(m["acc"])


def test_every_shipped_config_passes_the_value_rules(make_cfg):
    """The rules never refuse a shipped default or preset (a rule that did would be a bug)."""
    from pathlib import Path

    import otmf_exp.conf

    from otmf_exp.config import check_values

    conf = Path(otmf_exp.conf.__file__).parent
    overrides = [
        f"{g}={p.stem}"
        for g in ("backbone", "task_seq", "method", "logger")
        for p in (conf / g).glob("*.yaml")
    ]
    overrides += [
        f"experiment={p.relative_to(conf / 'experiment').with_suffix('').as_posix()}"
        for p in (conf / "experiment").rglob("*.yaml")
    ]
    assert len(overrides) > 30
    for o in overrides:
        check_values(make_cfg(o))
