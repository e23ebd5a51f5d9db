"""Parity rows: ``method=concrete`` (task arithmetic, task-wise AdaMerging) over their full training
against FusionBench 0.2.33's ``ConcreteTaskArithmeticAlgorithmForCLIP`` /
``ConcreteTaskWiseAdaMergingForCLIP``, whose ``run()`` is called unchanged.

Both sides get the zoo's towers, the same batches (ours recorded, served by FusionBench's
``get_shuffled_test_loader_iter``) and the same noise: FusionBench's global RNG is seeded, right after
its model setup, with the seed our mask generator uses; both draw one uniform tensor per parameter in
the same order. Our side runs with ``fusionbench_stale_inner=true`` (FusionBench's order in the meta
step) and FusionBench's entropy (``entropy_eps=1e-8``). Compared: the learned mask logits, the final
(rescaled) mask, the coefficients, the weights. ``_f64``: both sides in float64 (towers, batches, mask
logits, Λ: FusionBench's ``get_task_wise_weights`` patched to create it in float64 while the row runs; its
task-arithmetic merged model read before ``run()``'s final ``.to(float32)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from otmf_exp.parity.adamerging import setup
from otmf_exp.parity.core import F64_WHY, Case

TASKS = ["rot90", "flip", "invert"]
MASK_STEPS, ADAMERGING_STEPS, BATCH = 20, 20, 16
EPS64 = 1e-8  # FusionBench's entropy_loss: −Σ p log(p + 1e-8)


def _concrete(merge: str, key: str, dtype: torch.dtype = torch.float32, eps: float = 0.0):
    def ours(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
        from otmf_exp.merging.concrete.concrete import Concrete, ConcreteConfig

        s = setup(zoo_dir, TASKS, dtype)
        cfg = ConcreteConfig(merge=merge, granularity="task", max_steps=MASK_STEPS, batch_size=BATCH,
                             max_adamerging_steps=ADAMERGING_STEPS, fusionbench_stale_inner=True,
                             entropy_eps=eps)  # fmt: skip
        ctx = s.ctx()
        method = Concrete(cfg, ctx, protocol="joint")
        seen: dict[str, Any] = {}
        final_mask, adamerging = method._final_mask, method._adamerging

        def keep_mask(logits: dict[str, Tensor], gen: torch.Generator) -> dict[str, Tensor]:
            seen["logits"] = {k: v.detach().clone() for k, v in logits.items()}
            seen["mask"] = final_mask(logits, gen)
            return seen["mask"]

        def keep_coef(*a: Any, **k: Any) -> Tensor:
            seen["coef"] = adamerging(*a, **k)
            return seen["coef"]

        method._final_mask, method._adamerging = keep_mask, keep_coef
        state = method.joint(s.pre, [s.task(i, t) for i, t in enumerate(TASKS)])
        s.save_batches(work_dir / f"{key}.batches.safetensors")
        (work_dir / f"{key}.spec.json").write_text(
            json.dumps({"mask_seed": ctx.seed_for("concrete", "mask")})
        )
        out = {f"weights/{k}": s.pre[k] + state.merged[k] for k in s.pre}
        out.update({f"logits/{k}": v for k, v in seen["logits"].items()})
        out.update({f"mask/{k}": v for k, v in seen["mask"].items()})
        if "coef" in seen:
            out["coef"] = seen["coef"].reshape(-1)
        return out

    return ours


REF = "otmf_exp.parity.reference.concrete"
_SET = (
    f"joint, 3 tasks ({', '.join(TASKS)}), {MASK_STEPS} mask steps, batch {BATCH}, fusionbench_stale_inner=true, "
    "entropy_eps=1e-8"
)
_WHY = (
    "same batches, noise and entropy (FusionBench's −Σ p log(p + 1e-8)); float32 rounding that the Adam steps on "
    "the logits amplify (measured: logits 4.9e-5 of 1.8e-2 moved, mask 9.7e-6, weights 1.2e-7); the float64 row "
    "agrees to 1.7e-14 (with entropy_eps=0 it would leave 2.7e-8: the 1e-8 inside the log is semantics)"
)
_WHY_ADA = (
    "same batches, noise and entropy; float32 rounding (FusionBench sums Σ_i τ_i·(λ_i m), we m ⊙ Σ_i λ_i τ_i) fed "
    "through the inner Adam step at base_lr 1 (a step of ±1 in Λ on a near-sign gradient) into every mask "
    "step: measured logits 1.1e-3 (of ~1.7e-2 moved), mask 8.3e-4, coefficients 1.2e-6, weights 4.9e-6; the "
    "float64 row agrees to 1.3e-12 (with entropy_eps=0 it would leave 6.6e-5)"
)
CASES: list[Case] = [
    Case("concrete_ta", "concrete", f"merge=task_arithmetic, {_SET}", "ConcreteTaskArithmeticAlgorithmForCLIP",
         "mask logits, final mask, merged weights", 2e-4, _WHY, _concrete("task_arithmetic", "concrete_ta", eps=EPS64),
         f"{REF}:task_arithmetic"),
    Case("concrete_adamerging", "concrete",
         f"merge=adamerging granularity=task, {_SET}, then {ADAMERGING_STEPS} AdaMerging steps",
         "ConcreteTaskWiseAdaMergingForCLIP", "mask logits, final mask, coefficients, merged weights", 5e-3, _WHY_ADA,
         _concrete("adamerging", "concrete_adamerging", eps=EPS64), f"{REF}:adamerging"),
    Case("concrete_ta_f64", "concrete", f"merge=task_arithmetic, {_SET}, float64",
         "ConcreteTaskArithmeticAlgorithmForCLIP", "mask logits, final mask, merged weights", 1e-10, F64_WHY,
         _concrete("task_arithmetic", "concrete_ta64", torch.float64, EPS64), f"{REF}:task_arithmetic64", "float64"),
    Case("concrete_adamerging_f64", "concrete",
         f"merge=adamerging granularity=task, {_SET}, then {ADAMERGING_STEPS} AdaMerging steps, float64",
         "ConcreteTaskWiseAdaMergingForCLIP", "mask logits, final mask, coefficients, merged weights", 1e-10,
         F64_WHY, _concrete("adamerging", "concrete_adamerging64", torch.float64, EPS64),
         f"{REF}:adamerging64", "float64"),
]  # fmt: skip
