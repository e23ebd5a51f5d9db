"""Task-vector algebra on state dicts (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

A *state dict* here is ``dict[str, Tensor]`` restricted to the mergeable floating-point
parameters of a backbone (see ``Backbone.mergeable_names``). All functions are pure: inputs
are never modified in place, outputs are new tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def check_compatible(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "state dicts") -> None:
    """Raise ``ValueError`` naming the first key or shape that differs between ``a`` and ``b``."""
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        key = missing[0] if missing else extra[0]
        raise ValueError(f"{what} differ in parameter names (first: {key!r})")
    for k, v in a.items():
        if v.shape != b[k].shape:
            raise ValueError(f"{what} differ in shape at {k!r}: {tuple(v.shape)} vs {tuple(b[k].shape)}")


def task_vector(finetuned: Mapping[str, Tensor], pretrained: Mapping[str, Tensor]) -> StateDict:
    """τ = θ_ft − θ₀ (same keys and shapes)."""
    check_compatible(finetuned, pretrained)
    return {k: finetuned[k] - pretrained[k] for k in pretrained}


def apply(pretrained: Mapping[str, Tensor], tv: Mapping[str, Tensor], scale: float = 1.0) -> StateDict:
    """θ = θ₀ + scale · τ."""
    return {k: pretrained[k] + scale * tv[k] for k in pretrained}


def zeros_like(sd: Mapping[str, Tensor]) -> StateDict:
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], wa: float = 1.0, wb: float = 1.0) -> StateDict:
    """wa·a + wb·b, key by key."""
    return {k: wa * a[k] + wb * b[k] for k in a}


def scale(sd: Mapping[str, Tensor], s: float) -> StateDict:
    return {k: s * v for k, v in sd.items()}


def global_norm(sd: Mapping[str, Tensor]) -> float:
    """L2 norm of all tensors flattened and concatenated (float64 per tensor, then an exactly
    rounded sum: the result does not depend on the key order, e.g. of a state read back from a
    checkpoint)."""
    return math.fsum(float(v.double().pow(2).sum()) for v in sd.values()) ** 0.5


def flatten(sd: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> Tensor:
    """Concatenate the flattened tensors in key order."""
    keys = list(sd) if keys is None else list(keys)
    return torch.cat([sd[k].reshape(-1) for k in keys])


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> StateDict:
    """Inverse of :func:`flatten` for the keys and shapes of ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i : i + n].view_as(v).to(v.dtype)
        i += n
    return out


def num_bytes(sd: Mapping[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())
