"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

TIES(τ_1..τ_n) = disjoint_merge(trim(τ_i), elect_sign(trim(τ_i))). The variants differ between
libraries; each is named here and pinned by ``tests/test_ties.py``:

* **trim** -- keep the entries with ``|τ| ≥ kth``, the ``(d − ⌊density·d⌋)``-th smallest magnitude
  (entries tied with it are kept too, so ⌊density·d⌋ + 1 entries survive when magnitudes are
  distinct; ``density`` is a fraction). This is FusionBench's ``topk_values_mask`` (from the
  AdaMerging/TIES code), off-by-one included. ``topk_scope``:
  ``global`` = d over the whole flattened task vector (FusionBench, the original TIES code; the default),
  ``per_tensor`` = d per parameter tensor (the peft / mergekit variant).
* **elect** -- sign of the sum of the trimmed vectors. Zero sums take the majority sign
  ``sign(Σ elected signs)``: over the whole model for ``global`` (FusionBench ``resolve_zero_signs``;
  a zero majority stays 0, which then selects negative entries, exactly as there), per tensor for
  ``per_tensor`` (peft ``calculate_majority_sign_mask``: a zero majority counts as +1).
* **disjoint merge** of the entries agreeing with the elected sign: ``sum`` (FusionBench default),
  ``mean`` (the paper: sum / number of agreeing non-zero entries), ``max`` (largest agreeing
  magnitude times the elected sign).

Protocols (``scaling`` λ; ``null`` = 0.3 joint, 0.5 continual):
  * joint: θ = θ₀ + λ·TIES(τ_1..τ_T). Needs all T task vectors at once: memory grows with T.
  * continual (FusionBench ``ContinualTiesMergingForCLIP``): θ¹ = θ₀ + λ·τ_1 (untrimmed, as there),
    θᵗ = θᵗ⁻¹ + λ·TIES([θᵗ⁻¹ − θ₀, τ_t]). One merged vector in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.sparsify import SCOPES, elect_signs, trim
from otmf_exp.merging.task_vectors import StateDict, add, scale, task_vector
from otmf_exp.schema import choice, num

log = logging.getLogger(__name__)

MERGES = ("sum", "mean", "max")
DEFAULT_SCALING = {"joint": 0.3, "continual": 0.5}


@dataclass
class TiesConfig:
    name: str = "ties"
    #: λ; null = the protocol default (0.3 joint, 0.5 continual)
    scaling: float | None = num(None, ge=0)
    #: fraction of entries kept by the trim step, in (0, 1]
    density: float = num(0.2, gt=0, le=1)
    #: global: top-k over the flattened task vector (FusionBench) | per_tensor (peft / mergekit)
    topk_scope: str = choice("global", SCOPES)
    #: sum (FusionBench) | mean (original paper) | max
    merge: str = choice("sum", MERGES)


def disjoint_merge(
    trimmed: Sequence[Mapping[str, Tensor]], signs: Mapping[str, Tensor], merge: str = "sum"
) -> StateDict:
    """Aggregate, per entry, the trimmed values whose sign agrees with ``signs`` (>0: positive ones,
    otherwise negative ones): ``sum``, ``mean`` over the agreeing non-zero values, or ``max``
    magnitude times the elected sign. Shapes follow ``signs``.
    """
    out = {}
    for k, s in signs.items():
        v = torch.stack([t[k] for t in trimmed])
        keep = torch.where(s.unsqueeze(0) > 0, v > 0, v < 0)
        sel = v * keep.to(v.dtype)
        if merge == "sum":
            out[k] = sel.sum(0)
        elif merge == "mean":
            out[k] = sel.sum(0) / (sel != 0).sum(0).clamp(min=1).to(v.dtype)
        elif merge == "max":
            out[k] = sel.abs().max(0).values * s
        else:
            raise ValueError(f"unknown TIES merge {merge!r}; use one of {MERGES}")
    return out


def ties_merge(
    tvs: Sequence[Mapping[str, Tensor]], density: float, scope: str = "global", merge: str = "sum"
) -> StateDict:
    """TIES(τ_1..τ_n): trim each task vector, elect signs, disjoint-merge (unscaled; same keys/shapes)."""
    trimmed = [trim(tv, density, scope) for tv in tvs]
    return disjoint_merge(trimmed, elect_signs(trimmed, scope), merge)


class Ties(MergeMethod):
    name = "ties"
    Config = TiesConfig
    protocols = ("continual", "joint")
    main_coef = "scaling"

    @property
    def scaling(self) -> float:
        s = self.cfg.scaling
        return DEFAULT_SCALING.get(self.protocol, 0.5) if s is None else float(s)

    def _ties(self, tvs: Sequence[Mapping[str, Tensor]]) -> StateDict:
        return ties_merge(tvs, self.cfg.density, self.cfg.topk_scope, self.cfg.merge)

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        tv = task.task_vector(pretrained)
        lam = self.scaling
        if state.step == 0:  # FusionBench: the first model enters untrimmed
            merged = scale(tv, lam)
        else:
            merged = add(state.merged, self._ties([state.merged, tv]), 1.0, lam)
        self.ctx.record("scaling", lam)
        return state.advance(merged)

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        tvs = [task_vector(t.weights, pretrained) for t in tasks]  # all T task vectors: memory grows with T
        if not tvs:
            raise UserError("TIES joint merge needs at least one task")
        lam = self.scaling
        self.ctx.record("scaling", lam)
        return ContinualState(step=len(tvs), merged=scale(self._ties(tvs), lam))
