"""WEMoE maths and protocols: the routed block equals the MLP with weights θ₀ + Σ_i r_i·τ_i (a hand-computed
case, then any router depth, per sample and per batch, full and low-rank experts), the state growth
declared per task, what is task-arithmetic merged, seeds, frozen old rows, bad values."""

from __future__ import annotations

import _hub_fixtures as fx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otmf_exp.config import method_config
from otmf_exp.errors import UserError
from otmf_exp.merging import METHODS, MethodContext, TaskInput
from otmf_exp.merging.lora_moe import Site
from otmf_exp.merging.task_vectors import num_bytes
from otmf_exp.merging.wemoe.wemoe_moe import Experts, MoEBlock, attached, entropy_loss, init_router, route
from otmf_exp.offline.synthetic import SyntheticBackbone

_one_thread = fx._one_thread
hub_root = fx.hub_root

T = torch.tensor


class _Net(nn.Module):
    def __init__(self, c: int = 3, o: int = 4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, o), nn.ReLU(), nn.Linear(o, c))

    def forward(self, x):
        return self.mlp(x)


def _block(net: _Net) -> MoEBlock:
    c, o = net.mlp[0].in_features, net.mlp[0].out_features
    return MoEBlock(
        "mlp", c, (Site("mlp.0", "mlp.0.weight", "mlp.0", c, o), Site("mlp.2", "mlp.2.weight", "mlp.2", o, c))
    )


def test_hand_computed_routed_linear():
    """One Linear, two experts, depth-0 router r = (0.5, 2): y = x·(W₀ + 0.5τ₁ + 2τ₂)ᵀ + b₀ + 0.5τb₁ + 2τb₂."""
    net = nn.Sequential()
    net.add_module("mlp", nn.Sequential(nn.Linear(2, 1)))
    with torch.no_grad():
        net.mlp[0].weight.copy_(T([[1.0, 2.0]]))
        net.mlp[0].bias.copy_(T([0.5]))
    blk = MoEBlock("mlp", 2, (Site("mlp.0", "mlp.0.weight", "mlp.0", 2, 1),))
    e = Experts(tv_w=T([[[1.0, 0.0]], [[0.0, -1.0]]]), tv_b=T([[1.0], [0.25]]))
    with (
        torch.no_grad(),
        attached(net, [blk], {"mlp": {"w": T([0.5, 2.0])}}, {"mlp.0": e}, batch_reduce=False),
    ):
        y = net(T([[1.0, 1.0], [2.0, -1.0]]))
    # W = [1 + 0.5, 2 − 2] = [1.5, 0]; b = 0.5 + 0.5 + 0.5 = 1.5
    assert torch.allclose(y, T([[1.5 + 1.5], [3.0 + 1.5]]))


def _reference_mlp(net, pre, tvs, r_row, x_row):
    """The block run with its merged weights θ₀ + Σ r_i τ_i, for one sample (FusionBench's merge_weights)."""
    p = {k: pre[k] + sum(r_row[i] * tv[k] for i, tv in enumerate(tvs)) for k in pre}
    h = F.relu(F.linear(x_row, p["mlp.0.weight"], p["mlp.0.bias"]))
    return F.linear(h, p["mlp.2.weight"], p["mlp.2.bias"])


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("batch_reduce", [True, False])
def test_routed_block_is_the_weight_ensembled_mlp(depth, batch_reduce):
    torch.manual_seed(0)
    net, n = _Net().double(), 3
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tvs = [{k: torch.randn_like(v) for k, v in pre.items()} for _ in range(n)]
    router = init_router(depth, 3, n, 0.3, torch.Generator().manual_seed(1), torch.float64)
    router = {k: v + torch.randn_like(v) for k, v in router.items()}  # away from the near-constant init
    experts = {
        s: Experts(
            tv_w=torch.stack([tv[f"{s}.weight"] for tv in tvs]),
            tv_b=torch.stack([tv[f"{s}.bias"] for tv in tvs]),
        )
        for s in ("mlp.0", "mlp.2")
    }
    x = torch.randn(4, 5, 3, dtype=torch.float64)  # [B, L, H]
    with torch.no_grad(), attached(net, [_block(net)], {"mlp": router}, experts, batch_reduce):
        y = net(x)
    # the routing by hand: router on every token, token mean, (batch mean)
    if depth == 0:
        r = router["w"][None].expand(4, n)
    else:
        h = x if depth == 1 else F.relu(x @ router["w1"].T + router["b1"])
        r = (h @ router["w"].T + router["b"]).mean(1)
        r = r.mean(0, keepdim=True).expand(4, n) if batch_reduce else r
    assert torch.allclose(route(router, x, batch_reduce).expand(4, n), r)
    want = torch.stack([_reference_mlp(net, pre, tvs, r[b], x[b]) for b in range(4)])
    assert torch.allclose(y, want, atol=1e-10)


