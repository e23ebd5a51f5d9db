"""The offline digits zoo: deterministic, per-task on-demand builds, recipe/task-keyed cache, export."""

import json
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from otmf_exp.data import digits
from otmf_exp.errors import UserError
from otmf_exp.offline import zoo as zoo_mod
from otmf_exp.offline.tiny_clip import TinyRecipe
from otmf_exp.offline.zoo import HEAD, DigitsZoo, suite_tasks

SMALL = TinyRecipe(pretrain_epochs=1, finetune_epochs=1)
LEGACY = [
    "rot90",
    "rot180",
    "flip",
    "invert",
    "shift",
    "noise",
    "occlude",
    "parity",
]  # build order before per-task seeds
NEW = digits.DigitsTask(  # a task a user might add: a transform plus its own label rule
    lambda x: np.swapaxes(x, 1, 2), labels=lambda y: (y >= 5).astype(np.int64), classnames=("small", "large")
)


def _files(z: DigitsZoo) -> set[str]:
    return {p.name for p in z.dir.glob("*.safetensors")}  # digests.json is the zoo's index


def test_build_is_deterministic_and_recipe_keyed(tmp_path):
    a = DigitsZoo(SMALL, root=tmp_path / "a", progress=False)
    b = DigitsZoo(SMALL, root=tmp_path / "b", progress=False)
    a.build(suite_tasks()), b.build(suite_tasks())
    for f in ["pretrained.safetensors", *[f"{t}.safetensors" for t in suite_tasks()]]:
        assert (a.dir / f).read_bytes() == (b.dir / f).read_bytes(), f  # same bytes twice
        sa, sb = load_file(str(a.dir / f)), load_file(str(b.dir / f))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f
    assert all(HEAD in load_file(str(a.task_path(t))) for t in suite_tasks())  # head lives with its task
    assert DigitsZoo(TinyRecipe(pretrain_epochs=2), root=tmp_path).dir != a.dir  # changed recipe -> new cache
    assert a.is_built(suite_tasks()) and not any(
        p.name.startswith(".") for d in (a.dir.parent, a.dir) for p in d.iterdir()
    )  # no temp leftovers


def test_one_task_builds_only_that_task_and_a_changed_task_rebuilds_alone(tmp_path, monkeypatch):
    z = DigitsZoo(SMALL, root=tmp_path, progress=False)
    sd, source = z.finetuned_state("flip")
    assert _files(z) == {"pretrained.safetensors", "flip.safetensors"} and source == str(z.task_path("flip"))
    assert set(sd) and all(k.startswith("vision_model.") for k in sd) and z.head("flip").shape == (10, 32)
    assert z.is_built(["flip"]) and not z.is_built(["rot90"])
    z.build(["rot90"])
    inode = {f: (z.dir / f).stat().st_ino for f in _files(z)}
    before = {f: (z.dir / f).read_bytes() for f in _files(z)}
    monkeypatch.setitem(digits.TASKS, "flip", digits.DigitsTask(lambda x: x[:, ::-1, :], seed=3))
    z2 = DigitsZoo(SMALL, root=tmp_path, progress=False)
    assert z2.task_key("flip") != z.task_key("flip") and z2.task_key("rot90") == z.task_key("rot90")
    assert not z2.is_built(["flip"]) and z2.is_built(["rot90"])
    z2.build(["rot90", "flip"])
    for f in ("pretrained.safetensors", "rot90.safetensors"):  # untouched: same file, same bytes
        assert (z.dir / f).stat().st_ino == inode[f] and (z.dir / f).read_bytes() == before[f]
    assert (z.dir / "flip.safetensors").read_bytes() != before["flip.safetensors"] and z2.is_built(["flip"])


def test_new_task_builds_on_demand_and_runs_end_to_end(tmp_path, monkeypatch, make_cfg, zoo):
    from otmf_exp.runner import run_experiment

    monkeypatch.setitem(digits.TASKS, "bigsmall", NEW)
    cache = tmp_path / "cache" / zoo.dir.name  # reuse the session's pre-trained tower and rot90 model
    cache.mkdir(parents=True)
    for f in ("pretrained.safetensors", "rot90.safetensors"):
        shutil.copy2(zoo.dir / f, cache / f)
    monkeypatch.setenv("OTMF_EXP_CACHE", str(cache.parent))
    cfg = make_cfg("task_seq.tasks=[rot90,bigsmall]", "method.iterations=6", "method.head_tuning.steps=2")
    metrics = run_experiment(cfg, tmp_path / "run")
    assert metrics["order"] == ["rot90", "bigsmall"] and set(metrics["per_task"]) == {"rot90", "bigsmall"}
    assert 50.0 < metrics["per_task"]["bigsmall"] <= 100.0  # two classes: better than chance
    assert {p.name for p in cache.glob("*.safetensors")} == {
        "pretrained.safetensors",
        "rot90.safetensors",
        "bigsmall.safetensors",
    }
    fresh = DigitsZoo(progress=False)
    assert (
        fresh.dir == cache
        and fresh.is_built(["rot90", "bigsmall"])
        and fresh.head("bigsmall").shape == (2, 32)
    )
    assert fresh.task_seed("bigsmall") == zlib.crc32(b"bigsmall")  # no explicit seed: derived from the name
    assert digits.build_task("bigsmall").classnames == ["small", "large"]


