"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

θ = Σ_i c_i (F_i + ε) ⊙ θ_i / Σ_i c_i (F_i + ε), the diagonal Fisher F_i of task model θ_i estimated on
``num_examples`` examples of its own task (``batch_size`` per backward) through its zero-shot head,
as FusionBench 0.2.33's ``FisherMergingForCLIPVisionModel`` (``method/fisher_merging/``, YAML
``clip_fisher_merging.yaml``): no labels are read; per batch, the loss Σ_b Σ_c √p_bc·log p_bc (p the
model's softmax, √p detached) is backpropagated and its squared gradient added to F_i, which is
divided by the number of examples at the end (``estimate=batch``). ``normalize``: c_i ∝ 1/(‖F_i‖₂ + ε),
‖·‖₂ over every entry of F_i (FusionBench's ``normalize_fisher_weight``), else c_i = 1; ε =
``min_weight``. FusionBench's scaling coefficients (uniform 1/T) and the normaliser Σ_j 1/(‖F_j‖+ε)
are common to every task and cancel in the ratio, so the merge streams: one task's F_i and the
running Σ_i c_i (F_i+ε) θ_i and Σ_i c_i (F_i+ε) are alive at a time, not the T models.

``estimate=exact``: the textbook diagonal Fisher, per example Σ_c p_c (∇ log p_c)² (C backwards per
example), instead of the reference's squared batch gradient (which keeps the cross-class and
cross-example products). Joint protocol only (as the reference); vision backbones only (FusionBench
has Fisher merging for CLIP and GPT-2 classifiers, not for Flan-T5's text-to-text heads).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from otmf_exp.data.base import SPLITS, example_batches
from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.adaptation import work_dtype
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict, global_norm
from otmf_exp.schema import choice, num

log = logging.getLogger(__name__)

ESTIMATES = ("batch", "exact")


@dataclass
class FisherConfig:
    name: str = "fisher"
    #: examples per task the Fisher is estimated on (FusionBench num_fisher_examples); whole batches,
    #: so ceil(num_examples / batch_size) of them (fewer when the split is smaller)
    num_examples: int = num(256, ge=1)
    #: examples per forward/backward (FusionBench dataloader batch_size)
    batch_size: int = num(32, ge=1)
    #: split the examples come from (FusionBench: the task's train split)
    split: str = choice("train", SPLITS)
    #: true: a random subset in random order, drawn with `seed` | false: the split's first examples in
    #: order (FusionBench's Fisher loader does not shuffle: on a class-sorted split that is a few classes)
    shuffle: bool = True
    #: c_i ∝ 1 / (‖F_i‖₂ + min_weight), the global L2 norm of task i's Fisher (FusionBench normalize_fisher_weight)
    normalize: bool = True
    #: ε added to every Fisher entry and to the norm (FusionBench minimal_fisher_weight)
    min_weight: float = num(1e-6, ge=0)
    #: batch: squared gradient of the batch's Σ_b Σ_c √p·log p (FusionBench/MergeLM) | exact: Σ_x Σ_c p_c (∇ log p_c)²
    estimate: str = choice("batch", ESTIMATES)


def fisher_weighted_mean(
    thetas: Sequence[StateDict], fishers: Sequence[StateDict], coefs: Sequence[float], eps: float
) -> StateDict:
    """Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε), key by key (the closed form, all models at once)."""
    out = {}
    for k in thetas[0]:
        w = [c * (f[k] + eps) for c, f in zip(coefs, fishers)]
        out[k] = sum(wi * t[k] for wi, t in zip(w, thetas)) / sum(w)
    return out


class FisherAccumulator:
    """Running Σ_i c_i (F_i + ε) θ_i and Σ_i c_i (F_i + ε) (float32; float64 for float64 Fishers): one
    task added at a time."""

    def __init__(self, eps: float) -> None:
        self.eps = eps
        self.num: StateDict = {}
        self.den: StateDict = {}

    def add(self, theta: StateDict, fisher: StateDict, coef: float) -> None:
        for k, t in theta.items():
            w = (fisher[k].to(work_dtype(fisher[k].dtype)) + self.eps).mul_(coef)
            if k in self.num:
                self.num[k].add_(w * t.to(w.dtype))
                self.den[k].add_(w)
            else:
                self.num[k], self.den[k] = w * t.to(w.dtype), w

    def result(self, like: StateDict) -> StateDict:
        return {k: (self.num[k] / self.den[k]).to(like[k].dtype) for k in like}


def sqrt_p_loglik(logits: Tensor) -> Tensor:
    """Σ_b Σ_c √p_bc · log p_bc with √p detached (the reference's Fisher loss); ``logits`` ``[B, C]``."""
    return (torch.softmax(logits, dim=-1).detach().sqrt() * torch.log_softmax(logits, dim=-1)).sum()


class Fisher(MergeMethod):
    name = "fisher"
    Config = FisherConfig
    protocols = ("joint",)
    modalities = ("vision",)

    def batches(self, task: TaskInput) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        if cfg.num_examples % cfg.batch_size:
            log.warning("fisher: %d examples is not a multiple of batch %d", cfg.num_examples, cfg.batch_size)
        seed = self.ctx.seed_for(self.name, task.name)
        return example_batches(
            task.data, cfg.split, cfg.num_examples, cfg.batch_size, shuffle=cfg.shuffle, seed=seed
        )

    def fisher(
        self, theta: StateDict, head: Tensor, batches: Iterable[dict[str, Any]], what: str
    ) -> StateDict:
        """Diagonal Fisher of the model ``theta`` with ``head`` over ``batches`` (see the module doc)."""
        bb = self.ctx.backbone
        leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        names, params = list(leaves), list(leaves.values())
        acc = {k: torch.zeros_like(v, dtype=work_dtype(v.dtype)) for k, v in theta.items()}
        n = 0

        def add(loss: Tensor, weight: float = 1.0, retain: bool = False) -> None:
            grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:  # a parameter the forward does not use has zero Fisher
                    acc[k].add_(g.to(acc[k].dtype).square(), alpha=weight)

        with torch.enable_grad():
            for batch in batches:
                x = bb.to_device(batch["inputs"])
                n += len(batch["labels"])
                if self.cfg.estimate == "batch":
                    loss = sqrt_p_loglik(bb.logits(leaves, head, x))
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"fisher {what}: non-finite log-likelihood")
                    add(loss)
                    continue
                for i in range(len(batch["labels"])):  # exact: every class of every example
                    xi = x[i : i + 1] if isinstance(x, Tensor) else {k: v[i : i + 1] for k, v in x.items()}
                    z = bb.logits(leaves, head, xi)
                    logp = torch.log_softmax(z.to(work_dtype(z.dtype)), dim=-1)[0]
                    if not torch.isfinite(logp).all():
                        raise NonFiniteLossError(f"fisher {what}: non-finite log-likelihood")
                    p = logp.detach().exp().tolist()
                    for c, pc in enumerate(p):
                        add(logp[c], pc, retain=c + 1 < len(p))
        if n == 0:
            raise UserError(f"fisher {what}: split {self.cfg.split!r} is empty")
        return {k: v.div_(n) for k, v in acc.items()}

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        raise UserError("fisher supports the joint protocol only")

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        acc = FisherAccumulator(self.cfg.min_weight)
        norms: dict[str, float] = {}
        for task in tasks:  # one task's θ_i and F_i alive at a time
            theta = task.weights
            fisher = self.fisher(theta, task.head, self.batches(task), task.name)
            norms[task.name] = global_norm(fisher)
            coef = 1.0 / (norms[task.name] + self.cfg.min_weight) if self.cfg.normalize else 1.0
            if not math.isfinite(coef):
                raise NonFiniteLossError(f"fisher {task.name}: non-finite Fisher norm")
            acc.add(theta, fisher, coef)
            del fisher, theta
        if not norms:
            raise UserError("fisher: the joint merge needs at least one task")
        self.ctx.record("fisher_norms", norms)
        merged = acc.result(pretrained)
        return ContinualState(step=len(norms), merged={k: merged[k] - pretrained[k] for k in pretrained})
