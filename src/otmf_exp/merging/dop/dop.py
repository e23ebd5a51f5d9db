"""DOP: data-free continual merging by dual projections (Tang et al., "Continual Model Merging without Data: Dual Projections for Balancing Stability and Plasticity", NeurIPS 2025).

Reference: FusionBench 0.2.33 ``method/dop/dop.py`` (``ContinualDOPForCLIP``) with the defaults of
``fusion_bench_config/method/dop/dop.yaml``. Continual only; no data, no randomness.

Step 1: θ¹ = θ_1 (τᵐ_1 = τ_1). Step t ≥ 2, with the two "models" A_0 = θᵗ⁻¹ (merged) and A_1 = θ_t:

  * every ``nn.Linear`` weight (the backbone's :meth:`linear_weight_names`): for each A_i, the SVD
    A_i − θ₀ = U S Vᵀ truncated to rank r_i (``svd_rank``); W starts at (A_0 + A_1)/2 and takes
    ``steps`` Adam steps (``lr``) on Σ_i w_i·L_i with the dual-projection loss
    L_i = ‖S_r U_rᵀ (W − A_i)‖²_F + ‖(W − A_i) V_r S_r‖²_F (``svd_proj_space`` uv | u | v).
    ``mgda``: each step, (w_0, w_1) = the min-norm point of the segment between ∇L_0/L_0 and
    ∇L_1/L_1 (Sener & Koltun's closed form, clipped to 0.999/0.001 at the ends), smoothed by an
    EMA (``ema_beta``) started at (α, 1 − α); without ``mgda``, fixed (α, 1 − α);
  * every other parameter (biases, LayerNorms, embeddings, the patch conv): (A_0 + A_1)/2, the
    pairwise mean of the reference (the first task's weight halves at every later step).

The arithmetic follows the reference op by op (float32, the same graph, the same scalar
promotions), so the merged weights agree with FusionBench's to float rounding
(``make parity``, rows ``dop`` and ``dop_f64``). Only one Linear is optimised at a time; the step holds
τᵐ, θ_t and that layer's temporaries (its W, two Adam moments and the two truncated bases).

Options for the reference's quirks (docs/methods/dop.md):
  * ``svd_rank``: ``reach`` (default) keeps the smallest r whose cumulative fraction of ΣS reaches
    ε = ``svd_epsilon``; ``below`` = FusionBench's ``searchsorted``: the count of fractions < ε, one
    fewer (rank 0 for a rank-1 task vector: that model is then not protected at all);
  * ``fusionbench_compat``: FusionBench walks leaf modules only, so parameters owned directly by a
    non-leaf module (CLIP's ``class_embedding``) stay at θ₀ from step 2 on. Default: averaged.
Where the reference divides 0/0 (a zero loss, e.g. a zero task vector) the normaliser is 1, and
the min-norm point is always taken (FusionBench fails on both and on a min-norm cost ≥ 1e8).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.runtime.progress import progress
from otmf_exp.schema import choice, num

log = logging.getLogger(__name__)

PROJ_SPACES = ("uv", "u", "v")
SVD_RANKS = ("reach", "below")


@dataclass
class DOPConfig:
    name: str = "dop"
    #: Adam learning rate of each Linear weight's optimisation
    lr: float = num(1e-4, gt=0)
    #: Adam steps per Linear weight (0: the pairwise mean)
    steps: int = num(200, ge=0)
    #: weight the two losses by MGDA's min-norm point (else fixed alpha, 1 - alpha)
    mgda: bool = True
    #: weight of the merged model's loss: fixed (mgda=false) or the EMA's start (mgda, ema)
    alpha: float = num(0.8, ge=0, le=1)
    #: smooth the MGDA weights by an exponential moving average started at (alpha, 1 - alpha)
    ema: bool = True
    #: EMA decay of the MGDA weights
    ema_beta: float = num(0.999, ge=0, le=1)
    #: fraction of the sum of singular values the projection bases keep, in [0, 1]
    svd_epsilon: float = num(0.99999, ge=0, le=1)
    #: projection space of the loss: uv (both sides) | u (left, S Uᵀ Δ) | v (right, Δ V S)
    svd_proj_space: str = choice("uv", PROJ_SPACES)
    #: truncation rank: reach (smallest r whose cumulative fraction reaches svd_epsilon) | below
    #: (FusionBench: the count of fractions below svd_epsilon, one fewer)
    svd_rank: str = choice("reach", SVD_RANKS)
    #: FusionBench's leaf-module walk: parameters owned by non-leaf modules (CLIP class token) stay θ₀
    fusionbench_compat: bool = False


def projection_basis(tv: Tensor, epsilon: float, rule: str = "reach") -> tuple[Tensor, Tensor, Tensor]:
    """(S_r ``[r]``, U_r ``[m, r]``, V_r ``[n, r]``) of a layer's task vector ``tv`` ``[m, n]``.

    The fraction ``cumsum(S)/sum(S)`` is taken in ``tv``'s dtype, as the reference does; r is the
    first index whose fraction is ≥ ε, plus one for ``reach`` (capped at min(m, n)); 0 for a zero
    ``tv``. The reduced SVD gives the same leading vectors as the reference's full one.
    """
    u, s, vh = torch.linalg.svd(tv, full_matrices=False, driver="gesvd" if tv.is_cuda else None)
    ratio = s.cumsum(dim=0) / s.sum()
    r = int(torch.searchsorted(ratio, epsilon).item())
    if rule == "reach":
        r = min(r + 1, s.numel()) if bool(s.sum() > 0) else 0
    v = vh.T
    return s[:r], u[:, :r], v[:, :r]


def dual_loss(delta: Tensor, s: Tensor, u: Tensor, v: Tensor, space: str = "uv") -> Tensor:
    """‖diag(s) Uᵀ Δ‖²_F (``u``) + ‖Δ V diag(s)‖²_F (``v``), in the reference's operation order."""
    loss = 0
    if space in ("uv", "u"):
        loss = loss + torch.linalg.matrix_norm(torch.diag(s) @ u.T @ delta, ord="fro") ** 2
    if space in ("uv", "v"):
        loss = loss + torch.linalg.matrix_norm(delta @ v @ torch.diag(s), ord="fro") ** 2
    return loss


