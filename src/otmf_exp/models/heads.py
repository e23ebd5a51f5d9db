"""CLIP zero-shot classification heads, cached on disk (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision"; the task_vectors protocol of Ilharco et al. 2023).

For each class: format every template, encode with the pre-trained text tower + projection,
L2-normalise each embedding, average over templates, renormalise. The head ``[C, D]`` is those
rows times ``logit_scale.exp()``, so ``logits = normalize(image_embed) @ head.T``.

Cache: ``$OTMF_EXP_CACHE/heads/<backbone>/<task>-<hash>.safetensors`` where the hash covers the
backbone id, the pre-trained weights' location/size/mtime, the class names and the templates --
so a changed class list, prompt or model never reuses a stale head.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from otmf_exp.hub import resolve
from otmf_exp.runtime import digest, files

log = logging.getLogger(__name__)


@torch.no_grad()
def build_head(
    encode_text: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    logit_scale: float,
    batch_size: int = 256,
) -> Tensor:
    """Zero-shot head ``[C, D]`` (float32) from ``encode_text(list of prompts) -> [N, D]``."""
    if not classnames or not templates:
        raise ValueError("a zero-shot head needs at least one class name and one template")
    texts = [t.format(c=c) for c in classnames for t in templates]
    embs = torch.cat(
        [
            F.normalize(encode_text(texts[i : i + batch_size]).float(), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
    )
    rows = F.normalize(embs.view(len(classnames), len(templates), -1).mean(1), dim=-1)
    return float(logit_scale) * rows


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def cached_head(backbone_key: str, weights_fp: Any, task: Any, compute: Callable[[], Tensor]) -> Tensor:
    """Load the head of ``task`` (needs ``name``, ``classnames``, ``templates``) from the cache or compute it."""
    from safetensors.torch import load_file, save_file

    key = resolve.fingerprint(backbone_key, weights_fp, list(task.classnames), list(task.templates))
    path = resolve.cache_root() / "heads" / _safe(backbone_key) / f"{_safe(task.name)}-{key}.safetensors"
    if path.is_file():
        try:
            head = load_file(str(path))["head"]
            digest.record(path)  # part of the run's model identity (metrics.json, checkpoints)
            return head
        except Exception as e:  # a corrupt cache entry is rebuilt, never fatal
            log.warning("ignoring unreadable cached head %s (%s)", path, e)
    head = compute().detach().float().cpu().contiguous()
    try:
        with files.atomic_path(path) as tmp:
            save_file({"head": head}, str(tmp))
        digest.record(path)
    except OSError as e:
        log.warning("could not cache the zero-shot head at %s (%s)", path, e)
    return head
