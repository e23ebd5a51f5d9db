"""MINGLE: Mixtures of Null-Space Gated Low-Rank Experts for test-time continual model merging
(Qiu et al., arXiv 2505.11883, NeurIPS 2025; the authors' code: zihuanqiu/MINGLE, FusionBench fork).

Step t, for every selected linear site (``lora_layer`` substrings of the layer names):

  1. Δ = W_t − W_0; for t > 1 its top-left α×α block in the basis of D = Σ_{e<t} B_e A_e is removed
     (α = ⌊exp(entropy of D's normalised singular values)⌋); rank-r SVD → expert B_t A_t.
  2. A new gate row (C + 1 numbers) is appended, initialised N(0, 0.01²) / bias 0; old rows are frozen.
  3. Test-time adaptation: Adam on the new rows only, distilling θ_t's logits on a few unlabeled
     samples of task t (5 per class of its test split by default: flagged as test leakage), the
     weight gradient softly projected away from the earlier tasks' input subspace U.
  4. One pass over the seed samples: the top-k directions of each site's input covariance join U.

The merged model is θ₀ with the experts attached (``forward_context``); every other task delta
(biases, norms, embeddings, unselected linears) is dropped. The carried state grows per task by
r·(C+O) + C + 1 + k·C floats per site. See docs/methods/mingle.md.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import Any

import torch

from otmf_exp.errors import UserError
from otmf_exp.merging.adaptation import sample_seeds
from otmf_exp.merging.base import ContinualState, MergeMethod, TaskInput
from otmf_exp.merging.lora_moe import (
    Experts,
    Site,
    attached,
    find_sites,
    grow_subspace,
    low_rank,
    project_delta,
    top_subspace,
)
from otmf_exp.merging.mingle.mingle_config import (
    SVD_DTYPES,
    MINGLEConfig,
    Options,
    resolve_options,
    validate_config,
)
from otmf_exp.merging.mingle.mingle_tta import Adaptation
from otmf_exp.merging.task_vectors import StateDict

log = logging.getLogger(__name__)


class MINGLE(MergeMethod):
    name = "mingle"
    Config = MINGLEConfig
    protocols = ("continual",)
    state_growth = "per_task"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        validate_config(cfg)

    # ---- configuration resolved for the backbone ----------------------------------------------------
    def options(self) -> Options:
        return resolve_options(self.cfg, self.ctx.backbone.modality)

    def sites(self) -> list[Site]:
        if getattr(self, "_sites", None) is None:
            bb, layers = self.ctx.backbone, self.options().lora_layer
            self._sites = find_sites(bb.module, set(bb.mergeable_names()), layers)
            if not self._sites:
                raise UserError(
                    f"method.lora_layer={layers} selects no linear layer of backbone "
                    f"{getattr(bb, 'name', '?')!r} (substrings of names such as "
                    f"{next((n for n, m in bb.module.named_modules() if isinstance(m, torch.nn.Linear)), '?')!r})"
                )
        return self._sites

    def state_growth_bytes(self, pretrained: StateDict) -> int:
        """r'·(C+O) + C + 1 + k·C numbers per site and task (r' = min(r, O, C)); k = 0 with
        ``static_gate`` and, from the second task on, with ``subspace=keep_first``. Valid while U has
        fewer than C columns (3t < C: t < 256 for a 768-wide layer)."""
        o = self.options()
        k = 0 if o.static_gate is not None or o.subspace == "keep_first" else o.subspace_k
        total = 0
        for s in self.sites():
            c, out = s.in_features, s.out_features
            n = min(o.lora_r, c, out) * (c + out) + c + 1 + k * c
            total += n * pretrained[s.param].element_size()
        return total

    # ---- the merged model: θ₀ + gated experts -------------------------------------------------------
    def init(self, pretrained: StateDict) -> ContinualState:
        return ContinualState(step=0, merged={})

    def check_state(self, state: ContinualState, pretrained: StateDict) -> None:
        """A loaded state fits this backbone: one gate row per task and experts sized for every site."""
        if state.step == 0:
            return
        for s in self.sites():
            keys = [f"{s.name}/{k}" for k in ("A", "B", "gate_w", "gate_b")]
            missing = [k for k in keys if k not in state.extra]
            if missing:
                raise ValueError(f"checkpoint and model differ: no expert tensor {missing[0]!r}")
            gate_w = state.extra[keys[2]]
            if gate_w.shape != (state.step, s.in_features):
                raise ValueError(
                    f"checkpoint and model differ: {keys[2]!r} has shape {tuple(gate_w.shape)}, "
                    f"expected {(state.step, s.in_features)}"
                )

    def merged(self, state: ContinualState, pretrained: StateDict) -> StateDict:
        """θ₀: MINGLE drops every task delta outside its experts (attached by :meth:`forward_context`)."""
        return dict(pretrained)

    def _experts(self, state: ContinualState) -> dict[str, Experts]:
        x = state.extra
        return {
            s.name: Experts(x[f"{s.name}/A"], x[f"{s.name}/B"], x[f"{s.name}/gate_w"], x[f"{s.name}/gate_b"])
            for s in self.sites()
        }

    def forward_context(self, state: ContinualState) -> AbstractContextManager[Any]:
        if state.step == 0:
            return nullcontext()
        return attached(self.ctx.backbone.module, self.sites(), self._experts(state), self.cfg.batch_reduce)

    # ---- one task ---------------------------------------------------------------------------------
    def step(self, state: ContinualState, task: TaskInput, pretrained: StateDict) -> ContinualState:
        t, o, sites = state.step + 1, self.options(), self.sites()
        if t == 1:
            self.ctx.record("mingle_options", asdict(o))
        extra = dict(state.extra)
        t0 = time.perf_counter()
        ranks = self._add_experts(extra, sites, task, pretrained, t, o)
        self.ctx.record("time_experts_s", time.perf_counter() - t0)
        if ranks:
            self.ctx.record("mingle_effective_rank_mean", sum(ranks) / len(ranks))
        experts = self._new_rows(extra, sites, t, o, pretrained)
        self.ctx.record("mingle_trainable_params", sum(s.in_features + 1 for s in sites))
        if o.static_gate is None:
            self._adapt(extra, experts, sites, task, pretrained, t, o)
        for s in sites:
            e = experts[s.name]
            extra[f"{s.name}/gate_w"] = torch.cat([e.gate_w, e.new_w.detach()]).contiguous()
            extra[f"{s.name}/gate_b"] = torch.cat([e.gate_b, e.new_b.detach()]).contiguous()
        return state.advance(extra=extra)

    def _add_experts(
        self, extra: dict, sites: list[Site], task: TaskInput, pretrained: StateDict, t: int, o: Options
    ) -> list[int]:
        dtype, ranks = SVD_DTYPES[o.svd_dtype], []
        for s in sites:
            delta = s.weight(task.weights) - s.weight(pretrained)
            prev = extra[f"{s.name}/B"] @ extra[f"{s.name}/A"] if t > 1 else None
            clean, a = project_delta(delta, prev, zero_diag=o.zero_diag, dtype=dtype)
            if t > 1:
                ranks.append(a)
            a_new, b_new = low_rank(clean, o.lora_r, dtype)
            if t > 1:
                a_new = torch.cat([extra[f"{s.name}/A"], a_new])
                b_new = torch.cat([extra[f"{s.name}/B"], b_new], dim=1)
            extra[f"{s.name}/A"], extra[f"{s.name}/B"] = a_new.contiguous(), b_new.contiguous()
        return ranks

    def _new_rows(
        self, extra: dict, sites: list[Site], t: int, o: Options, pretrained: StateDict
    ) -> dict[str, Experts]:
        g = torch.Generator().manual_seed(self.ctx.seed_for("mingle", t, "gate"))
        out = {}
        for s in sites:
            like = pretrained[s.param]
            c = s.in_features
            if o.static_gate is not None or o.gate_init == "zeros":
                w = torch.zeros(1, c, dtype=like.dtype)
            else:
                w = o.gate_init_std * torch.randn(1, c, generator=g, dtype=like.dtype)
            bias = o.init_lambda if o.static_gate is None else o.static_gate
            old_w = extra.get(f"{s.name}/gate_w", like.new_zeros(0, c))
            old_b = extra.get(f"{s.name}/gate_b", like.new_zeros(0))
            out[s.name] = Experts(
                extra[f"{s.name}/A"],
                extra[f"{s.name}/B"],
                old_w,
                old_b,
                w.to(like.device),
                torch.full((1,), bias, dtype=like.dtype, device=like.device),
            )
        return out

    def _adapt(
        self,
        extra: dict,
        experts: dict[str, Experts],
        sites: list[Site],
        task: TaskInput,
        pretrained: StateDict,
        t: int,
        o: Options,
    ) -> None:
        bb = self.ctx.backbone
        if o.seed_split == "test":
            log.warning(
                "MINGLE adapts on samples of the test split: test-set leakage (reported in steps.jsonl)"
            )
            self.ctx.record("mingle_seed_test_leakage", True)
        t0 = time.perf_counter()
        pad = getattr(getattr(bb, "tokenizer", None), "pad_token_id", None) or 0
        seeds = sample_seeds(
            task.data,
            o.seed_split,
            o.seed_samples,
            o.seed_sampling == "per_class",
            self.ctx.seed_for("mingle", t, "seeds"),
            int(bb.batch_size),
            pad,
        )
        self.ctx.record("mingle_seed_samples", len(seeds))
        subspace = {s.name: extra[f"{s.name}/U"] for s in sites if f"{s.name}/U" in extra}
        ada = Adaptation(self.ctx, o, sites, experts, subspace, pretrained, task, seeds, t)
        curve = ada.run()
        if curve:
            self.ctx.record("mingle_tta_loss", curve[:: max(1, len(curve) // 100)])
        self.ctx.record("time_tta_s", time.perf_counter() - t0)
        if o.subspace_k == 0:
            return
        t0 = time.perf_counter()
        sigma = ada.covariance()
        for s in sites:
            if s.name in sigma and bool(sigma[s.name].any()):
                new = top_subspace(sigma[s.name], min(o.subspace_k, s.in_features))
                u = grow_subspace(extra.get(f"{s.name}/U"), new.to(pretrained[s.param].dtype), o.subspace)
                extra[f"{s.name}/U"] = u.contiguous()
        self.ctx.record("time_subspace_s", time.perf_counter() - t0)
