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
r·(C+O) + C + 1 + k·C floats per site. See README "MINGLE" and ``shared/spec/mingle.md``.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from otmf_exp.errors import UserError
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
from otmf_exp.merging.mingle_tta import Adaptation, sample_seeds
from otmf_exp.merging.task_vectors import StateDict

log = logging.getLogger(__name__)

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: the authors' per-backbone defaults (config/method/mingle/mingle.yaml, mingle_nlp.yaml, mingle_nlp.py)
AUTO = {
    "vision": dict(
        lora_layer=["attn", "mlp"],
        lr=1e-4,
        batch_size=16,
        seed_samples=5,
        seed_sampling="per_class",
        subspace="grow",
        kd_t_squared=False,
        dropout=False,
    ),
    "text": dict(
        lora_layer=["DenseReluDense.wi", "SelfAttention", "EncDecAttention"],
        lr=1e-3,
        batch_size=8,
        seed_samples=100,
        seed_sampling="total",
        subspace="keep_first",
        kd_t_squared=True,
        dropout=True,
    ),
}


@dataclass
class MINGLEConfig:
    name: str = "mingle"
    #: substrings of the layer names that get experts; null = the authors' default for the backbone:
    #: [attn, mlp] (CLIP: q,k,v,out_proj,fc1,fc2) | [DenseReluDense.wi, SelfAttention, EncDecAttention] (T5).
    #: MINGLE*: [q_proj, k_proj, v_proj, fc1]
    lora_layer: list[str] | None = None
    #: expert rank r (capped at min(O, C))
    lora_r: int = 64
    #: one routing per batch (gates averaged over the batch) | false: per sample
    batch_reduce: bool = True
    #: Adam learning rate and batch of the adaptation; null = 1e-4 / 16 (CLIP) | 1e-3 / 8 (T5)
    lr: float | None = None
    batch_size: int | None = None
    #: Adam steps per task
    max_steps: int = 50
    #: seed samples: null = 5 per class (CLIP) | 100 in total (T5)
    seed_samples: int | None = None
    #: per_class | total; null = per_class (CLIP) | total (T5)
    seed_sampling: str | None = None
    #: split the seed samples come from: test (the authors' code; test leakage, flagged) | validation | train
    seed_split: str = "test"
    #: input directions per task added to U; grow (3t columns, CLIP code and paper) | keep_first (T5 code:
    #: U keeps the first task's k directions); null = grow (CLIP) | keep_first (T5)
    subspace_k: int = 3
    subspace: str | None = None
    #: soft null-space projection of the new gate row's weight gradient: λ_i = exp(−γ·h_i), h EMA with β
    constraint_gate: bool = True
    gamma: float = 1.0
    beta: float = 0.99
    #: new gate row: weight normal(0, gate_init_std²) (code) | zeros (paper Alg. 1); bias init_lambda
    gate_init: str = "normal"
    gate_init_std: float = 0.01
    init_lambda: float = 0.0
    #: also zero the diagonal of P = uᵀΔv (the code's `P.diag().fill_(0)` is a no-op on a copy)
    zero_diag: bool = False
    #: dtype of the SVDs of the expert construction: float32 (code) | float64
    svd_dtype: str = "float32"
    #: distillation temperature; multiply the loss by T²: null = false (CLIP) | true (T5)
    kd_temperature: float = 2.0
    kd_t_squared: bool | None = None
    #: student in train mode (dropout) during adaptation; null = false (CLIP) | true (T5)
    dropout: bool | None = None
    #: T5: length of the teacher's greedy answers; decoder input of the covariance pass:
    #: labels (gold answers, code) | teacher (the teacher's answers: no label use)
    max_new_tokens: int = 32
    cov_decoder: str = "labels"
    #: the 0-sample "static" variant: every gate fixed at this value (paper: 0.3), no adaptation, no data
    static_gate: float | None = None


_CHOICES = {
    "seed_sampling": ("per_class", "total", None),
    "seed_split": ("train", "validation", "test"),
    "subspace": ("grow", "keep_first", None),
    "gate_init": ("normal", "zeros"),
    "svd_dtype": tuple(SVD_DTYPES),
    "cov_decoder": ("labels", "teacher"),
}


@dataclass
class Options:
    """The config with every null resolved for the backbone's modality (recorded at step 1)."""

    lora_layer: list[str]
    lr: float
    batch_size: int
    seed_samples: int
    seed_sampling: str
    subspace: str
    kd_t_squared: bool
    dropout: bool
    lora_r: int
    batch_reduce: bool
    max_steps: int
    seed_split: str
    subspace_k: int
    constraint_gate: bool
    gamma: float
    beta: float
    gate_init: str
    gate_init_std: float
    init_lambda: float
    zero_diag: bool
    svd_dtype: str
    kd_temperature: float
    max_new_tokens: int
    cov_decoder: str
    static_gate: float | None


class MINGLE(MergeMethod):
    name = "mingle"
    Config = MINGLEConfig
    protocols = ("continual",)
    state_growth = "per_task"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        for key, allowed in _CHOICES.items():
            if cfg[key] not in allowed:
                raise UserError(f"method.{key} must be one of {[a for a in allowed if a]}, got {cfg[key]!r}")
        checks = [
            (
                cfg.lora_layer is None or len(cfg.lora_layer) > 0,
                "method.lora_layer must name at least one layer",
            ),
            (cfg.lora_r >= 1, f"method.lora_r must be >= 1, got {cfg.lora_r}"),
            (cfg.lr is None or cfg.lr > 0, f"method.lr must be > 0, got {cfg.lr}"),
            (
                cfg.batch_size is None or cfg.batch_size >= 1,
                f"method.batch_size must be >= 1, got {cfg.batch_size}",
            ),
            (cfg.max_steps >= 0, f"method.max_steps must be >= 0, got {cfg.max_steps}"),
            (
                cfg.seed_samples is None or cfg.seed_samples >= 1,
                f"method.seed_samples must be >= 1, got {cfg.seed_samples}",
            ),
            (cfg.subspace_k >= 0, f"method.subspace_k must be >= 0, got {cfg.subspace_k}"),
            (cfg.gamma >= 0, f"method.gamma must be >= 0, got {cfg.gamma}"),
            (0.0 <= cfg.beta <= 1.0, f"method.beta must be in [0, 1], got {cfg.beta}"),
            (cfg.gate_init_std >= 0, f"method.gate_init_std must be >= 0, got {cfg.gate_init_std}"),
            (cfg.kd_temperature > 0, f"method.kd_temperature must be > 0, got {cfg.kd_temperature}"),
            (cfg.max_new_tokens >= 1, f"method.max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    # ---- configuration resolved for the backbone ----------------------------------------------------
    def options(self) -> Options:
        modality = self.ctx.backbone.modality
        auto = AUTO["text" if modality == "text" else "vision"]
        c = self.cfg
        vals = {f: (c[f] if c[f] is not None else auto[f]) for f in auto}
        vals["lora_layer"] = [str(s) for s in vals["lora_layer"]]
        rest = {f: c[f] for f in Options.__dataclass_fields__ if f not in vals}
        opts = Options(**vals, **rest)
        if opts.seed_sampling == "per_class" and modality == "text":
            raise UserError("method.seed_sampling=per_class needs class labels; text tasks use total")
        return opts

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
