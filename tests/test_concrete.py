"""Concrete subspace learning: the mask's closed form, the merge rule, entropy going down, seeds."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from otmf_exp.config import validate_method
from otmf_exp.errors import UserError
from otmf_exp.merging.adaptation import entropy
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.concrete.concrete import Concrete, ConcreteConfig, rescale, sample_mask


class ToyBackbone:
    """logits = (x @ W.T + b) @ head.T: a one-layer 'tower' with two mergeable tensors."""

    modality = "vision"

    def logits(self, params, head, inputs):
        return (inputs @ params["w"].T + params["b"]) @ head.T

    def to_device(self, x):
        return x


class ToyData:
    def __init__(self, name: str, x: torch.Tensor) -> None:
        self.name, self.x = name, x

    def batches(self, split, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield {"inputs": self.x[torch.randperm(len(self.x), generator=g)[:batch_size]]}


def _toy(n_tasks: int = 3, d: int = 6, c: int = 4):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(d, d, generator=g), "b": torch.zeros(d)}
    tasks = []
    for i in range(n_tasks):
        w = {k: v + 0.8 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        head = torch.randn(c, d, generator=g)
        tasks.append((f"t{i}", w, head, ToyData(f"t{i}", torch.randn(64, d, generator=g))))
    return pre, tasks


def _run(seed: int = 0, **over):
    pre, tasks = _toy()
    cfg = ConcreteConfig(**{"max_steps": 5, "max_adamerging_steps": 5, "batch_size": 8, **over})
    validate_method(Concrete, cfg)
    rec: dict = {}
    ctx = MethodContext(
        ToyBackbone(),
        torch.device("cpu"),
        torch.Generator(),
        progress=False,
        record=rec.__setitem__,
        seed=seed,
    )
    inputs = [TaskInput(n, i, w, h, d) for i, (n, w, h, d) in enumerate(tasks)]
    state = Concrete(cfg, ctx, protocol="joint").joint(pre, inputs)
    return state, rec, ctx, pre, tasks


def test_mask_is_the_gumbel_sigmoid_of_the_logits_at_the_temperature():
    x = {"a": torch.randn(5, 7, generator=torch.Generator().manual_seed(1)), "b": torch.linspace(-3, 3, 11)}
    for t in (0.5, 2.0):
        m = sample_mask(x, t, torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)  # the same noise, drawn in key order
        for k, v in x.items():
            u = torch.rand(v.shape, generator=g)
            closed = torch.sigmoid((v + torch.log(u) - torch.log1p(-u)) / t)
            assert torch.allclose(m[k], closed, atol=1e-6), k
        # bit-identical to torch.distributions' relaxed Bernoulli (FusionBench's MaskModel.sample_mask)
        torch.manual_seed(7)
        ref = {
            k: torch.distributions.RelaxedBernoulli(logits=v, temperature=t).rsample() for k, v in x.items()
        }
        assert all(torch.equal(m[k], ref[k]) for k in x)


def test_mask_gradient_is_the_closed_form():
    x = torch.randn(50, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    t = 0.5
    m = sample_mask({"x": x}, t, torch.Generator().manual_seed(3))["x"]
    m.sum().backward()
    assert torch.allclose(x.grad, (m * (1 - m) / t).detach(), atol=1e-6)  # dσ(z/T)/dx = m(1−m)/T


def test_discrete_mask_is_a_bernoulli_draw_and_rescale_has_mean_one():
    x = {"a": torch.randn(40, generator=torch.Generator().manual_seed(4))}
    m = sample_mask(x, 0.5, torch.Generator().manual_seed(5), "discrete")
    torch.manual_seed(5)
    assert torch.equal(m["a"], torch.distributions.Bernoulli(logits=x["a"]).sample())
    r = rescale({"a": torch.tensor([0.2, 0.6]), "z": torch.zeros(3)})
    assert torch.allclose(r["a"], torch.tensor([0.5, 1.5])) and torch.equal(r["z"], torch.zeros(3))


def test_task_arithmetic_merge_is_the_rescaled_mask_times_scaled_sum():
    """With no mask step, τᵐ = (m / mean m) ⊙ λ Σ τ_i for the run's first mask draw."""
    state, _, ctx, pre, tasks = _run(max_steps=0, scaling_factor=0.4, initial_logits=0.7)
    logits = {k: torch.full_like(v, 0.7) for k, v in pre.items()}
    m = rescale(sample_mask(logits, 0.5, torch.Generator().manual_seed(ctx.seed_for("concrete", "mask"))))
    for k in pre:
        expected = m[k] * 0.4 * sum(w[k] - pre[k] for _, w, _, _ in tasks)
        assert torch.allclose(state.merged[k], expected, atol=1e-6)


