"""Parity row: joint ``method=wemoe`` against FusionBench 0.2.33's ``CLIPWeightEnsemblingMoEAlgorithm``:
router initialisation, the whole test-time adaptation loop and the final per-sample routing.

FusionBench's ``run()`` is called unchanged but for plumbing: its routers draw N(0, 0.01²) from the
global RNG, which is set before each draw of a gate's ``init_weight`` to the state our block's router
generator has for it (the init code and draws stay FusionBench's); its ``task_arithmetic_merge`` (whose strict
``state_dict_add`` refuses Parameter + Tensor in 0.2.33) is replaced by the same sum θ₀ + λ·Σ τ_i;
batches are those our side recorded. Compared: every router tensor before and after adaptation, the
routing mode of the returned model's MoE layers and the logits of 32 test images per task through it.

``wemoe_routing`` (+ ``_f64``): the routed model alone, without adaptation, as FusionBench's
``construct_moe_model`` builds it for router depths 0, 1 and 2, every router redrawn at order 1 (the
same tensors loaded on both sides), batch and per-sample routing: the logits of 16 test images per task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import Tensor

from otmf_exp.parity.adamerging import setup
from otmf_exp.parity.core import F64_WHY, Case

TASKS = ["rot90", "flip", "invert"]
STEPS, BATCH, N_EVAL = 10, 16, 32


def _joint(dtype: torch.dtype):
    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
        return _ours(zoo_dir, work_dir, dtype)

    return ours


def _ours(zoo_dir: Path, work_dir: Path, dtype: torch.dtype) -> dict[str, Tensor]:
    from otmf_exp.merging.wemoe.wemoe import WEMoE
    from otmf_exp.merging.wemoe.wemoe_config import WEMoEConfig

    s = setup(zoo_dir, TASKS, dtype)
    cfg = OmegaConf.structured(WEMoEConfig(max_steps=STEPS, batch_size=BATCH, eval_batch_reduce=True))
    ctx = s.ctx()
    m = WEMoE(cfg, ctx, "joint")
    out: dict[str, Tensor] = {}
    adapt = m._adapt

    def keep_init(extra: dict, *a: Any, **k: Any) -> None:
        out.update({f"init/{n}": v.clone() for n, v in extra.items() if "/router." in n})
        adapt(extra, *a, **k)

    m._adapt = keep_init
    state = m.joint(s.pre, [s.task(i, t) for i, t in enumerate(TASKS)])
    out.update({f"router/{n}": v for n, v in state.extra.items() if "/router." in n})
    out["batch_reduce"] = torch.tensor([float(cfg.eval_batch_reduce)] * len(m.blocks()))
    s.save_batches(work_dir / "wemoe.batches.safetensors")
    seeds = [
        (ctx.seed_for("wemoe", "hidden", b.name), ctx.seed_for("wemoe", "joint", b.name)) for b in m.blocks()
    ]
    evals = {t: s.datas[t].data.splits["test"][0][:N_EVAL].contiguous() for t in TASKS}
    save_file({f"{t}/x": x for t, x in evals.items()}, str(work_dir / "wemoe.eval.safetensors"))
    spec = {
        "router_seeds": seeds,
        "steps": STEPS,
        "batch_size": BATCH,
        "blocks": [b.name for b in m.blocks()],
    }
    (work_dir / "wemoe.spec.json").write_text(json.dumps(spec))
    weights = m.merged(state, s.pre)
    with torch.no_grad(), m.forward_context(state):
        for t, x in evals.items():
            out[f"logits/{t}"] = s.bb.logits(weights, s.heads[t], x)
    return out


ROUTING = [(d, br) for d in (0, 1, 2) for br in (True, False)]


def _routing(dtype: torch.dtype):
    """Joint WEMoE without adaptation, every router redrawn at order 1 (weights N(0, 1/fan_in), biases and
    depth-0 weights N(0, 0.5²): routing that differs across experts and samples), for router depths 0/1/2
    and batch / per-sample routing; the logits of 16 test images of every task. The routers go to
    ``work_dir/wemoe_routing.safetensors`` for the reference side."""

    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
        from otmf_exp.merging.wemoe.wemoe import WEMoE
        from otmf_exp.merging.wemoe.wemoe_config import WEMoEConfig

        s = setup(zoo_dir, TASKS, dtype)
        gen = torch.Generator().manual_seed(0)
        evals = {t: s.datas[t].data.splits["test"][0][:16].contiguous() for t in TASKS}
        out: dict[str, Tensor] = {}
        for depth, br in ROUTING:
            cfg = OmegaConf.structured(
                WEMoEConfig(max_steps=0, router_hidden_layers=depth, eval_batch_reduce=br)
            )
            m = WEMoE(cfg, s.ctx(), "joint")
            state = m.joint(s.pre, [s.task(i, t) for i, t in enumerate(TASKS)])
            for k, v in state.extra.items():
                if "/router." in k:
                    if f"router/d{depth}/{k}" not in out:  # one draw per depth, shared by both routing modes
                        std = 1.0 / v.shape[1] ** 0.5 if v.dim() == 2 else 0.5
                        out[f"router/d{depth}/{k}"] = (
                            std * torch.randn(v.shape, generator=gen, dtype=torch.float64)
                        ).to(dtype)
                    state.extra[k] = out[f"router/d{depth}/{k}"]
            weights = m.merged(state, s.pre)
            with torch.no_grad(), m.forward_context(state):
                for t in TASKS:
                    out[f"logits/d{depth}_br{int(br)}/{t}"] = s.bb.logits(weights, s.heads[t], evals[t])
        save_file(
            {k: v for k, v in out.items() if k.startswith("router/")},
            str(work_dir / "wemoe_routing.safetensors"),
        )
        save_file({f"{t}/x": x for t, x in evals.items()}, str(work_dir / "wemoe.eval.safetensors"))
        return out

    return ours


_WHY = (
    "same router RNG states, batches and entropy (−Σ p log(p + 1e-8)): init equal (0), routers after 10 steps "
    "7.6e-6 (moved ~1e-3), logits 1.1e-5 (|z| ~22; float32 rounding of the expert sums, through Adam); the float64 "
    "row agrees to 2.0e-14. FusionBench's run() sets batch_reduce=False on the wrapper only: every MoE layer of the "
    "model it returns still routes per batch (compared as batch_reduce), so ours runs with eval_batch_reduce=true here"
)
_WHY_ROUTING = (
    "the same redrawn routers (equal, 0); logits (|z| ~23; batch and per-sample routing 2.7 apart) 9.1e-6: float32 "
    "rounding of FusionBench's merged W₀ + Σ r_i τ_i against our x·W₀ᵀ + Σ r_i·(x·τ_iᵀ); the float64 row agrees "
    "to 1.8e-14"
)
CASES: list[Case] = [
    Case("wemoe", "wemoe", f"joint, 3 tasks ({', '.join(TASKS)}), router depth 2, init_lambda 0.3, {STEPS} Adam "
         f"steps lr 1e-4, batch {BATCH}, batch_reduce in adaptation and after (eval_batch_reduce=true)",
         "CLIPWeightEnsemblingMoEAlgorithm", "router init, routers after adaptation, eval routing mode, logits",
         5e-5, _WHY, _joint(torch.float32), "otmf_exp.parity.reference.wemoe:joint"),
    Case("wemoe_f64", "wemoe", f"joint, 3 tasks ({', '.join(TASKS)}), router depth 2, init_lambda 0.3, {STEPS} "
         f"Adam steps lr 1e-4, batch {BATCH}, batch_reduce in adaptation and after (eval_batch_reduce=true)",
         "CLIPWeightEnsemblingMoEAlgorithm", "router init, routers after adaptation, eval routing mode, logits",
         1e-10, F64_WHY + " (FusionBench's gates built in the default dtype float64; our entropy_loss follows the "
         "logits' float64: with its former float32 cast this row leaves 1.9e-8)", _joint(torch.float64),
         "otmf_exp.parity.reference.wemoe:joint_f64", "float64"),
    Case("wemoe_routing", "wemoe", "joint, 3 tasks, no adaptation, routers redrawn at order 1, router depth 0/1/2 "
         "× batch / per-sample routing (eval_batch_reduce)", "CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model "
         "(WeightEnsemblingMoE)", "routers, logits of 16 test images per task", 2e-5, _WHY_ROUTING,
         _routing(torch.float32), "otmf_exp.parity.reference.wemoe:routing"),
    Case("wemoe_routing_f64", "wemoe", "joint, 3 tasks, no adaptation, routers redrawn at order 1, router depth "
         "0/1/2 × batch / per-sample routing (eval_batch_reduce)", "CLIPWeightEnsemblingMoEAlgorithm."
         "construct_moe_model (WeightEnsemblingMoE)", "routers, logits of 16 test images per task", 1e-10,
         F64_WHY + " (FusionBench's gates built in the default dtype float64)", _routing(torch.float64),
         "otmf_exp.parity.reference.wemoe:routing_f64", "float64"),
]  # fmt: skip
