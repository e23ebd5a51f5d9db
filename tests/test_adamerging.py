"""AdaMerging: entropy and the differentiable merge in closed form; adaptation on digits8."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from otmf_exp.config import validate_method
from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.adamerging.adamerging import AdaMerging, AdaMergingConfig
from otmf_exp.merging.adaptation import combine, entropy, init_coefficients, subsample
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.task_vectors import apply, task_vector

T = torch.tensor
ORDER = ["rot90", "rot180", "flip"]


def test_entropy_closed_form():
    assert float(entropy(torch.zeros(4, 10))) == pytest.approx(math.log(10))
    assert float(entropy(T([[100.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert float(entropy(p.log()[None])) == pytest.approx(-(p * p.log()).sum().item())


def test_combine_task_and_layer_wise():
    pre = {"a": T([1.0, 1.0]), "b": T([0.0])}
    tvs = [{"a": T([1.0, 0.0]), "b": T([2.0])}, {"a": T([0.0, 4.0]), "b": T([-1.0])}]
    task = init_coefficients(2, 2, "task", [0.5, 0.25])
    out = combine(pre, tvs, task)
    assert torch.allclose(out["a"], T([1.5, 2.0])) and torch.allclose(out["b"], T([0.75]))
    layer = init_coefficients(2, 2, "layer", [0.3, 0.3])
    assert layer.shape == (2, 2) and layer.requires_grad
    with torch.no_grad():
        layer.copy_(T([[1.0, 0.0], [0.0, 1.0]]))  # row = task vector, column = tensor ("a", "b")
    out = combine(pre, tvs, layer)
    assert torch.allclose(out["a"], T([2.0, 1.0])) and torch.allclose(out["b"], T([-1.0]))
    out["a"].sum().backward()  # differentiable in the coefficients
    assert torch.allclose(layer.grad, T([[1.0, 0.0], [4.0, 0.0]]))


def test_subsample_keeps_ends_and_caps_length():
    curve = [float(i) for i in range(1000)]
    s = subsample(curve)
    assert len(s) == 100 and s[0] == 0.0 and s[-1] == 999.0
    assert subsample([1.0, 2.0]) == [1.0, 2.0]


@pytest.fixture(scope="module")
def digits(zoo):
    from otmf_exp.data.digits import build_task
    from otmf_exp.models.tiny import TinyBackbone

    bb = TinyBackbone(zoo)
    pre = bb.pretrained_state()
    tasks = []
    for i, name in enumerate(ORDER):
        data = build_task(name)
        tasks.append(TaskInput(name, i, bb.load_finetuned(name), bb.zero_shot_head(data), data))
    return bb, pre, tasks


def _method(bb, rec, **kw):
    cfg = OmegaConf.merge(OmegaConf.structured(AdaMergingConfig), kw)
    validate_method(AdaMerging, cfg)
    ctx = MethodContext(
        bb,
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
        progress=False,
        record=lambda k, v: rec.__setitem__(k, v),
    )
    return AdaMerging(cfg, ctx, protocol="joint")


@torch.no_grad()
def _pool_entropy(bb, params, tasks):
    total = 0.0
    for t in tasks:
        logits = torch.cat([bb.logits(params, t.head, b["inputs"]) for b in t.data.loader("test", 256)])
        total += float(entropy(logits))
    return total / len(tasks)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_decreases_on_digits8(digits, granularity):
    bb, pre, tasks = digits
    rec = {}
    m = _method(bb, rec, steps=15, lr=0.02, granularity=granularity)
    state = m.joint(pre, tasks)
    tvs = [task_vector(t.weights, pre) for t in tasks]
    init = {k: pre[k] + 0.3 * sum(tv[k] for tv in tvs) for k in pre}  # the init: λ = 0.3 everywhere
    before, after = _pool_entropy(bb, init, tasks), _pool_entropy(bb, apply(pre, state.merged), tasks)
    assert after < before - 1e-3, (before, after)
    assert len(rec["entropy_curve"]) == 15 and all(math.isfinite(x) for x in rec["entropy_curve"])
    assert len(rec["coefficients"]["per_vector"]) == 3
    assert rec["coefficients"]["per_vector"] != pytest.approx([0.3, 0.3, 0.3], abs=1e-4)


def test_deterministic(digits):
    bb, pre, tasks = digits
    a = _method(bb, {}, steps=3, lr=0.05).joint(pre, tasks)
    b = _method(bb, {}, steps=3, lr=0.05).joint(pre, tasks)
    assert all(torch.equal(a.merged[k], b.merged[k]) for k in a.merged)


def test_clamp_keeps_coefficients_in_unit_interval(digits):
    bb, pre, tasks = digits
    free, clamped = {}, {}
    _method(bb, free, steps=8, lr=1.0, granularity="layer").joint(pre, tasks)
    _method(bb, clamped, steps=8, lr=1.0, granularity="layer", clamp=True).joint(pre, tasks)
    assert free["coefficients"]["min"] < 0.0 or free["coefficients"]["max"] > 1.0  # the test has teeth
    assert 0.0 <= clamped["coefficients"]["min"] and clamped["coefficients"]["max"] <= 1.0


def test_continual_pairwise_uses_current_and_previous_pools(digits):
    bb, pre, tasks = digits
    rec = {}
    m = _method(bb, rec, steps=2, lr=0.01)
    s1 = m.step(m.init(pre), tasks[0], pre)
    assert all(torch.equal(s1.merged[k], tasks[0].weights[k] - pre[k]) for k in pre)  # τᵐ_1 = τ_1
    assert "rot90" in s1.heads and "entropy_curve" not in rec
    seen = []

    class Spy:
        def __init__(self, data):
            self.data, self.name = data, data.name

        def batches(self, split, bs, seed):
            seen.append((self.name, split, bs))
            return self.data.batches(split, bs, seed)

    t2 = TaskInput(
        "rot180", 1, tasks[1].weights, tasks[1].head, Spy(tasks[1].data), previous_data=Spy(tasks[0].data)
    )
    s2 = m.step(s1, t2, pre)
    assert sorted(seen) == [("rot180", "test", 16), ("rot90", "test", 16)]
    assert (
        len(rec["coefficients"]["per_vector"]) == 2 and s2.step == 2 and set(s2.heads) == {"rot90", "rot180"}
    )


def test_non_finite_loss_raises(digits):
    bb, pre, tasks = digits
    bad = TaskInput("rot90", 0, tasks[0].weights, torch.full_like(tasks[0].head, float("nan")), tasks[0].data)
    with pytest.raises(NonFiniteLossError, match="iteration 0"):
        _method(bb, {}, steps=2).joint(pre, [bad])


@pytest.mark.parametrize(
    "key,value",
    [("granularity", "row"), ("steps", -1), ("batch_size", 0), ("lr", 0.0), ("adapt_split", "dev")],
)
def test_validate_rejects_bad_values(key, value):
    cfg = OmegaConf.structured(AdaMergingConfig)
    cfg[key] = value
    with pytest.raises(UserError, match=key):
        validate_method(AdaMerging, cfg)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_per_task_backward_equals_summed_backward(digits, granularity):
    """The memory-lean default (one pool's activations at a time) gives FusionBench's gradient."""
    bb, pre, tasks = digits
    tvs = [task_vector(t.weights, pre) for t in tasks]
    grads, losses = {}, {}
    for mode in ("per_task", "summed"):
        m = _method(bb, {}, batch_size=8, granularity=granularity, backward=mode)
        coef = init_coefficients(len(tvs), len(pre), granularity, [0.3, 0.5, 0.7])
        streams = [t.data.batches("test", 8, 11 + j) for j, t in enumerate(tasks)]
        losses[mode] = m._backward(combine(pre, tvs, coef), [t.head for t in tasks], streams, "test", 0)
        grads[mode] = coef.grad.clone()
    assert losses["per_task"] == pytest.approx(losses["summed"], rel=1e-5)
    assert grads["summed"].abs().max() > 0
    assert torch.allclose(grads["per_task"], grads["summed"], rtol=1e-4, atol=1e-7)


def test_backward_mode_is_validated():
    cfg = OmegaConf.merge(OmegaConf.structured(AdaMergingConfig), {"backward": "sometimes"})
    with pytest.raises(UserError, match="method.backward"):
        validate_method(AdaMerging, cfg)
