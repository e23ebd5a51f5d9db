"""Backbone registry: ``backbone.kind`` -> builder. One place decides what is mergeable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from otmf_exp.errors import UserError
from otmf_exp.models.base import Backbone


def _tiny(cfg: Any, device: torch.device, progress: bool) -> Backbone:
    from otmf_exp.models.tiny import TinyBackbone
    from otmf_exp.offline.zoo import DigitsZoo

    return TinyBackbone(DigitsZoo(progress=progress), device)


def _quiet(progress: bool) -> None:
    if not progress:  # the hub libraries' own download / loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _hf_clip(cfg: Any, device: torch.device, progress: bool) -> Backbone:
    from otmf_exp.models.hf_clip import HFClipBackbone

    _quiet(progress)
    return HFClipBackbone(cfg, device)


def _open_clip(cfg: Any, device: torch.device, progress: bool) -> Backbone:
    from otmf_exp.models.open_clip import OpenClipBackbone

    _quiet(progress)
    return OpenClipBackbone(cfg, device)


def _hf_t5(cfg: Any, device: torch.device, progress: bool) -> Backbone:
    from otmf_exp.models.hf_t5 import T5Backbone

    _quiet(progress)
    return T5Backbone(cfg, device)


def _synthetic(cfg: Any, device: torch.device, progress: bool) -> Backbone:
    from otmf_exp.offline.synthetic import ARCHS, SyntheticBackbone

    if cfg.arch not in ARCHS:
        raise UserError(f"backbone.arch={cfg.arch!r} is not a synthetic architecture; known: {sorted(ARCHS)}")
    return SyntheticBackbone(cfg.arch, device, noise=float(cfg.noise), autocast=cfg.autocast)


BACKBONES: dict[str, Callable[[Any, torch.device, bool], Backbone]] = {
    "tiny": _tiny,
    "hf_clip": _hf_clip,
    "open_clip": _open_clip,
    "hf_t5": _hf_t5,
    "synthetic": _synthetic,
}


def build_backbone(cfg: Any, device: torch.device, progress: bool = True) -> Backbone:
    """Build the backbone named by ``cfg.kind`` on ``device``."""
    if cfg.kind not in BACKBONES:
        raise UserError(f"unknown backbone kind {cfg.kind!r}; known: {sorted(BACKBONES)}")
    backbone = BACKBONES[cfg.kind](cfg, device, progress)
    backbone.batch_size = int(cfg.batch_size)
    backbone.num_workers = int(cfg.num_workers)
    return backbone
