"""The readable console summary at the end of a run (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def print_summary(m: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"{m['method']} · {m['task_seq']} · {m['backbone']} · {m['protocol']}")
    t.add_column("task")
    t.add_column("final acc %", justify="right")
    t.add_column("individual %", justify="right")
    for task in m["order"]:
        t.add_row(task, _fmt(m["per_task"][task]), _fmt(m["individual"].get(task)))
    t.add_section()
    t.add_row("ACC", _fmt(m["acc"]), "")
    t.add_row("BWT", _fmt(m["bwt"]), "")
    t.add_row("normalized ACC", _fmt(m["normalized_acc"]), "")
    console.print(t)
    console.print(
        f"wall time {m['wall_time_s']:.1f}s · peak memory {m['peak_memory_mb']:.0f} MB ({m['memory_kind']})"
    )
