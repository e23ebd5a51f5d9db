"""The readable console summary at the end of a run (rich)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


def _fmt(v: float | None, dash: str = "—") -> str:
    return dash if v is None else f"{v:.2f}"


def print_summary(m: dict[str, Any], console: Console | None = None, out_dir: Any = None) -> None:
    """The final table; its last line names the run directory. On a console that cannot encode
    Unicode (``LANG=C``, an ASCII pipe) the table is drawn in ASCII."""
    console = console or Console()
    plain = not str(console.encoding or "").lower().replace("-", "").startswith("utf")
    dot, dash = (" | ", "-") if plain else (" · ", "—")
    t = Table(
        title=dot.join(str(m[k]) for k in ("method", "task_seq", "backbone", "protocol")),
        box=box.ASCII if plain else box.HEAVY_HEAD,
        safe_box=True,
    )
    t.add_column("task")
    t.add_column("final acc %", justify="right")
    t.add_column("individual %", justify="right")
    for task in m["order"]:
        t.add_row(task, _fmt(m["per_task"][task], dash), _fmt(m["individual"].get(task), dash))
    t.add_section()
    t.add_row("ACC", _fmt(m["acc"], dash), "")
    t.add_row("BWT", _fmt(m["bwt"], dash), "")
    t.add_row("normalized ACC", _fmt(m["normalized_acc"], dash), "")
    console.print(t)
    console.print(
        f"wall time {m['wall_time_s']:.1f}s{dot.rstrip() if plain else ' ·'} peak memory "
        f"{m['peak_memory_mb']:.0f} MB ({m['memory_kind']})"
    )
    if out_dir is not None:
        console.print(f"results: {out_dir}", highlight=False, soft_wrap=True)
