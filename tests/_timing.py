"""What differs between two runs of the same experiment by design (timings, memory readings): the
prefixes a bitwise comparison of two runs' records leaves out."""

from __future__ import annotations

import json
from pathlib import Path

TIMING = (
    "time",
    "wall_time_s",
    "peak_memory_mb",
    "baseline_memory_mb",
    "start_memory_mb",
    "eval_time_s",
    "load_time_s",
)


def untimed(d: dict) -> dict:
    """``d`` without its timing and memory readings."""
    return {k: v for k, v in d.items() if not k.startswith(TIMING)}


def untimed_steps(out: Path) -> list[dict]:
    """The run dir ``out``'s steps.jsonl records, untimed."""
    return [untimed(json.loads(x)) for x in (Path(out) / "steps.jsonl").read_text().splitlines()]
