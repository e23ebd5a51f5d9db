"""MagMax (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024).

Element-wise maximum-magnitude selection of task vectors, scaled by λ (``scaling``, default 0.5):

  * joint: θ = θ₀ + λ·maxabs(τ_1..τ_T), streamed (one running max-abs vector in memory);
  * continual (per step, as in OPCM's "MagMax-Ind" baseline): θᵗ = θ₀ + λ·maxabs((θᵗ⁻¹ − θ₀)/λ, τ_t).

Ties in magnitude go to the later task. The continual rule is evaluated without dividing by λ:
for λ ≥ 0, λ·maxabs(τᵐ/λ, τ) = maxabs(τᵐ, λ·τ) entry by entry (same pick, same value), which
stays exact for λ = 0 and keeps the running vector free of a (·/λ)·λ round trip.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict, scale
from otmf_exp.schema import num


@dataclass
class MagMaxConfig:
    name: str = "magmax"
    #: λ, the scale of the max-abs task vector
    scaling: float = num(0.5, ge=0)


def maxabs(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> StateDict:
    """Entry-wise pick of the larger-magnitude value of ``a`` and ``b`` (same shapes); ``|a| = |b|`` → ``b``."""
    return {k: torch.where(b[k].abs() >= a[k].abs(), b[k], a[k]) for k in a}


def maxabs_into(a: StateDict, b: Mapping[str, Tensor]) -> StateDict:
    """:func:`maxabs` written into ``a``'s tensors (same bits): the joint fold owns its running
    vector, so no new weight-sized tensor per task; the temporaries are one tensor's size."""
    for k, x in a.items():
        torch.where(b[k].abs() >= x.abs(), b[k], x, out=x)
    return a


def magmax_step(merged_tv: Mapping[str, Tensor], new_tv: Mapping[str, Tensor], scaling: float) -> StateDict:
    """τᵐ_t = λ·maxabs(τᵐ_{t−1}/λ, τ_t), computed as maxabs(τᵐ_{t−1}, λ·τ_t) (λ ≥ 0)."""
    return maxabs(merged_tv, scale(new_tv, scaling))


class MagMax(MergeMethod):
    name = "magmax"
    Config = MagMaxConfig
    protocols = ("continual", "joint")
    main_coef = "scaling"

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        merged = magmax_step(state.merged, task.task_vector(pretrained), float(self.cfg.scaling))
        return state.advance(merged)

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        running: StateDict | None = None
        n = 0
        with torch.no_grad():
            for task in tasks:
                tv = task.task_vector(pretrained)  # θ_t's own buffers (owned) or new tensors: ours
                running = tv if running is None else maxabs_into(running, tv)
                del tv
                n += 1
            if running is None:
                raise UserError("MagMax joint merge needs at least one task")
            lam = float(self.cfg.scaling)
            return ContinualState(step=n, merged={k: v.mul_(lam) for k, v in running.items()})
