"""OTMF as the authors run it: best-mask selection on a constructed loss sequence, the head schedule,
the head budget and bias, the diagnostics (mask quantiles, transport-plan matching), and that the
run's ``seed`` reaches every random stream (OTMF and AdaMerging) while resume stays exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _timing import untimed, untimed_steps
from omegaconf import OmegaConf
from safetensors.torch import load_file

from otmf_exp.data.base import TensorTaskData
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.otmf.head_tuning import FeatureStream, train_head
from otmf_exp.merging.otmf.ot_diagnostics import exact_quantiles, own_match, transport_plan
from otmf_exp.merging.otmf.ot_fusion import FusionStep
from otmf_exp.merging.otmf.ot_masks import BackwardAdam, Masks, adam, layer_key
from otmf_exp.merging.otmf.otmf import OTMF, OTMFConfig
from otmf_exp.models.base import head_logits
from otmf_exp.runtime import checkpoint

LR = 0.1


class _Scripted(FusionStep):
    """A fusion step whose loss at iteration i is ``LOSSES[i]`` plus a small term in the trained
    mask(s): Adam then moves every trained entry by -lr per step, so a mask's value tells how many
    steps it has taken (1 - k·lr)."""

    losses: list[float] = []

    def _iteration(self, i, pre_it, post_it, track):
        side = "joint" if self.joint else ("pre" if i % 2 == 0 else "post")
        masks = {"pre": [self.m_pre], "post": [self.m_post], "joint": [self.m_pre, self.m_post]}[side]
        loss = self.losses[i] + 1e-3 * sum(v.sum() for m in masks for v in m.values().values())
        if self.before_backward is None or self.before_backward(i, float(loss.detach())):  # on_write
            loss.backward()
        return side, float(loss)


def _scripted(losses, **over):
    cfg = OmegaConf.merge(OmegaConf.structured(OTMFConfig), {"iterations": len(losses), "lr": LR, **over})
    ctx = MethodContext(None, torch.device("cpu"), torch.Generator(), progress=False)
    tv = {"w": torch.ones(3)}
    task = TaskInput("b", 1, {}, None, None)
    step = _Scripted(cfg, ctx, None, tv, task, {"w": torch.zeros(3)}, t=2)
    step.losses = losses
    step.m_pre, step.m_post = Masks(tv, "identity", "element"), Masks(tv, "identity", "element")
    step.train()
    return step, float(step.m_pre.values(False)["w"][0]), float(step.m_post.values(False)["w"][0])


#: iteration:   0 pre, 1 post, 2 pre, 3 post, 4 pre, 5 post, 6 pre, 7 post
LOSSES = [5.0, 4.0, 4.5, 1.0, 3.0, 2.0, 2.5, 1.5]


@pytest.mark.parametrize("best_masks", ["copy", "replay", "on_write"])
def test_select_authors_one_best_over_both_sides_masks_after_the_step(best_masks):
    step, m_pre, m_post = _scripted(LOSSES, best_masks=best_masks)
    # lowest loss at iteration 3 (post): both masks as they are *after* that step: M_pre took the
    # steps of iterations 0 and 2, M_post those of 1 and 3 (a per-side best saved before the step
    # would give M_pre after 0, 2, 4 = 0.7 and M_post after 1 = 0.9)
    assert step.selected[0] == 3 and step.selected[1] == pytest.approx(1.0, abs=0.01)
    assert m_pre == pytest.approx(1 - 2 * LR, abs=1e-4) and m_post == pytest.approx(1 - 2 * LR, abs=1e-4)


def test_select_authors_keeps_an_untouched_mask_when_the_first_iteration_wins():
    step, m_pre, m_post = _scripted([0.5, 4.0, 3.0, 2.0])
    assert step.selected[0] == 0
    assert m_pre == pytest.approx(1 - LR, abs=1e-4) and m_post == 1.0  # the authors' rule, exactly


def test_select_authors_joint_uses_the_summed_loss_and_last_uses_the_final_masks():
    step, m_pre, m_post = _scripted([3.0, 1.0, 2.0], schedule="joint")
    assert step.selected[0] == 1 and m_pre == m_post == pytest.approx(1 - 2 * LR, abs=1e-4)
    step, m_pre, m_post = _scripted(LOSSES, select="last")
    assert step.selected[0] == 7 and step.selected[1] == pytest.approx(1.5, abs=0.01)
    assert m_pre == m_post == pytest.approx(1 - 4 * LR, abs=1e-4)
    step, m_pre, m_post = _scripted([])
    assert step.selected is None and m_pre == m_post == 1.0


def test_exact_quantiles_match_torch_and_have_no_size_limit():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(7, 5, generator=g), torch.ones(40), torch.randn(3, generator=g).double()]
    flat = torch.cat([t.reshape(-1).float() for t in ts])
    q = torch.tensor([0.01, 0.5, 0.99])
    assert exact_quantiles(ts) == pytest.approx(torch.quantile(flat, q).tolist(), abs=1e-6)
    assert exact_quantiles([torch.tensor(2.0), torch.tensor(4.0)], (0.0, 0.5, 1.0)) == [2.0, 3.0, 4.0]
    assert exact_quantiles([torch.full((10,), -2.5)]) == [-2.5] * 3  # all tied, negative
    signed = [torch.tensor([-0.0, 0.0, -0.25, 0.25, -3.0, 7.0])]
    assert exact_quantiles(signed, (0.0, 0.2, 0.5, 1.0)) == [-3.0, -0.25, 0.0, 7.0]
    big = [
        torch.rand(1 << 23, generator=g),
        torch.rand((1 << 23) + 7, generator=g),
    ]  # > torch.quantile's 2^24
    ref = np.quantile(torch.cat(big).numpy().astype(np.float64), [0.01, 0.5, 0.99])
    assert exact_quantiles(big) == pytest.approx(ref.tolist(), abs=1e-6)


def test_transport_plan_marginals_and_own_match():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    plan = transport_plan(x, x + 0.01, p=2, blur=0.05, scaling=0.5)
    assert plan.sum(1) == pytest.approx(torch.full((16,), 1 / 16), rel=0.02)
    assert plan.sum(0) == pytest.approx(torch.full((16,), 1 / 16), rel=0.02)
    assert own_match(plan) == 1.0
    perm = torch.roll(torch.arange(16), 1)  # no fixed point: image i's teacher point sits at row i+1
    assert own_match(transport_plan(x, x[perm], p=2, blur=0.05, scaling=0.5)) == 0.0
    half = torch.cat([torch.arange(8).roll(1), torch.arange(8, 16)])  # 8 moved, 8 fixed
    assert own_match(transport_plan(x, x[half], p=1, blur=0.05, scaling=0.5)) == 0.5


def test_head_logits_bias_column():
    f, w = torch.randn(4, 3), torch.randn(5, 3)
    b = torch.randn(5)
    base = torch.nn.functional.normalize(f, dim=-1) @ w.T
    torch.testing.assert_close(head_logits(f, w), base)
    torch.testing.assert_close(head_logits(f, torch.cat([w, b[:, None]], 1)), base + b)


def _stream(n=40, classes=4, seed=0):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(n)  # the features name their example
    y = torch.arange(n) % classes
    data = TensorTaskData("toy", {"train": (x, y)}, [str(c) for c in range(classes)])

    class Backbone:
        calls = 0

        def features(self, params, inputs):
            Backbone.calls += 1
            return inputs.clone()

        def to_device(self, v):
            return v

    bb = Backbone()
    return FeatureStream(bb, {}, data, "train", 0.5, 6, seed), bb


def test_feature_stream_encodes_each_example_once_then_reshuffles():
    stream, bb = _stream()
    it = iter(stream)
    seen = [next(it) for _ in range(12)]  # 20 examples (fraction 0.5) = 4 batches of up to 6 per pass
    assert bb.calls == 4 and stream.examples == 20
    for f, y in seen:  # features and labels stay paired through the cache
        assert torch.equal(y, f[:, 0].long() % 4)
    first = torch.cat([f[:, 0] for f, _ in seen[:4]]).sort().values
    later = torch.cat([f[:, 0] for f, _ in seen[4:8]]).sort().values
    assert torch.equal(first, later)  # the same fixed subset, every pass
    assert not torch.equal(
        torch.cat([f[:, 0] for f, _ in seen[4:8]]), torch.cat([f[:, 0] for f, _ in seen[:4]])
    )
    other, _ = _stream(seed=1)
    assert not torch.equal(next(iter(other))[0], seen[0][0])  # the seed picks subset and order


def test_train_head_tunes_weight_and_bias_from_zero():
    stream, _ = _stream()
    head = torch.randn(4, 3)
    tuned, curve = train_head(head, iter(stream), steps=25, lr=0.05)
    assert tuned.shape == (4, 4) and len(curve) == 25
    assert not torch.equal(tuned[:, :3], head) and tuned[:, 3].abs().sum() > 0
    again, _ = train_head(tuned, iter(_stream()[0]), steps=0, lr=0.05)
    assert torch.equal(again, tuned)  # a [C, D+1] head continues from its own bias; 0 steps: unchanged


def test_authors_schedule_at_step_one_of_a_single_task_run_tunes_nothing(zoo):
    from otmf_exp.data import digits
    from otmf_exp.models.tiny import TinyBackbone

    bb = TinyBackbone(zoo)
    m = OTMF(OmegaConf.structured(OTMFConfig), MethodContext(bb, torch.device("cpu"), torch.Generator()))
    d = digits.build_task("rot90")
    assert m.head_targets(TaskInput("rot90", 0, {}, None, d, last=True), 1) == {}
    prev = digits.build_task("flip")
    assert set(m.head_targets(TaskInput("rot90", 1, {}, None, d, prev), 2)) == {"flip"}
    assert set(m.head_targets(TaskInput("rot90", 1, {}, None, d, prev, last=True), 2)) == {"flip", "rot90"}


# ---- end to end: diagnostics, seeds, resume ------------------------------------------------------
ORDER = "task_order=[rot90,flip,invert]"
FAST = {
    "otmf": ["method.iterations=6", "method.head_tuning.steps=5", "method.eval_batches=2"],
    "adamerging": ["method.steps=3"],
}
_untimed, _steps = untimed, untimed_steps


def test_diagnostics_per_step(run_cfg):
    _, out = run_cfg("method=otmf", ORDER, *FAST["otmf"])
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert "mask_quantiles" not in steps[0]  # step 1 has no fusion
    for s in steps[1:]:
        for side in ("pre", "post"):
            q = s["mask_quantiles"][side]
            assert q["q01"] <= q["q50"] <= q["q99"]
            for key in ("ot_match_init", "ot_match_final"):
                assert 0.0 <= s[key][side] <= 1.0
        assert 0 <= s["select_iteration"] < 6
        curve = s["ot_loss_pre"] + s["ot_loss_post"]
        assert s["select_loss"] == min(curve)  # authors: the lowest loss over both sides
    assert set(steps[1]["head_tuning_examples"]) == {"rot90"}  # authors: the previous task's head
    assert set(steps[2]["head_tuning_examples"]) == {"flip", "invert"}  # ... and at the last step, this one's


@pytest.mark.parametrize("method", ["otmf", "adamerging"])
def test_seed_reaches_every_stream_and_repeats_exactly(run_cfg, method):
    args = (f"method={method}", "task_order=[rot90,flip]", "save_merged=true", *FAST[method])
    a, out = run_cfg(*args, "seed=0")
    steps_a, merged_a = _steps(out), load_file(str(out / "merged.safetensors"))
    b, out = run_cfg(*args, "seed=0")
    assert _untimed(a) == _untimed(b) and _steps(out) == steps_a
    c, out = run_cfg(*args, "seed=1")
    merged_c = load_file(str(out / "merged.safetensors"))
    assert any(not torch.equal(merged_a[k], merged_c[k]) for k in merged_a), "seed=1 merged the same weights"


class _Interrupted(Exception):
    pass


def test_killed_after_a_tuned_head_then_resumed_equals_uninterrupted(run_cfg, monkeypatch):
    args = ("method=otmf", ORDER, *FAST["otmf"])
    full, out = run_cfg(*args)
    full_steps = _steps(out)
    (out / "metrics.json").unlink()
    real_save = checkpoint.save
    saved = {}

    def save_then_die(out_dir, step, tensors, *a, **k):  # dies after step 2: rot90's head is tuned
        real_save(out_dir, step, tensors, *a, **k)
        if step == 2:
            saved.update(tensors)
            raise _Interrupted

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(_Interrupted):
        run_cfg(*args)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert saved["heads/rot90"].shape[1] == saved["heads/flip"].shape[1] + 1  # weight + bias vs zero-shot
    resumed, out = run_cfg(*args, "resume=true")
    assert _untimed(resumed) == _untimed(full)
    assert _steps(out) == full_steps


def test_two_task_preset_lands_beside_the_published_numbers(make_cfg, tmp_path):
    """paper/two_task with the authors' head settings; a run of it is matched with 68.8 / 66.5."""
    from omegaconf import OmegaConf

    from otmf_exp.config import method_config
    from otmf_exp.reporting import tables
    from otmf_exp.reporting.runs import load_runs

    cfg = make_cfg("experiment=paper/two_task")
    assert list(cfg.task_seq.tasks) == ["sun397", "stanford-cars"] and cfg.alpha == 0.8
    mcfg = method_config(cfg)
    assert (mcfg.head_tuning.split, mcfg.head_tuning.fraction) == ("test", 1.0)
    assert (mcfg.select, mcfg.head_tuning.which, mcfg.head_tuning.steps) == ("authors", "authors", 100)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    per_task = {"sun397": 70.0, "stanford-cars": 60.0}
    metrics = {
        "method": "otmf",
        "task_seq": cfg.task_seq.name,
        "backbone": cfg.backbone.name,
        "protocol": "continual",
        "seed": 0,
        "order": list(per_task),
        "method_config": OmegaConf.to_container(mcfg),
        "acc": 65.0,
        "bwt": 0.0,
        "per_task": per_task,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    row = tables.aggregate(load_runs([str(tmp_path)]), tables.load_reference()).iloc[0]
    assert row["per_task.sun397_ref"] == 68.8 and row["per_task.stanford-cars_ref"] == 66.5


@pytest.mark.parametrize("mode", ["replay", "on_write"])
def test_best_masks_replay_and_on_write_equal_copy_bitwise(run_cfg, mode):
    """best_masks=replay re-derives the authors' best masks by re-running the seeded optimisation;
    on_write copies a side only when a non-improving step is about to change it (and skips the last
    step when it does not improve): the merged weights and every metric equal those of
    best_masks=copy, bit for bit."""
    args = ("task_order=[rot90,flip,invert]", "method.iterations=12", "save_merged=true")
    a, out = run_cfg(*args, "method.best_masks=copy")
    wa = load_file(str(out / "merged.safetensors"))
    steps_a = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    b, out = run_cfg(*args, f"method.best_masks={mode}")
    wb = load_file(str(out / "merged.safetensors"))
    steps_b = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["acc_matrix"] == b["acc_matrix"]
    for sa, sb in zip(steps_a[1:], steps_b[1:]):
        assert sa["select_iteration"] == sb["select_iteration"] and sa["ot_loss_pre"] == sb["ot_loss_pre"]
        assert sa["select_replayed_iterations"] == 0
        replay_needed = sb["select_iteration"] < 11
        replays = {sb["select_iteration"] + 1 if replay_needed else 0}
        if mode == "on_write":  # replays only when a second side's copy would have been needed
            replays.add(0)
        assert sb["select_replayed_iterations"] in replays


@pytest.mark.parametrize("schedule", ["alternate", "joint"])
def test_backward_chunk_gives_the_same_masks_up_to_float_noise(run_cfg, schedule):
    """method.backward_chunk backpropagates a few inputs at a time (fewer activations alive): the
    same gradient up to float summation order, so the merged weights agree to float noise."""
    args = (
        "task_order=[rot90,flip,invert]",
        "method.iterations=8",
        "save_merged=true",
        f"method.schedule={schedule}",
    )
    a, out = run_cfg(*args)
    wa = load_file(str(out / "merged.safetensors"))
    b, out = run_cfg(*args, "method.backward_chunk=4")
    wb = load_file(str(out / "merged.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert a["acc"] == pytest.approx(b["acc"], abs=0.5)


def test_backward_adam_steps_each_layer_inside_the_backward_and_equals_adam_after_it():
    """BackwardAdam: one Adam per (side, layer), stepped as soon as the layer's mask gradients are
    complete (freed at once: no two layers' gradients alive together); a mask without a gradient
    (an unused layer) is flushed after the backward. Masks equal Adam after the backward, bitwise."""
    assert layer_key("vision_model.encoder.layers.3.mlp.fc1.weight") == "vision_model.encoder.layers.3"
    assert layer_key("visual_projection.weight") == "visual_projection.weight"
    g = torch.Generator().manual_seed(0)
    names = [f"layers.{i}.{w}" for i in range(3) for w in ("weight", "bias")] + [
        "proj.weight",
        "unused.weight",
    ]
    ws = {n: torch.randn(4, 4, generator=g) for n in names}
    x = torch.randn(5, 4, generator=g)

    def loss_of(masks):
        h = x
        for i in range(3):
            h = torch.tanh(
                h @ (masks[f"layers.{i}.weight"] * ws[f"layers.{i}.weight"]) + masks[f"layers.{i}.bias"][0]
            )
        return (h @ (masks["proj.weight"] * ws["proj.weight"])).square().mean()

    def fresh():
        return {n: torch.ones(4, 4, requires_grad=True) for n in names}

    plain, inside = fresh(), fresh()
    opt = adam(list(plain.values()), 0.1)
    alive: list[int] = []  # mask gradients alive whenever a layer's step runs
    with BackwardAdam({"pre": inside}, 0.1) as ba:
        for opt_i in ba.opts:
            opt_i.register_step_pre_hook(
                lambda *a: alive.append(sum(m.grad is not None for m in inside.values()))
            )
        for _ in range(4):
            loss_of(plain).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_of(inside).backward()
            assert all(m.grad is None for n, m in inside.items() if n != "unused.weight")
            ba.flush()
    assert len(ba.groups) == 5  # layers.0-2, proj, unused
    assert alive and max(alive) <= 2  # a layer's weight and bias at most
    assert all(torch.equal(plain[n], inside[n]) for n in names)
    assert not torch.equal(inside["layers.0.weight"], torch.ones(4, 4))  # the masks did move
    assert torch.equal(inside["unused.weight"], torch.ones(4, 4))
