"""Experiment tracking: the only module that knows about W&B.

The runner talks to a :class:`Tracker` (``start`` / ``log_step`` / ``finish``); ``logger=none``
gives :class:`NullTracker`. Local files (metrics.json, steps.jsonl) are written by the runner.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    """Tracks nothing (``logger=none`` or ``mode=disabled``)."""

    def start(self, config: dict[str, Any], out_dir: str) -> None:
        pass

    def log_step(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, metrics: dict[str, Any] | None, failed: bool = False) -> None:
        pass


def make_tracker(logger_cfg: Any) -> Any:
    """Tracker for ``logger`` config; W&B only when ``name == 'wandb'`` and mode is not disabled."""
    if logger_cfg is None or logger_cfg.name == "none" or logger_cfg.mode == "disabled":
        return NullTracker()
    from otmf_exp.wandb_tracker import WandbTracker

    return WandbTracker(logger_cfg)
