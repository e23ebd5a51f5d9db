"""The ``tiny`` backbone kind: the offline digits suite's CLIP image tower, weights and heads from the zoo."""

from __future__ import annotations

import torch
from torch import Tensor

from otmf_exp.data.base import TaskData
from otmf_exp.models.clip_vision import ClipVisionBackbone


class TinyBackbone(ClipVisionBackbone):
    """The offline suite's backbone: weights and heads come from the zoo (each task's built on first use)."""

    def __init__(self, zoo, device: torch.device | str = "cpu") -> None:
        self.zoo = zoo
        super().__init__(zoo.pretrained_module(), device, str(zoo.pretrained_path))
        self.name = "tiny"

    def load_finetuned(self, task: str):
        sd, source = self.zoo.finetuned_state(task)
        return self.validate_finetuned(task, sd, source)

    def zero_shot_head(self, task: TaskData) -> Tensor:
        head = self.zoo.head(task.name)
        return self.checked_head(head, task, str(self.zoo.task_path(task.name))).to(self.device)
