"""Continual fine-tuning (the sequential fine-tuning baseline of MINGLE, Qiu et al., arXiv 2505.11883,
Table 1, and of OPCM, Tang et al., arXiv 2501.09522): FusionBench 0.2.33's
``ContinualImageClassificationFineTuningForCLIP`` as MINGLE's ``continual_clip_finetune.yaml`` runs it.

No task model is merged: task t's labelled ``split`` trains the current weights θ_{t−1} (θ₀ at t = 1)
for ``steps`` optimiser steps of one batch each, and θ_t = θ₀ + τᵐ_t is the model after task t.
Vision: cross-entropy of the task's frozen zero-shot head over the vision tower's features (the
logit scale folded into the head, as FusionBench's ``HFCLIPClassifier``: exp(logit_scale) ·
cos(image, class text)); only the vision transformer is trained (the visual projection and the
heads stay frozen). Text (Flan-T5): token cross-entropy of the label text with teacher forcing
(pad tokens ignored, as ``T5ForConditionalGeneration(labels=...)``). Per task a fresh ``Adam`` (the
reference resets its optimiser and scheduler to their initial state before each task) with
``CosineAnnealingLR(T_max=steps)``; no gradient clipping; inputs as the evaluation transform gives
them (no augmentation). ``lora.enabled``: peft LoRA adapters on the ``target_modules`` of the frozen
θ₀ are trained instead (the reference never merges them: the same adapters continue from task to
task, so they are carried in ``state.extra`` and τᵐ = their merged delta).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from otmf_exp.errors import NonFiniteLossError, UserError
from otmf_exp.merging.adaptation import subsample
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.task_vectors import StateDict
from otmf_exp.runtime.progress import progress
from otmf_exp.schema import choice, num

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SCHEDULERS = ("cosine", "constant")
#: default LoRA targets per modality (the reference's q_proj/v_proj of CLIP; T5's q/v projections)
LORA_TARGETS = {"vision": ["q_proj", "v_proj"], "text": ["q", "v"]}
PREFIX = "lora/"


@dataclass
class LoRAConfig:
    #: train peft LoRA adapters on θ₀ instead of every weight of the tower (the reference's use_lora)
    enabled: bool = False
    r: int = num(16, ge=1)
    alpha: float = num(32.0, gt=0)
    #: dropout on the adapters' input during training (the reference: 0.1)
    dropout: float = num(0.1, ge=0, lt=1)
    #: module names the adapters wrap; null = q_proj/v_proj (CLIP) or q/v (Flan-T5)
    target_modules: list[str] | None = None


@dataclass
class ContinualFinetuneConfig:
    name: str = "continual_finetune"
    lr: float = num(1e-5, gt=0)
    #: Adam's (L2) weight decay (torch.optim.Adam, not AdamW, as the reference)
    weight_decay: float = num(0.0, ge=0)
    #: optimiser steps per task, one batch each (MINGLE / FusionBench: 4000)
    steps: int = num(4000, ge=0)
    #: labelled inputs per step (MINGLE's config: 16; FusionBench's own yaml: 128)
    batch_size: int = num(16, ge=1)
    #: labelled split trained on
    split: str = choice("train", SPLITS)
    #: train on the evaluated split (eval_split) on purpose; else that leakage is refused
    train_on_eval_split: bool = False
    #: cosine: CosineAnnealingLR(T_max=steps) from lr to 0, reset per task (the reference) | constant
    scheduler: str = choice("cosine", SCHEDULERS)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


class ContinualFinetune(MergeMethod):
    name = "continual_finetune"
    Config = ContinualFinetuneConfig
    protocols = ("continual",)  # the reference is sequential; joint fine-tuning is another method
    state_growth = "constant"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        targets = cfg.lora.target_modules
        if targets is not None and len(targets) == 0:
            raise UserError("method.lora.target_modules must be null or a non-empty list")

    # ---- the loss ------------------------------------------------------------------------------
    def loss(self, params: StateDict, head: Tensor | None, batch: dict[str, Any]) -> Tensor:
        """Cross-entropy of one labelled batch with weights ``params`` (vision: through ``head``)."""
        bb = self.ctx.backbone
        inputs = bb.to_device(batch["inputs"])
        if bb.modality == "text":
            labels = bb.target_ids(list(batch["targets"]))
            pad = bb.module.config.pad_token_id
            labels = labels.masked_fill(labels == pad, -100)
            logits = bb.seq2seq_logits(params, inputs, labels)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        logits = bb.logits(params, head, inputs)
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    def train(
        self,
        trainable: list[Tensor],
        params: StateDict,
        head: Tensor | None,
        batches: Iterator[dict[str, Any]],
        what: str,
    ) -> list[float]:
        """``steps`` steps of a fresh Adam (+ scheduler) on ``trainable`` (leaves inside ``params`` or
        the module); returns the loss curve."""
        cfg = self.cfg
        opt = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
            if cfg.scheduler == "cosine" and cfg.steps > 0
            else None
        )
        curve: list[float] = []
        bar = progress(range(cfg.steps), desc=f"fine-tune {what}", enabled=self.ctx.progress, leave=False)
        for it in bar:
            opt.zero_grad(set_to_none=True)
            loss = self.loss(params, head, next(batches))
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"continual fine-tuning {what}, step {it}: non-finite cross-entropy; the last "
                    f"completed task's checkpoint is kept. Lower method.lr"
                )
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            curve.append(float(loss.detach()))
            if self.ctx.progress and it % 10 == 0:
                bar.set_postfix(loss=f"{curve[-1]:.4f}")
        return curve

    # ---- the protocol -----------------------------------------------------------------------------
    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        t = state.step + 1
        bb = self.ctx.backbone
        if bb.modality != "text" and task.head is None:
            raise UserError(f"continual fine-tuning of task {task.name!r} needs its zero-shot head")
        task.weights = None  # θ_t is never used: fine-tuning starts from the current model
        batches = task.data.batches(
            self.cfg.split, self.cfg.batch_size, self.ctx.seed_for("continual_finetune", t, "batches")
        )
        what = f"step {t} ({task.name})"
        # dropout (LoRA) and any other randomness of the step: seeded per step (resume-exact)
        devices = [bb.device] if bb.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.ctx.seed_for("continual_finetune", t, "rng"))
            if self.cfg.lora.enabled:
                merged, extra, curve = self._step_lora(state, task.head, batches, pretrained, what)
            else:
                merged, curve = self._step_full(state, task.head, batches, pretrained, what)
                extra = None
        self.ctx.record("loss_curve", subsample(curve))
        if curve:
            self.ctx.record("final_loss", curve[-1])
        return state.advance(merged, extra=extra)

    def _step_full(
        self,
        state: ContinualState,
        head: Tensor | None,
        batches: Iterator[dict[str, Any]],
        pretrained: StateDict,
        what: str,
    ) -> tuple[StateDict, list[float]]:
        with torch.no_grad():
            params = {k: (p + state.merged[k]).requires_grad_(True) for k, p in pretrained.items()}
        curve = self.train(list(params.values()), params, head, batches, what)
        with torch.no_grad():
            merged = {k: v.detach() - pretrained[k] for k, v in params.items()}
        return merged, curve

    # ---- LoRA (peft) ----------------------------------------------------------------------------
    @contextmanager
    def _adapters(self, extra: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
        """peft LoRA adapters injected into the backbone's frozen θ₀ module (started from ``extra``
        if given, else peft's initialisation: A Kaiming-uniform, B = 0), removed on exit."""
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        bb, lc = self.ctx.backbone, self.cfg.lora
        targets = list(lc.target_modules) if lc.target_modules is not None else LORA_TARGETS[bb.modality]
        config = LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets, bias="none"
        )
        try:
            model = LoraModel(bb.module, config, "default")
        except ValueError as e:  # no module matches the targets (e.g. open_clip's fused attention)
            raise UserError(f"method.lora.target_modules={targets} on backbone {bb.name!r}: {e}") from e
        try:
            adapters = {n: p for n, p in bb.module.named_parameters() if p.requires_grad}
            if extra:
                if sorted(f"{PREFIX}{n}" for n in adapters) != sorted(extra):
                    raise UserError("the checkpoint's LoRA adapters do not match method.lora (r, targets)")
                with torch.no_grad():
                    for n, p in adapters.items():
                        p.copy_(extra[f"{PREFIX}{n}"])
            yield adapters
        finally:
            model.unload()  # the original modules back, θ₀ untouched
            bb.module.requires_grad_(False)

    def _step_lora(
        self,
        state: ContinualState,
        head: Tensor | None,
        batches: Iterator[dict[str, Any]],
        pretrained: StateDict,
        what: str,
    ) -> tuple[StateDict, dict[str, Tensor], list[float]]:
        from peft.tuners.lora import LoraLayer

        bb = self.ctx.backbone
        with self._adapters(state.extra) as adapters:
            curve = self.train(list(adapters.values()), {}, head, batches, what)
            merged = {k: torch.zeros_like(p) for k, p in pretrained.items()}
            with torch.no_grad():
                for name, mod in bb.module.named_modules():
                    if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
                        key = f"{name}.weight"
                        merged[key] = mod.get_delta_weight("default").to(merged[key].dtype)
            extra = {f"{PREFIX}{n}": p.detach().clone() for n, p in adapters.items()}
        return merged, extra, curve
