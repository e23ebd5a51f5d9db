"""One OTMF fusion step (t ≥ 2) as named pieces: teacher cache, student, OT loss, mask training, selection.

τᵐ_t = α·(M_pre ⊙ τᵐ_{t−1}) + (1−α)·(M_post ⊙ τ_t). The masks (shaped like the mergeable
parameters, or one scalar per tensor) start at 1 and are trained with Adam on the Sinkhorn
divergence (geomloss) between the student's features (θ₀ + τᵐ_t through the backbone's
functional forward) and cached frozen teachers' features on the same images: the "pre" teacher
θ₀ + τᵐ_{t−1} on pre-side data, the "post" teacher θ_t on task t's data (Pan et al., arXiv
2511.19561). :class:`FusionStep` is used by :class:`otmf_exp.merging.otmf.otmf.OTMF`.

Selection (``select=authors``, the authors' src/tasks/shortest_route_mask.py): one best loss over
both sides; after each iteration's optimiser step, if that iteration's loss is the lowest so far,
both masks are saved as they are after the step. Diagnostics per step (``merging/otmf/ot_diagnostics.py``):
quantiles of each mask, the selected iteration and its loss, and per side the fraction of student
points whose largest transport mass goes to their own teacher image.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor

from otmf_exp.errors import NonFiniteLossError
from otmf_exp.merging.base import TaskInput
from otmf_exp.merging.otmf.ot_diagnostics import (
    SAMPLE_STRIDE,
    TrainingDiagnostics,
    checkpoint_fits,
    decide_offload,
    mask_stats,
    own_match,
    transport_plan,
)
from otmf_exp.merging.otmf.ot_masks import BackwardAdam, BestOnWrite, Masks, adam, compute_dtype, masked_merge
from otmf_exp.merging.task_vectors import StateDict, apply
from otmf_exp.models.functional import ComputedParams
from otmf_exp.runtime.offload import SpilledCopy, total_seconds
from otmf_exp.runtime.progress import progress

log = logging.getLogger(__name__)


def _batch_len(x: Any) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _batch_slice(x: Any, sl: slice) -> Any:
    """Rows ``sl`` of a batch of inputs (a tensor, or a dict of tensors for text backbones)."""
    return {k: v[sl] for k, v in x.items()} if isinstance(x, dict) else x[sl]


def adam_in_backward_exact(cfg: Any) -> bool:
    """Whether each mask's Adam step may run inside the backward without changing a bit: one
    backward per optimiser step (alternate schedule, no l1 term, no backward chunks)."""
    return cfg.schedule == "alternate" and cfg.l1 == 0 and not cfg.backward_chunk


class FusionStep:
    """Step t of OTMF: ``run()`` returns τᵐ_t and records curves, diagnostics and phase times.

    ``cfg`` is the OTMF config, ``ctx`` the runner's :class:`~otmf_exp.merging.base.MethodContext`,
    ``loss_fn`` a geomloss ``SamplesLoss``. ``tv_prev`` (τᵐ_{t−1}) and the task are not modified,
    except that runner-owned θ_t becomes τ_t in place once the post teacher has run.
    """

    def __init__(
        self,
        cfg: Any,
        ctx: Any,
        loss_fn: Any,
        tv_prev: StateDict,
        task: TaskInput,
        pretrained: StateDict,
        t: int,
    ) -> None:
        self.cfg, self.ctx, self.loss_fn = cfg, ctx, loss_fn
        self.tv_prev, self.task, self.pretrained, self.t = tv_prev, task, pretrained, t
        self.pre_data = task.previous_data if cfg.pre_data == "previous_task" else task.data
        self.joint = cfg.schedule == "joint"
        self.n_pre = cfg.iterations if self.joint else (cfg.iterations + 1) // 2
        self.n_post = cfg.iterations if self.joint else cfg.iterations // 2
        self.seed_pre, self.seed_post = ctx.seed_for("otmf", t, "pre"), ctx.seed_for("otmf", t, "post")
        aib = cfg.adam_in_backward
        self.adam_in_backward = adam_in_backward_exact(cfg) if aib is None else bool(aib)
        self.curves: dict[str, list[float]] = {"pre": [], "post": []}
        ckpt = cfg.checkpoint_blocks
        #: whether the student's layers run checkpointed; None: ``auto``, decided after iteration 0
        self.ckpt: bool | None = (
            None if ckpt == "auto" and cfg.student_weights == "layerwise" else ckpt is True
        )
        #: offload (auto: decided here, once per step, from the masks' size; see decide_offload)
        w_mb = (
            sum(v.numel() * compute_dtype(v).itemsize for v in tv_prev.values() if v.is_floating_point())
            / 2**20
        )
        copies = 2 if cfg.select == "authors" and cfg.best_masks != "replay" else 0
        self.offload, self.offload_reason = decide_offload(
            cfg.offload, ctx.device, cfg.mask.granularity, (2 + 4 + copies) * w_mb, cfg.memory_budget_mb,
            cfg.offload_dir, all(compute_dtype(v) == torch.float32 for v in tv_prev.values() if v.is_floating_point()),
        )  # fmt: skip
        # offload: seconds of reads/writes, the moments' store size
        self.offload_s, self.offload_mb = 0.0, 0.0
        self.probe: list[tuple[int, int]] = []  # (one layer's activation bytes, layers), iteration 0
        #: eval_batches=null: the diagnostics are read off the training iterations (no extra forward)
        self.diag = TrainingDiagnostics(cfg.sinkhorn) if cfg.eval_batches is None else None
        #: best_masks=on_write with one backward per step: called with (iteration, loss) before the
        #: backward; False skips it (BestOnWrite.before_step)
        self.before_backward: Callable[[int, float], bool] | None = None
        self.cow_replay = False  # on_write dropped its copies: the best pair is replayed
        #: (iteration, its loss) whose masks the step returns; None without iterations
        self.selected: tuple[int, float] | None = None

    # ---- data and teachers ------------------------------------------------------------------------
    def stream(self, data: Any, n: int, seed: int) -> Iterator[Tensor]:
        """``n`` seeded batches of unlabeled inputs from ``data``'s adaptation split, on the device."""
        it = data.batches(self.cfg.adapt_split, self.cfg.batch_size, seed)
        for _ in range(n):
            yield self.ctx.backbone.to_device(next(it)["inputs"])

    @torch.no_grad()
    def _features(self, params: StateDict, data: Any, n: int, seed: int) -> list[Tensor]:
        feats = (self.ctx.backbone.features(params, x) for x in self.stream(data, n, seed))
        return [f.to(compute_dtype(f)) for f in feats]

    def cache_teachers(self) -> None:
        """Teacher features on exactly the batches the student will see, computed once; then τ_t."""
        k = self.cfg.eval_batches or 0
        self.f_pre = self._features(
            apply(self.pretrained, self.tv_prev), self.pre_data, max(self.n_pre, k), self.seed_pre
        )
        self.f_post = self._features(self.task.weights, self.task.data, max(self.n_post, k), self.seed_post)
        self.tv_new = self.task.task_vector(self.pretrained)  # runner-owned θ_t becomes τ_t in place

    # ---- student and loss -------------------------------------------------------------------------
    def weight(self, k: str, train: tuple[bool, bool]) -> Tensor:
        """The student's weight ``k``, θ₀ + α·M_pre⊙τᵐ + (1−α)·M_post⊙τ: two fused ops (no
        weight-sized temporaries); a mask not being trained enters as a constant."""
        p = self.pretrained[k]
        c = compute_dtype(p)  # float32, or float64 for float64 models
        w = torch.addcmul(p.to(c), self.m_pre.value(k, train[0]), self.tv_prev[k].to(c), value=self.cfg.alpha)
        return torch.addcmul(
            w, self.m_post.value(k, train[1]), self.tv_new[k].to(c), value=1.0 - self.cfg.alpha
        ).to(p.dtype)

    def student(self, x: Tensor, train: tuple[bool, bool]) -> Tensor:
        """Features of the student. ``student_weights=layerwise``: each weight is made when its module
        runs and re-made in the backward (one module's weights alive, bit-identical results; with
        ``checkpoint_blocks`` each layer's activations are re-made in the backward as well) |
        ``all``: every weight made before the forward and kept by autograd until the backward."""
        if self.cfg.student_weights == "layerwise":
            probe = self.ckpt is None and torch.is_grad_enabled()
            params = ComputedParams(
                lambda k, grad: self.weight(k, train if grad else (False, False)),
                self.pretrained,
                checkpoint_blocks=self.ckpt is not False,
                probe=self.probe if probe else None,
                decide=self._decide_checkpoint if probe else None,
            )
        else:
            params = {k: self.weight(k, train) for k in self.pretrained}
        feats = self.ctx.backbone.features(params, x)
        return feats.to(compute_dtype(feats))

    def _loss(self, feats: Tensor, target: Tensor) -> Tensor:
        if not torch.isfinite(feats).all():  # geomloss fails obscurely on inf/NaN inputs
            return feats.new_tensor(float("nan"))
        return self.loss_fn(feats, target)

    def ot(self, x: Tensor, target: Tensor, train: tuple[bool, bool] = (False, False)) -> Tensor:
        return self._loss(self.student(x, train), target)

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per side, on the first ``eval_batches`` batches (the same before and after training): the
        mean OT loss and the mean :func:`own_match` of the student-to-teacher transport plan."""
        k, s = self.cfg.eval_batches or 0, self.cfg.sinkhorn
        sides = {
            "pre": (self.pre_data, self.seed_pre, self.f_pre),
            "post": (self.task.data, self.seed_post, self.f_post),
        }
        losses, matches = {}, {}
        for side, (data, seed, feats) in sides.items():
            vals, match = [], []
            for x, f in zip(self.stream(data, k, seed), feats[:k]):
                student = self.student(x, (False, False))
                vals.append(float(self._loss(student, f)))
                if torch.isfinite(student).all():
                    match.append(own_match(transport_plan(student, f, p=s.p, blur=s.blur, scaling=s.scaling)))
            losses[side] = sum(vals) / max(len(vals), 1)
            matches[side] = sum(match) / len(match) if match else None
        return losses, matches

    # ---- training ---------------------------------------------------------------------------------
    def _iteration(
        self, i: int, pre_it: Iterator[Tensor], post_it: Iterator[Tensor], track: bool
    ) -> tuple[str, float]:
        """Iteration ``i``: the side trained (alternate: even = pre, odd = post; joint: both), its loss
        (the sum for joint), and the loss's gradient accumulated into that side's masks (l1 included)."""
        cfg = self.cfg
        if self.joint:
            parts = [
                ("pre", next(pre_it), self.f_pre[i], (True, True)),
                ("post", next(post_it), self.f_post[i], (True, True)),
            ]
            side, masks = "joint", (self.m_pre, self.m_post)
        elif i % 2 == 0:
            parts, side, masks = (
                [("pre", next(pre_it), self.f_pre[i // 2], (True, False))],
                "pre",
                (self.m_pre,),
            )
        else:
            parts, side, masks = (
                [("post", next(post_it), self.f_post[i // 2], (False, True))],
                "post",
                (self.m_post,),
            )
        total = None
        for curve, x, target, train in parts:
            loss, feats = self._loss_and_grad(x, target, train, i)
            if track:
                self.curves[curve].append(float(loss))
                if self.diag is not None:
                    self.diag.observe(curve, float(loss), feats, target)
            total = loss if total is None else total + loss  # float32, as the summed joint loss
        if cfg.l1 > 0:
            (cfg.l1 * sum(m.mean_abs() for m in masks)).backward()
        return side, float(total)

    def _loss_and_grad(
        self, x: Tensor, target: Tensor, train: tuple[bool, bool], i: int
    ) -> tuple[Tensor, Tensor]:
        """OT loss of one batch and its gradient into the trained masks. ``backward_chunk`` = c: the
        features of the whole batch without a graph, the loss's gradient w.r.t. them, then c inputs
        at a time re-run with a graph and backpropagated with their slice of that gradient — the
        activations of c inputs alive instead of the batch's (the same gradient up to float
        summation order; one more forward per iteration). Returns the loss and the student's features
        (detached)."""
        n = _batch_len(x)
        chunk = self.cfg.backward_chunk
        if not chunk or chunk >= n:
            feats = self.student(x, train)
            loss = self._loss(feats, target)
            self._checked(loss, i)
            if self.before_backward is None or self.before_backward(i, float(loss.detach())):
                loss.backward()
            return loss.detach(), feats.detach()
        with torch.no_grad():
            feats = self.student(x, (False, False))
        feats.requires_grad_(True)
        loss = self._loss(feats, target)
        self._checked(loss, i)
        loss.backward()
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            self.student(_batch_slice(x, sl), train).backward(feats.grad[sl])
        return loss.detach(), feats.detach()

    def _checked(self, loss: Tensor, i: int) -> None:
        if not math.isfinite(float(loss.detach())):
            raise NonFiniteLossError(
                f"OTMF step {self.t} ({self.task.name}), iteration {i}: non-finite OT loss; the last "
                f"completed step's checkpoint is kept. Lower method.lr or raise method.sinkhorn.blur"
            )

    def _optimise(self, n: int, track: bool) -> tuple[int, float] | None:
        """Iterations ``0..n-1`` from the current masks with fresh Adam states and streams (the same
        seeded batches every time). With ``track``: curves, the non-finite check, and — for
        ``select=authors, best_masks=copy`` — the best masks copied after each improving step.
        Returns the selected (iteration, loss)."""
        cfg = self.cfg
        sides = {"pre": self.m_pre, "post": self.m_post}
        if self.adam_in_backward or self.offload:  # Adam per (side, layer) group
            with BackwardAdam(
                {s: m.raw for s, m in sides.items()},
                cfg.lr,
                hooks=self.adam_in_backward,  # stepped inside the iteration's backward
                offload=self.offload,
                offload_dir=cfg.offload_dir,
            ) as grouped:
                try:
                    if self.adam_in_backward:
                        return self._loop(n, track, lambda side: grouped.flush())
                    return self._loop(
                        n,
                        track,
                        lambda side: grouped.step_sides(("pre", "post") if side == "joint" else (side,)),
                    )
                finally:
                    if grouped.offload is not None:
                        self.offload_s += grouped.offload.seconds
                        self.offload_mb = max(self.offload_mb, grouped.offload.bytes / 2**20)
        # the optimiser states are freed on return, before the result is built
        opts = {s: adam(list(m.raw.values()), cfg.lr) for s, m in sides.items()}

        def step(side: str) -> None:
            for s in ("pre", "post") if side == "joint" else (side,):
                opts[s].step()
                opts[s].zero_grad(set_to_none=True)  # at once: never two masks' gradients alive together

        return self._loop(n, track, step)

    def _loop(self, n: int, track: bool, step: Callable[[str], None]) -> tuple[int, float] | None:
        """The iterations of :meth:`_optimise`; ``step(side)`` completes each iteration's optimiser
        step (the side trained, or ``joint``)."""
        cfg = self.cfg
        best, selected = float("inf"), None
        copy = cfg.select == "authors" and cfg.best_masks == "copy"
        cow = None
        if track and cfg.select == "authors" and cfg.best_masks == "on_write":
            early = adam_in_backward_exact(
                cfg
            )  # one backward per step: decided before it, last one skippable
            # skip_last=False: skipping the last backward left its graph (and the step's θ_t, through the
            # saved-tensor hooks) alive after the step (tests/test_bounded_memory.py); it saved one backward
            cow = BestOnWrite({"pre": self.m_pre, "post": self.m_post}, n - 1, skip_last=False)
            if early:
                self.before_backward = lambda i, v: cow.before_step(
                    i, v, ("pre",) if i % 2 == 0 else ("post",)
                )
        pre_it = self.stream(self.pre_data, self.n_pre, self.seed_pre)
        post_it = self.stream(self.task.data, self.n_post, self.seed_post)
        what = f"OTMF step {self.t} ({self.task.name})" + ("" if track else ", replay to the best iteration")
        for i in progress(range(n), desc=what, enabled=self.ctx.progress, leave=False):
            side, value = self._iteration(i, pre_it, post_it, track)
            if cow is not None and self.before_backward is None:
                cow.before_step(i, value, ("pre", "post") if side == "joint" else (side,))
            step(side)
            if self.ckpt is None:  # checkpoint_blocks=auto: decided once, from iteration 0's probe
                self._decide_checkpoint()
            if cfg.select == "last":
                selected = (i, value)
            elif value < best:  # authors: both masks, as they are after this step
                best, selected = value, (i, value)
                if copy and track:
                    self.m_pre.save_best()
                    self.m_post.save_best()
        self.before_backward = None
        if cow is not None:
            cow.finish()
            self.cow_replay = cow.replay
        for m in (self.m_pre, self.m_post):
            m.free_grads()
        return selected

    def train(self) -> None:
        """Adam on the masks for ``iterations``. ``select=authors``: after each iteration's step, if
        its loss (the side trained; the sum for ``joint``) is the lowest so far, both masks as they
        are after the step are the result (kept by copies, or re-derived by replay: ``best_masks``).
        ``select=last``: the final masks."""
        cfg = self.cfg
        self.selected = self._optimise(cfg.iterations, track=True)
        if cfg.select != "authors" or self.selected is None:
            return
        replayed = 0
        if cfg.best_masks == "copy":
            for m in (self.m_pre, self.m_post):
                m.load_best()
        elif (cfg.best_masks == "replay" or self.cow_replay) and self.selected[0] < cfg.iterations - 1:
            # replay (on_write: after it dropped its copies); the last iteration needs no replay
            for m in (self.m_pre, self.m_post):
                m.reset()
            replayed = self.selected[0] + 1
            self._optimise(replayed, track=False)
        self.ctx.record("select_replayed_iterations", replayed)

    def _decide_checkpoint(self) -> bool:
        """``checkpoint_blocks=auto``: checkpoint the rest of iteration 0 (from its second layer on,
        called by the probe) and the remaining iterations only if the activations of every layer
        (the probe's measured size × layers) plus the optimiser states still to come (a side not
        yet stepped) would not fit ``memory_budget_mb``; recorded in steps.jsonl. Returns it."""
        per_layer, layers = self.probe[0] if self.probe else (0, 0)
        # M_post's Adam moments, not yet made (none on the device with offload)
        pending = (
            0
            if self.joint or self.offload
            else 2 * sum(v.numel() * v.element_size() for v in self.m_post.raw.values())
        )
        need_mb = (per_layer * layers + pending) / 2**20
        fits, available_mb = checkpoint_fits(need_mb, self.cfg.memory_budget_mb, self.ctx.device)
        self.ckpt = not fits
        self.ctx.record("checkpoint_need_mb", round(need_mb, 1))  # deterministic; the budget is not
        log.info(
            "OTMF step %d: checkpoint_blocks=auto -> %s (need %.0f MB, %.0f MB available)",
            self.t,
            self.ckpt,
            need_mb,
            available_mb,
        )
        return self.ckpt

    # ---- the whole step ---------------------------------------------------------------------------
    @torch.no_grad()
    def result(self) -> StateDict:
        """τᵐ_t from the selected masks, in τᵐ_{t−1}'s dtypes; records the mean mask value and the
        1/50/99 % quantiles of each mask."""
        merged = masked_merge(
            self.tv_prev, self.tv_new, self.m_pre.values(False), self.m_post.values(False), self.cfg.alpha
        )
        merged = {k: v.to(self.tv_prev[k].dtype) for k, v in merged.items()}
        t0 = time.perf_counter()
        stride = SAMPLE_STRIDE if self.diag is not None else 1  # full diagnostics: exact over every entry
        masks = {"pre": self.m_pre.values(False), "post": self.m_post.values(False)}
        mean, quantiles = mask_stats(masks, stride)
        self.ctx.record("mask_mean", mean)
        self.ctx.record("mask_quantiles", quantiles)
        self.ctx.record("time_mask_stats_s", time.perf_counter() - t0)
        return merged

    def run(self) -> StateDict:
        cfg, record = self.cfg, self.ctx.record
        t0 = time.perf_counter()
        self.cache_teachers()
        record("time_teacher_s", time.perf_counter() - t0)
        self.m_pre = Masks(self.tv_prev, cfg.mask.param, cfg.mask.granularity)
        self.m_post = Masks(self.tv_new, cfg.mask.param, cfg.mask.granularity)
        with ExitStack() as stores:
            if self.offload and cfg.select == "authors" and cfg.best_masks != "replay":
                for m in (self.m_pre, self.m_post):  # the best masks' copies, off the device
                    m.spill = stores.enter_context(SpilledCopy(m.raw, self.ctx.device, cfg.offload_dir))
            return self._fuse()

    def _fuse(self) -> StateDict:
        """:meth:`run` once the masks (and their off-device copies) exist: train, select, record."""
        cfg, record = self.cfg, self.ctx.record
        t0 = time.perf_counter()
        init = self.evaluate() if cfg.eval_batches else None
        t_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.train()
        record("time_train_s", time.perf_counter() - t0)
        t0 = time.perf_counter()
        final = self.evaluate() if cfg.eval_batches else None
        if self.diag is not None:
            init, final = self.diag.summary()
            t_eval = self.diag.seconds
        record("time_ot_eval_s", t_eval + time.perf_counter() - t0)
        record("checkpoint_blocks", bool(self.ckpt))  # what ran after iteration 0 (auto: decided)
        record("offload", self.offload)
        record("offload_reason", self.offload_reason)
        if self.offload:
            spills = [m.spill for m in (self.m_pre, self.m_post)]
            record("offload_mb", round(self.offload_mb + sum(s.bytes for s in spills if s) / 2**20, 1))
            record("time_offload_s", self.offload_s + total_seconds(spills))
        merged = self.result()
        record("ot_loss_pre", self.curves["pre"])
        record("ot_loss_post", self.curves["post"])
        record("select_iteration", None if self.selected is None else self.selected[0])
        record("select_loss", None if self.selected is None else self.selected[1])
        if init is not None and final is not None:
            record("ot_eval_init", init[0])
            record("ot_eval_final", final[0])
            record("ot_match_init", init[1])
            record("ot_match_final", final[1])
        return merged
