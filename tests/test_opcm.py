"""OPCM: split rank, the projected update in the merged basis, adaptive scaling, FusionBench compat."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from otmf_exp.config import validate_method
from otmf_exp.errors import UserError
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.opcm.opcm import OPCM, OPCMConfig, project_out, split_rank
from otmf_exp.merging.task_vectors import global_norm, task_vector

T = torch.tensor


@pytest.mark.parametrize("alpha,r", [(0.3, 0), (0.5, 1), (0.75, 2), (0.9, 3), (1.0, 0), (1.5, 0)])
def test_split_rank_on_hand_made_spectrum(alpha, r):
    # cumsum/sum = [0.4, 0.7, 0.9, 1.0]; r = first 0-based index with ratio > α, 0 if none
    assert split_rank(T([4.0, 3.0, 2.0, 1.0]), alpha) == r


def test_split_rank_zero_spectrum():
    assert split_rank(torch.zeros(5), 0.5) == 0


def _full_basis(dm):
    u, _, vh = torch.linalg.svd(dm.double(), full_matrices=True)
    return u, vh.T


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_projected_update_zero_diag_and_block_in_merged_basis(shape):
    g = torch.Generator().manual_seed(sum(shape))
    dm = torch.randn(*shape, generator=g, dtype=torch.float64)
    dt = torch.randn(*shape, generator=g, dtype=torch.float64)
    cleaned, r = project_out(dm, dt, alpha=0.5)
    s = torch.linalg.svdvals(dm)
    assert r == split_rank(s, 0.5) and r >= 1
    u, v = _full_basis(dm)  # the full SVD, as FusionBench computes it
    p_new, p_old = u.T @ cleaned @ v, u.T @ dt @ v
    k = min(shape)
    assert torch.allclose(torch.diagonal(p_new), torch.zeros(k, dtype=p_new.dtype), atol=1e-10)
    assert torch.allclose(p_new[:r, :r], torch.zeros(r, r, dtype=p_new.dtype), atol=1e-10)
    keep = torch.ones(shape, dtype=torch.bool)
    keep[:r, :r] = False
    keep[range(k), range(k)] = False
    assert torch.allclose(p_new[keep], p_old[keep], atol=1e-10)  # everything else untouched
    # equals the full-SVD construction U P Vᵀ
    p = p_old.clone()
    p.diagonal().fill_(0)
    p[:r, :r] = 0
    assert torch.allclose(cleaned, u @ p @ v.T, atol=1e-10)


def test_alpha_at_least_one_removes_only_the_diagonal():
    g = torch.Generator().manual_seed(3)
    dm, dt = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
    )
    cleaned, r = project_out(dm, dt, alpha=1.0)
    assert r == 0
    u, v = _full_basis(dm)
    removed = u.T @ (dt - cleaned) @ v
    p = u.T @ dt @ v
    diag = torch.zeros_like(p)
    k = min(p.shape)
    diag[range(k), range(k)] = p[range(k), range(k)]
    assert torch.allclose(removed, diag, atol=1e-10)
    assert not torch.allclose(diag, torch.zeros_like(diag))


def test_all_zero_merged_layer_gives_rank_zero_without_nan():
    dt = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    cleaned, r = project_out(torch.zeros(4, 3), dt, alpha=0.5)
    assert r == 0 and torch.isfinite(cleaned).all()
    assert cleaned.dtype == dt.dtype


class _FakeBackbone:
    def __init__(self, linear, nonleaf=()):
        self._linear, self._nonleaf = set(linear), set(nonleaf)

    def linear_weight_names(self):
        return self._linear

    def direct_params_of_nonleaf(self):
        return self._nonleaf


def _ctx(bb, rec=None):
    return MethodContext(
        backbone=bb,
        device=torch.device("cpu"),
        generator=torch.Generator(),
        record=(lambda k, v: rec.__setitem__(k, v)) if rec is not None else (lambda k, v: None),
    )


def test_step_rescales_to_mean_task_vector_norm_and_keeps_inputs():
    g = torch.Generator().manual_seed(0)
    pre = {
        "lin.weight": torch.randn(5, 3, generator=g),
        "lin.bias": torch.randn(5, generator=g),
        "cls": torch.randn(3, generator=g),
    }
    fts = [
        {k: v + (i + 1) * 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for i in range(3)
    ]
    rec = {}
    m = OPCM(OPCMConfig(), _ctx(_FakeBackbone({"lin.weight"}), rec))
    state = m.init(pre)
    norms = []
    for i, ft in enumerate(fts):
        before = {k: v.clone() for k, v in ft.items()}
        old_state, old_merged = state, {k: v.clone() for k, v in state.merged.items()}
        state = m.step(state, TaskInput(f"t{i}", i, ft, None, None), pre)
        norms.append(global_norm(task_vector(ft, pre)))
        assert global_norm(state.merged) == pytest.approx(sum(norms) / len(norms), rel=1e-6)
        assert state.scalars["opcm_norms"] == pytest.approx(norms)
        assert all(torch.equal(ft[k], before[k]) for k in ft)
        assert all(torch.equal(old_state.merged[k], v) for k, v in old_merged.items())
    assert rec["opcm_lambda"] == state.scalars["opcm_lambda"] > 0
    assert 0 <= rec["opcm_split_rank_mean"] < 3


@pytest.mark.parametrize(
    "alpha,raw_w",
    [
        (0.6, [[3.0, 1.0, 1.0], [1.0, 2.0, 1.0], [0.0, 0.0, 1.0]]),  # r = 1: only the diagonal goes
        (0.9, [[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]),  # r = 2: the 2x2 block goes too
    ],
)
def test_step_closed_form(alpha, raw_w):
    # Δ_m = diag(3,2,1): U = V = I (up to signs); S ratios [0.5, 0.83, 1]
    pre = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
    fts = [
        {"w": torch.diag(T([3.0, 2.0, 1.0])), "b": T([1.0, 0.0, 0.0])},
        {"w": T([[5.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), "b": T([0.0, 2.0, 0.0])},
    ]
    m = OPCM(OPCMConfig(alpha=alpha), _ctx(_FakeBackbone({"w"})))
    s = m.step(m.init(pre), TaskInput("a", 0, fts[0], None, None), pre)
    assert s.scalars == {"opcm_lambda": 1.0, "opcm_norms": [pytest.approx(15**0.5)]}
    s = m.step(s, TaskInput("b", 1, fts[1], None, None), pre)
    raw_w, raw_b = T(raw_w), T([1.0, 2.0, 0.0])  # b: λ_1·τᵐ + τ_2 (plain rule)
    avg = (15**0.5 + 33**0.5) / 2
    n = float((raw_w.pow(2).sum() + raw_b.pow(2).sum()).sqrt())
    assert torch.allclose(s.merged["w"], raw_w * avg / n, atol=1e-6)
    assert torch.allclose(s.merged["b"], raw_b * avg / n, atol=1e-6)
    assert s.scalars["opcm_lambda"] == pytest.approx(n / avg)


# ---- FusionBench compat on a tiny HF CLIP vision tower ---------------------------------------
def _tiny_clip():
    from otmf_exp.offline.tiny_clip import TinyRecipe, make_module

    torch.manual_seed(0)
    return make_module(
        TinyRecipe(
            hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, projection_dim=8
        )
    ).eval()


def _fusionbench_opcm(pre: nn.Module, models: list[nn.Module], alpha: float) -> nn.Module:
    """FusionBench 0.2.33 OPCMForCLIP.run, re-expressed: walk leaf modules of the merged model."""

    def tv_norm(m):
        return torch.linalg.norm(
            torch.cat([(p - q).reshape(-1) for p, q in zip(m.parameters(), pre.parameters())])
        )

    merged = copy.deepcopy(models[0])
    norms, lam_prev = [float(tv_norm(merged))], 1.0
    with torch.no_grad():
        for task in models[1:]:
            norms.append(float(tv_norm(task)))
            avg = sum(norms) / len(norms)
            for name, mod in merged.named_modules():
                if len(list(mod.children())) > 0:
                    continue
                p0, pt = pre.get_submodule(name), task.get_submodule(name)
                if isinstance(mod, nn.Linear):
                    dm, dt = mod.weight - p0.weight, pt.weight - p0.weight
                    u, s, vh = torch.linalg.svd(dm, full_matrices=True)
                    v = vh.T
                    r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                    p = u.T @ dt @ v
                    p.diagonal().fill_(0)
                    p[:r, :r] = 0
                    mod.weight.data = p0.weight + lam_prev * dm + u @ p @ v.T
                    if mod.bias is not None:
                        mod.bias.data = p0.bias + lam_prev * (mod.bias - p0.bias) + (pt.bias - p0.bias)
                else:
                    for pn, prm in mod.named_parameters():
                        a, b = p0.get_parameter(pn), pt.get_parameter(pn)
                        prm.data = a + lam_prev * (prm - a) + (b - a)
            n = float(tv_norm(merged))
            for p, q in zip(merged.parameters(), pre.parameters()):
                p.data = q + (p - q) * (avg / n)
            lam_prev = n / avg
    return merged


@pytest.mark.parametrize("compat", [True, False])
def test_fusionbench_compat_matches_reference_and_class_token(compat):
    from otmf_exp.models.clip_vision import ClipVisionBackbone

    class _Bb(ClipVisionBackbone):
        def load_finetuned(self, task):
            raise NotImplementedError

    module = _tiny_clip()
    bb = _Bb(module)
    cls_key = "vision_model.embeddings.class_embedding"
    assert cls_key in bb.direct_params_of_nonleaf() and cls_key not in bb.linear_weight_names()
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in bb.linear_weight_names()
    pre = {k: v.clone() for k, v in bb.pretrained_state().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    m = OPCM(OPCMConfig(alpha=0.5, fusionbench_compat=compat, svd_dtype="float32"), _ctx(bb))
    state = m.init(pre)
    for i, ft in enumerate(fts):
        state = m.step(state, TaskInput(f"t{i}", i, ft, None, None), pre)
    ours = m.merged(state, pre)

    cls_tv = state.merged[cls_key]
    first = fts[0][cls_key] - pre[cls_key]
    cos = float(torch.nn.functional.cosine_similarity(cls_tv, first, dim=0))
    if compat:  # the first model's class token, only rescaled with everything else
        assert cos == pytest.approx(1.0, abs=1e-6)
        ref_models = []
        for ft in fts:
            mm = copy.deepcopy(module.vision_model)
            mm.load_state_dict({k.removeprefix("vision_model."): v for k, v in ft.items()}, strict=False)
            ref_models.append(mm)
        ref = _fusionbench_opcm(module.vision_model, ref_models, alpha=0.5)
        for name, p in ref.named_parameters():
            assert torch.allclose(ours["vision_model." + name], p, atol=2e-5, rtol=1e-4), name
    else:
        assert cos < 0.99  # merged from every task like any other non-matrix parameter


def test_validate_rejects_bad_values():
    cfg = OmegaConf.structured(OPCMConfig)
    cfg.alpha = -0.1
    with pytest.raises(UserError, match="alpha"):
        validate_method(OPCM, cfg)
    cfg.alpha, cfg.svd_dtype = 0.5, "float16"
    with pytest.raises(UserError, match="svd_dtype"):
        validate_method(OPCM, cfg)


# ---- precision: auto (float32 SVD, float64 where the split is close) vs the exact float64 result -----
def test_auto_svd_matches_float64_on_vit_b32_sized_layers():
    from otmf_exp.merging.opcm.opcm import project_out

    g = torch.Generator().manual_seed(0)
    for shape in [(768, 768), (3072, 768), (768, 3072)]:
        dm = 1e-3 * torch.randn(*shape, generator=g)  # fine-tuning deltas are small (|τ| ~ 1e-3)
        dt = 1e-3 * torch.randn(*shape, generator=g)
        exact, r64 = project_out(dm, dt, 0.5, torch.float64)
        fast, r32 = project_out(dm, dt, 0.5, "auto")
        assert r32 == r64
        assert (fast - exact).abs().max() < 1e-5


def test_auto_svd_redoes_a_close_split_in_float64(monkeypatch):
    """A spectrum whose cumulative ratio sits at α (within float32 rounding) is decided in float64."""
    from otmf_exp.merging.opcm import opcm

    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **k: calls.append(a.dtype) or real_svd(a, **k))
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64)  # cumsum/sum = 0.375, 0.625, ...
    dm = (u * s) @ u.T
    dt = torch.randn(6, 6, dtype=torch.float64)
    alpha = 0.375 + 1e-6  # the ratio after the first value is within AUTO_MARGIN of alpha
    cleaned, r = opcm.project_out(dm.float(), dt.float(), alpha, "auto")
    assert calls == [torch.float32, torch.float64] and r == opcm.split_rank(s, alpha) == 1
    calls.clear()
    opcm.project_out(dm.float(), dt.float(), 0.5, "auto")  # far from any ratio: float32 only
    assert calls == [torch.float32]


def _digits_steps(bb, pre, svd_dtype, perturb=None):
    """States after each OPCM step on the 8 digits tasks; also the auto step taken from every float64 state."""
    from otmf_exp.merging.base import MethodContext, TaskInput
    from otmf_exp.merging.opcm.opcm import OPCM, OPCMConfig

    def method(dt):
        return OPCM(
            OPCMConfig(svd_dtype=dt),
            MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False),
        )

    tasks = ["rot90", "rot180", "flip", "invert", "shift", "noise", "occlude", "parity"]
    ref, fast = method(svd_dtype), method("auto")
    state, states, local = ref.init(pre), [], []
    for i, t in enumerate(tasks):
        w = bb.load_finetuned(t)
        if perturb is not None and i == 0:
            w = perturb(w)
        if i > 0:  # one auto step from the very same input state
            local.append(
                fast.step(state, TaskInput(t, i, {k: v.clone() for k, v in w.items()}, None, None), pre)
            )
        state = ref.step(state, TaskInput(t, i, w, None, None), pre)
        states.append(state)
    return states, local


def _maxdiff(a, b) -> float:
    return max(float((a.merged[k] - b.merged[k]).abs().max()) for k in a.merged)


def test_auto_matches_float64_step_by_step_and_within_the_problems_conditioning(zoo):
    """Every auto step agrees with the float64 step from the same state to < 1e-6. Over 8 chained
    steps the recurrence amplifies ANY perturbation (~2x per step): the auto chain's drift from the
    float64 chain stays below what a float32-rounding-sized change of one input model causes."""
    from otmf_exp.models.tiny import TinyBackbone

    bb = TinyBackbone(zoo)
    pre = bb.pretrained_state()
    exact, local = _digits_steps(bb, pre, "float64")
    assert all(_maxdiff(a, b) < 1e-6 for a, b in zip(exact[1:], local))
    auto, _ = _digits_steps(bb, pre, "auto")
    drift = [_maxdiff(a, b) for a, b in zip(exact, auto)]
    assert max(drift[:6]) < 1e-5  # 1 to 6 steps: within 1e-5 of the exact result

    def ulp_noise(w):
        g = torch.Generator().manual_seed(0)
        return {k: v + v.abs() * 6e-8 * torch.randn(v.shape, generator=g) for k, v in w.items()}

    perturbed, _ = _digits_steps(bb, pre, "float64", ulp_noise)
    conditioning = [_maxdiff(a, b) for a, b in zip(exact, perturbed)]
    assert drift[-1] < conditioning[-1]
