"""Parity rows (``make parity-authors``): our AdaMerging presets against the code of the papers that ran them.

``adamerging_otmf_task`` / ``_layer`` against the OTMF authors' sequential scripts
(``scripts/clip_task_wise_adamerging_sequential.py``, ``scripts/clip_layer_wise_adamerging_sequential.py``),
``c_adamerging`` against MINGLE's ``ContinualLayerWiseAdaMerging``: 4 digits8 tasks, the references'
step counts (100 / 50 Adam steps per task). Our side runs first, records the batches each of its
streams drew and writes the case (options, batch plans, seed samples) to ``work_dir/case.pt``; the
reference side feeds exactly those batches to the reference's own loaders. Compared: λ after every
Adam step, τᵐ after every step, the final merged weights and the batches each stream served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from otmf_exp.parity.core import Case
from otmf_exp.parity.reference.authors_adamerging import named  # one layout, both sides

TASK = {"init": 0.2, "lr": 0.01, "clamp": "merge", "stream": "per_task_cycle", "backward": "summed"}
LAYER = {"granularity": "layer", "batch_size": 4, "clamp": "merge", "stream": "per_step_cycle",
         "backward": "summed"}  # fmt: skip
CADA = {"continual": "current_only", "granularity": "layer", "lr": 1e-4, "clamp": "merge",
        "seed_samples": 5, "entropy_eps": 1e-8}  # fmt: skip
STEPS = {"otmf_task": 100, "otmf_layer": 100, "mingle": 50}  # the scripts hard-code 100, MINGLE's yaml 50
N_TASKS = 4


def _run(opts: dict[str, Any], steps: int) -> dict[str, Any]:
    """``method=adamerging`` with ``opts`` on digits8's first tasks: trace, per-step τᵐ, batches drawn."""
    from otmf_exp.data.digits import build_task
    from otmf_exp.merging.adamerging import adamerging as am
    from otmf_exp.merging.adamerging.adamerging import AdaMerging, AdaMergingConfig
    from otmf_exp.merging.base import MethodContext, TaskInput
    from otmf_exp.models.tiny import TinyBackbone
    from otmf_exp.offline.zoo import DigitsZoo, suite_tasks

    bb = TinyBackbone(DigitsZoo(progress=False))
    pre = bb.pretrained_state()
    order = suite_tasks()[:N_TASKS]
    cfg = OmegaConf.merge(OmegaConf.structured(AdaMergingConfig), {"steps": steps, **opts})
    AdaMerging.validate(cfg)
    ctx = MethodContext(bb, torch.device("cpu"), torch.Generator(), progress=False, seed=0)
    m = AdaMerging(cfg, ctx)
    m.trace = []
    consumed: list[tuple[str, Tensor]] = []
    pools: dict[str, Any] = {}
    real = am.batch_streams

    def logged(cfg_: Any, ctx_: Any, datas: Any, key: Any, skips: Any) -> list:
        for d in datas:
            pools[d.name] = d

        def wrap(name: str, it: Any) -> Any:
            for b in it:
                consumed.append((name, b["inputs"]))
                yield b

        return [wrap(d.name, s) for d, s in zip(datas, real(cfg_, ctx_, datas, key, skips), strict=True)]

    am.batch_streams = logged
    try:
        state, prev, per_step = m.init(pre), None, []
        for i, name in enumerate(order):
            data = build_task(name)
            t = TaskInput(name, i, bb.load_finetuned(name), bb.zero_shot_head(data), data, previous_data=prev)
            state, prev = m.step(state, t, pre), data
            per_step.append({k: v.detach().clone() for k, v in state.merged.items()})
    finally:
        am.batch_streams = real
    merged = {k: pre[k] + state.merged[k] for k in pre}
    return dict(trace=m.trace, per_step=per_step, merged=merged, consumed=consumed, cfg=cfg, ctx=ctx,
                pools=pools, order=order, keys=list(pre))  # fmt: skip


