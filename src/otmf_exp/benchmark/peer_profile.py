"""The peer table's profile section: per data-free method, where the merge's time goes before and after.

``benchmarks/peer_profile.json`` holds what was measured (see its ``command``); :func:`profile_lines`
renders it as Markdown for BENCHMARKS.md (``peer_markdown.py`` calls it with that dict). Shape::

    {"command": "...", "machine": "...", "threads": 1, "arch": "vit_b32_l4", "tasks": 8,
     "methods": {"averaging": {"before": {"merge_s": 0.41, "top": [["sub_", 0.12], ...]},
                               "after": {...}, "floor_s": 0.30, "floor": "what the floor times",
                               "note": "..."}}}

``top`` lists (function, own time in s) from cProfile, largest first. A method without ``floor_s``
has no measured floor; one without ``after`` was not changed.
"""

from __future__ import annotations

from typing import Any


def _top(entry: dict[str, Any] | None, n: int) -> str:
    if not entry:
        return "—"
    return ", ".join(f"`{name}` {sec:.3f}" for name, sec in entry.get("top", [])[:n]) or "—"


def _secs(entry: dict[str, Any] | None) -> str:
    return f"{entry['merge_s']:.3f}" if entry and entry.get("merge_s") is not None else "—"


def profile_lines(profile: dict[str, Any], top: int = 3) -> list[str]:
    """Markdown lines of the profile section for ``profile`` (the dict of ``peer_profile.json``)."""
    methods = profile.get("methods") or {}
    if not methods:
        return []
    lines = [
        "### Where the merge's time goes (profile)",
        "",
        f"In-process merge of {profile.get('tasks')} task models of `{profile.get('arch')}` at "
        f"{profile.get('threads')} thread(s), min of the repeats, cProfile's own time per call "
        f"(s); the floor times only the kernel both packages call, on the same shapes. "
        f"Measured by `{profile.get('command', '?')}` on {profile.get('machine', 'an unnamed machine')}.",
        "",
        "| method | merge before (s) | top before | merge after (s) | top after | floor (s) | after / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        after = m.get("after") or m.get("before")
        floor = m.get("floor_s")
        ratio = f"{after['merge_s'] / floor:.2f}" if floor and after and after.get("merge_s") else "—"
        lines.append(
            f"| {name} | {_secs(m.get('before'))} | {_top(m.get('before'), top)} | {_secs(m.get('after'))} "
            f"| {_top(m.get('after'), top)} | {f'{floor:.3f}' if floor else '—'} | {ratio} |"
        )
    notes = [f"- **{name}**: {m['note']}" for name, m in methods.items() if m.get("note")]
    floors = [f"- {name}'s floor: {m['floor']}" for name, m in methods.items() if m.get("floor")]
    return lines + ([""] + notes if notes else []) + ([""] + floors if floors else [])
