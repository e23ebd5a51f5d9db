"""Weights computed per module as it runs (ComputedParams): the same features and gradients, bit
for bit, as a whole weight dict, on every backbone kind; the computed weights are not kept alive."""

from __future__ import annotations

import gc
import json
import weakref

import _hub_fixtures as fx
import pytest
import torch
from _hub_fixtures import clip_cfg, openclip_cfg, t5_cfg
from safetensors.torch import load_file

from otmf_exp.models import build_backbone
from otmf_exp.models.functional import ComputedParams, computed_parameters, layer_blocks
from otmf_exp.offline import tiny_hub
from otmf_exp.offline.synthetic import SyntheticBackbone

# shared fixtures (tests/_hub_fixtures.py)
_one_thread = fx._one_thread
_private_cache = fx._private_cache
hub_root = fx.hub_root


def _backbone_and_inputs(kind, hub_root):
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    if kind == "synthetic":
        bb = SyntheticBackbone("tiny", "cpu", noise=0.01, autocast="float32")
        size = bb.module.config.image_size
        return bb, torch.randn(3, 3, size, size, generator=g)
    if kind == "t5":
        bb = build_backbone(t5_cfg(hub_root), cpu, progress=False)
        enc = bb.tokenizer(["cola sentence: a b c", "cola sentence: d"], padding=True, return_tensors="pt")
        return bb, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    cfg = clip_cfg(hub_root) if kind == "hf_clip" else openclip_cfg(hub_root)
    bb = build_backbone(cfg, cpu, progress=False)
    return bb, torch.randn(3, 3, tiny_hub.IMAGE_SIZE, tiny_hub.IMAGE_SIZE, generator=g)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["layerwise", "checkpointed"])
@pytest.mark.parametrize("kind", ["synthetic", "hf_clip", "open_clip", "t5"])
def test_computed_weights_give_the_same_features_and_gradients_bitwise(kind, checkpoint, hub_root):
    bb, x = _backbone_and_inputs(kind, hub_root)
    blocks = layer_blocks(bb.module, bb.module.modules())
    assert len(blocks) >= 2  # every kind's transformer layers are found
    pre = bb.pretrained_state()
    g = torch.Generator().manual_seed(1)
    tv = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
    masks = {k: (1.0 + 0.1 * torch.randn(v.shape, generator=g)).requires_grad_(True) for k, v in pre.items()}
    made: list[weakref.ref] = []

    def make(k, grad):
        m = masks[k] if grad else masks[k].detach()
        w = torch.addcmul(pre[k], m, tv[k], value=0.7)
        made.append(weakref.ref(w))
        return w

    results = []
    for computed in (False, True):
        for m in masks.values():
            m.grad = None
        params = ComputedParams(make, pre, checkpoint) if computed else {k: make(k, True) for k in pre}
        outputs: list[weakref.ref] = []  # the output of every linear layer inside the blocks
        linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
        hooks = [m.register_forward_hook(_keep_ref(outputs)) for m in linears]
        feats = bb.features(params, x)
        for h in hooks:
            h.remove()
        if computed:  # autograd holds recipes, not the weights: none of them is alive any more
            del params
            gc.collect()
            assert made and all(r() is None for r in made)
            # checkpointed: no activation inside a layer is kept for the backward (else some are)
            assert len(outputs) >= len(blocks)
            alive = [r() is not None for r in outputs]
            assert not any(alive) if checkpoint else any(alive)
        feats.square().sum().backward()
        results.append((feats.detach(), {k: m.grad for k, m in masks.items()}))
        made.clear()
    (f_all, g_all), (f_comp, g_comp) = results
    assert torch.equal(f_all, f_comp)
    used = [k for k in masks if g_all[k] is not None]  # T5's features run the encoder only
    assert len(used) > len(masks) // 3 and all(g_comp[k] is None for k in masks if k not in used)
    assert all(torch.equal(g_all[k], g_comp[k]) for k in used)
    assert all(p is bb.module.get_parameter(n) for n, p in bb.module.named_parameters())  # originals back
    assert not any("forward" in b.__dict__ for b in blocks)  # the checkpointed forwards are gone


def _keep_ref(out):
    def hook(mod, args, output):
        out.append(weakref.ref(output[0] if isinstance(output, tuple) else output))

    return hook


def test_originals_are_restored_when_the_forward_raises(hub_root):
    bb, x = _backbone_and_inputs("hf_clip", hub_root)
    before = dict(bb.module.named_parameters())
    pre = bb.pretrained_state()
    with pytest.raises(RuntimeError, match="boom"):
        with computed_parameters(bb.module, ComputedParams(lambda k, grad: pre[k].clone(), pre)):
            bb.module.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            bb.module(pixel_values=x)
    assert dict(bb.module.named_parameters()) == before
    with pytest.raises(KeyError, match="not a parameter"):
        with computed_parameters(bb.module, ComputedParams(lambda k, grad: None, ["nope.weight"])):
            pass


