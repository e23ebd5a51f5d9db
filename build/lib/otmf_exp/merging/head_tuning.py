"""Classification-head tuning on cached frozen-encoder features (OTMF's optional vision stage).

After a fusion step the merged encoder is frozen; a task's linear head ``[C, D]`` (initialised
from its current head, i.e. the CLIP zero-shot head the first time) is trained with
cross-entropy on ``fraction`` of the task's labelled ``split``. Because the encoder is frozen,
its features are computed once and the head trains on the cache (no encoder forward per epoch).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from otmf_exp.errors import NonFiniteLossError
from otmf_exp.merging.task_vectors import StateDict

log = logging.getLogger(__name__)


@torch.no_grad()
def cached_features(
    backbone: Any, params: StateDict, data: Any, split: str, fraction: float, seed: int, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Features ``[N, D]`` (float32) and labels ``[N]`` of ``fraction`` of ``split`` (fixed subset by ``seed``)."""
    feats, labels = [], []
    for batch in data.loader(split, batch_size, fraction=fraction, seed=seed):
        feats.append(backbone.features(params, backbone.to_device(batch["inputs"])).float())
        labels.append(batch["labels"].to(backbone.device))
    if not feats:
        raise ValueError(f"task {data.name!r}: split {split!r} is empty; cannot tune its head")
    return torch.cat(feats), torch.cat(labels)


def train_head(
    head: Tensor,
    feats: Tensor,
    labels: Tensor,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    what: str = "head",
) -> tuple[Tensor, list[float]]:
    """Train a copy of ``head`` [C, D] with logits ``normalize(f) @ head.T``; returns (head, loss per epoch).

    The logit scale stays folded into ``head`` (its norm), as for CLIP zero-shot heads.
    """
    w = head.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    g = torch.Generator().manual_seed(int(seed))
    x = F.normalize(feats, dim=-1)
    curve: list[float] = []
    for epoch in range(epochs):
        perm = torch.randperm(len(labels), generator=g).to(labels.device)
        total, n = 0.0, 0
        for i in range(0, len(perm), batch_size):
            j = perm[i : i + batch_size]
            loss = F.cross_entropy(x[j] @ w.T, labels[j])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"{what}: non-finite cross-entropy at epoch {epoch}; lower head_tuning.lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(j)
            n += len(j)
        curve.append(total / max(n, 1))
    return w.detach().to(head.dtype), curve
