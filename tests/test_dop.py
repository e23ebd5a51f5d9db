"""DOP: truncation ranks, the dual-projection loss, MGDA's two-task weight, Adam steps against a hand
computation, the per-parameter step rule and the FusionBench options."""

from dataclasses import replace
from types import SimpleNamespace

import _hub_fixtures as fx
import pytest
import torch

from otmf_exp.config import validate_method
from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.dop.dop import (
    DOP,
    DOPConfig,
    dual_loss,
    min_norm_weights,
    optimise_linear,
    projection_basis,
)

D = torch.float64
hub_root = fx.hub_root  # the tiny open_clip fixture (tests/_hub_fixtures.py)
_private_cache = fx._private_cache


@pytest.mark.parametrize(
    "spectrum,eps,below,reach",
    [
        ([4.0, 3.0, 2.0, 1.0], 0.75, 2, 3),  # cumsum/sum = [0.4, 0.7, 0.9, 1.0]
        ([4.0, 3.0, 2.0, 1.0], 0.5, 1, 2),
        ([4.0, 3.0, 2.0, 1.0], 0.99999, 3, 4),
        ([4.0, 3.0, 2.0, 1.0], 0.0, 0, 1),
        ([5.0, 0.0, 0.0], 0.99999, 0, 1),  # rank 1: FusionBench's rule keeps nothing
        ([0.0, 0.0, 0.0], 0.99999, 3, 0),  # zero τ: FusionBench keeps all (NaN fractions), zero values
    ],
)
def test_truncation_rank_rules(spectrum, eps, below, reach):
    tv = torch.diag(torch.tensor(spectrum))
    for rule, r in (("below", below), ("reach", reach)):
        s, u, v = projection_basis(tv, eps, rule)
        assert s.numel() == r and u.shape == (len(spectrum), r) and v.shape == (len(spectrum), r)
        assert torch.allclose(s, torch.tensor(spectrum[:r]))


def test_dual_loss_and_gradient_against_the_closed_form():
    g = torch.Generator().manual_seed(0)
    tv, delta = torch.randn(5, 3, generator=g, dtype=D), torch.randn(5, 3, generator=g, dtype=D)
    s, u, v = projection_basis(tv, 0.7, "reach")
    assert 0 < s.numel() < 3
    a = u @ torch.diag(s**2) @ u.T  # L = tr(Δᵀ U S² Uᵀ Δ) + tr(Δ V S² Vᵀ Δᵀ), ∇L = 2(AΔ + ΔB)
    b = v @ torch.diag(s**2) @ v.T
    lu, lv = torch.trace(delta.T @ a @ delta), torch.trace(delta @ b @ delta.T)
    for space, want in (("uv", lu + lv), ("u", lu), ("v", lv)):
        x = delta.clone().requires_grad_(True)
        loss = dual_loss(x, s, u, v, space)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.allclose(loss, want, atol=1e-12)
        want_grad = 2 * (a @ delta) * (space != "v") + 2 * (delta @ b) * (space != "u")
        assert torch.allclose(grad, want_grad, atol=1e-12)


def test_mgda_two_task_weight_is_the_closed_form_min_norm_point():
    g = torch.Generator().manual_seed(1)
    g0, g1 = torch.randn(7, generator=g, dtype=D), torch.randn(7, generator=g, dtype=D)
    g1 = g1 - 0.5 * g0  # an interior case: <g0,g1> below both squared norms
    assert (g0 @ g1) < min(g0 @ g0, g1 @ g1)
    w0, w1 = min_norm_weights(g0, g1)
    closed = float((g1 - g0) @ g1 / ((g0 - g1) @ (g0 - g1)))
    assert w0 == pytest.approx(closed, abs=1e-12) and w1 == pytest.approx(1 - closed, abs=1e-12)
    grid = torch.linspace(0, 1, 100001, dtype=D)
    norms = ((grid[:, None] * g0 + (1 - grid[:, None]) * g1) ** 2).sum(1)
    assert abs(float(grid[norms.argmin()]) - w0) < 1e-4  # it is the minimiser on the segment
    # the ends, clipped as MGDA's solver does: g0 inside the ball of g1's projection -> 0.999
    assert min_norm_weights(0.5 * g0, g0) == (0.999, 1 - 0.999)
    assert min_norm_weights(g0, 0.5 * g0) == (0.001, 1 - 0.001)


