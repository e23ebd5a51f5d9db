"""MINGLE's test-time adaptation (arXiv 2505.11883): seed samples, distillation of the new gate rows
from θ_t on them, and the covariance pass that yields each site's new input directions.

Every forward goes through the backbone (``functional_call`` on the one pre-trained module, the
experts attached by ``lora_moe.attached``); nothing is copied. Vision: logits of the task's
zero-shot head, teacher logits computed once per seed sample. Text (Flan-T5): the teacher's greedy
answer (≤ ``max_new_tokens``) is the decoder input of teacher and student, per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otmf_exp.errors import UserError
from otmf_exp.merging.adaptation import SeedSet
from otmf_exp.merging.lora_moe import CovarianceRecorder, Experts, Site, attached, project_gate_grad

# ---- seed samples ------------------------------------------------------------------------------------


# ---- losses and modes ----------------------------------------------------------------------------------
def kd_loss(student: Tensor, teacher: Tensor, temperature: float, t_squared: bool) -> Tensor:
    """Soft cross-entropy −Σ softmax(z_t/T)·log softmax(z_s/T), averaged over every leading position
    (samples; tokens too, padding included, for ``[B, L, V]``), times T² when ``t_squared``."""
    s = F.log_softmax(student / temperature, dim=-1)
    p = F.softmax(teacher / temperature, dim=-1)
    loss = -(p * s).sum(-1).mean()
    return loss * temperature**2 if t_squared else loss


@contextmanager
def train_mode(module: nn.Module, on: bool) -> Iterator[None]:
    """``module.train(on)`` inside the block (dropout of the student), the previous mode after."""
    was = module.training
    module.train(on)
    try:
        yield
    finally:
        module.train(was)


# ---- adaptation --------------------------------------------------------------------------------------
def project_new_rows(
    experts: dict[str, Experts], subspace: dict[str, Tensor], h: dict[str, Tensor], beta: float, gamma: float
) -> list[Tensor]:
    """Project each site's new gate-row *weight* gradient against its U (sites without U, i.e. task
    1, and bias gradients are left alone); ``h`` (per site EMA) is updated. Returns the λ per site."""
    lams = []
    for name, u in subspace.items():
        e = experts[name]
        if e.new_w is not None and e.new_w.grad is not None:
            if name not in h:
                h[name] = torch.zeros(u.shape[1], device=u.device, dtype=u.dtype)
            e.new_w.grad, h[name] = project_gate_grad(e.new_w.grad, u, h[name], beta, gamma)
            lams.append(torch.exp(-gamma * h[name]))
    return lams


@dataclass
class Adaptation:
    """One task's test-time adaptation of the new gate rows (``experts[*].new_w/new_b``)."""

    ctx: Any
    opts: Any
    sites: list[Site]
    experts: dict[str, Experts]
    subspace: dict[str, Tensor]
    pretrained: dict[str, Tensor]
    task: Any
    seeds: SeedSet
    step: int

    @property
    def text(self) -> bool:
        return self.ctx.backbone.modality == "text"

    def _student(self, inputs: Any, dec: Tensor | None, recorder: CovarianceRecorder | None = None) -> Tensor:
        bb = self.ctx.backbone
        with attached(bb.module, self.sites, self.experts, self.opts.batch_reduce, recorder):
            if self.text:
                return bb.seq2seq_logits(self.pretrained, inputs, dec)
            if recorder is not None:
                return bb.features(self.pretrained, inputs)
            return bb.logits(self.pretrained, self.task.head, inputs)

    @torch.no_grad()
    def _teacher_vision(self) -> Tensor:
        bb, out = self.ctx.backbone, []
        for i in range(0, len(self.seeds), bb.batch_size):
            x, _ = self.seeds.batch(range(i, min(i + bb.batch_size, len(self.seeds))))
            out.append(bb.logits(self.task.weights, self.task.head, bb.to_device(x)))
        return torch.cat(out)

    def run(self) -> list[float]:
        """Adam on the new gate rows for ``max_steps`` batches; returns the loss per step."""
        o, bb = self.opts, self.ctx.backbone
        rows = [self.experts[s.name] for s in self.sites]
        params = [p for e in rows for p in (e.new_w, e.new_b)]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=o.lr)
        h: dict[str, Tensor] = {}  # the projection's EMA, 0 at the start of every task
        teacher = None if self.text or o.max_steps == 0 else self._teacher_vision()
        order = self.seeds.batches(o.batch_size, self.ctx.seed_for("mingle", self.step, "order"))
        curve, lams = [], []
        for _ in range(o.max_steps):
            idx = next(order)
            x, _ = self.seeds.batch(idx)
            x = bb.to_device(x)
            if self.text:
                gen = bb.generate_ids(self.task.weights, x, o.max_new_tokens)
                with torch.no_grad():
                    z_t = bb.seq2seq_logits(self.task.weights, x, gen)
                with train_mode(bb.module, o.dropout):
                    z_s = self._student(x, gen)
            else:
                z_t = teacher[torch.as_tensor(idx, device=teacher.device)]
                with train_mode(bb.module, o.dropout):
                    z_s = self._student(x, None)
            loss = kd_loss(z_s, z_t, o.kd_temperature, o.kd_t_squared)
            if not torch.isfinite(loss):
                raise UserError(
                    f"MINGLE: non-finite distillation loss at step {self.step}, iteration {len(curve) + 1}; "
                    f"lower method.lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.constraint_gate:
                lams = project_new_rows(self.experts, self.subspace, h, o.beta, o.gamma)
            opt.step()
            curve.append(float(loss.detach()))
        for p in params:
            p.requires_grad_(False)
        if lams:
            lam = torch.cat(lams)
            self.ctx.record("mingle_lambda", {"mean": float(lam.mean()), "min": float(lam.min())})
        return curve

    @torch.no_grad()
    def covariance(self) -> dict[str, Tensor]:
        """Σ_tokens x·xᵀ of every site's inputs over one shuffled pass of the seed samples, with the
        adapted gates (eval mode; T5: the gold answers, or the teacher's, as decoder input)."""
        o, bb = self.opts, self.ctx.backbone
        rec = CovarianceRecorder()
        order = self.seeds.batches(o.batch_size, self.ctx.seed_for("mingle", self.step, "covariance"))
        for _ in range(-(-len(self.seeds) // o.batch_size)):
            x, targets = self.seeds.batch(next(order))
            x = bb.to_device(x)
            dec = None
            if self.text:
                if o.cov_decoder == "labels":
                    dec = bb.target_ids(targets)
                else:
                    dec = bb.generate_ids(self.task.weights, x, o.max_new_tokens)
            with train_mode(bb.module, False):
                self._student(x, dec, rec)
        return rec.sigma
