"""The offline digits8 zoo: deterministic build, recipe-keyed cache, export, a real merging problem."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from otmf_exp.data import digits
from otmf_exp.offline.tiny_clip import TinyRecipe
from otmf_exp.offline.zoo import DigitsZoo

SMALL = TinyRecipe(pretrain_epochs=1, finetune_epochs=1)


def test_build_is_deterministic_and_recipe_keyed(tmp_path):
    a = DigitsZoo(SMALL, root=tmp_path / "a", progress=False)
    b = DigitsZoo(SMALL, root=tmp_path / "b", progress=False)
    a.build(), b.build()
    for f in ["pretrained.safetensors", "heads.safetensors", *[f"{t}.safetensors" for t in digits.DIGITS8]]:
        sa, sb = load_file(str(a.dir / f)), load_file(str(b.dir / f))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f
    assert DigitsZoo(TinyRecipe(pretrain_epochs=2), root=tmp_path).dir != a.dir  # changed recipe -> new cache
    assert a.is_built() and not any(
        p.name.startswith(".") for p in a.dir.parent.iterdir()
    )  # no temp leftovers


def test_export_cli(tmp_path, zoo):
    out = tmp_path / "export"
    subprocess.run(
        [sys.executable, "-m", "otmf_exp.offline.zoo", "export", str(out)], check=True, capture_output=True
    )
    names = {p.name for p in out.iterdir()}
    assert {"pretrained.safetensors", "heads.safetensors", "config.json"} <= names
    assert {f"{t}.safetensors" for t in digits.DIGITS8} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tasks"] == digits.DIGITS8 and cfg["module_config"]["hidden_size"] == 64
    pre, ft = load_file(str(out / "pretrained.safetensors")), load_file(str(out / "rot90.safetensors"))
    assert set(ft) <= set(pre) and all(k.startswith("vision_model.") for k in ft)


def test_tasks_are_distinct_and_test_images_held_out():
    tr, te = digits.image_split()
    assert not set(tr) & set(te) and len(tr) + len(te) == 1797
    xs = [digits.build_task(t).splits["test"][0] for t in digits.DIGITS8]
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            assert not torch.equal(xs[i], xs[j])
    assert digits.build_task("parity").classnames == ["even", "odd"]
