"""OTMF: Optimal-Transport-based Masked Fusion, continual (Pan et al., "Merging without Forgetting:
Continual Fusion of Task-Specific Models via Optimal Transport", arXiv 2511.19561, 2025).

One fusion step (t ≥ 2), with learnable masks shaped like the mergeable parameters::

    τᵐ_t = α · (M_pre ⊙ τᵐ_{t−1}) + (1 − α) · (M_post ⊙ τ_t)

Masks start at 1 every step (the untrained merge is α-weighted continual task arithmetic) and
are trained with Adam on the Sinkhorn divergence between the student's features and cached
frozen teachers' features (``merging/otmf/ot_fusion.py``). Then, optionally (vision), the
classification head(s) are tuned on cached merged-encoder features (``merging/otmf/head_tuning.py``).
Every ambiguity of the paper is an option; the defaults follow the authors' public code
(README "OTMF" and "OTMF versus the authors' code").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from otmf_exp.errors import UserError
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.otmf.head_tuning import FeatureStream, train_head
from otmf_exp.merging.otmf.ot_fusion import FusionStep, adam_in_backward_exact
from otmf_exp.merging.otmf.ot_masks import masked_merge
from otmf_exp.merging.task_vectors import StateDict, apply
from otmf_exp.schema import SPLITS, choice, need, neutral, num

log = logging.getLogger(__name__)

KEOPS = ("pykeops", "pip install pykeops")
#: geomloss backends that need pykeops (geomloss/_legacy/samples_loss.py: online and multiscale are
#: KeOps routines; auto picks one of them above 5000² point pairs, AUTO_KEOPS_PAIRS)
BACKEND_NEEDS = {"online": KEOPS, "multiscale": KEOPS}
AUTO_KEOPS_PAIRS = 5000**2


@dataclass
class MaskConfig:
    enabled: bool = True
    #: identity: M = m (init 1, unconstrained) | sigmoid: M = 2·sigmoid(logit) (init logit 0, M in (0, 2))
    param: str = choice("identity", ("identity", "sigmoid"))
    #: element: one value per weight | tensor: one scalar per parameter tensor (low-memory variant)
    granularity: str = choice("element", ("element", "tensor"))


@dataclass
class SinkhornConfig:
    p: int = choice(2, (1, 2))
    blur: float = num(0.05, gt=0)
    scaling: float = num(0.5, gt=0, lt=1)
    debias: bool = True
    #: geomloss backend: tensorized (default; exact on small batches) | online | multiscale (both need
    #: pykeops) | auto (geomloss picks: tensorized up to 5000 points per side, else a pykeops one)
    backend: str = choice("tensorized", ("tensorized", "online", "multiscale", "auto"), needs=BACKEND_NEEDS)


@dataclass
class HeadTuningConfig:
    enabled: bool = True
    #: authors: at step t >= 2 the head of task t-1, and at the last step also task t's; none at
    #: step 1 (the authors' code) | current | previous | all_seen (revisits earlier tasks' labelled data)
    which: str = choice("authors", ("authors", "current", "previous", "all_seen"))
    #: fixed random subset of the split that the batch stream draws from
    fraction: float = num(0.25, gt=0, le=1)
    #: train | validation | test (test + fraction 1.0 = the authors' code; reported as test-set leakage)
    split: str = choice("train", SPLITS)
    lr: float = num(1e-2, gt=0)
    #: Adam steps per head, one batch each (the authors' budget: 100 batches of 16)
    steps: int = num(100, ge=0)
    batch_size: int = num(16, ge=1)


@dataclass
class OTMFConfig:
    name: str = "otmf"
    alpha: float = num(0.8, ge=0, le=1)
    mask: MaskConfig = field(default_factory=MaskConfig)
    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)
    #: alternate: even iterations train M_pre on pre-side data, odd ones M_post | joint: both terms, both masks
    schedule: str = choice("alternate", ("alternate", "joint"))
    #: previous_task: unlabeled pool of task t−1 (authors' code) | current_task: never touch earlier tasks
    pre_data: str = choice("previous_task", ("previous_task", "current_task"))
    #: split of the unlabeled adaptation pool (test = AdaMerging convention)
    adapt_split: str = choice("test", SPLITS)
    lr: float = num(1e-2, gt=0)
    iterations: int = num(100, ge=0)
    batch_size: int = num(16, ge=1)
    #: authors: one best over both sides (the summed loss for joint): after each iteration's step, if
    #: its loss is the lowest so far, both masks are saved as they are after the step | last
    select: str = choice("authors", ("authors", "last"))
    #: how select=authors gets the best masks back, all bit-identical: on_write (a side's masks are
    #: copied only when a step that does not improve the loss is about to change them: usually 1 W
    #: more than replay, for one iteration at a
    #: time, and no replay) | replay (no buffers: the seeded, deterministic optimisation is re-run
    #: from the initial masks up to the best iteration — up to one more training loop of time) | copy
    #: (two mask-sized buffers refreshed on every improvement: 2 W more)
    best_masks: str = choice("on_write", ("copy", "replay", "on_write"))
    #: layerwise: each student weight is made when its module runs and re-made in the backward, so
    #: one module's weights are alive instead of a whole copy (bit-identical results, 1 W less at
    #: the step's peak, one more pair of fused ops per weight and iteration) | all: one dict of
    #: every weight, built before the forward and kept by autograd for the backward
    student_weights: str = choice("layerwise", ("layerwise", "all"))
    #: with student_weights=layerwise: each transformer layer of the student runs under activation
    #: checkpointing (its weights made inside), so the forward keeps only the layers' inputs and the
    #: backward re-runs one layer at a time (bit-identical results, one more forward per iteration,
    #: the activations of one batch — ≈ 1.4 W on ViT-B/32, batch 16 — no longer alive at the peak).
    #: auto: iteration 0's first layer runs plainly and its saved activations are measured; the
    #: following layers (of iteration 0 already) and iterations run checkpointed only if layers × that
    #: size (+ optimiser states still to come) would not fit memory_budget_mb (recorded in
    #: steps.jsonl) | true | false: always | never
    checkpoint_blocks: Any = choice("auto", ("auto", True, False))
    #: checkpoint_blocks=auto's budget for the whole process (MB; CUDA allocated / CPU RSS); null: what
    #: the device has free now (CPU: available RAM) minus max(1 GiB, 10 % of the total)
    memory_budget_mb: float | None = num(None, gt=0)
    #: the masks' Adam steps taken inside the backward, one transformer layer's mask tensors at a
    #: time as soon as their gradients are complete (post-accumulate-grad hooks; gradients freed at
    #: once), so no whole mask gradient (1 W) is alive at the end of the backward. Fused Adam's
    #: arithmetic is per tensor: bit-identical.
    #: null: on where it is exact (schedule=alternate, l1=0, no backward_chunk: one backward per
    #: step) | true: on (refused where not exact) | false: off
    adam_in_backward: bool | None = None
    #: what waits between uses kept off the device (bit-identical): the masks' Adam moments between
    #: their (side, transformer layer) group's steps, one group's on the device at a time (−4 W at
    #: the peak for one read and one write of the trained side's moments, 2 W, per iteration), and
    #: select=authors' copy of the best masks (so best_masks=on_write never replays). CUDA: pinned
    #: host memory | CPU: an anonymous temporary file in offload_dir (its pages may stay in the page
    #: cache, outside the RSS). auto: on the CPU where offload_dir is on a disk (≈ 5 % of the step's
    #: time there, −4 W of RSS), on CUDA only where the masks, moments and copies would not fit
    #: memory_budget_mb / the free memory, never for tensor-granularity masks; decided per step and
    #: recorded in steps.jsonl (offload, offload_reason) | true | false
    offload: Any = neutral(choice("auto", ("auto", True, False)))  # bit-identical: never splits a row
    #: offload's directory on the CPU (null: $TMPDIR, i.e. tempfile.gettempdir()); a tmpfs (RAM)
    #: there is warned about: the tensors would stay in memory
    offload_dir: str | None = neutral(None)
    #: backpropagate the OT loss this many inputs at a time (null: the whole batch at once); a
    #: smaller chunk keeps fewer activations alive for one more forward per iteration
    backward_chunk: int | None = num(None, ge=1)
    #: λ·mean|M| regulariser (the paper's L_λ); 0 disables
    l1: float = num(0.0, ge=0)
    #: OT loss and plan matching per side before/after training. null: read off the training
    #: iterations (each side's first and lowest-loss iteration; no extra forward, ≈ 0.1 % of a step) |
    #: k >= 1: on the first k batches per side, before and after training, with the selected masks
    #: (2·2·k more student forwards; 4 was the default before the cheap ones) | 0: off
    eval_batches: int | None = num(None, ge=0)
    head_tuning: HeadTuningConfig = field(default_factory=HeadTuningConfig)


class OTMF(MergeMethod):
    name = "otmf"
    Config = OTMFConfig
    protocols = ("continual", "joint")
    main_coef = "alpha"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """The cross-field rules (every value's range and choices are declared in OTMFConfig)."""
        checks = [
            (
                cfg.checkpoint_blocks is not True or cfg.student_weights == "layerwise",
                "method.checkpoint_blocks=true needs method.student_weights=layerwise "
                "(set method.checkpoint_blocks=false to use student_weights=all)",
            ),
            (
                cfg.adam_in_backward is not True or adam_in_backward_exact(cfg),
                "method.adam_in_backward=true needs one backward per optimiser step: schedule=alternate, "
                "l1=0 and backward_chunk=null (or leave it null: on where it is exact)",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        if cfg.sinkhorn.backend == "auto" and cfg.batch_size**2 > AUTO_KEOPS_PAIRS:
            missing = need(*KEOPS)
            if missing:
                raise UserError(
                    f"method.sinkhorn.backend=auto with batch_size={cfg.batch_size} picks a KeOps backend, "
                    f"which {missing}; or use sinkhorn.backend=tensorized"
                )

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
            targets = self.head_targets(task, t)
            if targets:
                t0 = time.perf_counter()
                heads = self._tune_heads(heads, merged, targets, pretrained, t)
                self.ctx.record("time_head_tuning_s", time.perf_counter() - t0)
        return state.advance(merged, heads=heads)

    # ---- head tuning ------------------------------------------------------------------------
    def head_targets(self, task: TaskInput, t: int) -> dict[str, Any]:
        """The tasks (name -> data) whose heads step ``t`` tunes, by ``head_tuning.which``."""
        which = self.cfg.head_tuning.which
        prev = {} if task.previous_data is None else {task.previous_data.name: task.previous_data}
        if which == "authors":  # scripts/clip_optimal_transport_route.py: after fusing task t
            return {} if t == 1 else {**prev, **({task.name: task.data} if task.last else {})}
        if which == "current":
            return {task.name: task.data}
        if which == "previous":
            return prev
        return dict(task.seen_data)

    def _tune_heads(
        self,
        heads: dict[str, Tensor],
        merged: StateDict,
        targets: dict[str, Any],
        pretrained: StateDict,
        t: int,
    ) -> dict[str, Tensor]:
        hc = self.cfg.head_tuning
        if hc.split == "test":
            log.warning("OTMF head tuning on the test split: test-set leakage (reported in steps.jsonl)")
            self.ctx.record("head_tuning_test_leakage", True)
        weights = apply(pretrained, merged)
        examples, losses = {}, {}
        for name, data in targets.items():
            stream = FeatureStream(
                self.ctx.backbone,
                weights,
                data,
                hc.split,
                hc.fraction,
                hc.batch_size,
                seed=self.ctx.seed_for("otmf", t, "head", name),
            )
            heads[name], curve = train_head(
                heads[name],
                iter(stream),
                steps=hc.steps,
                lr=hc.lr,
                what=f"OTMF head tuning of {name!r} at step {t}",
            )
            examples[name] = stream.examples
            losses[name] = sum(curve[-10:]) / len(curve[-10:]) if curve else None
        self.ctx.record("head_tuning_examples", examples)
        self.ctx.record("head_tuning_loss", losses)  # mean cross-entropy of the last 10 steps
        return heads
