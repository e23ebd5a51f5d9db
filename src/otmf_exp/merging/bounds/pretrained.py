"""The pre-trained model θ₀ with zero-shot heads (reference lower bound)."""

from __future__ import annotations

from dataclasses import dataclass

from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict


@dataclass
class PretrainedConfig:
    name: str = "pretrained"


class Pretrained(MergeMethod):
    name = "pretrained"
    Config = PretrainedConfig

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        return state.advance()
