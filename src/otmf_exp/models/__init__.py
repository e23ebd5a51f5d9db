"""Backbone registry: ``backbone.kind`` -> builder. One place decides what is mergeable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from otmf_exp.errors import UserError
from otmf_exp.models.base import Backbone


def _tiny(cfg: Any, device: torch.device, progress: bool) -> Backbone:
    from otmf_exp.models.tiny import TinyBackbone
    from otmf_exp.zoo import DigitsZoo

    return TinyBackbone(DigitsZoo(progress=progress), device)


BACKBONES: dict[str, Callable[[Any, torch.device, bool], Backbone]] = {
    "tiny": _tiny,
}


def build_backbone(cfg: Any, device: torch.device, progress: bool = True) -> Backbone:
    """Build the backbone named by ``cfg.kind`` on ``device``."""
    if cfg.kind not in BACKBONES:
        raise UserError(f"unknown backbone kind {cfg.kind!r}; known: {sorted(BACKBONES)}")
    backbone = BACKBONES[cfg.kind](cfg, device, progress)
    backbone.batch_size = int(cfg.batch_size)
    backbone.num_workers = int(cfg.num_workers)
    return backbone
