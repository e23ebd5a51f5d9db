"""Magnitude trimming and sign election on task vectors (Yadav et al., "TIES-Merging", NeurIPS 2023),
shared by TIES (``task_arithmetic/ties.py``) and AdaMerging++ (``adamerging/adamerging_pools.py``).
The variants (FusionBench's off-by-one top-k, global vs per-tensor scope) are named in ``ties.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from otmf_exp.merging.task_vectors import StateDict

SCOPES = ("global", "per_tensor")


def kth_threshold(magnitudes: Tensor, density: float) -> Tensor:
    """Trim threshold for a 1-D tensor of magnitudes ``[d]`` (≥ 0): keep entries ``≥`` the result.

    Returns the ``(d − ⌊density·d⌋)``-th smallest magnitude (FusionBench's rule); 0 (keep all) when
    that index is < 1, i.e. ``density = 1``. With ``⌊density·d⌋ = 0`` only the largest entries survive.
    """
    d = magnitudes.numel()
    kth = d - int(d * density)
    if kth < 1 or d == 0:
        return magnitudes.new_zeros(())
    return magnitudes.float().kthvalue(kth).values


def trim(tv: Mapping[str, Tensor], density: float, scope: str = "global") -> StateDict:
    """Zero every entry of ``tv`` below the top-``density`` magnitude threshold (new tensors).

    ``scope="global"``: one threshold over all tensors flattened; ``"per_tensor"``: one per tensor.
    """
    if scope == "global":
        flat = torch.cat([v.detach().abs().reshape(-1).float() for v in tv.values()])
        thr = kth_threshold(flat, density)
        return {k: v * (v.abs() >= thr).to(v.dtype) for k, v in tv.items()}
    out = {}
    for k, v in tv.items():
        thr = kth_threshold(v.detach().abs().reshape(-1), density)
        out[k] = v * (v.abs() >= thr).to(v.dtype)
    return out


def elect_signs(trimmed: Sequence[Mapping[str, Tensor]], scope: str = "global") -> StateDict:
    """Elected sign per entry (values in {−1, 0, 1}): ``sign(Σ_i trimmed_i)`` with zero sums resolved.

    ``global``: zeros take ``sign(Σ of all elected signs)`` over the model (which may itself be 0);
    ``per_tensor``: zeros take the tensor's majority, ``+1`` when the tensor's signs sum to ≥ 0.
    """
    raw = {k: torch.sign(torch.stack([t[k] for t in trimmed]).sum(0)) for k in trimmed[0]}
    if scope == "global":
        majority = float(torch.sign(sum(s.double().sum() for s in raw.values())))
        return {k: torch.where(s == 0, torch.full_like(s, majority), s) for k, s in raw.items()}
    out = {}
    for k, s in raw.items():
        majority = 1.0 if float(s.double().sum()) >= 0 else -1.0
        out[k] = torch.where(s == 0, torch.full_like(s, majority), s)
    return out