def _hand_dop(w0, anchors, cfg):
    """An independent DOP: analytic gradients 2(AΔ + ΔB), Adam's update written out."""
    mats = []
    for a in anchors:
        s, u, v = projection_basis(a - w0, cfg.svd_epsilon, cfg.svd_rank)
        mats.append((u @ torch.diag(s**2) @ u.T, v @ torch.diag(s**2) @ v.T))
    w = (anchors[0] + anchors[1]) / 2
    m, vel = torch.zeros_like(w), torch.zeros_like(w)
    ema = [cfg.alpha, 1 - cfg.alpha]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, cfg.steps + 1):
        deltas = [w - a for a in anchors]
        losses = [
            float(torch.trace(d.T @ a @ d) + torch.trace(d @ b @ d.T)) for d, (a, b) in zip(deltas, mats)
        ]
        grads = [2 * (a @ d + d @ b) for d, (a, b) in zip(deltas, mats)]
        if cfg.mgda:
            n0, n1 = grads[0] / losses[0], grads[1] / losses[1]
            v11, v12, v22 = float((n0 * n0).sum()), float((n0 * n1).sum()), float((n1 * n1).sum())
            gamma = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else (v22 - v12) / (v11 + v22 - 2 * v12)
            ema = [
                cfg.ema_beta * ema[0] + (1 - cfg.ema_beta) * gamma,
                cfg.ema_beta * ema[1] + (1 - cfg.ema_beta) * (1 - gamma),
            ]
            weights = ema
        else:
            weights = [cfg.alpha, 1 - cfg.alpha]
        grad = weights[0] * grads[0] + weights[1] * grads[1]
        m = b1 * m + (1 - b1) * grad
        vel = b2 * vel + (1 - b2) * grad**2
        w = w - cfg.lr * (m / (1 - b1**t)) / ((vel / (1 - b2**t)).sqrt() + eps)
    return w, ema


@pytest.mark.parametrize("mgda", [True, False])
def test_adam_steps_match_a_hand_computation(mgda):
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(4, 3, generator=g, dtype=D)
    anchors = tuple(w0 + 0.1 * torch.randn(4, 3, generator=g, dtype=D) for _ in range(2))
    cfg = replace(DOPConfig(), steps=5, lr=1e-2, mgda=mgda, ema_beta=0.5)
    got, info = optimise_linear(w0, anchors, cfg)
    want, ema = _hand_dop(w0, anchors, cfg)
    assert got.dtype == D and torch.allclose(got, want, atol=1e-12, rtol=0)
    assert not torch.allclose(got, (anchors[0] + anchors[1]) / 2)  # it moved
    assert info["rank_merged"] == info["rank_new"] == 3
    if mgda:
        assert info["weight_merged"] == pytest.approx(ema[0], abs=1e-12) and ema[0] != cfg.alpha


def test_zero_task_vector_gives_finite_weights():
    w0 = torch.eye(3, dtype=D)
    anchors = (w0.clone(), w0 + torch.diag(torch.tensor([0.3, 0.2, 0.1], dtype=D)))
    got, info = optimise_linear(w0, anchors, replace(DOPConfig(), steps=3))
    assert torch.isfinite(got).all() and info["rank_merged"] == 0 and info["loss_merged"] == 0.0


def test_non_finite_weights_and_losses_are_user_errors():
    w0 = torch.zeros(2, 2)
    bad = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    with pytest.raises(UserError, match="non-finite weights"):
        optimise_linear(w0, (torch.eye(2), bad), replace(DOPConfig(), steps=2))
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):  # Adam diverging to inf
        optimise_linear(w0, (torch.eye(2), 1e30 * torch.eye(2)), replace(DOPConfig(), steps=2))


def _method(**options):
    bb = SimpleNamespace(linear_weight_names=lambda: {"lin.weight"}, direct_params_of_nonleaf=lambda: {"cls"})
    cfg = replace(DOPConfig(), **{"steps": 3, **options})
    validate_method(DOP, cfg)
    return DOP(cfg, MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False))


def _toy(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "lin.weight": torch.randn(4, 3, generator=g),
        "lin.bias": torch.randn(4, generator=g),
        "cls": torch.randn(3, generator=g),
    }