def test_learned_mask_lowers_the_entropy():
    pre, tasks = _toy()
    _, rec, *_ = _run(max_steps=150, lr=0.1, scaling_factor=1.0, batch_size=64)
    curve = rec["entropy_curve"]
    first, last = sum(curve[:10]) / 10, sum(curve[-10:]) / 10
    assert last < first - 0.05, (first, last)
    assert rec["mask"]["prob_mean"] != pytest.approx(0.5, abs=1e-3)  # the logits moved
    # the final merged model's entropy is below the unmasked task arithmetic one at the same λ
    state, *_ = _run(max_steps=150, lr=0.1, scaling_factor=1.0, batch_size=64)
    x = torch.cat([d.x for *_, d in tasks])
    ta = {k: pre[k] + sum(w[k] - pre[k] for _, w, _, _ in tasks) for k in pre}
    merged = {k: pre[k] + state.merged[k] for k in pre}
    bb = ToyBackbone()
    h = [h for _, _, h, _ in tasks]
    e_ta = sum(float(entropy(bb.logits(ta, hh, x))) for hh in h)
    e_mask = sum(float(entropy(bb.logits(merged, hh, x))) for hh in h)
    assert e_mask < e_ta, (e_mask, e_ta)


@pytest.mark.parametrize(
    "merge,granularity", [("task_arithmetic", "task"), ("adamerging", "task"), ("adamerging", "layer")]
)
def test_seed_drives_the_noise(merge, granularity):
    a = _run(0, merge=merge, granularity=granularity)[0].merged
    b = _run(0, merge=merge, granularity=granularity)[0].merged
    c = _run(1, merge=merge, granularity=granularity)[0].merged
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_adamerging_coefficients_and_the_stale_inner_quirk():
    # zero AdaMerging steps: coefficients stay at scaling_factor -> the same model as masked TA at λ
    _, rec, *_ = _run(merge="adamerging", max_adamerging_steps=0, scaling_factor=0.3)
    assert rec["coefficients"]["min"] == pytest.approx(0.3) and rec["coefficients"]["max"] == pytest.approx(
        0.3
    )
    _, rec, *_ = _run(merge="adamerging", granularity="layer", clamp_weights=True, adamerging_lr=0.5)
    assert 0.0 <= rec["coefficients"]["min"] and rec["coefficients"]["max"] <= 1.0
    # the stale-Λ order only matters from the second meta step on
    one = [_run(merge="adamerging", max_steps=1, fusionbench_stale_inner=s)[0].merged for s in (False, True)]
    assert all(torch.equal(one[0][k], one[1][k]) for k in one[0])
    two = [_run(merge="adamerging", max_steps=3, fusionbench_stale_inner=s)[0].merged for s in (False, True)]
    assert any(not torch.equal(two[0][k], two[1][k]) for k in two[0])


@pytest.mark.parametrize(
    "over,match",
    [
        ({"merge": "ties"}, "method.merge"),
        ({"granularity": "layer"}, "needs method.merge=adamerging"),
        ({"eval_mask_type": "hard"}, "eval_mask_type"),
        ({"temperature": 0.0}, "temperature"),
        ({"max_steps": -1}, "max_steps"),
        ({"base_lr": 0.0}, "base_lr"),
    ],
)
def test_bad_options_are_one_line_user_errors(over, match):
    with pytest.raises(UserError, match=match):
        validate_method(Concrete, ConcreteConfig(**over))