def plans(cfg: Any, ctx: Any, pools: dict[str, Any], order: list[str]) -> dict:
    """The batches the reference's own loaders are fed: the first pass each ``cycle`` replays (the
    OTMF scripts), or the epochs of a reshuffling loader and the seed samples (MINGLE)."""

    def first_pass(d: Any, seed: int) -> list[Tensor]:
        return [b["inputs"] for b in d.loader("test", cfg.batch_size, shuffle=True, seed=seed)]

    if cfg.stream == "per_task_cycle":
        return {n: first_pass(pools[n], ctx.seed_for("adamerging", "stream", n)) for n in order}
    if cfg.stream == "per_step_cycle":  # step t (1-based, t >= 2): pool 0 = current, pool 1 = previous
        return {
            f"{t}/{order[t - 1 - j]}": first_pass(pools[order[t - 1 - j]], ctx.seed_for("adamerging", t, j))
            for t in range(2, len(order) + 1)
            for j in (0, 1)
        }
    out = {}
    for t, n in enumerate(order, start=1):
        d, seed = pools[n], ctx.seed_for("adamerging", t, 0)
        per_epoch = -(-d.size("test") // cfg.batch_size)
        epochs = [first_pass(d, seed + e) for e in range(-(-cfg.steps // per_epoch) + 1)]
        out[n] = {"epochs": epochs, "seeds": [b["inputs"] for b in d.loader("test", 10**6)]}
    return out


def _ours(ref: str, opts: dict[str, Any]):
    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
        r = _run(opts, STEPS[ref])
        torch.save(
            {"reference": ref, "options": dict(opts), "steps": STEPS[ref], "order": r["order"],
             "mergeable": r["keys"], "plans": plans(r["cfg"], r["ctx"], r["pools"], r["order"])},
            work_dir / "case.pt",
        )  # fmt: skip
        trace = r["trace"]
        if opts.get("clamp") == "merge":  # the λ that was merged (each reference records clamp(λ, 0, 1))
            trace = [c.clamp(0, 1) for c in trace]
        first = 2 if ref.startswith("otmf") else 1  # the OTMF scripts' first fusion is our step 2
        return named(trace, r["per_step"][first - 1 :], first, r["merged"], r["consumed"], r["keys"])

    return ours


REF = "otmf_exp.parity.reference.authors_adamerging"
_OTMF = "OTMF scripts/clip_{}_adamerging_sequential.py"
_MINGLE = "MINGLE fusion_bench/method/mingle/c_adamerging.py ContinualLayerWiseAdaMerging"
_COMPARED = "λ every Adam step, τᵐ every step, merged weights, batches served"
_SET = "continual, 4 tasks, {}"
_WHY_TASK = "same batches; float32 rounding of one summed entropy's backward, over 3 × 100 Adam steps"
_WHY_LAYER = (
    "same batches; float32 rounding over 3 × 100 Adam steps; λ of the two k_proj.bias tensors left out (true "
    "gradient 0: Adam turns float noise into ±lr steps on both sides, 6.7e-4 apart; the merged output does "
    "not depend on them)"
)
_WHY_MINGLE = "same batches and seed samples; the same float32 operations (measured bit-identical λ)"
CASES: list[Case] = [
    Case("adamerging_otmf_task", "adamerging_otmf_task", _SET.format("init 0.2, lr 0.01, clamp merge"),
         _OTMF.format("task_wise"), _COMPARED, 1e-5, _WHY_TASK, _ours("otmf_task", TASK), f"{REF}:otmf_task"),
    Case("adamerging_otmf_task_binds", "adamerging_otmf_task",
         _SET.format("init 0.9, lr 0.02: the clamp binds (λ reaches 1)"), _OTMF.format("task_wise"),
         _COMPARED, 1e-5, _WHY_TASK, _ours("otmf_task", {**TASK, "init": 0.9, "lr": 0.02}),
         f"{REF}:otmf_task"),
    Case("adamerging_otmf_layer", "adamerging_otmf_layer", _SET.format("layer, batch 4, per_step_cycle"),
         _OTMF.format("layer_wise"), _COMPARED, 1e-5, _WHY_LAYER, _ours("otmf_layer", LAYER),
         f"{REF}:otmf_layer"),
    Case("c_adamerging_mingle", "c_adamerging", _SET.format("current_only, layer, lr 1e-4, 5 seed samples"),
         _MINGLE, _COMPARED, 1e-6, _WHY_MINGLE, _ours("mingle", CADA), f"{REF}:c_adamerging"),
    Case("c_adamerging_mingle_binds", "c_adamerging", _SET.format("init 0.9, lr 0.05: λ reaches 0 and 1"),
         _MINGLE, _COMPARED, 1e-6, _WHY_MINGLE, _ours("mingle", {**CADA, "init": 0.9, "lr": 0.05}),
         f"{REF}:c_adamerging"),
]  # fmt: skip
