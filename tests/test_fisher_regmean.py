"""Fisher merging and RegMean: closed forms on toy cases, seeded subsets, hooks, refusals."""

from __future__ import annotations

import json
import types

import _hub_fixtures as fx
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from otmf_exp.config import validate_method
from otmf_exp.data.base import TensorTaskData, example_batches
from otmf_exp.errors import UserError
from otmf_exp.merging.base import MethodContext, TaskInput
from otmf_exp.merging.fisher_regmean.fisher import (
    Fisher,
    FisherAccumulator,
    FisherConfig,
    fisher_weighted_mean,
)
from otmf_exp.merging.fisher_regmean.regmean import (
    GramRecorder,
    RegMean,
    RegMeanAccumulator,
    RegMeanConfig,
    recording,
    reduce_non_diagonal,
    regmean_weight,
)

T = torch.tensor


class LinearSoftmax:
    """A toy backbone: logits = x·Wᵀ (softmax regression), one mergeable weight ``w``."""

    modality, name = "vision", "toy"

    def __init__(self, c: int = 3, d: int = 4) -> None:
        self.module = nn.Sequential(nn.Linear(d, c, bias=False))
        self.device = torch.device("cpu")

    def logits(self, params, head, x):
        return x @ params["w"].T

    def to_device(self, x):
        return x


def _ctx(backbone, seed: int = 0) -> MethodContext:
    return MethodContext(backbone, torch.device("cpu"), torch.Generator(), progress=False, seed=seed)


def _cfg(cls, **kw):
    return OmegaConf.merge(OmegaConf.structured(cls.Config), kw)


def _toy_data(n: int = 12, d: int = 4, seed: int = 0) -> TensorTaskData:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)
    return TensorTaskData("toy", {"train": (x, y), "test": (x, y)}, ["a", "b", "c"])


# ---- Fisher -------------------------------------------------------------------------------------------
def test_fisher_weighted_mean_by_hand_and_streamed():
    thetas = [{"a": T([1.0, 2.0])}, {"a": T([3.0, 4.0])}]
    fishers = [{"a": T([1.0, 0.0])}, {"a": T([1.0, 3.0])}]
    assert torch.allclose(fisher_weighted_mean(thetas, fishers, [1.0, 1.0], 0.0)["a"], T([2.0, 4.0]))
    # FusionBench: c_i = (1/T)·(1/(n_i+ε)) / Σ_j 1/(n_j+ε); the common factors cancel in the stream
    eps = 1e-6
    norms = [float(f["a"].norm()) for f in fishers]
    inv = torch.tensor([1 / (n + eps) for n in norms])
    fb_coefs = (0.5 * inv / inv.sum()).tolist()
    acc = FisherAccumulator(eps)
    for t, f, n in zip(thetas, fishers, norms):
        acc.add(t, f, 1 / (n + eps))
    expect = fisher_weighted_mean(thetas, fishers, fb_coefs, eps)["a"]
    assert torch.allclose(acc.result(thetas[0])["a"], expect, atol=1e-6)
    # second entry: (1+ε)c₀ vs ... weights (0+ε) and 3: dominated by task 2's value 4
    assert float(expect[1]) == pytest.approx(4.0, abs=1e-5)


def _closed_form_fisher(w, batches, estimate):
    """The toy's Fisher by hand: ∇_W log p_c = (e_c − p) xᵀ."""
    f, n = torch.zeros_like(w), 0
    for x in batches:
        p = torch.softmax(x @ w.T, -1)
        eye = torch.eye(w.shape[0])
        grads = (eye[None] - p[:, None, :])[..., None] * x[:, None, None, :]  # [B, c, C, D]: ∇ log p_c
        if estimate == "batch":
            f += (p.sqrt()[..., None, None] * grads).sum((0, 1)).square()
        else:
            f += (p[..., None, None] * grads.square()).sum((0, 1))
        n += len(x)
    return f / n