def min_norm_weights(g0: Tensor, g1: Tensor) -> tuple[float, float]:
    """(γ, 1 − γ) minimising ‖γ·g0 + (1 − γ)·g1‖²: γ = (⟨g1,g1⟩ − ⟨g0,g1⟩)/‖g0 − g1‖², clipped to
    0.999 (⟨g0,g1⟩ ≥ ⟨g0,g0⟩) or 0.001 (⟨g0,g1⟩ ≥ ⟨g1,g1⟩) as MGDA's two-task solver does; the
    interior value and 1 − γ are float32 like the reference's."""
    v11, v12, v22 = (g0 * g0).sum(), (g0 * g1).sum(), (g1 * g1).sum()
    if v12 >= v11:
        return 0.999, 1 - 0.999
    if v12 >= v22:
        return 0.001, 1 - 0.001
    gamma = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return float(gamma), float(1 - gamma)


def optimise_linear(
    w0: Tensor, anchors: tuple[Tensor, Tensor], cfg: Any, what: str = "a Linear weight"
) -> tuple[Tensor, dict[str, float]]:
    """DOP's merged weight W of one Linear from θ₀'s ``w0`` and the two anchors (merged, new),
    all ``[m, n]`` float tensors; returns (W, diagnostics: the ranks, the weights and losses of the
    last Adam step)."""
    tvs = [a - w0 for a in anchors]
    if not all(bool(torch.isfinite(tv).all()) for tv in tvs):
        raise UserError(f"DOP {what}: the merged or the new model has non-finite weights")
    bases = [projection_basis(tv, float(cfg.svd_epsilon), cfg.svd_rank) for tv in tvs]
    del tvs
    weight = nn.Parameter(torch.stack(list(anchors), dim=0).mean(dim=0), requires_grad=True)
    opt = torch.optim.Adam([weight], lr=float(cfg.lr))
    alpha, beta = float(cfg.alpha), float(cfg.ema_beta)
    sol: list[float] = [alpha, 1 - alpha]
    values = [0.0, 0.0]
    for it in range(int(cfg.steps)):
        losses = [dual_loss(weight - a, *b, cfg.svd_proj_space) for a, b in zip(anchors, bases)]
        values = [float(x.detach()) for x in losses]
        if not all(math.isfinite(x) for x in values):
            raise NonFiniteLossError(f"DOP {what}, Adam step {it}: non-finite loss {values}; lower method.lr")
        if cfg.mgda:
            grads = [torch.autograd.grad(x, weight, retain_graph=True)[0] for x in losses]
            normed = [g / (x if x > 0 else 1.0) for g, x in zip(grads, values)]
            step_sol = min_norm_weights(*normed)
            sol = [beta * sol[i] + (1 - beta) * step_sol[i] for i in range(2)] if cfg.ema else list(step_sol)
            loss = 0
            for w, x in zip(sol, losses):
                loss += float(w) * x
        else:
            loss = 0
            loss += alpha * losses[0]
            loss += (1 - alpha) * losses[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    info = {"rank_merged": bases[0][0].numel(), "rank_new": bases[1][0].numel()}
    info |= {"weight_merged": sol[0], "loss_merged": values[0], "loss_new": values[1]}
    return weight.detach(), info


def _distinct_storages(sd: StateDict) -> bool:
    ptrs = [v.untyped_storage().data_ptr() for v in sd.values()]
    return len(set(ptrs)) == len(ptrs)


class DOP(MergeMethod):
    name = "dop"
    Config = DOPConfig
    protocols = ("continual",)
    main_coef = "alpha"

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        if state.step == 0:
            return state.advance(task.task_vector(pretrained))
        bb = self.ctx.backbone
        linear = set(bb.linear_weight_names()) & set(pretrained)
        keep = set(bb.direct_params_of_nonleaf()) & set(pretrained) if self.cfg.fusionbench_compat else set()
        if not linear:
            log.warning("DOP: the backbone reports no linear weights; every parameter is averaged")
        theta = task.weights
        in_place = task.owned and _distinct_storages(theta)  # reuse θ_t's buffers for τ
        out: StateDict = {}
        infos: list[dict[str, float]] = []
        bar = progress(
            pretrained.items(), desc=f"DOP step {state.step + 1}", enabled=self.ctx.progress, leave=False
        )
        for k, w0 in bar:
            new = self._merge_one(k, w0, state.merged[k], theta[k], k in linear, k in keep, infos)
            if in_place:
                with torch.no_grad():
                    theta[k].copy_(new)
                new = theta[k]
            out[k] = new
        if in_place:
            task.weights = None  # now τᵐ, not θ_t
        if infos:
            for key in infos[0]:
                self.ctx.record(f"dop_{key}_mean", sum(i[key] for i in infos) / len(infos))
        return state.advance(out)

    def _merge_one(
        self, k: str, w0: Tensor, tv_m: Tensor, w_t: Tensor, is_linear: bool, is_kept: bool, infos: list
    ) -> Tensor:
        """The new τᵐ of parameter ``k`` (θ₀'s dtype) from θ₀, τᵐ_{t−1} and θ_t."""
        if is_kept:
            return torch.zeros_like(w0)
        dtype = torch.promote_types(w0.dtype, torch.float32)
        base = w0.detach().to(dtype)
        anchors = ((base + tv_m.detach().to(dtype)), w_t.detach().to(dtype))
        if is_linear and w0.dim() == 2:
            with torch.enable_grad():
                merged, info = optimise_linear(base, anchors, self.cfg, k)
            infos.append(info)
        else:
            with torch.no_grad():
                merged = torch.stack(list(anchors), dim=0).mean(dim=0)
        with torch.no_grad():
            return (merged - base).to(w0.dtype)
