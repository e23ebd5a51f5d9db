"""Per-step checkpoints of a method's carried state, for resuming pre-empted continual runs.

Layout: ``<run>/checkpoints/step_XXX/{state.safetensors, progress.json}``; each step directory
is written under a temp name and renamed (atomic), and older steps are removed only after the
new one is in place, so a failed write (full disk) keeps the last good checkpoint. Tensors go to
safetensors (never pickle); which tensors make up a state is the method's business
(``MergeMethod.state_tensors`` / ``load_state``), so this module knows nothing about any method.
``progress.json`` records the sha256 of its step's ``state.safetensors`` (``state_sha256``); loading
checks it, so a state file swapped in from another run (or damaged) is refused in one line.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.runtime.digest import sha256_file
from otmf_exp.runtime.files import atomic_dir, strict_dumps, write_error

log = logging.getLogger(__name__)

STATE, DOC = "state.safetensors", "progress.json"


def ckpt_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def steps(out_dir: Path) -> list[Path]:
    """The completed step directories, oldest first."""
    return sorted(ckpt_root(out_dir).glob("step_[0-9][0-9][0-9]"))


def remove_steps(out_dir: Path) -> None:
    """Remove the step dirs a run of ours wrote (``step_XXX`` and their ``.step_XXX.*`` temp dirs),
    never anything else under ``checkpoints/`` (a user's own files there stay), and the dir itself
    when that leaves it empty. A symbolic link is never followed (refused up front by the runner)."""
    root = ckpt_root(out_dir)
    if not root.is_dir() or root.is_symlink():
        return
    for d in [*root.glob("step_[0-9][0-9][0-9]"), *root.glob(".step_[0-9][0-9][0-9].*")]:
        if d.is_symlink():
            d.unlink()
        elif d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:  # not empty: the user's files
        pass


def save(out_dir: Path, step: int, tensors: dict[str, Tensor], doc: dict[str, Any], keep: str) -> None:
    """Write the checkpoint after ``step``: ``tensors`` (safetensors) and ``doc`` (strict JSON).
    ``keep``: last | all | none. A failed write is a :class:`UserError` naming the file; the
    previous checkpoint stays."""
    if keep == "none":
        return
    root = ckpt_root(out_dir)
    target = root / f"step_{step:03d}"
    if target.exists():
        shutil.rmtree(target)
    previous = [d for d in steps(out_dir) if d != target]
    kept = f"the last good checkpoint {previous[-1].name} is kept" if previous else "no step was saved"
    current = target / STATE
    try:
        with atomic_dir(target) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE))
            sha = sha256_file(tmp / STATE)
            current = target / DOC
            body = {"step": step, **doc, "state_sha256": sha}
            (tmp / DOC).write_text(strict_dumps(body, str(target / DOC)))
    except Exception as e:  # OSError, or safetensors' wrapper of one (full disk, permissions)
        raise write_error(current, e, f"{kept}; resume with resume=true") from None
    if keep == "last":
        for d in previous:
            shutil.rmtree(d, ignore_errors=True)


def broken_message(path: Path, problem: str) -> str:
    """The one line for an unusable checkpoint file, corrupted or structurally wrong."""
    return (
        f"checkpoint {path} is unreadable ({problem}); delete {path.parent} and rerun with "
        "resume=true (it continues from the step before, or starts fresh if none is left)"
    )


def latest_doc(
    out_dir: Path, check: Callable[[Any], str | None] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """``(step dir, doc)`` of the last completed step (no tensors read), or None when there is no
    checkpoint. ``check(doc)`` returns what is structurally wrong with a parsed doc (or None); a
    corrupted or structurally wrong ``progress.json`` is a :class:`UserError` naming it."""
    found = steps(out_dir)
    if not found:
        return None
    d = found[-1]
    try:
        doc = json.loads((d / DOC).read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply to parse
        raise UserError(broken_message(d / DOC, _reason(e))) from None
    problem = _doc_problem(doc) or (check(doc) if check is not None else None)
    if problem:
        raise UserError(broken_message(d / DOC, problem))
    if doc["step"] != int(d.name.removeprefix("step_")):
        raise UserError(broken_message(d / DOC, f"it records step {doc['step']}, not {d.name}"))
    return d, doc


def load_latest(
    out_dir: Path, device: Any, check: Callable[[Any], str | None] | None = None
) -> tuple[int, dict[str, Tensor], dict[str, Any]] | None:
    """``(step, tensors, doc)`` of the last completed step, or None when there is no checkpoint;
    see :func:`latest_doc`. A damaged ``state.safetensors`` is a :class:`UserError` naming it."""
    found = latest_doc(out_dir, check)
    if found is None:
        return None
    d, doc = found
    try:
        tensors = load_file(str(d / STATE), device=str(device))
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise UserError(broken_message(d / STATE, _reason(e))) from None
    for k, t in tensors.items():  # every floating tensor finite (integers: a method's indices, as saved)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(broken_message(d / STATE, f"{k!r} has non-finite values (NaN/inf)"))
    check_state_digest(d, doc)  # after the specific checks: a finite file that is not this step's
    return int(doc["step"]), tensors, doc


def check_state_digest(d: Path, doc: dict[str, Any]) -> None:
    """Refuse a step whose ``state.safetensors`` is not the file its ``progress.json`` was written
    with (sha256); a checkpoint of an older version (no ``state_sha256``) is loaded with a warning."""
    want = doc.get("state_sha256")
    if want is None:
        log.warning("checkpoint %s records no digest of its state file (older version): not checked", d)
        return
    try:
        got = sha256_file(d / STATE)
    except OSError as e:
        raise UserError(broken_message(d / STATE, _reason(e))) from None
    if got != want:
        raise UserError(
            broken_message(
                d / STATE,
                f"its sha256 {got[:12]} is not the {str(want)[:12]} its {DOC} records: swapped or damaged",
            )
        )


def _doc_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"expected a JSON object, found {type(doc).__name__}"
    if not isinstance(doc.get("step"), int) or isinstance(doc.get("step"), bool):
        return "'step' missing or not an integer"
    if not isinstance(doc.get("scalars"), dict):
        return "'scalars' missing or not an object"
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).splitlines() or [type(e).__name__])[0]
