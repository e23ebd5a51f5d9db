"""Experiment trackers (``logger`` config group): ``none`` and ``wandb``; the only package that knows W&B.

The runner talks to a tracker through ``start`` / ``log_step`` / ``finish``. Local files
(metrics.json, steps.jsonl) are written by the runner whatever the tracker.
"""

from __future__ import annotations

from typing import Any

from otmf_exp.tracking.none import NullTracker


def make_tracker(logger_cfg: Any) -> Any:
    """Tracker for the ``logger`` config; W&B only when ``name == 'wandb'`` and mode is not disabled."""
    if logger_cfg is None or logger_cfg.name == "none" or logger_cfg.mode == "disabled":
        return NullTracker()
    from otmf_exp.tracking.wandb import WandbTracker

    return WandbTracker(logger_cfg)


__all__ = ["NullTracker", "make_tracker"]
