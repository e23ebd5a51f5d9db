"""Weight averaging (Wortsman et al., "Model soups", ICML 2022).

Joint: θ = mean_i θ_i. Continual: running mean θᵗ = ((t−1)·θᵗ⁻¹ + θ_t)/t, which in task-vector
space is τᵐ_t = ((t−1)·τᵐ_{t−1} + τ_t)/t -- the same result, streamed, one model in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_arithmetic.streaming import raw_weights, slices
from otmf_exp.merging.task_vectors import StateDict, add


@dataclass
class AveragingConfig:
    name: str = "averaging"


def running_mean(merged_tv: StateDict, new_tv: StateDict, t: int) -> StateDict:
    """τᵐ_t = ((t−1)·τᵐ_{t−1} + τ_t)/t for step ``t`` ≥ 1."""
    return add(merged_tv, new_tv, (t - 1) / t, 1.0 / t)


def _mean_into(m: Tensor | None, x: Tensor, p: Tensor, subtract: bool, a: float, b: float) -> None:
    """One key of the joint fold, slice by slice: x ← x − p (``subtract``); then x ← x + 0 (first
    task, ``m`` None) or m ← a·m + b·x. No slice outlives the call."""
    for xs, ps, ms in slices(x, p, x if m is None else m):
        xs = xs.sub_(ps) if subtract else xs
        if m is None:
            xs.add_(0.0)
        else:
            ms.mul_(a).add_(xs.mul_(b))


class Averaging(MergeMethod):
    name = "averaging"
    Config = AveragingConfig

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        t = state.step + 1
        tv = task.task_vector(pretrained)
        if task.owned:  # τ_t is this step's own buffer: (1/t)·τ_t + ((t−1)/t)·τᵐ in it
            with torch.no_grad():
                merged = {k: tv[k].mul_(1.0 / t).add_(m * ((t - 1) / t)) for k, m in state.merged.items()}
        else:
            merged = running_mean(state.merged, tv, t)
        return state.advance(merged)

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        """The fold of :meth:`step` with the same arithmetic, in buffers the fold owns and in
        cache-sized slices (:mod:`.streaming`): no τᵐ = 0 to start from (1·τ_1 + 0 is
        τ_1.add_(0.0), the same bits, −0 included), the running mean rescaled in place and
        (t−1)/t·τᵐ + (1/t)·τ_t summed in the other order (IEEE addition commutes)."""
        merged: StateDict | None = None
        t = 0
        with torch.no_grad():
            for task in tasks:
                t += 1
                tv, subtract = raw_weights(task, pretrained)  # θ_t's buffers or τ_t: ours to write
                a, b = (t - 1) / t, 1.0 / t
                for k in pretrained:
                    _mean_into(merged[k] if merged else None, tv[k], pretrained[k], subtract, a, b)
                if merged is None:
                    merged = dict(tv)
                tv.clear()  # τ_t (the task's own, when it cached one) is garbage now: free it
                del tv
        if merged is None:  # no task: τᵐ = 0, as the fold gives
            return self.init(pretrained)
        return ContinualState(step=t, merged=merged)