@pytest.mark.parametrize("estimate", ["batch", "exact"])
def test_fisher_estimate_matches_softmax_regression_closed_form(estimate):
    bb = LinearSoftmax()
    method = Fisher(_cfg(Fisher, estimate=estimate, batch_size=4, num_examples=10), _ctx(bb))
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    data = _toy_data()
    batches = list(example_batches(data, "train", 10, 4, shuffle=False, seed=0))
    assert [len(b["labels"]) for b in batches] == [4, 4, 4]  # whole batches: ceil(10/4), as FusionBench
    got = method.fisher({"w": w}, None, batches, "toy")["w"]
    want = _closed_form_fisher(w, [b["inputs"] for b in batches], estimate)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_fisher_joint_is_the_weighted_mean_of_the_task_models():
    bb = LinearSoftmax()
    method = Fisher(_cfg(Fisher, batch_size=4, num_examples=8), _ctx(bb))
    pre = {"w": torch.zeros(3, 4)}
    g = torch.Generator().manual_seed(2)
    thetas = [{"w": torch.randn(3, 4, generator=g)} for _ in range(2)]
    datas = [_toy_data(seed=s) for s in (3, 4)]
    fishers = [
        method.fisher(t, None, method.batches(TaskInput(f"t{i}", i, t, None, d)), "x")
        for i, (t, d) in enumerate(zip(thetas, datas))
    ]
    coefs = [1 / (float(f["w"].norm()) + 1e-6) for f in fishers]
    state = method.joint(
        pre, iter([TaskInput(f"t{i}", i, t, None, d) for i, (t, d) in enumerate(zip(thetas, datas))])
    )
    want = fisher_weighted_mean(thetas, fishers, coefs, 1e-6)["w"]
    assert torch.allclose(state.merged["w"], want, atol=1e-6) and state.step == 2


def test_seeds_pick_different_subsets_and_shuffle_false_is_the_first_examples():
    data = _toy_data(n=40)
    task = TaskInput("toy", 0, {}, None, data)

    def labels(seed, **kw):
        method = Fisher(_cfg(Fisher, batch_size=4, num_examples=8, **kw), _ctx(LinearSoftmax(), seed))
        return torch.cat([b["inputs"] for b in method.batches(task)])

    assert torch.equal(labels(0), labels(0))
    assert not torch.equal(labels(0), labels(1))
    assert torch.equal(labels(0, shuffle=False), data.splits["train"][0][:8])
    assert torch.equal(labels(0, shuffle=False), labels(1, shuffle=False))


class TinyNet:
    """A toy backbone for RegMean: features = Linear(ReLU(Linear(x))) run with the given weights."""

    modality, name = "vision", "toy"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
        self.device = torch.device("cpu")

    def features(self, params, x):
        return torch.func.functional_call(self.module, params, (x,))

    def to_device(self, x):
        return x


def test_regmean_seeds_pick_different_subsets():
    bb = TinyNet()
    pre = {k: v.detach() for k, v in bb.module.named_parameters()}

    def merged(seed):
        method = RegMean(_cfg(RegMean, batch_size=4, num_examples=8), _ctx(bb, seed))
        tasks = [
            TaskInput(f"t{i}", i, {k: v + 0.1 * (i + 1) for k, v in pre.items()}, None, _toy_data(40, seed=i))
            for i in range(2)
        ]
        return method.joint(pre, iter(tasks)).merged["2.weight"]

    assert torch.equal(merged(0), merged(0))
    assert not torch.allclose(merged(0), merged(1))


# ---- RegMean ------------------------------------------------------------------------------------------
def test_regmean_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x / len(x) for x in xs]  # equal counts: the mean normalisation keeps the minimiser
    w = regmean_weight(grams, ws, 1.0)
    lstsq = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ wi.T for x, wi in zip(xs, ws)])).solution.T
    assert torch.allclose(w, lstsq, atol=1e-10)
    # with α < 1: W minimises Σ_i tr((W − W_i) G̃_i (W − W_i)ᵀ), G̃ = α·G + (1 − α)·diag(G)
    a = 0.7
    w = regmean_weight(grams, ws, a).requires_grad_(True)
    reduced = [a * gi + (1 - a) * torch.diag(gi.diagonal()) for gi in grams]
    assert torch.allclose(reduce_non_diagonal(grams[0], a), reduced[0])
    loss = sum(torch.trace((w - wi) @ gi @ (w - wi).T) for gi, wi in zip(reduced, ws))
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-10
    # α = 0: only the diagonals: per input feature a weighted mean of the columns
    diag = torch.stack([gi.diagonal() for gi in grams])
    want = sum(d * wi for d, wi in zip(diag, ws)) / diag.sum(0)
    assert torch.allclose(regmean_weight(grams, ws, 0.0), want, atol=1e-12)