@pytest.mark.parametrize("compat", [False, True])
def test_step_rule_per_parameter(compat):
    pre = _toy(0)
    thetas = [{k: pre[k] + 0.1 * v for k, v in _toy(i).items()} for i in (1, 2, 3)]
    method = _method(fusionbench_compat=compat)
    state = method.init(pre)
    merged = []
    for i, th in enumerate(thetas):
        prev, before = state, {k: v.clone() for k, v in state.merged.items()}
        state = method.step(
            state, TaskInput(f"t{i}", i, {k: v.clone() for k, v in th.items()}, None, None), pre
        )
        assert all(torch.equal(before[k], v) for k, v in prev.merged.items())  # the old state is untouched
        merged.append(method.merged(state, pre))
    tau = [{k: th[k] - pre[k] for k in pre} for th in thetas]
    assert torch.allclose(merged[0]["lin.weight"], thetas[0]["lin.weight"], atol=1e-6)  # step 1 = θ_1
    # biases: pairwise mean of merged and new, so the first task's weight halves at every step
    want_bias = pre["lin.bias"] + tau[0]["lin.bias"] / 4 + tau[1]["lin.bias"] / 4 + tau[2]["lin.bias"] / 2
    assert torch.allclose(merged[2]["lin.bias"], want_bias, atol=1e-6)
    want_cls = (
        pre["cls"] if compat else pre["cls"] + tau[0]["cls"] / 4 + tau[1]["cls"] / 4 + tau[2]["cls"] / 2
    )
    assert torch.allclose(merged[2]["cls"], want_cls, atol=1e-6)
    # the Linear weight is optimised: 3 Adam steps (lr 1e-4) away from the pairwise mean
    mean = (merged[1]["lin.weight"] + thetas[2]["lin.weight"]) / 2
    gap = (merged[2]["lin.weight"] - mean).abs().max()
    assert 1e-5 < gap < 1e-3


def test_step_consumes_owned_weights_in_place_and_keeps_the_state():
    pre = _toy(0)
    method = _method()
    state = method.step(method.init(pre), TaskInput("a", 0, _toy(1), None, None), pre)
    kept = {k: v.clone() for k, v in state.merged.items()}
    owned = _toy(2)
    ptr = owned["lin.weight"].data_ptr()
    task = TaskInput("b", 1, owned, None, None, owned=True)
    new = method.step(state, task, pre)
    assert new.merged["lin.weight"].data_ptr() == ptr and task.weights is None
    assert all(torch.equal(kept[k], state.merged[k]) for k in kept)
    again = method.step(state, TaskInput("b", 1, _toy(2), None, None), pre)  # not owned: same result
    assert all(torch.equal(again.merged[k], new.merged[k]) for k in kept)


def test_zero_steps_is_the_pairwise_mean():
    pre, th1, th2 = _toy(0), _toy(1), _toy(2)
    method = _method(steps=0)
    state = method.step(method.init(pre), TaskInput("a", 0, dict(th1), None, None), pre)
    state = method.step(state, TaskInput("b", 1, dict(th2), None, None), pre)
    got = method.merged(state, pre)
    assert all(torch.allclose(got[k], (th1[k] + th2[k]) / 2, atol=1e-6) for k in pre)


@pytest.mark.parametrize(
    "key,value",
    [("alpha", 1.5), ("ema_beta", -0.1), ("svd_epsilon", 2.0), ("lr", 0.0), ("steps", -1)]
    + [("svd_proj_space", "w"), ("svd_rank", "all")],
)
def test_bad_values_are_one_line_user_errors(key, value):
    with pytest.raises(UserError, match=f"method.{key}"):
        validate_method(DOP, replace(DOPConfig(), **{key: value}))


def test_runs_on_the_open_clip_fixture(hub_root):
    """open_clip: nn.Linear weights (out_proj, MLP) are optimised; the fused in_proj_weight and the
    visual projection are not nn.Linear weights, so they take the pairwise mean (as in FusionBench)."""
    from otmf_exp.models import build_backbone

    oc = build_backbone(fx.openclip_cfg(hub_root), torch.device("cpu"), progress=False)
    linear = oc.linear_weight_names()
    assert any(k.endswith("attn.out_proj.weight") for k in linear)
    assert not any("in_proj" in k for k in linear) and "visual.proj" not in linear
    method = DOP(replace(DOPConfig(), steps=2), MethodContext(oc, torch.device("cpu"), torch.Generator()))
    pre = oc.pretrained_state()
    thetas = [oc.load_finetuned(t) for t in ("mnist", "svhn")]
    state = method.init(pre)
    for i, th in enumerate(thetas):
        state = method.step(state, TaskInput(f"t{i}", i, dict(th), None, None), pre)
    got = method.merged(state, pre)
    for k in pre:
        mean = (thetas[0][k] + thetas[1][k]) / 2
        if k in linear:
            assert torch.isfinite(got[k]).all() and not torch.allclose(got[k], mean, atol=1e-7)
        else:
            assert torch.allclose(got[k], mean, atol=1e-6), k
