"""open_clip backbone (task_vectors layout), offline on a tiny architecture registered with add_model_config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _hub_fixtures as fx
import pytest
import torch
from _hub_fixtures import openclip_cfg, openclip_overrides, seq_cfg

from otmf_exp.data import build_task_data
from otmf_exp.errors import UserError
from otmf_exp.models import build_backbone
from otmf_exp.offline import tiny_hub

ROOT = Path(__file__).resolve().parents[1]

# shared fixtures (tests/_hub_fixtures.py)
_one_thread = fx._one_thread
_private_cache = fx._private_cache
hub_root = fx.hub_root


@pytest.fixture(scope="module")
def oc(hub_root):
    return build_backbone(openclip_cfg(hub_root), torch.device("cpu"), progress=False)


def _reference(hub_root, visual_sd=None):
    import open_clip

    m = open_clip.create_model(tiny_hub.OPENCLIP_ARCH)
    m.load_state_dict(
        torch.load(hub_root / tiny_hub.OPENCLIP_ID / "open_clip_pytorch_model.bin", weights_only=True)
    )
    if visual_sd is not None:
        m.visual.load_state_dict(visual_sd)
    return m.eval()


def test_configs_compose(make_cfg):
    for name, arch, repo in (
        ("openclip_vit_b32", "ViT-B-32", "timm/vit_base_patch32_clip_224.openai"),
        ("openclip_vit_b16", "ViT-B-16", "timm/vit_base_patch16_clip_224.openai"),
        ("openclip_vit_l14", "ViT-L-14", "timm/vit_large_patch14_clip_224.openai"),
    ):
        cfg = make_cfg("task_seq=vit8", f"backbone={name}")
        assert cfg.backbone.kind == "open_clip" and cfg.backbone.arch == arch
        assert cfg.backbone.pretrained_tag == "openai" and cfg.backbone.model_id == repo


def test_mergeable_is_the_whole_image_tower(oc):
    names = oc.mergeable_names()
    assert names and all(n.startswith("visual.") for n in names)
    assert "visual.proj" in names and "visual.class_embedding" in names


@pytest.mark.parametrize(
    "task", ["mnist", "pcam", "svhn"]
)  # <task>.pt (model.* keys), PCAM/finetuned.pt, .safetensors
def test_finetuned_layouts_and_features(oc, hub_root, task):
    ft = oc.load_finetuned(task)
    pre = oc.pretrained_state()
    assert set(ft) == set(pre) and any(not torch.equal(ft[k], pre[k]) for k in ft)
    ref = _reference(hub_root, {k[len("visual.") :]: v for k, v in ft.items()})
    x = torch.randn(2, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE)
    with torch.no_grad():
        assert torch.allclose(oc.features(ft, x), ref.encode_image(x), atol=1e-5)


def test_pickled_module_is_refused_then_converted(oc, hub_root, tmp_path):
    with pytest.raises(UserError) as e:
        oc.load_finetuned("fer2013")
    msg = str(e.value)
    assert "\n" not in msg and "scripts/convert_task_vectors_checkpoint.py" in msg and "pickled" in msg
    out = tmp_path / "converted" / "fer2013.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert_task_vectors_checkpoint.py"),
            str(hub_root / "checkpoints" / "fer2013.pt"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    conv = build_backbone(openclip_cfg(hub_root, checkpoint_dir=str(out.parent)), torch.device("cpu"), False)
    ft = conv.load_finetuned("fer2013")
    pickled = torch.load(hub_root / "checkpoints" / "fer2013.pt", weights_only=False)["model"]
    assert all(torch.equal(ft[f"visual.{k}"], v) for k, v in pickled.visual.state_dict().items())


def test_missing_checkpoint_and_dir_are_user_errors(oc, hub_root, tmp_path):
    with pytest.raises(UserError, match=r"cifar100\.safetensors.*CIFAR100/finetuned\.pt"):
        oc.load_finetuned("cifar100")
    with pytest.raises(UserError, match="checkpoint_dir"):
        build_backbone(openclip_cfg(hub_root, checkpoint_dir=None), torch.device("cpu"), False)


def test_openai_tag_resolves_its_hub_repo_and_fails_offline_in_one_line(hub_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = openclip_cfg(hub_root, arch="ViT-B-32", pretrained_tag="openai", model_id=None, local_dir=None)
    with pytest.raises(UserError) as e:
        build_backbone(cfg, torch.device("cpu"), False)
    msg = str(e.value)
    assert "\n" not in msg and "'timm/vit_base_patch32_clip_224.openai'" in msg and "hf download" in msg


def test_data_uses_open_clip_preprocessing(oc, hub_root):
    data = build_task_data("fer2013", seq_cfg("vit14", "hf_vision", hub_root), oc)
    batch = next(iter(data.loader("test", 4)))
    assert batch["inputs"].shape == (4, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE)
    assert batch["labels"].dtype == torch.long


@pytest.mark.parametrize(
    "method",
    [
        ["method=task_arithmetic"],
        ["method=concrete", "protocol=joint", "method.max_steps=2", "method.batch_size=4"],  # trains
    ],
)
def test_end_to_end_in_process(hub_root, tmp_path, make_cfg, method):
    from otmf_exp.runner import run_experiment

    cfg = make_cfg(
        *openclip_overrides(hub_root),
        *method,
        "backbone.batch_size=8",
    )
    m = run_experiment(cfg, tmp_path / "run")
    assert m["backbone"] == "openclip_vit_b32" and len(m["acc_matrix"]) == (
        1 if "protocol=joint" in method else 2
    )
    models = m["provenance"]["models"]  # θ₀, each θ_t and each cached zero-shot head, by content
    assert {"pretrained", "mnist", "svhn", "head:mnist", "head:svhn"} <= set(models), models
    assert all(len(v) == 64 for v in models.values()), models