def test_gram_recorder_running_mean_and_accumulator():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    rec = GramRecorder()
    xs = [torch.randn(3, 5, 4), torch.randn(2, 5, 4)]  # [B, tokens, D]: every token is a row
    with recording(net, {"0.weight", "2.weight"}, rec):
        for x in xs:
            net(x)
    with torch.no_grad():
        rows = torch.cat([x.reshape(-1, 4) for x in xs])
        hidden = torch.relu(net[0](rows))
    assert rec.rows == {"0.weight": 25, "2.weight": 25}
    assert torch.allclose(rec.means["0.weight"], rows.T @ rows / 25, atol=1e-5)
    assert torch.allclose(rec.means["2.weight"], hidden.T @ hidden / 25, atol=1e-5)
    net(xs[0])  # hooks removed on exit
    assert rec.rows["0.weight"] == 25
    acc = RegMeanAccumulator(0.9)
    thetas = [{k: v.detach() + i for k, v in net.state_dict().items()} for i in range(2)]
    for t in thetas:
        acc.add(t, rec.means)
    out = acc.result(thetas[0])
    want = regmean_weight([rec.means["0.weight"]] * 2, [t["0.weight"] for t in thetas], 0.9)
    assert torch.allclose(out["0.weight"], want, atol=1e-4)
    assert torch.allclose(out["0.bias"], (thetas[0]["0.bias"] + thetas[1]["0.bias"]) / 2)  # averaged


def test_multihead_attention_projections_are_recorded_and_unchanged():
    mha = nn.MultiheadAttention(8, 2)
    holder = nn.Module()
    holder.attn = mha
    x = torch.randn(5, 3, 8)
    want = mha(x, x, x, need_weights=False)[0]
    rec = GramRecorder()
    with recording(holder, {"attn.in_proj_weight", "attn.out_proj.weight"}, rec):
        got = holder.attn(x, x, x, need_weights=False)[0]
    assert torch.allclose(got, want, atol=1e-6)
    rows = x.reshape(-1, 8)
    assert torch.allclose(rec.means["attn.in_proj_weight"], rows.T @ rows / 15, atol=1e-5)
    assert set(rec.means) == {"attn.in_proj_weight", "attn.out_proj.weight"}
    assert "forward" not in vars(mha)  # the patch is undone


# ---- config, refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,key,value",
    [
        (Fisher, "num_examples", 0),
        (Fisher, "batch_size", 0),
        (Fisher, "split", "dev"),
        (Fisher, "min_weight", -1.0),
        (Fisher, "estimate", "sampled"),
        (RegMean, "num_examples", 0),
        (RegMean, "reduce_non_diagonal_ratio", 1.5),
        (RegMean, "split", "dev"),
    ],
)
def test_bad_values_are_one_line_user_errors(cls, key, value):
    with pytest.raises(UserError, match=f"method.{key}") as e:
        validate_method(cls, _cfg(cls, **{key: value}))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cls", [Fisher, RegMean])
def test_text_backbones_and_continual_are_refused(cls):
    text = types.SimpleNamespace(modality="text", name="flan_t5_base")
    with pytest.raises(UserError, match="vision backbones, not 'flan_t5_base'"):
        cls(_cfg(cls), _ctx(text), protocol="joint")
    assert cls.protocols == ("joint",)
    assert isinstance(cls.Config(), FisherConfig if cls is Fisher else RegMeanConfig)


