"""Continual fine-tuning (``method=continual_finetune``): training, frozen heads, continuity, LoRA (peft) on
the tiny CLIP tower and the Flan-T5 fixture, seeding, resume with adapters, errors."""

from __future__ import annotations

import _hub_fixtures as fx
import pytest
import torch
import torch.nn.functional as F
from _hub_fixtures import seq_cfg, t5_cfg
from omegaconf import OmegaConf

from otmf_exp.config import validate_method
from otmf_exp.data import build_task_data
from otmf_exp.data.digits import build_task
from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.finetune.continual_finetune import ContinualFinetune, ContinualFinetuneConfig
from otmf_exp.models import build_backbone
from otmf_exp.models.tiny import TinyBackbone

_one_thread = fx._one_thread
hub_root = fx.hub_root


def _method(bb, seed: int = 0, records: dict | None = None, **kw) -> ContinualFinetune:
    cfg = OmegaConf.structured(ContinualFinetuneConfig)
    for k, v in kw.items():
        OmegaConf.update(cfg, k, v)
    validate_method(ContinualFinetune, cfg)
    rec = (lambda k, v: records.__setitem__(k, v)) if records is not None else (lambda k, v: None)
    ctx = MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False, record=rec, seed=seed)
    return ContinualFinetune(cfg, ctx)


@pytest.fixture(scope="module")
def tiny(zoo):
    return TinyBackbone(zoo, "cpu")


@pytest.fixture(scope="module")
def rot90():
    return build_task("rot90")


def _task(bb, data, i: int = 0) -> TaskInput:
    return TaskInput(data.name, i, None, bb.zero_shot_head(data).clone(), data)


def _ce(bb, params, head, data, n: int = 128) -> float:
    x, y = data.splits["train"]
    with torch.no_grad():
        return float(F.cross_entropy(bb.logits(params, head, x[:n]), y[:n]))


def test_training_lowers_the_loss_and_keeps_heads_and_projection_frozen(tiny, rot90):
    pre = tiny.pretrained_state()
    frozen = {n: p.clone() for n, p in tiny.module.named_parameters()}
    m = _method(tiny, steps=30, lr=1e-3, batch_size=32, scheduler="constant")
    task = _task(tiny, rot90)
    head = task.head.clone()
    state = m.step(m.init(pre), task, pre)
    assert torch.equal(task.head, head) and state.heads == {} and state.extra == {}
    assert all(torch.equal(p, frozen[n]) for n, p in tiny.module.named_parameters())  # θ₀, projection
    assert not any(p.requires_grad for p in tiny.module.parameters())
    assert set(state.merged) == set(pre) and any(v.abs().max() > 0 for v in state.merged.values())
    before, after = _ce(tiny, pre, head, rot90), _ce(tiny, m.merged(state, pre), head, rot90)
    assert after < 0.8 * before, (before, after)


def test_each_task_starts_from_the_previous_model_and_seed_drives_the_stream(tiny, rot90):
    pre = tiny.pretrained_state()
    flip = build_task("flip")
    rec0: dict = {}
    m = _method(tiny, seed=0, records=rec0, steps=3)
    s1 = m.step(m.init(pre), _task(tiny, rot90), pre)
    s2 = _method(tiny, steps=0).step(s1, _task(tiny, flip, 1), pre)  # no step: the model after task 1
    assert all(torch.equal(s2.merged[k], s1.merged[k]) for k in pre) and s2.step == 2
    again: dict = {}
    s1b = _method(tiny, seed=0, records=again, steps=3).step(m.init(pre), _task(tiny, rot90), pre)
    assert all(torch.equal(s1b.merged[k], s1.merged[k]) for k in pre) and again == rec0
    other: dict = {}
    s1c = _method(tiny, seed=1, records=other, steps=3).step(m.init(pre), _task(tiny, rot90), pre)
    assert other["loss_curve"] != rec0["loss_curve"]
    assert any(not torch.equal(s1c.merged[k], s1.merged[k]) for k in pre)


