"""Consensus Task Arithmetic with TALL masks (Wang et al., "Localizing Task Information for Improved
Model Merging and Compression", ICML 2024).

TALL mask of task i (element-wise; τ_MTL = Σ_j τ_j, the unscaled sum; ``tall_mask_lambda`` λ_t):

    m_i = |θ₀ − θ_i| > λ_t·|θ_MTL − θ_i|,   θ_MTL = θ₀ + τ_MTL   (i.e. |τ_i| > λ_t·|τ_MTL − τ_i|)

computed in this weight form, as FusionBench 0.2.33 ``method/tall_mask/utils.py``
``generate_task_masks`` does (strict ``>``; the paper writes ``≥``: ``inclusive=true``). Every
mergeable tensor is masked entry by entry, whatever its shape; there is no per-tensor threshold.
Consensus mask: the entries kept by at least ``k`` task masks (``construct_consensus_mask``:
count ≥ k; k = 2 drops "catastrophic" and "selfish" weights, k = 0 is plain TA).

  * joint (Consensus TA; the ``consensus`` method of the TALL code, GitHub nik-dim/tall_masks, whose
    mask construction FusionBench ships): θ = θ₀ + λ·(τ_MTL ⊙ consensus). Needs all T models at once
    (memory grows with T). The TALL code picks λ_t per task and λ on validation; here they are fixed:
    λ_t 0.6 (FusionBench ``tall_mask/task_arithmetic.yaml``), λ 0.3 (FusionBench's TA default).
  * continual (MINGLE's ``ContinualConsensusTAForCLIP``, GitHub zihuanqiu/MINGLE, the "Consensus TA"
    rows of MINGLE Table 1): θ¹ = θ₀ + λ·τ_1 (unmasked); for t ≥ 2 the two "tasks" are τᵐ = θᵗ⁻¹ − θ₀
    and τ_t: τ_MTL = τᵐ + τ_t, m_t = TALL mask of θ_t, consensus = (m_old + m_t) ≥ k and
    θᵗ = θᵗ⁻¹ + λ·(τ_MTL ⊙ consensus) (the merged vector re-enters the update, as in FusionBench's
    continual TIES). There the merged vector's mask m_old is all ones and never updated
    (``merged_mask=ones``, default: with k = 2 the consensus is m_t alone); ``merged_mask=tall``
    gives it its own TALL mask |τᵐ| > λ_t·|τ_MTL − τᵐ|. Defaults: λ 0.1, λ_t 0.2, k 2 (MINGLE's
    ``consensus_ta.yaml``). One merged vector is carried: constant state.

``fusionbench_mask_bug``: FusionBench 0.2.33 ``tall_mask/task_arithmetic.py`` (TALL-mask
compression) passes θ₀ and τ_i where θ₀ and θ_i belong, i.e. m_i = |θ₀ − τ_i| > λ_t·|τ_MTL − τ_i|
(a comparison against the pre-trained weights' magnitude); true reproduces that rule (both protocols).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, MethodContext, TaskInput
from otmf_exp.merging.task_vectors import StateDict, check_compatible, scale
from otmf_exp.schema import choice, num

MERGED_MASKS = ("ones", "tall")
#: protocol defaults of the null options: (λ, λ_t)
DEFAULTS = {"joint": (0.3, 0.6), "continual": (0.1, 0.2)}


@dataclass
class ConsensusConfig:
    name: str = "consensus"
    #: λ of the final task arithmetic; null = the protocol default (0.3 joint, 0.1 continual = MINGLE)
    scaling: float | None = num(None, ge=0)
    #: λ_t of the TALL masks; null = 0.6 joint (FusionBench tall_mask yaml), 0.2 continual (MINGLE yaml)
    tall_mask_lambda: float | None = num(None, ge=0)
    #: consensus threshold: keep an entry when at least k masks keep it (2: the paper; 0: plain TA)
    k: int = num(2, ge=0)
    #: false: strict > (FusionBench / TALL / MINGLE code) | true: >= (the paper's formula)
    inclusive: bool = False
    #: FusionBench tall_mask/task_arithmetic.py's rule |θ₀ − τ_i| > λ_t·|τ_MTL − τ_i| (a bug; off by default)
    fusionbench_mask_bug: bool = False
    #: continual only: mask of the merged vector, ones (MINGLE: all ones, never updated) | tall
    merged_mask: str = choice("ones", MERGED_MASKS)


def tall_mask(theta0: Tensor, theta_i: Tensor, multi: Tensor, lam: float, inclusive: bool = False) -> Tensor:
    """TALL mask ``|θ₀ − θ_i| > λ·|θ_MTL − θ_i|`` (``≥`` if ``inclusive``), bool, ``theta0``'s shape.

    With ``fusionbench_mask_bug`` the caller passes τ_i for θ_i and τ_MTL for θ_MTL."""
    a = (theta0 - theta_i).abs()
    b = (multi - theta_i).abs() * lam
    return a >= b if inclusive else a > b


def consensus_joint(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    lam: float,
    k: int,
    inclusive: bool = False,
    mask_bug: bool = False,
) -> tuple[StateDict, int]:
    """τ_MTL ⊙ consensus (unscaled) for fine-tuned weights θ_1..θ_T, tensor by tensor (temporaries
    of one tensor × T), and the number of entries kept."""
    out, kept = {}, 0
    for key, th0 in pretrained.items():
        thetas = [f[key] for f in finetuned]
        taus = torch.stack([th - th0 for th in thetas])
        total = taus.sum(0)
        count = torch.zeros(total.shape, dtype=torch.int32, device=total.device)
        multi = total if mask_bug else th0 + total
        for th, tau in zip(thetas, taus):
            count += tall_mask(th0, tau if mask_bug else th, multi, lam, inclusive)
        keep = count >= k
        kept += int(keep.sum())
        out[key] = total * keep.to(total.dtype)
    return out, kept


def consensus_step(
    merged: Mapping[str, Tensor],
    finetuned: dict[str, Tensor],
    pretrained: Mapping[str, Tensor],
    lam: float,
    k: int,
    scaling: float,
    inclusive: bool = False,
    mask_bug: bool = False,
    merged_mask: str = "ones",
    consume: bool = False,
) -> tuple[StateDict, int]:
    """MINGLE's continual step: τᵐ_t = τᵐ_{t−1} + λ·((τᵐ_{t−1} + τ_t) ⊙ consensus) for θ_t =
    ``finetuned``; returns (τᵐ_t, entries kept). ``consume`` pops ``finetuned``'s tensors as they are
    used (a step then holds τᵐ_{t−1}, the rest of θ_t and τᵐ_t)."""
    out, kept = {}, 0
    for key, th0 in pretrained.items():
        th = finetuned.pop(key) if consume else finetuned[key]
        m = merged[key]
        tau = th - th0
        total = m + tau
        if mask_bug:
            count = tall_mask(th0, tau, total, lam, inclusive).to(torch.int32)
        else:
            count = tall_mask(th0, th, th0 + total, lam, inclusive).to(torch.int32)
        del th
        if merged_mask == "ones":
            count += 1
        else:
            b = (total - m).abs() * lam
            count += m.abs() >= b if inclusive else m.abs() > b
        keep = count >= k
        kept += int(keep.sum())
        out[key] = m + scaling * (total * keep.to(total.dtype))
    return out, kept


class Consensus(MergeMethod):
    name = "consensus"
    Config = ConsensusConfig
    protocols = ("continual", "joint")
    main_coef = "scaling"

    def __init__(self, cfg: Any, ctx: MethodContext, protocol: str = "continual") -> None:
        super().__init__(cfg, ctx, protocol)
        if protocol != "continual" and cfg.merged_mask != "ones":
            raise UserError("method.merged_mask applies to the continual protocol only; remove it")

    def _coefs(self) -> tuple[float, float]:
        d_scaling, d_lam = DEFAULTS[self.protocol]
        s, lam = self.cfg.scaling, self.cfg.tall_mask_lambda
        return float(d_scaling if s is None else s), float(d_lam if lam is None else lam)

    def _record(self, scaling: float, lam: float, kept: int, merged: StateDict) -> None:
        self.ctx.record("scaling", scaling)
        self.ctx.record("tall_mask_lambda", lam)
        self.ctx.record("consensus_kept_fraction", kept / max(1, sum(v.numel() for v in merged.values())))

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        scaling, lam = self._coefs()
        if state.step == 0:  # MINGLE: the first model enters unmasked
            merged = scale(task.task_vector(pretrained), scaling)
            self._record(scaling, lam, sum(v.numel() for v in merged.values()), merged)
            return state.advance(merged)
        check_compatible(task.weights, pretrained)
        c = self.cfg
        with torch.no_grad():  # an owned θ_t is consumed tensor by tensor
            merged, kept = consensus_step(
                state.merged, task.weights, pretrained, lam, c.k, scaling,
                c.inclusive, c.fusionbench_mask_bug, c.merged_mask, consume=task.owned,
            )  # fmt: skip
        self._record(scaling, lam, kept, merged)
        return state.advance(merged)

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        finetuned = []
        for t in tasks:  # all T models at once: memory grows with T
            check_compatible(t.weights, pretrained)
            finetuned.append(t.weights)
        if not finetuned:
            raise UserError("Consensus TA joint merge needs at least one task")
        scaling, lam = self._coefs()
        c = self.cfg
        with torch.no_grad():
            masked, kept = consensus_joint(
                pretrained, finetuned, lam, c.k, c.inclusive, c.fusionbench_mask_bug
            )
        n = len(finetuned)
        del finetuned
        merged = scale(masked, scaling)
        self._record(scaling, lam, kept, merged)
        return ContinualState(step=n, merged=merged)