# ---- open_clip (nn.MultiheadAttention towers) end to end ---------------------------------------------------
_one_thread, _private_cache, hub_root = fx._one_thread, fx._private_cache, fx.hub_root


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_open_clip_end_to_end(hub_root, tmp_path, make_cfg, method):
    from otmf_exp.runner import run_experiment

    cfg = make_cfg(
        *fx.openclip_overrides(hub_root),
        f"method={method}",
        "protocol=joint",
        "method.batch_size=8",
        "backbone.batch_size=8",
    )
    m = run_experiment(cfg, tmp_path / "run")
    assert m["backbone"] == "openclip_vit_b32" and m["method"] == method
    if method == "regmean":  # each block's MHA in-projection and out_proj got Grams, not only its MLP
        counts = json.loads((tmp_path / "run" / "steps.jsonl").read_text())["regmean_weights"]
        assert counts["in_proj"] > 0 and counts["linear"] == 3 * counts["in_proj"]


# ---- dtype: float32 unchanged, a float64 model accumulated in float64 --------------------------------------
def _fisher_joint(dtype, monkeypatch=None):
    import otmf_exp.merging.fisher_regmean.fisher as fm

    if monkeypatch is not None:  # main's hard-coded float32 accumulators
        monkeypatch.setattr(fm, "work_dtype", lambda d: torch.float32)
    bb = LinearSoftmax()
    method = Fisher(_cfg(Fisher, batch_size=4, num_examples=8), _ctx(bb))
    g = torch.Generator().manual_seed(2)
    thetas = [{"w": torch.randn(3, 4, generator=g).to(dtype)} for _ in range(2)]
    datas = []
    for s in (3, 4):
        d = _toy_data(seed=s)
        d.splits = {k: (x.to(dtype), y) for k, (x, y) in d.splits.items()}
        datas.append(d)
    tasks = [TaskInput(f"t{i}", i, t, None, d) for i, (t, d) in enumerate(zip(thetas, datas))]
    fishers = [method.fisher(t.weights, None, method.batches(t), "x") for t in tasks]
    merged = method.joint({"w": torch.zeros(3, 4, dtype=dtype)}, iter(tasks)).merged["w"]
    return merged, fishers, thetas


def test_fisher_float32_bit_identical_and_float64_accumulated_in_float64(monkeypatch):
    now, _, _ = _fisher_joint(torch.float32)
    before, _, _ = _fisher_joint(torch.float32, monkeypatch)
    assert torch.equal(now, before)
    monkeypatch.undo()
    merged, fishers, thetas = _fisher_joint(torch.float64)
    assert merged.dtype == torch.float64 and all(f["w"].dtype == torch.float64 for f in fishers)
    coefs = [1 / (float(f["w"].norm()) + 1e-6) for f in fishers]
    want = fisher_weighted_mean(thetas, fishers, coefs, 1e-6)["w"]
    assert torch.allclose(merged, want, rtol=0, atol=1e-14)  # float32 accumulators: ~1e-7


def _regmean_acc(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype)
    rec = GramRecorder()
    xs = [torch.randn(3, 5, 4, dtype=dtype), torch.randn(2, 5, 4, dtype=dtype)]
    with recording(net, {"0.weight", "2.weight"}, rec):
        for x in xs:
            net(x)
    acc = RegMeanAccumulator(0.9)
    thetas = [{k: v.detach() + i for k, v in net.state_dict().items()} for i in range(2)]
    for t in thetas:
        acc.add(t, rec.means)
    return rec, acc.result(thetas[0]), thetas


def test_regmean_float32_bit_identical_and_float64_grams_in_float64(monkeypatch):
    import otmf_exp.merging.fisher_regmean.regmean as rm

    _, now, _ = _regmean_acc(torch.float32)
    monkeypatch.setattr(rm, "work_dtype", lambda d: torch.float32)  # main's hard-coded float32
    _, before, _ = _regmean_acc(torch.float32)
    assert all(torch.equal(now[k], before[k]) for k in now)
    monkeypatch.undo()
    rec, out, thetas = _regmean_acc(torch.float64)
    assert all(g.dtype == torch.float64 for g in rec.means.values())
    want = regmean_weight([rec.means["0.weight"]] * 2, [t["0.weight"] for t in thetas], 0.9)
    assert out["0.weight"].dtype == torch.float64 and torch.allclose(
        out["0.weight"], want, rtol=0, atol=1e-12
    )
