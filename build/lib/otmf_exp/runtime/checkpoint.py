"""Per-step checkpoints of a method's carried state, for resuming pre-empted continual runs.

Layout: ``<run>/checkpoints/step_XXX/{state.safetensors, progress.json}``; each step directory
is written under a temp name and renamed (atomic). Tensors go to safetensors (never pickle);
which tensors make up a state is the method's business (``MergeMethod.state_tensors`` /
``load_state``), so this module knows nothing about any method.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.runtime.files import atomic_dir


def ckpt_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def save(out_dir: Path, step: int, tensors: dict[str, Tensor], doc: dict[str, Any], keep: str) -> None:
    """Write the checkpoint after ``step``: ``tensors`` (safetensors) and ``doc`` (JSON).
    ``keep``: last | all | none."""
    if keep == "none":
        return
    root = ckpt_root(out_dir)
    target = root / f"step_{step:03d}"
    if target.exists():
        shutil.rmtree(target)
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({"step": step, **doc}, default=float))
    if keep == "last":
        for d in root.glob("step_*"):
            if d != target:
                shutil.rmtree(d, ignore_errors=True)


def load_latest(out_dir: Path, device: Any) -> tuple[int, dict[str, Tensor], dict[str, Any]] | None:
    """``(step, tensors, doc)`` of the last completed step, or None when there is no checkpoint."""
    steps = sorted(ckpt_root(out_dir).glob("step_[0-9][0-9][0-9]"))
    if not steps:
        return None
    d = steps[-1]
    try:
        tensors = load_file(str(d / "state.safetensors"), device=str(device))
        doc = json.loads((d / "progress.json").read_text())
    except Exception as e:
        raise UserError(f"checkpoint {d} is unreadable ({e}); delete it to restart from the previous step") from None
    return int(doc["step"]), tensors, doc
