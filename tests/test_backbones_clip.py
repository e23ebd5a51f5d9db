"""HF CLIP backbone + hf_vision task data, offline on tiny models saved in the real hub formats."""

from __future__ import annotations

import json

import _hub_fixtures as fx
import pytest
import torch
from _hub_fixtures import clip_cfg, fast_method_overrides, run_cli, seq_cfg

from otmf_exp.data import build_task_data
from otmf_exp.data.vision_tasks import VISION_TASKS, VIT8, VIT14, VIT20, classnames
from otmf_exp.errors import UserError
from otmf_exp.merging import METHODS
from otmf_exp.models import build_backbone
from otmf_exp.offline import tiny_hub

# shared fixtures (tests/_hub_fixtures.py)
_one_thread = fx._one_thread
_private_cache = fx._private_cache
hub_root = fx.hub_root


@pytest.fixture(scope="module")
def clip(hub_root):
    return build_backbone(clip_cfg(hub_root), torch.device("cpu"), progress=False)


def test_task_sequences_match_the_spec(make_cfg):
    assert VIT8 == ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert VIT20[8:14] == ["oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100"]
    assert VIT20[14:] == ["cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2"]
    for name, tasks in (("vit8", VIT8), ("vit14", VIT14), ("vit20", VIT20)):
        cfg = make_cfg(f"task_seq={name}")
        assert list(cfg.task_seq.tasks) == tasks and cfg.task_seq.kind == "hf_vision"
        assert cfg.backbone.name == "clip_vit_b32"  # default backbone of the vision sequences
    assert (
        VISION_TASKS["svhn"].config == "cropped_digits" and VISION_TASKS["food101"].test_split == "validation"
    )
    assert VISION_TASKS["fer2013"].rename == {"jpg": "image", "cls": "label"}
    assert VISION_TASKS["cifar100"].label[0] == "fine_label"
    assert classnames("mnist") == [str(i) for i in range(10)] and len(classnames("sun397")) == 397
    assert classnames("cifar100")[26] == "crab"
    for b in ("clip_vit_b16", "clip_vit_l14"):
        cfg = make_cfg("task_seq=vit8", f"backbone={b}")
        assert cfg.backbone.kind == "hf_clip" and cfg.backbone.finetuned.endswith("_{task}")


def test_mergeable_is_the_vision_tower_only(clip):
    names = clip.mergeable_names()
    assert names and all(n.startswith("vision_model.") for n in names)
    assert not any("projection" in n for n in names)
    assert set(clip.pretrained_state()) == set(names)


def test_finetuned_tower_and_features_match_a_reference_forward(clip, hub_root):
    from transformers import CLIPModel, CLIPVisionModel

    ft = clip.load_finetuned("mnist")
    ref_tower = CLIPVisionModel.from_pretrained(hub_root / tiny_hub.CLIP_FT.format(task="mnist")).eval()
    ref_proj = CLIPModel.from_pretrained(hub_root / tiny_hub.CLIP_ID).visual_projection.eval()
    x = torch.randn(3, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE)
    with torch.no_grad():
        expected = ref_proj(ref_tower(pixel_values=x).pooler_output)
        got = clip.features(ft, x)
        pre = clip.features(clip.pretrained_state(), x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(pre, expected, atol=1e-3)  # the fine-tuned weights really are used


def test_finetuned_mismatch_names_the_key(clip, hub_root, monkeypatch):
    sd = clip.pretrained_state()
    bad = {k: v for k, v in sd.items() if k != sorted(sd)[0]}
    with pytest.raises(UserError, match=sorted(sd)[0].replace(".", r"\.")):
        clip.validate_finetuned("mnist", bad, "test")


@pytest.mark.parametrize("task", ["mnist", "pcam", "svhn", "fer2013", "cifar100", "food101"])
def test_vision_task_data_columns_splits_batches(clip, hub_root, task):
    data = build_task_data(task, seq_cfg("vit20", "hf_vision", hub_root), clip)
    assert data.classnames == classnames(task) and data.templates == list(VISION_TASKS[task].templates)
    assert data.size("test") == 12  # food101: its hub "validation" split is the test set
    assert data.size("train") + data.size("validation") == 20 and data.size("validation") == 2
    batches = list(data.loader("test", 5))
    assert [len(b["labels"]) for b in batches] == [5, 5, 2]
    x, y = batches[0]["inputs"], batches[0]["labels"]
    assert x.shape == (5, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE) and x.dtype == torch.float32
    assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) < len(data.classnames)
    # subsets and shuffles are deterministic and drawn from the split
    a = torch.cat([b["labels"] for b in data.loader("train", 4, shuffle=True, seed=3, fraction=0.5)])
    b = torch.cat([b["labels"] for b in data.loader("train", 4, shuffle=True, seed=3, fraction=0.5)])
    assert torch.equal(a, b) and len(a) == 9


def test_validation_is_a_disjoint_tenth_of_train(clip, hub_root):
    import datasets

    data = build_task_data("mnist", seq_cfg("vit8", "hf_vision", hub_root), clip)
    raw = datasets.load_from_disk(str(hub_root / "ylecun/mnist"))["train"]
    pix = {tuple(raw[i]["image"].tobytes()[:64]) for i in range(len(raw))}
    val = data._get("validation").with_format(None)
    train = data._get("train").with_format(None)
    vkeys = {tuple(r["image"].tobytes()[:64]) for r in val}
    tkeys = {tuple(r["image"].tobytes()[:64]) for r in train}
    assert vkeys and not vkeys & tkeys and vkeys | tkeys == pix


