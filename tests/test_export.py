"""save_merged=true writes merged_model/: loaded with the backbone's own library (transformers,
open_clip), never through our backbone code, it reproduces the run's recorded accuracy on a task."""

from __future__ import annotations

import json
import os

import _hub_fixtures as fx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from otmf_exp.data import build_task_data
from otmf_exp.models import build_backbone
from otmf_exp.offline import tiny_hub
from otmf_exp.runner import run_experiment

_one_thread = fx._one_thread
_private_cache = fx._private_cache
hub_root = fx.hub_root

SHARED_CACHE = os.environ.get("OTMF_EXP_CACHE")  # the session zoo's (the autouse fixture hides it)
VISION = ("task_seq=vit8", "task_order=[mnist,svhn]", "backbone.batch_size=8", "backbone.num_workers=0")


def _run(make_cfg, tmp_path, *overrides, method=("method=task_arithmetic",)):
    cfg = make_cfg(*overrides, *method, "save_merged=true")
    metrics = run_experiment(cfg, tmp_path / "run")
    model_dir = tmp_path / "run" / "merged_model"
    card = json.loads((model_dir / "otmf_exp.json").read_text())
    assert card["per_task"] == metrics["per_task"] and card["order"] == metrics["order"]
    assert card["method"] == cfg.method.name and len(card["config_hash"]) == 64 and not card["routed"]
    assert not list((tmp_path / "run").glob(".merged_model.*"))  # the staging dir is gone
    return cfg, metrics, model_dir, card


def _same_weights(loaded, tmp_path):
    """Every merged parameter of the run is in the loaded model, bit for bit."""
    merged = load_file(str(tmp_path / "run" / "merged.safetensors"))
    assert merged and all(torch.equal(loaded[k], v) for k, v in merged.items())


def _data(cfg, task):
    """The task's evaluation batches (the data pipeline only; the model comes from the library)."""
    return build_task_data(task, cfg.task_seq, build_backbone(cfg.backbone, torch.device("cpu"), False))


def _head_accuracy(embed, model_dir, task, data, split):
    """Accuracy (%) of ``embed(inputs)`` with the saved head, by the rule documented in the card."""
    head = load_file(str(model_dir / "heads.safetensors"))[task]
    assert head.shape[0] == len(json.loads((model_dir / "heads.json").read_text())[task])
    correct = total = 0
    with torch.no_grad():
        for batch in data.loader(split, 16):
            x = F.normalize(embed(batch["inputs"]), dim=-1)
            d = x.shape[-1]
            logits = x @ head[:, :d].T + (head[:, d] if head.shape[1] == d + 1 else 0)
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return 100.0 * correct / total


def test_tiny_digits_tower_loads_with_from_pretrained(make_cfg, tmp_path, zoo, monkeypatch):
    from transformers import CLIPVisionModelWithProjection

    if SHARED_CACHE is None:  # the digits zoo the session built, not a private rebuild
        monkeypatch.delenv("OTMF_EXP_CACHE")
    else:
        monkeypatch.setenv("OTMF_EXP_CACHE", SHARED_CACHE)

    otmf = ("method=otmf", "method.iterations=2", "method.head_tuning.steps=2")  # tunes the heads
    cfg, metrics, model_dir, card = _run(
        make_cfg, tmp_path, "task_order=[rot90,flip]", "eval_split=validation", method=otmf
    )
    dim = CLIPVisionModelWithProjection.config_class.from_pretrained(model_dir).projection_dim
    assert load_file(str(model_dir / "heads.safetensors"))["flip"].shape[1] == dim + 1  # tuned: bias column
    tower = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
    _same_weights(tower.state_dict(), tmp_path)
    acc = _head_accuracy(
        lambda x: tower(pixel_values=x).image_embeds, model_dir, "flip", _data(cfg, "flip"), cfg.eval_split
    )
    print(f"round trip {card['backbone_kind']} flip: recorded {metrics['per_task']['flip']}, reloaded {acc}")
    assert acc != 0.0 and acc == pytest.approx(metrics["per_task"]["flip"], abs=1e-9)


