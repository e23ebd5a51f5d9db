"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

Each linear map's merged weight solves min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² in closed form,
Wᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ, with G_i the Gram matrix of the layer's inputs under task model θ_i,
its off-diagonal entries scaled by α = ``reduce_non_diagonal_ratio`` (G ⊙ (α·11ᵀ + (1−α)·I)); every
other mergeable parameter (biases, norms, embeddings, convolutions) is the plain mean of the θ_i. As
FusionBench 0.2.33's ``RegMeanAlgorithmForCLIP`` (``method/regmean/``, YAML ``clip_regmean.yaml``): G_i
is the mean of x·xᵀ over every token of ``num_examples`` examples (``batch_size`` per forward) of
task i's ``split``, recorded by forward hooks on each ``nn.Linear`` with a mergeable weight while θ_i
runs; the inverse is ``torch.linalg.inv`` as the reference's ``torch.inverse``. An
``nn.MultiheadAttention`` (open_clip) runs :func:`~otmf_exp.models.mha.mha_forward` so that its
``out_proj`` is called as a module, and its fused ``in_proj_weight`` gets the Gram of its (self-
attention) input; FusionBench has no open_clip models. The merge streams: the running Σ_i G_i,
Σ_i G_i W_iᵀ and Σ_i θ_i (other parameters), plus one task's Grams, are alive at a time.

Joint protocol only (as the reference); vision backbones only (FusionBench has RegMean for CLIP and
GPT-2 classifiers, not for Flan-T5).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from otmf_exp.data.base import SPLITS, example_batches
from otmf_exp.errors import UserError
from otmf_exp.merging.adaptation import work_dtype
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.models.mha import mha_forward
from otmf_exp.schema import choice, num

log = logging.getLogger(__name__)


@dataclass
class RegMeanConfig:
    name: str = "regmean"
    #: examples per task the Gram matrices are computed on (FusionBench num_regmean_examples); whole
    #: batches, so ceil(num_examples / batch_size) of them (fewer when the split is smaller)
    num_examples: int = num(256, ge=1)
    #: examples per forward (FusionBench dataloader batch_size)
    batch_size: int = num(32, ge=1)
    #: split the examples come from (FusionBench: the task's train split)
    split: str = choice("train", SPLITS)
    #: true: a random subset in random order, drawn with `seed` (FusionBench's loader shuffles) | false:
    #: the split's first examples in order
    shuffle: bool = True
    #: α: off-diagonal Gram entries are multiplied by α, the diagonal is kept (FusionBench clip_regmean 0.95)
    reduce_non_diagonal_ratio: float = num(0.95, ge=0, le=1)


def reduce_non_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``gram`` with its off-diagonal entries multiplied by ``alpha`` (diagonal unchanged)."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_weight(grams: Sequence[Tensor], weights: Sequence[Tensor], alpha: float) -> Tensor:
    """W = ((Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ)ᵀ for ``weights`` ``[out, in]`` and Grams ``[in, in]`` (all at once)."""
    reduced = [reduce_non_diagonal(g, alpha) for g in grams]
    rhs = sum(g @ w.T for g, w in zip(reduced, weights))
    return (torch.linalg.inv(sum(reduced)) @ rhs).T


class GramRecorder:
    """The running mean over tokens of x·xᵀ (float32; float64 for float64 inputs) of the inputs of each recorded weight, updated
    per batch as FusionBench does (G ← (G·n + XᵀX)/(n + m)), and the token count n."""

    def __init__(self) -> None:
        self.means: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, x: Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):
            f = x.detach().reshape(-1, x.shape[-1])
            f = f.to(work_dtype(f.dtype))
            xtx = f.T @ f
        n, m = self.rows.get(name, 0), f.shape[0]
        self.means[name] = xtx / m if name not in self.means else (self.means[name] * n + xtx) / (n + m)
        self.rows[name] = n + m


