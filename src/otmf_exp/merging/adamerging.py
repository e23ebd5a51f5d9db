"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024).

θ = θ₀ + Σ_i λ_i ⊙ τ_i with the coefficients λ learned by minimising the Shannon entropy of the
predictions (softmax of the frozen heads' logits) on unlabeled batches of each task's adaptation
pool: one batch of ``batch_size`` per task per Adam step, entropies summed over tasks (FusionBench's
``CLIPTaskWiseAdaMerging`` / ``CLIPLayerWiseAdaMerging`` recipe). ``granularity``: ``task`` = one
scalar per task vector, ``layer`` = one per parameter tensor per task vector. ``clamp`` projects λ
onto [0, 1] after every optimiser step. The merged weights are built differentiably from θ₀ and
the task vectors and run with ``torch.func.functional_call`` (no model copies).

Protocols:
  * joint: all T task vectors and heads at once (memory grows with T), entropy over all T pools.
  * continual (pairwise): step 1 τᵐ_1 = τ_1; step t ≥ 2 learns two fresh coefficient sets,
    τᵐ_t = λ_a ⊙ τᵐ_{t−1} + λ_b ⊙ τ_t, on the pools of the current task and of task t−1 only
    (``TaskInput.previous_data``: the only earlier data a continual method receives); the previous
    task's head is the zero-shot head kept in ``state.heads``. λ_a starts at ``init_merged``
    (null = ``init``), λ_b at ``init``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict

log = logging.getLogger(__name__)

GRANULARITIES = ("task", "layer")
BACKWARDS = ("per_task", "summed")
SPLITS = ("train", "validation", "test")
MAX_CURVE_POINTS = 100


@dataclass
class AdaMergingConfig:
    name: str = "adamerging"
    #: task: one coefficient per task vector | layer: one per parameter tensor per task vector
    granularity: str = "task"
    #: initial coefficient of every task vector
    init: float = 0.3
    #: continual only: initial coefficient of the merged vector τᵐ_{t−1}; null = init
    init_merged: float | None = None
    lr: float = 1e-3
    #: Adam steps per merge (FusionBench uses 1000)
    steps: int = 500
    #: unlabeled inputs per task per step
    batch_size: int = 16
    #: project the coefficients onto [0, 1] after every optimiser step
    clamp: bool = False
    #: split of the unlabeled adaptation pool (test = the AdaMerging convention)
    adapt_split: str = "test"
    #: per_task: backward after each pool's batch, gradients accumulated (activations of one batch
    #: alive at a time) | summed: one backward of the summed entropy (FusionBench; activations of
    #: every pool's batch alive at once). Same gradient up to float summation order.
    backward: str = "per_task"


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the last dim; ``logits`` ``[..., C]``.
    Range [0, log C]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def init_coefficients(
    n_vectors: int,
    n_tensors: int,
    granularity: str,
    values: Sequence[float],
    device: torch.device | str = "cpu",
) -> Tensor:
    """Coefficient tensor ``[n_vectors]`` (task) or ``[n_vectors, n_tensors]`` (layer), row i filled
    with ``values[i]``; float32, requires grad."""
    v = torch.tensor([float(x) for x in values], dtype=torch.float32, device=device)
    if len(v) != n_vectors:
        raise ValueError(f"need {n_vectors} initial values, got {len(v)}")
    coef = v if granularity == "task" else v[:, None].expand(n_vectors, n_tensors).clone()
    return coef.requires_grad_(True)


def combine(pretrained: Mapping[str, Tensor], tvs: Sequence[Mapping[str, Tensor]], coef: Tensor) -> StateDict:
    """θ₀ + Σ_i λ_i ⊙ τ_i, differentiable in ``coef`` (``[n]`` task-wise or ``[n, P]`` layer-wise, P =
    number of keys in ``pretrained``, in key order)."""
    out = {}
    for j, (k, p) in enumerate(pretrained.items()):
        delta = sum((coef[i] if coef.dim() == 1 else coef[i, j]) * tv[k] for i, tv in enumerate(tvs))
        out[k] = p + delta.to(p.dtype)
    return out


def subsample(curve: Sequence[float], n: int = MAX_CURVE_POINTS) -> list[float]:
    """At most ``n`` evenly spaced points of ``curve``, first and last included."""
    if len(curve) <= n:
        return list(curve)
    idx = torch.linspace(0, len(curve) - 1, n).round().long().tolist()
    return [curve[i] for i in idx]


def coefficient_summary(coef: Tensor) -> dict[str, Any]:
    """JSON-friendly view of learned coefficients: per-vector values (task) or means (layer), min, max."""
    c = coef.detach().float().cpu()
    per_vector = c if c.dim() == 1 else c.mean(1)
    return {"per_vector": per_vector.tolist(), "min": float(c.min()), "max": float(c.max())}


class AdaMerging(MergeMethod):
    name = "adamerging"
    Config = AdaMergingConfig
    protocols = ("continual", "joint")
    main_coef = None

    @classmethod
    def validate(cls, cfg: Any) -> None:
        checks = [
            (
                cfg.granularity in GRANULARITIES,
                f"method.granularity must be one of {list(GRANULARITIES)}, got {cfg.granularity!r}",
            ),
            (
                cfg.adapt_split in SPLITS,
                f"method.adapt_split must be one of {list(SPLITS)}, got {cfg.adapt_split!r}",
            ),
            (
                cfg.backward in BACKWARDS,
                f"method.backward must be one of {list(BACKWARDS)}, got {cfg.backward!r}",
            ),
            (cfg.steps >= 0, f"method.steps must be >= 0, got {cfg.steps}"),
            (cfg.batch_size >= 1, f"method.batch_size must be >= 1, got {cfg.batch_size}"),
            (cfg.lr > 0, f"method.lr must be > 0, got {cfg.lr}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

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
    ) -> Tensor:
        """Learn coefficients for ``tvs`` by entropy minimisation on ``datas`` seen through ``heads``
        (one batch per pool per step; pool j's stream is seeded by the run's ``seed``, ``key`` and j).
        Returns the detached coefficients; records the curve."""
        cfg = self.cfg
        coef = init_coefficients(len(tvs), len(pretrained), cfg.granularity, init, device=self.ctx.device)
        opt = torch.optim.Adam([coef], lr=cfg.lr)
        streams = [
            d.batches(cfg.adapt_split, cfg.batch_size, self.ctx.seed_for("adamerging", *key, j))
            for j, d in enumerate(datas)
        ]
        curve: list[float] = []
        bar = tqdm(range(cfg.steps), desc=f"AdaMerging {what}", disable=not self.ctx.progress, leave=False)
        for it in bar:
            opt.zero_grad(set_to_none=True)
            params = combine(pretrained, tvs, coef)
            loss = self._backward(params, heads, streams, what, it)
            del params
            opt.step()
            if cfg.clamp:
                with torch.no_grad():
                    coef.clamp_(0.0, 1.0)
            curve.append(loss / len(datas))
            if self.ctx.progress and it % 10 == 0:
                bar.set_postfix(entropy=f"{curve[-1]:.4f}")
        self.ctx.record("entropy_curve", subsample(curve))
        self.ctx.record("coefficients", coefficient_summary(coef))
        return coef.detach()

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
                    f"checkpoint is kept. Lower method.lr or set method.clamp=true"
                )

        if self.cfg.backward == "summed":
            loss = sum(
                entropy(bb.logits(params, h, bb.to_device(next(s)["inputs"]))) for h, s in zip(heads, streams)
            )
            check(loss)
            loss.backward()
            return float(loss.detach())
        # per task: backprop each pool's entropy into leaf copies of the merged weights (one batch of
        # activations alive at a time), then push the accumulated weight gradient through the combination
        leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        total = 0.0
        for h, s in zip(heads, streams):
            loss = entropy(bb.logits(leaves, h, bb.to_device(next(s)["inputs"])))
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
        t = state.step + 1
        tv = task.task_vector(pretrained)
        heads = dict(state.heads)
        if task.head is not None:
            heads.setdefault(task.name, task.head)
        if t == 1:
            return state.advance(tv, heads=heads)
        datas, task_heads = [task.data], [task.head]
        prev = task.previous_data
        if prev is None:
            log.warning("AdaMerging step %d: no previous task data; adapting on the current task only", t)
        else:
            datas.append(prev)
            task_heads.append(heads.get(prev.name))
        init_m = self.cfg.init if self.cfg.init_merged is None else self.cfg.init_merged
        coef = self.adapt(
            pretrained,
            [state.merged, tv],
            task_heads,
            datas,
            [init_m, self.cfg.init],
            what=f"step {t} ({task.name})",
            key=(t,),
        )
        return state.advance(self._apply([state.merged, tv], coef), heads=heads)

    def joint(
        self, pretrained: StateDict, tasks: Sequence[TaskInput] | Iterator[TaskInput]
    ) -> ContinualState:
        tvs, heads, datas = [], [], []
        for task in tasks:  # all T task vectors are held: memory grows with T
            tvs.append(task.task_vector(pretrained))
            heads.append(task.head)
            datas.append(task.data)
        if not tvs:
            raise UserError("AdaMerging joint merge needs at least one task")
        coef = self.adapt(
            pretrained, tvs, heads, datas, [self.cfg.init] * len(tvs), what="joint", key=("joint",)
        )
        return ContinualState(step=len(tvs), merged=self._apply(tvs, coef))