def test_unknown_task_is_one_line_user_error(tmp_path, capsys, monkeypatch):
    z = DigitsZoo(SMALL, root=tmp_path, progress=False)
    for call in (
        lambda: digits.build_task("nope"),
        lambda: z.finetuned_state("nope"),
        lambda: z.head("nope"),
    ):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "'nope'" in msg and ", ".join(sorted(digits.TASKS)) in msg
        assert "TASKS in otmf_exp/data/digits.py" in msg and "task_seq YAML" in msg
    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "cli"))
    assert zoo_mod.main(["build", "--tasks", "rot90,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown digits task 'nope'")
    assert not z.dir.exists() and not (tmp_path / "cli").exists()  # checked before anything is built


def test_legacy_seeds_unchanged_and_new_seeds_derived(monkeypatch):
    assert suite_tasks() == LEGACY  # the digits8 YAML is the task list (no second list in code)
    for recipe_seed in (0, 3):
        z = DigitsZoo(TinyRecipe(seed=recipe_seed), progress=False)
        for i, task in enumerate(LEGACY):
            assert digits.TASKS[task].seed == 1 + i
            assert z.task_seed(task) == recipe_seed + 1 + i  # what the all-at-once zoo used
        monkeypatch.setitem(digits.TASKS, "bigsmall", NEW)
        assert z.task_seed("bigsmall") == recipe_seed + zlib.crc32(b"bigsmall")


def test_publish_keeps_theirs_replaces_stale_and_leaves_no_temp(tmp_path):
    path = tmp_path / "t.safetensors"
    zoo_mod.publish(path, {"w": torch.zeros(2)}, "k1")
    ino = path.stat().st_ino
    zoo_mod.publish(path, {"w": torch.ones(2)}, "k1")  # same key appeared meanwhile: theirs is kept
    assert path.stat().st_ino == ino and torch.equal(load_file(str(path))["w"], torch.zeros(2))
    zoo_mod.publish(path, {"w": torch.ones(2)}, "k2")  # stale key: replaced
    assert zoo_mod.stored_key(path) == "k2" and torch.equal(load_file(str(path))["w"], torch.ones(2))
    path.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="t.safetensors"):
        zoo_mod.stored_key(path)
    zoo_mod.publish(path, {"w": torch.ones(2)}, "k2")  # a broken file: replaced
    assert zoo_mod.stored_key(path) == "k2" and [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_two_processes_building_the_same_task(tmp_path):
    code = (
        "import sys; from pathlib import Path; from otmf_exp.offline.zoo import DigitsZoo; "
        "from otmf_exp.offline.tiny_clip import TinyRecipe; "
        "DigitsZoo(TinyRecipe(pretrain_epochs=1, finetune_epochs=1), root=Path(sys.argv[1]), progress=False)"
        ".build(['noise'])"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "race")]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ref = DigitsZoo(SMALL, root=tmp_path / "ref", progress=False)
    ref.build(["noise"])
    raced = DigitsZoo(SMALL, root=tmp_path / "race", progress=False)
    assert _files(raced) == {
        "pretrained.safetensors",
        "noise.safetensors",
    }  # complete files, no temp leftovers
    for f in _files(raced):
        assert (raced.dir / f).read_bytes() == (ref.dir / f).read_bytes(), f


def test_export_cli(tmp_path, zoo):
    out = tmp_path / "export"
    subprocess.run(
        [sys.executable, "-m", "otmf_exp.offline.zoo", "export", str(out)], check=True, capture_output=True
    )
    names = {p.name for p in out.iterdir()}
    assert {"pretrained.safetensors", "heads.safetensors", "config.json"} <= names
    assert {f"{t}.safetensors" for t in suite_tasks()} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tasks"] == suite_tasks() and cfg["module_config"]["hidden_size"] == 64
    pre, ft = load_file(str(out / "pretrained.safetensors")), load_file(str(out / "rot90.safetensors"))
    assert set(ft) <= set(pre) and all(k.startswith("vision_model.") for k in ft)
    assert set(load_file(str(out / "heads.safetensors"))) == set(suite_tasks())
    assert zoo_mod.main(["export", str(tmp_path / "two"), "--tasks", "rot90,parity"]) == 0
    assert {p.name for p in (tmp_path / "two").iterdir()} == {
        "pretrained.safetensors",
        "rot90.safetensors",
        "parity.safetensors",
        "heads.safetensors",
        "config.json",
    }
    assert (tmp_path / "two" / "rot90.safetensors").read_bytes() == (out / "rot90.safetensors").read_bytes()


def test_tasks_are_distinct_and_test_images_held_out():
    tr, te = digits.image_split()
    assert not set(tr) & set(te) and len(tr) + len(te) == 1797
    xs = [digits.build_task(t).splits["test"][0] for t in suite_tasks()]
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            assert not torch.equal(xs[i], xs[j])
    assert digits.build_task("parity").classnames == ["even", "odd"]