def test_lora_on_the_clip_tower_carries_its_adapters_and_restores_the_module(tiny, rot90):
    pre = tiny.pretrained_state()
    names = [n for n, _ in tiny.module.named_parameters()]
    m = _method(tiny, steps=3, lr=1e-3, **{"lora.enabled": True})
    s1 = m.step(m.init(pre), _task(tiny, rot90), pre)
    assert [n for n, _ in tiny.module.named_parameters()] == names  # adapters removed again
    assert s1.extra and all(k.startswith("lora/") and ".lora_" in k for k in s1.extra)
    assert {k.split(".self_attn.")[1].split(".")[0] for k in s1.extra} == {"q_proj", "v_proj"}
    changed = {k for k, v in s1.merged.items() if v.abs().max() > 0}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # τᵐ = B·A·(alpha / r) of the carried adapters
    k = next(iter(changed))
    a, b = s1.extra[f"lora/{k[: -len('.weight')]}.lora_A.default.weight"], None
    b = s1.extra[f"lora/{k[: -len('.weight')]}.lora_B.default.weight"]
    torch.testing.assert_close(s1.merged[k], b @ a * (32.0 / 16), rtol=1e-6, atol=1e-9)
    # the next task continues the same adapters (never merged into θ₀, never re-initialised)
    s2 = _method(tiny, steps=0, **{"lora.enabled": True}).step(s1, _task(tiny, build_task("flip"), 1), pre)
    assert all(torch.equal(s2.extra[k], v) for k, v in s1.extra.items())
    with pytest.raises(UserError, match="target_modules"):
        bad = _method(tiny, steps=1, **{"lora.enabled": True, "lora.target_modules": ["nowhere"]})
        bad.step(m.init(pre), _task(tiny, rot90), pre)
    assert [n for n, _ in tiny.module.named_parameters()] == names


def test_lora_on_flan_t5_trains_only_the_q_v_adapters(hub_root):
    t5 = build_backbone(t5_cfg(hub_root), torch.device("cpu"), progress=False)
    cola = build_task_data("cola", seq_cfg("glue8", "glue", hub_root), t5)
    pre = t5.pretrained_state()
    m = _method(t5, steps=2, lr=1e-3, batch_size=4, **{"lora.enabled": True})
    state = m.step(m.init(pre), TaskInput("cola", 0, None, None, cola), pre)
    changed = {k for k, v in state.merged.items() if v.abs().max() > 0}
    assert changed and all(k.endswith((".q.weight", ".v.weight")) for k in changed)
    assert {k.rsplit(".lora_", 1)[0][len("lora/") :] + ".weight" for k in state.extra} == changed
    full = _method(t5, steps=2, lr=1e-3, batch_size=4).step(
        m.init(pre), TaskInput("cola", 0, None, None, cola), pre
    )
    assert len({k for k, v in full.merged.items() if v.abs().max() > 0}) > len(changed)


def test_non_finite_loss_and_bad_values(tiny, rot90, monkeypatch):
    pre = tiny.pretrained_state()
    m = _method(tiny, steps=2)
    monkeypatch.setattr(m, "loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteLossError, match="step 0"):
        m.step(m.init(pre), _task(tiny, rot90), pre)
    for key, value in [("steps", -1), ("lr", 0.0), ("split", "dev"), ("scheduler", "step"), ("lora.r", 0)]:
        with pytest.raises(UserError, match=key):
            _method(tiny, **{key: value})


def test_joint_is_refused_and_lora_resume_equals_uninterrupted(run_cfg, monkeypatch):
    import json

    from otmf_exp.runtime import checkpoint

    with pytest.raises(UserError, match="joint"):
        run_cfg("method=continual_finetune", "protocol=joint")
    args = (
        "method=continual_finetune",
        "task_order=[rot90,flip]",
        "method.steps=3",
        "method.lora.enabled=true",
    )
    full, out = run_cfg(*args)
    steps = [json.loads(x)["loss_curve"] for x in (out / "steps.jsonl").read_text().splitlines()]
    (out / "metrics.json").unlink()
    real_save = checkpoint.save

    def save_then_die(out_dir, step, *a, **k):
        real_save(out_dir, step, *a, **k)
        if step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_cfg(*args)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed, out = run_cfg(*args, "resume=true")
    assert resumed["acc_matrix"] == full["acc_matrix"]
    assert [json.loads(x)["loss_curve"] for x in (out / "steps.jsonl").read_text().splitlines()] == steps


def test_published_rows_are_those_of_the_reference_settings():
    from otmf_exp.reporting.tables import load_reference, reference_method

    paper = {"lr": 1e-5, "steps": 4000, "batch_size": 16, "scheduler": "cosine", "lora.enabled": False}
    assert reference_method("continual_finetune", paper) == "continual_finetuning"
    assert reference_method("continual_finetune", paper | {"steps": 200}) is None
    assert reference_method("continual_finetune", paper | {"lora.enabled": True}) is None
    ref = load_reference()
    assert (ref["method"] == "continual_finetuning").sum() >= 9