def test_low_rank_experts_with_different_ranks():
    torch.manual_seed(0)
    net = _Net(4, 6).double()
    a1, b1 = torch.randn(3, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    a2, b2 = torch.randn(1, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    e = Experts(a=torch.cat([a1, a2]), b=torch.cat([b1, b2], dim=1), ranks=[3, 1])
    blk = MoEBlock("mlp", 4, (Site("mlp.0", "mlp.0.weight", "mlp.0", 4, 6),))
    r = T([[0.7, -1.3]], dtype=torch.float64)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with torch.no_grad(), attached(net, [blk], {"mlp": {"w": r[0]}}, {"mlp.0": e}, True):
        y = net(x)
    w = net.mlp[0].weight + 0.7 * b1 @ a1 - 1.3 * b2 @ a2
    want = net.mlp[2](F.relu(F.linear(x, w, net.mlp[0].bias)))
    assert torch.allclose(y, want, atol=1e-10)


def test_entropy_loss_is_fusionbench_formula():
    z = T([[0.0, 0.0], [10.0, -10.0]])
    p = torch.softmax(z, -1)
    assert entropy_loss(z).item() == pytest.approx(float(-(p * torch.log(p + 1e-8)).sum(-1).mean()))
    assert entropy_loss(T([[0.0, 0.0]])).item() == pytest.approx(0.6931, abs=1e-4)


# ---- the method on the synthetic tiny tower ----------------------------------------------------------------
@pytest.fixture(scope="module")
def bb():
    b = SyntheticBackbone("tiny", "cpu")
    b.batch_size = 16
    return b


def _method(bb, make_cfg, protocol="continual", *overrides, seed=0):
    cfg = method_config(make_cfg("method=wemoe", "method.max_steps=2", "method.batch_size=4", *overrides))
    ctx = MethodContext(bb, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False, seed=seed)
    return METHODS["wemoe"](cfg, ctx, protocol)


def _tasks(bb, n):
    sizes = {"train": 16, "validation": 8, "test": 16}
    out = []
    for i in range(n):
        data = bb.task_data(f"t{i}", sizes)
        out.append(TaskInput(f"t{i}", i, bb.load_finetuned(f"t{i}"), bb.zero_shot_head(data), data))
    return out


def test_continual_growth_rest_and_ranks(bb, make_cfg):
    m = _method(bb, make_cfg)
    pre = bb.pretrained_state()
    blocks = m.blocks()
    assert [b.name for b in blocks] == [f"vision_model.encoder.layers.{i}.mlp" for i in range(2)]
    state = m.init(pre)
    first, later = m.state_growth_bytes(pre, 1), m.state_growth_bytes(pre)
    assert first > later > 0  # rank 64 (capped at 32 here) first, 16 after
    sizes, tvs = [num_bytes(state.merged) + num_bytes(state.extra)], []
    for task in _tasks(bb, 3):
        tvs.append({k: task.weights[k] - pre[k] for k in pre})
        state = m.step(state, task, pre)
        sizes.append(num_bytes(state.merged) + num_bytes(state.extra))
    assert [b - a for a, b in zip(sizes, sizes[1:])] == [first, later, later]
    assert state.scalars["wemoe_ranks"] == [64, 16, 16]
    a = state.extra["vision_model.encoder.layers.0.mlp.fc1/A"]
    assert a.shape == (32 + 16 + 16, 32)  # fc1: C = 32, O = 64
    assert state.extra["vision_model.encoder.layers.0.mlp/router.w"].shape == (3, 32)
    merged = m.merged(state, pre)
    for k in pre:  # attention: θ₀ + 0.3·Σ τ; everything else θ₀ (routed blocks included)
        want = pre[k] + 0.3 * sum(tv[k] for tv in tvs) if "attn." in k else pre[k]
        assert torch.allclose(merged[k], want, atol=1e-6), k
    m.check_state(state, pre)


def test_joint_holds_full_task_vectors_and_merges_the_rest(bb, make_cfg):
    m = _method(bb, make_cfg, "joint")
    pre = bb.pretrained_state()
    tasks = _tasks(bb, 3)
    tvs = [{k: t.weights[k] - pre[k] for k in pre} for t in tasks]
    state = m.joint(pre, tasks)
    tv_w = state.extra["vision_model.encoder.layers.1.mlp.fc2/tv_w"]
    assert torch.equal(tv_w, torch.stack([tv["vision_model.encoder.layers.1.mlp.fc2.weight"] for tv in tvs]))
    assert "vision_model.encoder.layers.1.mlp/router.w1" in state.extra  # depth 2
    merged = m.merged(state, pre)
    for k in pre:
        want = pre[k] if ".mlp." in k else pre[k] + 0.3 * sum(tv[k] for tv in tvs)
        assert torch.allclose(merged[k], want, atol=1e-6), k
    assert m.options().eval_batch_reduce is False and m.options().max_steps == 2


def test_seed_drives_routers_and_old_rows_can_be_frozen(bb, make_cfg):
    pre = bb.pretrained_state()
    key = "vision_model.encoder.layers.0.mlp/router.w"
    states = []
    for seed in (0, 0, 1):
        m = _method(bb, make_cfg, "continual", seed=seed)
        states.append(m.step(m.init(pre), _tasks(bb, 1)[0], pre))
    assert torch.equal(states[0].extra[key], states[1].extra[key])
    assert not torch.equal(states[0].extra[key], states[2].extra[key])
    m = _method(bb, make_cfg, "continual", "method.train_old_rows=false")
    s1 = m.step(m.init(pre), _tasks(bb, 2)[0], pre)
    s2 = m.step(s1, _tasks(bb, 2)[1], pre)
    assert torch.equal(s2.extra[key][:1], s1.extra[key]) and torch.equal(
        s2.extra[key.replace(".w", ".b")][:1], s1.extra[key.replace(".w", ".b")]
    )
    m = _method(bb, make_cfg, "continual")
    s2 = m.step(m.step(m.init(pre), _tasks(bb, 2)[0], pre), _tasks(bb, 2)[1], pre)
    assert not torch.equal(s2.extra[key][:1], s1.extra[key])  # the authors' code: every row trains


@pytest.mark.parametrize(
    "override,msg",
    [("method.experts=half", "experts"), ("method.router_hidden_layers=3", "router_hidden_layers"),
     ("method.rest=mlp", "rest"), ("method.lora_rank=0", "lora_rank"), ("method.seed_samples=-1", "seed_samples")],
)  # fmt: skip
def test_bad_values_are_one_line_errors(make_cfg, override, msg):
    with pytest.raises(UserError, match=msg):
        METHODS["wemoe"].validate(method_config(make_cfg("method=wemoe", override)))


def test_open_clip_blocks_and_run(hub_root, tmp_path, make_cfg, monkeypatch):
    from otmf_exp.models import build_backbone
    from otmf_exp.runner import run_experiment

    monkeypatch.setenv("OTMF_EXP_CACHE", str(tmp_path / "c"))
    oc = build_backbone(fx.openclip_cfg(hub_root), torch.device("cpu"), progress=False)
    m = METHODS["wemoe"](
        method_config(make_cfg("method=wemoe")), MethodContext(oc, torch.device("cpu"), torch.Generator())
    )
    assert m.blocks() and all(
        b.name.endswith(".mlp") and [s.name.rsplit(".", 1)[1] for s in b.sites] == ["c_fc", "c_proj"]
        for b in m.blocks()
    )
    cfg = make_cfg(
        *fx.openclip_overrides(hub_root),
        "method=wemoe",
        "method.max_steps=2",
        "backbone.batch_size=8",
    )
    metrics = run_experiment(cfg, tmp_path / "run")
    assert len(metrics["acc_matrix"]) == 2 and metrics["state_mb"] > 0


def test_entropy_loss_float32_unchanged_and_float64_kept():
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 4
    for x in (z, z.half()):  # main's formula: softmax(logits.float())
        p = torch.softmax(x.float(), dim=-1)
        assert torch.equal(entropy_loss(x), -(p * torch.log(p + 1e-8)).sum(-1).mean())
    z64 = z.double()
    p64 = torch.softmax(z64, dim=-1)
    assert entropy_loss(z64).dtype == torch.float64
    assert torch.equal(entropy_loss(z64), -(p64 * torch.log(p64 + 1e-8)).sum(-1).mean())
