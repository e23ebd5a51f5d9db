"""Classification-head tuning on frozen-encoder features (OTMF's optional vision stage; Pan et al.,
arXiv 2511.19561, and the authors' scripts/clip_optimal_transport_route.py).

After a fusion step the merged encoder is frozen; a task's linear head (weight ``[C, D]``, started
from its current head, i.e. the CLIP zero-shot head the first time, and a bias started at 0) is
trained with cross-entropy and Adam for a fixed number of optimiser steps on batches drawn from a
shuffled, seeded stream of a fixed ``fraction`` of the task's labelled ``split``. The encoder is
frozen, so each example's features are computed once, the first time the stream reaches it, and
later passes reshuffle the cached features (no encoder forward). A tuned head is stored as one
``[C, D+1]`` tensor whose last column is the bias (:func:`otmf_exp.models.base.head_logits`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from otmf_exp.errors import NonFiniteLossError
from otmf_exp.merging.task_vectors import StateDict

log = logging.getLogger(__name__)


class FeatureStream:
    """Endless batches ``(features [b, D] float32, labels [b])`` of a fixed random ``fraction`` of
    ``split`` (subset and order seeded by ``seed``; ``b = batch_size`` except a pass's last batch).

    Pass 0 is the data loader's shuffled pass, run through the frozen encoder batch by batch as the
    stream is consumed (a stream that stops early never encodes the rest); later passes are fresh
    seeded permutations of the cached features. ``examples`` = distinct examples encoded so far.
    """

    def __init__(
        self,
        backbone: Any,
        params: StateDict,
        data: Any,
        split: str,
        fraction: float,
        batch_size: int,
        seed: int,
    ) -> None:
        self.backbone, self.params, self.data = backbone, params, data
        self.split, self.fraction, self.batch_size, self.seed = split, fraction, batch_size, int(seed)
        self._feats: list[Tensor] = []
        self._labels: list[Tensor] = []

    @property
    def examples(self) -> int:
        return sum(len(y) for y in self._labels)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        bb = self.backbone
        loader = self.data.loader(
            self.split, self.batch_size, shuffle=True, seed=self.seed, fraction=self.fraction
        )
        for batch in loader:
            with torch.no_grad():
                f = bb.features(self.params, bb.to_device(batch["inputs"])).float()
            y = batch["labels"].to(f.device)
            self._feats.append(f)
            self._labels.append(y)
            yield f, y
        if not self._labels:
            raise ValueError(f"task {self.data.name!r}: split {self.split!r} is empty; cannot tune its head")
        feats, labels = torch.cat(self._feats), torch.cat(self._labels)
        g = torch.Generator().manual_seed(self.seed)
        while True:
            perm = torch.randperm(len(labels), generator=g).to(labels.device)
            for i in range(0, len(perm), self.batch_size):
                j = perm[i : i + self.batch_size]
                yield feats[j], labels[j]


def train_head(
    head: Tensor,
    batches: Iterator[tuple[Tensor, Tensor]],
    *,
    steps: int,
    lr: float,
    what: str = "head",
) -> tuple[Tensor, list[float]]:
    """Tune a copy of ``head`` (``[C, D]``, or ``[C, D+1]`` with its bias last) for ``steps`` Adam
    steps, one batch of ``(features [b, D], labels [b])`` from ``batches`` each, with cross-entropy
    of :func:`~otmf_exp.models.base.head_logits`. Returns the head ``[C, D+1]`` (weight and bias;
    a ``[C, D]`` head starts with bias 0) in ``head``'s dtype and the loss of every step.

    The logit scale stays folded into the weight (its norm), as for CLIP zero-shot heads.
    """
    from otmf_exp.models.base import head_logits  # here: models.base imports the merging package

    w = head.detach().float()
    curve: list[float] = []
    param: Tensor | None = None
    opt = None
    for step in range(steps):
        x, y = next(batches)
        if param is None:  # D is known from the first batch: add a zero bias column to a [C, D] head
            d = x.shape[-1]
            if w.shape[-1] == d:
                w = torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1)
            param = w.clone().requires_grad_(True)
            opt = torch.optim.Adam([param], lr=lr)
        loss = F.cross_entropy(head_logits(x, param), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{what}: non-finite cross-entropy at step {step}; lower head_tuning.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    out = w if param is None else param.detach()
    return out.to(head.dtype), curve
