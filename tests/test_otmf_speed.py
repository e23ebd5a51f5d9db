"""OTMF's speed levers keep the results: checkpoint_blocks=auto (decided from the measured activation
size of one layer against the memory budget), the diagnostics read off the training iterations, and
the run-level matmul_precision (applied once before any model work, recorded, part of the resume hash)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from otmf_exp.errors import UserError

ARGS = ("task_order=[rot90,flip]", "method.iterations=4", "method.head_tuning.steps=2", "save_merged=true")


def _steps(out) -> list[dict]:
    return [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]


def test_checkpoint_auto_follows_the_budget_and_changes_no_bit(run_cfg, monkeypatch):
    import torch.utils.checkpoint as ckpt

    calls: list[int] = []  # checkpointed layer forwards (each re-run in the backward)
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs, n_calls = {}, {}
    for name, over in {
        "forced": ("method.checkpoint_blocks=true",),
        "tight": ("method.memory_budget_mb=1",),  # below what the process already uses: checkpoint
        "roomy": (),  # the default budget (available RAM minus a margin): the tiny step fits
    }.items():
        calls.clear()
        metrics, out = run_cfg(*ARGS, *over)
        runs[name] = (metrics, load_file(str(out / "merged.safetensors")), _steps(out)[1])
        n_calls[name] = len(calls)
    # decided right after iteration 0's first layer: a step that fits re-runs no layer at all; a
    # tight one checkpoints every layer but that probed one
    assert n_calls["roomy"] == 0 and 0 < n_calls["tight"] < n_calls["forced"]
    assert runs["forced"][2]["checkpoint_blocks"] is True and "checkpoint_need_mb" not in runs["forced"][2]
    assert runs["tight"][2]["checkpoint_blocks"] is True and runs["roomy"][2]["checkpoint_blocks"] is False
    # the probed layer's activations x layers (+ Adam to come): measured, the same in both runs
    assert runs["tight"][2]["checkpoint_need_mb"] == runs["roomy"][2]["checkpoint_need_mb"] > 0
    m0, w0, s0 = runs["forced"]
    for m, w, s in (runs["tight"], runs["roomy"]):
        assert all(torch.equal(w0[k], w[k]) for k in w0)
        assert m["acc_matrix"] == m0["acc_matrix"] and s["ot_loss_pre"] == s0["ot_loss_pre"]


def test_default_diagnostics_are_read_off_the_training_iterations(run_cfg, monkeypatch):
    """eval_batches=null: no student forward beyond training (and replay); init = each side's first
    iteration, final = its lowest-loss one; eval_batches=k runs 2·2·k more forwards."""
    from otmf_exp.merging.otmf.ot_fusion import FusionStep

    calls = []
    real = FusionStep.student
    monkeypatch.setattr(FusionStep, "student", lambda self, x, train: calls.append(1) or real(self, x, train))
    _, out = run_cfg(*ARGS)
    s = _steps(out)[1]
    assert len(calls) == 4 + s["select_replayed_iterations"]
    for side in ("pre", "post"):
        curve = s[f"ot_loss_{side}"]
        assert s["ot_eval_init"][side] == curve[0] and s["ot_eval_final"][side] == min(curve)
        assert 0.0 <= s["ot_match_init"][side] <= 1.0 and 0.0 <= s["ot_match_final"][side] <= 1.0
    calls.clear()
    _, out = run_cfg(*ARGS, "method.eval_batches=1")
    s_full = _steps(out)[1]
    assert len(calls) == 4 + s_full["select_replayed_iterations"] + 2 * 2 * 1
    assert (
        s_full["ot_loss_pre"] == s["ot_loss_pre"]
        and s_full["ot_eval_init"]["pre"] == s["ot_eval_init"]["pre"]
    )


def test_matmul_precision_set_once_before_the_model_recorded_and_hashed(run_cfg, monkeypatch):
    import otmf_exp.runner as runner

    order = []
    real_set, real_build = torch.set_float32_matmul_precision, runner.build_backbone
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: order.append(p) or real_set(p))
    monkeypatch.setattr(
        runner, "build_backbone", lambda *a, **k: order.append("model") or real_build(*a, **k)
    )
    try:
        metrics, out = run_cfg("task_order=[rot90]", "method=task_arithmetic", "matmul_precision=medium")
        assert order == ["medium", "model"] and metrics["matmul_precision"] == "medium"
        assert torch.get_float32_matmul_precision() == "medium"
        (out / "metrics.json").unlink()
        with pytest.raises(UserError, match="matmul_precision"):
            run_cfg("task_order=[rot90]", "method=task_arithmetic", "matmul_precision=high", "resume=true")
    finally:
        real_set("highest")
    metrics, _ = run_cfg("task_order=[rot90]", "method=task_arithmetic")
    assert metrics["matmul_precision"] == "highest" and torch.get_float32_matmul_precision() == "highest"


def test_presets_aimed_at_the_authors_numbers_use_their_matmul_precision(make_cfg):
    from pathlib import Path

    import otmf_exp.conf

    paper = Path(otmf_exp.conf.__file__).parent / "experiment" / "paper"
    authors = ["two_task", *sorted(p.stem for p in paper.glob("ablation_*.yaml"))]
    assert len(authors) > 5
    for name in authors:
        assert make_cfg(f"experiment=paper/{name}").matmul_precision == "medium", name
    assert make_cfg("experiment=paper/continual_vision").matmul_precision == "highest"
    assert make_cfg().matmul_precision == "highest"


def test_on_write_holds_one_side_at_most_then_falls_back_to_replay():
    from otmf_exp.merging.otmf.ot_masks import BestOnWrite, Masks

    sides = {s: Masks({"w": torch.ones(3)}, "identity", "element") for s in ("pre", "post")}
    cow = BestOnWrite(sides, last=5, skip_last=True)
    assert cow.before_step(0, 5.0, ("pre",)) and not any(m.has_best for m in sides.values())
    assert cow.before_step(1, 6.0, ("post",)) and sides["post"].has_best  # copied before its step
    assert cow.before_step(2, 4.0, ("pre",)) and not sides["post"].has_best  # improved: dropped
    assert cow.before_step(3, 7.0, ("post",)) and sides["post"].has_best
    assert cow.before_step(4, 7.0, ("pre",)) and cow.replay  # a second side would be needed: replay
    assert not any(m.has_best for m in sides.values())
    assert not cow.before_step(5, 9.0, ("post",))  # the last, not improving: its step is skipped


def test_sampled_mask_quantiles_are_the_exact_quantiles_of_a_fixed_stride():
    from otmf_exp.merging.otmf.ot_diagnostics import QUANTILES, exact_quantiles, mask_stats

    g = torch.Generator().manual_seed(0)
    masks = {"pre": {"a": torch.randn(50, 40, generator=g), "b": torch.randn(7, generator=g)}}
    flat = torch.cat([v.reshape(-1) for v in masks["pre"].values()])
    mean, exact = mask_stats(masks, 1)
    assert mean == pytest.approx(float(flat.double().mean()))
    assert list(exact["pre"].values()) == exact_quantiles([flat], QUANTILES)
    _, sampled = mask_stats(masks, 16)
    assert list(sampled["pre"].values()) == exact_quantiles([flat[::16]], QUANTILES)


def test_bench_authors_part_min_over_rounds_and_target_rows():
    from otmf_exp.benchmark.markdown import render
    from otmf_exp.benchmark.report import summarise

    rounds = [
        {
            "otmf": {"wall_s": 10.0, "peak_mb": 100.0, "start_mb": 40.0},
            "otmf (offload=false)": {"wall_s": 9.0, "peak_mb": 160.0, "start_mb": 40.0},
            "authors": {"wall_s": 20.0, "peak_mb": 300.0, "start_mb": 250.0},
        },
        {
            "otmf": {"wall_s": 12.0, "peak_mb": 90.0, "start_mb": 45.0},
            "otmf (offload=false)": {"wall_s": 8.5, "peak_mb": 150.0, "start_mb": 45.0},
            "authors": {"wall_s": 16.0, "peak_mb": 310.0, "start_mb": 270.0},
        },
    ]
    res = {"authors": {"rounds": rounds, "iterations": 10}}
    t = summarise(res)["targets"]
    assert t["otmf_vs_authors_time"]["value"] == 10.0 / 16.0 and t["otmf_vs_authors_time"]["met"]
    assert (
        t["otmf_vs_authors_memory"]["value"] == 90.0 / 300.0 and t["otmf_vs_authors_memory"]["target"] == 0.5
    )
    # the step's own memory: min over rounds of peak − start (ours 45 = 90 − 45, theirs 40 = 310 − 270)
    own = t["otmf_vs_authors_own_memory"]
    assert own["value"] == 45.0 / 40.0 and own["target"] == 1.0 and not own["met"]
    # only the defaults are a target row: the resident lever is information
    assert not any(k.startswith("otmf_offload") or k.startswith("otmf_resident") for k in t)
    res["summary"] = summarise(res)
    res |= {
        "command": "python scripts/bench.py --only authors",
        "date": "today",
        "quick": True,
        "arch": "vit_b32",
        "plan": {"batch_size": 16, "iterations_step": 10, "iterations_flat": 2},
        "machine": {
            "cpu": "x",
            "cpu_cores": 2,
            "ram_gb": 1,
            "torch": "t",
            "torch_threads": 1,
            "device": "cpu",
            "platform": "p",
        },
        "model_mb": 334.0,
    }
    md = render(res)
    assert "OTMF step time / authors' step time" in md and "peak / authors' peak" in md
    assert "authors' compute_sr_mask" in md and "0.625" in md
    assert "step's own memory (peak − memory at its start) / the authors'" in md
    assert "otmf (offload=false)" in md and "own / authors'" in md


@pytest.mark.parametrize("granularity", ["element", "tensor"])
def test_copy_of_a_mask_still_at_its_initial_value_holds_no_tensor(granularity):
    """A best-mask copy taken before a side's first step is its initial value: nothing is copied, and
    load_best restores the initial bits; once stepped, the copy is a real one (and restores it)."""
    from otmf_exp.merging.otmf.ot_masks import Masks

    for param, init in (("identity", 1.0), ("sigmoid", 0.0)):
        m = Masks({"a": torch.zeros(4, 3), "b": torch.zeros(5)}, param, granularity)
        m.save_best()
        assert m.has_best and m._best == {}  # no tensor held
        with torch.no_grad():
            m.raw["a"].add_(0.5)
        m.load_best()
        assert all(torch.equal(r, torch.full_like(r, init)) for r in m.raw.values()) and not m.has_best
        with torch.no_grad():
            m.raw["b"].sub_(0.25)
        stepped = {k: r.detach().clone() for k, r in m.raw.items()}
        assert not m.at_init()
        m.save_best()
        assert set(m._best) == {"a", "b"}
        with torch.no_grad():
            m.raw["b"].mul_(3.0)
        m.load_best()
        assert all(torch.equal(m.raw[k], stepped[k]) for k in stepped)
