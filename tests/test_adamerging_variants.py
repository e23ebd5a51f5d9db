"""AdaMerging as the compared papers ran it: clamp inside the merge vs projection, current_only
(C. AdaMerging), the cycled streams, seed-sample pools, AdaMerging++ pruning, presets, resume."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from otmf_exp.config import validate_method
from otmf_exp.data.base import TensorTaskData
from otmf_exp.errors import UserError
from otmf_exp.merging.adamerging import adamerging as am
from otmf_exp.merging.adamerging.adamerging import AdaMerging, AdaMergingConfig, entropy_loss
from otmf_exp.merging.adamerging.adamerging_pools import SeedPool, clamp_mode, replay, ties_prune
from otmf_exp.merging.adaptation import entropy
from otmf_exp.merging.base import ContinualState, MethodContext, TaskInput
from otmf_exp.merging.sparsify import elect_signs, trim
from otmf_exp.runtime import checkpoint

T = torch.tensor


class Toy:
    """logits = (x ⊙ w) @ headᵀ: a larger λ sharpens the softmax, so entropy descent pushes λ up."""

    device = torch.device("cpu")
    batch_size = 8

    def logits(self, params, head, inputs):
        return (inputs * params["w"]) @ head.T

    def to_device(self, x):
        return x


def _toy_task(name="a", n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.arange(n) % 3
    return TensorTaskData(name, {"test": (x, y)}, ["0", "1", "2"])


def _method(bb, rec=None, protocol="continual", **kw):
    cfg = OmegaConf.merge(OmegaConf.structured(AdaMergingConfig), kw)
    validate_method(AdaMerging, cfg)
    rec = {} if rec is None else rec
    ctx = MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False, record=rec.__setitem__)
    return AdaMerging(cfg, ctx, protocol=protocol)


TOY_PRE, TOY_TV, HEAD = {"w": T([1.0, 1.0, 1.0])}, {"w": T([2.0, -1.0, 3.0])}, torch.eye(3)


def test_clamp_merge_keeps_the_raw_coefficient_free_and_merges_with_its_clamp():
    """The references' clamp: merge with clamp(λ, 0, 1), Adam moves the raw λ (past the bound on
    momentum); checked step by step against Adam on the raw value with the clamp in the forward."""
    data = _toy_task()
    rec = {}
    m = _method(Toy(), rec, steps=12, lr=0.2, init=0.8, clamp="merge", batch_size=4)
    m.trace = []
    coef = m.adapt(TOY_PRE, [TOY_TV], [HEAD], [data], [0.8], "toy", ("k",))
    raw = torch.tensor([0.8], requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.2)
    stream = data.batches("test", 4, m.ctx.seed_for("adamerging", "k", 0))
    for it in range(12):
        opt.zero_grad()
        w = TOY_PRE["w"] + raw.clamp(0, 1)[0] * TOY_TV["w"]
        entropy((next(stream)["inputs"] * w) @ HEAD.T).backward()
        opt.step()
        assert torch.allclose(m.trace[it], raw.detach().clamp(0, 1), atol=1e-7), it
    assert rec["coefficients_raw"]["max"] > 1.0 == rec["coefficients"]["max"]  # the bound binds
    assert float(coef) == 1.0 and float(raw.detach()) > 1.0
    proj = {}
    _method(Toy(), proj, steps=12, lr=0.2, init=0.8, clamp="project", batch_size=4).adapt(
        TOY_PRE, [TOY_TV], [HEAD], [data], [0.8], "toy", ("k",)
    )
    assert "coefficients_raw" not in proj and proj["coefficients"]["max"] <= 1.0


def test_clamp_accepts_the_old_booleans_and_rejects_others():
    assert clamp_mode(True) == clamp_mode("true") == "project" and clamp_mode(False) == "none"
    assert clamp_mode("merge") == "merge"
    with pytest.raises(UserError, match="method.clamp must be one of"):
        _method(Toy(), clamp="sometimes")


def test_replay_is_one_pass_cycled_without_reshuffle_and_skips():
    data = _toy_task(n=10)
    first = [b["inputs"] for b in data.loader("test", 4, shuffle=True, seed=7)]  # 3 batches: 4, 4, 2
    it = replay(data, "test", 4, seed=7)
    got = [next(it)["inputs"] for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(got, first + first + first[:1]))
    skipped = replay(data, "test", 4, seed=7, skip=4)  # 4 mod 3 = 1
    assert torch.equal(next(skipped)["inputs"], first[1])


def test_per_task_cycle_continues_the_previous_tasks_stream(monkeypatch):
    """Step t ≥ 3 draws the previous task's batches after the `steps` that step t−1 drew from it."""
    calls = []
    real = am.batch_streams

    def spy(cfg, ctx, datas, key, skips):
        calls.append(([d.name for d in datas], list(skips)))
        return real(cfg, ctx, datas, key, skips)

    monkeypatch.setattr(am, "batch_streams", spy)
    m = _method(Toy(), steps=2, stream="per_task_cycle", batch_size=4)
    tasks = [_toy_task(n, seed=i) for i, n in enumerate("abc")]
    state, prev = m.init(TOY_PRE), None
    for i, d in enumerate(tasks):
        ti = TaskInput(d.name, i, {"w": TOY_PRE["w"] + TOY_TV["w"] * (i + 1)}, HEAD, d, previous_data=prev)
        state, prev = m.step(state, ti, TOY_PRE), d
    assert calls == [(["b", "a"], [0, 0]), (["c", "b"], [0, 2])]