def test_pcam_bool_labels_become_ints(clip, hub_root):
    import datasets

    raw = datasets.load_from_disk(str(hub_root / "1aurent/PatchCamelyon"))["test"]
    assert raw.features["label"].dtype == "bool"
    data = build_task_data("pcam", seq_cfg("vit14", "hf_vision", hub_root), clip)
    labels = torch.cat([b["labels"] for b in data.loader("test", 8)])
    assert labels.tolist() == [int(v) for v in raw["label"]]


def test_wrong_modality_and_unknown_task_are_user_errors(clip, hub_root):
    with pytest.raises(UserError, match="unknown vision task"):
        build_task_data("imagenet", seq_cfg("vit8", "hf_vision", hub_root), clip)
    with pytest.raises(UserError, match="text backbone"):
        build_task_data("cola", seq_cfg("glue8", "glue", hub_root), clip)


def test_missing_dataset_under_local_dir_is_one_line(clip, tmp_path):
    data = build_task_data("mnist", seq_cfg("vit8", "hf_vision", tmp_path), clip)
    with pytest.raises(UserError) as e:
        data.size("test")
    msg = str(e.value)
    assert "\n" not in msg and "ylecun/mnist" in msg and "hf download --repo-type dataset" in msg


def test_missing_model_under_local_dir_names_the_path(tmp_path):
    with pytest.raises(UserError) as e:
        build_backbone(clip_cfg(tmp_path), torch.device("cpu"), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / tiny_hub.CLIP_ID) in msg and "hf download" in msg


def test_missing_model_offline_exits_2_with_one_line(tmp_path):
    """No local_dir, empty HF cache, HF_HUB_OFFLINE=1: one error line, exit code 2, no metrics.json."""
    out = tmp_path / "run"
    proc = run_cli(
        "task_seq=vit8",
        "task_order=[mnist]",
        "method=task_arithmetic",
        f"out_dir={out}",
        env={"HF_HOME": str(tmp_path / "hf_home"), "OTMF_EXP_CACHE": str(tmp_path / "c")},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    assert (
        "'openai/clip-vit-base-patch32'" in errors[0]
        and "hf download openai/clip-vit-base-patch32" in errors[0]
    )
    assert "backbone.local_dir" in errors[0]
    assert not (out / "metrics.json").exists()


def test_end_to_end_cli_task_arithmetic(hub_root, tmp_path):
    out = tmp_path / "run"
    cache = tmp_path / "otmf_cache"
    proc = run_cli(
        "task_seq=vit8",
        f"backbone.local_dir={hub_root}",
        f"task_seq.local_dir={hub_root}",
        "task_order=[mnist,svhn]",
        "method=task_arithmetic",
        f"out_dir={out}",
        "backbone.num_workers=1",
        env={"OTMF_EXP_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone"] == "clip_vit_b32" and m["order"] == ["mnist", "svhn"]
    assert len(m["acc_matrix"]) == 2 and all(0.0 <= a <= 100.0 for a in m["acc_matrix"][1])
    assert len(list((cache / "heads").rglob("*.safetensors"))) == 2  # zero-shot heads cached on disk


@pytest.mark.parametrize("method", sorted(METHODS))
def test_end_to_end_every_method_in_process(hub_root, tmp_path, make_cfg, method):
    """Every registered method (picked up from the registry) on the tiny HF CLIP fixture."""
    from otmf_exp.runner import run_experiment

    base = [
        "task_seq=vit14",
        f"backbone.local_dir={hub_root}",
        f"task_seq.local_dir={hub_root}",
        "task_order=[mnist,pcam]",
        "backbone.batch_size=8",
        "backbone.num_workers=0",
    ]
    base.append(f"protocol={METHODS[method].protocols[0]}")  # continual, or joint for joint-only methods
    cfg = make_cfg(*base, f"method={method}", *fast_method_overrides(make_cfg, method, *base))
    m = run_experiment(cfg, tmp_path / "run")
    assert len(m["acc_matrix"]) == (2 if m["protocol"] == "continual" else 1)
    assert (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("seq,tasks", [("vit8", "[mnist,svhn]"), ("glue8", "[cola,stsb]")])
def test_cuda_autocast_end_to_end(hub_root, tmp_path, make_cfg, seq, tasks):
    """CUDA path: pinned batches, worker processes, bfloat16 autocast (run with -m gpu on a GPU box)."""
    from otmf_exp.runner import run_experiment

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = make_cfg(
        f"task_seq={seq}",
        f"backbone.local_dir={hub_root}",
        f"task_seq.local_dir={hub_root}",
        f"task_order={tasks}",
        "method=task_arithmetic",
        "device=cuda",
        "backbone.autocast=bfloat16",
        "backbone.num_workers=2",
        "backbone.batch_size=8",
    )
    m = run_experiment(cfg, tmp_path / "run")
    assert m["device"].startswith("cuda") and len(m["acc_matrix"]) == 2


@pytest.mark.network
@pytest.mark.parametrize(
    "overrides",
    [
        ["task_seq=vit20"],
        ["task_seq=vit20", "backbone=clip_vit_b16"],
        ["task_seq=vit20", "backbone=clip_vit_l14"],
        ["task_seq=vit8", "backbone=openclip_vit_b32"],
        ["task_seq=vit8", "backbone=openclip_vit_b16"],
        ["task_seq=vit8", "backbone=openclip_vit_l14"],
        ["task_seq=glue8"],
        ["task_seq=glue8", "backbone.variant=lora"],
    ],
)
def test_real_hub_ids_resolve(overrides):
    """Every model and dataset id of the real benchmarks exists on the hub (users with network: -m network)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "otmf_exp.hub.prefetch", *overrides, "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
