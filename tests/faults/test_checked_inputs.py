"""Issue 27 class 3 (inputs used unchecked): every tensor handed on is checked (models/checks.py).

Each test tampers with a private copy of the digits8 zoo (``zoo_copy``) and asserts the exact
outcome: one ``error:`` line and exit 2, or (float16) the documented cast and a finished run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from faults.conftest import RUN, one_error
from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.models.checks import check_head, check_logits, check_state, check_tensor
from otmf_exp.runtime import digest

TASK = "rot90"
W = "vision_model.encoder.layers.0.mlp.fc1.weight"


def _tamper(path, fn) -> None:
    """Change the tensors of a zoo file, keeping its metadata (its key) and dropping it from the zoo's
    digest index (as in a zoo built before the index: the file is trusted and recorded on first use),
    so the zoo hands it on instead of rebuilding it and the tensor checks are what must catch it."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata=meta)
    index = path.parent / "digests.json"
    if index.exists():  # a zoo file (a checkpoint's state has no index)
        entries = digest.read_map(index)
        entries.pop(path.name, None)
        digest.write_map(index, entries)


def _nan(sd, key=W):
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")


@pytest.mark.parametrize(
    "where,fn,text",
    [
        ("pretrained", _nan, f"{W!r} has non-finite values (NaN/inf)"),
        ("pretrained", lambda sd: sd.update({W: sd[W] * 1e30}), f"{W!r} has |w| > 10000"),
        (
            "pretrained",
            lambda sd: sd.update({k: v.long() for k, v in sd.items()}),
            "has dtype int64; weights must",
        ),
        ("pretrained", lambda sd: sd.pop(W), f"missing parameter {W!r}"),
        (
            TASK,
            lambda sd: sd.update({W: sd[W].long()}),
            f"{W!r} has dtype int64; weights must be floating point",
        ),
        (TASK, _nan, f"{W!r} has non-finite values (NaN/inf)"),
        (TASK, lambda sd: sd.pop(W), f"missing parameter {W!r} (1 missing in all)"),
        (TASK, lambda sd: sd.update(head=sd["head"][:5]), "head has 5 rows for 10 classes"),
        (TASK, lambda sd: _nan(sd, "head"), "'head' has non-finite values (NaN/inf)"),
        (TASK, lambda sd: sd.update({W: sd[W] * 1e30}), "non-finite logits at step 1 on task 'rot90'"),
    ],
    ids=[
        "nan_pre",
        "absurd_pre",
        "int64_pre",
        "missing_pre",
        "int64_task",
        "nan_task",
        "missing_task",
        "head_5_rows",
        "nan_head",
        "nonfinite_logits",
    ],
)
def test_a_tampered_input_is_one_line(run_main, zoo_copy, tmp_path, where, fn, text):
    path = zoo_copy / f"{where}.safetensors"
    _tamper(path, fn)
    rc, _, err = run_main(*RUN, f"out_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}")
    line = one_error(err, 2, rc, text)
    if "logits" not in text:  # a file's fault names the file
        assert str(path) in line, line
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_a_float16_head_is_cast_with_one_log_line(run_main, zoo_copy, tmp_path, caplog):
    _tamper(zoo_copy / f"{TASK}.safetensors", lambda sd: sd.update(head=sd["head"].half()))
    rc, _, err = run_main(*RUN, f"out_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert rc == 0, err[-5:]
    acc = json.loads((tmp_path / "o" / "metrics.json").read_text())["acc"]
    assert 0 < acc <= 100
    log = (tmp_path / "o" / "run.log").read_text()
    assert log.count("'head' is float16; cast to float32") == 1, log


def test_the_checker_directly():
    ref = {"w": torch.zeros(2, 3)}
    with pytest.raises(UserError, match=r"^f: 'w' has shape \(3, 2\), expected \(2, 3\)$"):
        check_state({"w": torch.zeros(3, 2)}, ref, "f")
    with pytest.raises(UserError, match=r"^f: 'w' has dtype bool; weights must be floating point$"):
        check_tensor(torch.zeros(2, dtype=torch.bool), "w", "f")
    assert check_tensor(torch.ones(2, dtype=torch.bfloat16), "w", "f").dtype == torch.float32
    with pytest.raises(UserError, match=r"^h: head has 4 columns, expected the embedding dim 2$"):
        check_head(torch.zeros(10, 4), 10, 2, "h")
    assert check_head(torch.zeros(10, 3), 10, 2, "h").shape == (10, 3)  # a tuned head's bias column
    with pytest.raises(NonFiniteLossError, match="^non-finite logits x$"):
        check_logits(torch.tensor([1.0, float("inf")]), "x")


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, zoo) -> Path:
    """One completed 2-task run dir (checkpoints/step_002), copied before each tamper."""
    from hydra import compose, initialize_config_module

    from otmf_exp.runner import run_experiment

    out = tmp_path_factory.mktemp("checked") / "run"
    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        cfg = compose(config_name="run", overrides=RUN)
    run_experiment(cfg, out)
    return out


def _nan_state(sd):
    k = next(k for k, v in sd.items() if v.is_floating_point())
    _nan(sd, k)


@pytest.mark.parametrize(
    "name,fn,text",
    [
        ("state.safetensors", lambda p: _tamper(p, _nan_state), "has non-finite values (NaN/inf)"),
        (
            "progress.json",
            lambda p: _row(p, [50.0]),
            "accuracy row 2 is [50.0]: expected 2 finite values in [0, 100]",
        ),
        ("progress.json", lambda p: _row(p, [50.0, 180.0]), "accuracy row 2 is [50.0, 180.0]: expected 2"),
    ],
    ids=["nan_state", "short_row", "row_over_100"],
)
def test_a_tampered_checkpoint_is_one_line_on_resume(run_main, done_run, tmp_path, name, fn, text):
    out = tmp_path / "o"
    shutil.copytree(done_run, out)
    (out / "metrics.json").unlink()  # an unfinished run: resume reads the checkpoint
    path = out / "checkpoints" / "step_002" / name
    fn(path)
    rc, _, err = run_main(*RUN, f"out_dir={out}", "resume=true", f"hydra.run.dir={tmp_path / 'h'}")
    line = one_error(err, 2, rc, text)
    assert f"checkpoint {path} is unreadable" in line, line
    assert not (out / "metrics.json").exists()


def _row(path, row) -> None:
    doc = json.loads(path.read_text())
    doc["progress"]["rows"][1] = row
    path.write_text(json.dumps(doc))


def test_a_pickled_hf_checkpoint_is_one_line(tmp_path):
    """A ``pytorch_model.bin`` with pickled objects (refused by ``weights_only``) is one line, not
    torch's traceback; a plain pickled state dict still loads (torch accepts it safely)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from otmf_exp.models.checks import from_pretrained

    cfg = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    d = tmp_path / "tower"
    CLIPVisionModel(cfg).save_pretrained(d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    assert from_pretrained(CLIPVisionModel, d).config.hidden_size == 8  # a plain state dict loads
    torch.save({**sd, "extra": _Pickled()}, d / "pytorch_model.bin")
    with pytest.raises(UserError) as e:
        from_pretrained(CLIPVisionModel, d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d}: its pytorch_model.bin holds pickled objects"), msg
    assert "safetensors" in msg


class _Pickled:
    """An object torch's ``weights_only`` unpickler refuses."""
