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

``mingle_mingle``: ``method=mingle`` (the authors' CLIP defaults, 10 Adam steps per task instead of 50)
against ``run()`` of MINGLE's ``MINGLE`` (``mingle.py``, its ``LoRAMoE`` in ``models/lora_moe.py``):
expert construction with the null-space projection of the task delta, the new gate rows, the
distillation with the soft gradient projection and the covariance pass. Recorded as above (gate seeds,
seed samples, the adaptation's batches and the covariance pass's); compared after every step: the new
gate rows before adaptation, every gate after it, the subspaces U (each column's sign fixed: an
eigensolver's free choice), the merged tower (θ₀: MINGLE drops every delta outside its experts) and
the logits; the experts at the end, and the batches.
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
                out.update(
                    {f"weights/{i + 1}/{k}": v.clone() for k, v in weights.items() if ".mlp." not in k}
                )
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


MINGLE_STEPS = 10


class _LoggedSeeds:
    """A ``SeedSet`` whose ``batch`` calls are recorded (off while the teacher's logits are computed)."""

    def __init__(self, seeds: Any, log: list[Tensor]) -> None:
        self.seeds, self.log, self.on = seeds, log, True

    def __len__(self) -> int:
        return len(self.seeds)

    def __getattr__(self, k: str) -> Any:
        return getattr(self.seeds, k)

    def batch(self, idx: Any) -> Any:
        x, y = self.seeds.batch(idx)
        if self.on:
            self.log.append(x)
        return x, y


def _mingle(dtype: torch.dtype):
    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
        from otmf_exp.merging.lora_moe import CovarianceRecorder
        from otmf_exp.merging.mingle import mingle as mg
        from otmf_exp.merging.mingle import mingle_tta
        from otmf_exp.parity.reference.authors_mingle import sign_fixed

        s = setup(zoo_dir, TASKS, dtype)
        f64 = dtype == torch.float64
        opts = {"max_steps": MINGLE_STEPS, **({"svd_dtype": "float64"} if f64 else {})}
        cfg = OmegaConf.merge(OmegaConf.structured(mg.MINGLEConfig), opts)
        ctx = s.ctx()
        m = mg.MINGLE(cfg, ctx, "continual")
        sites = [x.name for x in m.sites()]
        out: dict[str, Tensor] = {}
        seeds: dict[str, Tensor] = {}
        served: dict[str, list[Tensor]] = {}
        real_seeds = mg.sample_seeds

        def sample_seeds(data: Any, *a: Any, **k: Any) -> Any:
            ss = real_seeds(data, *a, **k)
            seeds[data.name] = torch.stack(ss.inputs)
            served[data.name] = []
            return _LoggedSeeds(ss, served[data.name])

        class Recorded(mingle_tta.Adaptation):
            def run(self) -> list[float]:
                for n, e in self.experts.items():
                    out[f"init/{self.step}/{n}/w"], out[f"init/{self.step}/{n}/b"] = (
                        e.new_w.clone(),
                        e.new_b.clone(),
                    )
                return super().run()

            def _teacher_vision(self) -> Tensor:
                self.seeds.on = False
                try:
                    return super()._teacher_vision()
                finally:
                    self.seeds.on = True

        class Float64Covariance(CovarianceRecorder):
            def add(self, name: str, x: Tensor) -> None:  # Σ x·xᵀ without the float32 cast
                f = x.detach().reshape(-1, x.shape[-1])
                self.sigma[name] = f.T @ f if name not in self.sigma else self.sigma[name] + f.T @ f

        patches = [
            mock.patch.object(mg, "sample_seeds", sample_seeds),
            mock.patch.object(mg, "Adaptation", Recorded),
        ]
        if f64:
            patches.append(mock.patch.object(mingle_tta, "CovarianceRecorder", Float64Covariance))
        evals = _eval_inputs(s)
        state = m.init(s.pre)
        with ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            for i, t in enumerate(TASKS):
                state = m.step(state, s.task(i, t), s.pre)
                for n in sites:
                    out[f"gate/{i + 1}/{n}/w"] = state.extra[f"{n}/gate_w"]
                    out[f"gate/{i + 1}/{n}/b"] = state.extra[f"{n}/gate_b"]
                    out[f"subspace/{i + 1}/{n}"] = sign_fixed(state.extra[f"{n}/U"])
                weights = m.merged(state, s.pre)
                out.update({f"weights/{i + 1}/{k}": v.clone() for k, v in weights.items()})
                with torch.no_grad(), m.forward_context(state):
                    for u in TASKS[: i + 1]:
                        out[f"logits/{i + 1}/{u}"] = s.bb.logits(weights, s.heads[u], evals[u])
        r = m.options().lora_r
        for x in m.sites():
            a, b = state.extra[f"{x.name}/A"], state.extra[f"{x.name}/B"]
            rr = min(r, x.in_features, x.out_features)
            for e in range(len(TASKS)):
                out[f"expert/{x.name}/{e}"] = b[:, e * rr : (e + 1) * rr] @ a[e * rr : (e + 1) * rr]
        for t in TASKS:
            out.update({f"batch/{t}/{j:04d}": x for j, x in enumerate(served[t])})
        gate = [ctx.seed_for("mingle", t, "gate") for t in range(1, len(TASKS) + 1)]
        torch.save(
            {"tasks": TASKS, "steps": MINGLE_STEPS, "sites": sites, "gate_seeds": gate, "seeds": seeds,
             "served": served, "eval": evals, "keys": list(s.pre)},
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
_WEMOE_CMP = (
    "routers before/after adaptation and merged tower every step, logits every step, experts, batches"
)
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

_MINGLE_SET = (
    f"continual, 3 tasks ({', '.join(TASKS)}), the authors' CLIP defaults (lora_layer attn+mlp, r 64, lr 1e-4, "
    f"batch 16, 5 seed samples per class, k 3, γ 1, β 0.99, batch routing) but {MINGLE_STEPS} Adam steps per task"
)
_MINGLE_REF = "MINGLE fusion_bench/method/mingle/mingle.py MINGLE + fusion_bench/models/lora_moe.py LoRAMoE"
_MINGLE_CMP = "new gate rows before/after adaptation, gates, subspaces U, merged tower and logits every step, experts, batches"
_MINGLE_WHY = (
    "same gate seeds, seed samples and batches: new rows' init equal (0), gates after adaptation 2.5e-8 (moved "
    "~1e-3), experts 2.5e-7 (their full-matrix SVDs against our reduced ones), subspaces 1.9e-6 (their float32 "
    "SVD of Σ against our float64 top-k eigenvectors), logits (|z| ~23) 1.3e-5: float32 rounding of W₀ + Σ g_e "
    "B_e A_e against x·W₀ᵀ + Σ g_e (x·A_eᵀ)·B_eᵀ, through 3 × 10 Adam steps; the float64 row agrees to 4.3e-12"
)
MINGLE = Case("mingle_mingle", "mingle", _MINGLE_SET, _MINGLE_REF, _MINGLE_CMP, 3e-5, _MINGLE_WHY,
              _mingle(torch.float32), f"{REF}:mingle")  # fmt: skip
CASES += [
    MINGLE,
    Case("mingle_mingle_f64", "mingle", _MINGLE_SET + ", svd_dtype float64", _MINGLE_REF, _MINGLE_CMP, 1e-10,
         F64_WHY + " (our covariance without its float32 cast, MINGLE's gates/LoRA built in the default dtype "
         "float64); the worst tensor, 4.3e-12, is a subspace U: our LOBPCG top-k eigenvectors (to its 1e-12 "
         "tolerance, from a fixed start) against their SVD",
         _mingle(torch.float64), f"{REF}:mingle_f64", "float64"),
]  # fmt: skip