@contextmanager
def recording(module: nn.Module, mergeable: set[str], rec: GramRecorder) -> Iterator[None]:
    """Within the block, every forward of ``module`` records the inputs of each ``nn.Linear`` with a
    mergeable weight and of each ``nn.MultiheadAttention``'s mergeable ``in_proj_weight`` (self-attention
    only: query, key and value the same tensor); those MHAs run :func:`mha_forward` (``out_proj`` called)."""
    handles, patched = [], []

    def linear_hook(name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        rec.add(name, args[0])

    def mha_hook(name: str, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        q, k, v = (
            args[i] if len(args) > i else kwargs.get(key) for i, key in enumerate(("query", "key", "value"))
        )
        if q is k and k is v:
            rec.add(name, q)

    try:
        for name, mod in module.named_modules():
            if isinstance(mod, nn.Linear) and f"{name}.weight" in mergeable:
                handles.append(mod.register_forward_hook(partial(linear_hook, f"{name}.weight")))
            elif isinstance(mod, nn.MultiheadAttention) and (
                f"{name}.in_proj_weight" in mergeable or f"{name}.out_proj.weight" in mergeable
            ):
                if f"{name}.in_proj_weight" in mergeable:
                    hook = partial(mha_hook, f"{name}.in_proj_weight")
                    handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
                mod.forward = partial(mha_forward, mod, {})  # an instance attribute shadows the method
                patched.append(mod)
        yield
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward


class RegMeanAccumulator:
    """Running Σ_i G̃_i and Σ_i G̃_i W_iᵀ of the recorded weights, Σ_i θ_i of the others (float32; float64
    for a float64 model)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.gram: StateDict = {}
        self.rhs: StateDict = {}
        self.total: StateDict = {}
        self.count = 0

    def add(self, theta: StateDict, grams: dict[str, Tensor]) -> None:
        if self.count and set(grams) != set(self.gram):
            raise UserError("regmean: the tasks' forwards reached different linear layers")
        self.count += 1
        for k, t in theta.items():
            if k in grams:
                g = reduce_non_diagonal(grams[k], self.alpha)
                gw = g @ t.to(g.dtype).T
                if k in self.gram:
                    self.gram[k].add_(g)
                    self.rhs[k].add_(gw)
                else:
                    self.gram[k], self.rhs[k] = g, gw
            elif k in self.total:
                self.total[k].add_(t.to(self.total[k].dtype))
            else:
                self.total[k] = t.to(work_dtype(t.dtype)).clone()

    def result(self, like: StateDict) -> StateDict:
        out = {}
        for k, p in like.items():
            if k in self.gram:
                w = (torch.linalg.inv(self.gram[k]) @ self.rhs[k]).T
                if not torch.isfinite(w).all():
                    raise UserError(
                        f"regmean: the summed Gram matrix of {k!r} is singular; "
                        "lower method.reduce_non_diagonal_ratio or use more examples"
                    )
            else:
                w = self.total[k] / self.count
            out[k] = w.to(p.dtype).contiguous()
        return out


class RegMean(MergeMethod):
    name = "regmean"
    Config = RegMeanConfig
    protocols = ("joint",)
    modalities = ("vision",)

    def grams(self, theta: StateDict, batches: Iterable[dict[str, Any]], what: str) -> dict[str, Tensor]:
        """Mean-over-tokens Gram matrices of the recorded weights' inputs while ``theta`` runs ``batches``."""
        bb = self.ctx.backbone
        rec = GramRecorder()
        n = 0
        with torch.no_grad(), recording(bb.module, set(theta), rec):
            for batch in batches:
                bb.features(theta, bb.to_device(batch["inputs"]))
                n += len(batch["labels"])
        if n == 0:
            raise UserError(f"regmean {what}: split {self.cfg.split!r} is empty")
        if not rec.means:
            raise UserError(f"regmean {what}: no linear layer with a mergeable weight ran")
        return rec.means

    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        raise UserError("regmean supports the joint protocol only")

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        cfg = self.cfg
        if cfg.num_examples % cfg.batch_size:
            log.warning(
                "regmean: %d examples is not a multiple of batch %d", cfg.num_examples, cfg.batch_size
            )
        acc = RegMeanAccumulator(cfg.reduce_non_diagonal_ratio)
        for task in tasks:  # one task's θ_i and Grams alive at a time
            seed = self.ctx.seed_for(self.name, task.name)
            batches = example_batches(
                task.data, cfg.split, cfg.num_examples, cfg.batch_size, shuffle=cfg.shuffle, seed=seed
            )
            acc.add(task.weights, self.grams(task.weights, batches, task.name))
        if acc.count == 0:
            raise UserError("regmean: the joint merge needs at least one task")
        in_proj = sum(k.endswith("in_proj_weight") for k in acc.gram)
        counts = {"linear": len(acc.gram) - in_proj, "in_proj": in_proj, "averaged": len(acc.total)}
        self.ctx.record("regmean_weights", counts)
        merged = acc.result(pretrained)
        return ContinualState(step=acc.count, merged={k: merged[k] - pretrained[k] for k in pretrained})
