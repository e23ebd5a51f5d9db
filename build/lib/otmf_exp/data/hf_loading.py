"""Batching ``datasets.Dataset`` splits for the accelerator: index plans, DataLoader, split views.

A split is read in whole batches (``dataset[list_of_indices]``), so the dataset's batch transform
(image preprocessing, applied lazily with ``with_transform``) runs once per batch inside the
DataLoader workers (``backbone.num_workers``), and batches are pinned when the backbone is on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from otmf_exp.data.base import TaskData, index_plan, validation_split


def batch_loader(
    dataset: Any, plan: list[list[int]], collate: Callable[[dict], dict], num_workers: int, pin_memory: bool
) -> Iterable[dict[str, Any]]:
    """A DataLoader reading ``dataset[batch_indices]`` for each planned batch.

    Workers: ``num_workers`` capped at the CPU count and at the number of batches (a worker per
    batch at most: tiny evaluation splits do not fork a pool they cannot use).
    """
    if not plan:
        return []
    workers = max(0, min(int(num_workers), os.cpu_count() or 1, len(plan) - 1))
    return DataLoader(
        dataset, batch_size=None, sampler=plan, collate_fn=collate, num_workers=workers, pin_memory=pin_memory
    )


def split_view(
    load: Callable[[str], Any],
    split: str,
    hub_test: str,
    hub_train: str,
    val_fraction: float = 0.1,
    val_seed: int = 0,
) -> Any:
    """Our split from hub splits: ``test`` = the hub's test split; ``train`` / ``validation`` = the
    hub's train split cut once into 90% / 10% (seed 0) -- disjoint."""
    if split == "test":
        return load(hub_test)
    if split in ("train", "validation"):
        train = load(hub_train)
        tr, val = validation_split(len(train), val_fraction, val_seed)
        return train.select((tr if split == "train" else val).tolist())
    raise ValueError(f"unknown split {split!r}; use train, validation or test")


def as_long(values: Iterable[Any]) -> Tensor:
    """Labels (ints or bools) as a LongTensor."""
    return torch.tensor([int(v) for v in values], dtype=torch.long)


class HubSplitsTaskData(TaskData):
    """A task whose splits are ``datasets.Dataset`` objects built lazily by ``_get(split)`` and read
    through :func:`batch_loader` with ``self._collate``, ``self.num_workers``, ``self.pin_memory``."""

    num_workers: int = 0
    pin_memory: bool = False

    def _get(self, split: str) -> Any:
        raise NotImplementedError

    def _collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def size(self, split: str) -> int:
        return len(self._get(split))

    def loader(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, fraction: float = 1.0
    ) -> Iterable[dict[str, Any]]:
        ds = self._get(split)
        plan = index_plan(len(ds), batch_size, shuffle=shuffle, seed=seed, fraction=fraction)
        return batch_loader(ds, plan, self._collate, self.num_workers, self.pin_memory)
