"""Individual fine-tuned models: task i is evaluated with θ_i (reference upper bound).

Not a merge: the runner evaluates every task with its own fine-tuned weights (it computes these
accuracies for every run anyway, for normalized ACC), so the accuracy matrix row j holds
individual_i for i ≤ j. The carried state is θ_t's task vector only, for ``save_merged``.
"""

from __future__ import annotations

from dataclasses import dataclass

from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict


@dataclass
class IndividualConfig:
    name: str = "individual"


class Individual(MergeMethod):
    name = "individual"
    Config = IndividualConfig
    evaluates_individually = True

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        return state.advance(task.task_vector(pretrained))
