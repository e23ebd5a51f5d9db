"""MINGLE through the real runner: digits8 (growth per step, leakage flag, SIGKILL + resume), the tiny
Flan-T5, open_clip and HF CLIP fixtures (the experts act in ``generate`` and in open_clip's attention)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import _hub_fixtures as fx
import torch
from _hub_fixtures import openclip_cfg, openclip_overrides, seq_cfg, t5_cfg

from otmf_exp.config import method_config
from otmf_exp.data import build_task_data
from otmf_exp.merging import METHODS, MethodContext, TaskInput
from otmf_exp.models import build_backbone
from otmf_exp.offline import tiny_hub

_one_thread = fx._one_thread
hub_root = fx.hub_root
ORDER = "task_order=[rot90,flip,invert]"
FAST = ("method=mingle", "method.max_steps=5")


def _steps(out) -> list[dict]:
    return [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]


def test_digits_run_reports_growth_and_leakage(run_cfg):
    m, out = run_cfg(*FAST, ORDER)
    steps = _steps(out)
    assert m["state_growth"] == "per_task" and len(steps) == 3
    growth = [steps[0]["state_mb"]] + [b["state_mb"] - a["state_mb"] for a, b in zip(steps, steps[1:])]
    assert all(abs(g - growth[0]) < 1e-9 for g in growth) and growth[0] > 0  # the same every task
    assert abs(m["state_mb"] - 3 * growth[0]) < 1e-9
    assert all(s["mingle_seed_test_leakage"] is True for s in steps)
    assert steps[0]["mingle_seed_samples"] == 50  # 5 per class, 10 classes
    # 2 blocks x (q, k, v, out_proj, fc1: C = 64; fc2: C = 128), C + 1 each
    assert steps[0]["mingle_trainable_params"] == 2 * (5 * 65 + 129)
    assert "mingle_effective_rank_mean" in steps[1] and "mingle_lambda" in steps[1]
    assert steps[0]["mingle_options"]["lr"] == 1e-4 and steps[0]["mingle_options"]["lora_layer"] == [
        "attn",
        "mlp",
    ]
    ckpt = json.loads((out / "checkpoints" / "step_003" / "progress.json").read_text())
    assert ckpt["step"] == 3
    from safetensors.torch import load_file

    tensors = load_file(str(out / "checkpoints" / "step_003" / "state.safetensors"))
    assert not any(k.startswith("merged/") for k in tensors)
    assert sum(k.startswith("extra/") and k.endswith("/U") for k in tensors) == 12


def test_validation_seeds_are_not_flagged_and_change_the_result(run_cfg):
    m, out = run_cfg(*FAST, "task_order=[rot90,flip]", "method.seed_split=validation")
    steps = _steps(out)
    assert not any("mingle_seed_test_leakage" in s for s in steps)
    assert 0.0 <= m["acc"] <= 100.0


def test_static_variant_needs_no_data(run_cfg):
    m, out = run_cfg("method=mingle", "method.static_gate=0.3", "task_order=[rot90,flip]")
    steps = _steps(out)
    assert "mingle_seed_samples" not in steps[0] and "time_tta_s" not in steps[0]
    assert 0.0 <= m["acc"] <= 100.0


def _cmd(out, *extra):
    return [sys.executable, "-m", "otmf_exp.run", f"out_dir={out}", ORDER, *FAST, "progress=false", *extra]


def _strip(d: dict) -> dict:
    skip = (
        "time",
        "wall",
        "peak",
        "baseline",
        "start_memory",
        "eval_time",
        "provenance",
    )  # provenance: the command line
    return {k: v for k, v in d.items() if not k.startswith(skip)}


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, zoo):
    full = tmp_path / "full"
    subprocess.run(_cmd(full), check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = out / "checkpoints" / "step_002"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (out / "metrics.json").exists()
    r = subprocess.run(_cmd(out, "resume=true"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step" in (out / "run.log").read_text()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, out))
    assert _strip(a) == _strip(b)
    assert [_strip(s) for s in _steps(full)] == [_strip(s) for s in _steps(out)]


# ---- Flan-T5 (tiny fixture) ------------------------------------------------------------------------------
def _glue_base(hub_root):
    return [
        "task_seq=glue8",
        f"backbone.local_dir={hub_root}",
        f"task_seq.local_dir={hub_root}",
        "backbone.batch_size=8",
        "backbone.num_workers=0",
    ]


def test_t5_end_to_end_and_experts_act_in_generate(hub_root, tmp_path, make_cfg, monkeypatch):
    from otmf_exp.runner import run_experiment

    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "c"))
    cfg = make_cfg(*_glue_base(hub_root), "task_order=[cola,stsb]", "method=mingle", "method.max_steps=2")
    m = run_experiment(cfg, tmp_path / "run")
    steps = _steps(tmp_path / "run")
    assert len(m["acc_matrix"]) == 2 and m["state_growth"] == "per_task"
    opts = steps[0]["mingle_options"]
    assert (opts["lr"], opts["batch_size"], opts["seed_sampling"], opts["subspace"]) == (
        1e-3,
        8,
        "total",
        "keep_first",
    )
    assert steps[0]["mingle_seed_samples"] == 10  # the fixture's cola test split holds 10 (< 100)
    # sites: wi_0/wi_1 and q,k,v,o of every SelfAttention / EncDecAttention; wo and lm_head stay θ₀
    bb = build_backbone(t5_cfg(hub_root), torch.device("cpu"), progress=False)
    mcfg = method_config(make_cfg(*_glue_base(hub_root), "method=mingle", "method.max_steps=2"))
    method = METHODS["mingle"](
        mcfg, MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False)
    )
    names = [s.name for s in method.sites()]
    assert len(names) == 2 * (4 + 2) + 2 * (4 + 4 + 2)  # 2 encoder + 2 decoder blocks
    assert not any(n.endswith(("wo", "lm_head")) for n in names)
    pre = bb.pretrained_state()
    state = method.init(pre)
    datas = {}
    for i, task in enumerate(["cola", "stsb"]):
        datas[task] = build_task_data(task, seq_cfg("glue8", "glue", hub_root), bb)
        state = method.step(state, TaskInput(task, i, bb.load_finetuned(task), None, datas[task]), pre)
    u = state.extra[f"{names[0]}/U"]
    assert u.shape[1] == 3  # keep_first: the first task's 3 directions only
    batch = next(iter(datas["cola"].loader("test", 4)))
    x = bb.to_device(batch["inputs"])
    with torch.no_grad():
        plain = bb.seq2seq_logits(pre, x, bb.generate_ids(pre, x, 4))
        with method.forward_context(state):
            gated = bb.seq2seq_logits(pre, x, bb.generate_ids(pre, x, 4))
    assert plain.shape[:2] == gated.shape[:2] and not torch.allclose(
        plain, gated
    )  # hooks act inside generate


# ---- open_clip and HF CLIP (tiny fixtures) -----------------------------------------------------------------
def test_open_clip_sites_and_run(hub_root, tmp_path, make_cfg, monkeypatch):
    from otmf_exp.runner import run_experiment

    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "c"))
    oc = build_backbone(openclip_cfg(hub_root), torch.device("cpu"), progress=False)
    mcfg = method_config(make_cfg("method=mingle", "method.static_gate=1.0"))
    method = METHODS["mingle"](
        mcfg, MethodContext(oc, torch.device("cpu"), torch.Generator(), progress=False)
    )
    names = {s.name.split("resblocks.0.")[-1] for s in method.sites() if "resblocks.0." in s.name}
    assert names == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"}
    pre = oc.pretrained_state()
    data = build_task_data("mnist", seq_cfg("vit8", "hf_vision", hub_root), oc)
    ft = oc.load_finetuned("mnist")
    state = method.step(method.init(pre), TaskInput("mnist", 0, ft, oc.zero_shot_head(data), data), pre)
    # gate 1, experts at full rank (r = 64 ≥ width): θ₀ + Δ on exactly the selected weights
    sel = {s.param for s in method.sites()}
    want = {k: ft[k] if k in sel else pre[k] for k in pre}
    x = torch.randn(2, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE)
    with torch.no_grad():
        with method.forward_context(state):
            got = oc.features(pre, x)
        assert torch.allclose(got, oc.features(want, x), atol=1e-4)
    cfg = make_cfg(
        *openclip_overrides(hub_root),
        "method=mingle",
        "method.max_steps=2",
        "backbone.batch_size=8",
    )
    m = run_experiment(cfg, tmp_path / "run")
    assert len(m["acc_matrix"]) == 2 and m["state_mb"] > 0


def test_hf_clip_run(hub_root, tmp_path, make_cfg, monkeypatch):
    from otmf_exp.runner import run_experiment

    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "c"))
    cfg = make_cfg(
        "task_seq=vit14",
        f"backbone.local_dir={hub_root}",
        f"task_seq.local_dir={hub_root}",
        "task_order=[mnist,pcam]",
        "backbone.batch_size=8",
        "backbone.num_workers=0",
        "method=mingle",
        "method.max_steps=2",
        "method.lora_layer=[q_proj,k_proj,v_proj,fc1]",
    )
    m = run_experiment(cfg, tmp_path / "run")
    steps = _steps(tmp_path / "run")
    assert len(m["acc_matrix"]) == 2 and steps[0]["mingle_options"]["lora_layer"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "fc1",
    ]