def test_hf_clip_tower_and_processor_load_with_from_pretrained(make_cfg, tmp_path, hub_root):
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    local = (f"backbone.local_dir={hub_root}", f"task_seq.local_dir={hub_root}")
    seq = ("task_seq=vit14", "task_order=[mnist,pcam]")  # pcam: binary, so the random fixture scores > 0
    cfg, metrics, model_dir, card = _run(make_cfg, tmp_path, *VISION, *seq, *local)
    ids = metrics["provenance"]["models"]  # identity: θ₀, each θ_t, each cached head, by content
    assert {"pretrained", "mnist", "pcam", "head:mnist", "head:pcam"} <= set(ids), ids
    AutoImageProcessor.from_pretrained(model_dir)  # the preprocessing travels with the model
    tower = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
    _same_weights(tower.state_dict(), tmp_path)
    acc = _head_accuracy(
        lambda x: tower(pixel_values=x).image_embeds, model_dir, "pcam", _data(cfg, "pcam"), cfg.eval_split
    )
    print(f"round trip {card['backbone_kind']} pcam: recorded {metrics['per_task']['pcam']}, reloaded {acc}")
    assert acc != 0.0 and acc == pytest.approx(metrics["per_task"]["pcam"], abs=1e-9)


def test_open_clip_state_dict_loads_into_create_model(make_cfg, tmp_path, hub_root):
    import open_clip

    cfg, metrics, model_dir, card = _run(
        make_cfg,
        tmp_path,
        *VISION,
        "backbone=openclip_vit_b32",
        f"backbone.arch={hub_root / 'otmf-tiny-ViT.json'}",
        "backbone.pretrained_tag=null",
        f"backbone.model_id={tiny_hub.OPENCLIP_ID}",
        f"backbone.local_dir={hub_root}",
        f"backbone.checkpoint_dir={hub_root / 'checkpoints'}",
        f"task_seq.local_dir={hub_root}",
    )
    model = open_clip.create_model(card["arch"])
    model.load_state_dict(load_file(str(model_dir / "open_clip_model.safetensors")))  # strict: full keys
    model.eval()
    _same_weights(model.state_dict(), tmp_path)
    acc = _head_accuracy(model.encode_image, model_dir, "mnist", _data(cfg, "mnist"), cfg.eval_split)
    print(
        f"round trip {card['backbone_kind']} mnist: recorded {metrics['per_task']['mnist']}, reloaded {acc}"
    )
    assert acc != 0.0 and acc == pytest.approx(metrics["per_task"]["mnist"], abs=1e-9)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_flan_t5_loads_with_auto_seq2seq(make_cfg, tmp_path, hub_root, variant):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from otmf_exp.data.glue import score

    local = (f"backbone.local_dir={hub_root}", f"task_seq.local_dir={hub_root}")
    overrides = ("task_seq=glue8", "task_order=[cola,stsb]", "backbone.num_workers=0", *local)
    cfg, metrics, model_dir, card = _run(make_cfg, tmp_path, *overrides, f"backbone.variant={variant}")
    assert card["variant"] == variant and card["heads"] is None and not (model_dir / "heads.json").exists()
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    _same_weights(model.state_dict(), tmp_path)
    data = _data(cfg, "stsb")
    ours = build_backbone(cfg.backbone, torch.device("cpu"), False)  # cross-check only: same answers
    merged = {k: v for k, v in load_file(str(tmp_path / "run" / "merged.safetensors")).items()}
    preds, targets = [], []
    with torch.no_grad():
        for batch in data.loader(cfg.eval_split, 16):
            out = model.generate(**batch["inputs"], **card["generation"])
            preds += tok.batch_decode(out, skip_special_tokens=True)
            assert preds[-len(out) :] == ours.generate_text(merged, batch["inputs"])
            targets += batch["targets"]
    acc = score(preds, targets, getattr(data, "metric", "exact_match"))
    print(f"round trip {card['backbone_kind']} stsb: recorded {metrics['per_task']['stsb']}, reloaded {acc}")
    assert acc == pytest.approx(metrics["per_task"]["stsb"], abs=1e-9)  # the random fixture: 0 here