def test_text_backbones_and_continual_are_refused():
    pre, tasks = _toy()
    bb = SimpleNamespace(modality="text")
    ctx = MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False)
    with pytest.raises(UserError, match="supports vision backbones, not"):  # when the method is built
        Concrete(ConcreteConfig(), ctx, "joint")
    assert Concrete.protocols == ("joint",)
    assert math.isclose(ConcreteConfig().temperature, 0.5)


# ---- dtype: float32 unchanged, float64 learned in float64 ---------------------------------------------
def _entropy_main(logits, eps=0.0):
    """The entropy as it was while it always cast to float32 (``logits.float()``)."""
    if eps == 0.0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()
    p = torch.softmax(logits.float(), dim=-1)
    return -(p * torch.log(p + eps)).sum(-1).mean()


def _seen_run(dtype=torch.float32, **over):
    """``_run`` on the toy in ``dtype``, keeping the logits and coefficients the method learned."""
    pre, tasks = _toy()
    pre = {k: v.to(dtype) for k, v in pre.items()}
    cfg = ConcreteConfig(**{"max_steps": 5, "max_adamerging_steps": 5, "batch_size": 8, **over})
    ctx = MethodContext(ToyBackbone(), torch.device("cpu"), torch.Generator(), progress=False, seed=0)
    m = Concrete(cfg, ctx, protocol="joint")
    seen, final_mask, adamerging = {}, m._final_mask, m._adamerging
    m._final_mask = lambda logits, gen: seen.setdefault("logits", dict(logits)) and final_mask(logits, gen)
    m._adamerging = lambda *a, **k: seen.setdefault("coef", adamerging(*a, **k))
    inputs = []
    for i, (n, w, h, d) in enumerate(tasks):
        data = ToyData(n, d.x.to(dtype))
        inputs.append(TaskInput(n, i, {k: v.to(dtype) for k, v in w.items()}, h.to(dtype), data))
    return m.joint(pre, inputs).merged, seen


@pytest.mark.parametrize(
    "over", [{}, {"merge": "adamerging"}, {"merge": "adamerging", "granularity": "layer"}]
)
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_float32_runs_are_bit_identical_to_the_hard_coded_float32(over, eps, monkeypatch):
    import otmf_exp.merging.concrete.concrete as cc

    now, seen = _seen_run(entropy_eps=eps, **over)
    assert all(v.dtype == torch.float32 for v in seen["logits"].values())
    monkeypatch.setattr(cc, "work_dtype", lambda dtype: torch.float32)  # main's hard-coded float32
    monkeypatch.setattr(cc, "entropy", _entropy_main)
    before, _ = _seen_run(entropy_eps=eps, **over)
    assert all(torch.equal(now[k], before[k]) for k in now)


@pytest.mark.parametrize("merge", ["task_arithmetic", "adamerging"])
def test_float64_models_learn_float64_logits_and_coefficients(merge):
    merged, seen = _seen_run(torch.float64, merge=merge)
    learned = [*seen["logits"].values(), *([seen["coef"]] if merge == "adamerging" else [])]
    assert all(v.dtype == torch.float64 for v in [*learned, *merged.values()])
    # the float64 noise is its own draw (the uniforms take twice the generator's bits), so no float32 twin
    again, _ = _seen_run(torch.float64, merge=merge)
    assert all(torch.equal(merged[k], again[k]) for k in merged)


def test_entropy_eps_is_fusionbench_formula():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 30.0]], dtype=torch.float64)
    p = torch.softmax(z, -1)
    assert float(entropy(z, 1e-8)) == pytest.approx(
        float(-(p * torch.log(p + 1e-8)).sum(-1).mean()), rel=1e-15
    )
    assert entropy(z).dtype == torch.float64 and entropy(z.float()).dtype == torch.float32
    assert entropy(z.half()).dtype == torch.float32  # half precision still learned in float32
    for x in (z.float(), z.half()):
        assert torch.equal(entropy(x), _entropy_main(x)) and torch.equal(
            entropy(x, 1e-8), _entropy_main(x, 1e-8)
        )
    with pytest.raises(UserError, match="entropy_eps"):
        validate_method(Concrete, ConcreteConfig(entropy_eps=-1.0))
