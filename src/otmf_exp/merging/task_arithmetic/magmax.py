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
from otmf_exp.merging.task_arithmetic.streaming import raw_weights, slices
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


def _maxabs_into(r: Tensor | None, x: Tensor, p: Tensor, subtract: bool) -> None:
    """One key of the joint fold, slice by slice: x ← x − p (``subtract``); then, unless this is the
    first task (``r`` None), r ← x where |x| ≥ |r| (:func:`maxabs`'s pick, into ``r``). No slice
    outlives the call."""
    for xs, ps, rs in slices(x, p, x if r is None else r):
        xs = xs.sub_(ps) if subtract else xs
        if r is not None:
            torch.where(xs.abs() >= rs.abs(), xs, rs, out=rs)


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
            for task in tasks:  # in cache-sized slices (:mod:`.streaming`): same ops, same bits
                tv, subtract = raw_weights(task, pretrained)  # θ_t's buffers or τ_t: ours to write
                for k in pretrained:
                    _maxabs_into(running[k] if running else None, tv[k], pretrained[k], subtract)
                if running is None:
                    running = dict(tv)
                tv.clear()  # τ_t (the task's own, when it cached one) is garbage now: free it
                del tv
                n += 1
            if running is None:
                raise UserError("MagMax joint merge needs at least one task")
            lam = float(self.cfg.scaling)
            return ContinualState(step=n, merged={k: v.mul_(lam) for k, v in running.items()})
