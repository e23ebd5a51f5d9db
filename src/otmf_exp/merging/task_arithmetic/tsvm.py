"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025). Reference: FusionBench 0.2.33 ``method/task_singular_vector/TSVM.py``
(``TaskSingularVectorMerging``) with ``utils/TSVM_utils.compute_and_sum_svd_mem_reduction``. Joint only.

For every matrix parameter (``matrices``: ``all_2d`` = every 2-D tensor, as the reference, which
includes embedding tables such as CLIP's position embedding or T5's ``shared``; ``linear`` = only
``nn.Linear`` weights, decided by module type as OPCM does), with the T task vectors τ_i ``[m, n]``,
k = min(m, n) and r = ``int(k · (1/T))`` (the reference's arithmetic: 0 when T > k, so such a
matrix merges to 0; float rounding may give one less than k // T):

  * τ_i = U_i S_i V_iᵀ (reduced SVD); U = [U_1[:, :r] … U_T[:, :r] 0] ``[m, k]``, s = [S_1[:r] … 0],
    Vᵀ = [V_1ᵀ[:r]; …; 0] ``[k, n]`` (the k − T·r trailing slots stay zero, as in the reference);
  * whitening: U = P_u Σ_u Q_uᵀ, Vᵀ = P_v Σ_v Q_vᵀ; the merged matrix is (P_u Q_uᵀ) diag(s) (P_v Q_vᵀ)
    (the orthogonal polar factors of the concatenations; ``multi_dot`` like the reference).

Every other parameter (and those in ``exclude_keys``) is the mean of the τ_i (the reference's running
mean v += (τ_i − v)/(i+1)). The result is scaled by ``alpha`` (reference default 1; a list of
per-task alphas applied before the SVD is not offered). SVD precision: ``svd_dtype=auto`` = the
reference's (float64 tensors in float64, every other dtype in float32), ``float64``; the result is
cast back to the parameter's dtype. All T task vectors are held at once (memory grows with T).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.schema import choice, num

MATRICES = ("all_2d", "linear")
SVD_DTYPES = ("auto", "float64")


@dataclass
class TSVMConfig:
    name: str = "tsvm"
    #: α, the scale of the merged task vector (FusionBench alpha: 1)
    alpha: float = num(1.0, ge=0)
    #: parameters merged by the SVD rule: all_2d (FusionBench: every 2-D tensor, embeddings too) |
    #: linear (nn.Linear weights only); the others take the mean of the task vectors
    matrices: str = choice("all_2d", MATRICES)
    #: parameter names that take the mean instead of the SVD rule (FusionBench exclude_keys)
    exclude_keys: list[str] | None = None
    #: SVD precision: auto (FusionBench: float64 tensors in float64, others in float32) | float64
    svd_dtype: str = choice("auto", SVD_DTYPES)


def tsv_rank(k: int, tasks: int) -> int:
    """Singular directions kept per task: ``int(k · (1/T))``, FusionBench's arithmetic."""
    return int(k * (1 / tasks))


def tsv_merge_matrix(taus: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """TSV-Merge of one matrix: T task vectors ``[m, n]`` -> merged ``[m, n]`` (unscaled), in the
    tasks' dtype. ``dtype``: SVD precision (None = float32 unless the tensors are float64)."""
    orig = taus[0].dtype
    if dtype is None:
        dtype = orig if orig in (torch.float32, torch.float64) else torch.float32
    n_tasks = len(taus)
    sum_u = sum_s = sum_vh = None
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau.to(dtype), full_matrices=False)
        if sum_u is None:
            sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        r = tsv_rank(s.shape[0], n_tasks)
        sum_u[:, i * r : (i + 1) * r] = u[:, :r]
        sum_s[i * r : (i + 1) * r] = s[:r]
        sum_vh[i * r : (i + 1) * r, :] = vh[:r, :]
        del u, s, vh
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh)).to(orig)


def running_mean(taus: Sequence[Tensor]) -> Tensor:
    """Mean of the tensors as the reference accumulates it: v₁ = τ₁, v_i = v_{i−1} + (τ_i − v_{i−1})/i."""
    out = taus[0].clone()
    for i, tau in enumerate(taus[1:], start=2):
        out += (tau - out) / i
    return out


def tsv_merge(
    tvs: Sequence[StateDict], matrices: set[str], svd_dtype: torch.dtype | None = None
) -> StateDict:
    """TSV-Merge of task vectors (unscaled): keys in ``matrices`` (2-D) by the SVD rule, the rest by the mean."""
    out = {}
    for key in tvs[0]:
        taus = [tv[key] for tv in tvs]
        out[key] = tsv_merge_matrix(taus, svd_dtype) if key in matrices else running_mean(taus)
    return out


class TSVM(MergeMethod):
    name = "tsvm"
    Config = TSVMConfig
    protocols = ("joint",)
    main_coef = "alpha"

    def matrix_names(self, pretrained: StateDict) -> set[str]:
        """The parameters merged by the SVD rule for this backbone; an unknown ``exclude_keys``
        name is refused (one line) rather than ignored."""
        excluded = set(self.cfg.exclude_keys or ())
        unknown = sorted(excluded - set(pretrained))
        if unknown:
            raise UserError(f"method.exclude_keys names no mergeable parameter: {unknown[0]!r}")
        two_d = {k for k, v in pretrained.items() if v.dim() == 2}
        if self.cfg.matrices == "linear":
            two_d &= set(self.ctx.backbone.linear_weight_names())
        return two_d - excluded

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        raise UserError("TSV-Merge is a joint method: use protocol=joint")

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        matrices = self.matrix_names(pretrained)
        # all T task vectors (memory grows with T), in dicts of our own: a key's τ_i leave them as
        # soon as that key is merged, so the merged model replaces them instead of adding to them
        tvs = [dict(t.task_vector(pretrained)) for t in tasks]
        if not tvs:
            raise UserError("TSV-Merge needs at least one task")
        n = len(tvs)
        dtype = torch.float64 if self.cfg.svd_dtype == "float64" else None
        alpha = float(self.cfg.alpha)
        merged = {}
        with torch.no_grad():
            for key in list(tvs[0]):
                taus = [tv.pop(key) for tv in tvs]
                out = tsv_merge_matrix(taus, dtype) if key in matrices else running_mean(taus)
                del taus
                merged[key] = out.mul_(alpha)  # a new tensor of tsv_merge_matrix / running_mean
            del tvs
        self.ctx.record("alpha", alpha)
        self.ctx.record("tsvm_matrices", len(matrices))
        return ContinualState(step=n, merged=merged)
