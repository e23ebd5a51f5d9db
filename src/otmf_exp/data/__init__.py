"""Task-data registry: ``task_seq.kind`` -> builder of one task's :class:`TaskData`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from otmf_exp.data.base import TaskData
from otmf_exp.errors import UserError


def _digits(task: str, seq_cfg: Any, backbone: Any) -> TaskData:
    from otmf_exp.data import digits

    return digits.build_task(task)  # an unknown name is a one-line UserError naming the known tasks


def _hf_vision(task: str, seq_cfg: Any, backbone: Any) -> TaskData:
    from otmf_exp.data.hf_vision import build_vision_task

    return build_vision_task(task, seq_cfg, backbone)


def _glue(task: str, seq_cfg: Any, backbone: Any) -> TaskData:
    from otmf_exp.data.glue import build_glue_task

    return build_glue_task(task, seq_cfg, backbone)


def _synthetic(task: str, seq_cfg: Any, backbone: Any) -> TaskData:
    from otmf_exp.offline.synthetic import SyntheticBackbone

    if not isinstance(backbone, SyntheticBackbone):
        raise UserError(
            "task_seq kind 'synthetic' needs backbone=synthetic (random images sized for its tower)"
        )
    return backbone.task_data(task, dict(seq_cfg.split_sizes) or None)


TASK_KINDS: dict[str, Callable[[str, Any, Any], TaskData]] = {
    "digits": _digits,
    "hf_vision": _hf_vision,
    "glue": _glue,
    "synthetic": _synthetic,
}


def build_task_data(task: str, seq_cfg: Any, backbone: Any) -> TaskData:
    """The data of ``task`` for ``backbone`` (preprocessing depends on the backbone)."""
    if seq_cfg.kind not in TASK_KINDS:
        raise UserError(f"unknown task_seq kind {seq_cfg.kind!r}; known: {sorted(TASK_KINDS)}")
    return TASK_KINDS[seq_cfg.kind](task, seq_cfg, backbone)
