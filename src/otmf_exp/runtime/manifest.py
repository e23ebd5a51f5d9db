"""A run owns what it writes (issue 27 item 1): ``<out_dir>/.otmf_manifest.json`` lists its files.

A fresh run overwrites or deletes only names a run of ours wrote (listed in the manifest, or the
fixed result names of an older run dir holding our ``config.yaml`` + ``metrics.json``); a user's
file at a fixed name is refused with one line. A rerun into a completed dir moves the old result
set to ``<out_dir>/.previous/`` and deletes it only once the new ``metrics.json`` is in place; a
failure (any exception, Ctrl-C) puts the old set back, so ``metrics.json`` always belongs to the
files beside it. A ``.previous/`` left by a killed run is restored at the next start.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from otmf_exp.errors import UserError
from otmf_exp.runtime import files

MANIFEST = ".otmf_manifest.json"
PREVIOUS = ".previous"
#: the result set: replaced as a whole by a rerun (config.yaml belongs to the metrics beside it)
RESULTS = ("config.yaml", "steps.jsonl", "acc_matrix.csv", "metrics.json", "merged.safetensors")


def owned(out_dir: Path) -> set[str]:
    """The names the manifest of ``out_dir`` lists (empty when there is none or it is unreadable)."""
    try:
        doc = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    names = doc.get("files") if isinstance(doc, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def claim(out_dir: Path, *names: str) -> None:
    """Record ``names`` as this run's (before they are written; atomic rewrite of the manifest)."""
    have = owned(out_dir)
    if set(names) <= have:
        return
    files.write_json(out_dir / MANIFEST, {"files": sorted(have | set(names))})


def _older_run_dir(out_dir: Path) -> bool:
    """A run dir written before manifests existed: our ``config.yaml`` and ``metrics.json``."""
    try:
        doc = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    ours = isinstance(doc, dict) and {"method", "acc_matrix", "provenance"} <= set(doc)
    return ours and (out_dir / "config.yaml").is_file()


def check_owned(out_dir: Path) -> None:
    """One :class:`UserError` line naming the first result name in ``out_dir`` that no run of ours
    wrote (a run would overwrite or delete it)."""
    mine = owned(out_dir) | (set(RESULTS) if _older_run_dir(out_dir) else set())
    for name in RESULTS:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and name not in mine:
            raise UserError(
                f"{path} was not written by a run of otmf_exp (no {MANIFEST} lists it); a run never "
                "overwrites files it does not own: move it away or choose another out_dir"
            )


def restore_left_over(out_dir: Path) -> None:
    """A ``.previous/`` left by a killed rerun: put the old complete result back."""
    prev = out_dir / PREVIOUS
    if prev.is_dir() and not prev.is_symlink() and (prev / "metrics.json").is_file():
        restore(out_dir)


def set_aside(out_dir: Path) -> bool:
    """Move the complete result set of ``out_dir`` (if any) to ``.previous/``; True if moved."""
    if not (out_dir / "metrics.json").is_file():
        return False
    prev = out_dir / PREVIOUS
    if prev.is_symlink():
        raise UserError(f"{prev} is a symbolic link; a run never writes through links: remove it")
    shutil.rmtree(prev, ignore_errors=True)
    prev.mkdir()
    for name in RESULTS:
        if (out_dir / name).exists():
            os.replace(out_dir / name, prev / name)
    return True


def restore(out_dir: Path) -> None:
    """Undo :func:`set_aside`: drop this run's partial results, put the old set back."""
    prev = out_dir / PREVIOUS
    for name in RESULTS:
        (out_dir / name).unlink(missing_ok=True)
    for name in RESULTS:
        if (prev / name).exists():
            os.replace(prev / name, out_dir / name)
    shutil.rmtree(prev, ignore_errors=True)


def drop_previous(out_dir: Path) -> None:
    """The new result is complete: the old set goes."""
    shutil.rmtree(out_dir / PREVIOUS, ignore_errors=True)
