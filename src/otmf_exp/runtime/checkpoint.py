"""Per-step checkpoints of the carried state, for resuming pre-empted continual runs.

Layout: ``<run>/checkpoints/step_XXX/{state.safetensors, progress.json}``; each step directory
is written under a temp name and renamed (atomic). Tensors go to safetensors (never pickle).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from otmf_exp.errors import UserError
from otmf_exp.merging.base import ContinualState
from otmf_exp.runtime.files import atomic_dir


def ckpt_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def save(out_dir: Path, state: ContinualState, progress: dict[str, Any], keep: str) -> None:
    """Write the checkpoint after step ``state.step``; ``keep``: last | all | none."""
    if keep == "none":
        return
    root = ckpt_root(out_dir)
    target = root / f"step_{state.step:03d}"
    if target.exists():
        shutil.rmtree(target)
    tensors = {f"merged/{k}": v.detach().contiguous().cpu() for k, v in state.merged.items()}
    tensors.update({f"heads/{k}": v.detach().contiguous().cpu() for k, v in state.heads.items()})
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        doc = {"step": state.step, "scalars": state.scalars, "progress": progress}
        (tmp / "progress.json").write_text(json.dumps(doc, default=float))
    if keep == "last":
        for d in root.glob("step_*"):
            if d != target:
                shutil.rmtree(d, ignore_errors=True)


def load_latest(out_dir: Path, device: Any) -> tuple[ContinualState, dict[str, Any]] | None:
    """The last completed step's state and progress, or None when there is no checkpoint."""
    steps = sorted(ckpt_root(out_dir).glob("step_[0-9][0-9][0-9]"))
    if not steps:
        return None
    d = steps[-1]
    try:
        tensors = load_file(str(d / "state.safetensors"), device=str(device))
        doc = json.loads((d / "progress.json").read_text())
    except Exception as e:
        raise UserError(
            f"checkpoint {d} is unreadable ({e}); delete it to restart from the previous step"
        ) from None
    merged = {k[len("merged/") :]: v for k, v in tensors.items() if k.startswith("merged/")}
    heads = {k[len("heads/") :]: v for k, v in tensors.items() if k.startswith("heads/")}
    return ContinualState(doc["step"], merged, heads, doc["scalars"]), doc["progress"]
