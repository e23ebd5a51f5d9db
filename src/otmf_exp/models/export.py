"""The merged model as a directory its backbone's own loader reads (``save_merged=true``, issue 24).

``merged_model/`` beside ``merged.safetensors``: the backbone's model files (written by
``Backbone.save_model``), the tuned classification heads (``heads.safetensors``, one tensor per task,
rows = classes; ``heads.json``: task -> class names) and ``otmf_exp.json`` (method, config hash,
tasks, order, the run's per-task accuracy, how to load it). Built under a temp name in the run dir
and renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from otmf_exp.runtime import files

#: the directory name in the run dir
MODEL_DIR = "merged_model"
HEADS_FILE = "heads.safetensors"
HEADS_JSON = "heads.json"
CARD_FILE = "otmf_exp.json"

#: how a head is applied (recorded in the card; the same rule as ``models.base.head_logits``)
HEAD_RULE = (
    "logits = normalize(image_embeds) @ W.T (+ b): head [C, D] is W alone (zero-shot, logit scale "
    "folded in); head [C, D+1] carries its bias b in the last column (a tuned head)"
)


def with_weights(module: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A CPU copy of ``module`` with ``weights`` copied into its parameters (tied parameters stay tied)."""
    out = copy.deepcopy(module).cpu()
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.detach().to(params[name].dtype))
    return out


def save_heads(out_dir: Path, heads: dict[str, Tensor | None], classnames: dict[str, list[str]]) -> None:
    """``heads.safetensors`` (task -> ``[C, D]`` or ``[C, D+1]`` float32) + ``heads.json`` (task -> class names)."""
    from safetensors.torch import save_file

    kept = {t: h.detach().float().cpu().contiguous() for t, h in heads.items() if h is not None}
    if not kept:
        return
    save_file(kept, str(out_dir / HEADS_FILE))
    files.write_json(out_dir / HEADS_JSON, {t: list(classnames.get(t, [])) for t in kept})


def save_merged_model(
    backbone: Any,
    weights: dict[str, Tensor],
    heads: dict[str, Tensor | None],
    classnames: dict[str, list[str]],
    card: dict[str, Any],
    run_dir: Path,
) -> Path:
    """Write ``run_dir/merged_model`` atomically (staged under a temp name, then renamed); returns its path."""
    run_dir = Path(run_dir)
    staged = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}.", dir=run_dir))
    try:
        staged.chmod(0o777 & ~files.umask())
        info = backbone.save_model(weights, staged)
        save_heads(staged, heads, classnames)
        full = {**card, **info, "heads": HEADS_FILE if any(h is not None for h in heads.values()) else None}
        if full["heads"]:
            full["head_rule"] = HEAD_RULE
        files.write_json(staged / CARD_FILE, full)
        files.replace_dir(staged, run_dir / MODEL_DIR)
    finally:
        if staged.exists():
            files._remove(staged)
    return run_dir / MODEL_DIR


def save_run_model(exp: Any, state: Any, weights: dict[str, Tensor], metrics: dict[str, Any]) -> Path:
    """``merged_model/`` of a finished :class:`~otmf_exp.runner.Experiment` (its heads, card and metrics)."""
    from otmf_exp.merging.base import MergeMethod
    from otmf_exp.runtime import resume

    routed = type(exp.method).forward_context is not MergeMethod.forward_context
    card = {
        "method": metrics["method"],
        "method_config": metrics["method_config"],
        "config_hash": resume.config_hash(exp.result_config),
        "backbone": metrics["backbone"],
        "backbone_kind": str(exp.cfg.backbone.kind),
        "task_seq": metrics["task_seq"],
        "protocol": metrics["protocol"],
        "seed": metrics["seed"],
        "tasks": sorted(exp.order),
        "order": list(exp.order),
        "eval_split": str(exp.cfg.eval_split),
        "per_task": metrics["per_task"],
        "acc": metrics["acc"],
        "code_version": (metrics.get("provenance") or {}).get("code_version"),
        "routed": routed,
    }
    if routed:
        card["note"] = (
            f"{metrics['method']} routes each batch through modules added around the merged weights "
            "(forward_context); these files hold the merged weights alone, so they do not reproduce per_task"
        )
    heads = {t: exp._head(state, t) for t in exp.order}
    names = {t: list(getattr(exp.data[t], "classnames", None) or []) for t in exp.order}
    return save_merged_model(exp.backbone, weights, heads, names, card, exp.out_dir)
