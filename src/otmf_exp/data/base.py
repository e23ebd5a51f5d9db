"""Task data behind one small interface: labeled/unlabeled batches of a split.

A batch is a dict with ``"inputs"`` (a tensor for vision, a dict of tensors for text) and
``"labels"`` (class indices) plus, for text tasks, ``"targets"`` (label strings).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

SPLITS = ("train", "validation", "test")


def subset_indices(n: int, fraction: float, seed: int) -> Tensor:
    """Deterministic random subset of ``ceil(fraction · n)`` indices out of ``range(n)`` (sorted)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:k].sort().values


def index_plan(n: int, batch_size: int, *, shuffle: bool, seed: int, fraction: float) -> list[list[int]]:
    """Batches of indices into ``range(n)``: a fixed ``fraction`` subset (by ``seed``), optionally shuffled."""
    idx = subset_indices(n, fraction, seed) if fraction < 1.0 else torch.arange(n)
    if shuffle:
        g = torch.Generator().manual_seed(int(seed))
        idx = idx[torch.randperm(len(idx), generator=g)]
    return [idx[i : i + batch_size].tolist() for i in range(0, len(idx), batch_size)]


def validation_split(n_train: int, fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """FusionBench-style validation split: ``fraction`` of train with ``seed``; returns (train_idx, val_idx)."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_train, generator=g)
    n_val = max(1, int(round(fraction * n_train)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def example_batches(
    data: TaskData, split: str, n: int, batch_size: int, *, shuffle: bool, seed: int
) -> Iterator[dict[str, Any]]:
    """The batches of ``split`` (seeded shuffle, or in order) until at least ``n`` examples were
    yielded: ``ceil(n / batch_size)`` whole batches, fewer when the split is smaller (FusionBench's
    Fisher/RegMean loop, which checks the count before each batch)."""
    seen = 0
    for batch in data.loader(split, batch_size, shuffle=shuffle, seed=seed):
        if seen >= n:
            return
        seen += len(batch["labels"])
        yield batch


class TaskData(ABC):
    """The data of one task. ``classnames`` is ``None`` for text-to-text tasks."""

    name: str
    classnames: list[str] | None

    @abstractmethod
    def size(self, split: str) -> int:
        """Number of examples in ``split``."""

    @abstractmethod
    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        fraction: float = 1.0,
    ) -> Iterable[dict[str, Any]]:
        """Batches of ``split``; with ``fraction < 1`` a fixed random subset chosen by ``seed``."""

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        """An endless stream of shuffled batches (a new permutation each pass, seeded)."""
        epoch = 0
        while True:
            yielded = False
            for batch in self.loader(split, batch_size, shuffle=True, seed=seed + epoch):
                yielded = True
                yield batch
            if not yielded:
                raise ValueError(f"task {self.name!r}: split {split!r} is empty")
            epoch += 1


class TensorTaskData(TaskData):
    """In-memory task: ``splits[split] = (inputs [N, ...], labels [N])``."""

    def __init__(self, name: str, splits: dict[str, tuple[Tensor, Tensor]], classnames: list[str]) -> None:
        self.name = name
        self.splits = splits
        self.classnames = classnames

    def _get(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def size(self, split: str) -> int:
        return len(self._get(split)[1])

    def loader(self, split, batch_size, *, shuffle=False, seed=0, fraction=1.0):
        x, y = self._get(split)
        for j in index_plan(len(y), batch_size, shuffle=shuffle, seed=seed, fraction=fraction):
            yield {"inputs": x[j], "labels": y[j]}