def test_current_only_is_theta0_plus_lambda_tau_t_alone():
    m = _method(Toy(), continual="current_only", steps=3, batch_size=4, granularity="layer")
    m.trace = []
    junk = ContinualState(1, {"w": T([100.0, 100.0, 100.0])}, heads={"a": HEAD})
    d = _toy_task("b")
    s = m.step(
        junk,
        TaskInput("b", 1, {"w": TOY_PRE["w"] + TOY_TV["w"]}, HEAD, d, previous_data=_toy_task()),
        TOY_PRE,
    )
    lam = m.trace[-1]
    assert len(m.trace) == 3 and lam.shape == (1, 1)
    assert torch.allclose(s.merged["w"], lam[0, 0] * TOY_TV["w"])  # nothing of the carried state
    assert set(s.heads) == {"a", "b"} and s.step == 2
    with pytest.raises(UserError, match="continual protocol"):
        _method(Toy(), protocol="joint", continual="current_only")


def test_ties_prune_keeps_trimmed_entries_agreeing_with_the_elected_sign():
    tvs = [{"w": T([3.0, -1.0, 0.5, -4.0])}, {"w": T([-2.0, 2.0, 0.1, -1.0])}]
    out = ties_prune(tvs, density=0.5, scope="per_tensor")
    # trim keeps |τ| >= the 2nd smallest magnitude: [3, -1, 0, -4] and [-2, 2, 0, -1]; sums [1, 1, 0, -5]
    assert torch.equal(out[0]["w"], T([3.0, 0.0, 0.0, -4.0])) and torch.equal(
        out[1]["w"], T([0.0, 2.0, 0.0, -1.0])
    )
    trimmed = [trim(tv, 0.5, "per_tensor") for tv in tvs]
    assert torch.equal(elect_signs(trimmed, "per_tensor")["w"], T([1.0, 1.0, 1.0, -1.0]))  # 0 -> majority +


def test_seed_pool_and_entropy_eps():
    d = _toy_task(n=30)
    rec = {}
    m = _method(Toy(), rec, seed_samples=2)
    pool = am.adaptation_pool(m.cfg, m.ctx, d)
    assert isinstance(pool, SeedPool) and pool.size("test") == 6 and rec["adamerging_seed_test_leakage"]
    again = am.adaptation_pool(m.cfg, m.ctx, d)
    assert all(
        torch.equal(a["inputs"], b["inputs"]) for a, b in zip(pool.loader("x", 6), again.loader("x", 6))
    )
    z = torch.randn(5, 4)
    p = z.softmax(-1)
    assert float(entropy_loss(z, 1e-8)) == pytest.approx(
        float(-(p * (p + 1e-8).log()).sum(-1).mean()), rel=1e-6
    )
    assert torch.equal(entropy_loss(z), entropy(z))


@pytest.mark.parametrize("preset", ["adamerging_otmf_task", "c_adamerging"])
def test_preset_killed_and_resumed_equals_uninterrupted(run_cfg, monkeypatch, preset):
    args = (
        f"method={preset}",
        "task_order=[rot90,flip,invert,rot180]",
        "method.steps=3",
        "eval_split=validation",
    )
    full, out = run_cfg(*args)
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    (out / "metrics.json").unlink()
    real = checkpoint.save

    class Die(Exception):
        pass

    def save_then_die(out_dir, step, *a, **k):  # dies after step 2: step 3 continues step 2's stream
        real(out_dir, step, *a, **k)
        if step == 2:
            raise Die

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Die):
        run_cfg(*args)
    monkeypatch.setattr(checkpoint, "save", real)
    resumed, out = run_cfg(*args, "resume=true")
    assert resumed["acc"] == full["acc"] and resumed["bwt"] == full["bwt"]
    again = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["acc"] for s in again] == [s["acc"] for s in steps]
    assert [s.get("coefficients") for s in again] == [s.get("coefficients") for s in steps]
