"""OPCM: orthogonal-projection continual merging (Tang et al., "Merging Models on the Fly Without
Retraining: A Sequential Approach to Scalable Continual Model Merging", arXiv 2501.09522).
Reference implementation: FusionBench 0.2.33 ``method/opcm`` (``OPCMForCLIP``). Continual only.

Step 1: τᵐ_1 = τ_1, λ_1 = 1, norms = [‖τ_1‖]. Step t ≥ 2 (‖·‖ = global L2 norm over all tensors):

  * every 2-D weight of an ``nn.Linear`` (decided by the backbone's module structure):
    Δ_m = τᵐ_{t−1}, Δ_t = τ_t, Δ_m = U S Vᵀ, r = first (0-based) index k with
    cumsum(S)[k]/sum(S) > α (0 if none or Δ_m = 0); P = Uᵀ Δ_t V with its main diagonal and its
    top-left r×r block zeroed; Δ̃_t = U P Vᵀ; τ = λ_{t−1}·Δ_m + Δ̃_t;
  * every other parameter: τ = λ_{t−1}·τᵐ_{t−1} + τ_t;
  * adaptive scaling: avg = mean(norms + [‖τ_t‖]), n = ‖τ‖, λ_t = n/avg, τᵐ_t = τ·avg/n.

The reduced SVD (``full_matrices=False``, U ``[m,k]``, V ``[n,k]``, k = min(m,n)) gives exactly the
full-SVD result: with full U = [U_k U_⊥], V = [V_k V_⊥] orthogonal, U P Vᵀ = Δ_t, and every
zeroed entry (the min(m,n)-long diagonal and the r×r block, r < k) lies in the top-left k×k block
U_kᵀ Δ_t V_k; so Δ̃_t = Δ_t − U_k E V_kᵀ with E those entries. The columns U_⊥, V_⊥ (arbitrary in
a full SVD) never enter. The SVD runs in ``svd_dtype`` (float64 default; FusionBench uses the
model dtype) and the cumulative ratio uses sum(S) = cumsum(S)[-1], so α ≥ 1 never zeroes a block.

``fusionbench_compat``: FusionBench walks leaf modules only, so parameters owned directly by a
non-leaf module (CLIP's ``class_embedding``) are left out of the per-layer rule: they keep τᵐ_{t−1}
(the first model's value at step 2) and then take the global rescale by avg/n like every other
parameter (FusionBench rescales all ``named_parameters``). Default: merge them as "other".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict, global_norm, scale

log = logging.getLogger(__name__)

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class OPCMConfig:
    name: str = "opcm"
    #: split-rank threshold on the cumulative singular-value fraction (≥ 1: only the diagonal is removed)
    alpha: float = 0.5
    #: keep parameters owned directly by non-leaf modules (CLIP class token) out of the per-layer rule
    fusionbench_compat: bool = False
    #: float64 | float32 (FusionBench: the model dtype)
    svd_dtype: str = "float64"


def split_rank(s: Tensor, alpha: float) -> int:
    """First 0-based index k with ``cumsum(s)[k] / sum(s) > alpha`` for singular values ``s`` ``[k]``
    (≥ 0, descending); 0 if there is none or ``s`` is all zero."""
    if s.numel() == 0:
        return 0
    c = s.double().cumsum(0)
    total = c[-1]
    if not total > 0:
        return 0
    hits = torch.nonzero(c / total > alpha)
    return int(hits[0]) if len(hits) else 0


def project_out(
    delta_m: Tensor, delta_t: Tensor, alpha: float, svd_dtype: torch.dtype = torch.float64
) -> tuple[Tensor, int]:
    """OPCM's cleaned update Δ̃_t ``[m, n]`` of one linear weight and the split rank r.

    Args:
        delta_m: merged task vector of the layer, ``[m, n]``.
        delta_t: new task vector of the layer, ``[m, n]``.
        alpha: split threshold (see :func:`split_rank`).
    Returns:
        (Δ̃_t in ``delta_t``'s dtype, r) where Uᵀ Δ̃_t V has a zero diagonal and a zero r×r top-left block.
    """
    dm, dt = delta_m.to(svd_dtype), delta_t.to(svd_dtype)
    u, s, vh = torch.linalg.svd(dm, full_matrices=False)
    r = split_rank(s, alpha)
    p = u.T @ dt @ vh.T  # [k, k], the top-left block of the full projection
    removed = torch.diag_embed(torch.diagonal(p))
    removed[:r, :r] = p[:r, :r]
    cleaned = dt - u @ removed @ vh
    return cleaned.to(delta_t.dtype), r


def opcm_merge(
    merged_tv: Mapping[str, Tensor],
    new_tv: Mapping[str, Tensor],
    linear: set[str],
    keep: set[str],
    lam_prev: float,
    alpha: float,
    svd_dtype: torch.dtype = torch.float64,
) -> tuple[StateDict, dict[str, int]]:
    """The per-layer OPCM update before rescaling: τ = λ_{t−1}·τᵐ + (Δ̃_t for keys in ``linear``,
    τ_t otherwise); keys in ``keep`` stay τᵐ (FusionBench compat). Returns (τ, split rank per linear key)."""
    out: StateDict = {}
    ranks: dict[str, int] = {}
    for k, m in merged_tv.items():
        if k in keep:
            out[k] = m.clone()
        elif k in linear and m.dim() == 2:
            cleaned, ranks[k] = project_out(m, new_tv[k], alpha, svd_dtype)
            out[k] = lam_prev * m + cleaned
        else:
            out[k] = lam_prev * m + new_tv[k]
    return out, ranks


def rescale_to(tv: Mapping[str, Tensor], target_norm: float) -> tuple[StateDict, float]:
    """Scale ``tv`` to global norm ``target_norm``; returns (scaled τ, λ = ‖tv‖/target). A zero ``tv``
    (or zero target) is returned unchanged with λ = 1."""
    n = global_norm(tv)
    if n == 0.0 or target_norm == 0.0:
        log.warning("OPCM: zero merged or average task-vector norm; skipping the adaptive rescale")
        return {k: v.clone() for k, v in tv.items()}, 1.0
    return scale(tv, target_norm / n), n / target_norm


class OPCM(MergeMethod):
    name = "opcm"
    Config = OPCMConfig
    protocols = ("continual",)
    main_coef = "alpha"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if not (math.isfinite(cfg.alpha) and cfg.alpha >= 0):
            raise UserError(f"method.alpha must be a finite number >= 0, got {cfg.alpha}")
        if cfg.svd_dtype not in SVD_DTYPES:
            raise UserError(f"method.svd_dtype must be one of {list(SVD_DTYPES)}, got {cfg.svd_dtype!r}")

    def _layer_sets(self, keys: set[str]) -> tuple[set[str], set[str]]:
        bb = self.ctx.backbone
        linear = set(bb.linear_weight_names()) & keys
        keep = set(bb.direct_params_of_nonleaf()) & keys if self.cfg.fusionbench_compat else set()
        return linear, keep

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        tv = task.task_vector(pretrained)
        norm = global_norm(tv)
        if state.step == 0:
            self.ctx.record("opcm_lambda", 1.0)
            return state.advance(tv, scalars={"opcm_lambda": 1.0, "opcm_norms": [norm]})
        norms = [*state.scalars["opcm_norms"], norm]
        avg = sum(norms) / len(norms)
        linear, keep = self._layer_sets(set(tv))
        if not linear:
            log.warning("OPCM: the backbone reports no linear weights; every parameter uses the plain rule")
        merged, ranks = opcm_merge(
            state.merged,
            tv,
            linear,
            keep,
            float(state.scalars["opcm_lambda"]),
            float(self.cfg.alpha),
            SVD_DTYPES[self.cfg.svd_dtype],
        )
        merged, lam = rescale_to(merged, avg)
        self.ctx.record("opcm_lambda", lam)
        self.ctx.record("opcm_avg_norm", avg)
        if ranks:
            self.ctx.record("opcm_split_rank_mean", sum(ranks.values()) / len(ranks))
        return state.advance(merged, scalars={"opcm_lambda": lam, "opcm_norms": norms})
