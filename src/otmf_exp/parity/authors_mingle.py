"""Parity rows (``make parity-authors``): continual LoRA-WEMoE and ``mingle`` against MINGLE's own code.

``wemoe_continual_mingle``: ``method=wemoe`` (continual: LoRA experts, rank 64 then 16, depth-1 routers,
attention task-arithmetic merged, batch routing) against MINGLE's ``ContinualWEMoE`` (``c_wemoe.py``:
``task_arithmetic_merge_attn``, ``LoRAMLP``, ``SkipTVWEMoE``, ``append_expert_and_rebuild_gate`` and
its entropy test-time adaptation), its ``run()`` called on 3 digits8 tasks with a few Adam steps per
task. Our side runs first and writes what it drew to ``work_dir/case.pt``: the router seed of every
new row, the seed samples and the batches served; the reference side feeds exactly those to MINGLE's
own loop (:mod:`otmf_exp.parity.reference.authors_mingle`). Compared after every step: the routers
before and after adaptation, the merged tower outside the MLPs (attention θ₀ + λ·Σ τ, the rest θ₀),
the logits of 16 fixed test images of every task seen so far; the LoRA experts (B_e A_e) at the end,
and the batches served.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from omegaconf import OmegaConf
from torch import Tensor

from otmf_exp.parity.adamerging import setup
from otmf_exp.parity.core import F64_WHY, Case

TASKS = ["rot90", "flip", "invert"]
WEMOE_STEPS, N_EVAL = 10, 16


def _entropy64(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """``entropy_loss`` without its float32 cast (the float64 row: the same formula in float64)."""
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p + eps)).sum(-1).mean()


def _eval_inputs(s: Any) -> dict[str, Tensor]:
    return {t: s.datas[t].data.splits["test"][0][:N_EVAL].contiguous() for t in TASKS}


def _wemoe(dtype: torch.dtype):
    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
        from otmf_exp.merging.wemoe import wemoe as wm
        from otmf_exp.merging.wemoe.wemoe_config import WEMoEConfig

        s = setup(zoo_dir, TASKS, dtype)
        cfg = OmegaConf.structured(WEMoEConfig(max_steps=WEMOE_STEPS))
        ctx = s.ctx()
        m = wm.WEMoE(cfg, ctx, "continual")
        blocks = [b.name for b in m.blocks()]
        out: dict[str, Tensor] = {}
        seeds: dict[str, Tensor] = {}
        served: dict[str, list[Tensor]] = {}
        step = [0]
        real_seeds, real_stream, real_adapt = wm.sample_seeds, m._stream, m._adapt

        def sample_seeds(data: Any, *a: Any, **k: Any) -> Any:
            ss = real_seeds(data, *a, **k)
            seeds[data.name] = torch.stack(ss.inputs)
            return ss

        def stream(data: Any, key: tuple) -> Any:
            served[data.name] = []
            for x in real_stream(data, key):
                served[data.name].append(x)
                yield x

        def adapt(extra: dict, *a: Any, **k: Any) -> None:
            out.update({f"init/{step[0]}/{n}": v.clone() for n, v in extra.items() if "/router." in n})
            real_adapt(extra, *a, **k)

        m._stream, m._adapt = stream, adapt
        patches = [mock.patch.object(wm, "sample_seeds", sample_seeds)]
        if dtype == torch.float64:
            patches.append(mock.patch.object(wm, "entropy_loss", _entropy64))
        evals = _eval_inputs(s)
        state = m.init(s.pre)
        with ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            for i, t in enumerate(TASKS):
                step[0] = i + 1
                state = m.step(state, s.task(i, t), s.pre)
                out.update({f"router/{i + 1}/{n}": v for n, v in state.extra.items() if "/router." in n})
                weights = m.merged(state, s.pre)
                out.update({f"weights/{i + 1}/{k}": v.clone() for k, v in weights.items() if ".mlp." not in k})
                with torch.no_grad(), m.forward_context(state):
                    for u in TASKS[: i + 1]:
                        out[f"logits/{i + 1}/{u}"] = s.bb.logits(weights, s.heads[u], evals[u])
        ranks = state.scalars["wemoe_ranks"]
        for blk in m.blocks():
            for site in blk.sites:
                a, b = state.extra[f"{site.name}/A"], state.extra[f"{site.name}/B"]
                lo = 0
                for e, r in enumerate(ranks):
                    out[f"expert/{site.name}/{e}"] = b[:, lo : lo + r] @ a[lo : lo + r]
                    lo += r
        for t in TASKS:
            out.update({f"batch/{t}/{j:04d}": x for j, x in enumerate(served[t])})
        torch.save(
            {"tasks": TASKS, "steps": WEMOE_STEPS, "blocks": blocks,
             "router_seeds": [[ctx.seed_for("wemoe", t, b) for b in blocks] for t in range(1, len(TASKS) + 1)],
             "seeds": seeds, "served": served, "eval": evals,
             "keys": [k[len("weights/1/") :] for k in out if k.startswith("weights/1/")]},
            work_dir / "case.pt",
        )  # fmt: skip
        return out

    return ours


REF = "otmf_exp.parity.reference.authors_mingle"
_WEMOE_SET = (
    f"continual, 3 tasks ({', '.join(TASKS)}), LoRA experts rank 64 then 16, depth-1 routers, init_lambda 0.3, "
    f"attention merged, {WEMOE_STEPS} Adam steps lr 1e-4 on 5 seed samples per class, batch 16, batch routing"
)
_WEMOE_REF = "MINGLE fusion_bench/method/mingle/c_wemoe.py ContinualWEMoE"
_WEMOE_CMP = "routers before/after adaptation and merged tower every step, logits every step, experts, batches"
_WEMOE_WHY = (
    "same router seeds, seed samples and batches: router init equal (0), routers after adaptation 3.0e-8 (moved "
    "~1e-3), experts 1.9e-8, merged attention 3.0e-8, logits (|z| ~23) 8.6e-6: float32 rounding of MINGLE's "
    "merged W₀ + Σ r_e B_e A_e against our x·W₀ᵀ + Σ r_e (x·A_eᵀ)·B_eᵀ, through 3 × 10 Adam steps; the "
    "float64 row agrees to 1.4e-14"
)
WEMOE = Case("wemoe_continual_mingle", "wemoe", _WEMOE_SET, _WEMOE_REF, _WEMOE_CMP, 2e-5, _WEMOE_WHY,
             _wemoe(torch.float32), f"{REF}:c_wemoe")  # fmt: skip
CASES: list[Case] = [
    WEMOE,
    Case("wemoe_continual_mingle_f64", "wemoe", _WEMOE_SET, _WEMOE_REF, _WEMOE_CMP, 1e-10,
         F64_WHY + " (our entropy without its float32 cast, MINGLE's gates built in the default dtype float64)",
         _wemoe(torch.float64), f"{REF}:c_wemoe_f64", "float64"),
]  # fmt: skip