@pytest.mark.parametrize("schedule", ["alternate", "joint"])
def test_otmf_memory_levers_equal_the_plain_step_bitwise(run_cfg, monkeypatch, schedule):
    """OTMF's defaults — student_weights=layerwise, checkpoint_blocks (forced on), adam_in_backward (null: on for
    the alternate schedule, off for joint, whose two backwards feed one step) — re-make each weight
    and each layer's activations in the backward and step each mask inside it, instead of keeping
    them: the merged weights, curves and accuracies equal those of the plain step, bit for bit."""
    import otmf_exp.merging.otmf.ot_fusion as ot_fusion

    sizes: list[int] = []  # how many mask tensors each Adam stepped after the backward was given
    in_backward: list[int] = []  # groups of each BackwardAdam (steps inside the backward)
    real_adam, real_backward_adam = ot_fusion.adam, ot_fusion.BackwardAdam

    class CountingBackwardAdam(real_backward_adam):
        def __init__(self, sides, lr, **kw):
            super().__init__(sides, lr, **kw)
            in_backward.append(len(self.groups))

    monkeypatch.setattr(
        ot_fusion, "adam", lambda params, lr: sizes.append(len(params)) or real_adam(params, lr)
    )
    monkeypatch.setattr(ot_fusion, "BackwardAdam", CountingBackwardAdam)
    args = (
        "task_order=[rot90,flip,invert]",
        "method.iterations=6",
        "save_merged=true",
        f"method.schedule={schedule}",
    )
    plain = (
        "method.student_weights=all",
        "method.checkpoint_blocks=false",
        "method.adam_in_backward=false",
        "method.offload=false",
    )
    runs = []
    # offload=false on both: it regroups Adam too (bit-identical as well: tests/test_offload.py)
    for overrides in (plain, ("method.checkpoint_blocks=true", "method.offload=false")):
        sizes.clear()
        in_backward.clear()
        metrics, out = run_cfg(*args, *overrides)
        steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
        runs.append(
            (metrics, load_file(str(out / "merged.safetensors")), steps, list(sizes), list(in_backward))
        )
    (ma, wa, sa, size_a, aib_a), (mb, wb, sb, size_b, aib_b) = runs
    assert size_a and not aib_a  # plain: one Adam per side over all its masks, after the backward
    if schedule == "alternate":  # defaults: one Adam per (side, layer), inside the backward
        assert aib_b and min(aib_b) > 2 and not size_b
    else:  # joint: two backwards feed one step, so the step stays after them
        assert size_b and not aib_b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ma["acc_matrix"] == mb["acc_matrix"]
    for key in ("ot_loss_pre", "ot_loss_post", "select_iteration", "mask_quantiles"):
        assert [s.get(key) for s in sa] == [s.get(key) for s in sb], key


def test_probe_counts_the_activations_of_its_layer_not_the_tensors_that_live_anyway():
    """checkpoint_blocks=auto's probe: the bytes autograd saves inside the first layer that the
    forward made — equal to the same layer's activations in a plain forward (weights, θ₀ and the
    masks excluded: they are alive whether or not the layer is checkpointed)."""
    from otmf_exp.offline.synthetic import SyntheticBackbone

    bb = SyntheticBackbone("tiny", "cpu")
    th0 = bb.pretrained_state()
    masks = {k: torch.ones_like(v, requires_grad=True) for k, v in th0.items()}
    x = torch.randn(4, 3, bb.image_size, bb.image_size)
    probe: list[tuple[int, int]] = []
    params = ComputedParams(
        lambda k, grad: th0[k] * (masks[k] if grad else masks[k].detach()),
        th0,
        checkpoint_blocks=True,
        probe=probe,
        decide=lambda: False,
    )
    bb.features(params, x).sum().backward()
    plain = {k: th0[k] * masks[k] for k in th0}
    weights = {v.untyped_storage().data_ptr() for v in plain.values()}
    layer0, inside, saved = bb.module.vision_model.encoder.layers[0], [False], {}
    handles = [
        layer0.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)),
        layer0.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False)),
    ]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and t.grad_fn is not None and ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            bb.features(plain, x)
    finally:
        for h in handles:
            h.remove()
    layers = len(bb.module.vision_model.encoder.layers)
    assert probe == [(sum(saved.values()), layers)] and sum(saved.values()) > 0
