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
a full SVD) never enter. The SVD runs on the tensors' device with torch's driver for it, in
``svd_dtype``: ``auto`` (default) = float32, except a layer whose cumulative ratio at the split lies
within ``AUTO_MARGIN`` of α, which is redone in float64 (the only place float32 rounding can change
a discrete decision); ``float32`` (FusionBench: the model dtype); ``float64`` (the exact reference).
The cumulative ratio uses sum(S) = cumsum(S)[-1], so α ≥ 1 never zeroes a block. The update is
written into τ_t's own buffers and rescaled in place: a step holds τᵐ_{t−1}, τ_t and one layer's
SVD temporaries, never a float64 copy of the model.

``fusionbench_compat``: FusionBench walks leaf modules only, so parameters owned directly by a
non-leaf module (CLIP's ``class_embedding``) are left out of the per-layer rule: they keep τᵐ_{t−1}
(the first model's value at step 2) and then take the global rescale by avg/n like every other
parameter (FusionBench rescales all ``named_parameters``). Default: merge them as "other".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict, global_norm
from otmf_exp.schema import choice, num

log = logging.getLogger(__name__)

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64, "auto": torch.float32}
#: ``auto``: a float32 split whose cumulative ratio lies this close to α is recomputed in float64
AUTO_MARGIN = 1e-4


@dataclass
class OPCMConfig:
    name: str = "opcm"
    #: split-rank threshold on the cumulative singular-value fraction (≥ 1: only the diagonal is removed)
    alpha: float = num(0.5, ge=0)
    #: keep parameters owned directly by non-leaf modules (CLIP class token) out of the per-layer rule
    fusionbench_compat: bool = False
    #: SVD precision: auto (float32, a layer whose split rank is within AUTO_MARGIN of α is redone in
    #: float64) | float32 (FusionBench: the model dtype) | float64 (the exact reference)
    svd_dtype: str = choice("auto", SVD_DTYPES)


def split_rank(s: Tensor, alpha: float) -> int:
    """First 0-based index k with ``cumsum(s)[k] / sum(s) > alpha`` for singular values ``s`` ``[k]``
    (≥ 0, descending); 0 if there is none or ``s`` is all zero."""
    r, _ = _split(s, alpha)
    return r


def _split(s: Tensor, alpha: float) -> tuple[int, float]:
    """(split rank, distance of the cumulative ratio to α at the decision: the smaller of the two
    ratios around the boundary); the distance is ``inf`` when there is nothing to decide."""
    if s.numel() == 0:
        return 0, float("inf")
    c = s.double().cumsum(0)
    total = c[-1]
    if not total > 0:
        return 0, float("inf")
    ratio = c / total
    hits = torch.nonzero(ratio > alpha)
    r = int(hits[0]) if len(hits) else 0
    near = ratio[max(r - 1, 0) : r + 1] - alpha
    return r, float(near.abs().min()) if len(hits) else float("inf")


def project_out(
    delta_m: Tensor, delta_t: Tensor, alpha: float, svd_dtype: str | torch.dtype = torch.float64
) -> tuple[Tensor, int]:
    """OPCM's cleaned update Δ̃_t ``[m, n]`` of one linear weight and the split rank r.

    Args:
        delta_m: merged task vector of the layer, ``[m, n]``.
        delta_t: new task vector of the layer, ``[m, n]``.
        alpha: split threshold (see :func:`split_rank`).
        svd_dtype: float64 | float32 | ``"auto"`` (float32; float64 when the split is within
            :data:`AUTO_MARGIN` of α, where float32 rounding could move r).
    Returns:
        (Δ̃_t in ``delta_t``'s dtype, r) where Uᵀ Δ̃_t V has a zero diagonal and a zero r×r top-left block.
    """
    correction, r = removed_part(delta_m, delta_t, alpha, svd_dtype)
    return (delta_t - correction).to(delta_t.dtype), r


def removed_part(
    delta_m: Tensor, delta_t: Tensor, alpha: float, svd_dtype: str | torch.dtype = torch.float64
) -> tuple[Tensor, int]:
    """``U_k E V_kᵀ`` (in ``delta_t``'s dtype): the part of Δ_t that OPCM removes (E = the diagonal
    and the r×r top-left block of U_kᵀ Δ_t V_k), and r. Temporaries are one layer's size."""
    auto = svd_dtype == "auto"
    dtype = SVD_DTYPES[svd_dtype] if isinstance(svd_dtype, str) else svd_dtype
    u, s, vh = torch.linalg.svd(delta_m.to(dtype), full_matrices=False)
    r, margin = _split(s, alpha)
    if auto and margin < AUTO_MARGIN:  # float32 rounding could move the split: decide it exactly
        dtype = torch.float64
        u, s, vh = torch.linalg.svd(delta_m.to(dtype), full_matrices=False)
        r, _ = _split(s, alpha)
    del s
    p = u.T @ delta_t.to(dtype) @ vh.T  # [k, k], the top-left block of the full projection
    removed = torch.diag_embed(torch.diagonal(p))
    removed[:r, :r] = p[:r, :r]
    del p
    return (u @ removed @ vh).to(delta_t.dtype), r


def opcm_merge(
    merged_tv: Mapping[str, Tensor],
    new_tv: StateDict,
    linear: set[str],
    keep: set[str],
    lam_prev: float,
    alpha: float,
    svd_dtype: str | torch.dtype = torch.float64,
) -> tuple[StateDict, dict[str, int]]:
    """The per-layer OPCM update before rescaling, written INTO ``new_tv``'s tensors (no new
    weight-sized buffers): τ = λ_{t−1}·τᵐ + (Δ̃_t for keys in ``linear``, τ_t otherwise); keys in
    ``keep`` become τᵐ (FusionBench compat). ``merged_tv`` is not modified. Returns (``new_tv``, split
    rank per linear key)."""
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for k, m in merged_tv.items():
            out = new_tv[k]
            if k in keep:
                out.copy_(m)
                continue
            if k in linear and m.dim() == 2:
                correction, ranks[k] = removed_part(m, out, alpha, svd_dtype)
                out.sub_(correction)
                del correction
            out.add_(m, alpha=lam_prev)
    return new_tv, ranks


def rescale_to(tv: StateDict, target_norm: float) -> tuple[StateDict, float]:
    """Scale ``tv`` IN PLACE to global norm ``target_norm``; returns (``tv``, λ = ‖tv‖/target). A zero
    ``tv`` (or zero target) is left unchanged with λ = 1."""
    n = global_norm(tv)
    if n == 0.0 or target_norm == 0.0:
        log.warning("OPCM: zero merged or average task-vector norm; skipping the adaptive rescale")
        return tv, 1.0
    with torch.no_grad():
        for v in tv.values():
            v.mul_(target_norm / n)
    return tv, n / target_norm


class OPCM(MergeMethod):
    name = "opcm"
    Config = OPCMConfig
    protocols = ("continual",)
    main_coef = "alpha"

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
            self.cfg.svd_dtype,
        )
        merged, lam = rescale_to(merged, avg)
        self.ctx.record("opcm_lambda", lam)
        self.ctx.record("opcm_avg_norm", avg)
        if ranks:
            self.ctx.record("opcm_split_rank_mean", sum(ranks.values()) / len(ranks))
        return state.advance(merged, scalars={"opcm_lambda": lam, "opcm_norms": norms})
