"""OTMF: Optimal-Transport-based Masked Fusion, continual (Pan et al., "Merging without Forgetting:
Continual Fusion of Task-Specific Models via Optimal Transport", arXiv 2511.19561, 2025).

One fusion step (t ≥ 2), with learnable masks shaped like the mergeable parameters::

    τᵐ_t = α · (M_pre ⊙ τᵐ_{t−1}) + (1 − α) · (M_post ⊙ τ_t)

Masks start at 1 every step (the untrained merge is α-weighted continual task arithmetic) and
are trained with Adam on the Sinkhorn divergence between the student's features and cached
frozen teachers' features (``merging/ot_fusion.py``). Then, optionally (vision), the
classification head(s) are tuned on cached merged-encoder features (``merging/head_tuning.py``).
Every ambiguity of the paper is an option; see the README section "OTMF".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.head_tuning import cached_features, train_head
from otmf_exp.merging.ot_fusion import FusionStep, masked_merge
from otmf_exp.merging.task_vectors import StateDict, apply

log = logging.getLogger(__name__)


@dataclass
class MaskConfig:
    enabled: bool = True
    #: identity: M = m (init 1, unconstrained) | sigmoid: M = 2·sigmoid(logit) (init logit 0, M in (0, 2))
    param: str = "identity"
    #: element: one value per weight | tensor: one scalar per parameter tensor (low-memory variant)
    granularity: str = "element"


@dataclass
class SinkhornConfig:
    p: int = 2
    blur: float = 0.05
    scaling: float = 0.5
    debias: bool = True
    #: geomloss backend: tensorized (default; exact on small batches) | online | multiscale | auto
    backend: str = "tensorized"


@dataclass
class HeadTuningConfig:
    enabled: bool = True
    #: current | previous | all_seen (all_seen revisits earlier tasks' labelled data)
    which: str = "current"
    fraction: float = 0.25
    #: train | validation | test (test = the authors' code; reported as test-set leakage)
    split: str = "train"
    lr: float = 1e-2
    epochs: int = 100
    batch_size: int = 16


@dataclass
class OTMFConfig:
    name: str = "otmf"
    alpha: float = 0.8
    mask: MaskConfig = field(default_factory=MaskConfig)
    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)
    #: alternate: even iterations train M_pre on pre-side data, odd ones M_post | joint: both terms, both masks
    schedule: str = "alternate"
    #: previous_task: unlabeled pool of task t−1 (authors' code) | current_task: never touch earlier tasks
    pre_data: str = "previous_task"
    #: split of the unlabeled adaptation pool (test = AdaMerging convention)
    adapt_split: str = "test"
    lr: float = 1e-2
    iterations: int = 100
    batch_size: int = 16
    #: best: keep the masks with the lowest loss seen (authors' code) | last
    select: str = "best"
    #: λ·mean|M| regulariser (the paper's L_λ); 0 disables
    l1: float = 0.0
    #: batches per side used to report the OT loss before/after training (0 disables)
    eval_batches: int = 4
    head_tuning: HeadTuningConfig = field(default_factory=HeadTuningConfig)


_CHOICES = {
    "mask.param": ("identity", "sigmoid"),
    "mask.granularity": ("element", "tensor"),
    "schedule": ("alternate", "joint"),
    "pre_data": ("previous_task", "current_task"),
    "select": ("best", "last"),
    "head_tuning.which": ("current", "previous", "all_seen"),
    "sinkhorn.backend": ("tensorized", "online", "multiscale", "auto"),
}


class OTMF(MergeMethod):
    name = "otmf"
    Config = OTMFConfig
    protocols = ("continual", "joint")
    main_coef = "alpha"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        from omegaconf import OmegaConf

        for key, allowed in _CHOICES.items():
            v = OmegaConf.select(cfg, key)
            if v not in allowed:
                raise UserError(f"method.{key} must be one of {list(allowed)}, got {v!r}")
        checks = [
            (0.0 <= cfg.alpha <= 1.0, f"method.alpha must be in [0, 1], got {cfg.alpha}"),
            (cfg.iterations >= 0, f"method.iterations must be >= 0, got {cfg.iterations}"),
            (cfg.batch_size >= 1, f"method.batch_size must be >= 1, got {cfg.batch_size}"),
            (cfg.lr > 0, f"method.lr must be > 0, got {cfg.lr}"),
            (cfg.l1 >= 0, f"method.l1 must be >= 0, got {cfg.l1}"),
            (cfg.sinkhorn.blur > 0, f"method.sinkhorn.blur must be > 0, got {cfg.sinkhorn.blur}"),
            (cfg.sinkhorn.p in (1, 2), f"method.sinkhorn.p must be 1 or 2, got {cfg.sinkhorn.p}"),
            (
                0.0 < cfg.sinkhorn.scaling < 1.0,
                f"method.sinkhorn.scaling must be in (0, 1), got {cfg.sinkhorn.scaling}",
            ),
            (
                0.0 < cfg.head_tuning.fraction <= 1.0,
                f"method.head_tuning.fraction must be in (0, 1], got {cfg.head_tuning.fraction}",
            ),
            (
                cfg.head_tuning.epochs >= 0,
                f"method.head_tuning.epochs must be >= 0, got {cfg.head_tuning.epochs}",
            ),
            (
                cfg.head_tuning.batch_size >= 1,
                f"method.head_tuning.batch_size must be >= 1, got {cfg.head_tuning.batch_size}",
            ),
            (cfg.head_tuning.lr > 0, f"method.head_tuning.lr must be > 0, got {cfg.head_tuning.lr}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def __init__(self, cfg: Any, ctx: Any, protocol: str = "continual") -> None:
        super().__init__(cfg, ctx, protocol)
        from geomloss import SamplesLoss

        s = cfg.sinkhorn
        self.loss_fn = SamplesLoss(
            "sinkhorn", p=s.p, blur=s.blur, scaling=s.scaling, debias=s.debias, backend=s.backend
        )

    # ---- the step ------------------------------------------------------------------------
    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        t = state.step + 1
        heads = dict(state.heads)
        if task.head is not None:
            heads.setdefault(task.name, task.head)
        if t == 1:
            merged = task.task_vector(pretrained)
        elif not self.cfg.mask.enabled:
            merged = masked_merge(state.merged, task.task_vector(pretrained), None, None, self.cfg.alpha)
        else:
            merged = FusionStep(self.cfg, self.ctx, self.loss_fn, state.merged, task, pretrained, t).run()
        if self.cfg.head_tuning.enabled and task.head is not None:
            t0 = time.perf_counter()
            heads = self._tune_heads(heads, merged, task, pretrained, t)
            self.ctx.record("time_head_tuning_s", time.perf_counter() - t0)
        return state.advance(merged, heads=heads)

    # ---- head tuning ------------------------------------------------------------------------
    def _tune_heads(
        self, heads: dict[str, Tensor], merged: StateDict, task: TaskInput, pretrained: StateDict, t: int
    ) -> dict[str, Tensor]:
        hc = self.cfg.head_tuning
        if hc.which == "current":
            targets = {task.name: task.data}
        elif hc.which == "previous":
            targets = {} if task.previous_data is None else {task.previous_data.name: task.previous_data}
        else:
            targets = dict(task.seen_data)
        if hc.split == "test":
            log.warning("OTMF head tuning on the test split: test-set leakage (reported in steps.jsonl)")
            self.ctx.record("head_tuning_test_leakage", True)
        weights = apply(pretrained, merged)
        bb = self.ctx.backbone
        curves, examples = {}, {}
        for name, data in targets.items():
            feats, labels = cached_features(
                bb,
                weights,
                data,
                hc.split,
                hc.fraction,
                seed=t,
                batch_size=int(bb.batch_size),
            )
            heads[name], curves[name] = train_head(
                heads[name],
                feats,
                labels,
                lr=hc.lr,
                epochs=hc.epochs,
                batch_size=hc.batch_size,
                seed=1000 * t + len(curves),
                what=f"OTMF head tuning of {name!r} at step {t}",
            )
            examples[name] = len(labels)
        self.ctx.record("head_tuning_examples", examples)
        self.ctx.record("head_tuning_loss", {k: v[-1] if v else None for k, v in curves.items()})
        return heads
