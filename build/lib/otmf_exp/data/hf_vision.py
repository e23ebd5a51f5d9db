"""Image-classification tasks from the HuggingFace hub (``task_seq.kind: hf_vision``).

Datasets, columns and splits come from :mod:`otmf_exp.data.vision_tasks`. A split is loaded on
first use (evaluating the test split never downloads train). Images are turned into pixel
tensors by the backbone's own preprocessing (``backbone.image_transform``: HF
``CLIPImageProcessor`` or open_clip's eval transform), set once per split with
``Dataset.with_transform`` and run per batch in the DataLoader workers. Pixel tensors are not
written to the datasets cache on purpose: at 224² they take ~600 KB per image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from otmf_exp.data.hf_loading import HubSplitsTaskData, as_long, split_view
from otmf_exp.data.vision_tasks import VISION_TASKS, VisionTask, classnames
from otmf_exp.errors import UserError
from otmf_exp.hub import resolve


class ImageBatch:
    """Picklable ``with_transform`` function: raw batch -> ``{"pixel_values", "label"}``."""

    def __init__(self, image_transform: Callable[[list[Any]], Tensor], image: str, label: str) -> None:
        self.image_transform, self.image, self.label = image_transform, image, label

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        return {"pixel_values": self.image_transform(batch[self.image]), "label": batch[self.label]}


def _collate(batch: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": torch.as_tensor(batch["pixel_values"]), "labels": as_long(batch["label"])}


class HFVisionTaskData(HubSplitsTaskData):
    """One image task: lazily loaded splits, preprocessed per batch for a given backbone."""

    _collate = staticmethod(_collate)

    def __init__(
        self,
        name: str,
        spec: VisionTask,
        local_dir: str | None,
        image_transform: Callable,
        num_workers: int = 0,
        pin_memory: bool = False,
        names: list[str] | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.classnames = list(names) if names is not None else classnames(name)
        self.templates = list(spec.templates)
        self.local_dir = local_dir
        self.image_transform = image_transform
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._hub: dict[str, Any] = {}
        self._splits: dict[str, Any] = {}

    def _load_hub(self, hub_split: str) -> Any:
        if hub_split not in self._hub:
            ds = resolve.load_split(self.spec.dataset, self.spec.config, hub_split, self.local_dir)
            renames = {a: b for a, b in self.spec.rename.items() if a in ds.column_names}
            if renames:
                ds = ds.rename_columns(renames)
            self._hub[hub_split] = ds
        return self._hub[hub_split]

    def _columns(self, ds: Any) -> tuple[str, str]:
        if self.spec.image not in ds.column_names:
            raise UserError(
                f"task {self.name!r}: dataset {self.spec.dataset!r} has no image column "
                f"{self.spec.image!r} (columns: {ds.column_names})"
            )
        label = next((c for c in self.spec.label if c in ds.column_names), None)
        if label is None:
            raise UserError(
                f"task {self.name!r}: dataset {self.spec.dataset!r} has none of the label columns "
                f"{list(self.spec.label)} (columns: {ds.column_names})"
            )
        return self.spec.image, label

    def _get(self, split: str) -> Any:
        if split not in self._splits:
            ds = split_view(self._load_hub, split, self.spec.test_split, self.spec.train_split)
            image, label = self._columns(ds)
            self._splits[split] = ds.with_transform(
                ImageBatch(self.image_transform, image, label), columns=[image, label]
            )
        return self._splits[split]


def build_vision_task(task: str, seq_cfg: Any, backbone: Any) -> HFVisionTaskData:
    """``TASK_KINDS['hf_vision']``: the task's data preprocessed for ``backbone``."""
    if task not in VISION_TASKS:
        raise UserError(f"unknown vision task {task!r}; known: {sorted(VISION_TASKS)}")
    transform = getattr(backbone, "image_transform", None)
    if transform is None:
        raise UserError(
            f"task_seq {seq_cfg.name!r} is an image benchmark; backbone "
            f"{getattr(backbone, 'name', '?')!r} has no image preprocessing (use a CLIP backbone)"
        )
    device = getattr(backbone, "device", torch.device("cpu"))
    return HFVisionTaskData(
        task,
        VISION_TASKS[task],
        seq_cfg.get("local_dir"),
        transform,
        num_workers=int(getattr(backbone, "num_workers", 0)),
        pin_memory=device.type == "cuda",
    )
