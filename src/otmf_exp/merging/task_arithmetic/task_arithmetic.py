"""Task Arithmetic (Ilharco et al., ICLR 2023): θ = θ₀ + λ·Σ_i τ_i.

Continual: θᵗ = θᵗ⁻¹ + λ·τ_t -- the same result as the joint rule, streamed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict, add
from otmf_exp.schema import num


@dataclass
class TaskArithmeticConfig:
    name: str = "task_arithmetic"
    scaling: float = num(0.3, ge=0)


def task_arithmetic_step(merged_tv: StateDict, new_tv: StateDict, scaling: float) -> StateDict:
    """τᵐ_t = τᵐ_{t−1} + λ·τ_t."""
    return add(merged_tv, new_tv, 1.0, scaling)


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    Config = TaskArithmeticConfig
    main_coef = "scaling"

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        tv, lam = task.task_vector(pretrained), self.cfg.scaling
        if task.owned:  # τ_t is this step's own buffer: λ·τ_t + τᵐ in it, no new weight-sized tensor
            with torch.no_grad():
                merged = {k: tv[k].mul_(lam).add_(m) for k, m in state.merged.items()}
        else:
            merged = task_arithmetic_step(state.merged, tv, lam)
        return state.advance(merged)
