"""Zero-shot heads: formula, shape, normalisation, agreement with CLIP's own logits, class order, disk cache."""

from __future__ import annotations

from types import SimpleNamespace

import _hub_fixtures as fx
import pytest
import torch
import torch.nn.functional as F
from _hub_fixtures import clip_cfg, openclip_cfg

from otmf_exp.data.vision_tasks import VISION_TASKS, classnames
from otmf_exp.models import build_backbone, heads
from otmf_exp.offline import tiny_hub

# shared fixtures (tests/_hub_fixtures.py)
_one_thread = fx._one_thread
_private_cache = fx._private_cache
hub_root = fx.hub_root


@pytest.fixture(scope="module")
def clip(hub_root):
    return build_backbone(clip_cfg(hub_root), torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def oc(hub_root):
    return build_backbone(openclip_cfg(hub_root), torch.device("cpu"), progress=False)


def _task(name, names=None, templates=None):
    return SimpleNamespace(
        name=name,
        classnames=list(names or classnames(name)),
        templates=list(templates or VISION_TASKS[name].templates),
    )


def test_build_head_formula():
    table = {"a x": [3.0, 4.0], "b x": [0.0, 2.0], "a y": [1.0, 0.0], "b y": [0.0, -1.0]}

    def encode(texts):
        return torch.tensor([table[t] for t in texts])

    h = heads.build_head(encode, ["x", "y"], ["a {c}", "b {c}"], logit_scale=10.0, batch_size=3)
    # class x: mean(normalize([3,4]), normalize([0,2])) = mean([.6,.8],[0,1]) = [.3,.9] -> renormalised
    ex = F.normalize(torch.tensor([0.3, 0.9]), dim=0) * 10
    ey = F.normalize(torch.tensor([0.5, -0.5]), dim=0) * 10
    assert h.shape == (2, 2) and torch.allclose(h, torch.stack([ex, ey]), atol=1e-6)


@pytest.mark.parametrize("which", ["clip", "oc"])
def test_head_shape_and_norm(request, which):
    bb = request.getfixturevalue(which)
    h = bb.zero_shot_head(_task("cifar100"))
    scale = (bb.clip.logit_scale.exp()).item()
    dim = bb.features(
        bb.pretrained_state(), torch.zeros(1, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE)
    ).shape[-1]
    assert h.shape == (100, dim) and h.dtype == torch.float32
    assert torch.allclose(h.norm(dim=-1), torch.full((100,), scale), rtol=1e-5)


def test_hf_head_reproduces_clip_model_logits(clip, hub_root):
    """One template per class (mnist): our logits == CLIPModel's own logits_per_image."""
    from transformers import CLIPModel

    task = _task("mnist")
    prompts = [VISION_TASKS["mnist"].templates[0].format(c=c) for c in task.classnames]
    model = CLIPModel.from_pretrained(hub_root / tiny_hub.CLIP_ID).eval()
    tok = clip.tokenizer(prompts, padding=True, return_tensors="pt")
    x = torch.randn(4, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE)
    with torch.no_grad():
        ref = model(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=x
        ).logits_per_image
        ours = clip.logits(clip.pretrained_state(), clip.zero_shot_head(task), x)
    assert torch.allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("which", ["clip", "oc"])
def test_class_order_permutes_head_and_predictions(request, which):
    bb = request.getfixturevalue(which)
    names = classnames("eurosat")
    perm = [3, 7, 0, 9, 1, 2, 8, 4, 6, 5]
    h = bb.zero_shot_head(_task("eurosat"))
    hp = bb.zero_shot_head(_task("eurosat", [names[i] for i in perm]))
    assert torch.allclose(hp, h[perm], atol=1e-5)
    params = bb.pretrained_state()
    x = torch.randn(16, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE)
    with torch.no_grad():
        pred = bb.logits(params, h, x).argmax(-1)
        pred_p = bb.logits(params, hp, x).argmax(-1)
    # class c of the original order sits at position perm.index(c) of the permuted order
    assert pred_p.tolist() == [perm.index(c) for c in pred.tolist()]


def test_heads_are_cached_and_keyed_by_names_and_templates(clip, tmp_path, monkeypatch):
    task = _task("gtsrb")
    h1 = clip.zero_shot_head(task)
    files = list((tmp_path / "otmf_cache" / "heads").rglob("*.safetensors"))
    assert len(files) == 1 and "gtsrb" in files[0].name

    def boom(*a, **k):
        raise AssertionError("recomputed a cached head")

    monkeypatch.setattr(heads, "build_head", boom)
    monkeypatch.setattr("otmf_exp.models.hf_clip.build_head", boom)
    assert torch.equal(clip.zero_shot_head(task), h1)  # served from disk
    monkeypatch.undo()
    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "otmf_cache"))
    clip.zero_shot_head(_task("gtsrb", templates=["a sign: {c}."]))
    clip.zero_shot_head(_task("gtsrb", names=list(reversed(classnames("gtsrb")))))
    assert len(list((tmp_path / "otmf_cache" / "heads").rglob("*.safetensors"))) == 3


def test_corrupt_cache_entry_is_rebuilt(clip, tmp_path):
    task = _task("dtd")
    h1 = clip.zero_shot_head(task)
    (f,) = list((tmp_path / "otmf_cache" / "heads").rglob("*.safetensors"))
    f.write_bytes(b"not a safetensors file")
    assert torch.allclose(clip.zero_shot_head(task), h1)
