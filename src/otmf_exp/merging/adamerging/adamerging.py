"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024).

θ = θ₀ + Σ_i λ_i ⊙ τ_i with the coefficients λ learned by minimising the Shannon entropy of the
predictions (softmax of the frozen heads' logits) on unlabeled batches of each task's adaptation
pool: one batch of ``batch_size`` per task per Adam step, entropies summed over tasks (FusionBench's
``CLIPTaskWiseAdaMerging`` / ``CLIPLayerWiseAdaMerging`` recipe). ``granularity``: ``task`` = one
scalar per task vector, ``layer`` = one per parameter tensor per task vector. ``clamp``: ``merge``
merges with clamp(λ, 0, 1) and keeps the raw λ free (the references), ``project`` projects λ onto
[0, 1] after every step. ``tv_prune=ties`` = AdaMerging++ (TIES trim + sign election on the task
vectors first). The merged weights are built differentiably from θ₀ and the task vectors and run
with ``torch.func.functional_call`` (no model copies). Streams, seed pools, pruning: ``adamerging_pools``.

Protocols:
  * joint: all T task vectors and heads at once (memory grows with T), entropy over all T pools.
  * continual ``pairwise``: step 1 τᵐ_1 = τ_1; step t ≥ 2 learns two fresh coefficient sets,
    τᵐ_t = λ_a ⊙ τᵐ_{t−1} + λ_b ⊙ τ_t, on the pools of the current task and of task t−1 only
    (``TaskInput.previous_data``: the only earlier data a continual method receives); the previous
    task's head is the zero-shot head kept in ``state.heads``. λ_a starts at ``init_merged``
    (null = ``init``), λ_b at ``init``. (The OTMF authors' sequential scripts.)
  * continual ``current_only`` (MINGLE's C. AdaMerging): every step t ≥ 1 merges θ₀ + λ ⊙ τ_t on the
    current task's pool alone; nothing earlier is carried, so the final model holds τ_T only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.adamerging.adamerging_pools import (
    CHOICES,
    CLAMP_BOOLS,
    CLAMPS,
    adaptation_pool,
    batch_streams,
    clamp_mode,
    prune,
)
from otmf_exp.merging.adaptation import (
    GRANULARITIES,
    coefficient_summary,
    combine,
    entropy,
    init_coefficients,
    subsample,
)
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.runtime.progress import progress
from otmf_exp.schema import choice, num

log = logging.getLogger(__name__)

BACKWARDS = ("per_task", "summed")


@dataclass
class AdaMergingConfig:
    name: str = "adamerging"
    #: task: one coefficient per task vector | layer: one per parameter tensor per task vector
    granularity: str = choice("task", GRANULARITIES)
    #: initial coefficient of every task vector
    init: float = num(0.3, ge=0)
    #: continual only: initial coefficient of the merged vector τᵐ_{t−1}; null = init
    init_merged: float | None = num(None, ge=0)
    lr: float = num(1e-3, gt=0)
    #: Adam steps per merge (FusionBench uses 1000)
    steps: int = num(500, ge=0)
    #: unlabeled inputs per task per step
    batch_size: int = num(16, ge=1)
    #: none | merge: merge with clamp(λ, 0, 1), the raw λ stays free (FusionBench's and the OTMF
    #: authors' wrappers, MINGLE) | project: λ projected onto [0, 1] after every optimiser step.
    #: The old booleans still work: true = project, false = none
    clamp: str = choice("none", CLAMPS, aliases=(*CLAMP_BOOLS, "True", "False"))
    #: split of the unlabeled adaptation pool (test = the AdaMerging convention)
    adapt_split: str = choice("test", CHOICES["adapt_split"])
    #: per_task: backward after each pool's batch, gradients accumulated (activations of one batch
    #: alive at a time; FusionBench 0.2.33 also backs up once per task, with retain_graph) | summed:
    #: one backward of the summed entropy (the OTMF authors' scripts; activations of every pool's
    #: batch alive at once). Same gradient up to float summation order.
    backward: str = choice("per_task", BACKWARDS)
    #: continual protocol: pairwise (λ_a ⊙ τᵐ_{t−1} + λ_b ⊙ τ_t on the current + previous pool) |
    #: current_only (MINGLE's C. AdaMerging: θ₀ + λ ⊙ τ_t on the current pool, nothing carried)
    continual: str = choice("pairwise", CHOICES["continual"])
    #: per_step: a fresh seeded stream per (step, pool), reshuffled each pass | per_step_cycle: fresh per
    #: step, the first pass replayed (the OTMF authors' layer-wise script) | per_task_cycle: one stream
    #: per task across all steps, the first pass replayed (their task-wise script's itertools.cycle)
    stream: str = choice("per_step", CHOICES["stream"])
    #: adapt on this many samples per class of adapt_split instead of the whole split (MINGLE's
    #: seed_sample_number; on the test split it is flagged as test leakage); null = the whole split
    seed_samples: int | None = num(None, ge=1)
    #: entropy −Σ p·log(p + eps): 0 = exact (log-softmax) | 1e-8 = MINGLE's entropy_loss
    entropy_eps: float = num(0.0, ge=0)
    #: none | ties: AdaMerging++ (TIES trim to ties_density + sign election on the task vectors
    #: before the coefficients are learned; continual: on [τᵐ_{t−1}, τ_t] at each step)
    tv_prune: str = choice("none", CHOICES["tv_prune"])
    #: AdaMerging++: fraction of entries kept (the authors' K = 20 %) and trim scope (merging/task_arithmetic/ties.py)
    ties_density: float = num(0.2, gt=0, le=1)
    ties_topk_scope: str = choice("global", CHOICES["ties_topk_scope"])


def entropy_loss(logits: Tensor, eps: float = 0.0) -> Tensor:
    """:func:`entropy`, or with ``eps > 0`` MINGLE's ``−Σ p·log(p + eps)`` (mean over the batch)."""
    return entropy(logits, eps)


class AdaMerging(MergeMethod):
    name = "adamerging"
    Config = AdaMergingConfig
    protocols = ("continual", "joint")
    main_coef = None

    def __init__(self, cfg: Any, ctx: Any, protocol: str = "continual") -> None:
        super().__init__(cfg, ctx, protocol)
        if protocol == "joint" and cfg.continual != "pairwise":
            raise UserError(
                f"method.continual={cfg.continual} is an option of the continual protocol; "
                "drop it for protocol=joint"
            )
        #: a list to append the coefficients (as merged, after every optimiser step) to; None = off
        self.trace: list[Tensor] | None = None

    # ---- the optimisation ------------------------------------------------------------------
    def adapt(
        self,
        pretrained: StateDict,
        tvs: Sequence[StateDict],
        heads: Sequence[Tensor | None],
        datas: Sequence[Any],
        init: Sequence[float],
        what: str,
        key: tuple[Any, ...],
        skips: Sequence[int] | None = None,
    ) -> Tensor:
        """Learn coefficients for ``tvs`` by entropy minimisation on ``datas`` seen through ``heads``
        (one batch per pool per step; streams per ``stream``, seeded by the run's ``seed``, ``key``
        and the pool, or the task for ``per_task_cycle``, which starts pool j after ``skips[j]``
        batches). Returns the detached coefficients as merged (clamped for ``clamp=merge``);
        records the curve."""
        cfg = self.cfg
        mode = clamp_mode(cfg.clamp)
        coef = init_coefficients(len(tvs), len(pretrained), cfg.granularity, init, device=self.ctx.device)
        merged = (lambda c: c.clamp(0.0, 1.0)) if mode == "merge" else (lambda c: c)
        opt = torch.optim.Adam([coef], lr=cfg.lr)
        streams = batch_streams(cfg, self.ctx, datas, key, skips or [0] * len(datas))
        curve: list[float] = []
        bar = progress(range(cfg.steps), desc=f"AdaMerging {what}", enabled=self.ctx.progress, leave=False)
        for it in bar:
            opt.zero_grad(set_to_none=True)
            params = combine(pretrained, tvs, merged(coef))
            loss = self._backward(params, heads, streams, what, it)
            del params
            opt.step()
            if mode == "project":
                with torch.no_grad():
                    coef.clamp_(0.0, 1.0)
            if self.trace is not None:
                self.trace.append(merged(coef).detach().clone())
            curve.append(loss / len(datas))
            if self.ctx.progress and it % 10 == 0:
                bar.set_postfix(entropy=f"{curve[-1]:.4f}")
        self.ctx.record("entropy_curve", subsample(curve))
        self.ctx.record("coefficients", coefficient_summary(merged(coef)))
        if mode == "merge":
            self.ctx.record("coefficients_raw", coefficient_summary(coef))
        return merged(coef).detach()

    def _backward(
        self,
        params: StateDict,
        heads: Sequence[Tensor | None],
        streams: Sequence[Iterator],
        what: str,
        it: int,
    ) -> float:
        """Entropy summed over one batch per pool; fills ``coef.grad`` (after ``zero_grad``). Returns the loss."""
        bb = self.ctx.backbone

        def check(loss: Tensor) -> None:
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"AdaMerging {what}, iteration {it}: non-finite entropy; the last completed step's "
                    f"checkpoint is kept. Lower method.lr or set method.clamp=merge"
                )

        eps = self.cfg.entropy_eps

        if self.cfg.backward == "summed":
            loss = sum(
                entropy_loss(bb.logits(params, h, bb.to_device(next(s)["inputs"])), eps)
                for h, s in zip(heads, streams)
            )
            check(loss)
            loss.backward()
            return float(loss.detach())
        # per task: backprop each pool's entropy into leaf copies of the merged weights (one batch of
        # activations alive at a time), then push the accumulated weight gradient through the combination
        leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        total = 0.0
        for h, s in zip(heads, streams):
            loss = entropy_loss(bb.logits(leaves, h, bb.to_device(next(s)["inputs"])), eps)
            check(loss)
            loss.backward()
            total += float(loss.detach())
        keys = [k for k, v in leaves.items() if v.grad is not None]
        torch.autograd.backward([params[k] for k in keys], [leaves[k].grad for k in keys])
        return total

    @staticmethod
    def _apply(tvs: Sequence[StateDict], coef: Tensor) -> StateDict:
        zero = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
        with torch.no_grad():
            return {k: v.detach() for k, v in combine(zero, tvs, coef).items()}

    # ---- protocols ---------------------------------------------------------------------------
    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        t, cfg = state.step + 1, self.cfg
        tv = task.task_vector(pretrained)
        heads = dict(state.heads)
        if task.head is not None:
            heads.setdefault(task.name, task.head)
        what = f"step {t} ({task.name})"
        if cfg.continual == "current_only":  # θ₀ + λ ⊙ τ_t, on the current pool; nothing carried
            tvs = prune(self.cfg, [tv])
            coef = self.adapt(
                pretrained,
                tvs,
                [task.head],
                [adaptation_pool(self.cfg, self.ctx, task.data)],
                [cfg.init],
                what,
                (t,),
            )
            return state.advance(self._apply(tvs, coef), heads=heads)
        if t == 1:
            return state.advance(tv, heads=heads)
        datas, task_heads = [task.data], [task.head]
        prev = task.previous_data
        if prev is None:
            log.warning("AdaMerging step %d: no previous task data; adapting on the current task only", t)
        else:
            datas.append(prev)
            task_heads.append(heads.get(prev.name))
        # per_task_cycle: the previous task's stream continues after the batches step t−1 drew from it
        skips = [0, cfg.steps if t >= 3 else 0]
        init_m = cfg.init if cfg.init_merged is None else cfg.init_merged
        tvs = prune(self.cfg, [state.merged, tv])
        pools = [adaptation_pool(self.cfg, self.ctx, d) for d in datas]
        coef = self.adapt(pretrained, tvs, task_heads, pools, [init_m, cfg.init], what, (t,), skips)
        return state.advance(self._apply(tvs, coef), heads=heads)

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        tvs, heads, datas = [], [], []
        for task in tasks:  # all T task vectors are held: memory grows with T
            tvs.append(task.task_vector(pretrained))
            heads.append(task.head)
            datas.append(adaptation_pool(self.cfg, self.ctx, task.data))
        if not tvs:
            raise UserError("AdaMerging joint merge needs at least one task")
        tvs = prune(self.cfg, tvs)
        coef = self.adapt(
            pretrained, tvs, heads, datas, [self.cfg.init] * len(tvs), what="joint", key=("joint",)
        )
        return ContinualState(step=len(tvs), merged=self._apply(tvs, coef))
