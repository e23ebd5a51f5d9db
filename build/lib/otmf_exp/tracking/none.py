"""The ``none`` logger: a tracker that records nothing (local files are written by the runner)."""

from __future__ import annotations

from typing import Any


class NullTracker:
    """Tracks nothing (``logger=none`` or ``mode=disabled``)."""

    def start(self, config: dict[str, Any], out_dir: str) -> None:
        pass

    def log_step(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, metrics: dict[str, Any] | None, failed: bool = False) -> None:
        pass
