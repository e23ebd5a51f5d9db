"""A run owns what it writes: ``<out_dir>/.otmf_manifest.json`` lists its files and its config.

The names come from one declaration (:mod:`otmf_exp.runtime.results`). A fresh run overwrites or
deletes only names a run of ours wrote (listed in the manifest, or the fixed result names of an
older run dir holding our ``config.yaml`` + ``metrics.json``); a user's file or directory at a
result name (``merged_model/`` included) or a user's ``.previous/`` is refused with one line. A
rerun into a completed dir moves the old result set to ``<out_dir>/.previous/`` together with a
manifest naming what was moved, and deletes exactly those names once the new ``metrics.json`` is in
place; a failure (any exception, Ctrl-C) puts the old set back, so ``metrics.json`` always belongs
to the files beside it. A ``.previous/`` left by a killed run is restored at the next start only
when the top level is incomplete (no ``metrics.json``) and ``.previous/`` holds our manifest.

The manifest also records the run's result-relevant config (:func:`record_config`): that is a run
dir's identity, which ``resume=true`` (and ``sweep_existing=resume``) checks (:func:`check_identity`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from otmf_exp.errors import UserError
from otmf_exp.runtime import files
from otmf_exp.runtime.results import COMPLETE, DIRS, MANIFEST, PREVIOUS, RESULT_SET

#: kept for callers of the first round: the result set's names
RESULTS = RESULT_SET


def read(out_dir: Path) -> dict[str, Any]:
    """The manifest of ``out_dir`` as a dict (empty when there is none or it is unreadable)."""
    try:
        doc = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def owned(out_dir: Path) -> set[str]:
    """The names the manifest of ``out_dir`` lists (empty when there is none or it is unreadable)."""
    names = read(out_dir).get("files")
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def claim(out_dir: Path, *names: str) -> None:
    """Record ``names`` as this run's (before they are written; atomic rewrite of the manifest)."""
    doc = read(out_dir)
    have = owned(out_dir)
    if set(names) <= have:
        return
    files.write_json(out_dir / MANIFEST, {**doc, "files": sorted(have | set(names))})


def record_config(out_dir: Path, config: dict[str, Any], config_hash: str) -> None:
    """Record the result-relevant config of the run writing ``out_dir`` (its identity)."""
    doc = read(out_dir)
    files.write_json(out_dir / MANIFEST, {**doc, "config": config, "config_hash": config_hash})


def check_identity(out_dir: Path, config: dict[str, Any]) -> None:
    """With ``resume=true``: refuse a run dir whose result was produced by another result-relevant
    config (one line naming the first differing key); a dir without a recorded config (new, or an
    older version's) passes."""
    from otmf_exp.runtime import resume

    saved = read(out_dir).get("config")
    if isinstance(saved, dict) and (out_dir / COMPLETE).is_file():
        resume.check_same_config(saved, config, out_dir, "its result's")


def _older_run_dir(out_dir: Path) -> bool:
    """A run dir written before manifests existed: our ``config.yaml`` and ``metrics.json``."""
    try:
        doc = json.loads((out_dir / COMPLETE).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    ours = isinstance(doc, dict) and {"method", "acc_matrix", "provenance"} <= set(doc)
    return ours and (out_dir / "config.yaml").is_file()


def _ours_previous(prev: Path) -> bool:
    return prev.is_dir() and not prev.is_symlink() and (prev / MANIFEST).is_file() and bool(owned(prev))


def check_owned(out_dir: Path) -> None:
    """One :class:`UserError` line naming the first result name in ``out_dir`` that no run of ours
    wrote (a run would overwrite, move or delete it), or a ``.previous/`` that is not our set."""
    mine = owned(out_dir) | (set(RESULT_SET) if _older_run_dir(out_dir) else set())
    for name in RESULT_SET:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and name not in mine:
            raise UserError(
                f"{path} was not written by a run of otmf_exp (no {MANIFEST} lists it); a run never "
                "overwrites files it does not own: move it away or choose another out_dir"
            )
    prev = out_dir / PREVIOUS
    if (prev.exists() or prev.is_symlink()) and not _ours_previous(prev):
        raise UserError(
            f"{prev} was not written by a run of otmf_exp (no {MANIFEST} in it); a run moves its old "
            "result there: move it away or choose another out_dir"
        )


def restore_left_over(out_dir: Path) -> None:
    """A ``.previous/`` left by a killed rerun: put the old complete result back when the top level
    is incomplete; when the top level is complete (killed after the new ``metrics.json``), the old
    set is stale and goes. Anything else is left alone (:func:`check_owned` refuses it)."""
    prev = out_dir / PREVIOUS
    if not _ours_previous(prev):
        return
    if (out_dir / COMPLETE).is_file():
        drop_previous(out_dir)
    elif (prev / COMPLETE).is_file():
        restore(out_dir)


def set_aside(out_dir: Path) -> bool:
    """Move the result set of ``out_dir`` (if complete) to ``.previous/`` with a manifest naming
    what was moved; True if moved. Every name it moves was checked ours by :func:`check_owned`."""
    if not (out_dir / COMPLETE).is_file():
        return False
    prev = out_dir / PREVIOUS
    if prev.exists() or prev.is_symlink():
        if not _ours_previous(prev):
            raise UserError(f"{prev} is not a result set of otmf_exp; move it away or choose another out_dir")
        drop_previous(out_dir)
    prev.mkdir()
    moved = [n for n in RESULT_SET if (out_dir / n).exists()]
    identity = {k: v for k, v in read(out_dir).items() if k in ("config", "config_hash")}
    files.write_json(prev / MANIFEST, {"files": moved, "set_aside": True, **identity})
    for name in moved:
        os.replace(out_dir / name, prev / name)
    return True


def _remove(path: Path, name: str) -> None:
    if path.is_symlink() or (path.exists() and name not in DIRS):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def restore(out_dir: Path) -> None:
    """Undo :func:`set_aside`: drop this run's partial results, put the old set back."""
    prev = out_dir / PREVIOUS
    moved, identity = owned(prev), read(prev)
    for name in RESULT_SET:
        _remove(out_dir / name, name)
    for name in RESULT_SET:
        if name in moved and ((prev / name).exists() or (prev / name).is_symlink()):
            os.replace(prev / name, out_dir / name)
    if isinstance(identity.get("config"), dict):  # the identity of the set put back
        record_config(out_dir, identity["config"], str(identity.get("config_hash")))
    _remove_previous(prev)


def drop_previous(out_dir: Path) -> None:
    """The new result is complete: the old set goes (only the names its manifest lists)."""
    prev = out_dir / PREVIOUS
    if not _ours_previous(prev):
        return
    for name in owned(prev) & set(RESULT_SET):
        _remove(prev / name, name)
    _remove_previous(prev)


def _remove_previous(prev: Path) -> None:
    (prev / MANIFEST).unlink(missing_ok=True)
    try:
        prev.rmdir()  # only when empty: anything else in it is not ours
    except OSError:
        pass
