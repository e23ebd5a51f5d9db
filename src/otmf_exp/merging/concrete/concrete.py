"""Concrete subspace learning (Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion", 2023).

One shared Concrete (relaxed Bernoulli) mask m over every mergeable parameter, logits x initialised
to ``initial_logits``; each step samples m = σ((log u − log(1−u) + log p − log(1−p)) / T) with
p = σ(x), u ~ U(0, 1) (``torch.distributions.RelaxedBernoulli(logits=x, temperature=T).rsample()``,
drawn from this method's own seeded generator), rescales each tensor to m / mean(m), and learns x by
Adam on the summed prediction entropy of one unlabeled batch per task (FusionBench 0.2.33
``concrete_subspace``):

  * ``merge=task_arithmetic`` (``ConcreteTaskArithmeticAlgorithmForCLIP``): θ = θ₀ + m ⊙ λ·Σ τ_i
    with λ = ``scaling_factor`` fixed; the final model uses one more mask draw (``eval_mask_type``).
  * ``merge=adamerging`` (``ConcreteTaskWise/LayerWiseAdaMergingForCLIP``): each meta step resets
    the coefficients Λ to ``scaling_factor``, takes one inner Adam step (``base_lr``, moments kept
    across meta steps) on the entropy with m detached, then the mask step on fresh batches at the
    updated Λ (first order: no gradient through the inner step). Then one final mask draw and
    AdaMerging (``adamerging_lr``, ``max_adamerging_steps``) of the masked vectors from
    ``scaling_factor``. θ = θ₀ + m ⊙ Σ_i Λ_i τ_i (Λ_i a scalar, or one per tensor with
    ``granularity=layer``; clamped to [0, 1] inside the sum with ``clamp_weights``).

Joint only; vision backbones only (the reference is CLIP-only). Memory: ``task_arithmetic`` streams
the task vectors into one λ·Σ τ_i; ``adamerging`` holds all T of them (as joint AdaMerging); both add
the logits and their two Adam moments (3 weight-sized float32 sets; float64 for a float64 model) and
one mask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from otmf_exp.data.base import SPLITS
from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.adaptation import (
    GRANULARITIES,
    coefficient_summary,
    combine,
    entropy,
    init_coefficients,
    subsample,
    work_dtype,
)
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.runtime.progress import progress
from otmf_exp.schema import choice, num

log = logging.getLogger(__name__)

MERGES = ("task_arithmetic", "adamerging")
MASK_TYPES = ("continuous", "discrete")
#: FusionBench's ``max_steps`` of the mask learning per merge (used when ``max_steps`` is null)
REFERENCE_STEPS = {"task_arithmetic": 2000, "adamerging": 1000}


@dataclass
class ConcreteConfig:
    name: str = "concrete"
    #: task_arithmetic: fixed λ = scaling_factor (clip_concrete_task_arithmetic) | adamerging: learned
    #: coefficients, meta-learned mask then AdaMerging (clip_concrete_{task,layer}_wise_adamerging)
    merge: str = choice("task_arithmetic", MERGES)
    #: merge=adamerging only: task (one coefficient per task vector) | layer (one per tensor per vector)
    granularity: str = choice("task", GRANULARITIES)
    #: λ of task_arithmetic; initial coefficient of adamerging (FusionBench scaling_factor)
    scaling_factor: float = num(0.3, ge=0)
    #: initial value of every mask logit (σ(0) = 0.5)
    initial_logits: float = num(0.0, unbounded=True)  # a logit: any real
    #: temperature T of the relaxed Bernoulli
    temperature: float = num(0.5, gt=0)
    #: Adam learning rate of the mask logits
    lr: float = num(1e-3, gt=0)
    #: mask-learning steps; null = FusionBench's value for the merge (2000 task_arithmetic, 1000 adamerging)
    max_steps: int | None = num(None, ge=0)
    #: adamerging only: Adam learning rate of the inner coefficient step during mask learning
    base_lr: float = num(1.0, gt=0)
    #: adamerging only: Adam learning rate and steps of the final AdaMerging on the masked vectors
    adamerging_lr: float = num(1e-3, gt=0)
    max_adamerging_steps: int = num(1000, ge=0)
    #: unlabeled inputs per task per forward (FusionBench batch_size)
    batch_size: int = num(16, ge=1)
    #: mask of the final model, one draw: continuous (relaxed sample) | discrete (Bernoulli(σ(x)) sample)
    eval_mask_type: str = choice("continuous", MASK_TYPES)
    #: clamp the coefficients to [0, 1] inside the weighted sum (differentiable clamp, as FusionBench)
    clamp_weights: bool = False
    #: split of the unlabeled pool (test = FusionBench's shuffled test loader)
    adapt_split: str = choice("test", SPLITS)
    #: adamerging: FusionBench's order in the meta step (merge with the coefficients left by the
    #: previous inner step, then reset them): the inner gradient is taken at the stale coefficients.
    #: false = reset first (the inner step starts from scaling_factor as intended)
    fusionbench_stale_inner: bool = False
    #: entropy −Σ p·log(p + eps): 0 = exact (log-softmax) | 1e-8 = FusionBench's entropy_loss
    entropy_eps: float = num(0.0, ge=0)


def sample_mask(
    logits: Mapping[str, Tensor],
    temperature: float,
    generator: torch.Generator,
    mask_type: str = "continuous",
) -> dict[str, Tensor]:
    """One mask draw per tensor, in key order, from ``generator``: the relaxed Bernoulli sample of
    ``torch.distributions.RelaxedBernoulli(logits=x, temperature=T).rsample()`` (differentiable in
    x; same clamps) or, ``discrete``, ``Bernoulli(logits=x).sample()``."""
    out = {}
    for k, x in logits.items():
        if mask_type == "discrete":
            with torch.no_grad():
                out[k] = torch.bernoulli(torch.sigmoid(x), generator=generator)
            continue
        eps = torch.finfo(x.dtype).eps
        p = torch.sigmoid(x).clamp(min=eps, max=1 - eps)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device).clamp(
            min=eps, max=1 - eps
        )
        z = (u.log() - (-u).log1p() + p.log() - (-p).log1p()) / temperature
        out[k] = torch.sigmoid(z).clamp(min=torch.finfo(x.dtype).tiny, max=1.0 - eps)
    return out


def rescale(mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """m / mean(m) per tensor (an all-zero discrete draw stays 0; the reference would divide 0 by 0)."""
    out = {}
    for k, m in mask.items():
        mean = m.mean()
        out[k] = m / torch.where(mean != 0, mean, torch.ones_like(mean))
    return out


def apply_mask(
    pretrained: Mapping[str, Tensor], delta: Mapping[str, Tensor], mask: Mapping[str, Tensor]
) -> StateDict:
    """θ₀ + m ⊙ δ, per tensor (differentiable in ``mask`` and ``delta``)."""
    return {k: p + (mask[k] * delta[k]).to(p.dtype) for k, p in pretrained.items()}


class Concrete(MergeMethod):
    name = "concrete"
    Config = ConcreteConfig
    protocols = ("joint",)
    modalities = ("vision",)  # the reference is CLIP-only (refused in one line before any merge)
    main_coef = "scaling_factor"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if cfg.granularity == "layer" and cfg.merge != "adamerging":
            raise UserError(
                "method.granularity=layer needs method.merge=adamerging (task arithmetic has one λ)"
            )

    @property
    def steps(self) -> int:
        return REFERENCE_STEPS[self.cfg.merge] if self.cfg.max_steps is None else self.cfg.max_steps

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        raise UserError("method=concrete is joint-only: use protocol=joint")

    # ---- the pieces ---------------------------------------------------------------------------
    def _entropy_backward(
        self, params: StateDict, heads: Sequence[Tensor], streams: Sequence[Iterator], what: str
    ) -> float:
        """Σ_j entropy of one batch of pool j; backprop through ``params`` one pool at a time
        (one batch of activations alive; the same gradient as one backward of the sum)."""
        bb = self.ctx.backbone
        leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        total = 0.0
        for h, s in zip(heads, streams):
            loss = entropy(bb.logits(leaves, h, bb.to_device(next(s)["inputs"])), self.cfg.entropy_eps)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"Concrete {what}: non-finite entropy; lower method.lr")
            loss.backward()
            total += float(loss.detach())
        keys = [k for k, v in leaves.items() if v.grad is not None and params[k].requires_grad]
        if keys:
            torch.autograd.backward([params[k] for k in keys], [leaves[k].grad for k in keys])
        return total

    def _coef(self, coef: Tensor) -> Tensor:
        return coef.clamp(0, 1) if self.cfg.clamp_weights else coef

    def _delta(self, tvs: Sequence[StateDict], coef: Tensor, like: StateDict) -> StateDict:
        """Σ_i Λ_i τ_i (differentiable in ``coef``), via AdaMerging's ``combine`` on scalar zeros."""
        zero = {k: torch.zeros((), dtype=v.dtype, device=v.device) for k, v in like.items()}
        return combine(zero, tvs, self._coef(coef))

    # ---- the protocol ---------------------------------------------------------------------------
    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        cfg, dev = self.cfg, self.ctx.device
        tvs: list[StateDict] = []
        ta: StateDict | None = None
        heads, datas = [], []
        lam = min(max(cfg.scaling_factor, 0.0), 1.0) if cfg.clamp_weights else cfg.scaling_factor
        for task in tasks:
            tv = task.task_vector(pretrained)
            if cfg.merge == "adamerging":
                tvs.append(tv)  # all T task vectors are held: memory grows with T
            else:  # stream λ·Σ τ_i
                with torch.no_grad():
                    ta = (
                        {k: lam * v for k, v in tv.items()}
                        if ta is None
                        else {k: ta[k].add_(tv[k], alpha=lam) for k in ta}
                    )
            heads.append(task.head)
            datas.append(task.data)
        if not heads:
            raise UserError("Concrete joint merge needs at least one task")
        gen = torch.Generator(device=dev).manual_seed(self.ctx.seed_for("concrete", "mask"))
        streams = [
            d.batches(cfg.adapt_split, cfg.batch_size, self.ctx.seed_for("concrete", "data", j))
            for j, d in enumerate(datas)
        ]
        dtype = work_dtype(next(iter(pretrained.values())).dtype)  # float32, float64 for float64 models
        logits = {
            k: torch.full(v.shape, float(cfg.initial_logits), dtype=dtype, device=dev, requires_grad=True)
            for k, v in pretrained.items()
        }
        opt = torch.optim.Adam(list(logits.values()), lr=cfg.lr)
        if cfg.merge == "task_arithmetic":
            self._learn_mask_ta(pretrained, ta, logits, opt, gen, heads, streams)
            mask = self._final_mask(logits, gen)
            with torch.no_grad():
                merged = {k: (mask[k] * ta[k]).to(v.dtype) for k, v in pretrained.items()}
            return ContinualState(step=len(heads), merged=merged)
        init = init_coefficients(
            len(tvs),
            len(pretrained),
            cfg.granularity,
            [cfg.scaling_factor] * len(tvs),
            device=dev,
            dtype=dtype,
        )
        self._learn_mask_adamerging(pretrained, tvs, logits, opt, gen, heads, streams, init.detach().clone())
        mask = self._final_mask(logits, gen)
        del logits, opt
        coef = self._adamerging(pretrained, tvs, mask, heads, streams, init)
        with torch.no_grad():
            delta = self._delta(tvs, coef, pretrained)
            merged = {k: (mask[k] * delta[k]).to(v.dtype) for k, v in pretrained.items()}
        return ContinualState(step=len(heads), merged=merged)

    @torch.no_grad()
    def _final_mask(self, logits: Mapping[str, Tensor], gen: torch.Generator) -> dict[str, Tensor]:
        """The final model's mask: one ``eval_mask_type`` draw, rescaled; records its statistics."""
        raw = sample_mask(logits, self.cfg.temperature, gen, self.cfg.eval_mask_type)
        n = sum(m.numel() for m in raw.values())
        self.ctx.record(
            "mask",
            {
                "mean": sum(float(m.sum()) for m in raw.values()) / n,  # FusionBench's mask_sparsity
                "prob_mean": sum(float(torch.sigmoid(x).sum()) for x in logits.values()) / n,
                "prob_above_half": sum(float((x > 0).sum()) for x in logits.values()) / n,
                "numel": n,
            },
        )
        return rescale(raw)

    def _learn_mask_ta(self, pretrained, ta, logits, opt, gen, heads, streams) -> None:
        cfg, curve = self.cfg, []
        for it in progress(
            range(self.steps), desc="Concrete TA mask", enabled=self.ctx.progress, leave=False
        ):
            mask = rescale(sample_mask(logits, cfg.temperature, gen))
            opt.zero_grad(set_to_none=True)
            curve.append(
                self._entropy_backward(apply_mask(pretrained, ta, mask), heads, streams, f"mask step {it}")
                / len(heads)
            )
            opt.step()
        self.ctx.record("entropy_curve", subsample(curve))

    def _learn_mask_adamerging(self, pretrained, tvs, logits, opt, gen, heads, streams, init: Tensor) -> None:
        cfg, curve, inner_curve = self.cfg, [], []
        coef = init.clone().requires_grad_(True)
        base_opt = torch.optim.Adam([coef], lr=cfg.base_lr)
        for it in progress(
            range(self.steps), desc="Concrete AdaMerging mask", enabled=self.ctx.progress, leave=False
        ):
            mask = rescale(sample_mask(logits, cfg.temperature, gen))
            fixed = {k: m.detach() for k, m in mask.items()}
            # inner step: Λ reset to its initial value; FusionBench merges before the reset (stale Λ)
            at = coef.detach().clone() if cfg.fusionbench_stale_inner else init.clone()
            leaf = at.requires_grad_(True)
            inner = self._entropy_backward(
                apply_mask(pretrained, self._delta(tvs, leaf, pretrained), fixed),
                heads,
                streams,
                f"inner step {it}",
            )
            with torch.no_grad():
                coef.copy_(init)
            coef.grad = leaf.grad
            base_opt.step()
            # mask step at the updated Λ, fresh batches, gradient to the logits only
            opt.zero_grad(set_to_none=True)
            delta = self._delta(tvs, coef.detach(), pretrained)
            curve.append(
                self._entropy_backward(apply_mask(pretrained, delta, mask), heads, streams, f"mask step {it}")
                / len(heads)
            )
            inner_curve.append(inner / len(heads))
            opt.step()
        self.ctx.record("entropy_curve", subsample(curve))
        self.ctx.record("inner_entropy_curve", subsample(inner_curve))

    def _adamerging(self, pretrained, tvs, mask, heads, streams, init: Tensor) -> Tensor:
        coef = init.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([coef], lr=self.cfg.adamerging_lr)
        curve = []
        for it in progress(
            range(self.cfg.max_adamerging_steps),
            desc="Concrete AdaMerging",
            enabled=self.ctx.progress,
            leave=False,
        ):
            opt.zero_grad(set_to_none=True)
            params = apply_mask(pretrained, self._delta(tvs, coef, pretrained), mask)
            curve.append(self._entropy_backward(params, heads, streams, f"AdaMerging step {it}") / len(heads))
            opt.step()
        self.ctx.record("adamerging_entropy_curve", subsample(curve))
        self.ctx.record("coefficients", coefficient_summary(self._coef(coef)))
        return coef.detach()
